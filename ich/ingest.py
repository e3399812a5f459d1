"""Dataset ingest: an ImageFolder of photos -> Parquet shards of fixed-size RGB pixels + manifest.json.

Input layouts:
    flat       src/<class>/<image>                   splits made here: stratified, seeded
    presplit   src/{train,val,test}/<class>/<image>  splits kept ('valid'/'validation' mean val)

Output (built in a temp dir beside `out`, then renamed into place, so a failed run leaves nothing):
    out/data/<split>-<i:05d>.parquet   columns: image (raw RGB uint8 HWC bytes, size*size*3), height,
                                       width, label, split, path (relative to src), sha256 (source file)
    out/manifest.json                  classes, counts, shards, skipped files with reasons, fingerprint

Every file is decoded once, in worker processes (ich/decode.py, the decoder sandbox): sha256 of its bytes, PIL decode with EXIF orientation,
conversion to RGB from any mode, resize of the shorter side to `size`, center crop. Files that fail
are skipped with a reason instead of failing the run; identical files are deduplicated before splitting
so no image lands in two splits.

Every input is bounded before its pixels are allocated: files above `max_file_bytes` (default 50 MiB) are
skipped unread ("too large"); images above PIL's MAX_IMAGE_PIXELS are refused from their header (the
DecompressionBombWarning is an error: "decompression bomb"); images whose long side is more than
`max_aspect` (default 10) times the short side are refused from their header ("extreme aspect ratio":
the center crop would keep under a tenth of the picture). The resize itself only ever computes the
center square it keeps (`ich.decode.resize_crop`), so even an unrefused 100000x1 image costs size^2 pixels, not
the ~24 GiB a resize of the whole strip would ask for. A decoder process that dies (a segfault in a
codec, the OOM killer) or hangs past `decode_timeout` fails the ingest in one line naming the file it
was decoding; nothing is written and an existing output folder is left as it was.

The fingerprint names the dataset's content, not the run: sha256 of a canonical JSON of format_version,
image_size, classes and the sorted (split, label, source sha256) list. Two ingests of the same files with
the same options give the same fingerprint, wherever they are written.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import shutil
import stat
import sys
import tempfile
import unicodedata
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from ich.decode import DECODE_TIMEOUT, MAX_ASPECT, MAX_FILE_BYTES, DecoderFailed, decode_all
from ich.errors import CONTROL_CHARS, IchError

FORMAT_VERSION = 1
IMAGE_FORMAT = "rgb8"
SPLITS = ("train", "val", "test")
SPLIT_ALIASES = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}
MANIFEST = "manifest.json"
SKIP_REASONS = ("zero bytes", "not an image", "truncated", "corrupt", "decompression bomb", "outside source",
                "duplicate", "conflicting labels", "unreadable", "too large", "extreme aspect ratio")
SCHEMA = pa.schema([
    ("image", pa.binary()),
    ("height", pa.int32()),
    ("width", pa.int32()),
    ("label", pa.int32()),
    ("split", pa.string()),
    ("path", pa.string()),
    ("sha256", pa.string()),
])
ROW_GROUP = 128  # rows buffered per Parquet row group: bounds memory at 128 * size^2 * 3 bytes


class IngestError(IchError):
    """The dataset cannot be ingested or loaded; the message names the item and the problem in one line."""


@dataclass
class FoundImage:
    """One file found under a class folder, before decoding."""
    split: str | None  # presplit layout: the split folder it came from; flat: None until split
    cls: str  # NFC class name
    rel: str  # posix path relative to src, as on disk
    abspath: str


# ----------------------------------------------------------------------------------------------
# Finding the files

def _printable(name: str) -> str:
    """A file name as valid UTF-8 text (undecodable bytes from the file system become \\x escapes)."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


JUNK = {"thumbs.db", "desktop.ini", "__macosx"}  # OS litter, e.g. from unzipping on a Mac


def _refuse_control_chars(rel: str, src) -> None:
    """A class, folder or file name holding a control character (ESC, CR, BEL, ...) is refused, shown escaped: printed
    raw it would rewrite the terminal's line (a name once cleared the line and printed a fake "all good")."""
    if CONTROL_CHARS.search(rel):
        raise IngestError(f"{src}: the name {rel!r} holds control characters; rename it (nothing was written)")


