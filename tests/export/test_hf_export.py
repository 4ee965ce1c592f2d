"""
`make export` of a transformers NanoChat folder: the session's model repository holds one ("hf", tests/conftest.py),
exported from the folder transformers saved. Its graph under ONNX Runtime against transformers' own forward pass on
that folder, and its greedy answer through the real Triton server and the BFF against transformers' generate.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest
import torch

from backend import protocol
from backend.onnx_runner import OrtRunner
from core.tokenizer import Tokenizer
from tests.support.hf_models import oracle_encoding

TOL = 1e-3
MESSAGES = [{"role": "user", "content": "What is the capital of France? Answer in one word, then explain."}]
ANSWER = 24


def hf_export(oracle_repository) -> tuple[Path, dict, object]:
    """(the model's version folder, its metadata, transformers' model read from the folder it was exported from)."""
    from transformers import NanoChatForCausalLM

    version = oracle_repository / "hf" / protocol.VERSION
    meta = protocol.read_metadata(version)
    model = NanoChatForCausalLM.from_pretrained(meta["checkpoint_path"], dtype=torch.float32).eval()
    return version, meta, model


def transformers_greedy(model, ids: list[int], tok: Tokenizer, n: int) -> list[int]:
    """transformers' generate(do_sample=False), stopping where nanochat stops (assistant_end, bos), the stop cut."""
    out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                         do_sample=False, max_new_tokens=n, eos_token_id=[tok.assistant_end, tok.bos])
    new = out[0, len(ids):].tolist()
    return new[:next((i for i, t in enumerate(new) if t in (tok.assistant_end, tok.bos)), len(new))]


def test_the_export_records_its_source_and_ships_the_tokenizer(oracle_repository):
    version, meta, _ = hf_export(oracle_repository)
    folder = Path(meta["checkpoint_path"])
    assert (meta["source_format"], meta["source"], meta["step"], meta["generation"]) == \
        ("transformers", "dir", None, "G0")
    assert (folder / "config.json").is_file() and (folder / "model.safetensors.index.json").is_file()
    assert (meta["config"]["rope_bf16"], meta["config"]["rope_base"], meta["config"]["norm_eps"]) == \
        (False, 50000.0, 1e-3)
    shipped, nanochat = Tokenizer.load(version / protocol.TOKENIZER_FILE), oracle_encoding()
    assert shipped.enc._mergeable_ranks == nanochat._mergeable_ranks
    assert shipped.enc._special_tokens == nanochat._special_tokens and shipped.enc._pat_str == nanochat._pat_str


def test_onnx_runtime_matches_transformers(oracle_repository):
    """Prefill, then greedy decode steps through the cache: the last position's logits at every step."""
    version, meta, model = hf_export(oracle_repository)
    tok = Tokenizer.load(version / protocol.TOKENIZER_FILE)
    ort = OrtRunner(version / protocol.ONNX_FILE, meta["max_slots"], meta["max_seq"], threads=1)
    ids, slot = tok.render_for_completion(MESSAGES), np.array([meta["max_slots"] - 1])
    logits = ort.forward(np.array([ids]), np.array([0]), slot)[0]
    diff = 0.0
    for _ in range(16):
        with torch.no_grad():
            theirs = model(torch.tensor([ids])).logits[0, -1].numpy()
        diff = max(diff, float(np.abs(logits - theirs).max()))
        ids.append(int(theirs.argmax()))
        logits = ort.forward(np.array([ids[-1:]]), np.array([len(ids) - 1]), slot)[0]
    assert diff < TOL, f"ONNX Runtime vs transformers: max |logit diff| {diff:.2e}"


@pytest.mark.triton
def test_greedy_through_triton_and_the_bff_is_transformers_generate(triton_server, oracle_repository):
    import tritonclient.grpc.aio as grpcclient

    from tools.bff_client import generate, run_bff, text_of, triton_settings
    from tools.measure import SERVER_TIMEOUT_S
    from tools.stream_client import make_inputs, stream

    version, _, model = hf_export(oracle_repository)
    tok = Tokenizer.load(version / protocol.TOKENIZER_FILE)
    want = transformers_greedy(model, tok.render_for_completion(MESSAGES), tok, ANSWER)
    assert len(want) > 4  # an answer, not an early stop

    async def go():
        client = grpcclient.InferenceServerClient(triton_server.grpc_url)
        try:
            inputs = make_inputs(messages=MESSAGES, temperature=0.0, max_tokens=ANSWER)
            return await asyncio.wait_for(stream(client, "hf", inputs), SERVER_TIMEOUT_S)
        finally:
            await client.close()

    r = asyncio.run(go())
    assert r.error is None and r.token_ids == want
    with run_bff(**triton_settings(triton_server, model="hf")) as url:
        response, events = generate(url, {"messages": MESSAGES, "temperature": 0, "max_tokens": ANSWER})
    assert response.status_code == 200 and text_of(events) == tok.decode(want)
