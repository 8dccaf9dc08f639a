#!/usr/bin/env python3
"""Reference fixtures for the Rust XLM-RoBERTa text tower (OpenCLIP `xlm-roberta-base-ViT-B-32`),
computed with OpenCLIP's `CustomTextCLIP` + `HFTextEncoder` and Hugging Face `XLMRobertaModel`.

Generate:   gen-xlmr-fixtures.py --arch tests/models/xlmr_vit_test.json --out DIR [--vocab-size 512] [--half-weights]
            writes DIR/model.safetensors (OpenCLIP state dict), DIR/hf_text.safetensors (the text
            encoder's own `XLMRobertaModel` state dict, under `roberta.` as hub checkpoints of
            `XLMRobertaForMaskedLM` are, plus an `lm_head.bias`) and DIR/expected.safetensors
            (images, padded XLM-R token ids, image/text features raw and normalized, logits,
            num_params).
Check load: gen-xlmr-fixtures.py --arch A --check-load W.safetensors --inputs R.safetensors
            loads W with open_clip.create_model(A, pretrained=W) and compares its features on
            R's `images`/`tokens` with R's `image_features`/`text_features` (max abs diff <= --tol).

Nothing is downloaded: instead of the hub's `xlm-roberta-base` config, an `XLMRobertaConfig` with
its values is written to a temporary directory that the registered model configs name as
`hf_model_name`, and the model is created with `pretrained_text=False`. As in OpenCLIP's real path,
`AutoModel.from_config(config, add_pooling_layer=False)` builds the encoder (no `pooler.*`).
"""
import argparse
import importlib.util
import json
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch
from safetensors.torch import load_file, save_file
from transformers import XLMRobertaConfig

import open_clip

_spec = importlib.util.spec_from_file_location("gen_model_fixtures", Path(__file__).with_name("gen-model-fixtures.py"))
gmf = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gmf)

REPO = Path(__file__).resolve().parent.parent
# The hub configs a model config may name as `hf_model_name`, so that nothing is downloaded:
# xlm-roberta-base's config.json values.
HUB = {"xlm-roberta-base": dict(
    vocab_size=250002, hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
    max_position_embeddings=514, type_vocab_size=1, pad_token_id=1, bos_token_id=0, eos_token_id=2,
    layer_norm_eps=1e-5, hidden_act="gelu")}
PAD, BOS, EOS = 1, 0, 2
CONTEXT = 77


def register(tmp: Path, arch: str, vocab_size):
    """`arch` as the trainer's `model.arch` takes it (a built-in name from configs/models/, or a
    model-config path): registers it with OpenCLIP, its `hf_model_name` (a hub name above, or a
    folder with a config.json, relative to the model config's folder as the trainer reads it)
    replaced by a local copy of that config. Returns (name, image size)."""
    path = Path(arch) if arch.endswith(".json") or "/" in arch else REPO / "configs/models" / f"{arch}.json"
    cfg = json.loads(path.read_text())
    text = cfg["text_cfg"]
    name = text["hf_model_name"]
    hf = dict(HUB[name]) if name in HUB else json.loads((path.parent / name / "config.json").read_text())
    hf.pop("model_type", None)
    if vocab_size:
        hf["vocab_size"] = vocab_size
    hf_dir = tmp / "hf-config"
    XLMRobertaConfig(**hf).save_pretrained(hf_dir)
    text["hf_model_name"] = text["hf_tokenizer_name"] = str(hf_dir)
    (tmp / path.name).write_text(json.dumps(cfg))
    open_clip.add_model_config(tmp / path.name)
    return path.stem, cfg["vision_cfg"]["image_size"]


def make_tokens(gen, batch, vocab):
    """XLM-R layout `<s> ids </s> <pad>...`; the last row fills the whole context (no padding)."""
    tokens = torch.full((batch, CONTEXT), PAD, dtype=torch.long)
    for i in range(batch):
        n = CONTEXT - 1 if i == batch - 1 else int(torch.randint(2, CONTEXT - 2, (1,), generator=gen))
        tokens[i, 0] = BOS
        tokens[i, 1:n] = torch.randint(3, vocab, (n - 1,), generator=gen)
        tokens[i, n] = EOS
    return tokens


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", required=True, help="xlm-roberta-base-ViT-B-32 or a model-config path")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--batch", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--vocab-size", type=int, default=None, help="shrink the text vocab")
    ap.add_argument("--half-weights", action="store_true",
                    help="round weights to fp16 and store them so (smaller fixtures; features use the rounded weights)")
    ap.add_argument("--check-load", type=Path)
    ap.add_argument("--inputs", type=Path)
    ap.add_argument("--tol", type=float, default=1e-4)
    args = ap.parse_args()

    torch.manual_seed(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        arch, image_size = register(Path(tmp), args.arch, args.vocab_size)
        if args.check_load:
            model = open_clip.create_model(arch, pretrained=str(args.check_load)).eval()
            ref = load_file(str(args.inputs))
            img, txt, *_ = gmf.features(model, ref["images"], ref["tokens"])
            d_img = (img - ref["image_features"]).abs().max().item()
            d_txt = (txt - ref["text_features"]).abs().max().item()
            print(f"check-load {arch}: max |diff| image {d_img:.3g} text {d_txt:.3g}")
            sys.exit(0 if max(d_img, d_txt) <= args.tol else 1)
        model = open_clip.create_model(arch, pretrained_text=False).eval()
    assert type(model.text).__name__ == "HFTextEncoder"
    gen = torch.Generator().manual_seed(args.seed)
    gmf.randomize(model, gen)  # biases and LayerNorm weights off their init values
    if args.half_weights:
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(p.half().float())
    vocab = model.text.config.vocab_size
    images = torch.randn(args.batch, 3, image_size, image_size, generator=gen)
    tokens = make_tokens(gen, args.batch, vocab)
    img, txt, img_n, txt_n, logits = gmf.features(model, images, tokens)

    args.out.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    hf = {f"roberta.{k}": v.detach().contiguous() for k, v in model.text.transformer.state_dict().items()}
    hf["lm_head.bias"] = torch.zeros(vocab)  # a head outside the tower, to be skipped
    if args.half_weights:
        sd = {k: v.half() for k, v in sd.items()}
        hf = {k: v.half() for k, v in hf.items()}
    save_file(sd, str(args.out / "model.safetensors"))
    save_file(hf, str(args.out / "hf_text.safetensors"))
    num_params = sum(p.numel() for p in model.parameters())
    save_file({
        "images": images, "tokens": tokens,
        "image_features": img, "text_features": txt,
        "image_features_normalized": img_n, "text_features_normalized": txt_n,
        "logits_per_image": logits,
        "num_params": torch.tensor(num_params, dtype=torch.long),
    }, str(args.out / "expected.safetensors"),
        metadata={"arch": arch, "image_size": str(image_size), "vocab_size": str(vocab)})
    print(f"{arch}: {num_params} params -> {args.out}")


if __name__ == "__main__":
    main()
