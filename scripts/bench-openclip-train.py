#!/usr/bin/env python3
"""OpenCLIP's side of `scripts/bench-vs-openclip`: the same measurements as `trainer bench-train`
and `trainer bench-data`, done with OpenCLIP (open-clip-torch from PyPI) and its own training code.

Training steps (default mode), one JSON line on stdout like `trainer bench-train`:

    python scripts/bench-openclip-train.py --arch ViT-B-32 --image-size 224 --batch 4 \
        --steps 3 --warmup 1 --precision fp32 --threads 2 --device cpu

  The step follows open_clip_train: `create_model_and_transforms(arch, pretrained=None,
  force_image_size=S)`, the AdamW of `open_clip_train/main.py` (gain/bias/logit_scale parameters
  without weight decay, wd 0.2 on the rest, lr 5e-4, betas/eps from `params.get_default_params`),
  `open_clip.loss.ClipLoss`, and the loop of `open_clip_train/train.py` (zero_grad, autocast
  forward, loss, backward, step, clamp logit_scale to ln 100). Inputs are random like ferroclip's:
  images ~ N(0, 1), token ids uniform in [1, vocab), seed 0. W warm-up steps are not timed.

FLOPs per sample (`--flops`): one forward + loss + backward under
  `torch.utils.flop_counter.FlopCounterMode`, divided by the batch; prints `{"flops_per_sample":..}`.
  The backward of grouped (depthwise) convolutions is counted as twice its forward, replacing
  torch's formula, which ignores groups.

Data pipeline (`--data`): PIL decode + convert('RGB') + OpenCLIP's train transform
  `image_transform(S, is_train=True, aug_cfg=dict(scale=(0.33, 1.0), re_prob=0.35, use_timm=True))`
  over generated LAION-like JPEGs (shorter side 256-512, quality 90), on T worker processes with one
  torch thread each; prints `{"impl":"open_clip","kind":"data","images_per_s":..,"threads":T}`.
  OpenCLIP ignores `re_prob` unless `use_timm=True` (it warns "Unused augmentation cfg items"), so
  the timm path is the default; `--no-timm` times the cheaper torchvision path without erasing.

End to end (`--e2e-shards PATTERN --workers N`): the same step fed by OpenCLIP's own loader,
  `open_clip_train.data.get_wds_dataset` with N DataLoader workers and the augreg transform of
  configs/base_w_augreg.toml; prints `{"kind":"e2e","samples_per_s":..,"data_wait_fraction":..}`,
  the share of the timed steps the loop spent in `next(dataloader)`.

`--grad-checkpointing` turns on activation checkpointing as open_clip_train's flag does
  (`model.set_grad_checkpointing(True)`), in the training and end-to-end modes.

Shards of the same JPEGs (`--write-shards DIR --shards N --per-shard M`): N webdataset tars
  `DIR/{00000..}.tar` of M samples each (`{key}.jpg`, `{key}.txt`), cycling through `--images`
  distinct JPEGs, for the end-to-end step of `scripts/gpu-check` (the trainer's real loader on
  LAION-like images, where the demo data's small images would hide the decoding cost).
"""
import argparse
import io
import json
import math
import os
import resource
import sys
import time

