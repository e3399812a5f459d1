"""What the sweep costs a trial: throughput as a Ray Tune trial logging every checkpoint to MLflow, over the
bare loop, measured side by side in one run; and the cost of logging one checkpoint.

    python bench/sweep_overhead.py [--epochs 8]

Both sides train the same tiny CoAtNet recipe on the digits with one torch thread (a trial with
cpus_per_trial=1 gets OMP_NUM_THREADS=1). Epoch time is wall time per epoch, training + val evaluation:
bare = Trainer.fit in this process; sweep = Tune's `time_this_iter_s` (time between two reports of the
trial, so it includes writing the checkpoint, the MLflow upload and the report). Medians skip epoch 1.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

GOAL_RATIO = 0.95


def bare_epoch_times(data, cfg) -> list[float]:
    import torch
    from ich.train import Trainer
    torch.set_num_threads(1)
    trainer = Trainer(cfg, data)
    times, t0 = [], time.perf_counter()
    for _ in trainer.fit():
        t1 = time.perf_counter()
        times.append(t1 - t0)
        t0 = t1
    return times


def sweep_epoch_times(data, cfg, uri: str, home: Path) -> list[float]:
    from mlflow import MlflowClient
    from ray import tune
    from soups.store import registry
    from sweeps.trainable import Init, SweepContext, train_trial

    client = MlflowClient(uri)
    exp = registry.get_or_create_experiment(client, "bench-sweep")
    parent = client.create_run(exp, run_name="bench", tags={"ich.kind": "sweep", "ich.sweep": "bench-sweep"})
    from ich.train import Trainer
    start = Trainer(cfg, data)  # the shared seeded random init every trial would get
    inits = {cfg.model: Init(start.weights(), start.init_fingerprint, "random")}
    from dataclasses import asdict
    from soups.store.signing import own_key
    key = home / "keys" / "signing_key"  # the bench's own key: trials sign their checkpoints as a sweep's do
    own_key(key)
    ctx = SweepContext(sweep="bench-sweep", experiment_id=exp, parent_run_id=parent.info.run_id, tracking_uri=uri,
                       train=asdict(cfg), signing_key=str(key))
    trainable = tune.with_resources(tune.with_parameters(train_trial, dataset=data, inits=inits, ctx=ctx), {"cpu": 1})
    tuner = tune.Tuner(trainable, param_space={}, tune_config=tune.TuneConfig(num_samples=1),
                       run_config=tune.RunConfig(name="bench", storage_path=str(home / "ray"), verbose=0))
    result = tuner.fit()[0]
    df = result.metrics_dataframe
    print(df[["time_this_iter_s", "epoch_time_s", "eval_time_s", "sweep_report_s", "sweep_write_s"]].to_string())
    return list(df["time_this_iter_s"])


def log_cost(uri: str, data, cfg, n: int = 10) -> float:
    """Median seconds for one registry.log_checkpoint of a tiny-CoAtNet checkpoint."""
    from mlflow import MlflowClient
    from ich.checkpoint import CheckpointMeta, save_checkpoint
    from ich.train import Trainer
    from soups.store import registry
    client = MlflowClient(uri)
    exp = registry.get_or_create_experiment(client, "bench-log")
    run = client.create_run(exp)
    sd = Trainer(cfg, data).weights()
    times = []
    with tempfile.TemporaryDirectory() as tmp:
        for epoch in range(1, n + 1):
            meta = CheckpointMeta.for_training(cfg, data, init_fingerprint="x", epoch=epoch,
                                               metrics={"val_accuracy": 0.5, "val_macro_f1": 0.5, "val_loss": 1.0},
                                               extra={"sweep": "bench", "trial": "t0"})
            save_checkpoint(Path(tmp) / f"e{epoch}", sd, meta)
            t0 = time.perf_counter()
            registry.log_checkpoint(client, run, Path(tmp) / f"e{epoch}")
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure(epochs: int = 8) -> dict:
    import ray
    from bench.bare_loop import digits_dataset, standard_config
    from ich.data import load_dataset
    from soups.tracking_server import start_server
    with digits_dataset() as ds, tempfile.TemporaryDirectory(prefix="ich-bench-sweep-") as tmp:
        data = load_dataset(ds)
        cfg = standard_config(epochs=epochs)
        server = start_server(Path(tmp) / "mlflow")
        try:
            ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
            sweep = sweep_epoch_times(data, cfg, server.uri, Path(tmp))
            bare = bare_epoch_times(data, cfg)
            cost = log_cost(server.uri, data, cfg)
        finally:
            ray.shutdown()
            server.stop()
    bare_med, sweep_med = statistics.median(bare[1:]), statistics.median(sweep[1:])
    return {"bare_epoch_s": bare_med, "sweep_epoch_s": sweep_med, "ratio": bare_med / sweep_med,
            "log_checkpoint_s": cost, "log_over_epoch": cost / bare_med}


def figures(r: dict) -> list[tuple[str, str, str]]:
    return [("trial throughput under sweep (Tune + MLflow every epoch) / bare loop", f"{r['ratio']:.3f}",
             f">= {GOAL_RATIO}"),
            ("MLflow cost of one checkpoint / one tiny-CoAtNet epoch",
             f"{r['log_checkpoint_s'] * 1000:.0f} ms / {r['bare_epoch_s'] * 1000:.0f} ms = {r['log_over_epoch']:.1%}",
             "info (overlapped with training)")]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=8)
    r = measure(p.parse_args(argv).epochs)
    print(f"bare epoch {r['bare_epoch_s']:.3f} s, sweep epoch {r['sweep_epoch_s']:.3f} s")
    for row in figures(r):
        print(" | ".join(row))


if __name__ == "__main__":
    main()
