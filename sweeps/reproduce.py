"""Where `ich train`'s options come from besides its flags (issue 24 item 5): a sweep YAML's `train:` and `init:`
blocks (`--config FILE --set train.lr=3e-4`), or one recorded trial (`--trial ID`: its params as its run recorded
them, and its shared init from MLflow), so that one trial of a sweep is reproduced without copying values by hand.

Precedence, lowest first: TrainConfig's defaults, the config's `train:` block (after --set), the trial's params,
the explicit `ich train --<option>` flags. The init: --init, else the trial's, else the config's `init.weights`.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from ich.errors import ConfigError
from ich.train_config import TrainConfig


@dataclass
class TrainSource:
    """Training options and the init source found in a config and/or a recorded trial."""
    options: dict = field(default_factory=dict)  # TrainConfig fields
    init: str | None = None  # a weights file, checkpoint folder or MLflow model URI
    said: list[str] = field(default_factory=list)  # one line each: what was read from where


def from_config(path: str, sets=()) -> TrainSource:
    """A sweep YAML's fixed `train:` block and `init.weights` (its `search:` space is not one trial: use --trial)."""
    from sweeps.config import load_config
    cfg = load_config(path, sets=sets)
    out = TrainSource(dict(cfg.train), cfg.init.weights)
    out.said.append(f"options from {path}'s train: block" + (f" with {', '.join(sets)}" if sets else ""))
    if cfg.init.weights is None and cfg.init.warm_start:
        out.said.append(f"{path}: its init is a warm start the sweep trains; give --init (or --trial) for the same "
                        f"weights, else this run starts from the model's own initialization")
    return out


def from_trial(client, experiment: str, trial: str) -> TrainSource:
    """The trial's recorded params (every TrainConfig field, as its run logged them) and its shared init: the
    trial run's input model (lineage), else the init LoggedModel whose sha256 is the sweep's init fingerprint."""
    from soups.store import registry, retry
    from soups.store.tags import KIND_TRIAL, TAG_INIT_PREFIX, TAG_KIND, TAG_TRIAL
    exp = retry.call_with_retry(f"get experiment {experiment!r}", client.get_experiment_by_name, experiment)
    if exp is None:
        raise ConfigError(f"--trial {trial}: no experiment {experiment!r} on the tracking server")
    run = registry.find_run_by_tags(client, exp.experiment_id, {TAG_KIND: KIND_TRIAL, TAG_TRIAL: trial})
    if run is None:
        raise ConfigError(f"--trial {trial}: experiment {experiment!r} has no trial run tagged ich.trial={trial}")
    run = retry.call_with_retry("get trial run", client.get_run, run.info.run_id)  # with its input models
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    # a param is str(value): TrainConfig.from_dict turns numbers and booleans back; "None" was None
    options = {k: None if v == "None" else v for k, v in run.data.params.items() if k in fields}
    missing = sorted(set(fields) - set(options))
    out = TrainSource(options)
    out.said.append(f"options of trial {trial} (run {run.info.run_id}) as recorded"
                    + (f"; not recorded, so defaults: {', '.join(missing)}" if missing else ""))
    inputs = [m.model_id for m in (run.inputs.model_inputs or [])]
    if inputs:
        out.init = f"models:/{inputs[0]}"
    else:  # runs logged before lineage: the sweep run's init fingerprint of this model
        parent = run.data.tags.get("mlflow.parentRunId")
        model = options.get("model", TrainConfig.model)
        fingerprint = (retry.call_with_retry("get sweep run", client.get_run, parent).data.tags
                       .get(f"{TAG_INIT_PREFIX}{model}") if parent else None)
        found = registry.search_init_by_fingerprint(client, [exp.experiment_id], fingerprint) if fingerprint else []
        out.init = f"models:/{found[0].model_id}" if found else None
    out.said.append(f"init of trial {trial}: {out.init}" if out.init else
                    f"trial {trial}'s init is not in MLflow (a hub tag or a file?): give it with --init")
    return out
