"""One Ray Tune trial: the `ich` training loop wired to Tune and MLflow. Thin on purpose.

Per epoch: write the checkpoint (safetensors + metadata + optimizer state), log it to MLflow as a
LoggedModel of the trial's run, and only then report to Tune (ASHA may stop the trial at the report,
docs/design.md#5). The upload runs in a helper process (sweeps/uploader.py) while the next epoch trains;
the report follows as soon as the upload is done, at the next optimizer step.

Every (re)start of a trial logs where it began: the metric `resumed_from_epoch` (the epoch of the checkpoint
the trainer loaded, 0 from the shared init; step = how many starts came before), and every trial reports
`mlflow_retries`, the MLflow calls it had to try again.
"""
from __future__ import annotations

import atexit
import contextlib
import json
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag
from ray import tune

from ich.checkpoint import CheckpointError, CheckpointMeta, save_checkpoint
from ich.data import ICHDataset
from ich.train import TrainConfig, Trainer
from soups.store import provenance, registry, retry
from soups.store.lineage import run_inputs
from soups.store.tags import (KIND_TRIAL, TAG_KIND, TAG_NODE, TAG_NODE_ID, TAG_PID, TAG_SWEEP, TAG_TRIAL,
                              TAG_TRIAL_NAME)
from soups.worker_exit import quiet_sigterm_exit
from sweeps.soup_objective import TrajectorySoup
from sweeps.uploader import Upload, UploadProcess

CKPT_SUBDIR = "checkpoint"  # inside a Tune checkpoint: the folder that goes to MLflow
METRIC_RESUMED_FROM = "resumed_from_epoch"  # per (re)start of a trial: the epoch its trainer resumed from
METRIC_RETRIES = "mlflow_retries"  # per (re)start: MLflow calls that failed transiently and were tried again
FAULT_POINTS = ("epoch_start", "before_report", "mid_epoch")


@dataclass
class Fault:
    """Test hook: fail once per trial at one point of one epoch, by raising or by SIGKILL of the trial process.

        epoch_start    when epoch N starts, right after epoch N-1 was reported to Tune
        before_report  when epoch N's checkpoint is READY in MLflow and not yet reported to Tune
        mid_epoch      at the first optimizer step of epoch N, once epoch N-1 is reported (waiting for its upload)
    """
    point: str
    epoch: int
    action: str = "raise"  # "raise" | "kill" | "fail": one trial of the sweep raises at every attempt (fails for good)


def faults_from_env(environ=os.environ) -> list[Fault]:
    """ICH_FAULTS="before_report:2,mid_epoch:3:kill" (and the older ICH_FAULT_ONCE_AT_EPOCH=N, an epoch_start)."""
    faults = []
    if int(environ.get("ICH_FAULT_ONCE_AT_EPOCH", "0") or 0):
        faults.append(Fault("epoch_start", int(environ["ICH_FAULT_ONCE_AT_EPOCH"])))
    for spec in filter(None, (s.strip() for s in environ.get("ICH_FAULTS", "").split(","))):
        point, epoch, action = (spec.split(":") + ["raise"])[:3]
        if point not in FAULT_POINTS or action not in ("raise", "kill", "fail") or not epoch.isdigit():
            raise ValueError(f"ICH_FAULTS: {spec!r} is not POINT:EPOCH[:raise|kill|fail] with POINT in {FAULT_POINTS}")
        faults.append(Fault(point, int(epoch), action))
    return faults


@dataclass
class SweepContext:
    """What every trial needs to know about its sweep (small; travels with the trainable)."""
    sweep: str
    experiment_id: str
    parent_run_id: str
    tracking_uri: str
    train: dict  # fixed TrainConfig fields
    faults: list[Fault] = field(default_factory=list)  # tests only (faults_from_env)
    fault_marker_dir: str = ""  # where a fired fault leaves its marker, so it fires once per trial
    objective: str = "single"  # trajectory_soup: also evaluate and report the trial's running soup (soup_objective.py)
    system_metrics_s: float = 0.0  # MLflow system metrics on the trial run, every this many seconds; 0: off
    data: str = ""  # the ingested dataset folder (the source of the trial run's dataset inputs)
    signing_key: str = ""  # the driver's signing key file (a path, never the key); a node without it uses its own


@dataclass
class Init:
    """A shared initialization: weights in the object store plus their fingerprint."""
    state_dict: dict
    fingerprint: str
    source: str
    preprocess: dict | None = None  # the init's preprocessing fields (ich.preprocess.resolve); None: dataset defaults
    model_id: str | None = None  # its LoggedModel (kind init) where MLflow holds it: every trial's input model


