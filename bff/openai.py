"""
OpenAI's chat API beside the contract, for the clients of vLLM, SGLang and trtllm-serve (the openai SDK,
LangChain, AIPerf): GET /v1/models and POST /v1/chat/completions, answered in OpenAI's shapes, streamed or
whole. Unlike /generate, a conversation is sent as given: a prompt longer than the context is OpenAI's
`context_length_exceeded` 400, as vLLM answers. vLLM's `top_k`, `min_tokens` and `ignore_eos` are taken too.
"""

from __future__ import annotations

import secrets
import time

import falcon
import orjson

from backend.protocol import FORCED_TOOLS
from bff.errors import OpenAIError
from bff.generate import Event, stream_headers
from bff.generation_params import GenerationParams
from bff.streaming import Generation
from bff.validation import OPENAI_CHAT, read_json, violation

DONE = Event(b"data: [DONE]\n\n")


def content_text(content) -> str:
    """A message's content: a string, or OpenAI's list of parts of which only text parts carry text."""
    if isinstance(content, str):
        return content
    return "".join(part.get("text", "") for part in content if part.get("type") == "text")


def forced_tool(choice) -> str | None:
    """OpenAI's tool_choice naming a function: the call the answer starts with (web_search only); "none", "auto"
    and "required" leave the model to call tools as it was trained to."""
    if not isinstance(choice, dict):
        return None
    name = (choice.get("function") or {}).get("name")
    if name not in FORCED_TOOLS:
        raise OpenAIError(falcon.HTTP_400, f"tool_choice can force only {', '.join(FORCED_TOOLS)}, not {name!r}",
                          param="tool_choice")
    return name


class V1Models:
    """GET /v1/models: the served model first, then the repository's others."""

    def __init__(self, service) -> None:
        self.service = service

    async def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        registry = self.service.registry
        names = [m["model_tag"] for m in await registry.models()]
        names.sort(key=lambda n: n != registry.current)
        created = int(self.service.stats.started)
        resp.media = {"object": "list", "data": [{"id": n, "object": "model", "created": created,
                                                  "owned_by": "nanochat-triton"} for n in names]}


class ChatCompletions:
    def __init__(self, service) -> None:
        self.service = service
        self.settings = service.settings

    async def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        body = await read_json(req, self.settings.max_body_bytes)
        if (found := violation(OPENAI_CHAT, body)) is not None:
            raise OpenAIError(falcon.HTTP_400, found[0], param=found[1])
        model = self.service.registry.serving()
        if body["model"] != model:
            raise OpenAIError(falcon.HTTP_404, f"The model `{body['model']}` does not exist or is not the one "
                              f"served; this server serves `{model}` (GET /v1/models)", param="model",
                              code="model_not_found")
        top_k = body.get("top_k")
        params = GenerationParams(
            messages=orjson.dumps([{"role": "system" if m["role"] == "developer" else m["role"],
                                    "content": content_text(m["content"])} for m in body["messages"]]),
            temperature=body.get("temperature"),
            top_k=None if top_k is None else max(0, int(top_k)),  # vLLM's -1: the whole vocabulary, our 0
            max_tokens=body.get("max_completion_tokens") or body.get("max_tokens"),
            top_p=body.get("top_p"), seed=body.get("seed"),
            # the backend ends the answer (and frees its slot) at the first stop string
            stop=(body["stop"],) if isinstance(body.get("stop"), str) else tuple(body.get("stop") or ()),
            force_tool=forced_tool(body.get("tool_choice")),
            min_tokens=body.get("min_tokens"), ignore_eos=body.get("ignore_eos"),  # vLLM's, as benchmarks send them
        )
        g = await self.service.streams.open(req, params)
        g.log["surface"] = "openai"
        head = {"id": f"chatcmpl-{secrets.token_hex(12)}", "created": int(time.time()), "model": model}
        if body.get("stream"):
            stream_headers(resp)
            include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
            resp.sse = self._chunks(g, head, include_usage)
        else:
            resp.media = await self._whole(g, head)

    async def _run(self, g: Generation):
        """(text to send, finish_reason or None) as the generation goes; (None, None) for a ping."""
        async for piece in self.service.streams.pieces(g):
            if piece is None:
                yield None, None
            elif piece.final:
                yield piece.text, "length" if piece.finish_reason == "length" else "stop"
            elif piece.text:
                yield piece.text, None

    def _usage(self, g: Generation) -> dict:
        usage = g.final.usage
        prompt, completion = usage["prompt_tokens"], usage["completion_tokens"]
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    async def _whole(self, g: Generation, head: dict) -> dict:
        text, finish = [], "stop"
        with self.service.streams.relay(g):
            async for chunk, finished in self._run(g):
                text.append(chunk or "")
                finish = finished or finish
        if g.error is not None:
            raise OpenAIError(falcon.HTTP_502, f"the generation failed: {g.error.detail}", kind="server_error")
        return {**head, "object": "chat.completion", "system_fingerprint": None,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(text)}, "logprobs": None,
                             "finish_reason": finish}],
                "usage": self._usage(g)}

    async def _chunks(self, g: Generation, head: dict, include_usage: bool):
        chunk = {**head, "object": "chat.completion.chunk", "system_fingerprint": None}

        def event(delta: dict, finish: str | None) -> Event:
            return Event({**chunk, "choices": [{"index": 0, "delta": delta, "logprobs": None,
                                                "finish_reason": finish}]})

        with self.service.streams.relay(g):
            yield event({"role": "assistant", "content": ""}, None)
            async for text, finish in self._run(g):
                if text is None and finish is None:
                    yield None  # `: ping` (SSE comment lines are skipped by OpenAI clients)
                    continue
                if text:
                    yield event({"content": text}, None)
                if finish:
                    yield event({}, finish)
            if include_usage:
                yield Event({**chunk, "choices": [], "usage": self._usage(g)})
            yield DONE
        if g.error is not None:
            yield Event({"error": {"message": f"the generation failed: {g.error.detail}", "type": "server_error",
                                   "param": None, "code": g.error.kind}})
