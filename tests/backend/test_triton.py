"""The nanochat backend in a real Triton server (tests/conftest.py starts one per session), over gRPC."""

import asyncio

import pytest
import tritonclient.grpc.aio as grpcclient

from backend import protocol as P
from backend.model_config import EngineConfig
from backend.protocol import INVALID
from backend.sim_runner import write_sim_model
from tests.support.bffkit import assert_cancelled_and_freed, finished
from tests.support.tritonkit import DEMO_MAX_SEQ, greedy, long_prompt, run, stub_process, wait_busy
from tools import measure
from tools.local_triton import derive_model
from tools.measure import SERVER_TIMEOUT_S, metrics_once_ended
from tools.stream_client import make_inputs, stream

pytestmark = pytest.mark.triton


@pytest.mark.parametrize("model", ["head", "orig"])
def test_greedy_streams_match_nanochat(triton_server, oracle_references, model):
    convs = oracle_references[model]["conversations"]

    async def go(client):
        return await asyncio.gather(*(stream(client, model, greedy(messages=c["messages"], max_tokens=32))
                                      for c in convs))

    for conv, r in zip(convs, run(go, triton_server), strict=True):
        ref = conv["greedy"]
        assert r.error is None and r.finals == 1 and r.device_ids == {0}, conv["name"]
        assert r.token_ids == ref["tokens_generate_batch_style"] == ref["tokens"], conv["name"]
        assert r.text == ref["text"], conv["name"]
        assert (r.finish_reason, r.prompt_tokens, r.completion_tokens) == ("length", conv["prompt_len"], 32)


def test_stream_interval_groups_tokens_and_changes_nothing_else(triton_server, oracle_references, oracle_repository):
    derive_model(oracle_repository, "head", "head_grouped", stream_interval=4)
    conv = oracle_references["head"]["conversations"][0]

    async def go(client):
        await client.load_model("head_grouped", client_timeout=SERVER_TIMEOUT_S)
        try:
            return await stream(client, "head_grouped", greedy(messages=conv["messages"], max_tokens=32))
        finally:
            await client.unload_model("head_grouped", client_timeout=SERVER_TIMEOUT_S)

    r = run(go, triton_server)
    assert r.error is None and r.finals == 1 and r.token_ids == conv["greedy"]["tokens"]
    assert r.text == conv["greedy"]["text"] and r.finish_reason == "length"
    # 32 tokens: the first alone, 7 groups of 4, and the final response with tokens 30-32 (9 responses; the
    # backend merges responses further only when its sends fall behind)
    assert 2 <= r.responses <= 9, r.responses


def test_a_simulated_gpu_streams_at_most_one_response_per_interval(triton_server, oracle_repository):
    """backend/sim_runner.py in the real server (runtime "sim", the d20-on-L4 profile: a few ms a step): eight
    sampled streams of 64 tokens, each whole, the first token alone and then at most one response per
    stream_interval_ms (tokens made in between travel together); the backend counts the device's busy time."""
    interval = EngineConfig().stream_interval_ms / 1000
    write_sim_model(oracle_repository, "sim", oracle_repository / "demo" / P.VERSION / P.TOKENIZER_FILE, "d20-l4", 8,
                    256, EngineConfig())

    async def go(client):
        await client.load_model("sim", client_timeout=SERVER_TIMEOUT_S)
        try:
            results = await asyncio.gather(*(stream(client, "sim", make_inputs(
                prompt_ids=[5, 6, 7, i], temperature=0.8, top_k=50, max_tokens=64)) for i in range(8)))
            return results, await asyncio.to_thread(metrics_once_ended, triton_server.metrics_url, "sim", 8)
        finally:
            await client.unload_model("sim", client_timeout=SERVER_TIMEOUT_S)

    results, text = run(go, triton_server)
    for r in results:
        assert r.error is None and r.finals == 1 and len(r.token_ids) == 64 and r.finish_reason == "length"
        assert len(r.times) <= 2 + (r.times[-1] - r.times[0]) / interval < 64, r.times
    assert measure.metric(text, P.METRIC_RUNNER_SECONDS, model="sim") > 0


