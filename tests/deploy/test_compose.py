"""
Compose on a GPU node as an operator meets it, without Docker: each `make docker-*` target runs for real in a
new shell against a `docker` that records its command line, and compose's rules (tests/deploy/compose_config.py)
say what that command line reads and interpolates. Also: every volume a command mounts is compose's volume, by
the name compose gives it.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.deploy.compose_config import (
    Interpolation,
    Invocation,
    MissingRequired,
    invocation,
    read_env_file,
    volume_names,
)
from tests.deploy.test_deploy import DOCKER, ROOT, compose

ENV_EXAMPLE = DOCKER / "env.example"
KEYS = ("INTERNAL_API_KEY", "TRITON_ADMIN_KEY")  # compose's required variables
DOCKER_TARGETS = re.findall(r"^(docker-[a-z-]+):", (ROOT / "Makefile").read_text(), re.MULTILINE)
# Where operators are told to type commands: a named volume there must be compose's.
COMMAND_FILES = [ROOT / "README.md", DOCKER / "README.md", ROOT / "Makefile"]
MOUNT = re.compile(r"(?:-v|--volume)[ =]([^\s:]+):|--mount\s+\S*?(?:source|src)=([^,\s]+)|docker volume \w+ ([^\s`]+)")
FAKE_DOCKER = """#!{python}
import json, os, sys
with open(os.environ["FAKE_DOCKER_LOG"], "a") as log:
    log.write(json.dumps({{"argv": sys.argv[1:], "cwd": os.getcwd(), "env": dict(os.environ)}}) + "\\n")
