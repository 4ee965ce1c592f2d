"""
POST /generate over the fake: the SSE bytes the gateway reads (token events, the done event, one error event
and no done after a failure, `: ping` while Triton is silent), the headers, what Triton receives (the repaired
history, defaults, the Search toggle), and a client that leaves.
"""

from __future__ import annotations

import asyncio

import falcon.testing
import orjson

from bff.conversation import JOINER
from tests.bff.inprocess.client import Bff, events
from tests.support.bffkit import is_done
from tests.support.fake_triton import SILENT, TritonError, answer
from tools.bff_client import AUTH, text_of

USER = {"role": "user", "content": "hi"}


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


def test_token_and_done_events_are_these_bytes(bff):
    bff.pool.scripts = [answer("Hel", "lo", finish="length", gpu=3, prompt_tokens=12, dropped_turns=2)]
    r = bff.post("/generate", {"messages": [USER]})
    assert r.status_code == 200
    assert r.content == (b'data: {"token":"Hel","gpu":3}\n\n'
                         b'data: {"token":"lo","gpu":3}\n\n'
                         b'data: {"done":true,"finish_reason":"length","usage":{"prompt_tokens":12,'
                         b'"completion_tokens":2},"dropped_turns":2}\n\n')
    assert is_done(events(r.text)[-1])


def test_stream_headers_and_framing(bff):
    # pieces with line breaks and quotes stay one `data:` line each (JSON escapes them)
    bff.pool.scripts = [answer("line\nbreaks ", '"quoted"\r\n\n')]
    r = bff.post("/generate", {"messages": [user("line\nbreaks \"quoted\"")], "max_tokens": 8},
                 headers={**AUTH, "X-Request-ID": "abc"})
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/event-stream")
    assert r.headers["cache-control"] == "no-cache"
    assert r.headers["x-accel-buffering"] == "no"
    assert r.headers["x-request-id"] == "abc"
    assert text_of(events(r.text)) == 'line\nbreaks "quoted"\r\n\n'
    assert bff.pool.opened[0]["request_id"] == "abc"  # Triton's request id is the client's


def test_a_request_waiting_for_its_first_token_gets_pings(pool, tmp_path):
    # No wait before committing the 200: Triton's silence before the first token goes out as pings.
    pool.scripts = [[SILENT, SILENT, SILENT, *answer("a", "b")]]
    r = Bff(pool, tmp_path, first_response_wait_s=0, ping_interval_s=0.001).post("/generate", {"messages": [USER]})
    assert r.status_code == 200
    got = events(r.text)
    assert got[:2] == ["ping", "ping"] and got[2:4] == [{"token": "a", "gpu": 0}, {"token": "b", "gpu": 0}]
    assert is_done(got[-1]) and len(got) == 5


def test_pings_between_tokens_and_empty_pieces_send_nothing(pool, tmp_path):
    pool.scripts = [[*answer("a")[:1], SILENT, answer("")[0], *answer("b")]]
    got = events(Bff(pool, tmp_path, ping_interval_s=0.001).post("/generate", {"messages": [USER]}).text)
    assert got[:3] == [{"token": "a", "gpu": 0}, "ping", {"token": "b", "gpu": 0}] and is_done(got[3])


def test_a_failure_after_the_200_is_one_error_event_and_no_done(bff):
    bff.pool.scripts = [[*answer("a")[:1], TritonError("failed", "Stub process 'head_0_0' is not healthy.")]]
    r = bff.post("/generate", {"messages": [USER]})
    assert r.status_code == 200
    assert r.content.endswith(b'data: {"error":"failed","detail":"Stub process \'head_0_0\' is not healthy."}\n\n')
    assert events(r.text) == [{"token": "a", "gpu": 0},
                              {"error": "failed", "detail": "Stub process 'head_0_0' is not healthy."}]
    assert bff.pool.streams[0].closed


