"""
A model's tokenizer in Hugging Face's format, for the tools that count tokens with one (AIPerf, genai-perf):
transformers' own converter writes nanochat's tiktoken Encoding as a tokenizer.json with the same ids
(core/tokenizer_json.py reads it back). Needs transformers (the dev extra).

    python -m tools.hf_tokenizer <model version folder> <output folder>
"""

from __future__ import annotations

import argparse
import json
import pickle
from pathlib import Path

from backend.protocol import TOKENIZER_FILE


def convert(version_dir: Path, out: Path) -> Path:
    """Write out/tokenizer.json (and the config that names its class) for the tokenizer in version_dir."""
    from transformers.integrations.tiktoken import convert_tiktoken_to_fast

    with open(version_dir / TOKENIZER_FILE, "rb") as f:
        encoding = pickle.load(f)
    convert_tiktoken_to_fast(encoding, str(out))
    (out / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast"}))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("version_dir", type=Path, help="the model's version folder (holds the tokenizer)")
    p.add_argument("out", type=Path)
    a = p.parse_args()
    print(convert(a.version_dir, a.out))


if __name__ == "__main__":
    main()
