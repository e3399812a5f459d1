"""The tag vocabulary: every `ich.*` tag the project writes to MLflow, and the only two conversions between tags
and checkpoint identities: `model_tags` (checkpoint.json's CheckpointMeta -> a LoggedModel's tags) and
`record_of` (a LoggedModel -> CheckpointRecord). Import-light (no MLflow, no torch): the CLI and the served
model read it too.

Stored values are kept as they were written: records logged by earlier versions stay readable.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

# ------------------------------------------------------------------ a LoggedModel's identity (checkpoints, soups, inits)
TAG_KIND = "ich.kind"  # KIND_* below, or "sweep" | "trial" | "report" on runs and models
TAG_SWEEP = "ich.sweep"
TAG_TRIAL = "ich.trial"
TAG_EPOCH = "ich.epoch"  # an integer written as a string
TAG_SHA256 = "ich.sha256"  # sha256 of model.safetensors, verified on every pull (and on the served model)
TAG_DATASET = "ich.dataset_fingerprint"
TAG_INIT = "ich.init_fingerprint"
TAG_ARCHITECTURE = "ich.architecture"
TAG_SIGNATURE = "ich.signature"  # ed25519 signature of the model's manifest (soups/store/signing.py, docs/design.md#14)
TAG_SIGNED_BY = "ich.signed_by"  # the id of the key that signed it
TAG_SUPERSEDED_BY = "ich.superseded_by"  # on a record replaced by a newer one (then FAILED)
TAG_WARM_START_RECIPE = "ich.warm_start_recipe"  # on init models: hash of the warm-start training recipe
# "ich.recipe" holds two meanings, told apart by ich.kind: the warm-start recipe hash on init models logged before
# the rename (read only), and the soup recipe (uniform | greedy | model_stock...) on soups and soup runs.
LEGACY_TAG_WARM_START_RECIPE = "ich.recipe"
TAG_SOUP_RECIPE = "ich.recipe"

KIND_CHECKPOINT = "checkpoint"
KIND_SOUP = "soup"
KIND_INIT = "init"
KIND_SWEEP = "sweep"
KIND_TRIAL = "trial"
KIND_REPORT = "report"
KIND_SOUP_PYFUNC = "soup-pyfunc"  # a soup's second, pyfunc LoggedModel: how versions were registered before 2026-12-08
INIT_TRIAL = "init"  # the trial tag of init models
SOUP_TRIAL = "soup"  # the trial tag of across-run soups (within-trial soups carry their trial)

# ------------------------------------------------------------------ sweep runs
TAG_DATA = "ich.data"  # the dataset folder
TAG_TUNE_PATH = "ich.tune_path"  # where Tune keeps the sweep's state (resume)
TAG_INIT_PREFIX = "ich.init."  # + model name: the fingerprint of that model's shared init
TAG_FAILED_TRIALS = "ich.failed_trials"
TAG_OPTUNA_STORAGE = "ich.optuna_storage"

# ------------------------------------------------------------------ trial runs
TAG_TRIAL_NAME = "ich.trial_name"
TAG_NODE = "ich.node"
TAG_NODE_ID = "ich.node_id"
TAG_PID = "ich.pid"  # the process running the trial now (changes when Tune retries it elsewhere)
TAG_STATUS = "ich.status"
TAG_VS_POSTHOC = "ich.soup_so_far_vs_posthoc"  # the sweep's soup-so-far against the post-hoc soup

# ------------------------------------------------------------------ soups (runs and LoggedModels)
TAG_SCOPE = "ich.scope"
TAG_METRIC = "ich.metric"
TAG_TIE_RULE = "ich.tie_rule"
TAG_BN_MODE = "ich.bn_mode"
TAG_GROUP = "ich.group"
TAG_INGREDIENTS = "ich.ingredients"  # the ingredient pool's rule (soups/pool.py): all | top_k:<k> | cycle_end
TAG_POOL = "ich.pool"  # "<checkpoints in the pool>/<family size>", e.g. 2/3
TAG_CURVE = "ich.curve"  # the parameter a recipe swept on val (wise_ft: alpha): metrics <x>_<split>_<metric> by step


def recipe_param_tag(recipe: str, name: str) -> str:
    """The tag of one of a recipe's parameters on its soups (CookedSoup.params): ich.wise_ft.alpha..."""
    return f"ich.{recipe}.{name}"

# ------------------------------------------------------------------ the registered soup (versions, the soup's run)
TAG_SOUP_MODEL = "ich.soup_model_id"  # on registered versions: the soup LoggedModel behind it (the version's own)
TAG_SOUP = "ich.soup"  # the soup's name
TAG_EXPERIMENT = "ich.experiment"  # also on registered models and report runs
TAG_VAL_PREFIX = "ich.val_"  # + metric: the soup's val figure (repr)
TAG_CHAMPION_PREFIX = "ich.champion_"  # + champion_val | p_value (on versions and the soup's run)
# On the soup's run, so `ich report` can take its test_*_low/high and vs_best_* figures instead of recomputing them
# (soups/report/sections.py): the model those vs_best_* compare with, and what the bootstrap was run on (JSON:
# n_resamples, alpha, seed, sha256 of the soup's and of that model's test predictions).
TAG_BEST_SINGLE = "ich.best_single"
TAG_BOOTSTRAP = "ich.bootstrap"
TAG_DECISION = "ich.champion_decision"
TAG_DECISION_REASON = "ich.champion_reason"
TAG_REGISTERED_MODEL = "ich.registered_model"
TAG_REGISTERED_VERSION = "ich.registered_version"
TAG_META_SHA256 = "ich.meta_sha256"  # on the served model: sha256 of checkpoint.json
TAG_CODE_SHA256 = "ich.code_sha256"  # on the served model: sha256 of its python_model file

