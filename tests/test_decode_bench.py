"""benchmarks/decode_bench.py end to end on the CPU preset (a shallow model with the family's full vocabulary)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "decode_bench.py"

pytestmark = pytest.mark.slow  # a 150k-row LM head decoding 64 tokens several times: a minute or two on 2 cores


def run(tmp_path: Path, *args: str) -> dict:
    out = tmp_path / "result.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    cmd = [sys.executable, str(SCRIPT), "--quick", "--threads", "1", "--out", str(out), *args]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(out.read_text())


def test_modes_report_every_mode_with_and_without_sm(tmp_path):
    report = run(tmp_path, "--modes", "dream,plain,dual", "--new-tokens", "32")
    assert report["environment"]["command"].endswith("--new-tokens 32")
    rows = {(r["mode"], r["sm"]): r for r in report["results"]}
    assert set(rows) == {(m, sm) for m in ("dream", "plain", "dual") for sm in (False, True)}
    assert rows[("plain", False)]["extrapolated"] and not rows[("dual", False)]["extrapolated"]
    assert all(r["nfe"] >= 1 and r["tokens_per_s"] > 0 for r in rows.values())
    ratios = report["summary"]["32"]
    assert {"sm_step_cost_dual", "sm_vs_binary_dual", "dual_vs_plain", "dual_vs_dream"} <= set(ratios)
    assert 0 < ratios["sm_share_dual"] < 0.5 and 0 < ratios["sm_share_plain"] < 0.5 and "sm_share_dream" not in ratios
    assert (tmp_path / "result.png").exists()


def test_llada_providers_report_the_sm_share_of_a_step(tmp_path):
    report = run(tmp_path, "--family", "llada")
    assert report["family"] == "llada" and report["vocab"] == 126464
    assert {r["provider"] for r in report["results"]} == {"engine_binary_eager", "engine_sm_eager"}
    (summary,) = report["summary"]
    assert 0 < summary["sm_share"] < 1 and "sm_vs_authors" not in summary
