"""
`bff.app:app`, what uvicorn and gunicorn's workers import, is made for a server process: its objects leave the
collector's sight (gc.freeze), so full collections under load walk only what requests made. `create_app`, which
the in-process tests call, leaves the caller's collector alone.
"""

from __future__ import annotations

import os
import subprocess
import sys

PROBE = """
import gc
import bff.app
from bff.settings import from_env
bff.app.create_app(from_env())
print(gc.get_freeze_count())
bff.app.app
print(gc.get_freeze_count())
"""


def test_the_server_app_freezes_what_it_holds_and_create_app_does_not():
    out = subprocess.run([sys.executable, "-c", PROBE], env={**os.environ, "BFF_RUN_OPEN": "1"}, capture_output=True,
                         text=True, timeout=60, check=True).stdout.split()
    assert int(out[0]) == 0 and int(out[1]) > 10_000, out
