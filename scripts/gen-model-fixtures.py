#!/usr/bin/env python3
"""Reference fixtures for the Rust CLIP models, computed with OpenCLIP itself.

Generate:   gen-model-fixtures.py --arch tests/models/convnext_test.json --image-size 64 --out DIR [--batch 2]
            writes DIR/model.safetensors (OpenCLIP state dict) and DIR/expected.safetensors
            (images, tokens, image/text features raw and normalized, logits, num_params); with
            --train-seed S also `image_features_train`: encode_image in training mode right after
            torch.manual_seed(S) (dropout active; the trainer's parity test seeds libtorch alike).
Check load: gen-model-fixtures.py --arch A --image-size S --check-load W.safetensors --inputs R.safetensors
            loads W with open_clip.create_model(A, pretrained=W) and compares its features on
            R's `images`/`tokens` with R's `image_features`/`text_features` (max abs diff <= --tol).

--arch is what the trainer's `model.arch` takes: an OpenCLIP model name (ViT-B-32, convnext_base_w,
...) or the path of a model-config `.json` (tests/models/*.json, configs/models/*.json), which is
registered with `open_clip.add_model_config` as it is (with --vocab-size, a copy with that vocabulary)
and built under its file name. The small timm ConvNeXt trunks those files name
(ferroclip_convnext_test, ferroclip_convnext_demo) are registered with timm here; nothing is downloaded.
"""
import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

import open_clip
import timm
from timm.models import register_model
from timm.models.convnext import ConvNeXt

SMALL_TIMM = {
    "ferroclip_convnext_test": dict(depths=(1, 1, 2, 1), dims=(16, 32, 64, 128)),
    "ferroclip_convnext_demo": dict(depths=(1, 1, 2, 1), dims=(24, 48, 96, 192)),
}


def _register_timm(name, args):
    def fn(pretrained=False, **kwargs):
        for k in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):
            kwargs.pop(k, None)
        model = ConvNeXt(**args, **kwargs)
        model.pretrained_cfg = model.default_cfg = {}
        return model
    fn.__name__ = name
    register_model(fn)


def register_small_timm():
    for name, args in SMALL_TIMM.items():
        if name not in timm.list_models(name):
            _register_timm(name, args)


def register_arch(arch, tmp: Path, vocab_size=None):
    """`arch` as `model.arch` takes it: a model-config path is registered with OpenCLIP (a copy in
    `tmp` when the vocabulary is overridden); returns the name to create it by."""
    register_small_timm()
    path = Path(arch)
    if not (arch.endswith(".json") or "/" in arch):
        if vocab_size:
            sys.exit(f"--vocab-size needs a model-config path, not the name {arch}")
        return arch
    if vocab_size:
        cfg = json.loads(path.read_text())
        cfg["text_cfg"]["vocab_size"] = vocab_size
        path = tmp / path.name
        path.write_text(json.dumps(cfg))
    open_clip.add_model_config(path)
    return path.stem


def randomize(model, gen):
    """Move everything that is 0/1 at init (biases, norm weights, layer scale) off its init value."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gamma"):
                p.copy_(0.2 + 0.8 * torch.rand(p.shape, generator=gen))
            elif name.endswith("bias") or name.endswith("in_proj_bias"):
                p.copy_(0.05 * torch.randn(p.shape, generator=gen))
            elif p.ndim == 1 and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))


def features(model, images, tokens):
    with torch.no_grad():
        img = model.encode_image(images)
        txt = model.encode_text(tokens)
        img_n, txt_n = F.normalize(img, dim=-1), F.normalize(txt, dim=-1)
        logits = model.logit_scale.exp() * img_n @ txt_n.T
    return img, txt, img_n, txt_n, logits


def make_tokens(gen, batch, ctx, vocab):
    tokens = torch.zeros(batch, ctx, dtype=torch.long)
    for i in range(batch):
        n = int(torch.randint(3, ctx - 1, (1,), generator=gen))
        tokens[i, 0] = vocab - 2  # start-of-text, like the BPE tokenizer's 49406
        tokens[i, 1:n] = torch.randint(1, vocab - 2, (n - 1,), generator=gen)
        tokens[i, n] = vocab - 1  # end-of-text: the largest id, where OpenCLIP pools
    return tokens


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", required=True)
    ap.add_argument("--image-size", type=int, default=None, help="force another input size (default: the config's)")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--vocab-size", type=int, default=None, help="shrink the text vocab (small archs only)")
    ap.add_argument("--half-weights", action="store_true",
                    help="round weights to fp16 and store them so (smaller fixtures; features use the rounded weights)")
    ap.add_argument("--train-seed", type=int, default=None,
                    help="also write image features in training mode after torch.manual_seed(SEED)")
    ap.add_argument("--check-load", type=Path)
    ap.add_argument("--inputs", type=Path)
    ap.add_argument("--tol", type=float, default=1e-4)
    args = ap.parse_args()

    torch.manual_seed(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        arch = register_arch(args.arch, Path(tmp), args.vocab_size)
        if args.check_load:
            model = open_clip.create_model(arch, pretrained=str(args.check_load),
                                           force_image_size=args.image_size).eval()
            ref = load_file(str(args.inputs))
            img, txt, *_ = features(model, ref["images"], ref["tokens"])
            d_img = (img - ref["image_features"]).abs().max().item()
            d_txt = (txt - ref["text_features"]).abs().max().item()
            print(f"check-load {arch}: max |diff| image {d_img:.3g} text {d_txt:.3g}")
            sys.exit(0 if max(d_img, d_txt) <= args.tol else 1)

        model = open_clip.create_model(arch, force_image_size=args.image_size).eval()
        image_size = args.image_size or open_clip.get_model_config(arch)["vision_cfg"]["image_size"]
    gen = torch.Generator().manual_seed(args.seed)
    randomize(model, gen)
    if args.half_weights:
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(p.half().float())
    vocab = model.vocab_size
    ctx = model.context_length
    images = torch.randn(args.batch, 3, image_size, image_size, generator=gen)
    tokens = make_tokens(gen, args.batch, ctx, vocab)
    img, txt, img_n, txt_n, logits = features(model, images, tokens)

    extra = {}
    if args.train_seed is not None:
        model.train()
        torch.manual_seed(args.train_seed)
        with torch.no_grad():
            extra["image_features_train"] = model.encode_image(images)
        model.eval()

    args.out.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if args.half_weights:
        sd = {k: v.half() for k, v in sd.items()}
    save_file(sd, str(args.out / "model.safetensors"))
    num_params = sum(p.numel() for p in model.parameters())
    save_file({
        "images": images, "tokens": tokens,
        "image_features": img, "text_features": txt,
        "image_features_normalized": img_n, "text_features_normalized": txt_n,
        "logits_per_image": logits,
        "num_params": torch.tensor(num_params, dtype=torch.long),
        **extra,
    }, str(args.out / "expected.safetensors"),
        metadata={"arch": arch, "image_size": str(image_size), "vocab_size": str(vocab)})
    print(f"{arch}: {num_params} params -> {args.out}")


if __name__ == "__main__":
    main()
