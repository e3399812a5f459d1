"""Lineage in MLflow 3's own terms (issue 24 item 1): which data a run read, which models it started from or was
made of, and a model card for a registered soup, so the UI can click through them.

- A dataset split is an MLflow Dataset named `<split>@<fingerprint[:12]>` with the dataset fingerprint as its
  digest and `mlflow.data.context` = the split: trial runs read train/val/test, soup runs val/test (and train
  where BN statistics were recomputed on it). Val and test metrics of soup runs name their split's dataset.
- Input models: a trial run's is its shared init (where MLflow holds it), a soup run's are its ingredients.
- `model_card`: the Markdown a registered soup version carries as its description.

Pure: entities, keyword arguments and text out; the callers make the MLflow calls (with the registry's retry).
"""
from __future__ import annotations

import json

from mlflow.entities import Dataset, DatasetInput, InputTag, LoggedModelInput

CONTEXT_TAG = "mlflow.data.context"  # the tag MLflow's UI shows as a dataset's context
DIGEST_CHARS = 36  # MLflow's limit on a dataset digest


def split_dataset_name(fingerprint: str, split: str) -> str:
    return f"{split}@{fingerprint[:12]}"


def split_digest(fingerprint: str) -> str:
    return fingerprint[:DIGEST_CHARS]


def dataset_inputs(fingerprint: str, splits, source: str | None = None, *, classes=None,
                   sizes: dict | None = None) -> list[DatasetInput]:
    """One DatasetInput per split: name `<split>@<fp12>`, digest the fingerprint, context the split; the source
    says where the ingested folder was (a path on the machine that ran it) and the profile its size."""
    out = []
    for split in splits:
        profile = {"split": split, "fingerprint": fingerprint,
                   **({"num_classes": len(classes)} if classes is not None else {}),
                   **({"num_images": int(sizes[split])} if sizes and split in sizes else {})}
        dataset = Dataset(name=split_dataset_name(fingerprint, split), digest=split_digest(fingerprint),
                          source_type="local", source=json.dumps({"uri": source or "", "split": split}),
                          profile=json.dumps(profile))
        out.append(DatasetInput(dataset, tags=[InputTag(CONTEXT_TAG, split)]))
    return out


def split_of(metric_key: str) -> str | None:
    """val_accuracy -> val; test_macro_f1_ci_low -> test; anything else -> None."""
    head = metric_key.split("_", 1)[0]
    return head if head in ("val", "test", "train") and "_" in metric_key else None


def run_inputs(fingerprint: str, splits, *, source: str | None = None, model_ids=(), classes=None,
               sizes: dict | None = None) -> dict:
    """`client.log_inputs` keyword arguments of a run: its dataset splits and its input models."""
    models = [LoggedModelInput(m) for m in dict.fromkeys(model_ids) if m]
    return {"datasets": dataset_inputs(fingerprint, splits, source, classes=classes, sizes=sizes),
            "models": models or None}


def dataset_link(metric_key: str, fingerprint: str | None) -> dict:
    """Metric(...) keyword arguments that name the split's dataset of a val_/test_/train_ metric (MLflow keeps the
    link on a LoggedModel's metrics); {} for any other key or without a fingerprint."""
    split = split_of(metric_key)
    if not split or not fingerprint:
        return {}
    return {"dataset_name": split_dataset_name(fingerprint, split), "dataset_digest": split_digest(fingerprint)}