def _hidden(name: str) -> bool:
    return name.startswith(".") or name.lower() in JUNK


def _inside(path: str, root_real: str) -> bool:
    real = os.path.realpath(path)
    return real == root_real or real.startswith(root_real.rstrip(os.sep) + os.sep)


def _class_dirs(parent: Path, root_real: str, rel_prefix: str, skipped: list[dict]) -> dict[str, Path]:
    """NFC class name -> class folder, for the (non-hidden) folders directly under `parent`."""
    by_nfc: dict[str, Path] = {}
    for entry in sorted(os.scandir(parent), key=lambda e: e.name):
        if _hidden(entry.name):
            continue
        rel = rel_prefix + _printable(entry.name)
        if entry.is_symlink():
            # Never followed: a linked folder outside src is reported, one inside is seen by its real path.
            if not _inside(entry.path, root_real):
                skipped.append({"path": rel, "reason": "outside source"})
            continue
        if not entry.is_dir():
            continue  # loose files beside the class folders (README, labels.csv) are not images of a class
        _refuse_control_chars(rel, parent)  # a class name is printed in every table and report
        nfc = unicodedata.normalize("NFC", _printable(entry.name))
        if nfc in by_nfc:
            a, b = (f"{n!r} ({'NFC' if unicodedata.is_normalized('NFC', n) else 'NFD'})"
                    for n in (_printable(by_nfc[nfc].name), _printable(entry.name)))
            raise IngestError(f"{parent}: class folders {a} and {b} are the same name in different Unicode "
                              f"forms; merge or rename one")
        by_nfc[nfc] = Path(entry.path)
    return by_nfc


def _walk_class(cls_dir: Path, src: Path, root_real: str, skipped: list[dict]) -> list[tuple[str, str]]:
    """(rel posix path, abs path) of every candidate file under one class folder, recursively."""
    found = []

    def unreadable(e: OSError) -> None:
        skipped.append({"path": _printable(Path(e.filename).relative_to(src).as_posix()), "reason": "unreadable"})

    for dirpath, dirnames, filenames in os.walk(cls_dir, onerror=unreadable, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if not _hidden(d))
        for d in dirnames:  # os.walk lists symlinked folders here but does not descend into them
            p = os.path.join(dirpath, d)
            _refuse_control_chars(_printable(Path(p).relative_to(src).as_posix()), src)
            if os.path.islink(p) and not _inside(p, root_real):
                skipped.append({"path": _printable(Path(p).relative_to(src).as_posix()), "reason": "outside source"})
        for name in sorted(filenames):
            if _hidden(name):
                continue
            p = os.path.join(dirpath, name)
            rel = _printable(Path(p).relative_to(src).as_posix())
            _refuse_control_chars(rel, src)
            if not _inside(p, root_real):
                skipped.append({"path": rel, "reason": "outside source"})
                continue
            try:
                st = os.stat(p)  # follows links inside src; a link loop raises ELOOP here
            except OSError:
                skipped.append({"path": rel, "reason": "unreadable"})
                continue
            if not stat.S_ISREG(st.st_mode):
                skipped.append({"path": rel, "reason": "not an image"})  # FIFOs and devices: never open them
                continue
            found.append((rel, p))
    return found


def _find_candidates(src: Path, skipped: list[dict]) -> tuple[str, list, list[str], list[FoundImage]]:
    """Detect the layout and list every candidate file.

    Returns (layout, splits present (flat: [None]), NFC class names sorted, candidates)."""
    root_real = os.path.realpath(src)
    top = {e.name: e for e in os.scandir(src) if not _hidden(e.name) and e.is_dir() and not e.is_symlink()}
    split_names = {n: SPLIT_ALIASES[n.lower()] for n in top if n.lower() in SPLIT_ALIASES}
    presplit = "train" in split_names.values() and len(split_names) == len(top)

    if not presplit:
        dirs = _class_dirs(src, root_real, "", skipped)
        classes = sorted(dirs)
        cands = [FoundImage(None, c, rel, p) for c in classes
                 for rel, p in _walk_class(dirs[c], src, root_real, skipped)]
        return "flat", [None], classes, cands

    seen: dict[str, str] = {}
    for name, split in sorted(split_names.items()):
        if split in seen:
            raise IngestError(f"{src}: folders {seen[split]!r} and {name!r} both name the '{split}' split")
        seen[split] = name
    per_split = {split: _class_dirs(src / name, root_real, _printable(name) + "/", skipped)
                 for split, name in seen.items()}
    classes = sorted(per_split["train"])
    for split, dirs in per_split.items():
        if sorted(dirs) != classes:
            missing, extra = sorted(set(classes) - set(dirs)), sorted(set(dirs) - set(classes))
            raise IngestError(f"{src / seen[split]}: class folders differ from train's "
                              f"(missing: {missing or 'none'}; extra: {extra or 'none'})")
    cands = [FoundImage(split, c, rel, p) for split in SPLITS if split in per_split for c in classes
             for rel, p in _walk_class(per_split[split][c], src, root_real, skipped)]
    return "presplit", [s for s in SPLITS if s in per_split], classes, cands


