#!/usr/bin/env python3
"""Generate the reference fixtures of data/tests/augment_reference.rs from timm and PIL.

Run with the repository's venv: `.venv/bin/python scripts/gen-transform-fixtures.py`.
Writes into data/tests/fixtures/:
  rrc_quantiles.json   timm's RandomResizedCropAndInterpolation.get_params, 200,000 draws per
                       case: quantiles (levels 0, 0.001, ..., 1) of the crop's area fraction, log
                       aspect ratio and centre (x, y as fractions of the image).
  resize_box.json      + in_resize_box.png, want_resize_box.png: PIL `Image.resize(size, BICUBIC,
                       box=...)` for fractional boxes, downscales of 2x and more and an upscale,
                       outputs stacked top to bottom in one PNG.
  highfreq.json        + in_highfreq.jpg, want_highfreq.png: a high-frequency JPEG through PIL
                       decode + timm's crop-and-resize (F.resized_crop, bicubic) for crops drawn by
                       timm's get_params (and a few fixed ones), outputs stacked top to bottom.
  color_jitter.json    + in_color_jitter.png, want_color_jitter.png: torchvision's
                       ColorJitter.forward on a PIL image (ImageEnhance.Brightness, Contrast, Color)
                       with its draws fixed (order and factors; float32-exact factors, as PIL's
                       blend takes a C float), outputs stacked top to bottom.
"""
import io
import json
import math
import pathlib
import random

import numpy as np
from PIL import Image
from timm.data.transforms import RandomResizedCropAndInterpolation
from torchvision.transforms import ColorJitter, InterpolationMode
from torchvision.transforms import functional as F

ROOT = pathlib.Path(__file__).resolve().parent.parent
OUT = ROOT / "data" / "tests" / "fixtures"
OUT.mkdir(parents=True, exist_ok=True)
LEVELS = np.linspace(0.0, 1.0, 1001)


def rrc_quantiles():
    random.seed(20240611)
    cases = []
    for w, h, scale, ratio in [
        (4000, 4000, (0.33, 1.0), (3 / 4, 4 / 3)),  # augreg: attempts fail when the crop would not fit
        (640, 480, (0.08, 1.0), (3 / 4, 4 / 3)),  # torchvision's default scale
        (500, 300, (0.33, 1.0), (3 / 4, 4 / 3)),  # wider than 4/3: frequent fallback
        (300, 900, (0.33, 1.0), (3 / 4, 4 / 3)),  # taller than 3/4
    ]:
        img = Image.new("1", (w, h))
        stats = np.empty((200_000, 4))
        for k in range(len(stats)):
            i, j, ch, cw = RandomResizedCropAndInterpolation.get_params(img, scale, ratio)
            stats[k] = (cw * ch / (w * h), math.log(cw / ch), (j + cw / 2) / w, (i + ch / 2) / h)
        q = np.quantile(stats, LEVELS, axis=0, method="inverted_cdf")
        cases.append({
            "width": w, "height": h, "scale": list(scale), "ratio": list(ratio), "draws": len(stats),
            "area": q[:, 0].tolist(), "log_aspect": q[:, 1].tolist(),
            "center_x": q[:, 2].tolist(), "center_y": q[:, 3].tolist(),
        })
    (OUT / "rrc_quantiles.json").write_text(json.dumps({"levels": LEVELS.tolist(), "cases": cases}))


