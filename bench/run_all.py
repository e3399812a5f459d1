"""Run every CPU benchmark and print one table: figure | measured | goal | met?

    python bench/run_all.py [--quick] [--only NAME ...] [--skip NAME ...] [--out bench/out/results.json]

Each benchmark runs in its own child process (`run_all.py --child NAME`), which calls the module's
`measure(**kwargs)` and `figures(result)`: peaks, torch threads, Ray and MLflow state never leak from one to the
next, and a benchmark that fails leaves a row saying so instead of stopping the others. Every goal is a ratio
(or a share) measured side by side inside its benchmark, so it holds on any machine; an absolute rate or time
is marked "info" in the goal column (information only, met? '-'). See each module's docstring for what is measured.

`--quick` shrinks every benchmark to a smoke run (seconds each): the table then shows the code paths work, not
meaningful figures. The GPU figures come from bench/gpu.sh on a GPU machine, not from here.

Writes bench/out/results.json (git-ignored): per benchmark its kwargs, raw result, rows, wall time, error.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# name -> (module, full kwargs, quick kwargs)
BENCHES: dict[str, tuple[str, dict, dict]] = {
    # torch's default threads, then 1 thread (steadier on a busy 2-core box: the accuracy run goes there)
    "bare_loop": ("bench.bare_loop", dict(), dict(warmup_epochs=0, epochs=1)),
    "bare_loop_1thread": ("bench.bare_loop", dict(threads=1, accuracy=True), dict(warmup_epochs=0, epochs=1, threads=1)),
    "sweep_overhead": ("bench.sweep_overhead", dict(epochs=8), dict(epochs=2)),
    "soup_bench": ("bench.soup_bench", dict(), dict(quick=True)),
    "soup_scale": ("bench.soup_scale", dict(), dict(quick=True)),
    "ingest_bench": ("bench.ingest_bench", dict(), dict(quick=True)),
    "soup_sweep": ("bench.soup_sweep", dict(), dict(quick=True)),  # issue 14: trajectory-soup cost, parallel soups
    "light_commands": ("bench.light_commands", dict(), dict(repeats=1)),  # issue 20: `ich --help`, a tiny ingest
}
TIMEOUT_S = {"full": 900, "quick": 480}

_NUM = re.compile(r"[-+]?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?")
_GOAL = re.compile(r"^\s*(<=|>=|<|>|≤|≥)\s*([-+]?\d+(?:\.\d+)?)\s*(%?)")


def first_number(text: str) -> float | None:
    """The first number in a measured cell; a percentage (12.5%) becomes 0.125."""
    m = _NUM.search(text)
    if m is None:
        return None
    v = float(m.group())
    return v / 100 if text[m.end():m.end() + 1] == "%" else v


def met(measured: str, goal: str) -> str:
    """'yes' / 'no' when the goal is a comparison (<=, >=, <, >) with a number, else '-'. A goal of "info ..." is
    information only (an absolute rate or time of this machine): always '-', whatever numbers it quotes."""
    if goal.strip().lower().startswith("info"):
        return "-"
    g, v = _GOAL.match(goal), first_number(measured)
    if g is None or v is None:
        return "-"
    op, target = g.group(1), float(g.group(2)) / (100 if g.group(3) else 1)
    ok = {"<=": v <= target, "≤": v <= target, ">=": v >= target, "≥": v >= target,
          "<": v < target, ">": v > target}[op]
    return "yes" if ok else "no"


def run_child(name: str, quick: bool, out_json: Path) -> None:
    """Child process: one benchmark's measure() + figures(), written as JSON."""
    module, full, fast = BENCHES[name]
    kwargs = fast if quick else full
    mod = importlib.import_module(module)
    t0 = time.perf_counter()
    result = mod.measure(**kwargs)
    rows = [list(r) for r in mod.figures(result)]
    out_json.write_text(json.dumps({"name": name, "kwargs": kwargs, "result": result, "rows": rows,
                                    "wall_s": time.perf_counter() - t0}, indent=2, default=str))


def run_one(name: str, quick: bool) -> dict:
    mode = "quick" if quick else "full"
    with tempfile.TemporaryDirectory(prefix="ich-bench-run-") as tmp:
        out_json = Path(tmp) / "result.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", name, "--child-json", str(out_json)]
        if quick:
            cmd.append("--quick")
        env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
        t0 = time.perf_counter()
        try:
            p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT_S[mode])
            rc, log = p.returncode, p.stdout + p.stderr
        except subprocess.TimeoutExpired as e:
            rc = -1
            log = f"timed out after {TIMEOUT_S[mode]} s\n" + ((e.stdout or b"").decode(errors="replace")
                                                              if isinstance(e.stdout, bytes) else (e.stdout or ""))
        wall = time.perf_counter() - t0
        if rc == 0 and out_json.exists():
            d = json.loads(out_json.read_text())
            d["process_wall_s"] = wall
            return d
    tail = log.strip().splitlines()[-1] if log.strip() else f"exit status {rc}"
    return {"name": name, "error": tail, "log_tail": log[-4000:], "rows": [[name, f"FAILED: {tail}", "-"]],
            "process_wall_s": wall}


def print_table(rows: list[list[str]]) -> None:
    print("figure | measured | goal | met?")
    print("--- | --- | --- | ---")
    for figure, measured, goal in rows:
        print(f"{figure} | {measured} | {goal} | {met(measured, goal)}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="shrink every benchmark (smoke run)")
    ap.add_argument("--only", nargs="+", choices=list(BENCHES), help="run only these")
    ap.add_argument("--skip", nargs="+", choices=list(BENCHES), default=[], help="leave these out")
    ap.add_argument("--out", default=str(ROOT / "bench" / "out" / "results.json"))
    ap.add_argument("--child", choices=list(BENCHES), help=argparse.SUPPRESS)
    ap.add_argument("--child-json", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        run_child(a.child, a.quick, Path(a.child_json))
        return 0

    names = [n for n in (a.only or list(BENCHES)) if n not in a.skip]
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"# {len(names)} benchmarks{' (quick)' if a.quick else ''}; {os.cpu_count()} CPUs, load average "
          f"{load:.1f} at start", flush=True)
    t0 = time.perf_counter()
    results = []
    for name in names:
        print(f"# running {name} ...", flush=True)
        r = run_one(name, a.quick)
        print(f"#   {name}: {r['process_wall_s']:.0f} s{' FAILED: ' + r['error'] if 'error' in r else ''}",
              flush=True)
        results.append(r)
    rows = [row for r in results for row in r["rows"]]
    for row in rows:
        row.append(met(row[1], row[2]))
    total = time.perf_counter() - t0
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"quick": a.quick, "cpus": os.cpu_count(), "load_avg_start": load,
                               "load_avg_end": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
                               "total_s": total, "table": rows, "benchmarks": results}, indent=2, default=str))
    print()
    print_table([row[:3] for row in rows])
    print(f"\n({total:.0f} s in all; results in {out})")
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