def test_seeded_sampling_matches_nanochat(triton_server, oracle_references):
    conv = oracle_references["head"]["conversations"][0]
    want = conv["sampled_t1_k50_seed42"]

    async def go(client):
        p = want["params"]
        return await stream(client, "head", make_inputs(messages=conv["messages"], temperature=p["temperature"],
                                                        top_k=p["top_k"], max_tokens=p["max_tokens"], seed=p["seed"]))

    assert run(go, triton_server).token_ids == want["tokens_generate_batch_style"]


def test_a_tiny_temperature_harms_no_other_stream(triton_server, oracle_references):
    """T = 1e-38 passes the range check; logits / T overflowed, sampling raised, and the catch-all ended every
    stream on the instance. Now it samples as 0.01 (as vLLM clamps), and the four beside it are untouched."""
    convs = oracle_references["head"]["conversations"][:4]

    async def go(client):
        tiny = make_inputs(messages=convs[0]["messages"], temperature=1e-38, top_k=50, max_tokens=16, seed=3)
        return await asyncio.gather(stream(client, "head", tiny), *(
            stream(client, "head", greedy(messages=c["messages"], max_tokens=16)) for c in convs))

    tiny, *normal = run(go, triton_server)
    assert tiny.error is None and tiny.finals == 1 and tiny.completion_tokens == 16
    for conv, r in zip(convs, normal, strict=True):
        assert r.error is None and r.token_ids == conv["greedy"]["tokens"][:16], conv["name"]


def long_history(turns: int) -> list[dict]:
    """A chat whose history is several times head's 512-token context."""
    conv = []
    for i in range(turns):
        conv += [{"role": "user", "content": f"Tell me about the number {i} and why it matters to us."},
                 {"role": "assistant", "content": f"The number {i} is one of many numbers, and it matters a little."}]
    return [*conv, {"role": "user", "content": "And what about the sky?"}]


def test_min_answer_tokens_cuts_the_oldest_turns_of_a_long_history(triton_server):
    conv = long_history(30)

    async def go(client):
        refused = await stream(client, "head", greedy(messages=conv, max_tokens=16))
        cut = await stream(client, "head", greedy(messages=conv, max_tokens=300, min_answer_tokens=128))
        kept = conv[2 * cut.dropped_turns:]
        # the same conversation sent already cut: the model sees exactly the same prompt
        alone = await stream(client, "head", greedy(messages=kept, max_tokens=300))
        return refused, cut, alone

    refused, cut, alone = run(go, triton_server)
    assert refused.error is not None and "does not fit the context" in refused.error  # without it: refused
    assert cut.error is None and cut.finals == 1 and 0 < cut.dropped_turns < 30
    assert cut.prompt_tokens <= 512 - 128  # room for min(max_tokens, min_answer_tokens) tokens of answer
    assert (cut.token_ids, cut.prompt_tokens, alone.dropped_turns) == (alone.token_ids, alone.prompt_tokens, 0)
    assert cut.completion_tokens == len(cut.token_ids)


def test_16_concurrent_streams_get_what_they_get_alone(triton_server, oracle_references):
    convs = oracle_references["head"]["conversations"]
    cases = []
    for i in range(16):
        conv = convs[i % len(convs)]
        params = dict(max_tokens=12 + i % 5)
        params.update(temperature=0.0) if i % 2 else params.update(temperature=0.9, top_k=[0, 20, 50][i % 3], seed=i)
        cases.append(make_inputs(messages=conv["messages"], **params))

    async def go(client):
        alone = [await stream(client, "head", inputs) for inputs in cases]
        together = await asyncio.gather(*(stream(client, "head", inputs) for inputs in cases))
        return alone, together

    alone, together = run(go, triton_server, timeout=240)
    for i, (a, b) in enumerate(zip(alone, together, strict=True)):
        assert a.error is None and b.error is None and a.finals == b.finals == 1, i
        assert (a.token_ids, a.text) == (b.token_ids, b.text), i


def test_cancelled_stream_frees_its_slot(triton_server):
    before = finished(triton_server, "demo_1slot")
    first = run(lambda c: stream(c, "demo_1slot", long_prompt(), cancel_when=lambda r: r.responses >= 3), triton_server)
    assert first.responses == 3 and first.error is None
    assert_cancelled_and_freed(triton_server, "demo_1slot", before)  # the backend saw the client go
    # one slot and one queue place: both fit only if the cancelled request let its slot go
    after = run(lambda c: asyncio.gather(*(stream(c, "demo_1slot", greedy(prompt_ids=[1, 2, 3], max_tokens=20))
                                           for _ in range(2))), triton_server)
    assert all(r.error is None and r.finals == 1 for r in after), [r.error for r in after]