def trial_run(client: MlflowClient, ctx: SweepContext, trial_id: str, trial_name: str, cfg: TrainConfig,
              dataset: ICHDataset | None = None, init_model_id: str | None = None) -> str:
    """The trial's MLflow child run, created once; a retried or resumed trial finds it again by tag. A new run
    records its lineage: the dataset's train/val/test splits and the shared init as its input model."""
    tags = {TAG_KIND: KIND_TRIAL, TAG_SWEEP: ctx.sweep, TAG_TRIAL: trial_id}
    run = registry.find_run_by_tags(client, ctx.experiment_id, tags)
    node = {TAG_NODE: f"{socket.gethostname()}/{_node_ip()}", TAG_NODE_ID: _node_id(), TAG_PID: str(os.getpid())}
    if run is None:
        run = retry.call_with_retry(
            "create trial run", client.create_run, ctx.experiment_id, run_name=trial_name,
            tags={**tags, **node, "mlflow.parentRunId": ctx.parent_run_id, TAG_TRIAL_NAME: trial_name,
                  **provenance.run_tags("sweeps/trainable.py")})
        params = [Param(k, str(v)) for k, v in asdict(cfg).items()]
        retry.call_with_retry("log trial params", client.log_batch, run.info.run_id, params=params)
        if dataset is not None:
            retry.call_with_retry("log trial inputs", client.log_inputs, run.info.run_id, **run_inputs(
                dataset.fingerprint, ("train", "val", "test"), source=ctx.data, model_ids=[init_model_id],
                classes=dataset.classes, sizes={k: len(v) for k, v in dataset.splits.items()}))
    else:  # retried / resumed: running again, maybe on another node (and code)
        retry.call_with_retry("tag trial run", client.log_batch, run.info.run_id, tags=[
            RunTag(k, v) for k, v in {**node, **provenance.run_tags("sweeps/trainable.py")}.items()])
        retry.call_with_retry("mark trial running", client.update_run, run.info.run_id, status="RUNNING")
    return run.info.run_id


def _node_ip() -> str:
    import ray
    return ray.util.get_node_ip_address()


def _node_id() -> str:
    import ray
    return ray.get_runtime_context().get_node_id()


def _maybe_fail(ctx: SweepContext, trial_id: str, point: str, epoch: int, **note) -> None:
    """Fire the fault configured for (point, epoch), once per trial: its marker file `<point>-<trial>` records
    the process and what the test needs to check (e.g. the model id READY in MLflow when it fired)."""
    for fault in ctx.faults:
        if fault.action == "fail" and (fault.point, fault.epoch) == (point, epoch):
            # The first trial here claims the fault (O_EXCL: exactly one); it raises again on every retry.
            claim = Path(ctx.fault_marker_dir) / f"{point}-failing-trial"
            claim.parent.mkdir(parents=True, exist_ok=True)
            with contextlib.suppress(FileExistsError), open(claim, "x") as f:
                f.write(trial_id)
            if claim.read_text() == trial_id:
                raise RuntimeError(f"injected fault: trial {trial_id} fails at {point} of epoch {epoch}, every attempt")
            continue
        marker = Path(ctx.fault_marker_dir) / f"{point}-{trial_id}"
        if (fault.point, fault.epoch) != (point, epoch) or marker.exists():
            continue
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(json.dumps({"pid": os.getpid(), "epoch": epoch, **note}))
        if fault.action == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        raise RuntimeError(f"injected fault: trial {trial_id}, {point} of epoch {epoch}")


def record_start(client: MlflowClient, run_id: str, epoch: int) -> int:
    """Log where this (re)start of the trial begins: `resumed_from_epoch` = the epoch the trainer holds now (its
    loaded checkpoint's, 0 from the shared init) at step = the number of earlier starts. Returns that step."""
    starts = len(retry.call_with_retry("read trial starts", client.get_metric_history, run_id, METRIC_RESUMED_FROM))
    row = Metric(METRIC_RESUMED_FROM, float(epoch), int(time.time() * 1000), starts)  # one row, however often retried
    retry.call_with_retry("record trial start", client.log_batch, run_id, metrics=[row])
    return starts


# The last trial's objects on this worker, freed when the next trial starts here or by the process's own exit.
# When Tune stops a trial, tune.report raises SystemExit in the trial's thread and Tune ends the actor without
# waiting for that thread (FunctionTrainable.cleanup: timeout=0); a tensor freed by that thread while the
# interpreter finalizes aborts the worker (SIGABRT in torch's dealloc retaking the GIL: a CI run's demo sweep
# printed its stack). Kept alive here, the trial's tensors are never freed by that thread.
_LAST_TRIAL: dict = {}


