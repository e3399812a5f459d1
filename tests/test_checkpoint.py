"""Checkpoint folders: safetensors + JSON metadata, verified on read, written atomically, never unpickled."""
from __future__ import annotations

import json
import os
import pickle
import re

import pytest
import torch

import ich.checkpoint as ckpt
from ich.checkpoint import (META, WEIGHTS, CheckpointError, CheckpointMeta, load_checkpoint, load_weights,
                            read_meta, save_checkpoint, sha256_file)

CLASSES = ["Đờn ca tài tử", "Chợ nổi", "Lễ hội Ok Om Bok"]


def make_meta(**over) -> CheckpointMeta:
    d = dict(architecture="coatnet_tiny_ich", img_size=32, num_classes=3, class_names=list(CLASSES),
             dataset_fingerprint="d" * 64, init_fingerprint="random:" + "0" * 32, epoch=4,
             metrics={"val_accuracy": 0.75, "val_macro_f1": 0.5}, extra={"trial": "t1", "sweep": "s"})
    d.update(over)
    return CheckpointMeta(**d)


def make_state(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "stem.conv1.weight": torch.randn(8, 3, 3, 3, generator=g),
        "stem.norm1.num_batches_tracked": torch.tensor(17, dtype=torch.int64),
        "head.fc.weight": torch.randn(3, 16, generator=g).to(torch.bfloat16),
        "head.fc.bias": torch.randn(3, generator=g),
        # a view into a bigger tensor: safetensors needs it split off and contiguous
        "pos.rel": torch.randn(4, 6, generator=g)[:, ::2],
    }


def test_round_trip(tmp_path):
    state, meta = make_state(), make_meta()
    digest = save_checkpoint(tmp_path / "ck", state, meta)
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == sorted([WEIGHTS, META])
    assert digest == sha256_file(tmp_path / "ck" / WEIGHTS)
    loaded, meta2 = load_checkpoint(tmp_path / "ck", expected_sha256=digest)
    assert meta2 == meta
    assert meta2.class_names == CLASSES  # diacritics survive
    assert loaded.keys() == state.keys()
    for k, v in state.items():
        assert loaded[k].dtype == v.dtype, k
        assert torch.equal(loaded[k], v), k
    # The metadata is plain JSON a person can read.
    d = json.loads((tmp_path / "ck" / META).read_text(encoding="utf-8"))
    assert d["epoch"] == 4 and d["metrics"]["val_accuracy"] == 0.75
    # Overwriting an existing checkpoint replaces it and leaves no temp folders behind.
    digest2 = save_checkpoint(tmp_path / "ck", make_state(1), make_meta(epoch=5))
    assert digest2 != digest and read_meta(tmp_path / "ck").epoch == 5
    assert [p.name for p in tmp_path.iterdir()] == ["ck"]


