"""A tiny sweep logged to a real MLflow server the way the trainable logs one (registry.log_checkpoint of a folder
whose checkpoint.json names sweep, trial, epoch, fingerprints and val metrics), without training: checkpoints are
planted near a given init. Shared by tests/test_read_once.py and tests/test_model_stock.py."""
from __future__ import annotations

from pathlib import Path

import torch

from ich.checkpoint import CheckpointMeta, save_checkpoint
from soups.store import registry, tags

ARCH = "coatnet_tiny_ich"
IMG_SIZE = 32


def meta_of(data, experiment: str, init_fingerprint: str, epoch: int, metrics: dict, **extra) -> CheckpointMeta:
    return CheckpointMeta(ARCH, IMG_SIZE, data.num_classes, data.classes, data.fingerprint, init_fingerprint, epoch,
                          metrics, extra={"sweep": experiment, **extra})


def log_sweep(client, experiment: str, dataset_folder: Path, data, folder: Path, base: dict,
              scores: dict[str, list[float]], init_fingerprint: str, scale: float,
              seed: int = 1) -> tuple[object, dict[str, tuple[str, dict]]]:
    """A sweep run (ich.data = dataset_folder), then per trial a child run with one checkpoint per epoch: base plus
    scale x seeded noise, val_macro_f1 = val_accuracy = the score given. Returns the sweep run and
    {sha256: (model id, state dict)}."""
    eid = registry.get_or_create_experiment(client, experiment)
    sweep_run = client.create_run(eid, run_name=experiment, tags={
        tags.TAG_KIND: tags.KIND_SWEEP, tags.TAG_SWEEP: experiment, tags.TAG_DATA: str(dataset_folder)})
    gen = torch.Generator().manual_seed(seed)
    logged = {}
    for trial, trial_scores in scores.items():
        run = client.create_run(eid, run_name=trial, tags={
            tags.TAG_KIND: tags.KIND_TRIAL, tags.TAG_SWEEP: experiment, tags.TAG_TRIAL: trial,
            "mlflow.parentRunId": sweep_run.info.run_id})
        for epoch, score in enumerate(trial_scores, start=1):
            sd = {k: v + scale * torch.randn(v.shape, generator=gen) if v.is_floating_point() else v.clone()
                  for k, v in base.items()}
            meta = meta_of(data, experiment, init_fingerprint, epoch, {"val_macro_f1": score, "val_accuracy": score},
                           trial=trial)
            sha = save_checkpoint(folder / f"{trial}-{epoch}", sd, meta)
            logged[sha] = (registry.log_checkpoint(client, run, folder / f"{trial}-{epoch}"), sd)
    return sweep_run, logged
