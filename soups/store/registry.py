"""The registry adapter: checkpoints and soups go to MLflow as LoggedModels and come back by search.

Every checkpoint is one LoggedModel whose source run is the trial's run: its artifacts are the checkpoint
folder (model.safetensors + checkpoint.json), its val metrics are linked to it at step = epoch, and
these tags identify it (docs/design.md#4 and #5; soups/store/tags.py holds the vocabulary and writes them from
the folder's checkpoint.json):

    ich.kind                  "checkpoint" | "soup" | "init"
    ich.sweep                 sweep name
    ich.trial                 trial id
    ich.epoch                 epoch, an integer written as a string
    ich.sha256                sha256 of model.safetensors, verified on every pull
    ich.dataset_fingerprint   fingerprint of the ingested dataset
    ich.init_fingerprint      fingerprint of the shared initialization
    ich.architecture          model architecture name
    ich.superseded_by         set on a record replaced by a newer one (which is then marked FAILED)
    ich.signature, ich.signed_by  the owner's ed25519 signature over the model id, every file and the tags above
                              (soups/store/signing.py, docs/design.md#14), set after the upload, before READY

A pull verifies what it reads in one place (verify_pulled): one read of the weights file, hashed against the
recorded sha256, parsed as safetensors, checked finite, its checkpoint.json checked against the tags, and the
signature over all of it checked against the keys this user trusts (the tags alone prove nothing: whoever can
write to the tracking server can rewrite them).

Exactly once: a (sweep, trial, epoch) has one READY record. Logging it again with the same sha256
returns the existing id; records left PENDING by a crash, or READY with other weights (a resumed trial
that trained the epoch again), are marked FAILED once the new one is READY. Searches see READY only.

Every MLflow call goes through `call_with_retry` (soups/store/retry.py, imported here: importing this module
lowers MLflow's own HTTP retries as before).
"""
from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path

from mlflow import MlflowClient
from mlflow.artifacts import download_artifacts
from mlflow.entities import LoggedModel, LoggedModelOutput, LoggedModelStatus, Metric, Run, ViewType
from mlflow.exceptions import MlflowException

from ich.checkpoint import (META, WEIGHTS, CheckpointError, CheckpointMeta, first_nonfinite, read_hashed, read_meta,
                            sha256_file, weights_from_bytes)
from soups.store.retry import RegistryError, RetryPolicy, call_with_retry
from soups.store.tags import (INIT_TRIAL, KIND_CHECKPOINT, KIND_INIT, KIND_SOUP, LEGACY_TAG_WARM_START_RECIPE, TAG_ARCHITECTURE,
                              TAG_DATASET, TAG_EPOCH, TAG_INIT, TAG_KIND,
                              TAG_SHA256, TAG_SIGNATURE, TAG_SUPERSEDED_BY, TAG_SWEEP, TAG_TRIAL, TAG_WARM_START_RECIPE, CheckpointRecord,
                              model_tags, record_of)
from soups.store import signing
from soups.store.lineage import dataset_link

log = logging.getLogger(__name__)

SEARCH_PAGE_SIZE = 500


# ---------------------------------------------------------------------------------------------- filters

def _quoted(key: str, value: str) -> str:
    value = str(value)
    if "'" in value:
        raise ValueError(f"{key}={value!r}: single quotes are not allowed in registry tag values")
    return f"'{value}'"


def _tag_filter(tags: dict[str, str]) -> str:
    return " AND ".join(f"tags.`{k}` = {_quoted(k, v)}" for k, v in tags.items())


def _model_name(text: str) -> str:
    # LoggedModel names may not hold / : . % " '
    return "".join("-" if c in "/:.%\"'" else c for c in text)


# ---------------------------------------------------------------------------------------------- runs

