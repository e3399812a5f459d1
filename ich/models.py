"""Model factory: every network the product trains, architecture kept apart from weights.

`create_model(name, num_classes, img_size)` builds an architecture (random init, or a timm hub tag only
when the user asks with `hub:<tag>` or timm's own spelling `hf-hub:timm/<tag>`, see hub_tag); `load_init_weights(model, source)` puts initial weights in from a local
safetensors file or checkpoint folder (sweeps.init_weights downloads MLflow model URIs first). Tiny variants are registered with timm so they
are created like any other timm model.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import timm
import torch
from timm.models import build_model_with_cfg, generate_default_cfgs, maxxvit, register_model

from ich.checkpoint import (BASELINES, COATNETS, WEIGHTS, CheckpointError, CheckpointMeta, first_nonfinite, load_weights,
                            read_meta, sha256_file)
from ich.errors import IchError


# ----------------------------------------------------------------------------------------------
# Tiny CPU models, registered with timm. The CoAtNet one is a real MaxxVit with C-C-T-T stages.

maxxvit.model_cfgs["coatnet_tiny_ich"] = maxxvit.MaxxVitCfg(
    embed_dim=(16, 32, 64, 128),
    depths=(1, 1, 2, 1),
    block_type=("C", "C", "T", "T"),
    stem_width=(8, 16),
    **maxxvit._rw_coat_cfg(stride_mode="dw", conv_attn_early=True, transformer_shortcut_bias=False),
)

_TINY_CFG = dict(url="", num_classes=10, input_size=(3, 32, 32), pool_size=(1, 1), crop_pct=1.0,
                 interpolation="bilinear", mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
                 first_conv="stem.conv1", classifier="head.fc", license="apache-2.0")
# timm's register_model reads this module-level name to attach pretrained cfgs (architecture only, no weights).
default_cfgs = generate_default_cfgs({
    f"{name}.untrained": dict(_TINY_CFG, first_conv=conv, classifier=head)
    for name, conv, head in [("coatnet_tiny_ich", "stem.conv1", "head.fc"), ("resnet_tiny_ich", "conv1", "fc"),
                             ("densenet_tiny_ich", "features.conv0", "classifier"),
                             ("vit_tiny_ich", "patch_embed.proj", "head")]
})


@register_model
def coatnet_tiny_ich(pretrained: bool = False, **kwargs) -> maxxvit.MaxxVit:
    """~0.27M-parameter CoAtNet (widths 16-32-64-128, C-C-T-T) for CPU sweeps at 32 px."""
    kwargs.setdefault("img_size", 32)
    return build_model_with_cfg(maxxvit.MaxxVit, "coatnet_tiny_ich", pretrained=False,
                                model_cfg=maxxvit.model_cfgs["coatnet_tiny_ich"],
                                feature_cfg=dict(flatten_sequential=True), **kwargs)


@register_model
def resnet_tiny_ich(pretrained: bool = False, **kwargs):
    """ResNet baseline at CPU scale: BasicBlock x (1,1,1,1), widths 16-128."""
    from timm.models.resnet import BasicBlock, ResNet
    kwargs.pop("img_size", None)
    return build_model_with_cfg(ResNet, "resnet_tiny_ich", False, block=BasicBlock, layers=(1, 1, 1, 1),
                                channels=(16, 32, 64, 128), stem_width=16, **kwargs)


@register_model
def densenet_tiny_ich(pretrained: bool = False, **kwargs):
    """DenseNet baseline at CPU scale."""
    from timm.models.densenet import DenseNet
    kwargs.pop("img_size", None)
    return build_model_with_cfg(DenseNet, "densenet_tiny_ich", False, growth_rate=12, block_config=(2, 2, 2, 2),
                                feature_cfg=dict(flatten_sequential=True), **kwargs)


@register_model
def vit_tiny_ich(pretrained: bool = False, **kwargs):
    """ViT baseline at CPU scale: patch 4, dim 64, depth 4."""
    from timm.models.vision_transformer import VisionTransformer
    kwargs.setdefault("img_size", 32)
    return build_model_with_cfg(VisionTransformer, "vit_tiny_ich", False, patch_size=4, embed_dim=64, depth=4,
                                num_heads=2, mlp_ratio=2.0, **kwargs)


# The architectures the product trains (COATNETS, BASELINES) are listed in ich/checkpoint.py: a checkpoint naming
# another is refused unless $ICH_ALLOWED_ARCHITECTURES adds it.
# Models whose positional tables are fixed to the image size they are built for.
_FIXED_SIZE = ("coatnet", "vit_")


class ModelError(IchError):
    """Unknown architecture or unusable initial weights; one line naming the model/file and the problem."""


def family(name: str) -> str:
    """coatnet | resnet | densenet | vit: the row a model belongs to in the results table."""
    for f in ("coatnet", "resnet", "densenet", "vit"):
        if name.startswith(f):
            return f
    return name.split("_")[0]


HUB_PREFIX, HF_HUB_PREFIX, TIMM_ORG = "hub:", "hf-hub:", "timm"


def hub_tag(source: str) -> str | None:
    """The timm pretrained tag an init source names, or None when it names no hub weights (a path, a URI).

    `hub:coatnet_0_rw_224.sw_in1k` and timm's `hf-hub:timm/coatnet_0_rw_224.sw_in1k` are the same tag. An
    `hf-hub:` repo of another org is refused: its preprocessing and architecture come only from a config.json
    downloaded at run time, while a timm tag's are in the installed timm (checked offline, docs/design.md#9)."""
    if source.startswith(HUB_PREFIX):
        tag = source[len(HUB_PREFIX):]
    elif source.startswith(HF_HUB_PREFIX):
        org, slash, tag = source[len(HF_HUB_PREFIX):].partition("/")
        if org != TIMM_ORG or not slash:
            raise ModelError(f"init weights {source}: only timm's own hub weights are accepted (hf-hub:timm/<tag> or "
                             f"hub:<tag>); for another repo, download its model.safetensors and config.json and set "
                             f"init.weights to the local model.safetensors")
    else:
        return None
    if not tag or "/" in tag:
        raise ModelError(f"init weights {source}: expected a timm tag such as coatnet_0_rw_224.sw_in1k after the prefix")
    return tag


