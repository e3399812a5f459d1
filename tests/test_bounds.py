"""Bounded ingest (issue 13, item 2): hostile files cost a clear reason, under 1 s and 200 MB, never a hang.

Each case ingests a small good folder plus one hostile file in a fresh Python process that measures
itself: CPU seconds (its own and its decoder processes') and wall time of the `ingest` call, and peak RSS
above what the process held before the call (its own high-water mark, reset just before, and that of its
decoder processes, forked from it); then the same for decoding the hostile file alone. Before the fix,
the 370-byte 100000x1 PNG made the decoder ask for a ~24 GiB resize; a dead decoder hung the pool.

The 1 s bound is on CPU time, for the whole ingest and for the hostile file's decode alone: the test
machine is shared (load average 20 on 2 cores seen), which stretches any wall time without any work done;
a hang is caught by a generous wall-clock ceiling (HANG_S), never by a tight one. A control plants a decode
that costs more CPU than the bound and sees assert_bounded fail. Dying decoders run with a 5 s
decode_timeout (wall clock per file, ich/ingest.py): a good 40 px image never takes that long even on a
loaded machine, so the error cannot name the wrong file (with 0.5 s, a descheduled decoder could).
"""
from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
from PIL import Image

from tests.imagegen import make_bomb, make_simple_folder

ROOT = Path(__file__).resolve().parent.parent
GOOD = {"a": 3, "b": 3}  # 6 good images beside the hostile one
MAX_SECONDS = 1.0  # CPU seconds (time.process_time / getrusage), not wall: load cannot stretch it
MAX_EXTRA_MB = 200
HANG_S = 20.0  # wall-clock ceiling for a whole ingest: anything longer is a hang, not load
DECODE_TIMEOUT_S = 5.0  # the dying-decoder cases' decode_timeout (see the docstring)

# Runs in a fresh interpreter: measure one ingest call. Prints one JSON line.
PROBE = r"""
import json, resource, sys, time
from ich.ingest import IngestError, ingest
args = json.loads(sys.argv[1])

def rss_kb(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])

def cpu_s():
    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime

before = rss_kb("VmRSS")
open("/proc/self/clear_refs", "w").write("5")  # reset this process's peak RSS (VmHWM, ru_maxrss)
t0, c0 = time.perf_counter(), cpu_s()
try:
    m = ingest(args["src"], args["out"], size=args.get("size", 32), workers=args.get("workers", 2), progress=False,
               overwrite=args.get("overwrite", False), **args.get("options", {}))
    result = {"ok": True, "skipped": m["skipped"], "num_images": m["num_images"]}
except IngestError as e:
    result = {"ok": False, "error": str(e)}
wall, cpu = time.perf_counter() - t0, cpu_s() - c0
# VmHWM, not ru_maxrss: Linux carries ru_maxrss across exec, so a probe started from a large pytest process
# would report the parent's size (measured: +1.2 GB after the bench smoke tests).
peak_self = rss_kb("VmHWM")
peak_children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
result.update(wall_s=wall, cpu_s=cpu, extra_mb=(max(peak_self, peak_children) - before) / 1024, before_mb=before / 1024)

if args.get("file"):  # the hostile file alone, decoded in this process as a decoder would
    from ich.decode import decode_file
    opts = {k: v for k, v in args.get("options", {}).items() if k in ("max_aspect",)}
    before = rss_kb("VmRSS")
    open("/proc/self/clear_refs", "w").write("5")
    t0, c0 = time.perf_counter(), time.process_time()
    d = decode_file(args["file"], args.get("size", 32), **opts)
    while time.process_time() - c0 < args.get("planted_cpu_s", 0):  # the control's slow decode
        pass
    result.update(file_wall_s=time.perf_counter() - t0, file_cpu_s=time.process_time() - c0, file_reason=d.reason,
                  file_extra_mb=(rss_kb("VmHWM") - before) / 1024)
print(json.dumps(result))
"""


def probe(src: Path, out: Path, env_extra: dict | None = None, **args) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), **(env_extra or {})}
    p = subprocess.run([sys.executable, "-c", PROBE, json.dumps({"src": str(src), "out": str(out), **args})],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]
    r = json.loads(p.stdout.strip().splitlines()[-1])
    print(f"ingest {r['wall_s']:.3f} s wall, {r['cpu_s']:.3f} s CPU, +{r['extra_mb']:.1f} MB"  # shown with -s
          + (f"; the file alone {r['file_cpu_s']:.3f} s CPU, +{r['file_extra_mb']:.1f} MB" if "file_cpu_s" in r else ""))
    return r