def get_or_create_experiment(client: MlflowClient, name: str, *, retry: RetryPolicy | None = None) -> str:
    experiment = call_with_retry(f"get experiment {name!r}", client.get_experiment_by_name, name, retry=retry)
    if experiment is None:
        try:
            # Open the UI on runs and models (model training), not MLflow 3's GenAI traces overview.
            return call_with_retry(f"create experiment {name!r}", client.create_experiment, name,
                                   tags={"mlflow.experimentKind": "custom_model_development"}, retry=retry)
        except MlflowException as e:
            if e.error_code != "RESOURCE_ALREADY_EXISTS":  # another worker created it meanwhile
                raise
            experiment = call_with_retry(f"get experiment {name!r}", client.get_experiment_by_name, name, retry=retry)
    if experiment.lifecycle_stage == "deleted":
        log.warning("MLflow experiment %r (id %s) was deleted; restoring it", name, experiment.experiment_id)
        call_with_retry(f"restore experiment {name!r}", client.restore_experiment, experiment.experiment_id,
                        retry=retry)
    return experiment.experiment_id


def find_run_by_tags(client: MlflowClient, experiment_id: str, tags: dict[str, str], *, newest: bool = False,
                     retry: RetryPolicy | None = None) -> Run | None:
    """The oldest (or newest) active run of the experiment carrying all these tags, or None.
    Oldest makes trial runs idempotent on resume; newest finds e.g. a sweep's latest run."""
    runs = call_with_retry("search runs", client.search_runs, [experiment_id], filter_string=_tag_filter(tags),
                           run_view_type=ViewType.ACTIVE_ONLY, max_results=1,
                           order_by=[f"attributes.start_time {'DESC' if newest else 'ASC'}"], retry=retry)
    return runs[0] if runs else None


def latest_run_by_tags(client: MlflowClient, experiment_id: str, tags: dict[str, str], *,
                       retry: RetryPolicy | None = None) -> Run | None:
    return find_run_by_tags(client, experiment_id, tags, newest=True, retry=retry)


# ---------------------------------------------------------------------------------------------- push

def _search_models(client: MlflowClient, experiment_ids: list[str], filter_string: str,
                   retry: RetryPolicy | None) -> list[LoggedModel]:
    models: list[LoggedModel] = []
    page_token = None
    while True:
        page = call_with_retry("search logged models", client.search_logged_models, experiment_ids,
                               filter_string=filter_string, max_results=SEARCH_PAGE_SIZE,
                               page_token=page_token, retry=retry)
        models.extend(page)
        page_token = page.token
        if not page_token:
            return models


def _is_ready(model: LoggedModel) -> bool:
    return model.status == LoggedModelStatus.READY


def _newest(models: list[LoggedModel]) -> LoggedModel:
    return max(models, key=lambda m: (m.creation_timestamp or 0, m.model_id))


def _retire(client: MlflowClient, models: list[LoggedModel], keep_id: str, retry: RetryPolicy | None) -> None:
    """Mark every model but keep_id FAILED, tagged with its replacement, so searches see one record."""
    for model in models:
        if model.model_id == keep_id:
            continue
        call_with_retry(f"tag superseded model {model.model_id}", client.set_logged_model_tags, model.model_id,
                        {TAG_SUPERSEDED_BY: keep_id}, retry=retry)
        if model.status != LoggedModelStatus.FAILED:
            call_with_retry(f"fail superseded model {model.model_id}", client.finalize_logged_model, model.model_id,
                            LoggedModelStatus.FAILED, retry=retry)


def _push_model(client: MlflowClient, *, experiment_id: str, run_id: str, ckpt_dir: Path, name: str, kind: str,
                tags: dict[str, str], metrics: dict[str, float], step: int,
                retry: RetryPolicy | None, signing_key: str | None = None) -> tuple[str, bool]:
    """Create, upload (one PUT per file), sign (the model id is known after create; signing.sign over the
    uploaded folder and the tags; signing_key: the key file, else this process's own, made on first use), log
    metrics (one log_batch), link the step, finalize READY.

    Returns (model_id, create_was_retried): a retried create may have left an orphan PENDING model.
    """
    attempts = 0

    def create() -> LoggedModel:
        nonlocal attempts
        attempts += 1
        return client.create_logged_model(experiment_id=experiment_id, name=name, source_run_id=run_id,
                                          tags=tags, model_type=kind)

    model_id = call_with_retry(f"create model {name}", create, retry=retry).model_id
    try:
        call_with_retry(f"upload {ckpt_dir} to model {model_id}", client.log_model_artifacts, model_id,
                        str(ckpt_dir), retry=retry)
        call_with_retry(f"sign model {model_id}", client.set_logged_model_tags, model_id,
                        signing.sign(model_id, tags, ckpt_dir, key_file=signing_key), retry=retry)
        # One timestamp for all attempts: a retried log_batch then repeats identical rows, not new points.
        timestamp = int(time.time() * 1000)
        batch = [Metric(key, float(value), timestamp, step, model_id=model_id,  # val/test name their split's data
                        **dataset_link(key, tags.get(TAG_DATASET))) for key, value in metrics.items()]
        if batch:
            call_with_retry(f"log metrics of model {model_id}", client.log_batch, run_id, metrics=batch, retry=retry)
        call_with_retry(f"link model {model_id} to run {run_id}", client.log_outputs, run_id,
                        [LoggedModelOutput(model_id, step)], retry=retry)
        call_with_retry(f"finalize model {model_id}", client.finalize_logged_model, model_id,
                        LoggedModelStatus.READY, retry=retry)
    except BaseException:
        try:  # best effort, one try: searches ignore non-READY models anyway
            client.finalize_logged_model(model_id, LoggedModelStatus.FAILED)
        except Exception:
            pass
        raise
    return model_id, attempts > 1