def create_model(name: str, num_classes: int, img_size: int | None = None, *, drop_path_rate: float = 0.0,
                 hub_tag: str | None = None) -> torch.nn.Module:
    """Build `name` with a classifier for `num_classes`.

    `hub_tag` (e.g. "coatnet_0_rw_224.sw_in1k") downloads pretrained weights from the timm hub: only when the
    user asks for it (the network is not assumed)."""
    if not timm.is_model(name):
        raise ModelError(f"unknown model '{name}' (not a timm architecture; supported: {', '.join(COATNETS + BASELINES)})")
    kwargs: dict = dict(num_classes=num_classes)
    if drop_path_rate:
        kwargs["drop_path_rate"] = drop_path_rate
    if img_size is not None and name.startswith(_FIXED_SIZE):
        kwargs["img_size"] = img_size
    if hub_tag:
        if hub_tag.split(".")[0] != name:
            raise ModelError(f"hub tag '{hub_tag}' is not a pretrained tag of model '{name}'")
        return _create_pretrained(hub_tag, kwargs)
    return timm.create_model(name, pretrained=False, **kwargs)


def _create_pretrained(hub_tag: str, kwargs: dict) -> torch.nn.Module:
    """timm's pretrained weights for `hub_tag`; without network, one line saying how to use a local file."""
    from timm.models import get_pretrained_cfg
    try:
        cfg = get_pretrained_cfg(hub_tag)
    except RuntimeError as e:  # "Invalid pretrained tag (...)"
        raise ModelError(f"init weights hub:{hub_tag}: {e}") from None
    repo = getattr(cfg, "hf_hub_id", None) or hub_tag
    try:
        return timm.create_model(hub_tag, pretrained=True, **kwargs)
    except (OSError, ConnectionError, RuntimeError, ValueError) as e:  # offline, no such file, refused download
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise ModelError(
            f"init weights hub:{hub_tag}: cannot download from the timm hub ({type(e).__name__}: {reason}); "
            f"without network, fetch model.safetensors and config.json of https://huggingface.co/{repo} elsewhere "
            f"and set init.weights to the local model.safetensors (config.json beside it gives the preprocessing)"
        ) from None


def classifier_keys(model: torch.nn.Module) -> set[str]:
    """The state-dict keys of the model's classifier head (timm's pretrained_cfg["classifier"]): what a fresh init
    replaces, and what WiSE-FT keeps from the fine-tuned side (soups/recipes/wise_ft.py)."""
    head = getattr(model, "pretrained_cfg", {}).get("classifier", "head.fc")
    heads = head if isinstance(head, (list, tuple)) else [head]
    return {k for k in model.state_dict() if any(k.startswith(h + ".") for h in heads)}


MLFLOW_URI_PREFIXES = ("models:/", "runs:/", "mlflow-artifacts:/", "m-")


