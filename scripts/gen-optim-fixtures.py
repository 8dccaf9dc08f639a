#!/usr/bin/env python3
"""Fixtures for the AdamW test: torch.optim.AdamW for a few steps on small named parameters.

Groups as OpenCLIP v3.3.0 (open_clip_train/main.py): no weight decay where ndim < 2 or the name
contains bn/ln/bias/logit_scale; wd 0.2 otherwise. betas (0.9, 0.98), eps 1e-6; the learning rate
changes every step. Writes tests/fixtures/optim/adamw.safetensors with
  init.{name}, grad.{step}.{name}, lr (per step), out.{name}, exp_avg.{name}, exp_avg_sq.{name}.
Run: $REPO/.venv/bin/python scripts/gen-optim-fixtures.py
"""
import pathlib

import torch
from safetensors.torch import save_file

ROOT = pathlib.Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "fixtures" / "optim" / "adamw.safetensors"

SHAPES = {
    "visual.conv1.weight": (4, 3, 2, 2),
    "visual.ln_pre.weight": (8,),
    "visual.proj": (8, 4),
    "text.token_embedding.weight": (10, 8),
    "text.positional_embedding": (5, 8),
    "text.bn.running": (3, 3),  # 2-D but named bn: no decay
    "text.head.bias": (4,),
    "logit_scale": (),
}
LRS = [1e-3, 5e-4, 2e-3, 1e-4]


def exclude(n, p):
    return p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n


def main():
    g = torch.Generator().manual_seed(1234)
    params = {n: torch.nn.Parameter(torch.randn(s, generator=g)) for n, s in SHAPES.items()}
    out = {f"init.{n}": p.detach().clone() for n, p in params.items()}
    groups = [
        {"params": [p for n, p in params.items() if exclude(n, p)], "weight_decay": 0.0},
        {"params": [p for n, p in params.items() if not exclude(n, p)], "weight_decay": 0.2},
    ]
    opt = torch.optim.AdamW(groups, lr=LRS[0], betas=(0.9, 0.98), eps=1e-6, foreach=False)
    for step, lr in enumerate(LRS):
        for group in opt.param_groups:
            group["lr"] = lr
        for n, p in params.items():
            grad = torch.randn(p.shape, generator=g) * (0.1 if step % 2 else 3.0)
            out[f"grad.{step}.{n}"] = grad.clone()
            p.grad = grad
        opt.step()
    out["lr"] = torch.tensor(LRS, dtype=torch.float64)
    for n, p in params.items():
        out[f"out.{n}"] = p.detach().clone()
        st = opt.state[p]
        out[f"exp_avg.{n}"] = st["exp_avg"].clone()
        out[f"exp_avg_sq.{n}"] = st["exp_avg_sq"].clone()
    OUT.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in out.items()}, str(OUT))
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