def assert_bounded(r: dict) -> None:
    assert r["cpu_s"] < MAX_SECONDS, f"ingest took {r['cpu_s']:.2f} CPU s"
    assert r["wall_s"] < HANG_S, f"ingest took {r['wall_s']:.2f} s"
    assert r["extra_mb"] < MAX_EXTRA_MB, f"used {r['extra_mb']:.0f} MB above the {r['before_mb']:.0f} MB baseline"
    if "file_cpu_s" in r:
        assert r["file_cpu_s"] < MAX_SECONDS, f"decoding the file took {r['file_cpu_s']:.2f} CPU s"
        assert r["file_wall_s"] < HANG_S, f"decoding the file took {r['file_wall_s']:.2f} s"
        assert r["file_extra_mb"] < MAX_EXTRA_MB, f"decoding the file used {r['file_extra_mb']:.0f} MB"


def skipped_reason(r: dict, rel: str) -> str | None:
    return next((d["reason"] for d in r["skipped"] if d["path"] == rel), None)


# ---------------------------------------------------------------------------------------------- hostile files

def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def real_png_bomb(path: Path, side: int = 10_000) -> Path:
    """A complete, valid greyscale PNG of side x side black pixels (100 M: above PIL's MAX_IMAGE_PIXELS,
    below twice it, so PIL only *warns*); ~100 KB on disk."""
    z = zlib.compressobj(9)
    row = b"\0" * (side + 1)  # filter byte + pixels
    idat = b"".join(z.compress(row) for _ in range(side)) + z.flush()
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat)
                     + _png_chunk(b"IEND", b""))
    return path


def strip_png(path: Path, w: int, h: int) -> Path:
    Image.new("L", (w, h), 128).save(path, "PNG", optimize=True)
    return path


@pytest.fixture
def good_src(tmp_path) -> Path:
    return make_simple_folder(tmp_path / "src", GOOD, size=40)


def test_thin_image_is_refused_from_its_header(tmp_path, good_src):
    thin = strip_png(good_src / "a" / "thin.png", 100_000, 1)
    assert thin.stat().st_size < 1000  # a few hundred bytes that asked for ~24 GiB
    r = probe(good_src, tmp_path / "out", file=str(thin))
    assert r["ok"] and skipped_reason(r, "a/thin.png") == "extreme aspect ratio" == r["file_reason"]
    assert sum(r["num_images"].values()) == 6  # the rest is ingested
    assert_bounded(r)


def test_cpu_bound_fails_on_a_planted_slow_decode(tmp_path, good_src):
    """Control: the file's meter spans its decode: the same thin image plus 1.2 CPU s of work in that window
    fails assert_bounded's CPU bound (and only it), so the bound above could fail."""
    thin = strip_png(good_src / "a" / "thin.png", 100_000, 1)
    r = probe(good_src, tmp_path / "out", file=str(thin), planted_cpu_s=1.2)
    with pytest.raises(AssertionError, match="decoding the file took .* CPU s"):
        assert_bounded(r)


def test_tall_image_is_refused_from_its_header(tmp_path, good_src):
    tall = strip_png(good_src / "b" / "tall.png", 1, 100_000)
    r = probe(good_src, tmp_path / "out", file=str(tall))
    assert r["ok"] and skipped_reason(r, "b/tall.png") == "extreme aspect ratio" == r["file_reason"]
    assert sum(r["num_images"].values()) == 6
    assert_bounded(r)


@pytest.mark.parametrize("w, h", [(100_000, 1), (1, 100_000)], ids=["thin", "tall"])
def test_unrefused_strip_is_resized_within_bounds(tmp_path, good_src, w, h):
    """With the aspect limit off, the strip is ingested: crop-first keeps the resize at size^2 pixels."""
    strip = strip_png(good_src / "a" / "strip.png", w, h)
    r = probe(good_src, tmp_path / "out", size=256, options={"max_aspect": None}, file=str(strip))
    assert r["ok"] and r["skipped"] == [] and sum(r["num_images"].values()) == 7 and r["file_reason"] is None
    assert_bounded(r)


def test_aspect_limit_is_configurable(tmp_path, good_src):
    strip_png(good_src / "a" / "wide.png", 300, 100)  # 3:1, fine by default
    r = probe(good_src, tmp_path / "out", options={"max_aspect": 2.0})
    assert r["ok"] and skipped_reason(r, "a/wide.png") == "extreme aspect ratio"


