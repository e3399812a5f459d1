"""Dataset ingest: an ImageFolder of photos -> Parquet shards of fixed-size RGB pixels + manifest.json.

Input layouts:
    flat       src/<class>/<image>                   splits made here: stratified, seeded
    presplit   src/{train,val,test}/<class>/<image>  splits kept ('valid'/'validation' mean val)

Output (built in a temp dir beside `out`, then renamed into place, so a failed run leaves nothing):
    out/data/<split>-<i:05d>.parquet   columns: image (raw RGB uint8 HWC bytes, size*size*3), height,
                                       width, label, split, path (relative to src), sha256 (source file)
    out/manifest.json                  classes, counts, shards, skipped files with reasons, fingerprint

Every file is decoded once, in worker processes: sha256 of its bytes, PIL decode with EXIF orientation,
conversion to RGB from any mode, resize of the shorter side to `size`, center crop. Files that fail
are skipped with a reason instead of failing the run; identical files are deduplicated before splitting
so no image lands in two splits.

Every input is bounded before its pixels are allocated: files above `max_file_bytes` (default 50 MiB) are
skipped unread ("too large"); images above PIL's MAX_IMAGE_PIXELS are refused from their header (the
DecompressionBombWarning is an error: "decompression bomb"); images whose long side is more than
`max_aspect` (default 10) times the short side are refused from their header ("extreme aspect ratio":
the center crop would keep under a tenth of the picture). The resize itself only ever computes the
center square it keeps (`_resize_crop`), so even an unrefused 100000x1 image costs size^2 pixels, not
the ~24 GiB a resize of the whole strip would ask for. A decoder process that dies (a segfault in a
codec, the OOM killer) or hangs past `decode_timeout` fails the ingest in one line naming the file it
was decoding; nothing is written and an existing output folder is left as it was.

The fingerprint names the dataset's content, not the run: sha256 of a canonical JSON of format_version,
image_size, classes and the sorted (split, label, source sha256) list. Two ingests of the same files with
the same options give the same fingerprint, wherever they are written.
"""
from __future__ import annotations

import collections
import contextlib
import hashlib
import io
import json
import multiprocessing
import os
import random
import shutil
import signal
import stat
import sys
import tempfile
import time
import unicodedata
import warnings
from dataclasses import dataclass
from datetime import datetime, timezone
from multiprocessing import connection as mp_connection
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError
from tqdm import tqdm

from ich.errors import IchError

FORMAT_VERSION = 1
IMAGE_FORMAT = "rgb8"
SPLITS = ("train", "val", "test")
SPLIT_ALIASES = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}
MANIFEST = "manifest.json"
SKIP_REASONS = ("zero bytes", "not an image", "truncated", "corrupt", "decompression bomb", "outside source",
                "duplicate", "conflicting labels", "unreadable", "too large", "extreme aspect ratio")
MAX_FILE_BYTES = 50 * 2**20  # default cap on one source file; a 50 MP JPEG is ~25 MB
MAX_ASPECT = 10.0  # default cap on long side / short side
DECODE_TIMEOUT = 300.0  # seconds one file may take in a decoder before the ingest fails naming it
FULL_RESIZE_LIMIT = 16  # _resize_crop resizes the whole image only up to this many size x size squares
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
class Candidate:
    """One file found under a class folder, before decoding."""
    split: str | None  # presplit layout: the split folder it came from; flat: None until split
    cls: str  # NFC class name
    rel: str  # posix path relative to src, as on disk
    abspath: str


@dataclass
class Decoded:
    sha256: str | None
    reason: str | None  # None when the file decoded fine
    pixels: bytes | None


# ----------------------------------------------------------------------------------------------
# Decoding one file (runs in the worker processes)

def _init_worker() -> None:
    # Truncated files must fail, and images above MAX_IMAGE_PIXELS must be refused at open, before
    # their pixels are allocated.
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    warnings.simplefilter("error", Image.DecompressionBombWarning)


