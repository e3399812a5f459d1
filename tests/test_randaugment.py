"""RandAugment on torchvision's scale (issue 22 item 1), ColorJitter with hue, the options' checked scale, and
AdamW's decay groups.

References are torchvision.transforms.functional's own ops called with the parameters torchvision's RandAugment
documents at magnitude 9 of 31 bins (rotate 9°, shear 0.09, translate 150/331 * 9/30 of the size, factors
1 ± 0.27, posterize 7 bits, solarize 0.7), written out here, never taken from the code under test."""
from __future__ import annotations

import math

import pytest
import torch
import yaml
import torchvision.transforms.functional as TF
from torchvision.transforms import InterpolationMode

from ich.data import (RAND_AUGMENT_OPS, AugmentConfig, adjust_hue, color_jitter, rand_augment, rand_augment_colour,
                      train_transform)
from ich.errors import ConfigError, IchError
from ich.train import TrainConfig, Trainer, weight_decay_groups
from sweeps.config import DEFAULT_CONFIG, load_config

S = 96  # image side
MAG, BINS = 9, 31
GEOMETRIC = ("shear_x", "shear_y", "translate_x", "translate_y", "rotate")
COLOUR = ("brightness", "color", "contrast", "sharpness", "posterize", "solarize", "autocontrast", "equalize")