def train_trial(config: dict, *, dataset: ICHDataset, inits: dict[str, Init], ctx: SweepContext) -> None:
    """The Tune function trainable."""
    _LAST_TRIAL.clear()  # the previous trial's tensors, freed here in an ordinary thread
    quiet_sigterm_exit()
    tctx = tune.get_context()
    trial_id, trial_name = tctx.get_trial_id(), tctx.get_trial_name()
    cfg = TrainConfig.from_dict({**ctx.train, **config})
    init = inits[cfg.model]
    trainer = Trainer(cfg, dataset, init_state=init.state_dict, init_fingerprint=init.fingerprint,
                      init_preprocess=init.preprocess)

    soup = TrajectorySoup(trainer) if ctx.objective == "trajectory_soup" else None
    if (resume := tune.get_checkpoint()) is not None:
        with resume.as_directory() as d:
            trainer.load_state(d, model_weights=Path(d) / CKPT_SUBDIR / "model.safetensors")
            if soup is not None and not soup.load(d) and trainer.epoch:
                raise CheckpointError(f"{d}: resumed at epoch {trainer.epoch} without the trial's running soup")

    client = MlflowClient(ctx.tracking_uri)
    uploader = _uploader()
    retries_at_start = retry.retry_count() + uploader.retries
    run_id = trial_run(client, ctx, trial_id, trial_name, cfg, dataset, init.model_id)
    start = record_start(client, run_id, trainer.epoch)
    monitor = system_monitor(run_id, ctx)
    pending: tuple[Upload, Path, dict, dict] | None = None
    overhead = {"report_s": 0.0, "write_s": 0.0}  # sweep-side cost per epoch, reported as metrics

    def retries() -> int:
        return retry.retry_count() + uploader.retries - retries_at_start

    def report_pending(block: bool) -> None:
        """Report the last epoch to Tune once its checkpoint is in MLflow (never before)."""
        nonlocal pending
        if pending is None or not (block or pending[0].done()):
            return
        t0 = time.perf_counter()
        upload, folder, metrics, soup_metrics = pending
        pending = None
        try:
            model_id = upload.result()  # an upload that failed for good fails the trial (Tune retries it)
            _maybe_fail(ctx, trial_id, "before_report", int(metrics["epoch"]), model_id=model_id)
            tune.report({**metrics, **soup_metrics, "mlflow_model_id": model_id, "mlflow_run_id": run_id,
                         METRIC_RETRIES: retries(), "sweep_report_s": overhead["report_s"],
                         "sweep_write_s": overhead["write_s"]},
                        checkpoint=tune.Checkpoint.from_directory(str(folder)))
        finally:
            # Also when the report ends the trial: once Tune has stored the checkpoint, a trial that is stopped
            # (ASHA, or the last epoch) leaves tune.report by SystemExit. A retry starts from Tune's copy.
            _remove_folder(folder)
        overhead["report_s"] = time.perf_counter() - t0

    def on_step() -> None:
        if ctx.faults and any((f.point, f.epoch) == ("mid_epoch", trainer.epoch + 1) for f in ctx.faults):
            report_pending(True)  # the fault's point: the last epoch reported, the next one under way
            _maybe_fail(ctx, trial_id, "mid_epoch", trainer.epoch + 1)
        report_pending(False)

    try:
        for result in trainer.fit(on_step=on_step):
            report_pending(True)  # reports stay in epoch order
            t0 = time.perf_counter()
            metrics = {k: float(v) for k, v in result.metrics.items()}
            folder = _new_folder(f"ich-{trial_id}-e{result.epoch:03d}-")
            meta = CheckpointMeta.for_training(cfg, dataset, init_fingerprint=trainer.init_fingerprint,
                                               epoch=result.epoch, metrics=metrics, preprocess=trainer.preprocess,
                                               extra={"sweep": ctx.sweep, "trial": trial_id, "config": asdict(cfg)})
            weights = result.weights()
            save_checkpoint(folder / CKPT_SUBDIR, weights, meta)
            trainer.save_state(folder, with_model=False)
            # log_checkpoint reads what identifies the checkpoint from its checkpoint.json
            upload = uploader.submit(ctx.tracking_uri, run=[ctx.experiment_id, run_id], folder=folder / CKPT_SUBDIR,
                                     signing_key=signing_key(ctx))
            soup_metrics = {}
            if soup is not None:  # the running soup, evaluated while the upload runs; a trial metric, not the checkpoint's
                soup.add(weights, result.epoch)
                soup_metrics = soup.evaluate()
                soup.save(folder)
                rows = [Metric(k, v, int(time.time() * 1000), result.epoch) for k, v in soup_metrics.items()]
                retry.call_with_retry("log trajectory soup", client.log_batch, run_id, metrics=rows)
            pending = (upload, folder, metrics, soup_metrics)
            overhead["write_s"] = time.perf_counter() - t0
            if any((f.point, f.epoch) == ("epoch_start", result.epoch + 1) for f in ctx.faults):
                report_pending(True)  # so the retry resumes from this epoch's checkpoint
                _maybe_fail(ctx, trial_id, "epoch_start", result.epoch + 1)
        report_pending(True)
        retry.call_with_retry("finish trial run", client.set_terminated, run_id, "FINISHED")
    finally:
        _LAST_TRIAL.update(locals())  # first: whatever ends this trial, its tensors outlive this thread (above)
        if monitor is not None:  # its last samples flushed while the run is still there to take them
            monitor.finish()
        if pending is not None:  # a failing trial still lets its last upload finish (it may be reported on retry)
            pending[0].wait()
            _remove_folder(pending[1])
        # Also (above all) when this start failed: an outage that outlasted the retries shows here.
        row = Metric(METRIC_RETRIES, float(retries()), int(time.time() * 1000), start)
        try:
            retry.call_with_retry("log trial retries", client.log_batch, run_id, metrics=[row])
        except retry.RegistryError as e:  # never hide why the trial failed
            print(f"trial {trial_id}: {e}", file=sys.stderr, flush=True)