def _to_rgb(im: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB; transparency is composited onto white, 16-bit is scaled."""
    mode = im.mode
    if mode == "RGB":
        return im
    if mode in ("I", "I;16", "I;16L", "I;16B", "I;16N", "F"):
        a = np.asarray(im).astype(np.float64)
        lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
        if mode.startswith("I;16"):
            a = a / 257.0  # 0..65535 -> 0..255
        elif mode == "I" and hi > 255:
            # 32-bit int: usually 16-bit data widened by the decoder; else scale by the actual range
            a = a / 257.0 if lo >= 0 and hi <= 65535 else (a - lo) / max(hi - lo, 1e-12) * 255.0
        elif mode == "F":
            if lo >= 0 and hi <= 1.0:
                a = a * 255.0
            elif lo < 0 or hi > 255:
                a = (a - lo) / max(hi - lo, 1e-12) * 255.0
        grey = np.clip(np.rint(a), 0, 255).astype(np.uint8)
        return Image.fromarray(grey, "L").convert("RGB")
    if mode == "P" and "transparency" in im.info or mode in ("LA", "La", "PA", "RGBA", "RGBa"):
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return im.convert("RGB")  # L, 1, P, CMYK, YCbCr, ...


def _resize_crop(im: Image.Image, size: int) -> Image.Image:
    """Shorter side to `size` (bicubic), then the center size x size square.

    Up to FULL_RESIZE_LIMIT squares the whole image is resized, then cropped (how every dataset so far was
    made; kept bit for bit). Beyond, only the source region under the kept square is resampled (PIL's
    `box`), so a 100000x1 strip costs size^2 output pixels instead of a ~24 GiB intermediate."""
    w, h = im.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    left, top = (nw - size) // 2, (nh - size) // 2
    if (nw, nh) == (w, h):
        return im.crop((left, top, left + size, top + size))
    if nw * nh <= FULL_RESIZE_LIMIT * size * size:
        im = im.resize((nw, nh), Image.Resampling.BICUBIC, reducing_gap=3.0)
        return im.crop((left, top, left + size, top + size))
    sx, sy = w / nw, h / nh
    box = (left * sx, top * sy, (left + size) * sx, (top + size) * sy)
    return im.resize((size, size), Image.Resampling.BICUBIC, box=box, reducing_gap=3.0)


def aspect_problem(width: int, height: int, max_aspect: float | None = MAX_ASPECT) -> str | None:
    """"extreme aspect ratio" when the long side exceeds max_aspect times the short side (None: no limit)."""
    if max_aspect is None:
        return None
    if min(width, height) < 1 or max(width, height) > max_aspect * min(width, height):
        return "extreme aspect ratio"
    return None


def _fault_injected(abspath: str) -> None:
    """Test hook, like ICH_FAULT_ONCE_AT_EPOCH: ICH_FAULT_DECODER="SIGSEGV:name.png" makes the decoder
    process that opens a file of that name send itself the signal (SIGSEGV, SIGKILL as the OOM killer
    does, SIGSTOP to hang)."""
    spec = os.environ.get("ICH_FAULT_DECODER")
    if spec and ":" in spec:
        sig, name = spec.split(":", 1)
        if os.path.basename(abspath) == name and multiprocessing.parent_process() is not None:
            os.kill(os.getpid(), getattr(signal, sig))


def _decode_file(abspath: str, size: int, max_bytes: int = MAX_FILE_BYTES,
                 max_aspect: float | None = MAX_ASPECT) -> Decoded:
    _fault_injected(abspath)
    try:
        if os.stat(abspath).st_size > max_bytes:
            return Decoded(None, "too large", None)  # never read
        with open(abspath, "rb") as f:
            data = f.read(max_bytes + 1)  # never more than the cap, even if the file grew since it was listed
    except OSError:
        return Decoded(None, "unreadable", None)
    digest = hashlib.sha256(data).hexdigest()
    if len(data) > max_bytes:
        return Decoded(None, "too large", None)
    if not data:
        return Decoded(digest, "zero bytes", None)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))  # reads the header only; the bomb check happens here
            if aspect_problem(*im.size, max_aspect):
                return Decoded(digest, "extreme aspect ratio", None)
            if im.format == "JPEG":
                im.draft(None, (size, size))  # DCT-domain downscale; both sides stay >= size
            im.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        return Decoded(digest, "decompression bomb", None)
    except UnidentifiedImageError:
        return Decoded(digest, "not an image", None)
    except (EOFError, OSError, SyntaxError, ValueError) as e:
        return Decoded(digest, "truncated" if isinstance(e, EOFError) or "truncated" in str(e) else "corrupt", None)
    except Exception:
        return Decoded(digest, "corrupt", None)
    try:
        try:
            im = ImageOps.exif_transpose(im)
        except Exception:
            pass  # unreadable EXIF: keep the pixels as stored rather than lose the image
        im = _resize_crop(_to_rgb(im), size)
        return Decoded(digest, None, im.tobytes())
    except Exception:
        return Decoded(digest, "corrupt", None)


def _decoder_main(conn, parent_ends, scratch_path: str, nbytes: int) -> None:
    """A decoder process: decode the (index, (abspath, size, max_bytes, max_aspect)) tasks sent on `conn` in the
    order sent, until None or the parent goes away. Pixels go straight into the scratch file at index * nbytes
    (pwrite: no copy through the pipe); only (index, Decoded without pixels) comes back."""
    for end in parent_ends:  # inherited copies of the parent's ends: without closing them, a decoder would
        end.close()          # never see EOF (and exit) if the ingest process were killed
    _init_worker()
    fd = os.open(scratch_path, os.O_WRONLY)
    try:
        while True:
            try:
                task = conn.recv()
                if task is None:
                    return
                i, args = task
                d = _decode_file(*args)
                if d.pixels is not None:
                    view = memoryview(d.pixels)
                    done = 0
                    while done < len(view):  # pwrite may write less than asked
                        done += os.pwrite(fd, view[done:], i * nbytes + done)
                conn.send((i, Decoded(d.sha256, d.reason, None)))
            except (EOFError, OSError):
                return
    finally:
        os.close(fd)


def _how_it_ended(proc) -> str:
    code = proc.exitcode
    if code is not None and code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"killed by {name}" + (" (out of memory?)" if -code == signal.SIGKILL else "")
    return f"exit code {code}"


QUEUE_DEPTH = 4  # tasks queued per decoder: it never waits for the parent between files


def _decode_all(tasks: list[tuple], workers: int, timeout: float, name_of, scratch_path, nbytes: int):
    """Yield (index, Decoded) for every task, decoded in `workers` processes, in completion order. The pixels of
    task i (Decoded.reason None) are in the scratch file (which must exist) at i * nbytes; Decoded.pixels is None.

    Each decoder has up to QUEUE_DEPTH tasks queued and works through them in the order sent, so when one dies
    (a codec segfault, the OOM killer) or spends over `timeout` seconds on one file, the file it was decoding is
    the oldest of its unanswered tasks: IngestError names it (`name_of(index)`), and every decoder is stopped.
    A plain Pool would wait forever for that result."""
    ctx = multiprocessing.get_context()
    procs, conns = [], []
    queued: list[collections.deque] = []  # per decoder: task indices sent and not answered, oldest first
    head_since: list[float] = []  # per decoder: when its oldest unanswered task became the one it works on
    try:
        for _ in range(min(workers, len(tasks))):
            parent_end, child_end = ctx.Pipe()
            proc = ctx.Process(target=_decoder_main, args=(child_end, [*conns, parent_end], str(scratch_path), nbytes),
                               daemon=True)
            proc.start()
            child_end.close()
            procs.append(proc)
            conns.append(parent_end)
            queued.append(collections.deque())
            head_since.append(time.monotonic())
        todo = iter(range(len(tasks)))

        def feed(w: int) -> None:
            while len(queued[w]) < QUEUE_DEPTH:
                i = next(todo, None)
                if i is None:
                    return
                if not queued[w]:
                    head_since[w] = time.monotonic()
                conns[w].send((i, tasks[i]))
                queued[w].append(i)

        for w in range(len(procs)):
            feed(w)
        while any(queued):
            busy = [w for w in range(len(procs)) if queued[w]]
            waiting = [conns[w] for w in busy] + [procs[w].sentinel for w in busy]
            deadline = min(head_since[w] for w in busy) + timeout
            ready = set(mp_connection.wait(waiting, timeout=max(0.0, deadline - time.monotonic())))
            for w in busy:
                dead = procs[w].sentinel in ready
                try:
                    while queued[w] and conns[w].poll():  # every answer already there, also from one that died since
                        i, result = conns[w].recv()
                        if i != queued[w][0] or not isinstance(result, Decoded):
                            raise EOFError  # cannot happen with a sane decoder; treat it as a dead one
                        queued[w].popleft()
                        head_since[w] = time.monotonic()
                        yield i, result
                        feed(w)
                except (EOFError, OSError):
                    dead = True  # closed its end without an answer
                if not queued[w]:
                    continue
                i = queued[w][0]
                if dead or not procs[w].is_alive():
                    procs[w].join(5)
                    raise IngestError(f"{name_of(i)}: the image decoder process died while decoding this file "
                                      f"({_how_it_ended(procs[w])}); nothing was written")
                if time.monotonic() - head_since[w] > timeout:
                    raise IngestError(f"{name_of(i)}: decoding this file took over {timeout:g} s (decode_timeout); "
                                      f"decoder stopped, nothing was written")
    finally:
        for w, (proc, conn) in enumerate(zip(procs, conns)):
            if queued[w]:
                proc.kill()  # failing (or abandoned): a decoder still on a file, maybe hung, goes now
                continue
            try:
                conn.send(None)
            except (OSError, ValueError):
                pass
        for proc in procs:
            proc.join(2)
            if proc.is_alive():
                proc.kill()
                proc.join(5)
        for conn in conns:
            conn.close()


# ----------------------------------------------------------------------------------------------
# Finding the files

def _printable(name: str) -> str:
    """A file name as valid UTF-8 text (undecodable bytes from the file system become \\x escapes)."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


JUNK = {"thumbs.db", "desktop.ini", "__macosx"}  # OS litter, e.g. from unzipping on a Mac


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
            if os.path.islink(p) and not _inside(p, root_real):
                skipped.append({"path": _printable(Path(p).relative_to(src).as_posix()), "reason": "outside source"})
        for name in sorted(filenames):
            if _hidden(name):
                continue
            p = os.path.join(dirpath, name)
            rel = _printable(Path(p).relative_to(src).as_posix())
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


def _find_candidates(src: Path, skipped: list[dict]) -> tuple[str, list, list[str], list[Candidate]]:
    """Detect the layout and list every candidate file.

    Returns (layout, splits present (flat: [None]), NFC class names sorted, candidates)."""
    root_real = os.path.realpath(src)
    top = {e.name: e for e in os.scandir(src) if not _hidden(e.name) and e.is_dir() and not e.is_symlink()}
    split_names = {n: SPLIT_ALIASES[n.lower()] for n in top if n.lower() in SPLIT_ALIASES}
    presplit = "train" in split_names.values() and len(split_names) == len(top)

    if not presplit:
        dirs = _class_dirs(src, root_real, "", skipped)
        classes = sorted(dirs)
        cands = [Candidate(None, c, rel, p) for c in classes
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
    cands = [Candidate(split, c, rel, p) for split in SPLITS if split in per_split for c in classes
             for rel, p in _walk_class(per_split[split][c], src, root_real, skipped)]
    return "presplit", [s for s in SPLITS if s in per_split], classes, cands


# ----------------------------------------------------------------------------------------------
# Dedupe, split, write

def _dedupe(cands: list[Candidate], shas: list[str], skipped: list[dict]) -> list[int]:
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


def _split_flat(cands: list[Candidate], keep: list[int], classes: list[str],
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
                writer.write_table(pa.table({
                    "image": pa.array(images, pa.binary()),
                    "height": pa.array([size] * k, pa.int32()),
                    "width": pa.array([size] * k, pa.int32()),
                    "label": pa.array([r[0] for r in group], pa.int32()),
                    "split": pa.array([split] * k, pa.string()),
                    "path": pa.array([r[1] for r in group], pa.string()),
                    "sha256": pa.array([r[2] for r in group], pa.string()),
                }, schema=SCHEMA))
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
        results = _decode_all(tasks, workers, decode_timeout, lambda i: src / cands[i].rel, scratch_path, nbytes)
        with contextlib.closing(results), \
                tqdm(total=len(tasks), desc="decode", unit="img", file=sys.stderr, disable=not progress) as bar:
            for i, r in results:
                shas[i] = r.sha256
                if r.reason:
                    skipped.append({"path": cands[i].rel, "reason": r.reason})
                else:
                    offsets[i] = i * nbytes
                bar.update(1)

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