# ------------------------------------------------------------------ report runs
TAG_SPLIT = "ich.split"

# ------------------------------------------------------------------ `ich gc`
TAG_GC = "ich.gc"
TAG_GC_BYTES = "ich.gc_bytes"
TAG_GC_TIME = "ich.gc_time"
GC_DELETED = "deleted"

# ------------------------------------------------------------------ provenance (every run)
TAG_VERSION = "ich.version"
TAG_SOURCE_HASH = "ich.source.hash"
TAG_ENV = "ich.env"
TAG_INGREDIENT_COMMITS = "ich.ingredients.git_commits"
TAG_INGREDIENT_HASHES = "ich.ingredients.source_hashes"

# The identity fields a record's tags repeat from checkpoint.json: a pull refuses a file whose meta disagrees.
IDENTITY_FIELDS = ("architecture", "dataset_fingerprint", "init_fingerprint")


@dataclass
class CheckpointRecord:
    """A LoggedModel of the registry as the soups see it (made by record_of)."""
    model_id: str
    run_id: str
    experiment_id: str
    name: str
    sweep: str
    trial: str
    epoch: int
    sha256: str
    dataset_fingerprint: str
    init_fingerprint: str
    architecture: str
    metrics: dict[str, float] = field(default_factory=dict)
    tags: dict = field(default_factory=dict)
    artifact_uri: str = ""  # where the checkpoint folder lives (mlflow-artifacts:/...)

    def label(self) -> str:
        return f"trial {self.trial} epoch {self.epoch} (model {self.model_id})"

    def identity_mismatch(self, meta) -> str | None:
        """How the record's tags disagree with the checkpoint.json they were written from (a mixed-up record),
        else None."""
        for name in IDENTITY_FIELDS:
            tagged, stored = getattr(self, name), getattr(meta, name)
            if tagged and tagged != stored:
                return f"{name} is {stored!r} in checkpoint.json but {tagged!r} in the registry"
        return None


def model_tags(meta, *, kind: str, sha256: str, trial: str | None = None) -> dict[str, str]:
    """meta -> tags: the identity tags of the LoggedModel holding a checkpoint folder whose checkpoint.json is
    `meta` (ich.checkpoint.CheckpointMeta). sweep and trial come from meta.extra (what the trainable writes);
    `trial` overrides it (soups, inits). Init models also carry their warm-start recipe."""
    extra = meta.extra or {}
    tags = {TAG_KIND: kind, TAG_SWEEP: str(extra.get("sweep", "")), TAG_TRIAL: str(trial or extra.get("trial", "")),
            TAG_EPOCH: str(int(meta.epoch)), TAG_SHA256: sha256, TAG_DATASET: meta.dataset_fingerprint,
            TAG_INIT: meta.init_fingerprint, TAG_ARCHITECTURE: meta.architecture}
    if kind == KIND_INIT:
        tags[TAG_WARM_START_RECIPE] = str(extra["recipe"])
    return tags


def latest_metrics(model) -> dict[str, float]:
    """A LoggedModel's metrics, the latest (step, timestamp) of each key."""
    latest: dict = {}
    for metric in model.metrics or []:
        held = latest.get(metric.key)
        if held is None or (metric.step, metric.timestamp) >= (held.step, held.timestamp):
            latest[metric.key] = metric
    return {key: float(metric.value) for key, metric in latest.items()}


def record_of(model) -> CheckpointRecord | None:
    """LoggedModel -> record; None (with a warning) for a model without an integer epoch or a sha256 tag."""
    tags = model.tags or {}
    try:
        epoch = int(tags.get(TAG_EPOCH, ""))
    except ValueError:
        log.warning("skipping model %s: tag %s=%r is not an integer", model.model_id, TAG_EPOCH, tags.get(TAG_EPOCH))
        return None
    if not tags.get(TAG_SHA256):
        log.warning("skipping model %s: no %s tag", model.model_id, TAG_SHA256)
        return None
    return CheckpointRecord(
        model_id=model.model_id, run_id=model.source_run_id or "", experiment_id=model.experiment_id,
        name=model.name, sweep=tags.get(TAG_SWEEP, ""), trial=tags.get(TAG_TRIAL, ""), epoch=epoch,
        sha256=tags[TAG_SHA256], dataset_fingerprint=tags.get(TAG_DATASET, ""),
        init_fingerprint=tags.get(TAG_INIT, ""), architecture=tags.get(TAG_ARCHITECTURE, ""),
        metrics=latest_metrics(model), tags=dict(tags), artifact_uri=model.artifact_location)
