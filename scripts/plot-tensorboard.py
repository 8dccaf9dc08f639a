#!/usr/bin/env python3
"""Draw one scalar of a run's TensorBoard event files as a small PNG line chart, read with
TensorBoard's own EventAccumulator (so the picture shows what TensorBoard would) and drawn with
PIL (no plotting library needed).

Usage: plot-tensorboard.py LOGDIR OUT.png [--tag train/loss] [--title TEXT] [--width 640 --height 300]
"""
import argparse
import math

from PIL import Image, ImageDraw, ImageFont
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator


def nice_step(span: float, ticks: int) -> float:
    """A round tick spacing (1, 2 or 5 times a power of ten) giving about `ticks` intervals."""
    raw = span / max(ticks, 1)
    power = 10 ** math.floor(math.log10(raw)) if raw > 0 else 1.0
    return next(m * power for m in (1, 2, 5, 10) if m * power >= raw)


def label(v: float) -> str:
    return f"{v:g}" if abs(v) >= 1e-3 or v == 0 else f"{v:.1e}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("logdir")
    ap.add_argument("out")
    ap.add_argument("--tag", default="train/loss")
    ap.add_argument("--title", default=None)
    ap.add_argument("--width", type=int, default=640)
    ap.add_argument("--height", type=int, default=300)
    args = ap.parse_args()

    acc = EventAccumulator(args.logdir, size_guidance={"scalars": 0})
    acc.Reload()
    if args.tag not in acc.Tags()["scalars"]:
        raise SystemExit(f"{args.logdir}: no scalar `{args.tag}` (has: {', '.join(sorted(acc.Tags()['scalars']))})")
    points = [(e.step, e.value) for e in acc.Scalars(args.tag) if math.isfinite(e.value)]
    if len(points) < 2:
        raise SystemExit(f"{args.logdir}: `{args.tag}` has {len(points)} finite point(s); a curve needs two")

    w, h = args.width, args.height
    font = ImageFont.load_default(size=13)
    small = ImageFont.load_default(size=11)
    left, right, top, bottom = 56, 16, 30, 40
    img = Image.new("RGB", (w, h), "white")
    draw = ImageDraw.Draw(img)
    x0, x1 = points[0][0], points[-1][0]
    lo, hi = min(v for _, v in points), max(v for _, v in points)
    y_step = nice_step(hi - lo or 1.0, 5)
    lo, hi = math.floor(lo / y_step) * y_step, math.ceil(hi / y_step) * y_step
    px = lambda s: left + (s - x0) / (x1 - x0) * (w - left - right)
    py = lambda v: top + (hi - v) / (hi - lo) * (h - top - bottom)

    grid, axis, text = (225, 225, 225), (90, 90, 90), (40, 40, 40)
    y = lo
    while y <= hi + y_step / 2:
        draw.line([(left, py(y)), (w - right, py(y))], fill=grid)
        draw.text((left - 6, py(y)), label(y), font=small, fill=text, anchor="rm")
        y += y_step
    x_step = nice_step(x1 - x0, 6)
    x = math.ceil(x0 / x_step) * x_step
    while x <= x1:
        draw.line([(px(x), top), (px(x), h - bottom)], fill=grid)
        draw.text((px(x), h - bottom + 5), label(x), font=small, fill=text, anchor="mt")
        x += x_step
    draw.rectangle([left, top, w - right, h - bottom], outline=axis)
    draw.line([(px(s), py(v)) for s, v in points], fill=(31, 119, 180), width=2, joint="curve")
    draw.text((w // 2, h - 6), "step", font=font, fill=text, anchor="ms")
    title = args.title or f"{args.tag} ({len(points)} points from {args.logdir})"
    draw.text((left, 8), title, font=font, fill=text)
    # A few colours only: a palette PNG stays a few kilobytes.
    img.convert("P", palette=Image.Palette.ADAPTIVE, colors=32).save(args.out, optimize=True)
    print(f"wrote {args.out}: {args.tag}, steps {x0}..{x1}, {len(points)} points")


if __name__ == "__main__":
    main()
