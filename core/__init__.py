"""nanochat's model as a library: checkpoints, every architecture generation's forward pass, the tokenizer and
chat format, sampling, the calculator tool and the generation rules. torch, tiktoken and numpy only: nothing
here knows Triton, ONNX or HTTP."""
