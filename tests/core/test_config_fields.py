"""
The one config dialect (core/config_fields.py) as its three users read it: the engine's config.pbtxt
parameters, the exporter's flags and variables, and the BFF's environment. The same spellings mean the same
thing everywhere, and a bad value is an error that names its variable. No server, no export.
"""

from __future__ import annotations

import dataclasses

import pytest

from backend.model_config import EngineConfig, ModelShape
from bff.settings import Settings, from_env
from core.config import parse_overrides
from core.config_fields import FALSE, TRUE
from export.__main__ import parse_options
from export.options import ExportOptions

KEY = {"INTERNAL_API_KEY": "k" * 16}
SPELLINGS = [(s, True) for s in TRUE] + [(s, False) for s in FALSE] + [("ON", True), ("Off", False)]


@pytest.mark.parametrize("raw, value", SPELLINGS)
def test_every_boolean_reads_the_same_spellings(raw, value):
    assert from_env({**KEY, "BFF_METRICS_OPEN": raw}).metrics_open is value
    assert parse_options(["--env"], env={"FORCE": raw}).force is value
    assert parse_options(["--env"], env={"VERIFY": raw}).verify is value
    assert parse_overrides([f"rope_bf16={raw}"]) == {"rope_bf16": value}


def test_an_open_switch_reads_on_as_true():
    # before one table, BFF_RUN_OPEN=on was silently false while FORCE=on was true
    assert from_env({"BFF_RUN_OPEN": "on"}).run_open


@pytest.mark.parametrize("read, variable", [
    (lambda: from_env({"BFF_RUN_OPEN": "maybe"}), "BFF_RUN_OPEN"),
    (lambda: parse_options(["--env"], env={"FORCE": "maybe"}), "FORCE"),
    (lambda: parse_overrides(["rope_bf16=maybe"]), "rope_bf16"),
])
def test_an_unknown_boolean_spelling_is_an_error_naming_its_variable(read, variable):
    with pytest.raises(ValueError, match=f"{variable}='maybe' is not a boolean"):
        read()


def test_text_parses_by_the_fields_type():
    s = from_env({**KEY, "BFF_TRITON_URLS": "a:1, b:2", "BFF_TEMPERATURE": "1", "BFF_PORT": "9000"})
    assert (s.triton_urls, s.temperature, s.port) == (("a:1", "b:2"), 1.0, 9000)
    o = parse_options(["--env"], env={"OVERRIDES": "softcap=20 rope_bf16=0", "MAX_SLOTS": "auto", "MAX_QUEUE": "3"})
    assert (o.overrides, o.max_slots, o.engine.max_queue) == (("softcap=20", "rope_bf16=0"), "auto", 3)
    assert EngineConfig.from_parameters({"max_queue": "7"}) == EngineConfig(max_queue=7)
    with pytest.raises(ValueError, match="BFF_PORT='x' is not an integer"):
        from_env({**KEY, "BFF_PORT": "x"})
    with pytest.raises(ValueError, match=r"config\.pbtxt parameter prefill_chunk='lots' is not an integer"):
        EngineConfig.from_parameters({"prefill_chunk": "lots"})


@pytest.mark.parametrize("make, message", [
    (lambda: from_env({**KEY, "BFF_TEMPERATURE": "3"}), r"BFF_TEMPERATURE must be a number in \[0.0, 2.0\]"),
    (lambda: from_env({**KEY, "BFF_SWAP_STRATEGY": "x"}), "BFF_SWAP_STRATEGY must be one of load-first, drain-first"),
    (lambda: from_env({**KEY, "BFF_WORKERS": "-1"}), "BFF_WORKERS must be an integer >= 0"),
    (lambda: parse_options(["--env"], env={"MAX_SLOTS": "0"}), r"MAX_SLOTS must be an integer in \[1, 4096\]"),
    (lambda: parse_options(["--env"], env={"RUNTIME": "x"}), "RUNTIME must be one of auto, onnx"),
    (lambda: EngineConfig(max_queue=-1), r"max_queue must be an integer in \[0, 1000000\]"),
    (lambda: ModelShape("onnx", "fp8", 512), "precision must be one of fp32, fp16, bf16"),
])
def test_a_value_out_of_range_or_choices_names_its_field(make, message):
    with pytest.raises(ValueError, match=message):
        make()


@pytest.mark.parametrize("cls", [EngineConfig, ModelShape, ExportOptions, Settings])
def test_every_setting_is_a_field_of_the_dialect(cls):
    for f in dataclasses.fields(cls):
        assert f.name == "engine" or f.metadata["doc"], (cls.__name__, f.name)  # engine: EngineConfig's, nested
        assert cls is not Settings or f.metadata["env"].isupper(), f.name
