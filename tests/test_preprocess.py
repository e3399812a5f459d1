"""One preprocessing contract (docs/design.md#9).

Mean, std, crop fraction, interpolation and image size come from the init weights' config (a timm hub tag's
pretrained config, a JSON sidecar beside a local file, a checkpoint's metadata), else the dataset's defaults;
every checkpoint records them; one function applies them in training eval, soups, `ich predict` and the served
model. The parity test fine-tunes from a local "pretrained" file whose config says mean = std = 0.5, crop 0.95,
bicubic, through the real sweep (Ray, MLflow server, soups), and compares logits on test images.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from ich.checkpoint import META, WEIGHTS, CheckpointError, load_checkpoint, read_meta, save_checkpoint
from ich.data import AugmentConfig, eval_transform
from ich.errors import ConfigError
from ich.decode import decode_image
from ich.init_source import hub_preprocess, init_preprocess
from ich.models import create_model
from ich.preprocess import IMAGENET_MEAN, IMAGENET_STD, Preprocess, PreprocessError, dataset_default, resolve, transform
from ich.train import TrainConfig, Trainer
from tests.fixtures_sweep import sweep_args, write_sweep_config

ROOT = Path(__file__).resolve().parent.parent
HALF = [0.5, 0.5, 0.5]
PRETRAINED_CFG = {"mean": HALF, "std": HALF, "crop_pct": 0.95, "interpolation": "bicubic", "input_size": [3, 32, 32]}
EXPERIMENT = "preprocess-parity"
MODEL_NAME = "preprocess-parity-soup"


def write_pretrained(folder: Path) -> Path:
    """A tiny CoAtNet saved as timm/Hugging Face ship weights: model.safetensors + config.json beside it."""
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(123)
    net = create_model("coatnet_tiny_ich", 10, 32)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(
        {"architecture": "coatnet_tiny_ich", "num_classes": 10, "pretrained_cfg": PRETRAINED_CFG}))
    return folder / "model.safetensors"


def v1_meta(**extra) -> dict:
    """A checkpoint.json as format 1 wrote it (no preprocess field)."""
    return {"architecture": "coatnet_tiny_ich", "img_size": 32, "num_classes": 2, "class_names": ["a", "b"],
            "dataset_fingerprint": "d" * 64, "init_fingerprint": "random:" + "0" * 32, "epoch": 3,
            "metrics": {"val_accuracy": 0.5}, "extra": extra, "format_version": 1}


# ---------------------------------------------------------------------------------------------- where values come from

def test_hub_tags_take_timm_pretrained_configs_without_network():
    for tag in ("coatnet_0_rw_224.sw_in1k", "coatnet_2_rw_224.sw_in12k_ft_in1k"):
        p = hub_preprocess(tag)
        assert (p["mean"], p["std"], p["crop_pct"], p["interpolation"], p["input_size"]) == \
            (HALF, HALF, 0.95, "bicubic", 224), tag
        assert p["source"] == f"timm:{tag}"
    resnet = hub_preprocess("resnet50.a1_in1k")
    assert resnet["mean"] == pytest.approx(IMAGENET_MEAN) and resnet["crop_pct"] == 0.95
    with pytest.raises(PreprocessError, match="hub:coatnet_0_rw_224.nope: Invalid pretrained tag"):
        hub_preprocess("coatnet_0_rw_224.nope")
    with pytest.raises(PreprocessError, match="no pretrained config"):
        hub_preprocess("no_such_model.x")


def test_local_files_take_a_sidecar_or_checkpoint_metadata(tmp_path):
    weights = write_pretrained(tmp_path / "hf")  # config.json with pretrained_cfg (timm's hub layout)
    got = init_preprocess(weights)
    assert (got["mean"], got["crop_pct"], got["interpolation"]) == (HALF, 0.95, "bicubic")
    assert got["source"] == f"sidecar:{tmp_path / 'hf' / 'config.json'}"

    named = tmp_path / "named" / "backbone.safetensors"  # <name>.json, keys at the top level, wins over config.json
    named.parent.mkdir()
    named.write_bytes(weights.read_bytes())
    (named.parent / "backbone.json").write_text(json.dumps({"mean": [0.1, 0.2, 0.3], "std": [1, 1, 1],
                                                            "crop_pct": 0.9, "interpolation": "bilinear"}))
    (named.parent / "config.json").write_text(json.dumps({"pretrained_cfg": PRETRAINED_CFG}))
    assert init_preprocess(named)["mean"] == [0.1, 0.2, 0.3]

    bare = tmp_path / "bare" / "w.safetensors"
    bare.parent.mkdir()
    bare.write_bytes(weights.read_bytes())
    assert init_preprocess(bare) is None  # nothing known: the dataset's defaults apply
    (bare.parent / "config.json").write_text(json.dumps({"hidden_size": 3}))  # someone else's config.json
    assert init_preprocess(bare) is None
    (bare.parent / "w.json").write_text("{not json")
    with pytest.raises(PreprocessError, match=r"w\.json: preprocessing sidecar is not valid JSON"):
        init_preprocess(bare)
    (bare.parent / "w.json").write_text(json.dumps({"mean": [0.5, 0.5], "std": HALF}))
    with pytest.raises(PreprocessError, match="mean must be 3 finite numbers"):
        init_preprocess(bare)

    ck = tmp_path / "ck"  # a project checkpoint as init: its recorded preprocessing
    pre = Preprocess(img_size=32, mean=(0.5,) * 3, std=(0.25,) * 3, crop_pct=0.8, interpolation="bicubic",
                     stored_size=36, source="timm:x")
    meta = read_meta(save_meta(ck, pre))
    assert meta.preprocess["std"] == [0.25] * 3
    for source in (ck, ck / WEIGHTS):
        got = init_preprocess(source)
        assert (got["std"], got["crop_pct"], got["input_size"]) == ([0.25] * 3, 0.8, 32)


def save_meta(folder: Path, pre: Preprocess) -> Path:
    """A tiny CoAtNet checkpoint folder whose metadata records `pre`."""
    from ich.checkpoint import CheckpointMeta
    net = create_model("coatnet_tiny_ich", 2, 32)
    meta = CheckpointMeta(architecture="coatnet_tiny_ich", img_size=32, num_classes=2, class_names=["a", "b"],
                          dataset_fingerprint="d" * 64, init_fingerprint="f", epoch=1, preprocess=pre)
    save_checkpoint(folder, net.state_dict(), meta)
    return folder


def test_overrides_beat_the_init_which_beats_the_dataset_defaults():
    init = {"mean": HALF, "std": HALF, "crop_pct": 0.95, "interpolation": "bicubic", "source": "timm:t"}
    assert resolve(32, 36, 1.0) == Preprocess(img_size=32, crop_pct=1.0, stored_size=36)  # today's behaviour
    got = resolve(32, 36, 1.0, init)
    assert (got.mean, got.crop_pct, got.interpolation, got.source) == ((0.5,) * 3, 0.95, "bicubic", "timm:t")
    got = resolve(32, 36, 1.0, init, {"crop_pct": 0.875})
    assert (got.mean, got.crop_pct, got.source) == ((0.5,) * 3, 0.875, "timm:t + init.preprocess")
    with pytest.raises(PreprocessError, match="unknown key"):
        resolve(32, 36, 1.0, init, {"size": 3})


def test_soups_refuse_to_mix_preprocessing_but_not_where_it_came_from():
    from ich.checkpoint import CheckpointMeta
    from soups.compat import IncompatibleCheckpoint, check_compatible

    def meta(**pre):
        base = dict(img_size=32, mean=(0.5,) * 3, std=(0.5,) * 3, crop_pct=0.95, interpolation="bicubic",
                    stored_size=32, source="sidecar:/a/config.json")
        return CheckpointMeta(architecture="coatnet_tiny_ich", img_size=32, num_classes=2, class_names=["a", "b"],
                              dataset_fingerprint="d", init_fingerprint="i", epoch=1,
                              preprocess=Preprocess(**{**base, **pre}))
    check_compatible([("e1", meta()), ("e2", meta(source="sidecar:/elsewhere/config.json"))])
    check_compatible([("e1", meta()), ("e2", meta(stored_size=0))])  # 0 means img_size: the same decode
    for change, message in (({"crop_pct": 0.875}, "preprocess.crop_pct: 0.875 != 0.95"),
                            ({"interpolation": "bilinear"}, "preprocess.interpolation: bilinear != bicubic"),
                            ({"mean": IMAGENET_MEAN}, "preprocess.mean"), ({"stored_size": 36}, "preprocess.stored_size: 36 != 32")):
        with pytest.raises(IncompatibleCheckpoint, match=f"checkpoint e2 differs from e1 in {message}"):
            check_compatible([("e1", meta()), ("e2", meta(**change))])


def test_bad_init_preprocess_in_a_sweep_config_is_one_line(tmp_path):
    from sweeps.config import load_config
    path = tmp_path / "bad.yaml"
    path.write_text("init:\n  preprocess: {interpolation: lanczos}\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: init\.preprocess: interpolation must be one of bilinear"):
        load_config(path)
    path.write_text("init:\n  preprocess: {crop: 0.9}\n")
    with pytest.raises(ConfigError, match="init.preprocess: unknown key"):
        load_config(path)


# ---------------------------------------------------------------------------------------------- format 1 and the function

def test_old_format_checkpoints_load_with_the_preprocessing_they_were_evaluated_with(tmp_path):
    net = create_model("coatnet_tiny_ich", 2, 32)
    cases = [  # (extra of the format-1 metadata, crop, stored size) as the orchestrator/report evaluated them
        ({"trial": "t", "config": {"eval_crop_pct": 1.0}}, 1.0, 0),  # a sweep trial: its training config
        ({"soup": "s", "image_size": 36, "eval_crop_pct": 0.9}, 0.9, 36),  # a soup: its own fields
        ({}, 0.875, 0),  # `ich train`: TrainConfig's default
    ]
    for i, (extra, crop, stored) in enumerate(cases):
        ck = tmp_path / f"v1-{i}"
        save_meta(ck, dataset_default(32))
        (ck / META).write_text(json.dumps(v1_meta(**extra)))
        state, meta = load_checkpoint(ck)
        assert meta.format_version == 2 and set(state) == set(net.state_dict())
        pre = Preprocess.from_meta(meta)
        assert (pre.mean, pre.std, pre.interpolation, pre.crop_pct, pre.stored_size) == \
            (IMAGENET_MEAN, IMAGENET_STD, "bilinear", crop, stored), extra
        save_checkpoint(tmp_path / f"v2-{i}", state, meta)  # re-saved: format 2, preprocess first-class
        d = json.loads((tmp_path / f"v2-{i}" / META).read_text())
        assert d["format_version"] == 2 and d["preprocess"]["crop_pct"] == crop
    bad = v1_meta()
    bad["format_version"] = 3
    (tmp_path / "v1-0" / META).write_text(json.dumps(bad))
    with pytest.raises(CheckpointError, match="format_version 3, expected one of 1, 2"):
        read_meta(tmp_path / "v1-0")


def _old_eval_transform(images_u8: torch.Tensor, img_size: int, crop_pct: float) -> torch.Tensor:
    """ich.data.eval_transform as it was before the contract (commit 384a1cf), kept to prove nothing moved."""
    x = images_u8.permute(0, 3, 1, 2).float().div_(255.0)
    s = x.shape[-1]
    crop = max(1, round(s * crop_pct))
    if crop != s:
        o = (s - crop) // 2
        x = x[..., o:o + crop, o:o + crop]
    if x.shape[-1] != img_size:
        x = torch.nn.functional.interpolate(x, size=(img_size, img_size), mode="bilinear", antialias=True,
                                            align_corners=False)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def test_dataset_defaults_give_the_old_numbers_bit_for_bit_and_bicubic_differs():
    g = torch.Generator().manual_seed(0)
    u8 = torch.randint(0, 256, (3, 36, 36, 3), generator=g, dtype=torch.uint8)
    for img_size, crop in ((32, 1.0), (32, 0.875), (36, 1.0), (24, 0.95)):
        old = _old_eval_transform(u8, img_size, crop)
        assert torch.equal(transform(u8, dataset_default(img_size, crop)), old)
        assert torch.equal(eval_transform(u8, AugmentConfig(img_size=img_size, eval_crop_pct=crop)), old)
    half = Preprocess(img_size=32, mean=(0.5,) * 3, std=(0.5,) * 3, crop_pct=0.95, interpolation="bicubic")
    x = transform(u8, half)
    assert x.shape == (3, 3, 32, 32) and float(x.min()) >= -1.0 and float(x.max()) <= 1.0  # clipped like PIL
    bilinear = transform(u8, Preprocess(**{**half.__dict__, "interpolation": "bilinear"}))
    assert float((x - bilinear).abs().max()) > 1e-3


def test_trainer_evaluates_and_normalizes_training_with_the_init_weights_values(tmp_path, digits_data):
    weights = write_pretrained(tmp_path / "pre")
    cfg = TrainConfig(model="coatnet_tiny_ich", img_size=32, eval_crop_pct=1.0, epochs=1)
    trainer = Trainer(cfg, digits_data, init_weights=str(weights))
    p = trainer.preprocess
    assert (p.mean, p.std, p.crop_pct, p.interpolation, p.stored_size) == ((0.5,) * 3, (0.5,) * 3, 0.95, "bicubic", 32)
    assert (trainer.aug.mean, trainer.aug.std) == (p.mean, p.std)  # train augmentation normalizes alike
    plain = Trainer(cfg, digits_data)  # no init: the dataset's defaults, the config's crop (today's behaviour)
    assert plain.preprocess == Preprocess(img_size=32, crop_pct=1.0, stored_size=32)
    x = digits_data.splits["val"].images[:4]
    plain.model.load_state_dict(trainer.model.state_dict())
    assert np.abs(trainer.predict(images=x) - plain.predict(images=x)).max() > 1e-4  # the values matter


def test_sweep_init_carries_the_preprocessing_to_trials(tmp_path, digits_data):
    from sweeps.config import load_config
    from sweeps.init_weights import given_init
    weights = write_pretrained(tmp_path / "pre")
    path = tmp_path / "sweep.yaml"
    path.write_text(f"train: {{model: coatnet_tiny_ich, img_size: 32}}\n"
                    f"init: {{weights: {weights}, preprocess: {{crop_pct: 0.9}}}}\n")
    cfg = load_config(path)
    init = given_init(cfg, "coatnet_tiny_ich", cfg.init.weights, digits_data)
    assert (init.preprocess["mean"], init.preprocess["crop_pct"], init.preprocess["interpolation"]) == \
        (HALF, 0.9, "bicubic")
    assert init.preprocess["source"].endswith("config.json + init.preprocess")
    trainer = Trainer(TrainConfig(model="coatnet_tiny_ich", img_size=32), digits_data, init_state=init.state_dict,
                      init_fingerprint=init.fingerprint, init_preprocess=init.preprocess)
    assert (trainer.preprocess.crop_pct, trainer.preprocess.mean) == (0.9, (0.5,) * 3)


# ---------------------------------------------------------------------------------------------- the GPU config

def test_gpu_configs_start_from_timm_weights_and_the_demo_stays_offline():
    from sweeps.config import load_config
    gpu = load_config(ROOT / "sweeps" / "configs" / "gpu.yaml")
    assert gpu.init.weights == "hub:coatnet_0_rw_224.sw_in1k" and gpu.train["model"] == "coatnet_0_rw_224"
    assert "eval_crop_pct" not in gpu.train and not gpu.init.preprocess  # the weights' config decides
    two = load_config(ROOT / "sweeps" / "configs" / "gpu-coatnet2.yaml")
    assert two.init.weights == "hub:coatnet_2_rw_224.sw_in12k_ft_in1k" and two.train["model"] == "coatnet_2_rw_224"
    for c in (gpu, two):
        assert c.train["img_size"] == hub_preprocess(c.init.weights[4:])["input_size"] == 224
    assert load_config(ROOT / "sweeps" / "configs" / "cpu.yaml").init.weights is None  # demo: warm start, offline
    base = load_config(ROOT / "sweeps" / "configs" / "baselines-gpu.yaml")
    assert set(base.init.weights) == set(base.search["model"]["choice"]) and "eval_crop_pct" not in base.train
    vit = hub_preprocess(base.init.weights["vit_base_patch16_224"][4:])
    assert (vit["mean"], vit["crop_pct"], vit["input_size"]) == (HALF, 0.9, 224)
    for model, source in base.init.weights.items():
        assert source.startswith(f"hub:{model}.") and hub_preprocess(source[4:])["input_size"] == 224


def test_a_hub_tag_offline_fails_in_one_line_that_says_how_to_use_a_local_file(tmp_path):
    """HF_HUB_OFFLINE=1 and an empty hub cache: the download is refused before any byte moves."""
    script = textwrap.dedent("""
        import sys
        from types import SimpleNamespace
        from ich.errors import USER_ERRORS
        from sweeps.config import load_config
        from sweeps.init_weights import given_init
        cfg = load_config("sweeps/configs/gpu.yaml")
        try:
            given_init(cfg, cfg.train["model"], cfg.init.weights, SimpleNamespace(num_classes=17))
        except USER_ERRORS as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
        print("downloaded?!")
    """)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "TORCH_HOME": str(tmp_path / "torch")}
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 2, out.stdout + out.stderr
    lines = [line for line in out.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and lines[0] == out.stderr.strip(), out.stderr
    line = lines[0]
    assert "hub:coatnet_0_rw_224.sw_in1k: cannot download from the timm hub" in line
    assert "https://huggingface.co/timm/coatnet_0_rw_224.sw_in1k" in line
    assert "set init.weights to the local model.safetensors" in line
    assert not list((tmp_path).rglob("*.safetensors")) and not list(tmp_path.rglob("*.pth"))


# ---------------------------------------------------------------------------------------------- train/serve parity

def trainer_logits(weights: Path, data, state_dict: dict, images: np.ndarray) -> np.ndarray:
    """The trainer's eval logits: a Trainer built like the sweep's (init = the pretrained file, whose sidecar
    it reads itself), holding `state_dict`, on stored uint8 images."""
    cfg = TrainConfig(model="coatnet_tiny_ich", img_size=32, eval_crop_pct=1.0)
    trainer = Trainer(cfg, data, init_weights=str(weights))
    trainer.model.load_state_dict(state_dict)
    return trainer.predict(images=images)


def ich_predict(model: str, images: list[Path]) -> np.ndarray:
    """`ich predict --json` as a user runs it: a new process."""
    out = subprocess.run([sys.executable, "-m", "sweeps.cli", "predict", "--model", model, "--json", *map(str, images)],
                         cwd=ROOT, env=os.environ.copy(), capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    assert [r["image"] for r in rows] == list(map(str, images))
    return np.array([r["logits"] for r in rows], dtype=np.float32)


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x.astype(np.float64) - x.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


@pytest.fixture(scope="module")
def parity(ray_local, mlflow_server, digits_dataset, digits_data, ich_home, tmp_path_factory):
    """A real sweep (2 trials x 2 epochs) from the local pretrained file, then its soups and champion."""
    from soups.orchestrate import SoupOptions, run_soups
    from sweeps.job import run_sweep
    root = tmp_path_factory.mktemp("parity")
    weights = write_pretrained(root / "pretrained")
    config = write_sweep_config(root, EXPERIMENT, **{
        "num_samples: 4": "num_samples: 2", "epochs: 3": "epochs: 2",
        "warm_start: {epochs: 4, lr: 2.0e-3, schedule: cosine}": f"weights: {weights}"})
    summary = run_sweep(sweep_args(config, digits_dataset), ich_home)
    soups = run_soups(SoupOptions(experiment=EXPERIMENT, tracking_uri=mlflow_server, registered_model=MODEL_NAME))
    test = digits_data.splits["test"]
    files = [digits_dataset.parent / "images" / p for p in test.paths[:2]]  # the photos behind two test images
    assert all(f.is_file() for f in files)
    return {"weights": weights, "sweep": summary, "soups": soups, "files": files, "stored": test.images[:2],
            "tmp": root}


EXPECTED_PRE = {"mean": HALF, "std": HALF, "crop_pct": 0.95, "interpolation": "bicubic", "stored_size": 32}


def _assert_recorded(meta) -> None:
    assert meta.format_version == 2
    assert {k: meta.preprocess[k] for k in EXPECTED_PRE} == EXPECTED_PRE
    assert meta.preprocess["source"].startswith("sidecar:") and meta.img_size == 32


@pytest.mark.integration
def test_every_checkpoint_records_the_init_weights_preprocessing(parity, mlflow_client):
    from soups.store import registry
    exp = mlflow_client.get_experiment_by_name(EXPERIMENT).experiment_id
    records = registry.search_checkpoints(mlflow_client, [exp], sweep=EXPERIMENT)
    assert len(records) >= 2
    for r in records:
        _, meta = registry.load_record(mlflow_client, r, parity["tmp"] / "records")
        _assert_recorded(meta)
        assert meta.extra["config"]["eval_crop_pct"] == 1.0  # the config's crop gave way to the weights' own


@pytest.mark.integration
def test_single_checkpoint_predict_and_served_logits_equal_the_trainers(parity, mlflow_client, digits_data):
    import mlflow

    from soups.store import registry
    from soups.serve.log import log_pyfunc
    from soups.serve.verify import load_soup_model
    exp = mlflow_client.get_experiment_by_name(EXPERIMENT).experiment_id
    best = max(registry.search_checkpoints(mlflow_client, [exp], sweep=EXPERIMENT),
               key=lambda r: (r.metrics["val_macro_f1"], -r.epoch))
    folder = registry.download_checkpoint(mlflow_client, best, parity["tmp"] / "single")
    state_dict, meta = load_checkpoint(folder, expected_sha256=best.sha256)
    _assert_recorded(meta)
    expected = trainer_logits(parity["weights"], digits_data, state_dict, parity["stored"])
    # the stored test image is what serving decodes the photo to
    for f, stored in zip(parity["files"], parity["stored"]):
        assert np.array_equal(decode_image(f.read_bytes(), 32, str(f)), stored)

    np.testing.assert_allclose(ich_predict(str(folder), parity["files"]), expected, rtol=1e-5, atol=1e-5)
    mlflow.set_tracking_uri(mlflow_client.tracking_uri)
    with mlflow.start_run(experiment_id=exp, run_name="single-checkpoint-pyfunc"):
        info = log_pyfunc(folder, name="single", example_pixels=parity["stored"][0])
    uri = f"models:/{info.model_id}"
    np.testing.assert_allclose(ich_predict(uri, parity["files"]), expected, rtol=1e-5, atol=1e-5)
    served = load_soup_model(uri)  # the project's verified loader
    images = [(f.read_bytes(), str(f)) for f in parity["files"]]
    np.testing.assert_allclose(served.probabilities(images), softmax(expected), rtol=1e-5, atol=1e-6)
    # Not vacuous: ImageNet statistics, no crop, bilinear (the old serving default) give other logits.
    skewed = Preprocess(img_size=32, crop_pct=1.0, stored_size=32)
    net = create_model(meta.architecture, meta.num_classes, meta.img_size)
    net.load_state_dict(state_dict)
    with torch.no_grad():
        other = net.eval()(transform(torch.from_numpy(parity["stored"]), skewed)).numpy()
    assert np.abs(other - expected).max() > 1e-3


@pytest.mark.integration
def test_soup_predict_and_served_logits_equal_the_trainers(parity, mlflow_client, digits_data):
    from soups.store import registry
    from soups.serve.verify import load_soup_model
    champion = parity["soups"]["champion"]
    assert champion and champion["alias_version"] == champion["version"]
    record = registry.get_model_record(mlflow_client, champion["model_id"])
    state_dict, meta = registry.load_record(mlflow_client, record, parity["tmp"] / "soup")
    _assert_recorded(meta)
    assert meta.extra["soup"] == champion["soup"]
    expected = trainer_logits(parity["weights"], digits_data, state_dict, parity["stored"])

    uri = f"models:/{MODEL_NAME}@champion"
    np.testing.assert_allclose(ich_predict(uri, parity["files"]), expected, rtol=1e-5, atol=1e-5)
    served = load_soup_model(uri)
    images = [(f.read_bytes(), str(f)) for f in parity["files"]]
    np.testing.assert_allclose(served.probabilities(images), softmax(expected), rtol=1e-5, atol=1e-6)


@pytest.mark.integration
def test_ich_predict_json_runs_one_forward_pass(parity, monkeypatch, capsys):
    """`ich predict --json` prints classes, probabilities and logits from one decode + forward pass per batch.
    Control: asking the served model for probabilities and then logits (what it did before) counts two."""
    import ich.preprocess
    from soups.serve.verify import load_soup_model
    from sweeps.cli import main
    calls, real = [], ich.preprocess.image_logits

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(ich.preprocess, "image_logits", counting)
    uri = f"models:/{MODEL_NAME}@champion"
    assert main(["predict", "--model", uri, "--json", *map(str, parity["files"])]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert len(rows) == len(parity["files"]) and len(calls) == 1
    np.testing.assert_allclose([r["probabilities"] for r in rows], softmax(np.array([r["logits"] for r in rows],
                                                                                   dtype=np.float32)), atol=1e-6)
    calls.clear()
    served, images = load_soup_model(uri), [(f.read_bytes(), str(f)) for f in parity["files"]]
    served.probabilities(images), served.logits(images)
    assert len(calls) == 2
