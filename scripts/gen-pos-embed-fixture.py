#!/usr/bin/env python3
"""OpenCLIP's `resize_pos_embed` (open_clip/model.py, v3.3.0: bicubic, antialias, class token kept) on
the `visual.positional_embedding` of a checkpoint, as OpenCLIP applies it when it loads weights trained
at another image size. For tests/train_e2e.rs's ViT fine-tune, which calls it on the checkpoint it
fine-tunes from.

Usage: .venv/bin/python scripts/gen-pos-embed-fixture.py IN.safetensors OUT.safetensors GRID
Writes OUT with the one tensor `visual.positional_embedding`, resized to a GRID x GRID patch grid.
"""
import sys
import types

from open_clip.model import resize_pos_embed
from safetensors.torch import load_file, save_file


def main():
    src, out, grid = sys.argv[1], sys.argv[2], int(sys.argv[3])
    state = {"visual.positional_embedding": load_file(src)["visual.positional_embedding"].float()}
    # resize_pos_embed reads only model.visual.grid_size.
    model = types.SimpleNamespace(visual=types.SimpleNamespace(grid_size=(grid, grid)))
    resize_pos_embed(state, model)
    save_file({"visual.positional_embedding": state["visual.positional_embedding"].contiguous()}, out)


if __name__ == "__main__":
    main()
