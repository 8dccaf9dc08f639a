#!/usr/bin/env python3
"""Checkpoints as OpenCLIP and open_clip_train write them, for the trainer's torch.save reader.

Hub file:    gen-openclip-checkpoints.py --arch A [--image-size S] [--vocab-size V] --out DIR
             DIR/open_clip_pytorch_model.bin: torch.save(model.state_dict()) of
             open_clip.create_model(A), as the hub's files are; DIR/expected.safetensors: images,
             tokens and OpenCLIP's features on them; DIR/bad/*: the same file broken each way a
             user's file can be (legacy format, truncated, a flipped byte, a Python object inside,
             a missing / unexpected / mis-shaped key, a string where a tensor belongs), and
             DIR/bad/cases.json: file -> the texts its error must name.
Trained:     gen-openclip-checkpoints.py --train --arch A --out DIR
             runs open_clip_train.main for one epoch (4 steps) on two tiny webdataset shards under
             torch.distributed.run with 2 processes (gloo, CPU), so its checkpoint carries DDP's
             `module.` prefix; DIR/epoch_1.pt is that checkpoint, DIR/expected.safetensors
             OpenCLIP's features after loading it with open_clip.create_model(A, pretrained=...).
HF text:     gen-openclip-checkpoints.py --hf-text FILE.safetensors --hf-config CONFIG.json --out DIR
             DIR/pytorch_model.bin: torch.save of the same tensors (a Hugging Face checkpoint as
             transformers < 4.35 wrote them and most hub repos still hold); DIR/config.json:
             CONFIG.json's values as transformers' XLMRobertaConfig(...).save_pretrained writes them.

--arch as gen-model-fixtures.py takes it. Nothing is downloaded.
"""
import argparse
import importlib.util
import io
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

_spec = importlib.util.spec_from_file_location("gen_model_fixtures", Path(__file__).with_name("gen-model-fixtures.py"))
gmf = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = gmf  # timm's register_model looks its caller's module up there
_spec.loader.exec_module(gmf)

import open_clip  # noqa: E402


def write_expected(model, out: Path, image_size, seed):
    gen = torch.Generator().manual_seed(seed + 1)
    images = torch.randn(2, 3, image_size, image_size, generator=gen)
    tokens = gmf.make_tokens(gen, 2, model.context_length, model.vocab_size)
    img, txt, *_ = gmf.features(model.eval(), images, tokens)
    save_file({"images": images, "tokens": tokens, "image_features": img, "text_features": txt},
              str(out / "expected.safetensors"))


