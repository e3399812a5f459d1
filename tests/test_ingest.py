"""Dataset ingest: layouts, decoding, skips, dedupe, fingerprint, atomic output, errors, demo digits."""
from __future__ import annotations

import json
import os
import shutil
import unicodedata
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from ich.demo_data import write_digits
from ich.ingest import SKIP_REASONS, IngestError, ingest, load_manifest
from tests.imagegen import make_bomb, make_ich_folder, make_simple_folder

SIZE = 32


def read_rows(out: Path, manifest: dict) -> list[dict]:
    rows = []
    for split in ("train", "val", "test"):
        for rel in manifest["shards"][split]:
            rows.extend(pq.read_table(out / rel).to_pylist())
    return rows


def pixels(row: dict) -> np.ndarray:
    return np.frombuffer(row["image"], np.uint8).reshape(row["height"], row["width"], 3)


def leftovers(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name]


@pytest.fixture(scope="module")
def ich17(tmp_path_factory):
    root = tmp_path_factory.mktemp("ich17")
    info = make_ich_folder(root / "src")
    out = root / "out"
    manifest = ingest(info.root, out, size=SIZE, workers=2, progress=False)
    return info, out, manifest


def test_manifest_classes_and_counts(ich17):
    info, out, m = ich17
    assert m == load_manifest(out) == json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    assert m["classes"] == info.classes and m["num_classes"] == 17 and m["layout"] == "flat"
    assert all(unicodedata.is_normalized("NFC", c) for c in m["classes"])
    assert m["image_size"] == SIZE and m["image_format"] == "rgb8" and m["format_version"] == 1
    for split in ("train", "val", "test"):
        assert sum(m["counts"][split].values()) == m["num_images"][split]
        assert all(m["counts"][split][c] >= 1 for c in m["classes"]), split  # stratified: every class everywhere
    for c in m["classes"]:
        assert sum(m["counts"][s][c] for s in ("train", "val", "test")) == info.usable[c], c


def test_skips_have_the_right_reasons(ich17):
    info, _, m = ich17
    got = {s["path"]: s["reason"] for s in m["skipped"]}
    assert got == info.skips  # every broken file, nothing else (the hidden .DS_Store is ignored silently)
    assert set(got.values()) <= set(SKIP_REASONS)
    dup = next(s for s in m["skipped"] if s["reason"] == "duplicate")
    assert dup["duplicate_of"].split("/")[-1] == dup["path"].split("/")[-1].removeprefix("zz_dup_")
    conflict = next(s for s in m["skipped"] if s["reason"] == "conflicting labels")
    assert len(conflict["classes"]) == 2 and set(conflict["classes"]) <= set(m["classes"])


def test_rows_decode_ordered_and_never_shared_between_splits(ich17):
    info, out, m = ich17
    rows = read_rows(out, m)
    assert len(rows) == sum(m["num_images"].values())
    for row in rows:
        assert pixels(row).shape == (SIZE, SIZE, 3) and 0 <= row["label"] < 17 and len(row["sha256"]) == 64
    for split in ("train", "val", "test"):
        keys = [(r["label"], r["path"]) for r in rows if r["split"] == split]
        assert keys == sorted(keys) and len(keys) == m["num_images"][split]
    shas = [r["sha256"] for r in rows]
    assert len(set(shas)) == len(shas)  # deduped before splitting: no image in two splits
    assert not set(info.skips) & {r["path"] for r in rows}
    # a class's images carry its label: the label's class name is the row's folder, NFC-normalized
    assert all(m["classes"][r["label"]] == unicodedata.normalize("NFC", r["path"].split("/")[0]) for r in rows)


