"""What the light commands cost (issue 20 item 6): `ich --help` and `ich ingest` of six small images, each as the
user runs it, a fresh `python -m sweeps.cli` process.

    python bench/light_commands.py [--repeats 5] [--root DIR]

- `ich --help`: median wall time of `repeats` runs, beside a bare `python -c pass` (the interpreter's own start);
  the torch/timm modules it imports (`python -X importtime`, goal 0) and MLflow/Ray ones (information).
- `ich ingest SRC OUT --quiet` of six 40x30 PNGs (two classes of three): median wall time, and the peak RSS of the
  command (os.wait4's ru_maxrss: the largest of the process and its decoder processes), plus the torch/timm modules
  it imports (goal 0).

`--root DIR` runs the CLI of another checkout of the project (e.g. a `git worktree` of an older commit) with this
checkout's interpreter: how the figures were before a change. The absolute times are this machine's ("info").

Importable: `measure(...) -> dict`, `figures(result)`, `main()`.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "timm", "mlflow", "ray")
GOAL_RSS_MB = 200


def _run(argv: list[str], root: Path) -> tuple[float, float, subprocess.CompletedProcess]:
    """(wall seconds, peak RSS in MB, result) of `python ARGV` run in `root` with root's modules first."""
    env = {**os.environ, "PYTHONPATH": str(root)}
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen([sys.executable, *argv], cwd=root, env=env, stdout=out, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        done = subprocess.CompletedProcess(argv, proc.returncode, out.read().decode(errors="replace"),
                                           err.read().decode(errors="replace"))
    if done.returncode != 0:
        raise RuntimeError(f"python {' '.join(argv)} exited {done.returncode}: {done.stderr[-2000:]}")
    return wall, usage.ru_maxrss / 1024, done


def _heavy_modules(argv: list[str], root: Path) -> dict[str, int]:
    """Modules of torch, timm, MLflow and Ray that `python -X importtime ARGV` imported, counted per package."""
    _, _, done = _run(["-X", "importtime", *argv], root)
    names = [line.rsplit("|", 1)[-1].strip() for line in done.stderr.splitlines() if line.startswith("import time:")]
    return {h: sum(1 for n in names if n.split(".")[0] == h) for h in HEAVY}


def write_images(src: Path) -> Path:
    """Six 40x30 PNGs, two classes of three, each image distinct."""
    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(0)
    for cls in ("a", "b"):
        (src / cls).mkdir(parents=True, exist_ok=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)).save(src / cls / f"{i}.png")
    return src


def measure(repeats: int = 5, root: str | None = None) -> dict:
    root = Path(root or ROOT).resolve()
    python = [_run(["-c", "pass"], root)[0] for _ in range(repeats)]
    help_ = [_run(["-m", "sweeps.cli", "--help"], root)[0] for _ in range(repeats)]
    tmp = Path(tempfile.mkdtemp(prefix="ich-bench-light-"))
    try:
        src = write_images(tmp / "src")
        ingest = ["-m", "sweeps.cli", "ingest", str(src), str(tmp / "out"), "--quiet", "--overwrite"]
        runs = [_run(ingest, root)[:2] for _ in range(repeats)]
        ingest_heavy = _heavy_modules(ingest, root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"root": str(root), "repeats": repeats, "python_s": statistics.median(python),
            "help_s": statistics.median(help_), "help_heavy": _heavy_modules(["-m", "sweeps.cli", "--help"], root),
            "ingest_s": statistics.median(w for w, _ in runs), "ingest_rss_mb": max(r for _, r in runs),
            "ingest_heavy": ingest_heavy}


def figures(r: dict) -> list[tuple[str, str, str]]:
    hh, ih = r["help_heavy"], r["ingest_heavy"]
    return [
        ("`ich --help`: torch/timm modules imported", f"{hh['torch'] + hh['timm']} (MLflow {hh['mlflow']}, Ray "
                                                       f"{hh['ray']})", "<= 0"),
        ("`ich --help` wall time (median)", f"{r['help_s']:.2f} s (bare python: {r['python_s']:.2f} s)",
         "info (issue 20: under 1 s here)"),
        ("`ich ingest` of six 40x30 PNGs: torch/timm modules imported", f"{ih['torch'] + ih['timm']}", "<= 0"),
        ("`ich ingest` of six 40x30 PNGs, peak RSS", f"{r['ingest_rss_mb']:.0f} MB", f"< {GOAL_RSS_MB} MB"),
        ("`ich ingest` of six 40x30 PNGs, wall time (median)", f"{r['ingest_s']:.2f} s",
         "info (issue 20: under 2 s here)"),
    ]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--root", help="the checkout whose CLI is measured (default: this one)")
    a = ap.parse_args(argv)
    r = measure(a.repeats, a.root)
    print(f"# {r['root']}, {r['repeats']} runs each, load average {os.getloadavg()[0]:.1f}")
    print("figure | measured | goal")
    print("--- | --- | ---")
    for row in figures(r):
        print(" | ".join(row))
    return 0


if __name__ == "__main__":
    sys.exit(main())
