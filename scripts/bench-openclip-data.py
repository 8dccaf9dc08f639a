#!/usr/bin/env python3
"""Time OpenCLIP's own train-time input pipeline, the baseline for ferroclip's `bench-data`.

    .venv/bin/python scripts/bench-openclip-data.py --shards PATTERN [--workers 1] [--batch 160]
        [--seconds 10] [--no-resampled]

runs OpenCLIP's loader, `open_clip_train.data.get_wds_dataset` (WebDataset shards → PIL decode →
augreg train transform → tokenizer → batched tensors, through a `WebLoader` with N worker
processes), on the same shards `trainer bench-data --config FILE` reads, and prints one JSON line
last (`images_per_s`, `workers`), timed after the first batch as ferroclip's is.

    .venv/bin/python scripts/bench-openclip-data.py --dir DIR [--workers 1] [--seconds 10]

DIR holds the JPEGs (write the same ones ferroclip benchmarks with
`cargo run -p data --release --example bench_data -- --write-dir DIR`); without --dir, photo-like
JPEGs (shorter side 256-512, quality 90) are generated into a temporary directory.
`--workers N` runs N processes (like N DataLoader workers), one torch thread each.
The transform is `open_clip.image_transform(256, is_train=True, aug_cfg=dict(scale=(0.33, 1.0),
re_prob=0.35, use_timm=True))`: with use_timm=False OpenCLIP ignores re_prob (it warns
"Unused augmentation cfg items"), so `--no-timm` times that cheaper torchvision variant.
Prints `images_per_s=<total> workers=<n>` last.
"""
import argparse
import io
import multiprocessing as mp
import os
import pathlib
import sys
import tempfile
import time