class _Tripwire:
    """Unpickling this object creates the folder `marker`: proof that something was unpickled."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_pickle_renamed_safetensors_is_refused_without_unpickling(tmp_path, monkeypatch):
    marker = tmp_path / "UNPICKLED"
    payload = pickle.dumps({"w": [1.0], "trip": _Tripwire(marker)}, protocol=4)
    pickle.loads(payload)  # the tripwire is live: unpickling it leaves the marker
    assert marker.is_dir()
    marker.rmdir()

    ck = tmp_path / "ck"
    save_checkpoint(ck, make_state(), make_meta())
    # A torch pickle (zip archive) under the safetensors name, carrying the tripwire.
    torch.save({**make_state(), "trip": _Tripwire(marker)}, ck / WEIGHTS)

    def no_unpickling(*a, **k):
        raise AssertionError("something tried to unpickle the file")

    monkeypatch.setattr(pickle, "load", no_unpickling)
    monkeypatch.setattr(pickle, "loads", no_unpickling)
    monkeypatch.setattr(torch, "load", no_unpickling)
    with pytest.raises(CheckpointError, match="not a safetensors file"):
        load_checkpoint(ck)
    # A legacy (non-zip) torch pickle too.
    torch.save({"trip": _Tripwire(marker)}, ck / WEIGHTS, _use_new_zipfile_serialization=False)
    with pytest.raises(CheckpointError, match="safetensors"):
        load_weights(ck / WEIGHTS)
    # And a raw pickle of a plain dict.
    (ck / WEIGHTS).write_bytes(payload)
    with pytest.raises(CheckpointError, match="safetensors"):
        load_checkpoint(ck)
    assert not marker.exists()


@pytest.mark.parametrize("header_len", [640, 896, 1152, 1408])
def test_valid_safetensors_whose_header_length_looks_like_a_pickle_opcode_loads(tmp_path, header_len):
    import struct

    path = tmp_path / WEIGHTS
    for name_len in range(1, 2000):  # grow one tensor name until the padded header has the length wanted
        ckpt.save_file({"w" * name_len: torch.ones(2)}, str(path), metadata={"format": "pt"})
        n = struct.unpack("<Q", path.read_bytes()[:8])[0]
        if n >= header_len:
            break
    assert n == header_len
    assert torch.equal(load_weights(path)["w" * name_len], torch.ones(2))


@pytest.mark.parametrize("keep", [0, 5, 8, 40, -7])
def test_truncated_or_garbage_weights_are_refused(tmp_path, keep):
    ck = tmp_path / "ck"
    save_checkpoint(ck, make_state(), make_meta())
    blob = (ck / WEIGHTS).read_bytes()
    (ck / WEIGHTS).write_bytes(blob[:keep] if keep >= 0 else blob[:keep])
    with pytest.raises(CheckpointError, match=re.escape(str(ck))):
        load_checkpoint(ck)


def test_garbage_weights_are_refused(tmp_path):
    ck = tmp_path / "ck"
    save_checkpoint(ck, make_state(), make_meta())
    (ck / WEIGHTS).write_bytes(b"\xff" * 4096)
    with pytest.raises(CheckpointError, match="safetensors"):
        load_checkpoint(ck)


def test_missing_weights_or_metadata(tmp_path):
    ck = tmp_path / "ck"
    save_checkpoint(ck, make_state(), make_meta())
    (ck / WEIGHTS).unlink()
    with pytest.raises(CheckpointError, match="no such weights file"):
        load_checkpoint(ck)
    with pytest.raises(CheckpointError, match="no checkpoint.json"):
        load_checkpoint(tmp_path / "nowhere")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / META).write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        read_meta(tmp_path / "bad")
    (tmp_path / "bad" / META).write_text("[1, 2]")
    with pytest.raises(CheckpointError, match="not a JSON object"):
        read_meta(tmp_path / "bad")


@pytest.mark.parametrize("bad_value", [float("nan"), float("inf"), float("-inf")])
def test_nonfinite_weights_are_refused_naming_the_tensor(tmp_path, bad_value):
    state = make_state()
    state["head.fc.bias"][1] = bad_value
    ck = tmp_path / "ck"
    save_checkpoint(ck, state, make_meta())
    with pytest.raises(CheckpointError, match=r"head\.fc\.bias"):
        load_checkpoint(ck)
    # Callers that want to inspect (and skip with a warning) can opt out of the check.
    loaded, _ = load_checkpoint(ck, check_finite=False)
    assert not torch.isfinite(loaded["head.fc.bias"]).all()


def test_nonfinite_bfloat16_tensor_is_named(tmp_path):
    state = make_state()
    state["head.fc.weight"][0, 0] = float("nan")
    save_checkpoint(tmp_path / "ck", state, make_meta())
    with pytest.raises(CheckpointError, match=r"head\.fc\.weight"):
        load_checkpoint(tmp_path / "ck")


def test_sha256_mismatch_is_refused(tmp_path):
    ck = tmp_path / "ck"
    digest = save_checkpoint(ck, make_state(), make_meta())
    with pytest.raises(CheckpointError, match="sha256 mismatch"):
        load_checkpoint(ck, expected_sha256="0" * 64)
    # Same size, one weight changed: still a valid safetensors file, but not the one recorded.
    other = save_checkpoint(tmp_path / "other", {**make_state(), "head.fc.bias": torch.tensor([9.0, 9.0, 9.0])},
                            make_meta())
    assert other != digest
    (ck / WEIGHTS).write_bytes((tmp_path / "other" / WEIGHTS).read_bytes())
    with pytest.raises(CheckpointError, match="sha256 mismatch"):
        load_checkpoint(ck, expected_sha256=digest)
    load_checkpoint(ck, expected_sha256=other)  # the right digest passes


def _write_meta(ck, d):
    (ck / META).write_text(json.dumps(d), encoding="utf-8")


@pytest.mark.parametrize("change,message", [
    (lambda d: d.pop("architecture"), "lacks architecture"),
    (lambda d: d.pop("class_names"), "lacks class_names"),
    (lambda d: d.update(surprise=1), "unknown fields surprise"),
    (lambda d: d.update(num_classes=4), "num_classes=4 but class_names has 3"),
    (lambda d: d.update(class_names=CLASSES[:2]), "num_classes=3 but class_names has 2"),
    (lambda d: d.update(format_version=99), "format_version 99"),
    (lambda d: d.pop("preprocess"), "lacks preprocess"),
    (lambda d: d["preprocess"].update(mean=[0.5, 0.5]), "mean must be 3 finite numbers"),
    (lambda d: d["preprocess"].update(std=[0.5, 0.0, 0.5]), "std must be positive"),
    (lambda d: d["preprocess"].update(crop_pct=1.5), "crop_pct must be in"),
    (lambda d: d["preprocess"].update(interpolation="lanczos"), "interpolation must be one of"),
    (lambda d: d.update(format_version=1), "format_version 1 has no preprocess field"),
])
def test_bad_metadata_is_refused(tmp_path, change, message):
    ck = tmp_path / "ck"
    save_checkpoint(ck, make_state(), make_meta())
    d = json.loads((ck / META).read_text(encoding="utf-8"))
    change(d)
    _write_meta(ck, d)
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(ck)


def test_optional_metadata_fields_may_be_absent(tmp_path):
    ck = tmp_path / "ck"
    save_checkpoint(ck, make_state(), make_meta())
    d = json.loads((ck / META).read_text(encoding="utf-8"))
    for k in ("metrics", "extra", "format_version"):
        d.pop(k)
    _write_meta(ck, d)
    meta = read_meta(ck)
    assert meta.metrics == {} and meta.extra == {} and meta.format_version == ckpt.FORMAT_VERSION


def test_save_is_atomic(tmp_path, monkeypatch):
    ck = tmp_path / "ck"
    first = make_state(0)
    digest = save_checkpoint(ck, first, make_meta(epoch=1))
    real_save_file = ckpt.save_file

    def half_written_then_crash(tensors, filename, metadata=None):
        real_save_file(tensors, filename, metadata=metadata)
        with open(filename, "r+b") as f:
            f.truncate(100)
        raise OSError("disk full")

    monkeypatch.setattr(ckpt, "save_file", half_written_then_crash)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(ck, make_state(1), make_meta(epoch=2))
    # The previous checkpoint is intact and verifies against its digest; no temp folder is left.
    loaded, meta = load_checkpoint(ck, expected_sha256=digest)
    assert meta.epoch == 1
    assert all(torch.equal(loaded[k], v) for k, v in first.items())
    assert [p.name for p in tmp_path.iterdir()] == ["ck"]

    # A crash while writing the metadata (after the weights) also leaves the old checkpoint in place.
    monkeypatch.setattr(ckpt, "save_file", real_save_file)
    monkeypatch.setattr(CheckpointMeta, "to_json", lambda self: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(ck, make_state(2), make_meta(epoch=3))
    monkeypatch.undo()
    assert read_meta(ck).epoch == 1 and sha256_file(ck / WEIGHTS) == digest
    assert [p.name for p in tmp_path.iterdir()] == ["ck"]

    # A new checkpoint that fails never appears half-made.
    monkeypatch.setattr(ckpt, "save_file", half_written_then_crash)
    with pytest.raises(OSError):
        save_checkpoint(tmp_path / "fresh", make_state(), make_meta())
    assert not (tmp_path / "fresh").exists()
