"""The shared initialization of a sweep (docs/design.md#2): every trial starts from the same weights.

Sources, per model architecture of the sweep:
  - `init.weights`: a local .safetensors file / checkpoint folder, or an MLflow model URI;
  - `hub:<timm tag>` (or timm's spelling `hf-hub:timm/<tag>`): timm's pretrained weights, downloaded only because
    the user asked;
  - nothing given (offline default): a warm-start base model trained once on the train split to convergence
    (cosine to zero), recorded in MLflow as a LoggedModel (ich.kind=init) and reused by every trial, by a
    resumed sweep and by later scheduled runs of the same sweep.
The init source also decides the evaluation preprocessing (docs/design.md#9, ich/preprocess.py): a hub tag's
timm pretrained config, a checkpoint folder's metadata, a JSON sidecar beside a local file; else the dataset's
defaults. `init.preprocess` in the sweep config overrides any of mean / std / crop_pct / interpolation.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
from pathlib import Path

import ray
import torch
from mlflow import MlflowClient

from ich.checkpoint import CheckpointMeta, save_checkpoint
from ich.data import ICHDataset
from ich.errors import ConfigError
from ich.models import (MLFLOW_URI_PREFIXES, ModelError, create_model, hub_tag, load_init_weights,
                        resolve_init_weights)
from ich.init_source import hub_preprocess, init_preprocess
from ich.preprocess import DATASET_DEFAULT, PreprocessError, resolve
from ich.train import TrainConfig, Trainer
from soups.store import registry
from soups.store.tags import TAG_SIGNATURE
from sweeps.config import SweepConfig
from sweeps.trainable import Init



def resolve_init_source(source: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """Every init source but `hub:` -> a local safetensors file: an MLflow model is downloaded (here, not in ich/,
    which knows no MLflow) and its signature verified against the trusted keys (docs/design.md#14: the sweep logs
    these weights as its own signed init, so an unsigned or altered model must not become one), then the local path
    is checked by ich.models.resolve_init_weights. runs:/ and mlflow-artifacts:/ URIs name files no signature
    covers: refused in one line."""
    if source.startswith(MLFLOW_URI_PREFIXES):
        if not source.startswith(("models:/", "m-")):
            raise ModelError(f"init weights {source}: an init from MLflow is a LoggedModel (models:/NAME@ALIAS, "
                             "models:/NAME/VERSION, models:/m-ID or m-ID) whose signature is checked; a "
                             f"{source.split(':', 1)[0]}: URI names files no signature covers (download the file and "
                             "name its path)")
        import mlflow.artifacts

        from soups.store import signing
        from soups.serve.verify import UntrustedModel, resolve_model
        uri = f"models:/{source}" if source.startswith("m-") else source
        label = f"init weights {source}"
        try:
            model = resolve_model(uri)  # the LoggedModel's id and tags; its artifact location checked
            folder = mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{model.model_id}", dst_path=cache_dir)
            signing.verify(model.model_id, model.recorded or {}, folder, label=label)
        except (UntrustedModel, signing.SignatureError, signing.SigningKeyError) as e:
            raise ModelError(f"{label}: {e}" if not str(e).startswith(label) else str(e)) from None
        except Exception as e:  # MLflow raises several types; all mean the same to the user
            raise ModelError(f"{label}: cannot download from MLflow ({str(e).splitlines()[0]})") from None
        source = folder
    return resolve_init_weights(source)

def _source_for(cfg: SweepConfig, model: str) -> str | None:
    w = cfg.init.weights
    if isinstance(w, dict):
        return w.get(model)
    return w


def _with_overrides(pre: dict | None, cfg: SweepConfig) -> dict | None:
    """The init's preprocessing fields with the sweep's `init.preprocess` on top."""
    overrides = cfg.init.preprocess or {}
    if not overrides:
        return pre
    return {**(pre or {}), **overrides, "source": f"{(pre or {}).get('source', DATASET_DEFAULT)} + init.preprocess"}


def describe_preprocess(pre: dict | None, tc: TrainConfig) -> str:
    """One line for the sweep's output: what evaluation (and serving) will do to an image."""
    p = pre or {}
    mean = ", ".join(f"{v:g}" for v in p.get("mean", (0.485, 0.456, 0.406)))
    std = ", ".join(f"{v:g}" for v in p.get("std", (0.229, 0.224, 0.225)))
    return (f"mean ({mean}), std ({std}), crop {p.get('crop_pct', tc.eval_crop_pct):g}, "
            f"{p.get('interpolation', 'bilinear')} [{p.get('source', DATASET_DEFAULT)}]")