def bad_variants(good: Path, sd, bad: Path):
    """Each way a user's checkpoint can be broken, and what its error must name."""
    bad.mkdir(parents=True, exist_ok=True)
    cases = {}
    data = good.read_bytes()

    def save(name, obj, must, **kw):
        torch.save(obj, bad / name, **kw)
        cases[name] = must

    keys = list(sd)
    missing, shaped = keys[-1], keys[1]
    save("legacy.pt", sd, ["legacy"], _use_new_zipfile_serialization=False)
    (bad / "truncated.bin").write_bytes(data[: len(data) // 2])
    cases["truncated.bin"] = ["corrupt"]
    # A flipped byte inside a tensor's bytes: libtorch's reader alone would load it silently.
    record = data.index(b"data/0") + 200
    flipped = bytearray(data)
    flipped[record] ^= 0xFF
    (bad / "flipped.bin").write_bytes(bytes(flipped))
    cases["flipped.bin"] = ["corrupt"]
    save("object.pt", {"state_dict": sd, "args": argparse.Namespace(lr=1e-3)}, ["args", "argparse.Namespace"])
    save("missing_key.bin", {k: v for k, v in sd.items() if k != missing}, [missing])
    save("unexpected_key.bin", {**sd, "visual.trunk.extra.weight": torch.zeros(3)}, ["visual.trunk.extra.weight"])
    save("misshaped.bin", {**sd, shaped: torch.zeros(*sd[shaped].shape[:-1], sd[shaped].shape[-1] + 1)}, [shaped])
    save("string_value.bin", {**sd, "logit_scale": "2.6592"}, ["logit_scale", "string"])
    (bad / "cases.json").write_text(json.dumps(cases, indent=1))


def hub_file(args):
    with tempfile.TemporaryDirectory() as tmp:
        arch = gmf.register_arch(args.arch, Path(tmp), args.vocab_size)
        model = open_clip.create_model(arch, force_image_size=args.image_size)
        image_size = args.image_size or open_clip.get_model_config(arch)["vision_cfg"]["image_size"]
    gmf.randomize(model, torch.Generator().manual_seed(args.seed))
    args.out.mkdir(parents=True, exist_ok=True)
    sd = model.state_dict()
    good = args.out / "open_clip_pytorch_model.bin"
    torch.save(sd, good)
    write_expected(model, args.out, image_size, args.seed)
    bad_variants(good, sd, args.out / "bad")
    print(f"{arch}: {good}")


def tiny_shards(out: Path, per_shard=16):
    import webdataset as wds
    from PIL import Image

    out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(0)
    colours = {"red": (220, 20, 20), "green": (20, 200, 20), "blue": (20, 20, 220), "grey": (128, 128, 128)}
    names = list(colours)
    for s in range(2):
        with wds.TarWriter(str(out / f"{s:06d}.tar")) as w:
            for i in range(per_shard):
                name = names[int(torch.randint(len(names), (1,), generator=gen))]
                buf = io.BytesIO()
                Image.new("RGB", (72, 72), colours[name]).save(buf, format="JPEG", quality=90)
                w.write({"__key__": f"{s:03d}{i:05d}", "jpg": buf.getvalue(), "txt": f"a {name} square"})
    return str(out / "{000000..000001}.tar")


def train_worker(args):
    """One torch.distributed.run process: open_clip_train.main as a user runs it."""
    with tempfile.TemporaryDirectory() as tmp:
        arch = gmf.register_arch(args.arch, Path(tmp))
        import open_clip_train.main as ocm

        # open_clip_train passes device_ids=[device] to DDP, which DDP refuses for CPU modules;
        # on CPU it must be left out. The wrapped model (and so the `module.` prefix) is unchanged.
        ddp = torch.nn.parallel.DistributedDataParallel

        class CpuDDP(ddp):
            def __init__(self, module, device_ids=None, **kw):
                super().__init__(module, **kw)

        torch.nn.parallel.DistributedDataParallel = CpuDDP
        ocm.main([
            "--model", arch, "--train-data", args.shards, "--dataset-type", "webdataset",
            "--train-num-samples", "32", "--batch-size", "4", "--epochs", "1", "--workers", "1",
            "--lr", "1e-3", "--warmup", "1", "--precision", "fp32", "--seed", "0", "--dist-backend", "gloo",
            "--logs", str(args.out / "logs"), "--name", "tiny", "--save-frequency", "1", "--report-to", "",
        ])


def trained(args):
    args.out.mkdir(parents=True, exist_ok=True)
    shards = tiny_shards(args.out / "shards")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                    __file__, "--train-worker", "--arch", args.arch, "--out", str(args.out), "--shards", shards],
                   check=True, env=env)
    ckpt = args.out / "epoch_1.pt"
    os.replace(args.out / "logs" / "tiny" / "checkpoints" / "epoch_1.pt", ckpt)
    saved = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert all(k.startswith("module.") for k in saved["state_dict"]), "expected DDP's module. prefix"
    with tempfile.TemporaryDirectory() as tmp:
        arch = gmf.register_arch(args.arch, Path(tmp))
        model = open_clip.create_model(arch, pretrained=str(ckpt))
        image_size = open_clip.get_model_config(arch)["vision_cfg"]["image_size"]
    write_expected(model, args.out, image_size, args.seed)
    print(f"{arch}: {ckpt} (epoch {saved['epoch']}, {len(saved['state_dict'])} tensors)")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch")
    ap.add_argument("--image-size", type=int, default=None)
    ap.add_argument("--vocab-size", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--train", action="store_true")
    ap.add_argument("--hf-text", type=Path)
    ap.add_argument("--hf-config", type=Path)
    ap.add_argument("--train-worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--shards", help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    if args.train_worker:
        train_worker(args)
    elif args.train:
        trained(args)
    elif args.hf_text:
        from transformers import XLMRobertaConfig

        args.out.mkdir(parents=True, exist_ok=True)
        torch.save(load_file(str(args.hf_text)), args.out / "pytorch_model.bin")
        values = json.loads(args.hf_config.read_text())
        values.pop("model_type", None)
        XLMRobertaConfig(**values).save_pretrained(args.out)
    else:
        hub_file(args)


if __name__ == "__main__":
    main()