"""


@pytest.fixture
def node(tmp_path) -> Path:
    """A checkout on a GPU node, as far as the docker targets read it: docker/compose.yaml, docker/env.example."""
    (tmp_path / "node" / "docker").mkdir(parents=True)
    for name in ("compose.yaml", "env.example"):
        shutil.copy(DOCKER / name, tmp_path / "node" / "docker" / name)
    fake = tmp_path / "bin" / "docker"
    fake.parent.mkdir()
    fake.write_text(FAKE_DOCKER.format(python=sys.executable))
    fake.chmod(0o755)
    return tmp_path / "node"


def make(node: Path, *targets: str, **variables: str) -> list[dict]:
    """Runs `make TARGET...` in `node` from a new shell (PATH alone), returns each docker call it made."""
    log = node.parent / "docker.log"
    log.unlink(missing_ok=True)
    shell = {"PATH": f"{node.parent / 'bin'}:/usr/bin:/bin", "FAKE_DOCKER_LOG": str(log)}
    run = subprocess.run(["make", "-s", "-f", str(ROOT / "Makefile"), "-C", str(node), *targets,
                          *(f"{k}={v}" for k, v in variables.items())],
                         env=shell, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stdout + run.stderr
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def compose_calls(calls: list[dict]) -> list[Invocation]:
    return [invocation(c["argv"], c["env"], Path(c["cwd"])) for c in calls if c["argv"][0] == "compose"]


# ---------------------------------------------------------------- compose's rules, as modelled here


def test_interpolation_follows_the_compose_specification():
    env = {"SET": "x", "EMPTY": ""}
    cases = {"${SET}": "x", "$SET/a": "x/a", "$$SET": "$SET", "${UNSET:-d}": "d", "${EMPTY:-d}": "d",
             "${EMPTY-d}": "", "${UNSET-d}": "d", "${SET:+r}": "r", "${EMPTY:+r}": "", "${EMPTY+r}": "r",
             "${UNSET:-${SET}}": "x", "${UNSET:-${ALSO:-deep}}": "deep", "${EMPTY?e}": "", "a$": "a$"}
    for text, expected in cases.items():
        assert Interpolation(env)(text) == expected, text
    for text in ("${UNSET:?need it}", "${EMPTY:?need it}", "${UNSET?need it}"):
        with pytest.raises(MissingRequired, match="need it"):
            Interpolation(env)(text)
    interpolation = Interpolation(env)
    assert interpolation("${UNSET}") == "" and interpolation.unset == {"UNSET"}


def test_env_file_is_read_from_the_first_compose_files_folder(tmp_path):
    (tmp_path / "docker").mkdir()
    (tmp_path / "docker" / ".env").write_text("# keys\nA=from-file\nB=from-file\n")
    call = invocation(["compose", "-f", "docker/compose.yaml", "down"], {"B": "shell"}, tmp_path)
    assert call.project_directory == tmp_path / "docker" and call.command == ["down"]
    assert call.env == {"A": "from-file", "B": "shell"}  # the shell wins
    assert invocation(["compose", "--project-directory", ".", "-f", "docker/compose.yaml", "ps"], {},
                      tmp_path).env == {}
    with pytest.raises(FileNotFoundError):
        invocation(["compose", "--env-file", "missing.env", "-f", "docker/compose.yaml", "down"], {}, tmp_path)
    (tmp_path / "quoted.env").write_text('A="x"\n')
    with pytest.raises(ValueError, match="plain"):
        read_env_file(tmp_path / "quoted.env")


# ---------------------------------------------------------------- the keys, from docker/.env


def test_env_example_names_every_variable_compose_reads():
    read = set(re.findall(r"\$\{?([_a-zA-Z][_a-zA-Z0-9]*)", (DOCKER / "compose.yaml").read_text()))
    documented = set(re.findall(r"^#?\s*([A-Z_][A-Z0-9_]*)=", ENV_EXAMPLE.read_text(), re.MULTILINE))
    assert read == documented, read ^ documented
    example = read_env_file(ENV_EXAMPLE)  # the plain form compose and this model read alike
    assert example == dict.fromkeys(KEYS, ""), "only the keys are uncommented, and left for docker-env to fill"


def test_docker_env_writes_fresh_keys_once(node):
    make(node, "docker-env")
    env_file = node / "docker" / ".env"
    first = read_env_file(env_file)
    for key in KEYS:
        assert re.fullmatch(r"[0-9a-f]{64}", first[key]), key
    assert first[KEYS[0]] != first[KEYS[1]]
    assert env_file.stat().st_mode & 0o077 == 0, "the keys are readable by the owner only"
    make(node, "docker-env")
    assert read_env_file(env_file) == first, "a second run keeps the keys the services already use"


@pytest.mark.parametrize("target", [t for t in DOCKER_TARGETS if t != "docker-env"])
def test_every_docker_target_resolves_in_a_new_shell(node, target):
    make(node, "docker-env")
    calls = make(node, target)
    for call in compose_calls(calls):
        config, unset = call.config()  # raises where compose would stop
        assert not unset, f"{target}: compose would warn and substitute '' for {unset}"
        if call.command[0] != "down":  # down stops containers by project: any key passes it
            bff = config["services"]["bff"]["environment"]
            assert bff["INTERNAL_API_KEY"] == read_env_file(node / "docker" / ".env")["INTERNAL_API_KEY"]


def test_docker_up_writes_the_keys_first(node):
    (up,) = compose_calls(make(node, "docker-up"))
    assert set(KEYS) <= read_env_file(node / "docker" / ".env").keys()
    up.config()


def test_docker_down_needs_no_env_file(node):
    calls = compose_calls(make(node, "docker-down"))
    assert [c.command for c in calls] == [["down"]]
    calls[0].config()  # no `:?` stops it
    assert not (node / "docker" / ".env").exists(), "down writes no keys"


def test_compose_without_keys_fails_naming_the_env_file(node):
    call = invocation(["compose", "-f", "docker/compose.yaml", "up", "-d"], {}, node)
    with pytest.raises(MissingRequired, match=r"docker/\.env"):
        call.config()


def test_make_passes_model_and_tag(node):
    make(node, "docker-env")
    (up,) = compose_calls(make(node, "docker-up", MODEL="d32", DOCKER_TAG="v1"))
    triton = up.config()[0]["services"]["triton"]
    assert triton["image"] == "nanochat-triton:v1" and "--load-model=d32" in triton["command"]


def test_bff_workers_are_set_for_the_node():
    # BFF_WORKERS unset means one worker per CPU: a 200-vCPU GPU node would start 200 BFFs
    env = dict.fromkeys(KEYS, "k" * 64)
    workers = Interpolation(env)(compose()["services"]["bff"]["environment"]["BFF_WORKERS"])
    assert 1 <= int(workers) <= 8


# ---------------------------------------------------------------- volumes


def mounted_volumes(text: str) -> set[str]:
    """Named volumes the commands in `text` mount or name (host paths and variables left out)."""
    found = {name for groups in MOUNT.findall(text) for name in groups if name}
    return {name for name in found if not re.match(r"[/.~$]", name)}


def test_volume_pattern_finds_mounts():
    text = ("docker run -v models:/models -v $HOME/x:/c:ro -v ./y:/y img\n"
            "docker run --mount type=volume,source=other,target=/m img\n`docker volume inspect third`")
    assert mounted_volumes(text) == {"models", "other", "third"}


def test_every_mounted_volume_is_a_compose_volume():
    config = compose()
    names = volume_names(config, config["name"])
    services = config["services"].values()
    used = {m.split(":")[0] for s in services for m in s.get("volumes", []) if not re.match(r"[/.~$]", m)}
    assert used <= set(names), "a service mounts a volume the file does not declare"
    for path in COMMAND_FILES:
        stray = mounted_volumes(path.read_text()) - set(names.values())
        assert not stray, f"{path.relative_to(ROOT)} mounts {stray}; compose's volumes are {sorted(names.values())}"
