"""Where things are, for the tools and the tests: this checkout, and ../shared beside it (the oracles: real
nanochat-trained checkpoints with nanochat's own outputs; the inference contract). NANOCHAT_ORACLE_DIR
points the oracles elsewhere."""

from __future__ import annotations

import os
from pathlib import Path

from core.checkpoint import TOKENIZER_FILE

PROJECT = Path(__file__).resolve().parents[1]
SHARED = PROJECT.parent / "shared"
ORACLE_DIR = Path(os.environ.get("NANOCHAT_ORACLE_DIR", SHARED / "oracle"))
ORACLE_TOKENIZER = ORACLE_DIR / "head" / "tokenizer" / TOKENIZER_FILE  # nanochat's, as the head oracle trained it
CONTRACT = SHARED / "contracts" / "inference-api.yaml"
