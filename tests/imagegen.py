"""Generators of small test ImageFolders: 17 Vietnamese class names, mixed formats, broken files.

Each class has its own colour and stripe pattern (plus per-image noise and shift), so a model can
learn the classes; every image is a few dozen pixels wide so ingest stays fast.
"""
from __future__ import annotations

import colorsys
import struct
import unicodedata
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

ICH_CLASSES = [
    "Đờn ca tài tử", "Lễ hội Ok Om Bók", "Hát bội", "Chợ nổi Cái Răng", "Cải lương", "Múa Rô băm",
    "Đua ghe Ngo", "Lễ hội Vía Bà Chúa Xứ", "Nghề làm bánh tráng", "Nghề dệt chiếu", "Lễ Sene Đôn Ta",
    "Lễ hội Kỳ Yên", "Nghề đóng ghe", "Hò Đồng Tháp", "Sân khấu Dù kê", "Lễ Chôl Chnăm Thmây",
    "Nghề làm gốm",
]
# Formats cycled through the regular images: (name, file extension).
FORMATS = [("jpeg", "jpg"), ("png", "png"), ("palette_png", "png"), ("rgba_png", "png"), ("grey_png", "png"),
           ("cmyk_jpeg", "jpg"), ("png16", "png"), ("webp", "webp"), ("bmp", "bmp"), ("exif_jpeg", "jpg")]


@dataclass
class IchFolder:
    root: Path
    classes: list[str]  # NFC names, in label order (sorted)
    usable: dict[str, int]  # NFC class -> images that ingest must keep
    skips: dict[str, str] = field(default_factory=dict)  # rel path (as on disk) -> expected skip reason
    special: dict[str, str] = field(default_factory=dict)  # "exif" / "deep16" / "transparent" -> rel path


