"""Soups as the work grows, measured side by side in one run against a real `mlflow server` started here.

    python bench/soup_scale.py [--quick]

1. Pulled from the registry: N=8 checkpoints the size of coatnet_0 (107 MB) are logged to the server, then two
   things alternate, `repeats` times each (medians): downloading the same N files alone (mlflow's
   download_artifacts, 2 threads, 2 files ahead, each deleted when done) and the uniform soup pulled from the
   server as `ich soup` pulls them: the orchestrator's CheckpointPool (download, sha256, load check) on the
   same 2 threads, while soup_bench.uniform_mean loads the next one (prefetched) and accumulates the current
   one (float64, default accumulation threads). The ratio is soup / download alone.
2. A scale curve at N = 8, 32, 128 (tiny CoAtNet checkpoints, `coatnet_tiny_ich` with 17 classes, ~1 MB each:
   128 coatnet_0 checkpoints would take 14 GB of disk). N=8/32/128 are interleaved in every repeat:
   - uniform soup time per ingredient (local folders, page cache) and greedy soup time per ingredient (evaluate =
     forward pass of a fixed batch); the figure is max/min over N of the per-ingredient CPU times of the process
     (all its threads; flat: <= 1.15), the wall-time ratio beside it (on a shared machine wall time mostly
     measures the other processes);
   - peak RSS of a uniform soup in a fresh process (soup_bench.rss_child), above the process's RSS after
     imports; the figure is max/min over N (flat: <= 1.10);
   - the MLflow side per checkpoint: search_checkpoints of an experiment holding N checkpoints, and their
     download (verified, 2 threads), both divided by N.
3. Soft voting's logits: the orchestrator keeps every checkpoint's val and test logits (soups/logit_store.py);
   bytes per checkpoint at ICH-17 size (667 val + 741 test images, 17 classes, float32), and the most held in
   memory while N = 8 .. 2,160 (a paper-scale sweep: 72 trials x 30 epochs) are added under the default limit.

`--quick`: tiny everything (the smoke test; the figures then only show the code path).
Importable: `measure(...) -> dict`, `figures(result) -> [(figure, measured, goal)]`, `main()`.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.scratch import scratch_dir  # noqa: E402
from bench.soup_bench import NUM_CLASSES, peak_rss, write_checkpoints  # noqa: E402

GOAL_PULLED_OVER_DOWNLOAD = 1.1
GOAL_FLAT_TIME = 1.15
GOAL_FLAT_RSS = 1.10
ICH17_VAL, ICH17_TEST, ICH17_CLASSES = 667, 741, 17

FULL = dict(big_model="coatnet_0_rw_224", big_img=224, big_n=8, tiny_model="coatnet_tiny_ich", tiny_img=32,
            ns=(8, 32, 128), repeats=3, local_repeats=5, greedy_repeats=3, eval_batch=32,
            logit_ns=(8, 32, 128, 2160),
            workers=2, depth=2)
QUICK = dict(big_model="coatnet_tiny_ich", big_img=32, big_n=3, tiny_model="coatnet_tiny_ich", tiny_img=32,
             ns=(2, 4, 8), repeats=2, local_repeats=2, greedy_repeats=1, eval_batch=16, logit_ns=(2, 8, 64),
             workers=2, depth=2)


# ---------------------------------------------------------------------------------------------- MLflow side

def log_all(client, experiment: str, folders: list[Path], per_trial: int, model: str, threads: int = 4) -> str:
    """Log the checkpoint folders as trials of `per_trial` epochs (4 loggers at once); returns the experiment id."""
    from ich.checkpoint import META, read_meta
    from soups.store import registry
    eid = registry.get_or_create_experiment(client, experiment)
    runs: dict[str, str] = {}
    for i in range(0, len(folders), per_trial):
        trial = f"t{i // per_trial:03d}"
        runs[trial] = client.create_run(eid, run_name=trial, tags={"ich.kind": "trial", "ich.trial": trial}).info.run_id

    def log(i: int) -> str:
        trial, folder = f"t{i // per_trial:03d}", folders[i]
        meta = read_meta(folder)  # labelled as this trial's epoch: log_checkpoint reads the folder
        meta.extra.update(sweep=experiment, trial=trial)
        meta.epoch, meta.metrics = i % per_trial + 1, {"val_accuracy": 0.5 - 1e-3 * i}
        (folder / META).write_text(meta.to_json(), encoding="utf-8")
        return registry.log_checkpoint(client, (eid, runs[trial]), folder)
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(log, range(len(folders))))
    return eid


def download_alone(client, records, dst: Path, workers: int, depth: int) -> int:
    """Download every record's artifacts (no verification, nothing read), each deleted when it has arrived."""
    from mlflow.artifacts import download_artifacts

    from soups.average import prefetch_map

    def fetch(r) -> Path:
        folder = dst / r.model_id
        return Path(download_artifacts(artifact_uri=r.artifact_uri, dst_path=str(folder),
                                       tracking_uri=client.tracking_uri)).parent
    n = 0
    for folder in prefetch_map(fetch, records, workers=workers, depth=depth):
        shutil.rmtree(folder, ignore_errors=True)
        n += 1
    return n