def _check_weights(ckpt_dir: Path, sha256: str | None) -> str:
    weights = ckpt_dir / WEIGHTS
    if not weights.is_file() or not (ckpt_dir / META).is_file():
        raise CheckpointError(f"{ckpt_dir}: not a checkpoint folder (needs {WEIGHTS} and {META})")
    actual = sha256_file(weights)
    if sha256 is not None and actual != sha256:
        raise CheckpointError(f"{ckpt_dir}: sha256 mismatch (given {sha256[:12]}…, file {actual[:12]}…); "
                              "refusing to log it")
    return actual


def _run_ids(run: Run | tuple[str, str]) -> tuple[str, str]:
    """(experiment_id, run_id) of an MLflow Run or of such a pair (what the upload process receives)."""
    if isinstance(run, Run):
        return run.info.experiment_id, run.info.run_id
    experiment_id, run_id = run
    return str(experiment_id), str(run_id)


def _read_folder(folder: str | os.PathLike) -> tuple[Path, CheckpointMeta, str]:
    """A checkpoint folder about to be logged: its metadata and the sha256 of its weights."""
    folder = Path(folder)
    sha256 = _check_weights(folder, None)
    return folder, read_meta(folder), sha256


def log_checkpoint(client: MlflowClient, run: Run | tuple[str, str], folder: str | os.PathLike, *,
                   retry: RetryPolicy | None = None, signing_key: str | None = None) -> str:
    """Log one epoch's checkpoint folder of a trial as a READY LoggedModel of `run` (the trial's run, or its
    (experiment_id, run_id)), exactly once; returns its model id. What identifies it (sweep, trial, epoch,
    fingerprints, architecture) and its metrics are read from the folder's checkpoint.json, its sha256 from the file.

    The metrics are logged on the trial's run at step=epoch and linked to the model, so the caller
    should not log them to the run again. Cost: 8 HTTP requests (search, create, 2 uploads, sign, log_batch,
    log_outputs, finalize), ~50 ms for a 1 MB checkpoint against a local server on an idle 2-core machine.
    signing_key: the key file that signs it (a trial: the sweep driver's, which exists; None: this process's own).
    """
    experiment_id, run_id = _run_ids(run)
    ckpt_dir, meta, sha256 = _read_folder(folder)
    for key in ("sweep", "trial"):
        if not str(meta.extra.get(key, "")):
            raise CheckpointError(f"{ckpt_dir}: {META} has no extra.{key}; a trial's checkpoint names its sweep and trial")
    tags = model_tags(meta, kind=KIND_CHECKPOINT, sha256=sha256)
    key = {k: tags[k] for k in (TAG_KIND, TAG_SWEEP, TAG_TRIAL, TAG_EPOCH)}
    key_filter = _tag_filter(key)

    existing = _search_models(client, [experiment_id], key_filter, retry)
    same = [m for m in existing if _is_ready(m) and (m.tags or {}).get(TAG_SHA256) == sha256
            and (m.tags or {}).get(TAG_SIGNATURE)]  # an unsigned record (an older version's) is logged again
    if same:
        keep = _newest(same).model_id
        _retire(client, existing, keep, retry)
        return keep

    name = _model_name(f"{tags[TAG_TRIAL]}-e{meta.epoch:03d}")
    model_id, create_retried = _push_model(client, experiment_id=experiment_id, run_id=run_id, ckpt_dir=ckpt_dir,
                                           name=name, kind=KIND_CHECKPOINT, tags=tags, metrics=meta.metrics,
                                           step=meta.epoch, retry=retry, signing_key=signing_key)
    if create_retried:  # a create that reached the server before its answer was lost left an orphan
        existing = _search_models(client, [experiment_id], key_filter, retry)
    _retire(client, existing, model_id, retry)
    return model_id


