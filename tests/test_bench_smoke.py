"""Smoke tests of the benchmarks: their quick/smoke paths run and print a table with a number for every figure.

The figures themselves are not checked (toy sizes on a shared CPU); bench/run_all.py and bench/gpu.sh give the
real ones.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NUMBER = re.compile(r"\d")


def _run(args: list[str], timeout: int) -> str:
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    p = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, f"{args} exited {p.returncode}:\n{(p.stdout + p.stderr)[-4000:]}"
    return p.stdout


def _table(stdout: str, header: str) -> list[list[str]]:
    """Rows of the table printed after `header` (cells split on ' | ')."""
    lines = stdout.splitlines()
    start = max(i for i, line in enumerate(lines) if line.startswith(header))
    rows = []
    for line in lines[start + 1:]:
        if not line.strip() or line.startswith("("):
            break
        if line.startswith("---"):
            continue
        rows.append([c.strip() for c in line.split(" | ")])
    return rows


def test_met_reads_goals():
    from bench.run_all import first_number, met
    assert met("1.07 (2.1 s / 2.0 s)", "<= 1.2") == "yes"
    assert met("1.35", "<= 1.3") == "no"
    assert met("1.72x (3.0 vs 1.7 ms/img)", ">= 1.6x") == "yes"
    assert met("0.2%", "< 5%") == "yes" and met("7.5%", "< 5%") == "no"
    assert met("509 img/s", ">= 1800 img/s (design.md)") == "no"
    assert met("185 ms / 1624 ms = 11.4%", "report (overlapped with training)") == "-"
    assert met("FAILED: boom", ">= 1") == "-"
    assert first_number("12.5%") == 0.125


@pytest.mark.integration
def test_gpu_bench_smoke(tmp_path):
    out = _run(["bench/gpu_bench.py", "--smoke", "--out", str(tmp_path)], timeout=600)
    rows = _table(out, "figure | measured | goal")
    figures = [r[0] for r in rows]
    for prefix in ("bare training", "model FLOP utilisation", "sweep: 2 trials", "uniform soup of", "greedy soup of"):
        assert any(f.startswith(prefix) for f in figures), (prefix, figures)
    for r in rows:
        assert len(r) == 3 and NUMBER.search(r[1]), r
    saved = json.loads((tmp_path / "gpu_results.json").read_text())
    assert not [n for n, s in saved["sections"].items() if "error" in s], saved["sections"]
    assert len(saved["rows"]) == len(rows)


def test_run_all_quick(tmp_path):
    """run_all --quick without sweep_overhead (its MLflow server + Ray start alone take about a minute here;
    tests/test_sweep.py covers that path) and without the 1-thread repeat of bare_loop."""
    results = tmp_path / "results.json"
    out = _run(["bench/run_all.py", "--quick", "--only", "bare_loop", "soup_bench", "soup_scale", "ingest_bench",
                "--out", str(results)], timeout=900)
    rows = _table(out, "figure | measured | goal | met?")
    figures = [r[0] for r in rows]
    for prefix in ("bare training throughput", "share of step time waiting for data", "uniform soup / raw read",
                   "uniform soup peak RSS", "greedy soup / sum of its evaluations", "ingest 2 workers vs 1",
                   "uniform soup pulled from a real mlflow server", "uniform soup CPU time per ingredient",
                   "greedy soup CPU time per ingredient", "MLflow search + download", "soft-voting logits"):
        assert any(f.startswith(prefix) for f in figures), (prefix, figures)
    for r in rows:
        assert len(r) == 4, r
        assert NUMBER.search(r[1]) and not r[1].startswith("FAILED"), r
        assert r[3] in ("yes", "no", "-"), r
    saved = json.loads(results.read_text())
    assert saved["quick"] and len(saved["table"]) == len(rows)
    assert not [b["name"] for b in saved["benchmarks"] if "error" in b]