def planted(b=2, seed=0) -> torch.Tensor:
    """(b, 3, S, S) float images on the uint8 grid: channel 0 a bright Gaussian dot off center, channels 1-2
    smooth gradients plus a little noise, values kept within 8..247 (no pure black or white)."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(S, dtype=torch.float32), torch.arange(S, dtype=torch.float32), indexing="ij")
    dot = torch.exp(-((xx - 60.5) ** 2 + (yy - 33.5) ** 2) / (2 * 2.0 ** 2))
    img = torch.stack([8 + 239 * dot, 30 + 180 * xx / S, 40 + 150 * yy / S])
    out = img.expand(b, -1, -1, -1) + torch.randint(-6, 7, (b, 3, S, S), generator=g) * (torch.arange(3) > 0).view(3, 1, 1)
    return out.round().clamp(8, 247) / 255


def forced(name: str, b: int, sign: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """One RandAugment slot holding op `name` with sign `sign` for all b samples."""
    return torch.full((1, b), RAND_AUGMENT_OPS.index(name)), torch.full((1, b), sign)


def centroid(channel: torch.Tensor) -> torch.Tensor:
    """(x, y) intensity-weighted center of a (H, W) map, in pixel coordinates."""
    yy, xx = torch.meshgrid(torch.arange(channel.shape[0], dtype=torch.float32),
                            torch.arange(channel.shape[1], dtype=torch.float32), indexing="ij")
    w = channel.clamp(min=0) / channel.clamp(min=0).sum()
    return torch.stack([(w * xx).sum(), (w * yy).sum()])


def dot_only(x: torch.Tensor) -> torch.Tensor:
    return (x[0, 0] - 8 / 255).clamp(min=0)


# ------------------------------------------------------------------------------------ geometric ops

def torchvision_geometric(img: torch.Tensor, name: str, sign: float) -> torch.Tensor:
    """torchvision's _apply_op for the geometric ops, at magnitude 9 of 31 bins, bilinear (our warp's sampling)."""
    bil = InterpolationMode.BILINEAR
    if name == "rotate":
        return TF.rotate(img, sign * 30.0 * 9 / 30, interpolation=bil)
    if name in ("shear_x", "shear_y"):
        deg = math.degrees(math.atan(sign * 0.3 * 9 / 30))
        shear = [deg, 0.0] if name == "shear_x" else [0.0, deg]
        return TF.affine(img, angle=0.0, translate=[0, 0], scale=1.0, shear=shear, interpolation=bil, center=[0, 0])
    px = int(sign * 150.0 / 331.0 * S * 9 / 30)  # torchvision truncates to whole pixels
    shift = [px, 0] if name == "translate_x" else [0, px]
    return TF.affine(img, angle=0.0, translate=shift, scale=1.0, shear=[0.0, 0.0], interpolation=bil)


@pytest.mark.parametrize("sign", [1.0, -1.0])
@pytest.mark.parametrize("name", GEOMETRIC)
def test_geometric_op_at_magnitude_9_matches_torchvision(name, sign):
    x = planted(1)
    ours = rand_augment(x, *forced(name, 1, sign), MAG, BINS)
    ref = torchvision_geometric(x, name, sign)
    moved = centroid(dot_only(ours)) - centroid(dot_only(x))
    # the dot moved, by the documented amount, the way torchvision moves it
    assert moved.norm() > 1.5
    if name.startswith("translate"):
        exact = sign * 150.0 / 331.0 * S * 9 / 30  # 13.05 px; torchvision moves int() of it
        axis = 0 if name == "translate_x" else 1
        assert moved[axis].item() == pytest.approx(exact, abs=0.02) and moved[1 - axis].abs() < 0.02
        torch.testing.assert_close(centroid(dot_only(ours)), centroid(dot_only(ref)), atol=0.1, rtol=0)
    else:
        torch.testing.assert_close(centroid(dot_only(ours)), centroid(dot_only(ref)), atol=0.02, rtol=0)
        torch.testing.assert_close(ours, ref, atol=2e-4, rtol=0)  # every pixel, borders and zero fill included
    if name == "rotate":  # 9° counter-clockwise for +: the dot (right of and above the center) turns up-left
        c = torch.tensor([S / 2 - 0.5, S / 2 - 0.5])
        before, after = centroid(dot_only(x)) - c, centroid(dot_only(ours)) - c
        turned = math.degrees(math.atan2(-after[1], after[0]) - math.atan2(-before[1], before[0]))
        assert turned == pytest.approx(sign * 9.0, abs=0.1)


def test_geometric_ops_compose_slot_by_slot_like_torchvision():
    x = planted(1)
    ops = torch.tensor([[RAND_AUGMENT_OPS.index("rotate")], [RAND_AUGMENT_OPS.index("shear_x")]])
    ours = rand_augment(x, ops, torch.tensor([[1.0], [-1.0]]), MAG, BINS)
    ref = torchvision_geometric(torchvision_geometric(x, "rotate", 1.0), "shear_x", -1.0)
    torch.testing.assert_close(centroid(dot_only(ours)), centroid(dot_only(ref)), atol=0.05, rtol=0)


# ------------------------------------------------------------------------------------ colour ops

def torchvision_colour(img: torch.Tensor, name: str, sign: float) -> torch.Tensor:
    """torchvision's _apply_op for the pixel ops at magnitude 9 of 31 bins (posterize/equalize on uint8)."""
    f = 1.0 + sign * 0.9 * 9 / 30
    u8 = (img * 255).round().to(torch.uint8)
    if name == "brightness":
        return TF.adjust_brightness(img, f)
    if name == "color":
        return TF.adjust_saturation(img, f)
    if name == "contrast":
        return TF.adjust_contrast(img, f)
    if name == "sharpness":
        return TF.adjust_sharpness(img, f)
    if name == "posterize":
        return TF.posterize(u8, 7).float() / 255  # 8 - round(9 / (30 / 4)) = 7 bits
    if name == "solarize":
        return TF.solarize(img, 0.7)  # threshold 255 -> 0 over the bins: 255 * (1 - 9/30) / 255
    if name == "autocontrast":
        return TF.autocontrast(img)
    return torch.stack([TF.equalize(u) for u in u8]).float() / 255


@pytest.mark.parametrize("sign", [1.0, -1.0])
@pytest.mark.parametrize("name", COLOUR)
def test_colour_op_at_magnitude_9_matches_torchvision(name, sign):
    x = torch.cat([planted(3), torch.full((1, 3, S, S), 100 / 255)])  # a flat image too (equalize/autocontrast)
    ours = rand_augment_colour(x, *forced(name, 4, sign), MAG, BINS)
    ref = torchvision_colour(x, name, sign)
    if name in ("posterize", "equalize"):
        assert torch.equal((ours * 255).round(), (ref * 255).round())  # exact on uint8
    else:
        torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)
    assert not torch.allclose(ours[:3], x[:3], atol=1e-3)  # the op did something (control for the comparison)