def make_jpegs(dir_, n, seed=0):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    for i in range(n):
        short = int(rng.integers(256, 513))
        long = int(short * rng.uniform(1.0, 1.8))
        w, h = (long, short) if rng.random() < 0.6 else (short, long)
        y, x = np.mgrid[0:h, 0:w].astype(np.float32)
        img = np.empty((h, w, 3), np.float32)
        for c in range(3):
            img[..., c] = rng.uniform(40, 200) + rng.uniform(-90, 90) * (x / w - 0.5)
        img += (np.sin(x * rng.uniform(0.005, 0.05)) * np.cos(y * rng.uniform(0.005, 0.05)) * 30)[..., None]
        for _ in range(int(rng.integers(3, 8))):
            x0, y0 = int(rng.integers(0, w)), int(rng.integers(0, h))
            x1, y1 = min(w, x0 + int(rng.integers(20, w // 2 + 21))), min(h, y0 + int(rng.integers(20, h // 2 + 21)))
            img[y0:y1, x0:x1] = rng.uniform(0, 255, 3) + np.sin((x[y0:y1, x0:x1] * 7 + y[y0:y1, x0:x1] * 13) * 0.3)[..., None] * rng.uniform(0, 40)
        img += rng.integers(-6, 7, img.shape)
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(os.path.join(dir_, f"{i:05}.jpg"), quality=90)


def worker(args):
    files, seconds, size, use_timm, wid = args
    import torch
    from PIL import Image
    import open_clip

    torch.set_num_threads(1)
    aug = dict(scale=(0.33, 1.0), re_prob=0.35)
    if use_timm:
        aug["use_timm"] = True
    t = open_clip.image_transform(size, is_train=True, aug_cfg=aug)
    blobs = [pathlib.Path(f).read_bytes() for f in files]
    # Warm-up outside the timed region (imports, first-call allocations).
    for b in blobs[:5]:
        t(Image.open(io.BytesIO(b)).convert("RGB"))
    n, i, start, cpu0 = 0, wid, time.perf_counter(), time.process_time()
    while time.perf_counter() - start < seconds:
        t(Image.open(io.BytesIO(blobs[i % len(blobs)])).convert("RGB"))
        n += 1
        i += 1
    return n, time.perf_counter() - start, time.process_time() - cpu0


def transform(size, use_timm=True):
    import open_clip

    aug = dict(scale=(0.33, 1.0), re_prob=0.35)
    if use_timm:
        aug["use_timm"] = True
    return open_clip.image_transform(size, is_train=True, aug_cfg=aug)


def tree_cpu_seconds(pid=None):
    """CPU time (user + system) of a process and all its descendants now alive: the main process
    and the DataLoader's worker processes."""
    import os

    pid = pid or os.getpid()
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / tick
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                total += sum(tree_cpu_seconds(int(c)) for c in f.read().split())
    except (FileNotFoundError, ProcessLookupError):
        pass
    return total


def bench_shards(a):
    """OpenCLIP's get_wds_dataset end to end, as its training loop consumes it."""
    import json
    from types import SimpleNamespace

    import open_clip
    import torch
    from open_clip_train.data import get_wds_dataset

    torch.set_num_threads(1)
    args = SimpleNamespace(
        train_data=a.shards, val_data=None, dataset_resampled=not a.no_resampled, train_data_upsampling_factors=None,
        train_num_samples=10**9, seed=0, batch_size=a.batch, world_size=1, workers=a.workers,
    )
    tokenizer = open_clip.get_tokenizer("ViT-B-32")
    data = get_wds_dataset(args, transform(a.size, not a.no_timm), is_train=True, epoch=0, tokenizer=tokenizer)
    batches = iter(data.dataloader)
    next(batches)  # warm-up: worker processes starting, shuffle buffers filling
    n, start, cpu0 = 0, time.perf_counter(), tree_cpu_seconds()
    while time.perf_counter() - start < a.seconds:
        images, _texts = next(batches)
        n += images.shape[0]
    seconds = time.perf_counter() - start
    cpu = tree_cpu_seconds() - cpu0
    print(f"open_clip get_wds_dataset on {a.shards}: {a.workers} workers, batch {a.batch}, {a.size}px, "
          f"timm={not a.no_timm}, resampled={not a.no_resampled}")
    print(f"end to end: {n} images in {seconds:.2f} s; {n / seconds / a.workers:.1f} images/s per worker")
    print(f"end to end by CPU time: {cpu:.2f} CPU s (main + worker processes) = {n / cpu:.1f} images per CPU second")
    print(json.dumps({"impl": "open_clip", "kind": "data", "source": "shards", "shards": a.shards,
                      "threads": a.workers, "workers": a.workers, "batch_size": a.batch, "image_size": a.size,
                      "images": n, "seconds": seconds, "images_per_s": n / seconds,
                      "cpu_seconds": cpu, "images_per_cpu_s": n / cpu}))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shards", help="WebDataset shard pattern: time get_wds_dataset on it")
    ap.add_argument("--batch", type=int, default=160)
    ap.add_argument("--no-resampled", action="store_true")
    ap.add_argument("--dir")
    ap.add_argument("--images", type=int, default=200)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--no-timm", action="store_true")
    a = ap.parse_args()
    if a.shards:
        return bench_shards(a)
    tmp = None
    if a.dir is None:
        tmp = tempfile.TemporaryDirectory()
        a.dir = tmp.name
        make_jpegs(a.dir, a.images)
    files = sorted(str(p) for p in pathlib.Path(a.dir).glob("*.jp*g"))
    if not files:
        sys.exit(f"no JPEGs in {a.dir}")
    jobs = [(files, a.seconds, a.size, not a.no_timm, w) for w in range(a.workers)]
    if a.workers == 1:
        results = [worker(jobs[0])]
    else:
        with mp.get_context("spawn").Pool(a.workers) as pool:
            results = pool.map(worker, jobs)
    total = sum(n / s for n, s, _ in results)
    print(f"{len(files)} JPEGs from {a.dir}; open_clip augreg train transform at {a.size}px, timm={not a.no_timm}")
    # CPU-time rate: what one fully busy core would do (robust when the machine is shared).
    cpu_ms = sum(c for _, _, c in results) * 1e3 / sum(n for n, _, _ in results)
    print(f"cpu ms/image {cpu_ms:.2f} (= {1e3 / cpu_ms:.0f} images/s per busy core)")
    print(f"images_per_s_per_core={total / a.workers:.1f}")
    print(f"images_per_s={total:.1f} workers={a.workers}")


if __name__ == "__main__":
    main()
