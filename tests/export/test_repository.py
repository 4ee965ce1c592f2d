"""
`make export` from a shell, the repository it writes, and every way an export can be refused or
interrupted without leaving a partial model or touching the old one.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from backend import protocol
from backend.model_config import EngineConfig
from export import ExportError, export_model, options, repository
from export.__main__ import main, parse_options
from tests.support.oracles import oracle_or_skip
from tools.paths import PROJECT as ROOT


def parse_config(path: Path):
    from google.protobuf import text_format

    try:
        from tritonclient.grpc import model_config_pb2
    except ImportError:
        pytest.skip("tritonclient[grpc] is not installed: cannot parse config.pbtxt with Triton's schema")
    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


def snapshot(model_dir: Path) -> dict:
    return {str(p.relative_to(model_dir)): p.read_bytes() for p in sorted(model_dir.rglob("*")) if p.is_file()}


def test_make_export_writes_a_triton_model(make_export_head):
    proc, repo, _ = make_export_head
    assert proc.returncode == 0, proc.stderr
    for line in ("loading", "tracing", "checking the ONNX graph", "ONNX Runtime check", "exported d4"):
        assert line in proc.stdout
    model = repo / "d4"
    assert sorted(p.name for p in repo.iterdir()) == ["d4"]  # no staging folder left behind
    cfg = parse_config(model / "config.pbtxt")
    assert (cfg.name, cfg.backend, cfg.max_batch_size) == ("d4", "nanochat", 0)
    assert cfg.model_transaction_policy.decoupled
    from tritonclient.grpc import model_config_pb2

    assert [(i.name, i.data_type, list(i.dims)) for i in cfg.input] == [
        (i.name, model_config_pb2.DataType.Value(i.triton_type), list(i.dims)) for i in protocol.INPUTS]
    assert [o.name for o in cfg.output] == [o.name for o in protocol.OUTPUTS]
    assert all(i.optional for i in cfg.input)
    assert [(g.count, g.kind) for g in cfg.instance_group] == [(1, cfg.instance_group[0].KIND_CPU)]
    # only the engine's settings: the serving shape is metadata.json's (the graph was built for it)
    params = {k: v.string_value for k, v in cfg.parameters.items()}
    assert params == dict(max_queue="64", prefill_chunk="256", stream_interval="1", stream_interval_ms="50",
                          max_responses_per_s="2560", prefix_cache="1", tool_timeout_ms="10000",
                          unhealthy_after="3") == EngineConfig().parameters()
    version = model / "1"
    assert sorted(p.name for p in version.iterdir()) == ["metadata.json", "model.onnx", "model.onnx.data",
                                                         "tokenizer.pkl"]
    meta = protocol.read_metadata(version)
    head = oracle_or_skip("head")
    assert meta["checkpoint_path"] == str(head / "base_checkpoints" / "d4" / "model_000900.pt")
    assert (meta["name"], meta["model_tag"], meta["source"], meta["step"], meta["source_format"]) == \
        ("d4", "d4", "base", 900, "nanochat")
    assert (meta["generation"], meta["precision"], meta["runtime"], meta["tensorrt"]) == ("G4", "fp32", "onnx", None)
    assert (meta["max_slots"], meta["max_seq"]) == (8, 512)
    assert meta["config"]["n_head"] == 4 and meta["config"]["window_pattern"] == "SSSL"
    assert set(meta["versions"]) == {"torch", "onnx", "onnxruntime", "tensorrt", "python"}
    files, content_hash = repository.describe_files(version)
    assert meta["files"] == files and meta["content_hash"] == content_hash
    assert (version / "tokenizer.pkl").read_bytes() == (head / "tokenizer" / "tokenizer.pkl").read_bytes()


def test_help_documents_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    for text in ("--max-slots MAX_SLOTS KV-cache rows", "8 on CPU (default: auto)", "(default: 64)", "(default: 256)",
                 "sequence_len", "falling back"):
        assert text in out


def run_cli(capsys, *args) -> tuple[int, str, str]:
    rc = main(list(args))
    out, err = capsys.readouterr()
    return rc, err, out


def test_unknown_tag_lists_tags(capsys, tmp_path):
    head = str(oracle_or_skip("head"))
    rc, err, _ = run_cli(capsys, "--model", "d99", "--source", "base", "--nanochat-base-dir", head,
                         "--model-repository", str(tmp_path))
    assert rc == 2 and "unknown model tag 'd99'" in err and "tags found: d4" in err


def test_missing_step(capsys, tmp_path):
    head = str(oracle_or_skip("head"))
    rc, err, _ = run_cli(capsys, "--source", "base", "--step", "123", "--nanochat-base-dir", head,
                         "--model-repository", str(tmp_path))
    assert rc == 2 and "step 123 not found" in err and "[900]" in err


def test_default_source_falls_back_with_a_note(capsys, tmp_path, demo_base):
    # demo_base holds only base checkpoints: the default (sft) falls back; stop before tracing
    (tmp_path / "blocker").write_text("")
    rc, _, out = run_cli(capsys, "--model", "g0", "--nanochat-base-dir", str(demo_base),
                         "--model-repository", str(tmp_path / "blocker" / "repo"))
    assert rc == 2
    assert "no sft checkpoint" in out and "using SOURCE=base" in out


def test_unwritable_target(capsys, tmp_path, demo_base):
    (tmp_path / "file").write_text("not a folder")
    rc, err, _ = run_cli(capsys, "--model", "g0", "--source", "base", "--nanochat-base-dir", str(demo_base),
                      "--model-repository", str(tmp_path / "file" / "repo"))
    assert rc == 2 and "cannot create model repository" in err
    # a folder nobody may write, root included (root passes permission bits; /proc/sys refuses everyone)
    rc, err, _ = run_cli(capsys, "--model", "g0", "--source", "base", "--nanochat-base-dir", str(demo_base),
                         "--model-repository", "/proc/sys")
    assert rc == 2 and "model repository /proc/sys is not writable" in err


def test_tensorrt_without_gpu_exits_2(tmp_path, demo_base):
    from export.tensorrt_build import unavailable_reason

    if unavailable_reason() is None:
        pytest.skip("this machine can build TensorRT engines")
    cmd = f"make export MODEL=g0 SOURCE=base RUNTIME=tensorrt NANOCHAT_BASE_DIR={demo_base} MODEL_REPOSITORY={tmp_path}"
    proc = subprocess.run(cmd, shell=True, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "RUNTIME=tensorrt needs an NVIDIA GPU with TensorRT" in proc.stderr
    assert not any(tmp_path.iterdir())


def test_bad_options_exit_2(capsys, tmp_path, demo_base):
    base = ["--model", "g0", "--source", "base", "--nanochat-base-dir", str(demo_base), "--model-repository",
            str(tmp_path)]
    assert run_cli(capsys, *base, "--max-slots", "0")[0] == 2
    rc, err, _ = run_cli(capsys, *base, "--max-seq", "99999")
    assert rc == 2 and "MAX_SEQ must be" in err
    rc, err, _ = run_cli(capsys, *base, "--runtime", "onnx", "--precision", "bf16")
    assert rc == 2 and "bf16 needs RUNTIME=tensorrt" in err
    with pytest.raises(ValueError, match="MAX_SLOTS='many' is not an integer or auto"):
        parse_options(["--env"], env={"MAX_SLOTS": "many"})
    assert parse_options(["--env"], env={"MAX_SLOTS": "auto"}).max_slots == "auto"
    assert parse_options(["--max-slots", "12"]).max_slots == 12


def test_other_model_needs_force(tmp_path, demo_base, demo_exports):
    opts = dict(source="base", nanochat_base_dir=demo_base, runtime="onnx", max_slots=3, verify=False)
    quiet = lambda _: None
    existing = demo_exports("G4")  # the fidelity tests' export: no export of its own for this test
    before = snapshot(existing)
    with pytest.raises(ExportError, match="holds another model"):
        export_model(options(model_repository=existing.parent, name="g4", model="g0", **opts), quiet)
    assert snapshot(existing) == before
    foreign = tmp_path / "repo" / "g0"  # a folder this exporter did not write
    (foreign / "1").mkdir(parents=True)
    (foreign / "config.pbtxt").write_text("someone else's\n")
    with pytest.raises(ExportError, match="not a model this exporter wrote"):
        export_model(options(model_repository=tmp_path / "repo", model="g0", **opts), quiet)
    forced = export_model(options(model_repository=tmp_path / "repo", model="g0", force=True, **opts), quiet)
    assert protocol.read_metadata(forced / protocol.VERSION)["generation"] == "G0"
    assert sorted(p.name for p in (tmp_path / "repo").iterdir()) == ["g0"]


def test_injected_failure_leaves_old_model(tmp_path, demo_base, monkeypatch):
    from export import graph

    repo = tmp_path / "repo"
    opts = options(model_repository=repo, model="g0", source="base", nanochat_base_dir=demo_base, runtime="onnx",
                   max_slots=3, verify=False)
    (repo / "g0" / "1").mkdir(parents=True)
    # an "old model" that is ours: same checkpoint, so a re-export would replace it
    target = repo / "g0"
    ckpt = demo_base / "base_checkpoints" / "g0" / "model_000000.pt"
    (target / "1" / "metadata.json").write_text(json.dumps({"checkpoint_path": str(ckpt)}))
    (target / "config.pbtxt").write_text("old\n")
    before = snapshot(target)

    def broken(model, out_dir, *args, **kwargs):
        (out_dir / "model.onnx").write_bytes(b"half written")
        raise RuntimeError("disk full (injected)")

    monkeypatch.setattr(graph, "export_onnx", broken)
    with pytest.raises(RuntimeError, match="injected"):
        export_model(opts, log=lambda _: None)
    assert snapshot(target) == before
    assert sorted(p.name for p in repo.iterdir()) == ["g0"]


def test_killed_export_leaves_old_model(tmp_path, demo_base, demo_exports):
    """SIGTERM mid-way (as `kill` or a CI timeout sends it): old model intact, staging removed;
    SIGKILL leaves a staging folder, which the next export removes as it replaces the model."""
    repo = tmp_path / "repo"  # a copy of the fidelity tests' export: the exports below replace it
    exported = shutil.copytree(demo_exports("G4"), repo / "g4")
    before = snapshot(exported)
    cmd = [str(ROOT / ".venv" / "bin" / "python"), "-m", "export", "--model", "g4", "--source", "base",
           "--nanochat-base-dir", str(demo_base), "--model-repository", str(repo), "--max-slots", "3"]
    # SIGTERM at two moments of tracing: the later one lands inside torch's lazy imports, whose error handling
    # turns the KeyboardInterrupt into other exceptions
    for sig, delay in ((signal.SIGTERM, 0.5), (signal.SIGTERM, 1.5), (signal.SIGKILL, 0.5)):
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for line in proc.stdout:
            if line.startswith("tracing"):
                break
        time.sleep(delay)
        staged = list(repo.glob(".g4.export-*"))
        assert staged, "the export builds in a staging folder next to the target"
        proc.send_signal(sig)
        rc = proc.wait(timeout=60)
        assert snapshot(exported) == before
        if sig == signal.SIGTERM:
            err = proc.stderr.read()
            assert rc == 130 and "interrupted" in err, (rc, err[-2000:])
            assert not list(repo.glob(".g4.export-*"))
        else:
            assert list(repo.glob(".g4.export-*"))
    # the next export removes the dead export's staging folder and replaces the model cleanly
    again = export_model(options(model_repository=repo, name="g4", model="g4", source="base",
                                 nanochat_base_dir=demo_base, runtime="onnx", max_slots=3, verify=False),
                         log=lambda _: None)
    assert not [p for p in repo.iterdir() if p.name.startswith(".")]
    meta = protocol.read_metadata(again / protocol.VERSION)
    assert meta["content_hash"] == json.loads(before["1/metadata.json"])["content_hash"]


@pytest.mark.parametrize("asked, runtime, kind, capability, chosen", [
    ("auto", "onnx", "KIND_CPU", None, "fp32"),
    ("auto", "tensorrt", "KIND_GPU", "9.0", "bf16"),  # H100: nanochat's own training dtype
    ("auto", "tensorrt", "KIND_GPU", "8.0", "bf16"),
    ("auto", "tensorrt", "KIND_GPU", "7.5", "fp16"),  # T4: no bf16
    ("auto", "onnx", "KIND_GPU", "9.0", "fp16"),  # ONNX Runtime's runner serves fp32 and fp16 only
    ("auto", "onnx", "KIND_GPU", None, "fp16"),
    ("fp32", "tensorrt", "KIND_GPU", "9.0", "fp32"),  # asked for: kept
])
def test_auto_precision_follows_the_runtime_and_the_gpu(asked, runtime, kind, capability, chosen):
    from export.pipeline import choose_precision

    assert choose_precision(asked, runtime, kind, capability) == chosen


def test_tensorrt_types_map_to_torch_without_numpy():
    """bf16 has no numpy type (trt.nptype raises for it in TensorRT 10): the runner maps TensorRT's type names."""
    import enum

    import torch

    from backend.trt_runner import EngineMismatch, torch_dtype

    DataType = enum.Enum("DataType", "FLOAT HALF BF16 INT64 FP8")  # trt.DataType members carry these names
    assert [torch_dtype(t) for t in list(DataType)[:4]] == [torch.float32, torch.float16, torch.bfloat16, torch.int64]
    with pytest.raises(EngineMismatch, match="type FP8"):
        torch_dtype(DataType.FP8)