# ----------------------------------------------------------------------------------------------
# Dedupe, split, write

def _dedupe(cands: list[FoundImage], shas: list[str], skipped: list[dict]) -> list[int]:
    """Indices of the decoded candidates to keep: one copy per sha256; all copies when labels conflict."""
    split_rank = {s: i for i, s in enumerate(SPLITS)}
    by_sha: dict[str, list[int]] = {}
    for i, sha in enumerate(shas):
        by_sha.setdefault(sha, []).append(i)
    keep = []
    for idxs in by_sha.values():
        idxs.sort(key=lambda i: (split_rank.get(cands[i].split, -1), cands[i].rel))
        classes = sorted({cands[i].cls for i in idxs})
        if len(classes) > 1:
            for i in idxs:
                skipped.append({"path": cands[i].rel, "reason": "conflicting labels", "classes": classes})
            continue
        keep.append(idxs[0])  # presplit: the copy in the earliest split (train) stays, so test never repeats train
        for i in idxs[1:]:
            skipped.append({"path": cands[i].rel, "reason": "duplicate", "duplicate_of": cands[idxs[0]].rel})
    return sorted(keep)


def _split_flat(cands: list[FoundImage], keep: list[int], classes: list[str],
                val_frac: float, test_frac: float, seed: int) -> None:
    """Assign train/val/test per class (stratified). Seeded per class, so adding a class moves nothing else."""
    need = 1 + (val_frac > 0) + (test_frac > 0)
    for cls in classes:
        idxs = sorted((i for i in keep if cands[i].cls == cls), key=lambda i: cands[i].rel)
        n = len(idxs)
        if n < need:
            raise IngestError(f"class {cls!r} has {n} usable image{'s' * (n != 1)}; a flat split needs at least "
                              f"{need} (one per split)")
        n_test = max(1, round(n * test_frac)) if test_frac > 0 else 0
        n_val = max(1, round(n * val_frac)) if val_frac > 0 else 0
        while n - n_test - n_val < 1:  # tiny classes: train keeps at least one
            if n_val >= n_test and n_val > 1:
                n_val -= 1
            else:
                n_test -= 1
        random.Random(f"{seed}/{cls}").shuffle(idxs)  # str seed: stable across processes and hash seeds
        for j, i in enumerate(idxs):
            cands[i].split = "test" if j < n_test else "val" if j < n_test + n_val else "train"


def _fingerprint(size: int, classes: list[str], items: list[tuple[str, int, str]]) -> str:
    canon = {"format_version": FORMAT_VERSION, "image_size": size, "classes": classes, "items": sorted(items)}
    blob = json.dumps(canon, ensure_ascii=False, sort_keys=True, separators=(",", ":")).encode("utf-8")
    return hashlib.sha256(blob).hexdigest()


# The columns are built from their buffers: pa.array() imports pandas (~300 modules, ~50 MB) to ask whether its
# input is a DataFrame, and `ich ingest` has no other use for pandas. Same arrays, same Parquet bytes.

def _int32_column(values: list[int]) -> pa.Array:
    return pa.Array.from_buffers(pa.int32(), len(values), [None, pa.py_buffer(np.asarray(values, dtype=np.int32))])