def model_card(*, name: str, recipe: str, scope: str, experiment_id: str, ingredients: list[dict], val: dict,
               test: dict, vs_best_single: dict, best_single: dict, metric: str, bn_mode: str, preprocess: dict,
               dataset_fingerprint: str, code_version: str, decision: str, params: dict | None = None) -> str:
    """A registered soup version's description (Markdown): what it is, what it was made of (and what its recipe
    chose: params, also the soup's ich.<recipe>.* tags), how well it does with what uncertainty, what it expects as
    input, and its limits."""
    def pct(v) -> str:
        return "n/a" if v is None else f"{100 * float(v):.2f}"

    def interval(key: str) -> str:
        ci = test.get(f"{key}_ci")
        return f" [{pct(ci[0])}, {pct(ci[1])}]" if ci else ""

    accepted = [i for i in ingredients if i.get("accepted")]
    lines = [f"# {name}", "",
             f"A **{recipe}** soup ({scope}) of {len(accepted)} checkpoint(s), BN statistics: {bn_mode}. "
             f"Selected on val {metric}; test is reported only, never used to choose.", "",
             "## Figures (95% bootstrap intervals on test)", "",
             "| | val | test |", "|---|---|---|"]
    for key in ("accuracy", "macro_f1"):
        if key in val or key in test:
            lines.append(f"| {key} % | {pct(val.get(key))} | {pct(test.get(key))}{interval(key)} |")
    if vs_best_single:
        single = f"trial {best_single.get('trial')} epoch {best_single.get('epoch')}"
        p = vs_best_single.get("mcnemar_p")
        lines += ["", f"Test accuracy vs the best single checkpoint ({single}): "
                      f"{pct(vs_best_single.get('acc_diff'))} points [{pct(vs_best_single.get('acc_diff_low'))}, "
                      f"{pct(vs_best_single.get('acc_diff_high'))}], McNemar p = "
                      f"{'n/a' if p is None else f'{p:.3g}'}."]
    if params:  # Model Stock's t per layer, WiSE-FT's alpha, the learned soup's coefficients
        lines += ["", f"## What the {recipe} recipe chose", "", "| parameter | value |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in sorted(params.items())]
    lines += ["", "## Ingredients", "", "| trial | epoch | model | val score |", "|---|---|---|---|"]
    for i in accepted:
        link = f"[{i['model_id']}](#/experiments/{experiment_id}/models/{i['model_id']})"
        lines.append(f"| {i.get('trial', '')} | {i.get('epoch', '')} | {link} | {i.get('val_score', '')} |")
    lines += ["", "## Input", "",
              f"RGB images; preprocessing as trained: `{json.dumps(preprocess, sort_keys=True)}`.",
              f"Dataset fingerprint `{dataset_fingerprint}`; code `{code_version}`.", "",
              "## Champion decision", "", decision, "",
              "## Limits", "",
              "Valid for images like the training data (the dataset above); classes outside it are forced into one "
              "of its classes. The test figures come from one test split: read them with their intervals. Serve it "
              "with `ich serve`, which verifies the model before loading it."]
    return "\n".join(lines) + "\n"


def sweep_note(sweep: str, metric: str, trials: list[dict], soups: list[dict] | None, report: str | None) -> str:
    """The sweep run's note (`mlflow.note.content`, the UI's description): each trial's outcome, each soup's
    figures, where the report is."""
    def fig(v) -> str:
        return "" if v is None else f"{float(v):.4f}"

    lines = [f"# Sweep {sweep}", "", f"| trial | status | epochs | {metric} |", "|---|---|---|---|"]
    lines += [f"| {t['trial']} | {t['status'].lower()} | {t['epochs']} | {fig(t.get(metric))} |" for t in trials]
    short = metric.removeprefix("val_")
    if soups:
        lines += ["", f"| soup | recipe | val {short} | test accuracy [95% CI] |", "|---|---|---|---|"]
        for s in soups:
            ci = s["test"].get("accuracy_ci") or [None, None]
            lines.append(f"| {s['name']} | {s['recipe']} | {fig(s['val'].get(short))} | "
                         f"{fig(s['test'].get('accuracy'))} [{fig(ci[0])}, {fig(ci[1])}] |")
    lines += ["", f"Report: {report}" if report else "No report was built (--no-soups or --no-report)."]
    return "\n".join(lines) + "\n"