def system_metrics_missing() -> str | None:
    """Why MLflow's system metrics cannot be sampled here (psutil missing), else None."""
    import importlib.util
    if importlib.util.find_spec("psutil") is None:
        return "system_metrics needs psutil (and nvidia-ml-py for GPUs): pip install 'ich-soups[system]'"
    return None


def system_metrics_interval(cfg) -> float:
    """The sweep config's system_metrics interval for the trials; 0 with one line on the driver when psutil is
    missing (the sweep runs on without them: a monitor is not worth failing a scheduled run for)."""
    interval = float(cfg.system_metrics or 0)
    if interval < 0:
        from ich.errors import ConfigError
        raise ConfigError(f"system_metrics: {cfg.system_metrics!r} seconds; give an interval > 0, or 0 for off")
    if interval and (why := system_metrics_missing()):
        print(f"sweep: {why}; trials run without system metrics", file=sys.stderr, flush=True)
        return 0.0
    return interval


def system_monitor(run_id: str, ctx: SweepContext):
    """MLflow's system-metrics monitor on the trial's run (system/cpu_utilization_percentage, memory, disk,
    network, and gpu_* where nvidia-ml-py sees a GPU), sampled every ctx.system_metrics_s seconds; a retried
    trial continues the steps where the last start stopped. None when off or when psutil is missing (the driver
    said so once)."""
    if not ctx.system_metrics_s or system_metrics_missing():
        return None
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor
    monitor = SystemMetricsMonitor(run_id, sampling_interval=ctx.system_metrics_s, samples_before_logging=1,
                                   resume_logging=True, tracking_uri=ctx.tracking_uri)
    monitor.start()
    return monitor


# Checkpoint folders of this process not yet removed. Every path out of train_trial removes its own; the exit
# handler catches what a trial thread left when the process ended under it (Ray's SIGTERM runs atexit).
_FOLDERS: set[Path] = set()


def _new_folder(prefix: str) -> Path:
    folder = Path(tempfile.mkdtemp(prefix=prefix))
    _FOLDERS.add(folder)
    return folder


def _remove_folder(folder: Path) -> None:
    shutil.rmtree(folder, ignore_errors=True)
    _FOLDERS.discard(folder)


@atexit.register
def _remove_folders_at_exit() -> None:
    for folder in list(_FOLDERS):
        _remove_folder(folder)


def signing_key(ctx: SweepContext) -> str:
    """The key file that signs this trial's checkpoints: the driver's where this node has that file (one machine,
    or a cluster whose nodes keep it at the same path), else the node's own ($ICH_SIGNING_KEY or
    $ICH_HOME/keys/signing_key, shipped by cluster.yaml). A trial never makes a key: a missing one fails the upload
    in one line."""
    if ctx.signing_key and Path(ctx.signing_key).is_file():
        return ctx.signing_key
    from soups.store.signing import key_path
    return str(key_path())


_UPLOADER: UploadProcess | None = None


def _uploader() -> UploadProcess:
    """One upload process per worker, kept across the trials a reused actor runs. A process, not a thread:
    a thread's Python (HTTP, JSON) would hold the GIL against the training loop's."""
    global _UPLOADER
    if _UPLOADER is None or not _UPLOADER.alive():
        _UPLOADER = UploadProcess()
    return _UPLOADER