def log_soup_model(client: MlflowClient, *, experiment_id: str, run_id: str, ckpt_dir: str | os.PathLike,
                   name: str, tags: dict[str, str], metrics: dict[str, float],
                   retry: RetryPolicy | None = None) -> str:
    """Log a soup (a checkpoint folder) as a READY LoggedModel of the soup run; returns its model id.

    Once per (soup run, name): logging the same weights again returns the existing id.
    """
    ckpt_dir = Path(ckpt_dir)
    sha256 = _check_weights(ckpt_dir, tags.get(TAG_SHA256))
    name = _model_name(name)
    tags = {**{k: str(v) for k, v in tags.items()}, TAG_KIND: KIND_SOUP, TAG_SHA256: sha256}
    same_name = (f"name = {_quoted('name', name)} AND source_run_id = {_quoted('run_id', run_id)} AND "
                 + _tag_filter({TAG_KIND: KIND_SOUP}))
    existing = _search_models(client, [experiment_id], same_name, retry)
    same = [m for m in existing if _is_ready(m) and (m.tags or {}).get(TAG_SHA256) == sha256
            and (m.tags or {}).get(TAG_SIGNATURE)]
    if same:
        return _newest(same).model_id
    model_id, _ = _push_model(client, experiment_id=experiment_id, run_id=run_id, ckpt_dir=ckpt_dir, name=name,
                              kind=KIND_SOUP, tags=tags, metrics=metrics, step=0, retry=retry)
    return model_id


def log_init_model(client: MlflowClient, run: Run | tuple[str, str], folder: str | os.PathLike, *,
                   retry: RetryPolicy | None = None) -> str:
    """Log a sweep's warm-start base model (ich.kind=init) on the sweep run; returns its model id. Its tags and
    metrics come from the folder's checkpoint.json (extra.sweep, extra.recipe: the warm-start recipe's hash)."""
    experiment_id, run_id = _run_ids(run)
    ckpt_dir, meta, sha256 = _read_folder(folder)
    tags = model_tags(meta, kind=KIND_INIT, sha256=sha256, trial=INIT_TRIAL)
    model_id, _ = _push_model(client, experiment_id=experiment_id, run_id=run_id, ckpt_dir=ckpt_dir,
                              name=_model_name(f"init-{meta.architecture}"), kind=KIND_INIT, tags=tags,
                              metrics=meta.metrics, step=meta.epoch, retry=retry)
    return model_id


def search_init_models(client: MlflowClient, experiment_ids: list[str], *, sweep: str, architecture: str,
                       dataset_fingerprint: str, recipe: str, retry: RetryPolicy | None = None) -> list[CheckpointRecord]:
    """READY warm-start models of a sweep for one architecture, dataset and recipe; newest first. Models logged
    before the recipe tag's rename are found under its old name, so an upgrade does not train the warm start again."""
    key = {TAG_KIND: KIND_INIT, TAG_SWEEP: sweep, TAG_ARCHITECTURE: architecture, TAG_DATASET: dataset_fingerprint}
    models = []
    for recipe_tag in (TAG_WARM_START_RECIPE, LEGACY_TAG_WARM_START_RECIPE):
        found = _search_models(client, [str(e) for e in experiment_ids], _tag_filter({**key, recipe_tag: recipe}), retry)
        models = [m for m in found if _is_ready(m)]
        if models:
            break
    return _records_newest_first(models)


def _records_newest_first(models: list[LoggedModel]) -> list[CheckpointRecord]:
    models = sorted(models, key=lambda m: (m.creation_timestamp or 0, m.model_id), reverse=True)
    return [r for m in models if (r := record_of(m)) is not None]