def _binary_column(values: list[bytes], type_: pa.DataType) -> pa.Array:
    """A binary (or, of UTF-8 bytes, string) column; past 32-bit offsets (2 GiB in one row group), pa.array's own
    chunking."""
    offsets = np.zeros(len(values) + 1, dtype=np.int64)
    np.cumsum([len(v) for v in values], out=offsets[1:])
    if offsets[-1] >= 2**31:
        return pa.array(values, type_)
    return pa.Array.from_buffers(type_, len(values), [None, pa.py_buffer(offsets.astype(np.int32)),
                                                      pa.py_buffer(b"".join(values))])


def _write_shards(tmp: Path, split: str, rows: list[tuple[int, str, str, int]], scratch, size: int,
                  shard_rows: int, bar) -> list[str]:
    """Write the rows (label, rel, sha, scratch offset) of one split; returns the shard paths relative to out."""
    nbytes = size * size * 3
    shards = []
    for start in range(0, len(rows), shard_rows):
        rel = f"data/{split}-{len(shards):05d}.parquet"
        with pq.ParquetWriter(tmp / rel, SCHEMA, compression="zstd") as writer:
            chunk = rows[start:start + shard_rows]
            for g in range(0, len(chunk), ROW_GROUP):
                group = chunk[g:g + ROW_GROUP]
                images = []
                for _, _, _, offset in group:
                    scratch.seek(offset)
                    images.append(scratch.read(nbytes))
                k = len(group)
                writer.write_table(pa.Table.from_arrays([
                    _binary_column(images, pa.binary()),
                    _int32_column([size] * k),
                    _int32_column([size] * k),
                    _int32_column([r[0] for r in group]),
                    _binary_column([split.encode()] * k, pa.string()),
                    _binary_column([r[1].encode("utf-8") for r in group], pa.string()),
                    _binary_column([r[2].encode() for r in group], pa.string()),
                ], schema=SCHEMA))
                bar.update(k)
        shards.append(rel)
    return shards


def _check_options(size, val_frac, test_frac, workers, shard_rows, max_file_bytes, max_aspect, decode_timeout) -> None:
    if not isinstance(size, int) or size < 1:
        raise IngestError(f"size must be a positive integer, got {size!r}")
    if not isinstance(max_file_bytes, int) or max_file_bytes < 1:
        raise IngestError(f"max_file_bytes must be a positive integer, got {max_file_bytes!r}")
    if max_aspect is not None and not max_aspect >= 1:
        raise IngestError(f"max_aspect must be at least 1 (or None for no limit), got {max_aspect!r}")
    if not decode_timeout > 0:
        raise IngestError(f"decode_timeout must be positive, got {decode_timeout!r}")
    if not (0 <= val_frac < 1 and 0 <= test_frac < 1 and val_frac + test_frac < 1):
        raise IngestError(f"val_frac={val_frac} and test_frac={test_frac} must be in [0, 1) and sum below 1")
    if workers < 1 or shard_rows < 1:
        raise IngestError(f"workers ({workers}) and shard_rows ({shard_rows}) must be at least 1")


def _check_out(src: Path, out: Path, overwrite: bool) -> None:
    src_r, out_r = src.resolve(), out.resolve()
    if out_r == src_r or src_r in out_r.parents or out_r in src_r.parents:
        raise IngestError(f"{out}: output folder must not be, contain, or sit inside the source {src}")
    if out.exists() or out.is_symlink():
        if not overwrite:
            raise IngestError(f"{out}: already exists (pass overwrite=True / --overwrite to replace it)")
        # Replacing removes the old folder: only ever do that to a previous ingest or an empty folder.
        if not out.is_dir() or out.is_symlink() or (any(out.iterdir()) and not (out / MANIFEST).is_file()):
            raise IngestError(f"{out}: exists and is not an ingested dataset; refusing to replace it")


def _move_into_place(tmp: Path, out: Path) -> None:
    if not out.exists():
        os.rename(tmp, out)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
    os.rename(out, old / "d")
    try:
        os.rename(tmp, out)
    except BaseException:
        os.rename(old / "d", out)  # put the old dataset back
        raise
    shutil.rmtree(old, ignore_errors=True)  # only now, with the new one in place


