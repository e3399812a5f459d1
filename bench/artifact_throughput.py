"""Artifact throughput through one proxying `mlflow server` (the cluster's default: trials upload checkpoints
over HTTP, the server writes them to its artifact destination).

    python bench/artifact_throughput.py [--processes 4] [--checkpoints 16] [--mb 100] [--keep DIR]

Starts a real `mlflow server` on 127.0.0.1 (SQLite store, 1 uvicorn worker: the head's SQLite setup) with
`--artifacts-destination` on local disk, then P processes upload N checkpoint-sized files (random bytes, not
compressible) in total, each as `log_artifact` of its own run. Prints checkpoints/s and MB/s through the
server, per-upload latency, and, side by side, the rate of copying the same files on the same disk (what the
server's destination write costs without HTTP): the ratio says what the proxy costs. docs/cluster.md uses
the figure for its cost model.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.scratch import scratch_dir  # noqa: E402


def _uploader(uri: str, folder: str, index: int, count: int, size: int, start, ready, out) -> None:
    os.environ["MLFLOW_TRACKING_URI"] = uri
    from mlflow import MlflowClient
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("artifact-throughput").experiment_id
    run = client.create_run(exp, run_name=f"uploader-{index}").info.run_id
    src = Path(folder) / f"ckpt-{index}.safetensors"
    src.write_bytes(os.urandom(size))
    ready.put(index)
    start.wait()
    times = []
    for i in range(count):
        t0 = time.perf_counter()
        client.log_artifact(run, str(src), artifact_path=f"epoch-{i}")
        times.append(time.perf_counter() - t0)
    client.set_terminated(run)
    src.unlink()
    out.put(times)


def measure(processes: int = 4, checkpoints: int = 16, mb: int = 100, keep: str | None = None) -> dict:
    from mlflow import MlflowClient

    from soups.tracking_server import start_server
    size = mb * 1024 * 1024
    per = [checkpoints // processes + (i < checkpoints % processes) for i in range(processes)]
    with scratch_dir(keep, "ich-artifact-bench-") as folder:
        handle = start_server(folder / "server")
        try:
            MlflowClient(tracking_uri=handle.uri).create_experiment("artifact-throughput")
            ctx = mp.get_context("spawn")
            start, ready, out = ctx.Event(), ctx.Queue(), ctx.Queue()
            procs = [ctx.Process(target=_uploader, args=(handle.uri, str(folder), i, n, size, start, ready, out))
                     for i, n in enumerate(per)]
            for p in procs:
                p.start()
            for _ in procs:  # every uploader has its client, run and file: the clock starts with the uploads
                ready.get(timeout=600)
            t0 = time.perf_counter()
            start.set()
            latencies = [t for _ in procs for t in out.get(timeout=3600)]
            wall = time.perf_counter() - t0
            for p in procs:
                p.join(timeout=60)
        finally:
            handle.stop()
        stored = sum(f.stat().st_size for f in (folder / "server").rglob("*.safetensors"))
        # The same bytes copied on the same disk, without HTTP: what the destination write alone costs.
        src = folder / "copy-src.bin"
        src.write_bytes(os.urandom(size))
        t1 = time.perf_counter()
        for i in range(checkpoints):
            shutil.copyfile(src, folder / f"copy-{i}.bin")
            os.sync()
        copy_wall = time.perf_counter() - t1
    return {"processes": processes, "checkpoints": checkpoints, "mb": mb, "wall_s": wall,
            "checkpoints_per_s": checkpoints / wall, "mb_per_s": checkpoints * mb / wall,
            "upload_s_median": statistics.median(latencies), "upload_s_max": max(latencies),
            "stored_mb": stored / 2**20, "disk_copy_mb_per_s": checkpoints * mb / copy_wall,
            "cpus": os.cpu_count()}


def figures(r: dict) -> list[tuple[str, str, str]]:
    """(figure, measured, goal) rows: rates and latencies of this machine's disk and loopback, information only
    (docs/cluster.md's cost model); the proxy / disk ratio is printed beside the disk rate."""
    return [
        (f"{r['checkpoints']} x {r['mb']} MB from {r['processes']} processes through one proxying server",
         f"{r['checkpoints_per_s']:.2f} checkpoints/s, {r['mb_per_s']:.0f} MB/s", "info"),
        ("per upload (median / max)", f"{r['upload_s_median']:.2f} s / {r['upload_s_max']:.2f} s", "info"),
        ("same bytes copied on the same disk", f"{r['disk_copy_mb_per_s']:.0f} MB/s "
         f"(proxy / disk = {r['mb_per_s'] / r['disk_copy_mb_per_s']:.2f})", "info"),
    ]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--processes", type=int, default=4)
    ap.add_argument("--checkpoints", type=int, default=16)
    ap.add_argument("--mb", type=int, default=100)
    ap.add_argument("--keep", help="keep the server's folder here")
    args = ap.parse_args(argv)
    r = measure(args.processes, args.checkpoints, args.mb, args.keep)
    for name, value, goal in figures(r):
        print(f"{name}: {value} ({goal})")
    print(json.dumps(r, indent=1))
    assert abs(r["stored_mb"] - args.checkpoints * args.mb) < 1, f"stored {r['stored_mb']:.0f} MB"
    return 0


if __name__ == "__main__":
    sys.exit(main())