def search_init_by_fingerprint(client: MlflowClient, experiment_ids: list[str], fingerprint: str, *,
                               retry: RetryPolicy | None = None) -> list[CheckpointRecord]:
    """READY init models (ich.kind=init) of the shared init that the checkpoints tagged
    ich.init_fingerprint=fingerprint started from (the anchor of Model Stock); newest first. A warm start's
    fingerprint is its weights' sha256; a named init (hub tag, file, MLflow URI: sweeps/init_weights.py
    record_given_init) carries the fingerprint as its own ich.init_fingerprint."""
    for key in (TAG_SHA256, TAG_INIT):
        found = _search_models(client, [str(e) for e in experiment_ids],
                               _tag_filter({TAG_KIND: KIND_INIT, key: fingerprint}), retry)
        if ready := [m for m in found if _is_ready(m)]:
            return _records_newest_first(ready)
    return []


# ---------------------------------------------------------------------------------------------- pull

def search_checkpoints(client: MlflowClient, experiment_ids: list[str], *, sweep: str | None = None,
                       trial: str | None = None, retry: RetryPolicy | None = None) -> list[CheckpointRecord]:
    """READY checkpoint records, one per (sweep, trial, epoch), sorted by (trial, epoch)."""
    key = {TAG_KIND: KIND_CHECKPOINT}
    if sweep is not None:
        key[TAG_SWEEP] = sweep
    if trial is not None:
        key[TAG_TRIAL] = trial
    models = [m for m in _search_models(client, [str(e) for e in experiment_ids], _tag_filter(key), retry)
              if _is_ready(m)]
    # Two READY records of one key exist only for a moment (before the older is retired): keep the newest.
    newest: dict[tuple[str, str, str], LoggedModel] = {}
    for model in models:
        tags = model.tags or {}
        k = (tags.get(TAG_SWEEP, ""), tags.get(TAG_TRIAL, ""), tags.get(TAG_EPOCH, ""))
        if k not in newest or _newest([newest[k], model]) is model:
            newest[k] = model
    records = [r for m in newest.values() if (r := record_of(m)) is not None]
    return sorted(records, key=lambda r: (r.trial, r.epoch, r.sweep))


def search_soup_models(client: MlflowClient, experiment_ids: list[str], *,
                       retry: RetryPolicy | None = None) -> list[CheckpointRecord]:
    """READY soup LoggedModels (ich.kind=soup) of the experiments, as records."""
    models = _search_models(client, [str(e) for e in experiment_ids], _tag_filter({TAG_KIND: KIND_SOUP}), retry)
    return [r for m in models if _is_ready(m) and (r := record_of(m)) is not None]


def get_model_record(client: MlflowClient, model_id: str, *, retry: RetryPolicy | None = None) -> CheckpointRecord:
    """The record of one LoggedModel by id (a checkpoint or a soup, e.g. the current champion's weights)."""
    model = call_with_retry(f"get model {model_id}", client.get_logged_model, model_id, retry=retry)
    record = record_of(model)
    if record is None:
        raise RegistryError(f"model {model_id}: lacks the {TAG_EPOCH}/{TAG_SHA256} tags of an ich checkpoint or soup")
    return record


ARTIFACT_SCHEMES_ENV = "ICH_ARTIFACT_SCHEMES"  # e.g. "s3,gs": a store the server hands out unproxied, by its scheme


def artifact_location_problem(uri: str, tracking_uri: str | None) -> str | None:
    """Why a model's artifact location, as a tracking server states it, is not one to download from or delete in;
    None when it is. Against a server (http/https tracking URI) only its artifact proxy is trusted: mlflow-artifacts:
    URIs (or the same host's http form), or a scheme the user named in $ICH_ARTIFACT_SCHEMES. A server could
    otherwise name any local folder (file:///usr) and have it copied, or deleted by `ich gc --apply`. A local store
    (sqlite:, a folder) is the user's own files, its file: locations included."""
    from urllib.parse import urlparse
    where, server = urlparse(uri or ""), urlparse(tracking_uri or "")
    if server.scheme not in ("http", "https"):
        return None
    allowed = {s.strip().lower() for s in os.environ.get(ARTIFACT_SCHEMES_ENV, "").split(",") if s.strip()}
    if where.scheme == "mlflow-artifacts" or where.scheme.lower() in allowed:
        return None
    if where.scheme in ("http", "https") and where.netloc == server.netloc:
        return None
    return (f"artifact location {uri!r} is not under the tracking server's artifact proxy (mlflow-artifacts:); "
            f"refusing to read or delete it (an object store of your own: name its scheme in {ARTIFACT_SCHEMES_ENV})")