def textured(w, h, rng):
    """Gratings up to near the Nyquist frequency, hard edges, fine noise: what a reduced-scale
    decode or a careless resampler gets wrong first."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    img = np.zeros((h, w, 3))
    for c in range(3):
        for f, ang in [(0.45, 0.3 + c), (0.31, 1.1 + c), (0.12, 2.0 + c), (0.04, 0.7 + c)]:
            img[..., c] += 40 * np.sin(2 * np.pi * f * (x * math.cos(ang) + y * math.sin(ang)))
    img += 128
    checker = ((x // 3 + y // 3) % 2 == 0)[..., None]
    box = (x > w * 0.55) & (x < w * 0.8) & (y > h * 0.2) & (y < h * 0.6)
    img = np.where(box[..., None] & checker, 250.0, img)
    img = np.where(box[..., None] & ~checker, 5.0, img)
    img += rng.normal(0, 10, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def stack(images):
    return Image.fromarray(np.concatenate([np.asarray(im) for im in images], axis=0))


def resize_box():
    rng = np.random.default_rng(7)
    src = Image.fromarray(textured(97, 83, rng))
    src.save(OUT / "in_resize_box.png")
    cases = [
        ((3.25, 5.5, 60.75, 47.125), (16, 12)),  # fractional, ~3.6x down
        ((0.5, 0.5, 96.5, 82.5), (40, 33)),  # fractional, 2.4x down
        ((0.0, 0.0, 97.0, 83.0), (24, 20)),  # whole image, 4x down
        ((11.0, 2.0, 91.0, 82.0), (40, 40)),  # integer box, exactly 2x down
        ((7.8, 30.2, 96.9, 82.95), (9, 5)),  # fractional, ~10x down, up to the edges
        ((10.3, 4.7, 22.9, 13.1), (31, 23)),  # fractional upscale
    ]
    outs = [src.resize(size, Image.BICUBIC, box=box) for box, size in cases]
    # Outputs have different widths: pad each to the widest (zeros) before stacking.
    width = max(o.width for o in outs)
    padded = []
    for o in outs:
        a = np.zeros((o.height, width, 3), np.uint8)
        a[:, : o.width] = np.asarray(o)
        padded.append(Image.fromarray(a))
    stack(padded).save(OUT / "want_resize_box.png")
    spec = [{"box": list(box), "width": size[0], "height": size[1]} for box, size in cases]
    (OUT / "resize_box.json").write_text(json.dumps({"cases": spec}, indent=1))


def highfreq():
    rng = np.random.default_rng(11)
    buf = io.BytesIO()
    Image.fromarray(textured(640, 480, rng)).save(buf, "JPEG", quality=90)
    (OUT / "in_highfreq.jpg").write_bytes(buf.getvalue())
    img = Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
    size = 96
    random.seed(5)
    crops = [RandomResizedCropAndInterpolation.get_params(img, (0.33, 1.0), (3 / 4, 4 / 3)) for _ in range(10)]
    # Fixed ones for the full-scale path: an upscale, and crops just under and over 2x the output.
    crops += [(17, 301, 80, 100), (200, 33, 190, 150), (91, 77, 193, 250), (0, 0, 480, 640)]
    outs = [F.resized_crop(img, i, j, h, w, [size, size], InterpolationMode.BICUBIC) for i, j, h, w in crops]
    stack(outs).save(OUT / "want_highfreq.png")
    spec = [{"top": i, "left": j, "height": h, "width": w} for i, j, h, w in crops]
    (OUT / "highfreq.json").write_text(json.dumps({"size": size, "crops": spec}, indent=1))


def color_jitter():
    rng = np.random.default_rng(13)
    src = Image.fromarray(textured(29, 23, rng))
    src.save(OUT / "in_color_jitter.png")
    # (fn_idx, (brightness, contrast, saturation)): every order, factors below and above 1, 0 (a
    # degenerate image), and large ones that clip.
    cases = [
        ([0, 1, 2], (0.6, 1.4, 0.7)),
        ([2, 1, 0], (1.3, 0.65, 1.35)),
        ([1, 0, 2], (0.9, 1.2, 0.0)),
        ([1, 2, 0], (1.0, 0.0, 1.6)),
        ([2, 0, 1], (2.5, 0.3, 3.0)),
        ([0, 2, 1], (0.15, 1.8, 0.95)),
    ]
    outs = []
    spec = []
    for order, factors in cases:
        b, c, s = (float(np.float32(f)) for f in factors)
        # ColorJitter.forward with get_params' draws replaced by the case's.
        jitter = ColorJitter(brightness=0.5, contrast=0.5, saturation=0.5)
        jitter.get_params = lambda *_args, o=order, f=(b, c, s): (o, *f, None)
        outs.append(jitter(src))
        spec.append({"order": order, "factors": [b, c, s]})
    stack(outs).save(OUT / "want_color_jitter.png")
    (OUT / "color_jitter.json").write_text(json.dumps({"cases": spec}, indent=1))


rrc_quantiles()
resize_box()
highfreq()
color_jitter()
print("wrote rrc_quantiles.json, resize_box.json, highfreq.json, color_jitter.json and their images")