# Never reach for the Hugging Face Hub: the model is built from its config, without weights.
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def peak_rss_mb():
    # Linux reports ru_maxrss in KiB.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def register_arch(arch):
    """`arch` as the trainer's `model.arch` takes it: an OpenCLIP name, or the path of a model-config
    `.json` (the repository's tiny tests/models/*.json, whose small timm trunks gen-model-fixtures.py
    registers; absent from a GPU package; nothing is downloaded). Returns the OpenCLIP model name."""
    import importlib.util
    import tempfile
    from pathlib import Path

    if not (arch.endswith(".json") or "/" in arch):
        return arch
    path = Path(__file__).with_name("gen-model-fixtures.py")
    spec = importlib.util.spec_from_file_location("gen_model_fixtures", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # timm's register_model looks the module up
    spec.loader.exec_module(mod)
    with tempfile.TemporaryDirectory(prefix="ferroclip-archs-") as tmp:
        return mod.register_arch(arch, Path(tmp))


def build(arch, image_size, device):
    import open_clip

    model, _, _ = open_clip.create_model_and_transforms(
        register_arch(arch), pretrained=None, force_image_size=image_size, device=device, output_dict=True
    )
    return model


def build_optimizer(model, arch):
    """AdamW exactly as open_clip_train/main.py builds it with default arguments."""
    import torch
    from open_clip_train.params import get_default_params

    d = get_default_params(os.path.splitext(os.path.basename(arch))[0] if arch.endswith(".json") else arch)
    wd = 0.2  # open_clip_train/params.py: --wd default
    exclude = lambda n, p: p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n
    named = list(model.named_parameters())
    gain_or_bias = [p for n, p in named if exclude(n, p) and p.requires_grad]
    rest = [p for n, p in named if not exclude(n, p) and p.requires_grad]
    return torch.optim.AdamW(
        [{"params": gain_or_bias, "weight_decay": 0.0}, {"params": rest, "weight_decay": wd}],
        lr=d["lr"],
        betas=(d["beta1"], d["beta2"]),
        eps=d["eps"],
    )


def random_inputs(model, batch, image_size, device):
    import torch

    torch.manual_seed(0)
    ctx = model.context_length
    vocab = model.vocab_size
    images = torch.randn(batch, 3, image_size, image_size, device=device)
    tokens = torch.randint(1, vocab, (batch, ctx), device=device)
    return images, tokens


def autocast_for(precision, device):
    from contextlib import nullcontext

    import torch

    if precision == "amp_bf16":
        # open_clip_train/precision.py get_autocast('amp_bf16')
        return lambda: torch.amp.autocast(device_type=device.type, dtype=torch.bfloat16)
    return nullcontext


def setup(a):
    import torch

    if a.threads > 0:
        torch.set_num_threads(a.threads)
    if a.device == "cuda":
        if not torch.cuda.is_available():
            sys.exit("bench-openclip-train: --device cuda but torch.cuda.is_available() is False")
        # open_clip_train/main.py sets these on every CUDA run.
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
        torch.backends.cudnn.deterministic = False
    return torch.device(a.device)


def training_step(a, device):
    """The model, optimizer and loss of open_clip_train/main.py, and one step of open_clip_train/train.py
    (accum_freq == 1, no grad scaler: bf16 needs none) as a function of a batch."""
    import torch
    from open_clip.loss import ClipLoss

    model = build(a.arch, a.image_size, device)
    if a.grad_checkpointing:
        model.set_grad_checkpointing(True)  # open_clip_train/main.py, --grad-checkpointing
    model.train()
    opt = build_optimizer(model, a.arch)
    loss_fn = ClipLoss(local_loss=False, gather_with_grad=False, cache_labels=True, rank=0, world_size=1)
    autocast = autocast_for(a.precision, device)

    def step(images, tokens):
        opt.zero_grad()
        with autocast():
            out = model(images, tokens)
            losses = loss_fn(**out, output_dict=True)
            total = sum(losses.values())
        total.backward()
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        return total

    return model, step


def train_mode(a):
    import torch

    device = setup(a)
    model, step = training_step(a, device)
    images, tokens = random_inputs(model, a.batch, a.image_size, device)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for i in range(a.warmup + a.steps):
        if i == a.warmup:
            sync()
            start = time.perf_counter()
        total = step(images, tokens)
    sync()
    secs = (time.perf_counter() - start) / max(a.steps, 1)
    peak_gpu = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None
    print(json.dumps({
        "impl": "open_clip",
        "arch": a.arch,
        "image_size": a.image_size,
        "batch": a.batch,
        "precision": a.precision,
        "threads": torch.get_num_threads(),
        "device": a.device,
        "grad_checkpointing": a.grad_checkpointing,
        "steps": a.steps,
        "step_time_s": secs,
        "samples_per_s": a.batch / secs,
        "peak_rss_mb": peak_rss_mb(),
        "peak_gpu_mb": peak_gpu,
        "loss": float(total.detach()),
    }))


def e2e_mode(a):
    """OpenCLIP end to end: its own loader (`open_clip_train.data.get_wds_dataset`, `--workers`
    DataLoader processes, the augreg train transform of configs/base_w_augreg.toml) feeding its
    training step, as open_clip_train/train.py runs them: samples/s and the share of the step time the
    loop spends waiting for the next batch, after `--warmup` steps."""
    import warnings
    from types import SimpleNamespace

    import open_clip
    import torch
    from open_clip_train.data import get_wds_dataset

    device = setup(a)
    model, step = training_step(a, device)
    aug = dict(scale=(0.33, 1.0), re_prob=0.35, use_timm=True)  # configs/base_w_augreg.toml
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        transform = open_clip.image_transform(a.image_size, is_train=True, aug_cfg=aug)
    args = SimpleNamespace(
        train_data=a.e2e_shards, val_data=None, dataset_resampled=True, train_data_upsampling_factors=None,
        train_num_samples=10**9, seed=0, batch_size=a.batch, world_size=1, workers=a.workers,
    )
    tokenizer = open_clip.get_tokenizer(register_arch(a.arch))
    batches = iter(get_wds_dataset(args, transform, is_train=True, epoch=0, tokenizer=tokenizer).dataloader)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    wait, start = 0.0, time.perf_counter()
    for i in range(a.warmup + a.steps):
        if i == a.warmup:
            sync()
            wait, start = 0.0, time.perf_counter()
        t0 = time.perf_counter()
        images, texts = next(batches)
        wait += time.perf_counter() - t0
        step(images.to(device, non_blocking=True), texts.to(device, non_blocking=True))
    sync()
    seconds = time.perf_counter() - start
    print(json.dumps({
        "impl": "open_clip", "kind": "e2e", "arch": a.arch, "image_size": a.image_size, "batch": a.batch,
        "precision": a.precision, "device": a.device, "workers": a.workers, "steps": a.steps,
        "step_time_s": seconds / max(a.steps, 1), "samples_per_s": a.steps * a.batch / seconds,
        "data_wait_fraction": wait / seconds,
    }))


def conv_backward_flop(grad_out_shape, x_shape, w_shape, _bias, _stride, _padding, _dilation, transposed,
                       _output_padding, _groups, output_mask, out_shape=None, **_):
    """FLOPs of a convolution's backward: grad_input and grad_weight each cost what the forward
    costs. torch's own formula (torch 2.11) ignores `groups`, which counts ConvNeXt's depthwise 7x7
    convolutions' weight gradient as a dense convolution: 2.6x the true total for convnext_base_w."""
    from torch.utils.flop_counter import conv_flop_count

    forward = conv_flop_count(x_shape, w_shape, grad_out_shape, transposed)
    return forward * (int(bool(output_mask[0])) + int(bool(output_mask[1])))


def flops_mode(a):
    import torch
    from open_clip.loss import ClipLoss
    from torch.utils.flop_counter import FlopCounterMode

    device = setup(a)
    model = build(a.arch, a.image_size, device)
    model.train()
    loss_fn = ClipLoss()
    images, tokens = random_inputs(model, a.batch, a.image_size, device)
    counter = FlopCounterMode(display=False, custom_mapping={torch.ops.aten.convolution_backward: conv_backward_flop})
    with counter:
        with autocast_for(a.precision, device)():
            out = model(images, tokens)
            total = sum(loss_fn(**out, output_dict=True).values())
        total.backward()
    print(json.dumps({
        "kind": "flops",
        "impl": "open_clip",
        "arch": a.arch,
        "image_size": a.image_size,
        "flops_per_sample": counter.get_total_flops() / a.batch,
        "counted": "forward+loss+backward, FlopCounterMode (matmul/conv/attention; grouped conv backward fixed)",
    }))


def make_jpegs(n, seed=0):
    """LAION-like photos: shorter side 256-512, mixed aspect, smooth gradients plus textured
    rectangles and mild noise (decoding cost close to real photos; pure noise would be slower)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    blobs = []
    for _ in range(n):
        short = int(rng.integers(256, 513))
        long = int(short * rng.uniform(1.0, 1.8))
        w, h = (long, short) if rng.random() < 0.6 else (short, long)
        y, x = np.mgrid[0:h, 0:w].astype(np.float32)
        img = np.empty((h, w, 3), np.float32)
        for c in range(3):
            img[..., c] = rng.uniform(40, 200) + rng.uniform(-90, 90) * (y / h - 0.5)
        for _ in range(int(rng.integers(3, 8))):
            x0, y0 = int(rng.integers(0, w)), int(rng.integers(0, h))
            x1 = min(w, x0 + int(rng.integers(20, w // 2 + 21)))
            y1 = min(h, y0 + int(rng.integers(20, h // 2 + 21)))
            tex = np.sin((x[y0:y1, x0:x1] * rng.uniform(0.05, 0.5) + y[y0:y1, x0:x1] * rng.uniform(0.05, 0.5)))
            img[y0:y1, x0:x1] = rng.uniform(0, 255, 3) + tex[..., None] * rng.uniform(0, 40)
        img += rng.normal(0, 4, img.shape)
        buf = io.BytesIO()
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=90)
        blobs.append(buf.getvalue())
    return blobs


def write_shards_mode(a):
    import tarfile

    blobs = make_jpegs(a.images)
    os.makedirs(a.write_shards, exist_ok=True)

    def add(tar, name, data):
        info = tarfile.TarInfo(name)
        info.size = len(data)
        info.mtime = 0
        tar.addfile(info, io.BytesIO(data))

    for shard in range(a.shards):
        path = os.path.join(a.write_shards, f"{shard:05d}.tar")
        with tarfile.open(path + ".tmp", "w", format=tarfile.USTAR_FORMAT) as tar:
            for i in range(a.per_shard):
                key = f"{shard:05d}{i:05d}"
                add(tar, f"{key}.jpg", blobs[(shard * a.per_shard + i) % len(blobs)])
                add(tar, f"{key}.txt", f"a photo number {i} of shard {shard}".encode())
        os.replace(path + ".tmp", path)
    print(json.dumps({"kind": "shards", "dir": a.write_shards, "shards": a.shards, "per_shard": a.per_shard}))


def data_worker(job):
    blobs, seconds, size, use_timm, wid = job
    import warnings

    import torch
    from PIL import Image
    import open_clip

    torch.set_num_threads(1)
    aug = dict(scale=(0.33, 1.0), re_prob=0.35)
    if use_timm:
        aug["use_timm"] = True
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t = open_clip.image_transform(size, is_train=True, aug_cfg=aug)
    for b in blobs[:4]:  # first-call costs stay outside the timed region
        t(Image.open(io.BytesIO(b)).convert("RGB"))
    n, i, start = 0, wid * 7, time.perf_counter()
    while time.perf_counter() - start < seconds:
        x = t(Image.open(io.BytesIO(blobs[i % len(blobs)])).convert("RGB"))
        assert x.shape == (3, size, size)
        n += 1
        i += 1
    return n, time.perf_counter() - start


def data_mode(a):
    import multiprocessing as mp

    threads = max(a.threads, 1)
    blobs = make_jpegs(a.images)
    jobs = [(blobs, a.seconds, a.image_size, not a.no_timm, w) for w in range(threads)]
    if threads == 1:
        results = [data_worker(jobs[0])]
    else:
        with mp.get_context("spawn").Pool(threads) as pool:
            results = pool.map(data_worker, jobs)
    total = sum(n / s for n, s in results)
    print(json.dumps({
        "impl": "open_clip",
        "kind": "data",
        "image_size": a.image_size,
        "images_per_s": total,
        "images_per_s_per_thread": total / threads,
        "threads": threads,
        "timm": not a.no_timm,
    }))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="ViT-B-32", help="OpenCLIP model name (default ViT-B-32)")
    ap.add_argument("--image-size", type=int, default=None, help="default: 224 (256 in --data mode)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=10, help="timed steps")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    ap.add_argument("--precision", choices=["fp32", "amp_bf16"], default="fp32")
    ap.add_argument("--threads", type=int, default=0, help="torch threads / data workers (0: torch default)")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--flops", action="store_true", help="count FLOPs per sample instead of timing")
    ap.add_argument("--data", action="store_true", help="time the data pipeline instead")
    ap.add_argument("--seconds", type=float, default=10.0, help="--data: seconds per worker")
    ap.add_argument("--images", type=int, default=64, help="--data: distinct JPEGs generated")
    ap.add_argument("--no-timm", action="store_true", help="--data: torchvision transform (no erasing)")
    ap.add_argument("--write-shards", metavar="DIR", help="write webdataset shards of the JPEGs instead")
    ap.add_argument("--shards", type=int, default=4, help="--write-shards: number of shards")
    ap.add_argument("--per-shard", type=int, default=256, help="--write-shards: samples per shard")
    ap.add_argument("--grad-checkpointing", action="store_true", help="activation checkpointing (as open_clip_train)")
    ap.add_argument("--e2e-shards", metavar="PATTERN", help="time the step fed by get_wds_dataset on these shards")
    ap.add_argument("--workers", type=int, default=6, help="--e2e-shards: DataLoader worker processes")
    a = ap.parse_args()
    if a.image_size is None:
        a.image_size = 256 if a.data else 224
    if a.write_shards:
        write_shards_mode(a)
    elif a.data:
        data_mode(a)
    elif a.e2e_shards:
        e2e_mode(a)
    elif a.flops:
        flops_mode(a)
    else:
        train_mode(a)


if __name__ == "__main__":
    main()
