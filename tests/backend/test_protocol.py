"""
backend/protocol.py and backend/model_config.py are the one definition of the model's contract: the
documents that repeat them for readers (model_repository/README.md, bff/openapi.yaml) are checked against
them here, and the source tree spells no file, tensor or metric name anywhere else.
"""

from __future__ import annotations

import dataclasses
import re

import pytest
import yaml

from backend import protocol as P
from backend.model_config import EngineConfig, ModelShape
from bff.validation import COMPONENTS
from tools.paths import PROJECT

README = (PROJECT / "model_repository" / "README.md").read_text()


def table(heading: str) -> list[list[str]]:
    """The rows of the first table after a heading that starts with `heading`, cells stripped of backticks."""
    section = README[README.index("\n## " + heading):]
    rows = []
    for line in section.strip().splitlines()[1:]:
        if line.startswith("## "):
            break
        if line.startswith("| ") and not line.startswith("| ---"):
            cells = re.split(r"(?<!\\)\|", line.strip().strip("|"))
            rows.append([c.strip().strip("`") for c in cells])
    return rows[1:]  # without the header


def test_the_readmes_inputs_are_the_protocols():
    rows = table("Inputs")
    assert [r[0] for r in rows] == [i.name for i in P.INPUTS]
    for row, spec in zip(rows, P.INPUTS, strict=True):
        assert (row[1], row[2]) == (spec.triton_type, "[" + ", ".join(map(str, spec.dims)) + "]"), spec.name
        default = "" if spec.default is None else str(spec.default)
        assert row[3] == default, spec.name
        assert row[4] == ("" if spec.low is None else f"{spec.low}..{spec.high}"), spec.name


def test_the_readmes_outputs_are_the_protocols():
    rows = table("Outputs")
    assert [r[0] for r in rows] == [o.name for o in P.OUTPUTS]
    for row, spec in zip(rows, P.OUTPUTS, strict=True):
        assert (row[1], row[2]) == (spec.triton_type, "[" + ", ".join(map(str, spec.dims)) + "]"), spec.name
        assert row[3].startswith("final response only") == spec.final_only, spec.name


def test_the_readmes_parameters_are_the_engine_config():
    rows = table("config.pbtxt parameters")
    fields = dataclasses.fields(EngineConfig)
    assert [r[0] for r in rows] == [f.name for f in fields]
    for row, f in zip(rows, fields, strict=True):
        assert (row[1], row[2]) == (str(f.default), f"{f.metadata['low']}..{f.metadata['high']}"), f.name
    shape = README[README.index("## metadata.json"):]
    assert all(f"`{f.name}`" in shape.split("##")[1] for f in dataclasses.fields(ModelShape))


def test_the_readmes_metrics_are_the_protocols():
    documented = " ".join(r[0] for r in table("Metrics"))
    names = [v for k, v in vars(P).items() if k.startswith("METRIC_") and k != "METRIC_PREFIX"]
    assert all(name in documented for name in names), [n for n in names if n not in documented]
    assert set(re.findall(r"nanochat_\w+", documented)) <= {n + s for n in names for s in ("", "_bucket")}


def test_the_bff_documents_the_protocols_defaults():
    schema = COMPONENTS["schemas"]["GenerateRequest"]["properties"]
    for name in ("temperature", "top_k", "max_tokens"):
        assert f"default {P.INPUT[name].default}" in schema[name]["description"], name
    assert yaml.safe_load((PROJECT / "bff" / "openapi.yaml").read_text())["components"] == COMPONENTS


SCHEMA_INPUTS = {"max_completion_tokens": "max_tokens"}  # OpenAI's newer name for it
OFF = {("ChatCompletionRequest", "top_k"): -1}  # vLLM's spelling of "the whole vocabulary", sent on as 0
NOT_INPUTS = {("ChatCompletionRequest", "n")}  # one choice per request: the BFF's own bound


@pytest.mark.parametrize("schema", ["GenerateRequest", "ChatCompletionRequest"])
def test_the_bff_schemas_bounds_are_the_protocols_ranges(schema):
    # bff/openapi.yaml validates bodies before they reach Triton: the same bounds, or a body the BFF accepts
    # would be refused by the backend (or the other way round)
    properties = COMPONENTS["schemas"][schema]["properties"]
    bounded = {name for name, p in properties.items() if "minimum" in p or "maximum" in p}
    for name in bounded - {n for s, n in NOT_INPUTS if s == schema}:
        spec = P.INPUT[SCHEMA_INPUTS.get(name, name)]
        wanted = (OFF.get((schema, name), spec.low), spec.high)
        assert (properties[name].get("minimum"), properties[name].get("maximum")) == wanted, (schema, name)
    ranged = {name for name, spec in P.INPUT.items() if spec.low is not None}
    assert {name for name in properties if SCHEMA_INPUTS.get(name, name) in ranged} <= bounded, schema  # none left out


def test_the_openai_stop_bounds_are_within_the_protocols():
    stop = COMPONENTS["schemas"]["ChatCompletionRequest"]["properties"]["stop"]["oneOf"]
    assert stop[0]["maxLength"] <= P.MAX_STOP_CHARS and stop[1]["items"]["maxLength"] <= P.MAX_STOP_CHARS
    assert stop[1]["maxItems"] <= P.MAX_STOPS


def test_no_file_tensor_or_metric_name_is_spelled_twice():
    names = [P.CONFIG_FILE, P.ONNX_FILE, P.ONNX_DATA_FILE, P.PLAN_FILE, P.METADATA_FILE, P.INPUT_IDS,
             P.POSITIONS, P.SLOTS, P.PREV_IDS, P.OLD_PREV_EMBEDDING, *P.CACHE_PREFIXES, *P.NEW_KV_PREFIXES]
    names += [v for k, v in vars(P).items() if k.startswith("METRIC_")]
    spelled = {}
    for path in sorted(p for folder in ("core", "backend", "export", "bff", "tools")
                       for p in (PROJECT / folder).rglob("*.py") if p.name != "protocol.py"):
        code = path.read_text()
        for name in names:
            if re.search(r"[\"'{]" + re.escape(name) + r"[\"'{]", code):  # a string literal, not prose
                spelled.setdefault(name, []).append(str(path.relative_to(PROJECT)))
    assert spelled == {}