def test_huge_file_is_skipped_unread(tmp_path, good_src):
    """Default cap 50 MiB: a 60 MiB file (sparse: costs no disk) is refused from its size, never read."""
    big = good_src / "a" / "big.png"
    big.write_bytes(b"\x89PNG\r\n\x1a\n")
    os.truncate(big, 60 * 2**20)
    r = probe(good_src, tmp_path / "out", file=str(big))
    assert r["ok"] and skipped_reason(r, "a/big.png") == "too large" == r["file_reason"]
    assert sum(r["num_images"].values()) == 6
    assert_bounded(r)


def test_file_size_cap_is_configurable(tmp_path, good_src):
    r = probe(good_src, tmp_path / "out", options={"max_file_bytes": 200})  # every 40 px PNG is larger
    assert not r["ok"] and "no usable images" in r["error"]
    r = probe(good_src, tmp_path / "out2", options={"max_file_bytes": 10**6})
    assert r["ok"] and r["skipped"] == []


@pytest.mark.parametrize("kind", ["warning", "error"])
def test_decompression_bomb_is_refused(tmp_path, good_src, kind):
    """100 M pixels (PIL warns: treated as an error) and 400 M (PIL errors): both refused at the header."""
    bomb = good_src / "a" / "bomb.png"
    real_png_bomb(bomb) if kind == "warning" else make_bomb(bomb, 20_000, 20_000)
    r = probe(good_src, tmp_path / "out", file=str(bomb))
    assert r["ok"] and skipped_reason(r, "a/bomb.png") == "decompression bomb" == r["file_reason"]
    assert sum(r["num_images"].values()) == 6
    assert_bounded(r)


# ---------------------------------------------------------------------------------------------- dying decoders

def snapshot(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("sig, how", [("SIGSEGV", "killed by SIGSEGV"), ("SIGKILL", "killed by SIGKILL (out of memory?)"),
                                      ("SIGSTOP", f"took over {DECODE_TIMEOUT_S:g} s")], ids=["segfault", "oom-kill", "hang"])
@pytest.mark.parametrize("workers", [1, 2])
def test_dying_decoder_fails_naming_the_file(tmp_path, good_src, sig, how, workers):
    """A decoder that crashes (or hangs past decode_timeout) on one file fails the ingest in one line naming
    that file, fast; a dataset already at the output is left exactly as it was, and no temp folder stays."""
    from ich.ingest import ingest
    out = tmp_path / "out"
    ingest(good_src, out, size=32, workers=1, progress=False)
    before = snapshot(out)
    (good_src / "b" / "crash.png").write_bytes((good_src / "b" / "000.png").read_bytes()[:-20] + b"x" * 20)
    r = probe(good_src, out, {"ICH_FAULT_DECODER": f"{sig}:crash.png"}, workers=workers, overwrite=True,
              options={"decode_timeout": DECODE_TIMEOUT_S})
    assert not r["ok"]
    assert "\n" not in r["error"] and r["error"].startswith(f"{good_src / 'b' / 'crash.png'}: "), r["error"]
    assert how in r["error"] and "nothing was written" in r["error"]
    assert r["cpu_s"] < MAX_SECONDS and r["wall_s"] < DECODE_TIMEOUT_S + HANG_S, (r["cpu_s"], r["wall_s"])
    assert snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]  # no .out.tmp-* left behind


