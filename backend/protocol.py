"""
The nanochat Triton model's contract, declared once: every name that crosses a process or file boundary (inputs
and outputs, finish reasons and error prefixes, metric names, the model folder's files, the exported graph's
tensors). Standard library only, so the BFF and the exporter import it without the backend's dependencies;
tests/backend/test_protocol.py checks model_repository/README.md against it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

BACKEND = "nanochat"  # config.pbtxt's backend: the Python-based backend that serves every model here


@dataclass(frozen=True)
class Input:
    name: str
    triton_type: str  # config.pbtxt's data_type
    dims: tuple[int, ...]
    doc: str
    default: float | int | None = None  # what the backend uses when the input is absent (None: nothing)
    low: float | int | None = None  # the inclusive range the backend accepts
    high: float | int | None = None


@dataclass(frozen=True)
class Output:
    name: str
    triton_type: str
    dims: tuple[int, ...]
    doc: str
    final_only: bool = False  # describes the whole request: sent in its final response only


# How a model calls tools, chosen at export (metadata.json's tool_channel): nanochat's calculator on special tokens,
# or samosaChaat's registry of JSON calls (core/tool_calls.py) for the models fine-tuned on it.
NANOCHAT_TOOLS, REGISTRY_TOOLS = "nanochat", "registry"
TOOL_CHANNELS = (NANOCHAT_TOOLS, REGISTRY_TOOLS)
FORCED_TOOLS = ("web_search",)  # what force_tool may name
FORCED_SEARCH_RESULTS = 3  # results a forced search asks for (its top_k)
MAX_STOPS, MAX_STOP_CHARS = 16, 256  # the `stop` input's bounds: matching costs each piece of text this much

# Ranges and defaults are nanochat chat_web's; values outside a range are refused, not clamped.
INPUTS = (
    Input("messages", "TYPE_STRING", (1,), 'JSON text: [{"role": "system"|"user"|"assistant", "content": "..."}], '
          "rendered with the model's own tokenizer in nanochat's chat format"),
    Input("prompt_ids", "TYPE_INT64", (-1,), "raw prompt token ids instead of `messages`"),
    Input("text_input", "TYPE_STRING", (1,), "a raw prompt instead of `messages`: <|bos|> and the text in the "
          "model's tokenizer, no chat template (what Triton's generate extension and genai-perf send)"),
    Input("stream", "TYPE_BOOL", (1,), "true: pieces as they come (the first token at once); false: one response "
          "with the whole answer, as Triton's /generate expects", False),
    Input("temperature", "TYPE_FP32", (1,), "0 is greedy; above 0 and below 0.01 samples as 0.01 (as vLLM does)",
          0.8, 0.0, 2.0),
    Input("top_k", "TYPE_INT32", (1,), "0 means the whole vocabulary", 50, 0, 200),
    Input("top_p", "TYPE_FP32", (1,), "nucleus sampling: draw from the most likely tokens whose probabilities "
          "reach top_p (after top_k); 1 is off, nanochat's own sampling", 1.0, 0.0, 1.0),
    Input("max_tokens", "TYPE_INT32", (1,), "tokens to generate at most", 512, 1, 4096),
    Input("seed", "TYPE_INT64", (1,), "default: none (drawn with the batch on the device); with a seed, nanochat's "
          "exact draw: the same seed gives the same tokens", None, 0, 2**63 - 1),
    Input("stop", "TYPE_STRING", (-1,), "strings that end the answer where one first appears in its text, which "
          f"is cut just before it (finish_reason stop); at most {MAX_STOPS} of up to {MAX_STOP_CHARS} characters each"),
    Input("min_tokens", "TYPE_INT32", (1,), "vLLM's: no stop token or stop string ends the answer before this many "
          "tokens (stop tokens cannot be drawn until then)", 0, 0, 4096),
    Input("ignore_eos", "TYPE_BOOL", (1,), "vLLM's: no stop token ends the answer (none can be drawn), so it runs to "
          "max_tokens or the context", False),
    Input("force_tool", "TYPE_STRING", (1,), "web_search: the answer starts with a search for the last user "
          "message's text after its last blank line (the gateway's Search toggle), written out as the call and its "
          "result (streamed first) for the model to answer from; ignored, with a log line, by a model without the "
          "registry tool channel or a server without a search backend"),
    Input("return_num_input_tokens", "TYPE_BOOL", (1,), "vLLM's backend's flag, accepted so its clients work "
          "unchanged: `num_input_tokens` is always sent (Triton returns it unless the request names other outputs)",
          False),
    Input("return_num_output_tokens", "TYPE_BOOL", (1,), "vLLM's backend's flag, accepted likewise for "
          "`num_output_tokens`", False),
    Input("min_answer_tokens", "TYPE_INT32", (1,),
          "a `messages` conversation longer than the context loses its oldest whole turns (the system message "
          "and the last user message stay) until min(max_tokens, min_answer_tokens) tokens of answer fit; "
          "`dropped_turns` says how many went. Without it, a prompt that does not fit is refused", None, 1, 4096),
)
INPUT = {i.name: i for i in INPUTS}
# logits / T overflows for T near 0 (T = 1e-38 makes inf, and sampling fails): a tiny positive temperature
# samples as this one, which is all but greedy, as vLLM clamps it
MIN_TEMPERATURE = 0.01

OUTPUTS = (
    Output("text", "TYPE_STRING", (1,), "new text: complete UTF-8 characters only (may be empty)"),
    Output("text_output", "TYPE_STRING", (1,), "the same as `text`, under the name Triton's generate extension "
           "and genai-perf read"),
    Output("token_ids", "TYPE_INT64", (-1,), "the token ids behind this piece"),
    Output("device_id", "TYPE_INT32", (1,), "the device that produced it (GPU index; 0 on CPU)"),
    Output("finish_reason", "TYPE_STRING", (1,), "empty until the last response: stop, length, cancelled or error"),
    Output("num_input_tokens", "TYPE_UINT32", (1,), "prompt length (after any cut), in every response, as vLLM's "
           "backend sends it"),
    Output("num_output_tokens", "TYPE_UINT32", (1,), "the tokens behind this response's text, as vLLM's backend "
           "sends it"),
    Output("prompt_tokens", "TYPE_INT32", (1,), "prompt length (after any cut)", final_only=True),
    Output("completion_tokens", "TYPE_INT32", (1,), "tokens generated (forced tool tokens included)",
           final_only=True),
    Output("dropped_turns", "TYPE_INT32", (1,), "the conversation's oldest turns left out to fit the context "
           "(`min_answer_tokens`)", final_only=True),
)
OUTPUT = {o.name: o for o in OUTPUTS}
PIECE_OUTPUTS = tuple(o.name for o in OUTPUTS if not o.final_only)
USAGE_OUTPUTS = tuple(o.name for o in OUTPUTS if o.final_only)


def wire_type(triton_type: str) -> str:
    """config.pbtxt's data_type as Triton's inference protocols name it (TYPE_STRING -> BYTES, TYPE_FP32 -> FP32)."""
    return "BYTES" if triton_type == "TYPE_STRING" else triton_type.removeprefix("TYPE_")


# One element of each fixed-size wire type as raw contents carry it: a struct format, which numpy reads as the
# same dtype (np.dtype("<i") is int32). A BYTES element is a UINT32 length and the bytes.
WIRE_FORMAT = {"BOOL": "<?", "INT32": "<i", "INT64": "<q", "UINT32": "<I", "FP32": "<f"}


FINISH_REASONS = ("stop", "length", "cancelled", "error")

# A stream's error has no code, only a message: its prefix tells the client's fault (400) from retry-later (503).
INVALID = "invalid request: "  # the client's fault: bad input, a prompt longer than the context
QUEUE_FULL = "queue full: "  # every slot busy and the queue full; try again later
SHUTTING_DOWN = "model is shutting down"  # the instance is being unloaded; try again (another model)

# gRPC keepalive, BFF to Triton: a hung server is noticed within the sum, not never (10 s: the least gRPC
# advises). Triton must permit the pings without data (a long prefill): by default it allows one per 5 minutes and
# drops the connection at the second. The timeout stays 10 s: a busy 2-core host can be seconds late to answer.
KEEPALIVE_MS, KEEPALIVE_TIMEOUT_MS = 10_000, 10_000
TRITON_KEEPALIVE_FLAGS = ("--grpc-keepalive-permit-without-calls=1",
                          f"--grpc-http2-min-recv-ping-interval-without-data={KEEPALIVE_MS // 2}")
# What every tritonserver serving this backend runs with (the image's entrypoint and tools/local_triton.py). The
# exporter writes whole configs, so Triton's auto-complete has nothing to add; left on, the Python backend starts a
# stub process per model load just to ask the model for a config, and that stub imports the backend (torch
# included): 4 s of every load and swap on a 2-core host.
TRITON_FLAGS = (*TRITON_KEEPALIVE_FLAGS, "--disable-auto-complete-config")

# Metrics on Triton's /metrics, labelled model, version, device.
METRIC_GENERATED_TOKENS = "nanochat_generated_tokens_total"
METRIC_PROMPT_TOKENS = "nanochat_prompt_tokens_total"
METRIC_REJECTED = "nanochat_rejected_requests_total"
METRIC_FINISHED = "nanochat_finished_requests_total"
METRIC_ACTIVE_SLOTS = "nanochat_active_slots"
METRIC_QUEUE_DEPTH = "nanochat_queue_depth"
METRIC_CPU = "nanochat_cpu_seconds_total"
METRIC_RUNNER_SECONDS = "nanochat_runner_seconds_total"  # wall time inside runner steps: the device busy
METRIC_TTFT = "nanochat_time_to_first_token_seconds"
METRIC_ITL = "nanochat_inter_token_latency_seconds"
METRIC_E2E = "nanochat_e2e_request_latency_seconds"  # arrival to the final response, per request
METRIC_QUEUE_TIME = "nanochat_request_queue_time_seconds"  # arrival to a KV-cache slot
METRIC_REQUEST_PROMPT = "nanochat_request_prompt_tokens"  # prompt length, per request
METRIC_REQUEST_GENERATION = "nanochat_request_generation_tokens"  # tokens streamed, per request
METRIC_SLOT_USAGE = "nanochat_kv_slots_usage_ratio"  # slots in use / slots
METRIC_HEALTHY = "nanochat_healthy"  # 0 after unhealthy_after runner failures in a row, 1 again after a good step
# prefix caching: the token hit rate is reused / (reused + prefilled)
METRIC_PREFIX_HITS = "nanochat_prefix_cache_hits_total"  # requests that started after a cached prefix
METRIC_PREFIX_REUSED = "nanochat_prefix_cache_reused_tokens_total"  # prompt tokens taken from the cache
METRIC_PREFILLED = "nanochat_prefilled_tokens_total"  # prompt tokens computed
METRIC_PREFIX = "nanochat_"

# The model folder: <repository>/<name>/config.pbtxt and the version folder with the artifacts.
CONFIG_FILE = "config.pbtxt"
VERSION = "1"
ONNX_FILE = "model.onnx"
ONNX_DATA_FILE = "model.onnx.data"  # the graph's weights (ONNX external data)
PLAN_FILE = "model.plan"
TOKENIZER_FILE = "tokenizer.pkl"  # the checkpoint's tokenizer, copied under the name nanochat gives it
METADATA_FILE = "metadata.json"


def read_metadata(version_dir: Path | str) -> dict:
    """A version folder's metadata.json, as the exporter wrote it; OSError or ValueError when it is missing or
    not JSON."""
    return json.loads((Path(version_dir) / METADATA_FILE).read_text(encoding="utf-8"))


# The exported graph's tensors (export/graph.py): one graph serves prefill and decode.
INPUT_IDS, POSITIONS, SLOTS, PREV_IDS = "input_ids", "positions", "slots", "prev_ids"
LOGITS = "logits"
# G4's smear state as graphs exported before 2026-12-07 took it (each row's last embedding): refused with a reason
OLD_PREV_EMBEDDING = "prev_embedding"


def k_cache(layer: int) -> str:
    return f"k_cache_{layer}"


def v_cache(layer: int) -> str:
    return f"v_cache_{layer}"


def new_k(layer: int) -> str:
    return f"new_k_{layer}"


def new_v(layer: int) -> str:
    return f"new_v_{layer}"


CACHE_PREFIXES = (k_cache(0)[:-1], v_cache(0)[:-1])  # "k_cache_", "v_cache_"
NEW_KV_PREFIXES = (new_k(0)[:-1], new_v(0)[:-1])

# The TensorRT engine's optimization profiles, one execution context each (backend/trt_runner.py).
PREFILL_PROFILE, DECODE_PROFILE = 0, 1
# Rows of a TensorRT engine's prefill call (its profile's largest batch): activations grow with rows x chunk x max_seq,
# so they are few; the runner splits a larger prefill batch.
PREFILL_ROWS = 4