def ingest(src, out, *, size: int = 256, val_frac: float = 0.1, test_frac: float = 0.1, seed: int = 0,
           workers: int = 2, shard_rows: int = 2048, overwrite: bool = False, progress: bool = True,
           strict: bool = False, max_file_bytes: int = MAX_FILE_BYTES, max_aspect: float | None = MAX_ASPECT,
           decode_timeout: float = DECODE_TIMEOUT) -> dict:
    """Ingest the ImageFolder `src` into the dataset folder `out`; returns the manifest (also written to
    out/manifest.json). Raises IngestError with a one-line message when the dataset cannot be made.

    max_file_bytes / max_aspect: larger files / more elongated images are skipped ("too large" /
    "extreme aspect ratio"; max_aspect=None: no limit, the resize stays bounded anyway). A decoder
    process that dies or spends over decode_timeout seconds on one file fails the ingest naming it.

    strict: any file that would be skipped (broken, duplicate, conflicting labels, outside src...) fails
    the ingest instead, naming the first such file (by path) and its reason; nothing is written."""
    src, out = Path(src).absolute(), Path(out).absolute()
    _check_options(size, val_frac, test_frac, workers, shard_rows, max_file_bytes, max_aspect, decode_timeout)
    if not src.is_dir():
        raise IngestError(f"{src}: source folder {'is not a folder' if src.exists() else 'does not exist'}")
    _check_out(src, out, overwrite)

    skipped: list[dict] = []
    try:
        layout, present, classes, cands = _find_candidates(src, skipped)
    except OSError as e:
        raise IngestError(f"{e.filename or src}: cannot read ({e.strerror or e})") from None
    if not classes:
        raise IngestError(f"{src}: no class folders found (expected src/<class>/<image> or src/train/<class>/...)")
    if not cands:
        raise IngestError(f"{src}: no image files found in {len(classes)} class folders")

    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    except OSError as e:
        raise IngestError(f"{out.parent}: cannot create the output ({e.strerror or e})") from None
    try:
        (tmp / "data").mkdir()
        # Decode everything once; pixels go to a scratch file so memory stays flat in the dataset size.
        # The decoders write file i's pixels at i * nbytes (skipped files leave a hole).
        scratch_path = tmp / "pixels.scratch"
        scratch_path.touch()
        nbytes = size * size * 3
        offsets: dict[int, int] = {}
        shas: list[str | None] = [None] * len(cands)
        # Always in separate processes (also with workers=1): a decoder that crashes must not take the
        # ingest down with it, only fail it with the file's name.
        tasks = [(c.abspath, size, max_file_bytes, max_aspect) for c in cands]
        results = decode_all(tasks, workers, decode_timeout, lambda i: src / cands[i].rel, scratch_path, nbytes)
        try:
            with contextlib.closing(results), \
                    tqdm(total=len(tasks), desc="decode", unit="img", file=sys.stderr, disable=not progress) as bar:
                for i, r in results:
                    shas[i] = r.sha256
                    if r.reason:
                        skipped.append({"path": cands[i].rel, "reason": r.reason})
                    else:
                        offsets[i] = i * nbytes
                    bar.update(1)
        except DecoderFailed as e:  # a decoder died or hung: the same one line, as the ingest's error
            raise IngestError(str(e)) from None

        decoded = sorted(offsets)
        keep_local = _dedupe([cands[i] for i in decoded], [shas[i] for i in decoded], skipped)
        keep = [decoded[j] for j in keep_local]
        if strict and skipped:
            first = min(skipped, key=lambda d: (d["path"], d["reason"]))
            raise IngestError(f"{src / first['path']}: {first['reason']} (strict: {len(skipped)} file"
                              f"{'s' * (len(skipped) != 1)} would be skipped)")
        if not keep:
            raise IngestError(f"{src}: no usable images ({len(cands)} files, all skipped)")
        for split in present:  # every class needs images in every split folder there is
            for cls in classes:
                if not any(cands[i].cls == cls and cands[i].split == split for i in keep):
                    n = sum(1 for c in cands if c.cls == cls and c.split == split)
                    where = f" in split {split!r}" if split else ""
                    raise IngestError(f"class {cls!r}{where} has no usable images ({n} file{'s' * (n != 1)}, "
                                      f"all skipped)")
        if layout == "flat":
            _split_flat(cands, keep, classes, val_frac, test_frac, seed)

        label_of = {c: i for i, c in enumerate(classes)}
        by_split: dict[str, list] = {s: [] for s in SPLITS}
        for i in keep:
            c = cands[i]
            by_split[c.split].append((label_of[c.cls], c.rel, shas[i], offsets[i]))
        total = sum(len(v) for v in by_split.values())
        shards: dict[str, list[str]] = {}
        with open(scratch_path, "rb") as scratch, \
                tqdm(total=total, desc="write", unit="img", file=sys.stderr, disable=not progress) as bar:
            for split in SPLITS:
                rows = sorted(by_split[split])  # by class (label), then path
                shards[split] = _write_shards(tmp, split, rows, scratch, size, shard_rows, bar)
        scratch_path.unlink()

        counts = {s: {c: sum(1 for r in by_split[s] if r[0] == label_of[c]) for c in classes} for s in SPLITS}
        manifest = {
            "format_version": FORMAT_VERSION,
            "image_format": IMAGE_FORMAT,
            "image_size": size,
            "classes": classes,
            "num_classes": len(classes),
            "layout": layout,
            "counts": counts,
            "num_images": {s: len(by_split[s]) for s in SPLITS},
            "shards": shards,
            "options": {"size": size, "val_frac": val_frac, "test_frac": test_frac, "seed": seed,
                        "max_file_bytes": max_file_bytes, "max_aspect": max_aspect},  # the bounds decide what is skipped
            "fingerprint": _fingerprint(size, classes, [(s, r[0], r[2]) for s in SPLITS for r in by_split[s]]),
            "skipped": sorted(skipped, key=lambda d: (d["path"], d["reason"])),
            "source": str(src),
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
        _move_into_place(tmp, out)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):  # disk full, permissions: still one clear line
            raise IngestError(f"{out}: writing the dataset failed ({e.strerror or e})") from e
        raise
    return manifest