def _warm_start_config(cfg: SweepConfig, model: str) -> TrainConfig:
    fields = {**cfg.train, "model": model, **(cfg.init.warm_start or {})}
    return TrainConfig.from_dict(fields)


def _recipe_key(tc: TrainConfig) -> str:
    """Identifies a warm start: the same recipe on the same data is the same init."""
    return hashlib.sha256(json.dumps(dataclasses.asdict(tc), sort_keys=True).encode()).hexdigest()[:16]


@ray.remote(max_retries=1)
def _train_warm_start(tc: TrainConfig, dataset: ICHDataset, preprocess: dict | None = None,
                      verbose: bool = True) -> tuple[dict, dict, dict]:
    trainer = Trainer(tc, dataset, init_preprocess=preprocess)
    metrics = {}
    for result in trainer.fit():
        metrics = result.metrics
        if verbose:  # a line per epoch behind the sweep's --verbose (the final metrics go with the model)
            print(f"warm start {tc.model} epoch {result.epoch}/{tc.epochs}: val_accuracy {metrics['val_accuracy']:.4f}",
                  flush=True)
    return trainer.weights(), {k: float(v) for k, v in metrics.items()}, trainer.preprocess.to_dict()


def shared_inits(cfg: SweepConfig, models: list[str], dataset: ICHDataset, client: MlflowClient,
                 experiment_id: str, parent_run_id: str, sweep: str, resources: dict,
                 verbose: bool = True) -> dict[str, Init]:
    inits, to_train = {}, {}
    for model in models:
        source = _source_for(cfg, model)
        if source:
            inits[model] = given_init(cfg, model, source, dataset)
        elif (found := reuse_warm_start(cfg, model, dataset, client, experiment_id, sweep)) is not None:
            inits[model] = found
        else:
            to_train[model] = _warm_start_config(cfg, model)
    # Warm starts the sweep still lacks train at the same time, as Ray tasks with a trial's resources.
    task = _train_warm_start.options(num_cpus=resources.get("cpu", 1), num_gpus=resources.get("gpu", 0))
    futures = {}
    for model, tc in to_train.items():
        print(f"training the warm-start base model for {model} ({tc.epochs} epochs, lr {tc.lr}, {tc.schedule})",
              flush=True)
        futures[model] = task.remote(tc, dataset, _with_overrides(None, cfg), verbose)
    for model, future in futures.items():
        sd, metrics, pre = ray.get(future)
        inits[model] = record_warm_start(to_train[model], sd, metrics, dataset, client, experiment_id,
                                         parent_run_id, sweep, preprocess=pre)
    for model in models:
        init = inits[model]
        if init.preprocess is None:
            init.preprocess = _with_overrides(None, cfg)
        if init.model_id is None:  # a named init (hub tag, file, MLflow URI): in MLflow too, found by fingerprint
            record_given_init(init, cfg, model, dataset, client, experiment_id, parent_run_id, sweep)
        print(f"init for {model}: {init.source} (fingerprint {init.fingerprint[:16]}); eval preprocessing "
              f"{describe_preprocess(init.preprocess, TrainConfig.from_dict({**cfg.train, 'model': model}))}", flush=True)
    return inits


def given_init(cfg: SweepConfig, model: str, source: str, dataset: ICHDataset) -> Init:
    """Weights the user named: a hub tag (downloads: asked for), a local file / folder, or an MLflow URI."""
    init_seed = cfg.train.get("init_seed", 0)
    torch.manual_seed(init_seed)  # a fresh classifier is the same in every trial
    try:
        if tag := hub_tag(source):  # hub:<tag> or hf-hub:timm/<tag>: one tag, one fingerprint
            pre = hub_preprocess(tag)  # timm's pretrained config: installed with timm, no network
            net = create_model(model, dataset.num_classes, cfg.train.get("img_size"), hub_tag=tag)
            fp = "hub:" + hashlib.sha256(f"hub:{tag}|{dataset.num_classes}|{init_seed}".encode()).hexdigest()[:32]
        else:
            local = resolve_init_source(source)  # an MLflow URI downloads once, here
            net = create_model(model, dataset.num_classes, cfg.train.get("img_size"))
            fp, fresh = load_init_weights(net, str(local))
            if fresh:
                fp = hashlib.sha256(f"{fp}|head{dataset.num_classes}|{init_seed}".encode()).hexdigest()
            pre = init_preprocess(local)
    except PreprocessError as e:
        raise ModelError(f"init weights {source}: {e}") from None
    if pre and "eval_crop_pct" in cfg.train and "crop_pct" not in (cfg.init.preprocess or {}) \
            and float(cfg.train["eval_crop_pct"]) != pre["crop_pct"]:
        print(f"note: train.eval_crop_pct={cfg.train['eval_crop_pct']} is not used: the init weights' preprocessing "
              f"says crop {pre['crop_pct']:g} ({pre['source']}); set init.preprocess.crop_pct to override it", flush=True)
    return Init({k: v.detach().clone() for k, v in net.state_dict().items()}, fp, source, _with_overrides(pre, cfg))