def pulled_uniform(client, records, dst: Path, workers: int, depth: int) -> dict:
    """Uniform soup of the records pulled from the server the way `ich soup` pulls them: the orchestrator's
    CheckpointPool downloads and verifies on `workers` threads while uniform_mean loads (prefetched) and
    accumulates the current one. `depth` is unused here: the pool starts every download at once."""
    from bench.soup_bench import uniform_mean
    from soups.average import Ingredient
    from soups.pull import CheckpointPool
    pool = CheckpointPool(client, [(r, 0.0) for r in records], dst, workers=workers)
    try:
        pulled = (pool.get(r) for r in records)
        return uniform_mean(Ingredient(p.record.model_id, 0.0, p.load) for p in pulled if p is not None)
    finally:
        pool.close()


def time_pulled(client, records, tmp: Path, repeats: int, workers: int, depth: int) -> dict:
    soup_t, down_t = [], []
    download_alone(client, records[:1], tmp, workers, depth)  # warm the code path and the connection
    for r in range(repeats):
        for side in (("download", "soup") if r % 2 == 0 else ("soup", "download")):
            dst = Path(tempfile.mkdtemp(prefix="pull-", dir=tmp))
            t0 = time.perf_counter()
            if side == "download":
                download_alone(client, records, dst, workers, depth)
            else:
                pulled_uniform(client, records, dst, workers, depth)
            (down_t if side == "download" else soup_t).append(time.perf_counter() - t0)
            shutil.rmtree(dst, ignore_errors=True)
    soup_s, down_s = statistics.median(soup_t), statistics.median(down_t)
    return {"n": len(records), "soup_s": soup_s, "download_s": down_s, "ratio": soup_s / down_s,
            "soup_runs": soup_t, "download_runs": down_t}


def time_mlflow_side(client, eid: str, tmp: Path, workers: int, depth: int) -> dict:
    """search_checkpoints of the experiment, then every checkpoint downloaded and verified."""
    from soups.store import registry
    from soups.average import prefetch_map
    t0 = time.perf_counter()
    records = registry.search_checkpoints(client, [eid])
    search_s = time.perf_counter() - t0
    dst = Path(tempfile.mkdtemp(prefix="dl-", dir=tmp))
    t0 = time.perf_counter()
    for folder in prefetch_map(lambda r: registry.download_checkpoint(client, r, dst), records, workers=workers,
                               depth=depth):
        shutil.rmtree(folder.parent, ignore_errors=True)
    download_s = time.perf_counter() - t0
    shutil.rmtree(dst, ignore_errors=True)
    n = len(records)
    return {"n": n, "search_s": search_s, "download_s": download_s, "search_ms_per_ckpt": 1000 * search_s / n,
            "download_ms_per_ckpt": 1000 * download_s / n}


# ---------------------------------------------------------------------------------------------- soups, local

def time_local(folders: list[Path], ns: tuple, repeats: int, greedy_repeats: int, model: str, img: int,
               batch: int) -> dict:
    """Uniform and greedy soup time per ingredient for each N, the Ns interleaved inside every repeat."""
    import torch

    from bench.soup_bench import ingredients, uniform_mean
    from ich.models import create_model
    from soups.average import greedy_soup
    torch.manual_seed(0)
    net = create_model(model, NUM_CLASSES, img).eval()
    g = torch.Generator().manual_seed(2)
    x = torch.randn(batch, 3, img, img, generator=g)
    y = torch.randint(0, NUM_CLASSES, (batch,), generator=g)

    def evaluate(sd) -> float:
        net.load_state_dict(sd)
        with torch.no_grad():
            return float((net(x).argmax(1) == y).float().mean())

    uniform_mean(ingredients(folders[:2]))  # warm-up
    runs: dict[str, dict[int, list[float]]] = {k: {n: [] for n in ns} for k in
                                               ("uniform", "greedy", "uniform_cpu", "greedy_cpu")}

    def timed(kind: str, n: int, fn) -> None:
        t0, c0 = time.perf_counter(), time.process_time()  # CPU time of every thread of this process
        fn()
        runs[kind][n].append((time.perf_counter() - t0) / n)
        runs[f"{kind}_cpu"][n].append((time.process_time() - c0) / n)

    for r in range(max(repeats, greedy_repeats)):
        order = ns if r % 2 == 0 else tuple(reversed(ns))
        for n in order:
            if r < repeats:
                timed("uniform", n, lambda: uniform_mean(ingredients(folders[:n])))
            if r < greedy_repeats:
                timed("greedy", n, lambda: greedy_soup(ingredients(folders[:n]), evaluate))
    out: dict = {"runs": runs}
    for kind, v in runs.items():
        per = {n: statistics.median(x) for n, x in v.items()}
        out[f"{kind}_s_per_ingredient"] = per
        out[f"{kind}_flat"] = max(per.values()) / min(per.values())
    return out