def test_exif_16bit_and_alpha_are_decoded_properly(ich17):
    info, out, m = ich17
    rows = {r["path"]: pixels(r) for r in read_rows(out, m)}
    rot = rows[info.special["exif"]].astype(int)
    # stored 60x30 with red left / blue right, orientation 6: displayed 30x60, red on top, blue below
    assert rot[2, SIZE // 2, 0] > 150 and rot[2, SIZE // 2, 2] < 100
    assert rot[-3, SIZE // 2, 2] > 150 and rot[-3, SIZE // 2, 0] < 100
    deep = rows[info.special["deep16"]].astype(int)
    assert abs(deep[SIZE // 2, 2, 0] - 64) <= 2 and abs(deep[SIZE // 2, -3, 0] - 191) <= 2  # scaled, not clipped
    alpha = rows[info.special["transparent"]].astype(int)
    assert (alpha[:, :SIZE // 2 - 2] >= 250).all()  # transparent composited onto white, not black
    assert alpha[SIZE // 2, -3, 1] > 150 and alpha[SIZE // 2, -3, 0] < 60


def test_fingerprint_stable_and_sensitive(ich17, tmp_path):
    info, _, m = ich17
    again = ingest(info.root, tmp_path / "again", size=SIZE, workers=1, progress=False)
    assert again["fingerprint"] == m["fingerprint"] and again["counts"] == m["counts"]
    other_seed = ingest(info.root, tmp_path / "seed1", size=SIZE, seed=1, workers=1, progress=False)
    assert other_seed["fingerprint"] != m["fingerprint"]


def test_presplit_layout_is_kept(tmp_path):
    src = tmp_path / "src"
    make_simple_folder(src / "train", {"mèo": 4, "chó": 3})
    make_simple_folder(src / "valid", {"mèo": 1, "chó": 2}, seed=1)
    make_simple_folder(src / "test", {unicodedata.normalize("NFD", "mèo"): 2, "chó": 1}, seed=2)
    shutil.copy(src / "train/chó/000.png", src / "test/chó/leak.png")  # a train image copied into test
    m = ingest(src, tmp_path / "out", size=16, workers=1, progress=False)
    assert m["layout"] == "presplit" and m["classes"] == sorted(["chó", "mèo"])
    assert m["counts"] == {"train": {"chó": 3, "mèo": 4}, "val": {"chó": 2, "mèo": 1},
                           "test": {"chó": 1, "mèo": 2}}
    assert {"path": "test/chó/leak.png", "reason": "duplicate", "duplicate_of": "train/chó/000.png"} in m["skipped"]
    rows = read_rows(tmp_path / "out", m)
    assert all(r["path"].startswith({"train": "train/", "val": "valid/", "test": "test/"}[r["split"]]) for r in rows)


def test_presplit_class_sets_must_agree(tmp_path):
    make_simple_folder(tmp_path / "src/train", {"a": 2, "b": 2})
    make_simple_folder(tmp_path / "src/val", {"a": 1})
    with pytest.raises(IngestError, match=r"src/val: class folders differ.*missing: \['b'\]"):
        ingest(tmp_path / "src", tmp_path / "out", size=8, workers=1, progress=False)


@pytest.mark.parametrize("case, pattern", [
    ("missing", r"does not exist"),
    ("no_images", r"no image files found"),
    ("empty_class", r"class 'rỗng' has no usable images \(1 file, all skipped\)"),
    ("one_image", r"class 'một' has 1 usable image; a flat split needs at least 3"),
    ("twins", r"class folders '.*' \(NF[CD]\) and '.*' \(NF[CD]\) are the same name in different Unicode forms"),
])
def test_errors_name_the_item(tmp_path, case, pattern):
    src = tmp_path / "src"
    if case == "no_images":
        (src / "a").mkdir(parents=True)
        (src / "b").mkdir()
    elif case == "empty_class":
        make_simple_folder(src, {"a": 3})
        (src / "rỗng").mkdir()
        (src / "rỗng/readme.jpg").write_text("no pixels here")
    elif case == "one_image":
        make_simple_folder(src, {"a": 3, "một": 1})
    elif case == "twins":
        make_simple_folder(src, {"Hát bội": 3, unicodedata.normalize("NFD", "Hát bội"): 3})
    with pytest.raises(IngestError, match=pattern) as e:
        ingest(src, tmp_path / "out", size=8, workers=1, progress=False)
    assert "\n" not in str(e.value)
    if case == "twins":  # both spellings named, each with its form
        assert unicodedata.normalize("NFC", str(e.value)).count("'Hát bội'") == 2
        assert "(NFC)" in str(e.value) and "(NFD)" in str(e.value)
    assert not (tmp_path / "out").exists() and not leftovers(tmp_path)


def test_out_exists_and_failed_runs_leave_it_untouched(tmp_path):
    good = make_simple_folder(tmp_path / "good", {"a": 3, "b": 3})
    out = tmp_path / "out"
    first = ingest(good, out, size=8, workers=1, progress=False)
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(IngestError, match=r"out: already exists"):
        ingest(good, out, size=8, workers=1, progress=False)
    bad = make_simple_folder(tmp_path / "bad", {"a": 3, "b": 2})  # too small to split: fails after decoding
    with pytest.raises(IngestError, match="class 'b' has 2 usable images"):
        ingest(bad, out, size=8, workers=1, overwrite=True, progress=False)
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert not leftovers(tmp_path)
    # overwrite replaces a previous ingest, never an unrelated folder
    second = ingest(good, out, size=12, workers=1, overwrite=True, progress=False)
    assert load_manifest(out)["image_size"] == 12 and second["fingerprint"] != first["fingerprint"]
    assert not leftovers(tmp_path)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine/notes.txt").write_text("keep me")
    with pytest.raises(IngestError, match="not an ingested dataset"):
        ingest(good, tmp_path / "mine", size=8, workers=1, overwrite=True, progress=False)
    assert (tmp_path / "mine/notes.txt").read_text() == "keep me"


@pytest.mark.timeout(60)
def test_symlinks_outside_source_and_loops(tmp_path):
    src = make_simple_folder(tmp_path / "src", {"a": 3, "b": 3})
    outside = make_simple_folder(tmp_path / "elsewhere", {"x": 1}, seed=5)
    os.symlink(outside / "x/000.png", src / "a/escape.png")
    os.symlink(outside / "x", src / "b/escape_dir")
    os.symlink(src, src / "a/loop")  # a folder link back to the root
    os.symlink(src / "b/self1", src / "b/self2")  # a file link loop
    os.symlink(src / "b/self2", src / "b/self1")
    m = ingest(src, tmp_path / "out", size=8, workers=2, progress=False)
    reasons = {s["path"]: s["reason"] for s in m["skipped"]}
    assert reasons["a/escape.png"] == "outside source" and reasons["b/escape_dir"] == "outside source"
    assert reasons["b/self1"] == reasons["b/self2"] == "unreadable"
    assert sum(m["num_images"].values()) == 6


def test_bombs_are_refused(tmp_path):
    src = make_simple_folder(tmp_path / "src", {"a": 3})
    make_bomb(src / "a/bomb_warn.png")  # 100 Mpx: above MAX_IMAGE_PIXELS (a warning made an error)
    make_bomb(src / "a/bomb_error.png", 20_000, 20_000)  # 400 Mpx: above twice the limit
    m = ingest(src, tmp_path / "out", size=8, workers=1, progress=False)
    assert {s["path"]: s["reason"] for s in m["skipped"]} == {"a/bomb_warn.png": "decompression bomb",
                                                              "a/bomb_error.png": "decompression bomb"}


def test_load_manifest_rejects_bad_input(tmp_path):
    with pytest.raises(IngestError, match="manifest.json: not found"):
        load_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(IngestError, match="unreadable manifest"):
        load_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"format_version": 1}))
    with pytest.raises(IngestError, match="lacks 'image_format'"):
        load_manifest(tmp_path / "manifest.json")


def test_write_digits(tmp_path):
    counts = write_digits(tmp_path / "digits")
    pngs = sorted((tmp_path / "digits").rglob("*.png"))
    assert len(pngs) == 1797 and sum(counts.values()) == 1797
    assert sorted(counts) == [str(d) for d in range(10)] == sorted(p.name for p in (tmp_path / "digits").iterdir())
    assert {p.parent.name for p in pngs} == set(counts) and pngs[0].name == "0000.png"
    with pytest.raises(IngestError, match="already exists and is not empty"):
        write_digits(tmp_path / "digits")
    m = ingest(tmp_path / "digits", tmp_path / "out", size=8, workers=2, progress=False)
    assert sum(m["num_images"].values()) == 1797 and m["classes"] == [str(d) for d in range(10)]
    assert m["skipped"] == []