def test_sharpness_leaves_images_below_3x3_alone_like_torchvision():
    x = torch.rand(2, 3, 2, 5, generator=torch.Generator().manual_seed(3))
    ours = rand_augment_colour(x, *forced("sharpness", 2), MAG, BINS)
    torch.testing.assert_close(ours, TF.adjust_sharpness(x, 1.27), atol=0, rtol=0)
    assert torch.equal(ours, x)


def test_ops_act_per_sample_in_one_batch():
    x = planted(len(RAND_AUGMENT_OPS))
    ops = torch.arange(len(RAND_AUGMENT_OPS)).view(1, -1)
    signs = torch.where(torch.arange(len(RAND_AUGMENT_OPS)) % 2 == 0, 1.0, -1.0).view(1, -1)
    batch = rand_augment(x, ops, signs, MAG, BINS)
    for i in range(len(RAND_AUGMENT_OPS)):
        alone = rand_augment(x[i:i + 1], ops[:, i:i + 1], signs[:, i:i + 1], MAG, BINS)
        torch.testing.assert_close(batch[i:i + 1], alone, atol=1e-6, rtol=0)


# ------------------------------------------------------------------------------------ edges of the scale

@pytest.mark.parametrize("sign", [1.0, -1.0])
@pytest.mark.parametrize("name", [op for op in RAND_AUGMENT_OPS if op not in ("autocontrast", "equalize")])
def test_magnitude_0_is_the_identity(name, sign):
    # AutoContrast and Equalize take no magnitude in torchvision: they act alike at every magnitude.
    x = planted(2)
    torch.testing.assert_close(rand_augment(x, *forced(name, 2, sign), 0, BINS), x, atol=1e-5, rtol=0)


def test_solarize_at_magnitude_0_inverts_only_pure_white_like_torchvision():
    x = torch.tensor([0.0, 0.5, 254 / 255, 1.0]).view(1, 1, 1, 4).expand(1, 3, 1, 4).contiguous()
    ours = rand_augment_colour(x, *forced("solarize", 1), 0, BINS)
    torch.testing.assert_close(ours, TF.solarize(x, 1.0), atol=0, rtol=0)
    assert ours[0, 0, 0].tolist() == pytest.approx([0.0, 0.5, 254 / 255, 0.0])


@pytest.mark.parametrize("name", COLOUR)
def test_magnitude_bins_minus_1_stays_in_range_with_positive_factors(name):
    x = torch.cat([planted(2), torch.rand(2, 3, S, S, generator=torch.Generator().manual_seed(1))])
    for sign in (1.0, -1.0):
        y = rand_augment_colour(x, *forced(name, 4, sign), BINS - 1, BINS)
        assert y.min() >= 0 and y.max() <= 1
    # the strongest darkening is a factor 0.1, not 0 and not negative (timm's m = 12 gave 1 - 0.9 * 1.2 < 0)
    dark = rand_augment_colour(x, *forced("brightness", 4, -1.0), BINS - 1, BINS)
    torch.testing.assert_close(dark, x * 0.1, atol=1e-6, rtol=0)
    torch.testing.assert_close(rand_augment_colour(x, *forced("posterize", 4), BINS - 1, BINS),
                               torch.stack([TF.posterize((u * 255).round().to(torch.uint8), 4) for u in x]).float() / 255)


@pytest.mark.parametrize("magnitude", [-1, 31, 40, float("nan")])
def test_magnitude_outside_the_bins_is_refused_in_one_line(magnitude):
    for make in (lambda: TrainConfig(rand_augment_magnitude=magnitude),
                 lambda: TrainConfig.from_dict({"rand_augment_magnitude": magnitude}),
                 lambda: AugmentConfig(rand_augment_magnitude=magnitude)):
        with pytest.raises(ConfigError) as e:
            make()
        assert isinstance(e.value, IchError) and "\n" not in str(e.value)
        assert str(e.value).startswith("rand_augment_magnitude must be within [0, 30]")
    # control: the edges themselves are on the scale, and fewer bins move the top edge
    TrainConfig(rand_augment_magnitude=0)
    TrainConfig(rand_augment_magnitude=30)
    with pytest.raises(ConfigError, match=r"within \[0, 10\]"):
        TrainConfig(rand_augment_magnitude=11, rand_augment_bins=11)