def test_bad_requests_get_errors_and_the_server_keeps_serving(triton_server):
    user = [{"role": "user", "content": "hi"}]
    bad = {
        "not valid JSON": make_inputs(raw_messages="[{not json"),
        "unknown role": make_inputs(messages=[{"role": "robot", "content": "hi"}]),
        "does not fit the context": make_inputs(prompt_ids=[5] * 300),
        "temperature must be in": make_inputs(messages=user, temperature=3.0),
        "top_k must be in": make_inputs(messages=user, top_k=201),
        "max_tokens must be in": make_inputs(messages=user, max_tokens=0),
        "seed must be in": make_inputs(messages=user, seed=-1),
        "exactly one of messages, prompt_ids and text_input": make_inputs(messages=user, prompt_ids=[1, 2]),
        "outside the vocabulary": make_inputs(prompt_ids=[1, 10**6]),
        "last message must be from the user": make_inputs(messages=[{"role": "assistant", "content": "hi"}]),
        "min_answer_tokens must be in": make_inputs(messages=user, min_answer_tokens=0),
        "last user message does not fit the context": make_inputs(messages=[{"role": "user", "content": "x y " * 300}],
                                                                   min_answer_tokens=8),
    }

    async def go(client):
        errors = await asyncio.gather(*(stream(client, "demo", inputs) for inputs in bad.values()))
        return errors, await stream(client, "demo", greedy(messages=user, max_tokens=5))

    errors, ok = run(go, triton_server)
    for (expected, _), r in zip(bad.items(), errors, strict=True):
        assert r.error is not None and expected in r.error and r.finals == 1, (expected, r.error)
        assert INVALID in r.error  # the client's fault, told apart from the server's own failures
    assert ok.error is None and ok.finals == 1 and ok.completion_tokens >= 1


def test_full_queue_is_refused_at_once(triton_server):
    async def go(client):
        done = asyncio.Event()
        running = [asyncio.create_task(stream(client, "demo_1slot", long_prompt(), cancel_when=lambda r: done.is_set()))
                   for _ in range(2)]
        await wait_busy(triton_server, "demo_1slot", active=1, queued=1)
        refused = await stream(client, "demo_1slot", greedy(prompt_ids=[1, 2], max_tokens=2))
        done.set()
        return refused, await asyncio.gather(*running)

    refused, running = run(go, triton_server)
    assert refused.error is not None and "queue full" in refused.error and refused.finals == 1, [
        (r.finish_reason, r.completion_tokens, r.error) for r in running]
    assert all(r.error is None for r in running)


def test_soak_500_requests_leaves_no_growth(triton_server, oracle_repository):
    """500 requests through a model of its own (demo's artifacts, counters from zero): every answer equals the
    prompt's answer alone, no thread or descriptor grows, and every counter moves by what the clients saw."""
    derive_model(oracle_repository, "demo", "demo_soak")
    run(lambda c: c.load_model("demo_soak", client_timeout=SERVER_TIMEOUT_S), triton_server)
    try:
        soak(triton_server)
    finally:
        run(lambda c: c.unload_model("demo_soak", client_timeout=SERVER_TIMEOUT_S), triton_server)


