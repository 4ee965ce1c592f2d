"""
`python -m export`: the CLI behind `make export` (the Makefile passes its variables through).

Exit codes: 0 exported; 2 bad input (unknown tag or step, bad option, no GPU for RUNTIME=tensorrt,
target not writable or holding another model) with the reason on stderr; 1 an unexpected failure;
130 interrupted. In every failing case the repository keeps what it had before.
"""

from __future__ import annotations

import argparse
import signal
import sys

from export.pipeline import DEFAULT_SOURCE, DEFAULTS, RUNTIMES, ExportError, export_model
from export.precision import PRECISIONS
from runtime.checkpoint import SOURCES


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m export",
        description="Export a nanochat checkpoint to a Triton model: ONNX graph (+ TensorRT engine on GPU "
                    "nodes), tokenizer, metadata and config.pbtxt, written atomically into the model repository.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--model", help="model tag (nanochat's d<N> folders); default: the largest one found")
    p.add_argument("--source", choices=sorted(SOURCES),
                   help=f"checkpoint source; default {DEFAULT_SOURCE}, falling back (with a note) to rl, mid, "
                        "base when there is no sft checkpoint")
    p.add_argument("--step", type=int, help="checkpoint step; default: the last one")
    p.add_argument("--checkpoint-dir", help="a plain folder with model_<step>.pt/meta_<step>.json instead of "
                                            "the nanochat layout")
    p.add_argument("--name", help="Triton model name; default: the model tag")
    p.add_argument("--runtime", default="auto", choices=RUNTIMES,
                   help="auto: tensorrt where a GPU and TensorRT are present, else onnx (ONNX Runtime)")
    p.add_argument("--precision", default="fp32", choices=PRECISIONS,
                   help="graph precision; fp16/bf16 keep norms, softmax and softcap in fp32")
    p.add_argument("--max-slots", type=int, default=DEFAULTS["max_slots"],
                   help="KV-cache rows: sequences decoded together")
    p.add_argument("--max-seq", type=int, help="context per row; default: the checkpoint's sequence_len")
    p.add_argument("--max-queue", type=int, default=DEFAULTS["max_queue"],
                   help="requests that may wait for a slot")
    p.add_argument("--prefill-chunk", type=int, default=DEFAULTS["prefill_chunk"],
                   help="prompt tokens prefilled per step")
    p.add_argument("--stream-interval", type=int, default=DEFAULTS["stream_interval"],
                   help="tokens per response after the first (1: every token on its own; more: less CPU per token)")
    p.add_argument("--model-repository", default="model_repository", help="Triton model repository to write into")
    p.add_argument("--nanochat-base-dir", help="nanochat base dir; default $NANOCHAT_BASE_DIR or ~/.cache/nanochat")
    p.add_argument("--force", action="store_true", help="replace an existing, different model of that name")
    p.add_argument("--no-verify", dest="verify", action="store_false",
                   help="skip running the graph once under ONNX Runtime against PyTorch")
    return p.parse_args(argv)


def _terminate(signum, frame):
    raise KeyboardInterrupt  # so the staging folder is removed on `kill` as on Ctrl-C


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    try:
        export_model(
            a.model_repository, a.name or None, model=a.model or None, source=a.source, step=a.step,
            checkpoint_dir=a.checkpoint_dir or None, runtime=a.runtime, precision=a.precision,
            max_slots=a.max_slots, max_seq=a.max_seq, force=a.force, nanochat_base=a.nanochat_base_dir or None,
            max_queue=a.max_queue, prefill_chunk=a.prefill_chunk, stream_interval=a.stream_interval,
            verify=a.verify,
        )
    except ExportError as e:
        print(f"export: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("export: interrupted; the model repository is unchanged", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