@pytest.mark.parametrize("option,bad,good", [("rand_augment_bins", 1, 2), ("rand_augment_n", -1, 0),
                                             ("color_jitter", 1.0, 0.9), ("color_jitter", -0.1, 0.0),
                                             ("color_jitter_hue", 0.6, 0.5), ("color_jitter_hue", -0.1, 0.0)])
def test_other_augmentation_options_are_checked(option, bad, good):
    extra = {"rand_augment_magnitude": 0} if option == "rand_augment_bins" else {}
    with pytest.raises(ConfigError, match=f"^{option} must be"):
        TrainConfig.from_dict({option: bad, **extra})
    TrainConfig.from_dict({option: good, **extra})


# ------------------------------------------------------------------------------------ old configs

RETIRED = r"rand_augment_m \(timm's 0-10 magnitude scale\) is no longer read: use rand_augment_magnitude"


def test_an_old_rand_augment_m_is_refused_with_how_to_convert():
    with pytest.raises(ConfigError, match=f"^{RETIRED}.*magnitude = 3\\*m") as e:
        TrainConfig.from_dict({"rand_augment_m": 9})  # Tune params, warm start, bench recipes
    assert "\n" not in str(e.value)
    with pytest.raises(TypeError):
        TrainConfig(rand_augment_m=9)  # not a field any more


@pytest.mark.parametrize("section", ["train", "search", "grid", "init.warm_start"])
def test_an_old_sweep_config_is_refused_in_one_line_naming_the_key(tmp_path, section):
    raw = yaml.safe_load(DEFAULT_CONFIG.read_text())  # cpu.yaml with the old key in one section
    if section == "train":
        raw["train"]["rand_augment_m"] = 9
    elif section == "search":
        raw["search"]["rand_augment_m"] = raw["search"].pop("rand_augment_magnitude")
    elif section == "grid":  # a grid runs without a search
        raw.pop("search")
        raw["grid"] = {"rand_augment_m": [3, 9]}
    else:
        raw["init"]["warm_start"]["rand_augment_m"] = 9
    text = yaml.safe_dump(raw)
    assert text.count("rand_augment_m:") == 1
    path = tmp_path / "old.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=f"old.yaml: {section}.{RETIRED}") as e:
        load_config(path)
    assert "\n" not in str(e.value)
    path.write_text(text.replace("rand_augment_m:", "rand_augment_magnitude:"))  # control: the new key loads
    load_config(path)


