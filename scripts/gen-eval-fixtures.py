#!/usr/bin/env python3
"""Zero-shot reference from OpenCLIP itself, for the Rust zero-shot agreement test.

Builds a tiny randomly initialized OpenCLIP model from the model config
tests/models/convnext_test.json (a timm ConvNeXt trunk with dims 16-32-64-128 and depths 1-1-2-1,
`timm_pool ""`, `timm_proj "linear"`, embed 32; a text transformer of width 32, 2 heads, 2
layers), runs OpenCLIP's own `build_zero_shot_classifier`
with a few class names and templates through OpenCLIP's tokenizer, classifies a few images the way
`open_clip_train/zero_shot.py` does, and writes to OUT:

  model.safetensors  the model's state dict (OpenCLIP key names)
  eval.safetensors   text_tokens [classes*templates, 77] (class-major, as OpenCLIP tokenizes them),
                     classifier [embed, classes], images [n, 3, 64, 64], logits [n, classes],
                     top5 [n, 5] (predicted classes, best first), and the model's unnormalized
                     text_features [classes*templates, embed] and image_features [n, embed]
  eval.json          {"arch", "classnames", "templates", "texts"} (texts in text_tokens order)

No downloads. Usage: gen-eval-fixtures.py --out DIR [--seed 0]
"""
import argparse
import importlib.util
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

import open_clip
from open_clip import build_zero_shot_classifier

_spec = importlib.util.spec_from_file_location("gen_model_fixtures", Path(__file__).with_name("gen-model-fixtures.py"))
gmf = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = gmf  # timm's register_model looks the module up
_spec.loader.exec_module(gmf)

MODEL_CONFIG = Path(__file__).resolve().parent.parent / "tests/models/convnext_test.json"
ARCH = MODEL_CONFIG.stem
MODEL_CFG = json.loads(MODEL_CONFIG.read_text())
IMAGE_SIZE = MODEL_CFG["vision_cfg"]["image_size"]
CLASSNAMES = ["tench", "goldfish", "great white shark", "red square", "blue circle", "school bus", "banana"]
TEMPLATES = ["a photo of a {}.", "a blurry photo of the {}.", "itap of a {}.", "art of the {}."]


def randomize_constants(model: torch.nn.Module, gen: torch.Generator) -> None:
    """Parameters that start as zeros/ones (biases, LayerNorm, ConvNeXt's 1e-6 gamma) would make
    most of the network an identity; perturb them so agreement means something."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name == "logit_scale":
                continue
            if p.numel() == 1 or p.std() == 0 or name.endswith("gamma"):
                p.add_(torch.randn(p.shape, generator=gen) * 0.2)


def structured_images(n: int, gen: torch.Generator) -> torch.Tensor:
    """Images with a coloured rectangle on a coloured background, normalized like CLIP inputs,
    so the features differ more than for white noise."""
    images = torch.empty(n, 3, IMAGE_SIZE, IMAGE_SIZE)
    for i in range(n):
        bg, fg = torch.rand(3, 1, 1, generator=gen), torch.rand(3, 1, 1, generator=gen)
        img = bg.expand(3, IMAGE_SIZE, IMAGE_SIZE).clone()
        x0, y0 = (int(v) for v in torch.randint(0, IMAGE_SIZE // 2, (2,), generator=gen))
        w, h = (int(v) for v in torch.randint(8, IMAGE_SIZE // 2, (2,), generator=gen))
        img[:, y0:y0 + h, x0:x0 + w] = fg
        img += 0.05 * torch.randn(img.shape, generator=gen)
        mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(3, 1, 1)
        std = torch.tensor(open_clip.OPENAI_DATASET_STD).view(3, 1, 1)
        images[i] = (img - mean) / std
    return images


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    gmf.register_small_timm()
    model = open_clip.CLIP(**MODEL_CFG)
    randomize_constants(model, gen)
    model.eval()
    tokenizer = open_clip.get_tokenizer("ViT-B-32")  # the OpenAI CLIP BPE, context 77

    classifier = build_zero_shot_classifier(
        model, tokenizer, CLASSNAMES, TEMPLATES, num_classes_per_batch=3, device="cpu")
    texts = [t.format(c) for c in CLASSNAMES for t in TEMPLATES]
    text_tokens = tokenizer(texts)

    # Keep only images whose top-5 classes are well separated, so "identical predictions" does not
    # hinge on float rounding between implementations.
    with torch.no_grad():
        candidates = structured_images(64, gen)
        feats = model(image=candidates)[0]  # normalized, as zero_shot.py uses them
        logits = 100.0 * feats @ classifier
        top = logits.topk(6, dim=1).values
        margin = (top[:, :-1] - top[:, 1:]).min(dim=1).values
        keep = (margin > 0.02).nonzero().flatten()[:12]
        assert len(keep) >= 8, f"only {len(keep)} images with separated top-5 logits"
        images, logits = candidates[keep].contiguous(), logits[keep].contiguous()
        top5 = logits.topk(5, dim=1).indices
        text_features = model.encode_text(text_tokens)
        image_features = model.encode_image(images)
    assert len(set(top5[:, 0].tolist())) >= 2, "all images predict one class: the test would prove little"

    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(args.out / "model.safetensors"))
    save_file({
        "text_tokens": text_tokens.to(torch.int64).contiguous(),
        "classifier": classifier.contiguous(),
        "images": images,
        "logits": logits,
        "top5": top5.to(torch.int64).contiguous(),
        "text_features": text_features.contiguous(),
        "image_features": image_features.contiguous(),
    }, str(args.out / "eval.safetensors"))
    (args.out / "eval.json").write_text(json.dumps(
        {"arch": ARCH, "classnames": CLASSNAMES, "templates": TEMPLATES, "texts": texts}, indent=1))
    print(f"wrote {args.out}: {len(images)} images, top-1 classes {sorted(set(top5[:, 0].tolist()))}")


if __name__ == "__main__":
    main()
