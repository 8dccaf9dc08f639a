#!/usr/bin/env python3
"""Generate the small PIL reference fixtures used by data/tests/{decode,augment}_*.rs.

Run with the repository's venv: `.venv/bin/python scripts/gen-augment-fixtures.py`.
Writes into data/tests/fixtures/: encoded inputs (`in_*`) and PIL's `convert('RGB')` /
resize results (`want_*.png`, 8-bit RGB PNG, which decodes losslessly anywhere).
"""
import io
import pathlib

import numpy as np
from PIL import Image

ROOT = pathlib.Path(__file__).resolve().parent.parent
OUT = ROOT / "data" / "tests" / "fixtures"
OUT.mkdir(parents=True, exist_ok=True)
rng = np.random.default_rng(1234)


def photo_like(w, h):
    """Smooth gradients + a disc + mild noise: compresses like a photo, exercises filters."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    r = 128 + 100 * np.sin(x / 7.0) * np.cos(y / 11.0)
    g = 255 * x / max(w - 1, 1)
    b = 255 * y / max(h - 1, 1)
    disc = (x - w * 0.6) ** 2 + (y - h * 0.4) ** 2 < (min(w, h) * 0.25) ** 2
    img = np.stack([r, g, b], -1)
    img[disc] = [250, 30, 40]
    img += rng.normal(0, 6, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def save_pair(name, im, fmt, **kw):
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    data = buf.getvalue()
    ext = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}[fmt]
    (OUT / f"in_{name}.{ext}").write_bytes(data)
    want = Image.open(io.BytesIO(data)).convert("RGB")
    want.save(OUT / f"want_{name}.png")


base = photo_like(48, 40)
rgb = Image.fromarray(base)
# JPEG: baseline 4:2:0, progressive, grayscale, Adobe CMYK (PIL writes inverted CMYK + APP14).
save_pair("baseline", rgb, "JPEG", quality=90)
save_pair("progressive", rgb, "JPEG", quality=90, progressive=True)
save_pair("gray", rgb.convert("L"), "JPEG", quality=90)
save_pair("cmyk", rgb.convert("CMYK"), "JPEG", quality=95)
# PNG: RGBA (alpha dropped, not composited), palette, palette+transparency, LA, 16-bit RGB & gray.
alpha = (np.arange(48 * 40) % 256).reshape(40, 48).astype(np.uint8)
save_pair("rgba", Image.fromarray(np.dstack([base, alpha]), "RGBA"), "PNG")
save_pair("palette", rgb.quantize(16), "PNG")
pal_t = rgb.quantize(8)
pal_t.info["transparency"] = 3
save_pair("palette_trns", pal_t, "PNG", transparency=3)
save_pair("la", Image.fromarray(np.dstack([base[..., 0], alpha]), "LA"), "PNG")
rgb16 = base.astype(np.uint16) * 257 + rng.integers(0, 200, base.shape).astype(np.uint16)
# Pillow cannot write 16-bit RGB PNG from an array; build it with a minimal PNG writer.
import struct
import zlib


def png16(arr, color_type):
    h, w = arr.shape[:2]
    raw = b"".join(b"\x00" + arr[y].astype(">u2").tobytes() for y in range(h))
    def chunk(t, d):
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", w, h, 16, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


for name, arr, ct in [("rgb16", rgb16, 2), ("gray16", (np.arange(48 * 40, dtype=np.uint16) * 37).reshape(40, 48), 0)]:
    data = png16(arr, ct)
    (OUT / f"in_{name}.png").write_bytes(data)
    Image.open(io.BytesIO(data)).convert("RGB").save(OUT / f"want_{name}.png")
# WebP: lossy and lossless with alpha.
save_pair("webp_lossy", rgb, "WEBP", quality=90)
save_pair("webp_lossless_alpha", Image.fromarray(np.dstack([base, alpha]), "RGBA"), "WEBP", lossless=True)

# Bicubic resize references (what torchvision does on PIL images).
src = Image.fromarray(photo_like(37, 29))
src.save(OUT / "resize_src.png")
# torchvision F.resized_crop(img, top=5, left=3, height=20, width=30, size=[16, 16], BICUBIC)
src.crop((3, 5, 33, 25)).resize((16, 16), Image.BICUBIC).save(OUT / "want_resize_crop_down.png")
# An upscale (no antialias widening) of a crop.
src.crop((10, 4, 22, 13)).resize((31, 23), Image.BICUBIC).save(OUT / "want_resize_crop_up.png")
# OpenCLIP eval: Resize(24) (shorter side) + CenterCrop(24), as uint8 before ToTensor.
from torchvision import transforms as T
ev = T.Compose([T.Resize(24, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(24)])
ev(src).save(OUT / "want_eval_24.png")
print("wrote", sorted(p.name for p in OUT.iterdir()))