def check_artifact_location(uri: str, tracking_uri: str | None, label: str) -> str:
    """uri, when artifact_location_problem finds nothing; else RegistryError naming label."""
    if (problem := artifact_location_problem(uri, tracking_uri)) is not None:
        raise RegistryError(f"{label}: {problem}")
    return uri


def download_checkpoint(client: MlflowClient | None, record: CheckpointRecord, dst_dir: str | os.PathLike, *,
                        retry: RetryPolicy | None = None) -> Path:
    """Download the record's checkpoint folder under dst_dir; returns the folder. Nothing is verified here:
    whoever reads the weights verifies them on that read (verify_pulled)."""
    if client is None:
        if not os.environ.get("MLFLOW_TRACKING_URI"):  # MlflowClient() would open ./mlflow.db instead
            raise RegistryError(f"checkpoint {record.label()}: no MLflow client given and "
                                "MLFLOW_TRACKING_URI is not set")
        client = MlflowClient()
    artifact_uri = record.artifact_uri
    if not artifact_uri:
        artifact_uri = call_with_retry(f"get model {record.model_id}", client.get_logged_model, record.model_id,
                                       retry=retry).artifact_location
    check_artifact_location(artifact_uri, client.tracking_uri, f"checkpoint {record.label()}")
    folder = Path(dst_dir) / record.model_id
    if folder.exists():
        shutil.rmtree(folder)  # never mix files of an earlier, partial download
    folder.mkdir(parents=True)
    # Returns the local copy of the artifacts folder (dst_path/artifacts).
    folder = Path(call_with_retry(f"download model {record.model_id}", download_artifacts, artifact_uri=artifact_uri,
                                  dst_path=str(folder), tracking_uri=client.tracking_uri, retry=retry))
    if not (folder / WEIGHTS).is_file():
        raise CheckpointError(f"checkpoint {record.label()}: downloaded artifacts lack {WEIGHTS}")
    return folder


def verify_pulled(record: CheckpointRecord, folder: str | os.PathLike) -> tuple[dict, CheckpointMeta]:
    """The one check of a pulled checkpoint, on the one read of its weights file: (state_dict, meta) when the file's
    sha256 is the recorded one, it is safetensors with finite weights, its checkpoint.json agrees with the
    record's tags, and the owner's signature over the model id, every file and the tags verifies against the
    trusted keys (signing.verify; the weights' hash is this read's). Raises CheckpointError naming the checkpoint
    and what is wrong, signing.SignatureError/SigningKeyError for the signature; nothing is returned (used)
    before all pass."""
    folder = Path(folder)
    data, actual = read_hashed(folder / WEIGHTS)
    if actual != record.sha256:
        raise CheckpointError(f"checkpoint {record.label()}: sha256 mismatch (recorded {record.sha256[:12]}…, "
                              f"downloaded {actual[:12]}…); altered or corrupt")
    meta = read_meta(folder)
    state_dict = weights_from_bytes(data, folder / WEIGHTS)
    del data
    if (bad := first_nonfinite(state_dict)) is not None:
        raise CheckpointError(f"checkpoint {record.label()}: tensor {bad} holds NaN/Inf")
    # The tags were written from the same metadata: disagreement means a mixed-up record.
    if (mismatch := record.identity_mismatch(meta)) is not None:
        raise CheckpointError(f"checkpoint {record.label()}: {mismatch}")
    signing.verify(record.model_id, record.tags, folder, label=f"checkpoint {record.label()}",
                   known={WEIGHTS: actual})  # the hash of this read: the weights are not read twice
    return state_dict, meta


def load_record(client: MlflowClient | None, record: CheckpointRecord, tmpdir: str | os.PathLike, *,
                retry: RetryPolicy | None = None) -> tuple[dict, CheckpointMeta]:
    """Download, verify and read a checkpoint: (state_dict, meta). safetensors only; nothing is unpickled."""
    return verify_pulled(record, download_checkpoint(client, record, tmpdir, retry=retry))