def test_ich_train_refuses_an_old_flag_in_one_line(digits_dataset, capsys):
    from sweeps.cli import main as ich_main
    assert ich_main(["train", str(digits_dataset), "--rand-augment-m", "9", "--epochs", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("ich train: error: rand_augment_m (timm's")
    # control: the same command with the value off the new scale is refused by the check, not by argparse
    assert ich_main(["train", str(digits_dataset), "--rand-augment-magnitude", "31", "--epochs", "1"]) == 2
    assert "rand_augment_magnitude must be within [0, 30]" in capsys.readouterr().err


def test_an_old_key_in_set_is_refused_with_how_to_convert():
    with pytest.raises(ConfigError, match=f"--set train.rand_augment_m: {RETIRED}"):
        load_config(None, sets=["train.rand_augment_m=9"])
    with pytest.raises(ConfigError, match=f"--set grid.rand_augment_m: {RETIRED}"):
        load_config(None, sets=["search=null", "grid.rand_augment_m=[3, 9]"])
    assert load_config(None, sets=["train.rand_augment_magnitude=9"]).train["rand_augment_magnitude"] == 9


@pytest.mark.parametrize("spec,bins", [("{uniform: [5, 40]}", 31), ("{uniform: [-1, 9]}", 31),
                                       ("{choice: [3, 31]}", 31), ("{randint: [0, 32]}", 31),
                                       ("{uniform: [5, 15]}", 11)])
def test_a_search_range_outside_the_scale_is_refused(spec, bins):
    sets = [f"search.rand_augment_magnitude={spec}", f"train.rand_augment_bins={bins}"]
    with pytest.raises(ConfigError, match=r"search\.rand_augment_magnitude .* leaves the allowed range: "
                                          rf"rand_augment_magnitude must be within \[0, {bins - 1}\]") as e:
        load_config(None, sets=sets)
    assert "\n" not in str(e.value)
    # control: the same search inside the scale loads (randint's high end is exclusive)
    ok = {"{uniform: [5, 40]}": "{uniform: [5, 30]}", "{uniform: [-1, 9]}": "{uniform: [0, 9]}",
          "{choice: [3, 31]}": "{choice: [3, 30]}", "{randint: [0, 32]}": "{randint: [0, 31]}",
          "{uniform: [5, 15]}": "{uniform: [5, 10]}"}[spec]
    load_config(None, sets=[f"search.rand_augment_magnitude={ok}", f"train.rand_augment_bins={bins}"])


def test_a_fixed_value_off_the_scale_is_refused_before_anything_starts():
    with pytest.raises(ConfigError, match=r"train: rand_augment_magnitude must be within \[0, 30\]"):
        load_config(None, sets=["train.rand_augment_magnitude=40"])


# ------------------------------------------------------------------------------------ ColorJitter with hue

@pytest.mark.parametrize("shift", [0.0, 0.1, -0.25, 0.5])
def test_batched_hue_matches_torchvision_adjust_hue(shift):
    x = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    x[2, :, :4] = 0.5  # grey pixels: no hue to turn
    ours = adjust_hue(x, torch.full((3,), shift))
    ref = torch.stack([TF.adjust_hue(u, shift) for u in x])
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)


def test_color_jitter_runs_each_samples_ops_in_its_own_order():
    x = planted(2)
    factors = torch.tensor([[1.3, 0.7, 1.2, 0.1], [0.8, 1.4, 0.6, -0.2]])
    order = torch.tensor([[3, 0, 2, 1], [1, 2, 0, 3]])
    ours = color_jitter(x, factors, order)
    ops = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue]
    for i in range(2):
        ref = x[i]
        for op in order[i].tolist():
            ref = ops[op](ref, float(factors[i, op]))
        torch.testing.assert_close(ours[i], ref, atol=1e-5, rtol=0)
    swapped = color_jitter(x, factors, order.flip(1))  # control: the order matters for these factors
    assert not torch.allclose(swapped, ours, atol=1e-3)


def test_train_transform_is_a_function_of_the_seed_with_every_op_on():
    cfg = AugmentConfig(img_size=32, color_jitter=0.4, color_jitter_hue=0.1, rand_augment_magnitude=30)
    u8 = torch.randint(0, 256, (32, 40, 40, 3), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    a = train_transform(u8, cfg, torch.Generator().manual_seed(7))
    assert torch.equal(a, train_transform(u8, cfg, torch.Generator().manual_seed(7)))  # resume replays the batch
    assert not torch.allclose(a, train_transform(u8, cfg, torch.Generator().manual_seed(8)))
    assert torch.isfinite(a).all()


# ------------------------------------------------------------------------------------ AdamW's decay groups

def _decay_of(cfg: TrainConfig, model: torch.nn.Module) -> dict[str, float]:
    groups = weight_decay_groups(model, cfg)
    by_id = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    return {name: by_id[id(p)] for name, p in model.named_parameters()}


@pytest.mark.parametrize("on", [False, True])
def test_decay_norm_and_bias_puts_weight_decay_on_norms_and_biases(on, digits_data):
    cfg = TrainConfig(epochs=1, weight_decay=0.05, decay_norm_and_bias=on)
    trainer = Trainer(cfg, digits_data)
    # the optimizer's own groups, parameter by parameter
    by_id = {id(p): g["weight_decay"] for g in trainer.optimizer.param_groups for p in g["params"]}
    decay = {name: by_id[id(p)] for name, p in trainer.model.named_parameters()}
    assert decay == _decay_of(cfg, trainer.model)
    norms_and_biases = [n for n, p in trainer.model.named_parameters() if p.ndim <= 1]
    weights = [n for n, p in trainer.model.named_parameters() if p.ndim > 1 and "pos" not in n]
    assert any("norm" in n for n in norms_and_biases) and any(n.endswith("bias") for n in norms_and_biases)
    assert all(decay[n] == 0.05 for n in weights)
    assert all(decay[n] == (0.05 if on else 0.0) for n in norms_and_biases)
