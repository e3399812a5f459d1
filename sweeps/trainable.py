"""One Ray Tune trial: the `ich` training loop wired to Tune and MLflow. Thin on purpose.

Per epoch: write the checkpoint (safetensors + metadata + optimizer state), log it to MLflow as a
LoggedModel of the trial's run, and only then report to Tune (ASHA may stop the trial at the report,
design decision 5). The upload runs in a background thread while the next epoch trains; the report
follows as soon as the upload is done, at the next optimizer step.
"""
from __future__ import annotations

import os
import shutil
import socket
import tempfile
import time
import multiprocessing
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

from mlflow import MlflowClient
from mlflow.entities import Param, RunTag
from ray import tune

from ich.checkpoint import CheckpointMeta, save_checkpoint
from ich.data import ICHDataset
from ich.train import TrainConfig, Trainer
from soups import registry

TAG_TRIAL_NAME = "ich.trial_name"
TAG_NODE = "ich.node"
TAG_NODE_ID = "ich.node_id"
TAG_PID = "ich.pid"  # the process running the trial now (changes when Tune retries it elsewhere)
CKPT_SUBDIR = "checkpoint"  # inside a Tune checkpoint: the folder that goes to MLflow


@dataclass
class SweepContext:
    """What every trial needs to know about its sweep (small; travels with the trainable)."""
    sweep: str
    experiment_id: str
    parent_run_id: str
    tracking_uri: str
    train: dict  # fixed TrainConfig fields
    fault_once_at_epoch: int = 0  # tests only: raise once when this epoch starts (retry path)
    fault_marker_dir: str = ""


@dataclass
class Init:
    """A shared initialization: weights in the object store plus their fingerprint."""
    state_dict: dict
    fingerprint: str
    source: str
    preprocess: dict | None = None  # the init's preprocessing fields (ich.preprocess.resolve); None: dataset defaults


def trial_run(client: MlflowClient, ctx: SweepContext, trial_id: str, trial_name: str, cfg: TrainConfig) -> str:
    """The trial's MLflow child run, created once; a retried or resumed trial finds it again by tag."""
    tags = {registry.TAG_KIND: "trial", registry.TAG_SWEEP: ctx.sweep, registry.TAG_TRIAL: trial_id}
    run = registry.find_run_by_tags(client, ctx.experiment_id, tags)
    node = {TAG_NODE: f"{socket.gethostname()}/{_node_ip()}", TAG_NODE_ID: _node_id(), TAG_PID: str(os.getpid())}
    if run is None:
        run = registry.call_with_retry(
            "create trial run", client.create_run, ctx.experiment_id, run_name=trial_name,
            tags={**tags, **node, "mlflow.parentRunId": ctx.parent_run_id, TAG_TRIAL_NAME: trial_name})
        params = [Param(k, str(v)) for k, v in asdict(cfg).items()]
        registry.call_with_retry("log trial params", client.log_batch, run.info.run_id, params=params)
    else:  # retried / resumed: running again, maybe on another node
        registry.call_with_retry("tag trial run", client.log_batch, run.info.run_id,
                                 tags=[RunTag(k, v) for k, v in node.items()])
        registry.call_with_retry("mark trial running", client.update_run, run.info.run_id, status="RUNNING")
    return run.info.run_id


def _node_ip() -> str:
    import ray
    return ray.util.get_node_ip_address()


def _node_id() -> str:
    import ray
    return ray.get_runtime_context().get_node_id()


def _maybe_fail(ctx: SweepContext, trial_id: str, epoch: int) -> None:
    """Fault injection for tests: fail once per trial when `epoch` starts, so Tune retries from a checkpoint."""
    if epoch == ctx.fault_once_at_epoch:
        marker = Path(ctx.fault_marker_dir) / f"failed-{trial_id}"
        if not marker.exists():
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.touch()
            raise RuntimeError(f"injected fault: trial {trial_id} at the start of epoch {epoch}")