def logits_growth(ns: tuple) -> dict:
    """Bytes per checkpoint of the orchestrator's soft-voting logits at ICH-17 size, and the most held in memory
    while up to max(ns) checkpoints are added to a PredictionStore (temp folder) with the default limit."""
    import numpy as np

    from soups.logit_store import DEFAULT_MAX_BYTES, PredictionStore
    rng = np.random.default_rng(0)
    entry = {"val": rng.normal(size=(ICH17_VAL, ICH17_CLASSES)).astype(np.float32),
             "test": rng.normal(size=(ICH17_TEST, ICH17_CLASSES)).astype(np.float32)}
    per = PredictionStore.nbytes(entry)
    store = PredictionStore()
    held = {}
    t0 = time.perf_counter()
    try:
        for i in range(max(ns)):
            store[f"m{i}"] = {k: v.copy() for k, v in entry.items()}
            if i + 1 in ns:
                held[i + 1] = {"memory": store.bytes_in_memory, "disk": store.bytes_on_disk}
        peak = store.peak_bytes_in_memory
    finally:
        store.close()
    return {"bytes_per_ckpt": per, "limit": DEFAULT_MAX_BYTES, "held": held, "peak": peak,
            "fill_s": time.perf_counter() - t0}


# ---------------------------------------------------------------------------------------------- all

def measure(*, quick: bool = False, keep: str | None = None, threads: int | None = 1, **over) -> dict:
    """All figures. threads: torch intra-op threads here and in the RSS children (1: steadier on a busy 2-core
    machine; the soups' own accumulation threads are soups.average.default_threads() either way)."""
    import torch
    p = {**(QUICK if quick else FULL), **over}
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        return _measure(p, keep, threads)
    finally:
        torch.set_num_threads(before)


def _measure(p: dict, keep: str | None, threads: int | None) -> dict:
    from mlflow import MlflowClient

    from soups.store import registry
    from soups.average import default_threads
    from soups.tracking_server import free_port, start_server
    out: dict = {"params": p, "accumulation_threads": default_threads()}
    with scratch_dir(keep, "ich-bench-scale-") as folder:
        t0 = time.perf_counter()
        handle = start_server(folder / "server", port=free_port())
        out["server_start_s"] = time.perf_counter() - t0
        try:
            client = MlflowClient(handle.uri)
            tmp = folder / "tmp"
            tmp.mkdir(exist_ok=True)
            # 1. pulled from the registry, checkpoints the size of coatnet_0
            t0 = time.perf_counter()
            big = write_checkpoints(folder / "big", p["big_n"], p["big_model"], p["big_img"])
            eid = log_all(client, "bench-pull", big, p["big_n"], p["big_model"])
            out["big_setup_s"] = time.perf_counter() - t0
            records = registry.search_checkpoints(client, [eid])
            out["mb_per_big"] = os.path.getsize(big[0] / "model.safetensors") / 1e6
            shutil.rmtree(folder / "big", ignore_errors=True)  # the server holds its own copy
            out["pulled"] = time_pulled(client, records, tmp, p["repeats"], p["workers"], p["depth"])
            # 2. the scale curve, tiny CoAtNet checkpoints
            t0 = time.perf_counter()
            tiny = write_checkpoints(folder / "tiny", max(p["ns"]), p["tiny_model"], p["tiny_img"])
            out["mb_per_tiny"] = os.path.getsize(tiny[0] / "model.safetensors") / 1e6
            eids = {n: log_all(client, f"bench-scale-{n}", tiny[:n], 8 if n >= 8 else n, p["tiny_model"])
                    for n in p["ns"]}
            out["tiny_setup_s"] = time.perf_counter() - t0
            out["mlflow"] = {n: time_mlflow_side(client, eids[n], tmp, p["workers"], p["depth"]) for n in p["ns"]}
            out["local"] = time_local(tiny, p["ns"], p["local_repeats"], p["greedy_repeats"], p["tiny_model"],
                                      p["tiny_img"], p["eval_batch"])
            rss = {n: peak_rss(folder / "tiny", n, threads) for n in p["ns"]}
            growth = {n: max(r["peak_kb"] - r["before_kb"], 1) for n, r in rss.items()}
            out["rss"] = {"runs": rss, "growth_kb": growth,
                          "flat": max(growth.values()) / min(growth.values()),
                          "process_flat": max(r["peak_kb"] for r in rss.values()) /
                          min(r["peak_kb"] for r in rss.values())}
        finally:
            handle.stop()
    out["logits"] = logits_growth(p["logit_ns"])
    return out