def soak(triton_server) -> None:
    prompts = [[1 + i % 50, 2, 3] for i in range(500)]

    async def burst(client, ids_list, concurrency=12):  # demo: 4 slots + 8 queue places
        sem = asyncio.Semaphore(concurrency)

        async def one(ids):
            async with sem:
                return await stream(client, "demo_soak", greedy(prompt_ids=ids, max_tokens=3))

        return await asyncio.gather(*(one(ids) for ids in ids_list))

    # each distinct prompt alone first: the reference every soak response must equal (and the warm-up)
    alone = run(lambda c: burst(c, prompts[:50], concurrency=1), triton_server)
    reference = {tuple(ids): r.token_ids for ids, r in zip(prompts[:50], alone, strict=True)}
    stub = stub_process(triton_server, "demo_soak")
    before = (stub.num_threads(), stub.num_fds())
    counted = metrics_once_ended(triton_server.metrics_url, "demo_soak", 50)
    results = run(lambda c: burst(c, prompts), triton_server, timeout=300)
    assert all(r.error is None and r.finals == 1 for r in results), {r.error for r in results}
    wrong = [i for i, (ids, r) in enumerate(zip(prompts, results, strict=True)) if r.token_ids != reference[tuple(ids)]]
    assert wrong == [], f"{len(wrong)} soak responses differ from the prompt's answer alone, e.g. #{wrong[:3]}"
    after = (stub.num_threads(), stub.num_fds())
    assert after[0] <= before[0] and after[1] <= before[1] + 2, (before, after)
    text = metrics_once_ended(triton_server.metrics_url, "demo_soak", 550)
    delta = lambda name, **labels: measure.metric(text, name, model="demo_soak", **labels) - measure.metric(
        counted, name, model="demo_soak", **labels)
    assert measure.metric(text, P.METRIC_ACTIVE_SLOTS, model="demo_soak") == 0
    assert measure.metric(text, P.METRIC_QUEUE_DEPTH, model="demo_soak") == 0
    streamed = sum(len(r.token_ids) for r in results)  # stop tokens end a stream and are not streamed
    stops = sum(r.finish_reason == "stop" for r in results)
    assert delta(P.METRIC_GENERATED_TOKENS) == streamed + stops
    assert delta(P.METRIC_PROMPT_TOKENS) == 3 * 500
    assert {reason: delta(P.METRIC_FINISHED, finish_reason=reason) for reason in P.FINISH_REASONS} == {
        "stop": stops, "length": 500 - stops, "cancelled": 0, "error": 0}
    assert delta(P.METRIC_TTFT + "_count") == 500
    for per_request in (P.METRIC_E2E, P.METRIC_QUEUE_TIME, P.METRIC_REQUEST_PROMPT, P.METRIC_REQUEST_GENERATION):
        assert delta(per_request + "_count") == 500, per_request
    assert delta(P.METRIC_REQUEST_PROMPT + "_sum") == 3 * 500
    assert delta(P.METRIC_REQUEST_GENERATION + "_sum") == streamed
    assert measure.metric(text, P.METRIC_SLOT_USAGE, model="demo_soak") == 0
    itl_count = delta(P.METRIC_ITL + "_count")
    inf = [v for _, v in measure.samples(text, P.METRIC_ITL + "_bucket", model="demo_soak", le="+Inf")]
    assert itl_count == streamed + stops - 500  # a gap before every token but each request's first
    assert inf == [measure.metric(text, P.METRIC_ITL + "_count", model="demo_soak")]  # +Inf counts every gap


def test_unload_while_streaming_lets_every_stream_finish_first(triton_server):
    """Triton unloads a model only after its requests in flight have ended: three streams, held mid-answer
    (the stub paused) while the unload is asked for, each still run to the end of the context, whole; then
    the model goes. (Nothing hangs: a stuck unload would time out here.)"""
    stub = stub_process(triton_server, "demo")

    async def go(client):
        started = asyncio.Event()

        def note_first_token(result) -> bool:  # never cancels
            started.set()
            return False

        streams = [asyncio.create_task(stream(client, "demo", long_prompt(), cancel_when=note_first_token))
                   for _ in range(3)]
        await asyncio.wait_for(started.wait(), 30)
        stub.suspend()
        try:
            unload = asyncio.create_task(client.unload_model("demo", client_timeout=SERVER_TIMEOUT_S))
            await asyncio.sleep(0.5)
            held = sum(not t.done() for t in streams)
        finally:
            stub.resume()
        results = await asyncio.wait_for(asyncio.gather(*streams), 60)
        await asyncio.wait_for(unload, 60)
        gone = not await client.is_model_ready("demo", client_timeout=SERVER_TIMEOUT_S)
        await client.load_model("demo", client_timeout=SERVER_TIMEOUT_S)  # back for any later test
        return held, results, gone, await client.is_model_ready("demo", client_timeout=SERVER_TIMEOUT_S)

    held, results, gone, ready = run(go, triton_server)
    assert held == 3  # the unload was asked for while all three were mid-answer
    for r in results:
        assert (r.error, r.finals, r.finish_reason) == (None, 1, "length")
        assert r.completion_tokens == len(r.token_ids) == DEMO_MAX_SEQ - 4  # to the end of the context
    assert gone and ready


