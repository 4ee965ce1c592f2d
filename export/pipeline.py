"""
`make export`: a nanochat checkpoint -> ONNX graph (-> TensorRT engine) -> a Triton model. export_model() is the
whole pipeline as one function, for the CLI (export/__main__.py), the benchmark and tests: find and load the
checkpoint, trace, lower the precision, check the graph against the model core under ONNX Runtime, build an engine
on GPU nodes, install atomically. Bad input fails before the heavy work.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import gc
import json
import platform
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from backend import protocol, tensorrt_module
from backend.model_config import ModelShape, config_pbtxt
from core.checkpoint import CheckpointError, find_checkpoint, open_checkpoint, save_tokenizer
from core.config import parse_overrides
from core.config_fields import AUTO
from export import graph, repository, tensorrt_rules
from export.options import DEFAULT_SOURCE, ExportOptions
from export.precision import lower_file

# MAX_SLOTS=auto on CPU (ModelShape's default), where a step's cost grows with every row
CPU_SLOTS = next(f.default for f in dataclasses.fields(ModelShape) if f.name == "max_slots")
GPU_MARGIN = 2 << 30  # bytes of a GPU that MAX_SLOTS=auto leaves for activations and the CUDA context, at least
MAX_AUTO_SLOTS = 256  # vLLM's default max_num_seqs: past it, a decode step's latency outweighs the batch


def say(line: str) -> None:
    print(line, flush=True)  # progress must show through pipes (make, docker logs) as it happens


class ExportError(Exception):
    """Bad input or an unwritable target: the CLI prints the message and exits 2."""


def resolve_checkpoint(model: str | None, source: str | None, step: int | None, checkpoint_dir, nanochat_base,
                       log: Callable[[str], None]):
    """find_checkpoint, with the default source (sft) falling back to the sources that exist."""
    if checkpoint_dir is not None or source is not None:
        return find_checkpoint(source or DEFAULT_SOURCE, model, step, checkpoint_dir, nanochat_base)
    order = [DEFAULT_SOURCE] + [s for s in ("rl", "mid", "base") if s != DEFAULT_SOURCE]
    errors = {}
    for src in order:
        try:
            ref = find_checkpoint(src, model, step, None, nanochat_base)
        except CheckpointError as e:
            errors[src] = str(e)
            continue
        if src != DEFAULT_SOURCE:
            log(f"note: no {DEFAULT_SOURCE} checkpoint ({errors[DEFAULT_SOURCE]}); using SOURCE={src} instead")
        return ref
    raise CheckpointError("no checkpoint found in any source:\n" + "\n".join(f"  {s}: {m}" for s, m in errors.items()))


def gpu_reason() -> str | None:
    """Why TensorRT cannot build here (None when it can)."""
    from export.tensorrt_build import unavailable_reason

    return unavailable_reason()


def choose_runtime(runtime: str, log: Callable[[str], None]) -> str:
    if runtime == "onnx":
        return "onnx"
    reason = gpu_reason()
    if runtime == "tensorrt" and reason:
        raise ExportError(f"RUNTIME=tensorrt needs an NVIDIA GPU with TensorRT: {reason}. "
                          "Run the export on a GPU node, or use RUNTIME=onnx")
    if runtime == "auto":
        log(f"runtime: {'onnx (' + reason + ')' if reason else 'tensorrt'}")
        return "onnx" if reason else "tensorrt"
    return runtime


def choose_precision(precision: str, runtime: str, kind: str, capability: str | None) -> str:
    """The graph's precision for PRECISION=auto (else the one asked for): nanochat trains in bf16, so bf16 where
    the runtime runs it on this GPU, fp16 on other GPUs, fp32 on CPU, where neither is faster."""
    if precision != "auto":
        return precision
    if kind == "KIND_CPU":
        return "fp32"
    major = int((capability or "0").split(".")[0])
    return "bf16" if runtime == "tensorrt" and major >= 8 else "fp16"


def gpu_memory() -> tuple[int, int] | None:
    """(free, total) bytes of GPU 0, from torch; None where torch has no CUDA (ONNX Runtime's CUDA provider alone)."""
    try:
        import torch

        return torch.cuda.mem_get_info(0) if torch.cuda.is_available() else None
    except Exception:  # a driver torch cannot talk to: no figure, so the CPU default below
        return None


def decode_scratch_per_seq(cfg, max_seq: int, width: int) -> int:
    """An upper bound on the engine's activation memory per sequence at the decode profile's largest shape (every
    slot, max_seq rows): one layer's gathered K and V rows in the cache's dtype and twice more in fp32 (the cast
    after the gather, then the transposed and concatenated copies), and its attention scores and softmax in fp32."""
    kv_layer = 2 * max_seq * cfg.n_kv_head * cfg.head_dim
    return kv_layer * (width + 2 * 4) + 2 * cfg.n_head * max_seq * 4


def margin_of(total: int) -> int:
    """What sizing leaves free on a GPU of `total` bytes: the CUDA context, fragmentation, other allocations."""
    return max(GPU_MARGIN, total // 10)


def choose_max_slots(asked: int | str, memory: tuple[int, int] | None, weight_bytes: int, kv_bytes_per_seq: int,
                     scratch_bytes_per_seq: int, log: Callable[[str], None]) -> int:
    """MAX_SLOTS=auto: the sequences whose KV cache at max_seq and the engine's activations for them fit in the GPU's
    free memory after the weights and a margin (margin_of), at most MAX_AUTO_SLOTS; CPU_SLOTS on CPU or where the
    free memory cannot be read. A number is taken as it is."""
    if asked != AUTO:
        return int(asked)
    if memory is None:
        log(f"max_slots: {CPU_SLOTS} (auto: no GPU memory to size the KV cache by)")
        return CPU_SLOTS
    free, total = memory
    margin, per_seq = margin_of(total), kv_bytes_per_seq + scratch_bytes_per_seq
    room = free - weight_bytes - margin
    slots = max(1, min(MAX_AUTO_SLOTS, room // per_seq))
    log(f"max_slots: {slots} (auto: {free / 1e9:.1f} GB free - {weight_bytes / 1e9:.1f} GB weights - "
        f"{margin / 1e9:.1f} GB margin, over {kv_bytes_per_seq / 1e9:.3f} GB of KV cache + "
        f"{scratch_bytes_per_seq / 1e9:.3f} GB of activations per sequence)")
    if room < per_seq:
        log("warning: the GPU's free memory does not hold one sequence's KV cache after the weights; serving may "
            "run out of memory (a smaller MAX_SEQ needs less)")
    return slots


def check_engine_memory(memory: tuple[int, int], weight_bytes: int, kv_bytes_per_seq: int, slots: int,
                        scratch_bytes: int, log: Callable[[str], None]) -> None:
    """The built engine's real activation memory (its largest profile's) beside the weights, the KV cache of every
    slot and the margin: printed, and an ExportError naming a MAX_SLOTS that fits when they do not fit."""
    free, total = memory
    need = weight_bytes + kv_bytes_per_seq * slots + scratch_bytes + margin_of(total)
    log(f"gpu memory: {weight_bytes / 1e9:.1f} GB weights + {kv_bytes_per_seq * slots / 1e9:.1f} GB KV cache "
        f"({slots} slots) + {scratch_bytes / 1e9:.1f} GB engine activations + {margin_of(total) / 1e9:.1f} GB margin "
        f"= {need / 1e9:.1f} GB of {free / 1e9:.1f} GB free")
    if need > free:
        per_seq = kv_bytes_per_seq + scratch_bytes / slots  # the decode profile's activations grow with the slots
        fits = int((free - weight_bytes - margin_of(total)) // per_seq)
        raise ExportError(f"the engine would not fit this GPU when serving: export again with MAX_SLOTS={fits}"
                          if fits >= 1 else "the engine does not fit this GPU even with one slot: a smaller MAX_SEQ "
                          "needs less")


def instance_kind(runtime: str) -> str:
    if runtime == "tensorrt":
        return "KIND_GPU"
    from backend.onnx_runner import default_providers

    return "KIND_GPU" if "CUDAExecutionProvider" in default_providers() else "KIND_CPU"


def versions() -> dict:
    import onnx
    import onnxruntime
    import torch

    trt_version = tensorrt_module.import_tensorrt().__version__ if tensorrt_module.installed() else None
    return dict(torch=torch.__version__, onnx=onnx.__version__, onnxruntime=onnxruntime.__version__,
                tensorrt=trt_version, python=platform.python_version())


@dataclasses.dataclass
class Reference:
    """The model core's logits for a prefill of 8 tokens and 4 greedy decode steps, which verify_onnx replays
    under ONNX Runtime. Computed before the graph runs, so the PyTorch model can be freed first."""

    steps: list[tuple[np.ndarray, np.ndarray]]  # (token ids [1, T], positions [1]) per step
    logits: list[np.ndarray]
    slot: np.ndarray  # the last slot, so a graph that ignores slots cannot pass
    cache_len: int  # positions the check needs: its runners hold this much cache, not max_seq's


def reference_steps(model, max_slots: int, max_seq: int) -> Reference:
    from core.gpt import TorchRunner

    n = min(8, max_seq - 5)
    token = ((np.arange(n, dtype=np.int64) * 7919) % model.config.vocab_size)[None, :]
    ref = Reference([], [], np.array([max_slots - 1]), n + 4)
    runner = TorchRunner(model, max_slots, ref.cache_len)
    for step in range(5):
        pos = np.array([0 if step == 0 else n + step - 1])
        logits = runner.forward(token, pos, ref.slot)
        ref.steps.append((token, pos))
        ref.logits.append(logits)
        token = np.array([[int(logits.argmax())]])
    return ref


def verify_onnx(onnx_path: Path, ref: Reference, max_slots: int, precision: str, log) -> float | None:
    """Replay `ref` under ONNX Runtime (CPU); max |logit diff|, or an error beyond the precision's bound."""
    from backend.onnx_runner import OrtRunner

    if precision == "bf16":
        log("ONNX Runtime check skipped: ONNX Runtime has no bf16 kernels on CPU (TensorRT runs this graph)")
        return None
    ort = OrtRunner(onnx_path, max_slots, ref.cache_len, providers=["CPUExecutionProvider"])
    diff = max(float(np.abs(ort.forward(token, pos, ref.slot) - logits).max())
               for (token, pos), logits in zip(ref.steps, ref.logits, strict=True))
    log(f"ONNX Runtime check: prefill + 4 decode steps, max |logits - PyTorch| = {diff:.2e}")
    limit = 1e-3 if precision == "fp32" else 0.5
    if diff > limit:
        raise RuntimeError(f"exported graph disagrees with the model core: max |diff| {diff:.3g} > {limit}")
    return diff


def export_model(options: ExportOptions, log: Callable[[str], None] = say) -> Path:
    """Export one checkpoint (model tag, source, step, as nanochat picks them) into
    <model_repository>/<name>/ (name defaults to the tag); returns that folder."""
    t0 = time.perf_counter()
    o = options
    runtime = choose_runtime(o.runtime, log)
    kind = instance_kind(runtime)
    capability = None
    if kind == "KIND_GPU" and o.precision == "auto":
        from export.tensorrt_build import compute_capability

        with contextlib.suppress(Exception):  # torch without CUDA beside ONNX Runtime's CUDA provider: fp16
            capability = compute_capability()
    o = o.replace(precision=choose_precision(o.precision, runtime, kind, capability))
    log(f"precision: {o.precision}{' (auto)' if options.precision == 'auto' else ''}")
    if runtime == "onnx" and o.precision == "bf16":
        # the ONNX Runtime runner keeps the KV cache in numpy, which has no bf16 (and ORT has no bf16 CPU kernels)
        raise ExportError("PRECISION=bf16 needs RUNTIME=tensorrt: the ONNX Runtime runner serves fp32 and fp16 only")
    try:
        ref = resolve_checkpoint(o.model, o.source, o.step, o.checkpoint_dir, o.nanochat_base_dir, log)
    except CheckpointError as e:
        raise ExportError(str(e)) from e
    name = o.name or ref.model_tag
    repo = Path(o.model_repository).expanduser().absolute()
    target = repo / name
    try:
        repository.check_target(target, str(ref.checkpoint_path.absolute()), o.force)
    except repository.RepositoryError as e:
        raise ExportError(str(e)) from e

    log(f"loading {ref.checkpoint_path} ({ref.format}) ...")
    try:
        loaded, tokenizer = open_checkpoint(ref, **parse_overrides(list(o.overrides)))
    except CheckpointError as e:
        raise ExportError(str(e)) from e
    cfg = loaded.config
    max_seq = o.max_seq or cfg.sequence_len
    if not 2 <= max_seq <= cfg.rope_len:
        raise ExportError(f"MAX_SEQ must be 2..{cfg.rope_len} (10x sequence_len, nanochat's rotary table), "
                          f"not {max_seq}")
    from core.gpt import build_gpt

    gpt = build_gpt(cfg, loaded.state_dict)
    n_params = sum(p.numel() for p in gpt.parameters())
    log(f"model: {cfg.generation}, {cfg.n_layer} layers, C={cfg.n_embd}, {n_params / 1e6:.1f}M parameters, "
        f"vocab {cfg.vocab_size}, sequence_len {cfg.sequence_len}")
    width = 4 if o.precision == "fp32" else 2
    memory = gpu_memory() if kind == "KIND_GPU" else None
    kv_per_seq = 2 * cfg.n_layer * max_seq * cfg.n_kv_head * cfg.head_dim * width
    slots = choose_max_slots(o.max_slots, memory, n_params * width, kv_per_seq,
                             decode_scratch_per_seq(cfg, max_seq, width), log)
    shape = ModelShape(runtime=runtime, precision=o.precision, max_seq=max_seq, max_slots=slots,
                       tool_channel=o.tool_channel)
    max_slots, precision = shape.max_slots, shape.precision

    try:
        with repository.staging(repo, name) as stage:
            vdir = stage / protocol.VERSION
            t = time.perf_counter()
            reference = reference_steps(gpt, max_slots, max_seq) if o.verify else None
            onnx_path = graph.export_onnx(gpt, vdir, max_slots, max_seq, log)
            # the weights are in the graph's file now: their memory goes before it is read back (the exporter's
            # objects hold them in reference cycles, hence the collection)
            del gpt, loaded
            gc.collect()
            if precision != "fp32":
                log(f"lowering the graph to {precision} (fp32 norms, softmax, softcap) ...")
                lower_file(onnx_path, precision)
            log(f"traced in {time.perf_counter() - t:.1f}s; checking the ONNX graph ...")
            graph.check(onnx_path)
            refused = tensorrt_rules.problems(onnx_path)
            if refused and runtime == "tensorrt":
                raise ExportError(f"TensorRT's ONNX parser would refuse the graph: {'; '.join(refused)}")
            log("tensorrt's parser rules: " + (f"{len(refused)} broken, e.g. {refused[0]}" if refused else "followed"))
            if reference is not None:
                verify_onnx(onnx_path, reference, max_slots, precision, log)
            trt_info = None
            if runtime == "tensorrt":
                from export.tensorrt_build import build_engine

                trt_info = build_engine(onnx_path, vdir / protocol.PLAN_FILE, max_slots=max_slots,
                                        max_seq=max_seq, prefill_chunk=o.engine.prefill_chunk, log=log)
                if memory is not None:
                    check_engine_memory(memory, n_params * width, kv_per_seq, max_slots,
                                        max(trt_info["scratch_bytes"].values()), log)
            save_tokenizer(ref, tokenizer, vdir / protocol.TOKENIZER_FILE)
            for f in vdir.iterdir():
                f.chmod(0o644)  # onnx writes its data file 0600; the server may run as another user
            files, content_hash = repository.describe_files(vdir)
            meta = dict(
                name=name, model_tag=ref.model_tag, source=ref.source or "dir", step=ref.step,
                source_format=ref.format, checkpoint_path=str(ref.checkpoint_path.absolute()),
                generation=cfg.generation, config=cfg.to_dict(), overrides=list(o.overrides),
                **dataclasses.asdict(shape), files=files,
                tensorrt=trt_info, versions=versions(), content_hash=content_hash,
                exported_at=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            )
            (vdir / protocol.METADATA_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
            (stage / protocol.CONFIG_FILE).write_text(
                config_pbtxt(name, kind, o.engine), encoding="utf-8")
            repository.check_target(target, meta["checkpoint_path"], o.force)  # another export may have finished
            repository.install(stage, target)
    except repository.RepositoryError as e:
        raise ExportError(str(e)) from e

    log(f"exported {name} ({cfg.generation}, {precision}, runtime {runtime}) in {time.perf_counter() - t0:.1f}s "
        f"to {target}")
    for fname, f in files.items():
        log(f"  {protocol.VERSION}/{fname:<18} {f['bytes'] / 1e6:10.2f} MB")
    return target