def test_triton_silent_past_the_bound_ends_the_stream_with_an_error(pool, tmp_path):
    pool.scripts = [answer("a")[:1]]  # then nothing, ever: a hung Triton
    bff = Bff(pool, tmp_path, ping_interval_s=0.005, stream_silence_s=0.02)
    got = events(bff.post("/generate", {"messages": [USER]}).text)
    assert got[0] == {"token": "a", "gpu": 0} and set(got[1:-1]) == {"ping"}
    assert got[-1] == {"error": "timeout", "detail": "no response from Triton for 0.02 s"}
    assert pool.streams[0].closed  # end() cancels it in Triton
    assert bff.get("/stats").json()["bff"]["errors"] == {"timeout": 1}


def test_a_client_that_leaves_gets_its_triton_request_cancelled(pool, tmp_path):
    pool.scripts = [answer("a")[:1]]  # one token, then the generation goes on
    bff = Bff(pool, tmp_path, ping_interval_s=0.001)

    async def leave() -> None:
        async with falcon.testing.ASGIConductor(bff.app) as conductor:
            result = await conductor.simulate_request("POST", "/generate", json={"messages": [USER]}, headers=AUTH,
                                                      _stream_result=True)
            while b"token" not in (body := await result.stream.read()):
                await asyncio.sleep(0.001)
            assert orjson.loads(body.split(b"\n\n")[0][6:]) == {"token": "a", "gpu": 0}
            assert not pool.streams[0].closed
            await result.finalize()  # the client disconnects

    asyncio.run(leave())
    assert pool.streams[0].closed and pool.endpoints[0].active == 0
    streams = bff.get("/stats").json()["bff"]["streams"]
    assert streams["ended"] == {"disconnect": 1} and streams["active"] == 0


def test_defaults_and_the_search_toggle_reach_triton(bff):
    s = bff.settings
    bff.post("/generate", {"messages": [USER]})
    bff.post("/generate", {"messages": [USER], "temperature": 0, "top_k": 5.0, "max_tokens": 9,
                           "force_web_search": True})
    first, second = bff.pool.opened
    assert {k: first[k] for k in ("model", "temperature", "top_k", "max_tokens", "min_answer_tokens", "force_tool")} \
        == {"model": "head", "temperature": s.temperature, "top_k": s.top_k, "max_tokens": s.max_tokens,
            "min_answer_tokens": s.min_answer_tokens, "force_tool": None}
    assert (second["temperature"], second["top_k"], second["max_tokens"], second["force_tool"]) == \
        (0.0, 5, 9, "web_search")
    assert type(second["top_k"]) is int


def test_a_51_message_window_starting_with_an_assistant_message(bff):
    history = [assistant("The earlier answer, cut off by the window.")]
    for i in range(25):
        history += [user(f"Question {i}?"), assistant(f"Answer {i}.")]
    window = [*history[:50], user("And now?")]
    assert len(window) == 51
    r = bff.post("/generate", {"messages": window})
    assert r.status_code == 200 and is_done(events(r.text)[-1])
    # the leading assistant message is dropped: the model sees what the repaired history gives it
    bff.post("/generate", {"messages": [*history[1:50], user("And now?")]})
    sent, again = (opened["messages"] for opened in bff.pool.opened)
    assert sent == again and sent[0] == user("Question 0?") and len(sent) == 49


def test_two_user_messages_in_a_row(bff):
    # a stopped turn left the first question without an answer; the next turn repeats it
    history = [user("What is 2+2?"), assistant("4."), user("Tell me a story."), user("A short one, please.")]
    r = bff.post("/generate", {"messages": history})
    assert r.status_code == 200
    assert bff.pool.opened[0]["messages"] == [*history[:2], user(f"Tell me a story.{JOINER}A short one, please.")]
    assert events(r.text)[-1]["dropped_turns"] == 0


def test_a_system_message_stays_first(bff):
    history = [{"role": "system", "content": "be brief"}, assistant("x"), user("a"), user("b")]
    bff.post("/generate", {"messages": history})
    assert bff.pool.opened[0]["messages"] == [history[0], user(f"a{JOINER}b")]