def test_tritons_generate_extension_answers_text_input(triton_server, oracle_references):
    """curl's call from vllm_backend's and tensorrtllm_backend's READMEs: /generate with text_input answers
    once with the whole text_output; generate_stream with "stream": true streams it. The prompt is <|bos|>
    and the text, as a raw prompt_ids request gives it."""
    import httpx
    import orjson

    from core.tokenizer import Tokenizer
    from tests.support.oracles import oracle_tokenizer

    tok = Tokenizer.load(oracle_tokenizer())
    text = "The capital of France is"
    want = run(lambda c: stream(c, "head", greedy(prompt_ids=[tok.bos, *tok.encode(text)], max_tokens=16)),
               triton_server)
    body = {"text_input": text, "max_tokens": 16, "temperature": 0.0}
    whole = httpx.post(f"{triton_server.http_url}/v2/models/head/generate", json=body, timeout=60)
    assert whole.status_code == 200, whole.text
    answer = whole.json()
    assert answer["text_output"] == want.text and answer["finish_reason"] == "length"
    assert answer["completion_tokens"] == 16
    with httpx.stream("POST", f"{triton_server.http_url}/v2/models/head/generate_stream",
                      json={**body, "stream": True}, timeout=60) as r:
        events = [orjson.loads(line[5:]) for line in r.iter_lines() if line.startswith("data:")]
    assert len(events) > 1 and "".join(e["text_output"] for e in events) == want.text
    # vLLM's per-response counts: the prompt in every response, the tokens behind each piece
    assert {e["num_input_tokens"] for e in events} == {len(tok.encode(text)) + 1}
    assert sum(e["num_output_tokens"] for e in events) == 16


def test_stop_strings_through_tritons_generate_extension(triton_server):
    """`stop` as vLLM's users send it to /generate: a list of strings, or one string; the answer ends just
    before the first match with finish_reason stop, and its slot is free (the completion count stops there)."""
    import httpx

    url = f"{triton_server.http_url}/v2/models/head/generate"
    body = {"text_input": "The capital of France is", "max_tokens": 24, "temperature": 0.0}
    whole = httpx.post(url, json=body, timeout=60).json()
    stop = whole["text_output"][6:9]
    for given in ([stop, "\u2603never"], stop):
        cut = httpx.post(url, json={**body, "stop": given}, timeout=60)
        assert cut.status_code == 200, cut.text
        answer = cut.json()
        assert answer["text_output"] == whole["text_output"][: whole["text_output"].index(stop)]
        assert answer["finish_reason"] == "stop" and answer["completion_tokens"] < 24
    refused = httpx.post(url, json={**body, "stop": ["x"] * 17}, timeout=60)
    assert refused.status_code == 400 and "at most 16" in refused.text


def test_a_vllm_clients_flags_and_named_outputs_get_the_token_counts(triton_server):
    """What a client of vLLM's backend sends: its `return_num_*` flags (accepted, no 'unexpected input'), with
    no outputs named (every response has the counts) or naming them with text_output (only what it named)."""
    prompt = [0, 1, 2, 3, 4]
    names = ("text_output", "num_input_tokens", "num_output_tokens", "token_ids")

    async def responses(client, outputs):
        request = {"model_name": "head", "inputs": greedy(prompt_ids=prompt, max_tokens=8, return_num_input_tokens=True,
                                                          return_num_output_tokens=True)}
        if outputs:
            request["outputs"] = [grpcclient.InferRequestedOutput(name) for name in outputs]

        async def one():
            yield request

        got = []
        async for response, error in client.stream_infer(one()):
            assert error is None, error
            got.append({name: response.as_numpy(name) for name in names})
        return got

    async def go(client):
        return (await responses(client, None), await responses(client, names[:3]))

    whole, named = run(go, triton_server)
    for got in (whole, named):
        assert all(r["num_input_tokens"].tolist() == [len(prompt)] for r in got)
        assert sum(int(r["num_output_tokens"][0]) for r in got) == 8
        assert "".join(r["text_output"][0].decode() for r in got)
    assert all(r["token_ids"] is not None for r in whole) and all(r["token_ids"] is None for r in named)