def reuse_warm_start(cfg: SweepConfig, model: str, dataset: ICHDataset, client: MlflowClient, experiment_id: str,
                     sweep: str) -> Init | None:
    """This sweep's warm-start base model for `model` from MLflow, if an earlier run trained it."""
    tc = _warm_start_config(cfg, model)
    found = registry.search_init_models(client, [experiment_id], sweep=sweep, architecture=model,
                                        dataset_fingerprint=dataset.fingerprint, recipe=_recipe_key(tc))
    if not found:
        return None
    from soups.store.signing import SignatureError
    with tempfile.TemporaryDirectory() as tmp:
        try:
            sd, _ = registry.load_record(client, found[0], tmp)
        except SignatureError as e:  # unsigned (an older version's) or not the owner's: trained again, signed
            print(f"warm start not reused: {e}", flush=True)
            return None
    return Init(sd, found[0].sha256, f"warm start (reused, model {found[0].model_id})", model_id=found[0].model_id)


def record_warm_start(tc: TrainConfig, sd: dict, metrics: dict, dataset: ICHDataset, client: MlflowClient,
                      experiment_id: str, parent_run_id: str, sweep: str, preprocess: dict | None = None) -> Init:
    """Log a freshly trained warm start as the sweep's init model (ich.kind=init); its sha256 is the fingerprint."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "init"
        meta = CheckpointMeta.for_training(tc, dataset, init_fingerprint="warm-start", epoch=tc.epochs, metrics=metrics,
                                           preprocess=preprocess, extra={"sweep": sweep, "recipe": _recipe_key(tc),
                                                                         "config": dataclasses.asdict(tc)})
        sha = save_checkpoint(folder, sd, meta)
        # its tags (sweep, architecture, dataset, recipe, epoch) and metrics come from the folder's checkpoint.json
        model_id = registry.log_init_model(client, [experiment_id, parent_run_id], folder)
    return Init(sd, sha, f"warm start (trained, model {model_id})", model_id=model_id)


def record_given_init(init: Init, cfg: SweepConfig, model: str, dataset: ICHDataset, client: MlflowClient,
                      experiment_id: str, parent_run_id: str, sweep: str) -> Init:
    """A named init as the sweep's `init` LoggedModel, once per fingerprint (a later sweep finds it again): the
    exact weights every trial starts from (the loaded or hub weights with the seeded fresh head), tagged
    ich.init_fingerprint = the trials' fingerprint. Trials list it as their input model; Model Stock pulls it as
    its anchor (registry.search_init_by_fingerprint)."""
    found = [r for r in registry.search_init_by_fingerprint(client, [experiment_id], init.fingerprint)
             if r.tags.get(TAG_SIGNATURE)]  # one an older version logged unsigned is logged again, signed
    if found:
        init.model_id = found[0].model_id
        return init
    tc = TrainConfig.from_dict({**cfg.train, "model": model})
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "init"
        pre = resolve(tc.img_size, dataset.image_size, tc.eval_crop_pct, init.preprocess)  # what the trials record
        meta = CheckpointMeta.for_training(tc, dataset, init_fingerprint=init.fingerprint, epoch=0, metrics={},
                                           preprocess=pre,
                                           extra={"sweep": sweep, "recipe": f"given:{init.source}", "source": init.source})
        save_checkpoint(folder, {k: v.contiguous() for k, v in init.state_dict.items()}, meta)
        init.model_id = registry.log_init_model(client, [experiment_id, parent_run_id], folder)
    return init


def check_resources(cfg: SweepConfig, local: bool) -> None:
    """Impossible resources fail before the sweep starts instead of leaving Tune waiting forever."""
    total = ray.cluster_resources()
    cpus, gpus = total.get("CPU", 0), total.get("GPU", 0)
    if cfg.cpus_per_trial > cpus and local:
        raise ConfigError(f"cpus_per_trial={cfg.cpus_per_trial} but this Ray cluster has {cpus:g} CPUs")
    if cfg.gpus_per_trial > gpus and local:
        raise ConfigError(f"gpus_per_trial={cfg.gpus_per_trial} but this Ray cluster has {gpus:g} GPUs "
                          "(use --gpus-per-trial 0 on a CPU machine)")