def resolve_init_weights(source: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """Local path (a .safetensors file or a checkpoint folder) -> a local safetensors file. MLflow model URIs are
    downloaded first by sweeps.init_weights.resolve_init_source (ich/ knows no MLflow)."""
    if source.startswith(MLFLOW_URI_PREFIXES):
        raise ModelError(f"init weights {source}: an MLflow URI; resolve it with sweeps.init_weights first")
    local = Path(source).expanduser()
    if local.is_dir():
        if (local / "checkpoint.json").is_file():  # a checkpoint folder: its metadata must hold up too
            try:
                read_meta(local)
            except CheckpointError as e:
                raise ModelError(f"init weights {source}: {e}") from None
        local = local / WEIGHTS
    if not local.is_file():
        raise ModelError(f"init weights {source}: no such file")
    return local


def load_init_weights(model: torch.nn.Module, source: str, cache_dir=None) -> tuple[str, list[str]]:
    """Load initial weights into `model`; a classifier of another shape is left freshly initialised.

    Returns (init fingerprint = sha256 of the weights file, keys left at their fresh init)."""
    path = resolve_init_weights(source, cache_dir)
    try:
        state = load_weights(path)
    except CheckpointError as e:
        raise ModelError(str(e)) from None
    if (bad := first_nonfinite(state)) is not None:
        raise ModelError(f"init weights {path}: tensor {bad} holds NaN/Inf")
    own = model.state_dict()
    head = classifier_keys(model)
    skipped = [k for k in head if k in state and state[k].shape != own[k].shape]
    for k in skipped:
        del state[k]
    missing = sorted(set(own) - set(state) - set(skipped))
    unexpected = sorted(set(state) - set(own))
    if unexpected or [k for k in missing if k not in head]:
        bad = (unexpected or missing)[:3]
        raise ModelError(f"init weights {path}: do not fit {type(model).__name__} "
                         f"({'unexpected' if unexpected else 'missing'} keys, e.g. {', '.join(bad)})")
    for k, v in state.items():
        if v.shape != own[k].shape:
            raise ModelError(f"init weights {path}: {k} has shape {tuple(v.shape)}, model expects {tuple(own[k].shape)}")
    model.load_state_dict(state, strict=False)
    return sha256_file(path), sorted(set(skipped) | set(k for k in missing if k in head))


def random_init_fingerprint(name: str, num_classes: int, img_size: int | None, init_seed: int) -> str:
    """Trials built from the same seeded random init share this fingerprint (and can be souped)."""
    return "random:" + hashlib.sha256(f"{name}|{num_classes}|{img_size}|{init_seed}".encode()).hexdigest()[:32]


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# Errors timm and torch raise for a network that cannot be built or run at a size (a feature map shrunk to 0 x 0,
# tensors that do not broadcast).
BUILD_ERRORS = (RuntimeError, ValueError, AssertionError, TypeError, IndexError, ZeroDivisionError)


def model_for_checkpoint(state_dict: dict[str, torch.Tensor], meta: CheckpointMeta, where) -> torch.nn.Module:
    """The network a checkpoint's metadata describes, with its weights in, in eval mode: what `ich predict` and `ich
    serve` load. Weights that do not fit (another architecture, a classifier of another class count,
    tables of another image size) or a network that cannot run at the checkpoint's img_size: one line naming it."""
    what = f"{meta.architecture} ({meta.num_classes} classes, {meta.img_size} px)"
    try:
        net = create_model(meta.architecture, meta.num_classes, meta.img_size)
    except BUILD_ERRORS as e:
        raise CheckpointError(f"{where}: cannot build {what} ({_first_line(e)})") from None
    own = net.state_dict()
    unexpected, missing = sorted(set(state_dict) - set(own)), sorted(set(own) - set(state_dict))
    if unexpected or missing:
        raise CheckpointError(f"{where}: weights do not fit {what} ({'unexpected' if unexpected else 'missing'} keys, "
                              f"e.g. {', '.join(map(repr, (unexpected or missing)[:3]))})")
    for k, v in own.items():  # in the model's order: a classifier's weight before its bias
        if tuple(state_dict[k].shape) != tuple(v.shape):
            raise CheckpointError(f"{where}: weights do not fit {what}: {k} has shape {tuple(state_dict[k].shape)}, "
                                  f"the model's is {tuple(v.shape)}")
    net.load_state_dict(state_dict)
    net.eval()
    try:
        with torch.no_grad():  # one blank image: a network that cannot run at this size fails here, in one line
            net(torch.zeros(1, 3, meta.img_size, meta.img_size))
    except BUILD_ERRORS as e:
        raise CheckpointError(f"{where}: {what} cannot run at img_size {meta.img_size} ({_first_line(e)})") from None
    return net


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0][:200]}" if lines else type(e).__name__