def class_image(c: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """An RGB uint8 image whose colour and stripe pattern identify class `c`."""
    r, g, b = colorsys.hsv_to_rgb(c / 17, 0.8, 0.9)
    period = 3 + c % 4
    shift = rng.integers(0, period)
    coords = np.arange(size) + shift
    stripe = ((coords // (period / 2)) % 2).astype(np.float32)
    stripe = stripe[None, :] if (c // 4) % 2 == 0 else stripe[:, None]  # vertical or horizontal stripes
    stripe = np.broadcast_to(stripe, (size, size))
    img = np.stack([r, g, b])[:, None, None] * (0.55 + 0.45 * stripe)[None] * 255
    img = img.transpose(1, 2, 0) + rng.normal(0, 8, (size, size, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def save_as(arr: np.ndarray, path: Path, fmt: str) -> None:
    im = Image.fromarray(arr, "RGB")
    if fmt == "jpeg":
        im.save(path, "JPEG", quality=90)
    elif fmt == "png":
        im.save(path, "PNG")
    elif fmt == "palette_png":
        p = im.quantize(colors=16)
        p.save(path, "PNG", transparency=0)
    elif fmt == "rgba_png":
        rgba = im.convert("RGBA")
        a = np.full(arr.shape[:2], 255, np.uint8)
        a[:4, :4] = 0  # a transparent corner
        rgba.putalpha(Image.fromarray(a, "L"))
        rgba.save(path, "PNG")
    elif fmt == "grey_png":
        im.convert("L").save(path, "PNG")
    elif fmt == "cmyk_jpeg":
        im.convert("CMYK").save(path, "JPEG", quality=90)
    elif fmt == "png16":
        grey = np.asarray(im.convert("L")).astype(np.uint16) * 257
        Image.fromarray(grey).save(path, "PNG")  # mode I;16: a 16-bit greyscale PNG
    elif fmt == "webp":
        im.save(path, "WEBP", quality=90)
    elif fmt == "bmp":
        im.save(path, "BMP")
    elif fmt == "exif_jpeg":
        exif = Image.Exif()
        exif[0x0112] = 6  # orientation: rotate 90 CW to display; store the pixels rotated back
        im.transpose(Image.Transpose.ROTATE_90).save(path, "JPEG", quality=90, exif=exif.tobytes())
    else:
        raise ValueError(f"unknown format {fmt}")


def make_bomb(path, width: int = 10_000, height: int = 10_000) -> Path:
    """A PNG whose header declares width x height pixels (default 100 M, above PIL's MAX_IMAGE_PIXELS)
    but that is under 100 bytes on disk."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit greyscale
    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    path = Path(path)
    path.write_bytes(png)
    return path


def make_exif_rotated(path, w: int = 60, h: int = 30) -> None:
    """A w x h JPEG (wider than tall), left half red, right half blue, tagged with EXIF orientation 6.
    Displayed correctly it is h wide and w tall, with red on top and blue at the bottom."""
    a = np.zeros((h, w, 3), np.uint8)
    a[:, : w // 2] = (230, 20, 20)
    a[:, w // 2:] = (20, 20, 230)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(a, "RGB").save(path, "JPEG", quality=95, exif=exif.tobytes())


def make_deep16(path, size: int = 40) -> None:
    """A 16-bit greyscale PNG: left half 16384, right half 49152 (8-bit 64 and 191 when scaled, 255 if clipped)."""
    a = np.full((size, size), 16384, np.uint16)
    a[:, size // 2:] = 49152
    Image.fromarray(a).save(path, "PNG")


def make_transparent(path, size: int = 40) -> None:
    """An RGBA PNG: left half fully transparent black (white once composited), right half opaque green."""
    a = np.zeros((size, size, 4), np.uint8)
    a[:, size // 2:] = (0, 200, 0, 255)
    Image.fromarray(a, "RGBA").save(path, "PNG")


def make_ich_folder(root, n_classes: int = 17, per_class: int = 6, size: int = 40, seed: int = 0,
                    with_broken: bool = True) -> IchFolder:
    """Write root/<class>/<image> with Vietnamese class names (odd-numbered ones in NFD on disk)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    names = [unicodedata.normalize("NFC", n) for n in ICH_CLASSES[:n_classes]]
    disk = {n: unicodedata.normalize("NFD" if i % 2 else "NFC", n) for i, n in enumerate(names)}
    info = IchFolder(root, sorted(unicodedata.normalize("NFC", n) for n in names), {n: per_class for n in names})
    first: dict[str, str] = {}  # class -> rel path of its first image
    for c, name in enumerate(names):
        d = root / disk[name]
        d.mkdir()
        for i in range(per_class):
            fmt, ext = FORMATS[(c + i) % len(FORMATS)]
            rel = f"{disk[name]}/img_{i:02d}.{ext}"
            save_as(class_image(c, size, rng), root / rel, fmt)
            first.setdefault(name, rel)

    def add(c: int, filename: str) -> str:
        return f"{disk[names[c % n_classes]]}/{filename}"

    # Special images with known content, each one more usable image of its class.
    specials = {"exif": (0, "exif_rot6.jpg", make_exif_rotated), "deep16": (1, "deep16.png", make_deep16),
                "transparent": (2, "transparent.png", make_transparent)}
    for key, (c, filename, maker) in specials.items():
        rel = add(c, filename)
        maker(root / rel)
        info.special[key] = rel
        info.usable[names[c % n_classes]] += 1

    if with_broken:
        good = (root / first[names[3 % n_classes]]).read_bytes()
        jpeg = root / add(3, "truncated.jpg")
        save_as(class_image(3, size, rng), jpeg, "jpeg")
        data = jpeg.read_bytes()
        jpeg.write_bytes(data[: len(data) * 3 // 4])  # headers intact, scan cut short
        info.skips[add(3, "truncated.jpg")] = "truncated"
        (root / add(4, "empty.jpg")).write_bytes(b"")
        info.skips[add(4, "empty.jpg")] = "zero bytes"
        (root / add(5, "notes.jpg")).write_text("not a photo, just notes\n")
        info.skips[add(5, "notes.jpg")] = "not an image"
        # An exact copy inside the same class: one kept (the first by path), the copy skipped.
        c6 = first[names[6 % n_classes]]
        dup = add(6, "zz_dup_" + Path(c6).name)
        (root / dup).write_bytes((root / c6).read_bytes())
        info.skips[dup] = "duplicate"
        # The same bytes under two classes: both copies skipped.
        c7 = first[names[7 % n_classes]]
        other = add(8, "zz_from_other_" + Path(c7).name)
        (root / other).write_bytes((root / c7).read_bytes())
        info.skips[c7] = info.skips[other] = "conflicting labels"
        info.usable[names[7 % n_classes]] -= 1
        make_bomb(root / add(9, "bomb.png"))
        info.skips[add(9, "bomb.png")] = "decompression bomb"
        (root / add(10, ".DS_Store")).write_bytes(b"\0\0\0\1Bud1" + good[:32])  # hidden: ignored silently
    return info


def make_simple_folder(root, counts: dict[str, int], size: int = 16, seed: int = 0) -> Path:
    """root/<class>/<i>.png with counts[class] distinct PNGs per class (for layout and error tests)."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    for c, (name, n) in enumerate(counts.items()):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            save_as(class_image(c, size, rng), root / name / f"{i:03d}.png", "png")
    return root
