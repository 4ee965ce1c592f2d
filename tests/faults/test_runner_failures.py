"""
A model whose runner fails step after step reports itself unhealthy, and the BFF routes around it. The graph
of a demo model gets one extra lookup that ONNX Runtime refuses for the byte tokens 0-2, which no chat text
contains (as a broken device or a corrupt engine would fail, mid-serving): a raw prompt_ids request that holds
one fails its first step. After unhealthy_after (a config.pbtxt parameter, here 3) failed steps in a row,
Triton's nanochat_healthy gauge is 0 and the BFF's /health says not ready within a probe interval; the
first step that succeeds makes both healthy again.
"""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import tritonclient.grpc.aio as grpcclient
from onnx import helper, numpy_helper

from backend.protocol import INPUT_IDS, LOGITS, METRIC_HEALTHY
from tests.support.bffkit import wait_until
from tools.bff_client import generate, health, run_bff, triton_settings
from tools.local_triton import LocalTriton, derive_model
from tools.measure import metric
from tools.stream_client import make_inputs, stream

pytestmark = pytest.mark.triton
TABLE = 1 << 20  # more rows than any vocabulary
# one token: it comes from the prefill, so no step feeds the model a token it generated (this random-weight
# model may well pick a byte token)
SHORT = {"messages": [{"role": "user", "content": "Hi"}], "temperature": 0, "max_tokens": 1}


def fail_on_low_tokens(graph_path: Path) -> None:
    """Rewrite the graph so that it raises for token ids below 3 (an out-of-range Gather: the index
    id - 3 - TABLE is in [-TABLE, 0) for every other id) and is unchanged otherwise:
    logits + 0 * sum(table[ids - 3 - TABLE])."""
    model = onnx.load(str(graph_path), load_external_data=False)
    g = model.graph
    producer = next(n for n in g.node if LOGITS in n.output)
    producer.output[list(producer.output).index(LOGITS)] = "logits_inner"
    g.initializer.extend([numpy_helper.from_array(np.zeros(TABLE, np.float32), "fault_table"),
                          numpy_helper.from_array(np.array(3 + TABLE, np.int64), "fault_offset"),
                          numpy_helper.from_array(np.zeros((), np.float32), "fault_zero")])
    g.node.extend([
        helper.make_node("Sub", [INPUT_IDS, "fault_offset"], ["fault_index"]),
        helper.make_node("Gather", ["fault_table", "fault_index"], ["fault_rows"]),
        helper.make_node("ReduceSum", ["fault_rows"], ["fault_sum"], keepdims=0),
        helper.make_node("Mul", ["fault_sum", "fault_zero"], ["fault_nothing"]),
        helper.make_node("Add", ["logits_inner", "fault_nothing"], [LOGITS]),
    ])
    for link in graph_path.parent.glob(graph_path.name + "*"):  # links to the source model's files: ONNX
        target = link.resolve()                                  # Runtime wants the data beside the graph
        link.unlink()
        shutil.copyfile(target, link)
    onnx.save(model, str(graph_path))


@pytest.fixture(scope="module")
def faulty_triton(oracle_repository):
    folder = derive_model(oracle_repository, "demo", "demo_faulty", unhealthy_after=3)
    fail_on_low_tokens(folder / "1" / "model.onnx")
    with LocalTriton(oracle_repository, load=["demo_faulty"]) as server:
        yield server


def healthy(server) -> float:
    return metric(server.metrics_url, METRIC_HEALTHY, model="demo_faulty")


def raw(server, prompt_ids: list[int]) -> str | None:
    """A prompt_ids request straight to Triton; its error."""
    async def go():
        client = grpcclient.InferenceServerClient(server.grpc_url)
        try:
            return await stream(client, "demo_faulty", make_inputs(prompt_ids=prompt_ids, max_tokens=4))
        finally:
            await client.close()

    return asyncio.run(go()).error


def test_repeated_runner_failures_make_the_model_unhealthy_until_a_step_succeeds(faulty_triton):
    with run_bff(**triton_settings(faulty_triton, model="demo_faulty")) as url:
        assert generate(url, SHORT)[0].status_code == 200 and healthy(faulty_triton) == 1
        for _ in range(3):
            assert "inference failed" in raw(faulty_triton, [0, 1, 2])
        wait_until(lambda: healthy(faulty_triton) == 0, "the gauge still says healthy")
        wait_until(lambda: health(url)["ready"] is False,
                   "the BFF still reports ready with a failing model")
        r, events = generate(url, SHORT)  # still tried, and it works: healthy again
        assert r.status_code == 200 and events[-1].get("done"), events[-1]
        wait_until(lambda: healthy(faulty_triton) == 1, "the gauge still says unhealthy")
        wait_until(lambda: health(url)["ready"] is True, "the BFF never recovered")