def figures(r: dict) -> list[tuple[str, str, str]]:
    p = r["params"]
    rows = []
    u = r["pulled"]
    rows.append((f"uniform soup pulled from a real mlflow server / downloading the same N files alone, N={u['n']} "
                 f"{p['big_model']} ckpts ({r['mb_per_big']:.0f} MB; {p['workers']} download threads, "
                 f"{r['accumulation_threads']} accumulation threads)",
                 f"{u['ratio']:.2f} ({u['soup_s']:.1f} s / {u['download_s']:.1f} s)", f"<= {GOAL_PULLED_OVER_DOWNLOAD}"))
    ns = p["ns"]
    tag = f"N={'/'.join(str(n) for n in ns)} tiny CoAtNet ckpts ({r['mb_per_tiny']:.1f} MB)"
    loc = r["local"]
    for kind in ("uniform", "greedy"):
        cpu = {int(k): v for k, v in loc[f"{kind}_cpu_s_per_ingredient"].items()}
        wall = {int(k): v for k, v in loc[f"{kind}_s_per_ingredient"].items()}
        # CPU time (all threads of the process) is the cost; wall time on a shared machine mostly measures the
        # other processes, so it is shown beside it
        rows.append((f"{kind} soup CPU time per ingredient, max/min over {tag}"
                     + (", eval: fwd of a fixed batch" if kind == "greedy" else ""),
                     f"{loc[f'{kind}_cpu_flat']:.2f} ({' / '.join(f'{1000 * cpu[n]:.1f}' for n in ns)} ms CPU; "
                     f"wall {loc[f'{kind}_flat']:.2f}: {' / '.join(f'{1000 * wall[n]:.1f}' for n in ns)} ms)",
                     f"<= {GOAL_FLAT_TIME}"))
    rs = r["rss"]
    growth = {int(k): v for k, v in rs["growth_kb"].items()}
    runs = {int(k): v for k, v in rs["runs"].items()}
    rows.append((f"uniform soup peak RSS above imports, max/min over {tag} (fresh processes)",
                 f"{rs['flat']:.3f} ({' / '.join(f'{growth[n] / 1024:.1f}' for n in ns)} MB; whole process "
                 f"{' / '.join(str(round(runs[n]['peak_kb'] / 1024)) for n in ns)} MB = {rs['process_flat']:.3f})",
                 f"<= {GOAL_FLAT_RSS}"))
    ml = {int(k): v for k, v in r["mlflow"].items()}
    rows.append((f"MLflow search + download (sha256 verified) per checkpoint, {tag}",
                 " / ".join(f"{ml[n]['search_ms_per_ckpt']:.1f} + {ml[n]['download_ms_per_ckpt']:.0f} ms" for n in ns),
                 "info (flat in N)"))
    lg = r["logits"]
    held = {int(k): v for k, v in lg["held"].items()}
    big_n = max(held)
    rows.append((f"soft-voting logits kept per checkpoint (val+test, ICH-17: {ICH17_VAL}+{ICH17_TEST} images x "
                 f"{ICH17_CLASSES} classes, float32)", f"{lg['bytes_per_ckpt'] / 1e3:.1f} kB", "info"))
    rows.append((f"soft-voting logits held in memory, N={'/'.join(str(n) for n in held)} (limit "
                 f"{lg['limit'] / 1e6:.0f} MB, the rest spilled to disk)",
                 f"{lg['peak'] / 1e6:.1f} MB peak ({' / '.join(format(v['memory'] / 1e6, '.1f') for v in held.values())} MB;"
                 f" N={big_n}: {held[big_n]['disk'] / 1e6:.0f} MB on disk)",
                 f"<= {lg['limit'] / 1e6:.0f} MB"))
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes (smoke test)")
    ap.add_argument("--keep", help="work in this folder (not deleted)")
    ap.add_argument("--json", help="also write the result here")
    a = ap.parse_args(argv)
    r = measure(quick=a.quick, keep=a.keep)
    if a.json:
        Path(a.json).write_text(json.dumps(r, indent=2, default=str))
    print("figure | measured | goal")
    for row in figures(r):
        print(" | ".join(row))
    u = r["pulled"]
    print(f"(pulled N={u['n']}: soup runs {', '.join(f'{t:.1f}' for t in u['soup_runs'])} s; download runs "
          f"{', '.join(f'{t:.1f}' for t in u['download_runs'])} s; server start {r['server_start_s']:.0f} s, setup "
          f"{r['big_setup_s']:.0f} + {r['tiny_setup_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
