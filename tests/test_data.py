"""Batched augmentation, eval transform, MixUp/CutMix targets, dataset loading."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from ich.data import (IMAGENET_MEAN, IMAGENET_STD, AugmentConfig, Prefetcher, Split, batch_indices, eval_transform,
                      load_dataset, mixup_cutmix, to_float, train_transform)
from ich.ingest import IngestError

MEAN = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
STD = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)


def images(b=8, s=32, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (b, s, s, 3), generator=g, dtype=torch.uint8)


def unnormalize(x: torch.Tensor) -> torch.Tensor:
    return x * STD + MEAN


def plain(**over) -> AugmentConfig:
    """No augmentation at all: full-image crop, no flip, no RandAugment / jitter / erasing."""
    d = dict(img_size=32, scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=0.0, color_jitter=0.0, rand_augment_n=0,
             random_erasing=0.0)
    d.update(over)
    return AugmentConfig(**d)


@pytest.mark.parametrize("stored,size", [(32, 32), (48, 32), (96, 32), (16, 24)])
def test_train_transform_shape_dtype_finite(stored, size):
    cfg = AugmentConfig(img_size=size)  # the paper's full recipe: RRC, flip, RandAugment(2, 9), jitter, erasing
    x = train_transform(images(16, stored), cfg, torch.Generator().manual_seed(0))
    assert x.shape == (16, 3, size, size) and x.dtype == torch.float32
    assert torch.isfinite(x).all()
    assert x.std() > 0.1  # not collapsed to a constant


def test_train_transform_is_a_function_of_the_generator_seed():
    cfg = AugmentConfig(img_size=32)
    u8 = images(32)
    a = train_transform(u8, cfg, torch.Generator().manual_seed(5))
    b = train_transform(u8, cfg, torch.Generator().manual_seed(5))
    c = train_transform(u8, cfg, torch.Generator().manual_seed(6))
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    # The global RNG plays no part: reseeding it changes nothing.
    torch.manual_seed(123)
    d = train_transform(u8, cfg, torch.Generator().manual_seed(5))
    assert torch.equal(a, d)
    # The input batch is not modified in place.
    assert torch.equal(u8, images(32))


def test_each_sample_gets_its_own_random_parameters():
    cfg = AugmentConfig(img_size=32)
    one = images(1, seed=3)
    batch = one.expand(16, -1, -1, -1).contiguous()  # sixteen copies of the same image
    x = train_transform(batch, cfg, torch.Generator().manual_seed(0))
    flat = x.flatten(1)
    distinct = {tuple(torch.round(row[:64] * 1e4).tolist()) for row in flat}
    assert len(distinct) == 16
    for i in range(16):
        for j in range(i + 1, 16):
            assert not torch.allclose(flat[i], flat[j]), (i, j)


def test_no_augmentation_is_the_identity_and_hflip_mirrors():
    u8 = images(4)
    ref = (to_float(u8) - MEAN) / STD
    same = train_transform(u8, plain(), torch.Generator().manual_seed(0))
    torch.testing.assert_close(same, ref, atol=1e-5, rtol=0)
    mirrored = train_transform(u8, plain(hflip=1.0), torch.Generator().manual_seed(0))
    torch.testing.assert_close(mirrored, ref.flip(-1), atol=1e-5, rtol=0)
    # hflip 0.5: some samples mirrored, some not, on a large enough batch.
    u8 = images(64)
    ref = (to_float(u8) - MEAN) / STD
    half = train_transform(u8, plain(hflip=0.5), torch.Generator().manual_seed(0))
    is_flip = [torch.allclose(half[i], ref[i].flip(-1), atol=1e-5) for i in range(64)]
    is_same = [torch.allclose(half[i], ref[i], atol=1e-5) for i in range(64)]
    assert all(f != s for f, s in zip(is_flip, is_same))
    assert 16 <= sum(is_flip) <= 48


@pytest.mark.parametrize("area", [1.0, 0.25, 0.0625])
def test_random_resized_crop_zooms_by_the_sampled_area(area):
    # Channel 0 is a horizontal ramp, channel 1 a vertical one, channel 2 constant white: after the crop, the
    # ramp's slope gives the crop's width and a stray zero in channel 2 would show padding outside the image.
    s, b = 64, 16
    ramp = torch.arange(s, dtype=torch.int64) * 4
    u8 = torch.zeros(b, s, s, 3, dtype=torch.uint8)
    u8[..., 0] = ramp.view(1, 1, s).to(torch.uint8)
    u8[..., 1] = ramp.view(1, s, 1).to(torch.uint8)
    u8[..., 2] = 255
    cfg = plain(scale=(area, area), ratio=(1.0, 1.0))
    x = unnormalize(train_transform(u8, cfg, torch.Generator().manual_seed(1)))
    side = area ** 0.5  # crop side as a fraction of the image
    expected_slope = 4 / 255 * side * s / 32  # value change per output pixel
    inner = slice(2, 30)  # away from the border, where bilinear sampling of a ramp is exact
    dx = x[:, 0, inner, inner].diff(dim=-1)
    dy = x[:, 1, inner, inner].diff(dim=-2)
    torch.testing.assert_close(dx.median(), torch.tensor(expected_slope), atol=1e-4, rtol=0.02)
    torch.testing.assert_close(dy.median(), torch.tensor(expected_slope), atol=1e-4, rtol=0.02)
    assert x[:, 2, 1:-1, 1:-1].min() > 0.99  # the crop stays inside the image
    if area < 1:  # crops land at different places in different samples
        assert x[:, 0, 16, 16].unique().numel() > b // 2


def test_random_erasing_fills_a_rectangle_with_noise():
    u8 = torch.full((64, 32, 32, 3), 128, dtype=torch.uint8)
    ref = (to_float(u8) - MEAN) / STD
    x = train_transform(u8, plain(random_erasing=1.0), torch.Generator().manual_seed(0))
    changed = (x - ref).abs().amax(dim=1) > 1e-4  # (B, H, W)
    share = changed.float().mean(dim=(1, 2))
    assert (share > 0.005).all() and (share < 0.5).all()
    for m in changed[:8]:
        rows, cols = m.any(dim=1).nonzero().flatten(), m.any(dim=0).nonzero().flatten()
        box = m[rows.min():rows.max() + 1, cols.min():cols.max() + 1]
        assert box.float().mean() > 0.95  # one filled rectangle


def test_eval_transform_center_crops_then_resizes():
    # Distinct value per pixel so the crop window can be read back exactly.
    s = 8
    u8 = torch.arange(s * s * 3, dtype=torch.int64).remainder(256).to(torch.uint8).view(1, s, s, 3)
    full = to_float(u8)
    cfg = AugmentConfig(img_size=4, eval_crop_pct=0.5)
    x = unnormalize(eval_transform(u8, cfg))
    torch.testing.assert_close(x, full[..., 2:6, 2:6], atol=1e-6, rtol=0)
    # crop_pct 1 at the stored size: only normalisation.
    x = unnormalize(eval_transform(u8, AugmentConfig(img_size=s, eval_crop_pct=1.0)))
    torch.testing.assert_close(x, full, atol=1e-6, rtol=0)
    # The paper's eval at small scale: 256 -> crop 224 is crop_pct 0.875; then resize to img_size.
    big = images(2, 64)
    x = eval_transform(big, AugmentConfig(img_size=32, eval_crop_pct=0.875))
    assert x.shape == (2, 3, 32, 32) and torch.isfinite(x).all()
    # Deterministic, and a uniform image stays uniform (no border leaks in).
    grey = torch.full((1, 40, 40, 3), 77, dtype=torch.uint8)
    g = unnormalize(eval_transform(grey, AugmentConfig(img_size=32, eval_crop_pct=0.875)))
    torch.testing.assert_close(g, torch.full_like(g, 77 / 255), atol=1e-5, rtol=0)
    torch.testing.assert_close(eval_transform(big, AugmentConfig(img_size=32)),
                               eval_transform(big, AugmentConfig(img_size=32)), atol=0, rtol=0)


def _constant_batch(b=8, c=10):
    # Sample i is an image filled with the value i (so mixing can be read back), label i % c.
    x = torch.arange(b, dtype=torch.float32).view(b, 1, 1, 1).expand(b, 3, 16, 16).contiguous()
    y = torch.arange(b) % c
    return x, y


@pytest.mark.parametrize("ls", [0.0, 0.1, 0.3])
def test_label_smoothing_without_mixing(ls):
    x, y = _constant_batch()
    c = 10
    xm, t = mixup_cutmix(x, y, c, mixup=0.0, cutmix=0.0, label_smoothing=ls, rng=np.random.default_rng(0))
    assert torch.equal(xm, x)
    torch.testing.assert_close(t.sum(1), torch.ones(len(y)))
    assert torch.allclose(t[torch.arange(len(y)), y], torch.tensor(1 - ls + ls / c))
    off = t.clone()
    off[torch.arange(len(y)), y] = -1
    assert torch.allclose(off[off >= 0], torch.tensor(ls / c))


@pytest.mark.parametrize("seed", range(5))
def test_mixup_targets_follow_the_pixels(seed):
    x, y = _constant_batch()
    c = 10
    xm, t = mixup_cutmix(x, y, c, mixup=0.4, cutmix=0.0, label_smoothing=0.0, rng=np.random.default_rng(seed))
    torch.testing.assert_close(t.sum(1), torch.ones(len(y)))
    # Sample i became lam*i + (1-lam)*(b-1-i): recover lam from sample 0 and check every target.
    b = len(y)
    lam = 1 - xm[0, 0, 0, 0].item() / (b - 1)
    expected = torch.zeros(b, c)
    expected[torch.arange(b), y] += lam
    expected[torch.arange(b), y.flip(0)] += 1 - lam
    torch.testing.assert_close(t, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(xm, lam * x + (1 - lam) * x.flip(0), atol=1e-5, rtol=0)


@pytest.mark.parametrize("seed", range(8))
def test_cutmix_targets_equal_the_pasted_area(seed):
    x, y = _constant_batch()
    c, b = 10, 8
    xm, t = mixup_cutmix(x, y, c, mixup=0.0, cutmix=1.0, label_smoothing=0.1, rng=np.random.default_rng(seed))
    torch.testing.assert_close(t.sum(1), torch.ones(b))
    for i in range(b):
        own = (xm[i, 0] == i).float().mean().item()  # share of pixels still from sample i
        assert torch.isin(xm[i], torch.tensor([float(i), float(b - 1 - i)])).all()
        # weight of y_i = (1 - ls + ls/c) * own + ls/c * (1 - own); labels here are distinct within the pair
        expected = (1 - 0.1 + 0.01) * own + 0.01 * (1 - own)
        assert t[i, y[i]].item() == pytest.approx(expected, abs=1e-5)


def test_mixup_and_cutmix_switch_and_prob():
    x, y = _constant_batch()
    kinds = set()
    for seed in range(40):
        xm, t = mixup_cutmix(x, y, 10, mixup=0.8, cutmix=1.0, label_smoothing=0.0, rng=np.random.default_rng(seed))
        values = xm[0, 0].unique()
        kinds.add("cutmix" if len(values) <= 2 and set(values.tolist()) <= {0.0, 7.0} else "mixup")
        torch.testing.assert_close(t.sum(1), torch.ones(8))
    assert kinds == {"cutmix", "mixup"}
    xm, t = mixup_cutmix(x, y, 10, mixup=0.8, cutmix=1.0, label_smoothing=0.0, rng=np.random.default_rng(0), prob=0.0)
    assert torch.equal(xm, x) and torch.equal(t, torch.nn.functional.one_hot(y, 10).float())


def test_batch_indices_cover_every_sample_once():
    rng = np.random.default_rng(0)
    batches = batch_indices(100, 32, rng, drop_last=False)
    assert [len(b) for b in batches] == [32, 32, 32, 4]
    assert sorted(np.concatenate(batches).tolist()) == list(range(100))
    assert [len(b) for b in batch_indices(100, 32, rng, drop_last=True)] == [32, 32, 32]
    assert np.concatenate(batch_indices(10, 4, None, drop_last=False)).tolist() == list(range(10))


def test_prefetcher_yields_the_batches_in_order():
    imgs = np.arange(10 * 2 * 2 * 3, dtype=np.uint8).reshape(10, 2, 2, 3)
    split = Split(imgs, np.arange(10, dtype=np.int64))
    batches = [np.array([3, 1]), np.array([0, 9, 5]), np.array([2])]
    pf = Prefetcher(split, batches, torch.device("cpu"))
    got = list(pf)
    pf.close()
    assert [lab.tolist() for _, lab in got] == [[3, 1], [0, 9, 5], [2]]
    assert all(torch.equal(im, torch.from_numpy(imgs[b])) for (im, _), b in zip(got, batches))


def test_load_dataset_digits(digits_dataset, digits_data):
    d = digits_data
    assert d.classes == [str(i) for i in range(10)] and d.num_classes == 10 and d.image_size == 32
    sizes = {k: len(v) for k, v in d.splits.items()}
    assert sum(sizes.values()) == 1797 and sizes["train"] > 1400 and sizes["val"] > 150 and sizes["test"] > 150
    for split in d.splits.values():
        assert split.images.shape[1:] == (32, 32, 3) and split.images.dtype == np.uint8
        assert set(np.unique(split.labels).tolist()) == set(range(10))  # stratified: every class everywhere
        assert len(split.paths) == len(split)
        # the digits are grey: R == G == B
        assert (split.images[..., 0] == split.images[..., 1]).all()
    with pytest.raises(IngestError, match="no 'holdout' split"):
        load_dataset(digits_dataset, splits=("holdout",))
    with pytest.raises(IngestError, match="run `ich ingest` first"):
        load_dataset(digits_dataset / "nope")
