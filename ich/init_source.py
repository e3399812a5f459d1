"""Where an init's preprocessing comes from (docs/design.md#9): the "init source" of a training run, resolved
to the fields ich/preprocess.py's `resolve` takes. A concern above models and checkpoints: it reads timm's
pretrained configs (ich/models.py registers the project's tiny models there) and checkpoint metadata.

`init_preprocess(source)`:
  - `hub:<timm tag>`: timm's pretrained config of the tag (read from the installed timm, no network);
  - a project checkpoint folder (has checkpoint.json), also one downloaded from MLflow: its metadata;
  - a local .safetensors file: a JSON sidecar, `<name>.json` or the `config.json` timm/Hugging Face ship beside
    `model.safetensors` (keys at the top level or under `pretrained_cfg`);
  - nothing found: None (the dataset's defaults apply).
A sweep's `init.preprocess: {mean, std, crop_pct, interpolation}` overrides any of them (ich.preprocess.resolve).
"""
from __future__ import annotations

import json
from pathlib import Path

from ich.checkpoint import read_meta
from ich.models import hub_tag
from ich.preprocess import OVERRIDABLE, Preprocess, PreprocessError, check_fields


def from_timm_config(cfg: dict, where: str) -> dict:
    """The overridable fields of a timm pretrained config (PretrainedCfg dict or a config.json's pretrained_cfg)."""
    from timm.data import resolve_data_config
    try:
        resolved = resolve_data_config(pretrained_cfg=cfg)
    except Exception as e:  # timm raises several types on odd configs; all mean "unusable"
        raise PreprocessError(f"{where}: unusable timm pretrained config ({e})") from None
    out = {"mean": list(resolved["mean"]), "std": list(resolved["std"]), "crop_pct": float(resolved["crop_pct"]),
           "interpolation": resolved["interpolation"], "input_size": int(resolved["input_size"][-1]),
           "source": where}
    check_fields(out, where)
    return out


def hub_preprocess(tag: str) -> dict:
    """The preprocessing timm's pretrained config gives a hub tag; read from the installed timm (no network)."""
    from timm.models import get_pretrained_cfg
    try:
        cfg = get_pretrained_cfg(tag)
    except RuntimeError as e:  # "Invalid pretrained tag (...)"
        raise PreprocessError(f"hub:{tag}: {e}") from None
    if cfg is None:
        raise PreprocessError(f"hub:{tag}: timm has no pretrained config for this tag")
    return from_timm_config(cfg.to_dict(), f"timm:{tag}")


def sidecar_preprocess(weights: Path) -> dict | None:
    """A JSON sidecar beside a local .safetensors file: `<name>.json`, else `config.json` (timm's hub layout)."""
    for side in (weights.with_suffix(".json"), weights.parent / "config.json"):
        if not side.is_file():
            continue
        try:
            d = json.loads(side.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise PreprocessError(f"{side}: preprocessing sidecar is not valid JSON ({e})") from None
        if not isinstance(d, dict):
            raise PreprocessError(f"{side}: preprocessing sidecar is not a JSON object")
        cfg = d.get("pretrained_cfg", d)
        if not isinstance(cfg, dict) or not {"mean", "std"} & set(cfg):
            continue  # a config.json of something else
        return from_timm_config(cfg, f"sidecar:{side}")
    return None


def init_preprocess(source: str | Path) -> dict | None:
    """The preprocessing an init source carries, as overridable fields plus `source` (and `input_size` when
    the config names one); None when it carries none (the dataset's defaults apply).

    `source` is a hub tag (`hub:...`) or a local path: a .safetensors file or a checkpoint folder."""
    source = str(source)
    if tag := hub_tag(source):  # hub:<tag> and hf-hub:timm/<tag> alike
        return hub_preprocess(tag)
    path = Path(source).expanduser()
    folder = path if path.is_dir() else path.parent
    if (folder / "checkpoint.json").is_file() and (path.is_dir() or path.name == "model.safetensors"):
        meta = read_meta(folder)
        pre = Preprocess.from_meta(meta)
        return {**{k: v for k, v in pre.to_dict().items() if k in OVERRIDABLE},
                "input_size": meta.img_size, "source": f"checkpoint:{folder}"}
    if path.is_file():
        return sidecar_preprocess(path)
    return None