def test_engine_mismatch_is_refused_with_a_clear_message():
    from backend.trt_runner import EngineMismatch, check_engine

    meta = {"tensorrt": {"version": "10.8.0", "compute_capability": "9.0", "device": "NVIDIA H100"}}
    check_engine(meta, "10.8.0", "9.0", Path("model.plan"))
    with pytest.raises(EngineMismatch, match=r"compute capability 9.0 \(NVIDIA H100; this GPU is 8.0\)"):
        check_engine(meta, "10.8.0", "8.0", Path("model.plan"))
    with pytest.raises(EngineMismatch, match=r"TensorRT 10.8.0 \(this machine has 10.9.0\)"):
        check_engine(meta, "10.9.0", "9.0", Path("model.plan"))
    with pytest.raises(EngineMismatch, match="no tensorrt version"):
        check_engine({"tensorrt": None}, "10.9.0", "9.0", Path("model.plan"))


def test_gpu_check_exits_2_without_gpu():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: make gpu-check would run for real")
    proc = subprocess.run("make gpu-check", shell=True, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "needs a CUDA GPU: no CUDA GPU is visible" in proc.stderr


def model_folder(path: Path, marker: str) -> Path:
    (path / "1").mkdir(parents=True)
    (path / "config.pbtxt").write_text(marker)
    return path


def dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_install_exchanges_old_and_new_in_one_step(tmp_path, monkeypatch):
    target = model_folder(tmp_path / "m", "old")
    stage = model_folder(tmp_path / f".m.export-{dead_pid()}", "new")

    def killed(*args, **kwargs):  # the export dies right after the exchange, before removing the old model
        raise KeyboardInterrupt

    monkeypatch.setattr(repository.shutil, "rmtree", killed)
    with pytest.raises(KeyboardInterrupt):
        repository.install(stage, target)
    monkeypatch.undo()
    assert (target / "config.pbtxt").read_text() == "new" and (stage / "config.pbtxt").read_text() == "old"
    repository.clean_stale(tmp_path, "m")  # the next export of m removes the old model
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"] and (target / "config.pbtxt").read_text() == "new"


def test_an_old_model_left_aside_by_a_killed_export_comes_back(tmp_path):
    # what the two-rename fallback (no RENAME_EXCHANGE) leaves when killed between its renames: no model at
    # the target, the old one aside. Before, nothing looked at it: the model was gone for good.
    aside = model_folder(tmp_path / f".m.export-{dead_pid()}{repository.ASIDE}", "old")
    repository.clean_stale(tmp_path, "m")
    assert not aside.exists() and (tmp_path / "m" / "config.pbtxt").read_text() == "old"
    # beside a model in place, an aside copy is only garbage
    aside = model_folder(tmp_path / f".m.export-{dead_pid()}{repository.ASIDE}", "older")
    repository.clean_stale(tmp_path, "m")
    assert not aside.exists() and (tmp_path / "m" / "config.pbtxt").read_text() == "old"


def test_another_hosts_export_folder_is_left_alone_until_it_is_a_day_old(tmp_path):
    # a volume shared across containers: a pid that is dead here may be a live export there
    stage = model_folder(tmp_path / f".m.export-other-host-{dead_pid()}", "theirs")
    repository.clean_stale(tmp_path, "m")
    assert stage.exists()
    day_old = time.time() - repository.STALE_ELSEWHERE_S - 60
    os.utime(stage, (day_old, day_old))
    repository.clean_stale(tmp_path, "m")
    assert not stage.exists()
    ours = model_folder(tmp_path / f".m.export-{socket.gethostname()}-{dead_pid()}", "ours")
    repository.clean_stale(tmp_path, "m")
    assert not ours.exists()


def test_install_without_the_exchange_restores_the_old_model_on_failure(tmp_path, monkeypatch):
    target = model_folder(tmp_path / "m", "old")
    stage = model_folder(tmp_path / ".m.export-1", "new")
    monkeypatch.setattr(repository, "exchange", lambda a, b: False)
    renames = []
    real_rename = Path.rename

    def rename(self, to):
        renames.append(self.name)
        if len(renames) == 2:  # the staged model's rename fails (a kill is not catchable; see the test above)
            raise OSError("injected")
        return real_rename(self, to)

    monkeypatch.setattr(Path, "rename", rename)
    with pytest.raises(OSError, match="injected"):
        repository.install(stage, target)
    monkeypatch.undo()
    assert (target / "config.pbtxt").read_text() == "old"