def test_dying_decoder_through_the_cli(tmp_path, good_src):
    """`ich ingest` as users run it: exit 2 and one stderr line naming the file."""
    (good_src / "a" / "crash.png").write_bytes((good_src / "a" / "000.png").read_bytes() + b"\0")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "ICH_FAULT_DECODER": "SIGSEGV:crash.png"}
    p = subprocess.run([sys.executable, "-m", "sweeps.cli", "ingest", str(good_src), str(tmp_path / "out"), "--size", "16",
                        "--quiet"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert p.returncode == 2 and len(lines) == 1, p.stderr
    assert lines[0].startswith("ich ingest: error: ") and "a/crash.png" in lines[0] and "SIGSEGV" in lines[0]
    assert not (tmp_path / "out").exists()


def test_fault_hook_is_inert_outside_a_decoder_process(tmp_path, monkeypatch):
    """The test hook only fires inside decoder processes: an in-process decode is unaffected."""
    from ich.decode import decode_file
    path = strip_png(tmp_path / "x.png", 20, 20)
    monkeypatch.setenv("ICH_FAULT_DECODER", "SIGKILL:x.png")
    assert decode_file(str(path), 8).reason is None


# ---------------------------------------------------------------------------------------------- the resize

def test_resize_crop_keeps_pixels_of_ordinary_images():
    """Up to FULL_RESIZE_LIMIT squares the result is exactly resize-then-crop (what datasets were made with)."""
    import numpy as np

    from ich.decode import resize_crop
    rng = np.random.default_rng(0)
    for w, h, size in [(40, 30, 16), (300, 200, 64), (1000, 250, 64), (64, 64, 32), (8, 8, 32), (3000, 2000, 256)]:
        im = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")
        scale = size / min(w, h)
        nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
        ref = im.resize((nw, nh), Image.Resampling.BICUBIC, reducing_gap=3.0) if (nw, nh) != (w, h) else im
        left, top = (nw - size) // 2, (nh - size) // 2
        ref = ref.crop((left, top, left + size, top + size))
        assert np.array_equal(np.asarray(resize_crop(im, size)), np.asarray(ref)), (w, h, size)


def test_resize_crop_of_elongated_image_matches_on_smooth_content():
    """Past the limit only the kept square is resampled; on smooth content it matches the full resize."""
    import numpy as np

    from ich.decode import FULL_RESIZE_LIMIT, resize_crop
    w, h, size = 10, 2302, 16
    assert h / w > FULL_RESIZE_LIMIT
    yy, xx = np.mgrid[0:h, 0:w]
    im = Image.fromarray(np.stack([yy * 255 / h, xx * 255 / w, (yy + xx) * 128 / (h + w)], -1).astype(np.uint8), "RGB")
    nh = round(h * size / w)
    full = np.asarray(im.resize((size, nh), Image.Resampling.BICUBIC, reducing_gap=3.0))
    top = (nh - size) // 2
    got = np.asarray(resize_crop(im, size)).astype(int)
    assert np.abs(got - full[top:top + size].astype(int)).max() <= 1


def test_cli_flags_set_the_bounds(tmp_path, good_src, capsys):
    """`ich ingest --max-file-mb/--max-aspect` reach the ingest (0: no aspect limit)."""
    from sweeps.cli import main
    strip_png(good_src / "a" / "thin.png", 2000, 1)
    assert main(["ingest", str(good_src), str(tmp_path / "o1"), "--size", "16", "--quiet"]) == 0
    assert "skipped a/thin.png: extreme aspect ratio" in capsys.readouterr().out
    assert main(["ingest", str(good_src), str(tmp_path / "o2"), "--size", "16", "--quiet", "--max-aspect", "0"]) == 0
    assert "0 skipped" in capsys.readouterr().out
    big = good_src / "b" / "big.png"
    big.write_bytes((good_src / "b" / "000.png").read_bytes() + b"\0" * 200_000)
    assert main(["ingest", str(good_src), str(tmp_path / "o3"), "--size", "16", "--quiet", "--max-aspect", "0",
                 "--max-file-mb", "0.1"]) == 0
    out = capsys.readouterr().out
    assert "1 skipped" in out and "skipped b/big.png: too large" in out


def test_decoders_exit_when_the_ingest_is_killed(tmp_path):
    """SIGKILL the ingest mid-decode: its decoder processes see their pipe close and exit (no orphans)."""
    import signal
    import time

    from bench.ingest_bench import make_photos
    src = make_photos(tmp_path / "photos", 60)
    code = (f"from ich.ingest import ingest; ingest({str(src)!r}, {str(tmp_path / 'out')!r}, size=256, workers=2, "
            "progress=False)")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    kids: list[int] = []
    try:
        deadline = time.monotonic() + 60
        while len(kids) < 2 and time.monotonic() < deadline and proc.poll() is None:
            kids = [int(k) for k in Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()]
            time.sleep(0.02)
        assert len(kids) == 2, "the ingest never started its two decoders"
        time.sleep(0.2)
    finally:
        proc.kill()  # the ingest only: its decoders are left to notice by themselves
        proc.wait()

    def alive(pid: int) -> bool:
        try:
            return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
        except FileNotFoundError:
            return False
    deadline = time.monotonic() + 10
    while any(alive(k) for k in kids) and time.monotonic() < deadline:
        time.sleep(0.05)
    left = [k for k in kids if alive(k)]
    for k in left:  # our own grandchildren, by the PIDs we recorded: clean up before failing
        os.kill(k, signal.SIGKILL)
    assert not left, f"decoders {left} outlived the killed ingest"