_REQUIRED = {"format_version": int, "image_format": str, "image_size": int, "classes": list, "num_classes": int,
             "layout": str, "counts": dict, "num_images": dict, "shards": dict, "fingerprint": str, "skipped": list}


def load_manifest(path) -> dict:
    """Read and sanity-check an ingested dataset's manifest; `path` is the dataset folder or its manifest.json."""
    path = Path(path)
    file = path if path.name == MANIFEST and not path.is_dir() else path / MANIFEST
    try:
        m = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise IngestError(f"{file}: not found (is {file.parent} an ingested dataset? run `ich ingest` first)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise IngestError(f"{file}: unreadable manifest ({e})") from None
    if not isinstance(m, dict):
        raise IngestError(f"{file}: manifest is not a JSON object")
    for key, typ in _REQUIRED.items():
        if key not in m:
            raise IngestError(f"{file}: manifest lacks '{key}'")
        if not isinstance(m[key], typ) or (typ is int and isinstance(m[key], bool)):
            raise IngestError(f"{file}: manifest '{key}' should be {typ.__name__}, got {type(m[key]).__name__}")
    if m["format_version"] != FORMAT_VERSION:
        raise IngestError(f"{file}: format_version {m['format_version']} is not supported (expected {FORMAT_VERSION})")
    if m["image_format"] != IMAGE_FORMAT:
        raise IngestError(f"{file}: image_format {m['image_format']!r} is not supported (expected {IMAGE_FORMAT!r})")
    if m["image_size"] < 1 or m["num_classes"] != len(m["classes"]) or not m["classes"]:
        raise IngestError(f"{file}: image_size {m['image_size']} / num_classes {m['num_classes']} / "
                          f"{len(m['classes'])} classes are inconsistent")
    if len(set(m["classes"])) != len(m["classes"]) or not all(isinstance(c, str) for c in m["classes"]):
        raise IngestError(f"{file}: class names must be distinct strings")
    for split, rels in m["shards"].items():
        for rel in rels:
            if not isinstance(rel, str) or Path(rel).is_absolute() or ".." in Path(rel).parts:
                raise IngestError(f"{file}: shard path {rel!r} of '{split}' must be relative to the dataset folder")
            if not (file.parent / rel).is_file():
                raise IngestError(f"{file.parent / rel}: shard listed in the manifest is missing")
    return m