def train_trial(config: dict, *, dataset: ICHDataset, inits: dict[str, Init], ctx: SweepContext) -> None:
    """The Tune function trainable."""
    tctx = tune.get_context()
    trial_id, trial_name = tctx.get_trial_id(), tctx.get_trial_name()
    cfg = TrainConfig.from_dict({**ctx.train, **config})
    init = inits[cfg.model]
    trainer = Trainer(cfg, dataset, init_state=init.state_dict, init_fingerprint=init.fingerprint,
                      init_preprocess=init.preprocess)

    if (resume := tune.get_checkpoint()) is not None:
        with resume.as_directory() as d:
            trainer.load_state(d, model_weights=Path(d) / CKPT_SUBDIR / "model.safetensors")

    client = MlflowClient(ctx.tracking_uri)
    run_id = trial_run(client, ctx, trial_id, trial_name, cfg)
    uploader = _uploader()
    pending: tuple[Future, Path, dict] | None = None
    overhead = {"report_s": 0.0, "write_s": 0.0}  # sweep-side cost per epoch, reported as metrics

    def report_pending(block: bool) -> None:
        """Report the last epoch to Tune once its checkpoint is in MLflow (never before)."""
        nonlocal pending
        if pending is None or not (block or pending[0].done()):
            return
        t0 = time.perf_counter()
        future, folder, metrics = pending
        pending = None
        model_id = future.result()  # an upload that failed for good fails the trial (Tune retries it)
        tune.report({**metrics, "mlflow_model_id": model_id, "mlflow_run_id": run_id,
                     "sweep_report_s": overhead["report_s"], "sweep_write_s": overhead["write_s"]},
                    checkpoint=tune.Checkpoint.from_directory(str(folder)))
        shutil.rmtree(folder, ignore_errors=True)
        overhead["report_s"] = time.perf_counter() - t0

    try:
        for result in trainer.fit(on_step=lambda: report_pending(False)):
            report_pending(True)  # reports stay in epoch order
            t0 = time.perf_counter()
            metrics = {k: float(v) for k, v in result.metrics.items()}
            folder = Path(tempfile.mkdtemp(prefix=f"ich-{trial_id}-e{result.epoch:03d}-"))
            meta = CheckpointMeta(architecture=cfg.model, img_size=cfg.img_size, num_classes=dataset.num_classes,
                                  class_names=dataset.classes, dataset_fingerprint=dataset.fingerprint,
                                  init_fingerprint=trainer.init_fingerprint, epoch=result.epoch, metrics=metrics,
                                  extra={"sweep": ctx.sweep, "trial": trial_id, "config": asdict(cfg)},
                                  preprocess=trainer.preprocess)
            sha = save_checkpoint(folder / CKPT_SUBDIR, result.weights(), meta)
            trainer.save_state(folder, with_model=False)
            future = uploader.submit(
                _log_checkpoint, ctx.tracking_uri, experiment_id=ctx.experiment_id, run_id=run_id,
                ckpt_dir=folder / CKPT_SUBDIR, sweep=ctx.sweep, trial=trial_id, epoch=result.epoch, sha256=sha,
                metrics=metrics, dataset_fingerprint=dataset.fingerprint,
                init_fingerprint=trainer.init_fingerprint, architecture=cfg.model)
            pending = (future, folder, metrics)
            overhead["write_s"] = time.perf_counter() - t0
            if ctx.fault_once_at_epoch == result.epoch + 1:
                report_pending(True)  # so the retry resumes from this epoch's checkpoint
                _maybe_fail(ctx, trial_id, result.epoch + 1)
        report_pending(True)
        registry.call_with_retry("finish trial run", client.set_terminated, run_id, "FINISHED")
    finally:
        if pending is not None:  # a failing trial still lets its last upload finish (it may be reported on retry)
            pending[0].exception()


_UPLOADER: ProcessPoolExecutor | None = None


def _uploader() -> ProcessPoolExecutor:
    """One upload process per worker, kept across the trials a reused actor runs. A process, not a thread:
    a thread's Python (HTTP, JSON) would hold the GIL against the training loop's."""
    global _UPLOADER
    if _UPLOADER is None or getattr(_UPLOADER, "_broken", False):
        _UPLOADER = ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"))
    return _UPLOADER


def _log_checkpoint(tracking_uri: str, **kwargs) -> str:
    """registry.log_checkpoint in the upload process (which builds its own client)."""
    return registry.log_checkpoint(MlflowClient(tracking_uri), **kwargs)

