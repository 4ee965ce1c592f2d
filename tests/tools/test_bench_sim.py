"""`make bench-sim`'s scheduler layer at a tiny size: one JSON object a line per configuration, with the fields other
tools read, and every generated token accounted for."""

from __future__ import annotations

import json

from tools import bench_sim


def test_the_scheduler_layer_prints_one_json_line_per_configuration(capsys):
    bench_sim.main(["--layers", "scheduler", "--profile", "d20-l4", "--rows", "4", "--sampling", "greedy", "sampled",
                    "--max-tokens", "8", "--per-stream", "2", "--prompt-words", "20"])
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert [(r["layer"], r["rows"], r["sampling"]) for r in lines] == [("scheduler", 4, "greedy"),
                                                                       ("scheduler", 4, "sampled")]
    for r in lines:
        assert r["profile"] == "d20-l4" and 0 < r["delivered_tok_s"] <= r["ceiling_tok_s"] * 1.01
        assert set(r["host_us_per_token"]) == {"step", "runner", "responses", "client"}
