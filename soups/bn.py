"""BatchNorm statistics for soups.

Averaged BN running statistics are not the statistics of the averaged network. recalibrate_bn recomputes
them on (train) data; whether that helps is decided on val by the caller ('average' | 'recalibrate' | 'auto').
"""
from __future__ import annotations

import itertools
from collections.abc import Iterable

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

def batchnorm_layers(model: nn.Module) -> list[_BatchNorm]:
    """BN layers that keep running statistics (timm's BatchNormAct2d subclasses BatchNorm2d)."""
    return [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]


def has_batchnorm(model: nn.Module) -> bool:
    return bool(batchnorm_layers(model))


def _inputs(batch):
    """A batch may be a tensor or an (images, labels, ...) tuple/list."""
    return batch[0] if isinstance(batch, (tuple, list)) else batch


@torch.no_grad()
def recalibrate_bn(model: nn.Module, batches: Iterable, device: torch.device | str | None = None) -> nn.Module:
    """Recompute every BN layer's running mean/var as the exact average over `batches`; returns model in eval mode.

    Running stats are reset and momentum set to None (cumulative moving average), then batches are
    forwarded with only the BN layers in train mode: dropout and drop-path stay off, so the statistics are
    those of the network as it runs at evaluation.
    """
    layers = batchnorm_layers(model)
    if not layers:
        return model.eval()
    if device is None:
        device = next(itertools.chain(model.parameters(), model.buffers())).device
    it = iter(batches)
    try:
        first = next(it)  # refuse an empty loader before touching the statistics
    except StopIteration:
        raise ValueError("recalibrate_bn: no batches to recompute BatchNorm statistics from") from None
    momenta = [m.momentum for m in layers]
    for m in layers:
        m.reset_running_stats()
        m.momentum = None
    model.eval()
    for m in layers:
        m.train()
    try:
        for batch in itertools.chain([first], it):
            model(_inputs(batch).to(device))
    finally:
        for m, momentum in zip(layers, momenta):
            m.momentum = momentum
        model.eval()
    return model


def choose_bn_mode(avg_score: float, recal_score: float, higher_is_better: bool = True) -> str:
    """'recalibrate' only when it strictly beats averaged statistics on val; otherwise keep 'average'."""
    better = recal_score > avg_score if higher_is_better else recal_score < avg_score
    return "recalibrate" if better else "average"
