"""The decoder sandbox of `ich ingest`: image files decoded in separate processes, bounded before their pixels are
allocated, and the one decode of image bytes that serving shares with ingest (`decode_image`).

Each file: sha256 of its bytes, PIL decode with EXIF orientation, conversion to RGB from any mode (`to_rgb`),
shorter side resized to `size`, center crop (`resize_crop`). Files above `max_bytes` are skipped unread; images
above PIL's MAX_IMAGE_PIXELS are refused from their header ("decompression bomb"), as are images whose long side
is more than `max_aspect` times the short side ("extreme aspect ratio"). `decode_all` runs the files through
decoder processes and fails (DecoderFailed, naming the file) when one dies or hangs. Imports no torch: ingest
stays light; ich/preprocess.py decodes served images with `decode_image`.
"""
from __future__ import annotations

import collections
import hashlib
import io
import multiprocessing
import os
import signal
import time
import warnings
from dataclasses import dataclass
from multiprocessing import connection as mp_connection

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from ich.errors import IchError

MAX_FILE_BYTES = 50 * 2**20  # default cap on one source file; a 50 MP JPEG is ~25 MB
MAX_ASPECT = 10.0  # default cap on long side / short side
DECODE_TIMEOUT = 300.0  # seconds one file may take in a decoder before the ingest fails naming it
FULL_RESIZE_LIMIT = 16  # resize_crop resizes the whole image only up to this many size x size squares


@dataclass
class Decoded:
    sha256: str | None
    reason: str | None  # None when the file decoded fine
    pixels: bytes | None


class DecoderFailed(IchError):
    """A decoder process died or hung on a file; the message names the file (ich.ingest turns it into IngestError)."""


def _init_worker() -> None:
    # Truncated files must fail, and images above MAX_IMAGE_PIXELS must be refused at open, before
    # their pixels are allocated.
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    warnings.simplefilter("error", Image.DecompressionBombWarning)


def to_rgb(im: Image.Image) -> Image.Image:
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


def resize_crop(im: Image.Image, size: int) -> Image.Image:
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


def decode_file(abspath: str, size: int, max_bytes: int = MAX_FILE_BYTES,
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
        im = resize_crop(to_rgb(im), size)
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
                d = decode_file(*args)
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


def decode_all(tasks: list[tuple], workers: int, timeout: float, name_of, scratch_path, nbytes: int):
    """Yield (index, Decoded) for every task, decoded in `workers` processes, in completion order. The pixels of
    task i (Decoded.reason None) are in the scratch file (which must exist) at i * nbytes; Decoded.pixels is None.

    Each decoder has up to QUEUE_DEPTH tasks queued and works through them in the order sent, so when one dies
    (a codec segfault, the OOM killer) or spends over `timeout` seconds on one file, the file it was decoding is
    the oldest of its unanswered tasks: DecoderFailed names it (`name_of(index)`), and every decoder is stopped.
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
                    raise DecoderFailed(f"{name_of(i)}: the image decoder process died while decoding this file "
                                      f"({_how_it_ended(procs[w])}); nothing was written")
                if time.monotonic() - head_since[w] > timeout:
                    raise DecoderFailed(f"{name_of(i)}: decoding this file took over {timeout:g} s (decode_timeout); "
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


def decode_image(data: bytes, size: int, where: str) -> np.ndarray:
    """Image bytes -> (size, size, 3) uint8, the way `ich ingest` stores a photo (EXIF orientation, any mode
    to RGB, shorter side resized to `size`, center crop)."""
    try:
        im = Image.open(io.BytesIO(data))
        if im.format == "JPEG":
            im.draft(None, (size, size))  # ingest decodes JPEGs with the same DCT-domain downscale
        im.load()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as e:
        raise ValueError(f"{where}: not a readable image ({type(e).__name__})") from None
    try:
        im = ImageOps.exif_transpose(im)
    except Exception:
        pass  # unreadable EXIF: keep the pixels as stored, like ingest
    return np.asarray(resize_crop(to_rgb(im), size), dtype=np.uint8)
