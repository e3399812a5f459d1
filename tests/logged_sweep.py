"""A sweep logged to a real MLflow server the way the trainable logs one (registry.log_checkpoint of a folder whose
checkpoint.json names sweep, trial, epoch, fingerprints and val metrics), without training: `log_sweep` plants
checkpoints near a given init (tests/test_read_once.py, tests/test_model_stock.py); `copy_sweep` logs the session
tiny sweep's checkpoints again under an experiment of a test's own (the report, recipe and parallel-soup tests)."""
from __future__ import annotations

from dataclasses import dataclass, field
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


@dataclass
class CopiedSweep:
    experiment_id: str
    sweep_run_id: str
    runs: dict[str, str] = field(default_factory=dict)  # trial -> run id
    records: list = field(default_factory=list)  # the source's records that were copied

    def finish(self, client, status: dict[str, str] | None = None) -> None:
        """End the trial runs (status: trial -> Tune's status, else FINISHED), then the sweep run."""
        for trial, run_id in self.runs.items():
            client.set_terminated(run_id, (status or {}).get(trial, "FINISHED"))
        client.set_terminated(self.sweep_run_id, "FINISHED")


def _copied_folder(client, record, tmp: Path, sweep: str | None, val_metrics: bool = True) -> Path:
    """A record downloaded for logging again (same weights and sha256); with `sweep`, its checkpoint.json names that
    sweep and (val_metrics) carries the record's val metrics."""
    from ich.checkpoint import META, read_meta
    folder = registry.download_checkpoint(client, record, tmp)
    if sweep is not None:
        meta = read_meta(folder)
        meta.extra.update(sweep=sweep)
        if val_metrics:
            meta.metrics = {k: v for k, v in record.metrics.items() if k.startswith("val_")}
        (folder / META).write_text(meta.to_json(), encoding="utf-8")
    return folder


def copy_sweep(client, source: dict, experiment: str, tmp: Path, *, keep=None, rename: bool = True,
               init: bool = False) -> CopiedSweep:
    """The checkpoints of `source` (the tiny_sweep fixture's summary) that `keep(record)` accepts (all when None),
    logged again under `experiment` as a sweep logs them: a sweep run naming the data, a child run per trial.
    rename: the copies belong to a sweep named `experiment` (else they keep the source's sweep name); init: the
    source's init is logged too (the anchor of model_stock and wise_ft). The runs stay open: CopiedSweep.finish."""
    records = [r for r in registry.search_checkpoints(client, [source["experiment_id"]], sweep=source["experiment"])
               if keep is None or keep(r)]
    sweep = experiment if rename else source["experiment"]
    experiment_id = registry.get_or_create_experiment(client, experiment)
    sweep_run = client.create_run(experiment_id, run_name=experiment, tags={
        tags.TAG_KIND: tags.KIND_SWEEP, tags.TAG_SWEEP: sweep, tags.TAG_DATA: str(source["data"])})
    copied = CopiedSweep(experiment_id, sweep_run.info.run_id, records=records)
    if init:
        (fingerprint,) = {r.init_fingerprint for r in records}
        (anchor, *_) = registry.search_init_by_fingerprint(client, [source["experiment_id"]], fingerprint)
        registry.log_init_model(client, sweep_run, _copied_folder(client, anchor, tmp / "init",
                                                                  sweep if rename else None, val_metrics=False))
    for r in records:
        if r.trial not in copied.runs:
            copied.runs[r.trial] = client.create_run(experiment_id, run_name=r.trial, tags={
                tags.TAG_KIND: tags.KIND_TRIAL, tags.TAG_SWEEP: sweep, tags.TAG_TRIAL: r.trial,
                "mlflow.parentRunId": sweep_run.info.run_id}).info.run_id
        folder = _copied_folder(client, r, tmp / r.trial, sweep if rename else None)
        registry.log_checkpoint(client, (experiment_id, copied.runs[r.trial]), folder)
    return copied
