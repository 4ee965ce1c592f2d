"""What is run by hand and never shipped in an image: the local Triton launcher, make serve/demo, the stream
client, the benchmarks and gpu-check, and the measuring helpers they share with the tests."""
