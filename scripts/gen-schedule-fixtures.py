#!/usr/bin/env python3
"""Fixtures for the learning-rate schedule test: OpenCLIP's own schedules (open_clip_train/scheduler.py,
v3.3.0: cosine_lr, const_lr, const_lr_cooldown) evaluated step by step for a few settings.

Writes tests/fixtures/optim/schedule.json: {"cases": [{"kind", "base_lr", "warmup", "steps",
"cooldown_steps", "cooldown_power", "cooldown_end_lr", "at": [step...], "lr": [lr...]}]}, with the
steps OpenCLIP's training loop calls (0 .. steps - 1) and `steps` itself.
Run: $REPO/.venv/bin/python scripts/gen-schedule-fixtures.py
"""
import json
import pathlib
import types

from open_clip_train.scheduler import const_lr, const_lr_cooldown, cosine_lr

ROOT = pathlib.Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "fixtures" / "optim" / "schedule.json"

CASES = [
    {"kind": "cosine", "base_lr": 5e-4, "warmup": 10, "steps": 110},
    {"kind": "cosine", "base_lr": 1e-3, "warmup": 0, "steps": 37},
    {"kind": "cosine", "base_lr": 3e-4, "warmup": 2000, "steps": 10000},
    {"kind": "const", "base_lr": 1e-3, "warmup": 4, "steps": 50},
    {"kind": "const", "base_lr": 2e-5, "warmup": 0, "steps": 9},
    {"kind": "const_cooldown", "base_lr": 1e-3, "warmup": 2, "steps": 20, "cooldown_steps": 8,
     "cooldown_power": 2.0, "cooldown_end_lr": 1e-5},
    {"kind": "const_cooldown", "base_lr": 1.0, "warmup": 0, "steps": 10, "cooldown_steps": 4,
     "cooldown_power": 1.0, "cooldown_end_lr": 0.0},
    {"kind": "const_cooldown", "base_lr": 5e-4, "warmup": 100, "steps": 1000, "cooldown_steps": 250,
     "cooldown_power": 0.5, "cooldown_end_lr": 1e-6},
]


def main():
    opt = types.SimpleNamespace(param_groups=[{}])
    out = []
    for c in CASES:
        if c["kind"] == "cosine":
            f = cosine_lr(opt, c["base_lr"], c["warmup"], c["steps"])
        elif c["kind"] == "const":
            f = const_lr(opt, c["base_lr"], c["warmup"], c["steps"])
        else:
            f = const_lr_cooldown(opt, c["base_lr"], c["warmup"], c["steps"], c["cooldown_steps"],
                                  c["cooldown_power"], c["cooldown_end_lr"])
        # Every step of the small cases; for the long one, every 7th plus the warmup's and the end's edges.
        at = list(range(c["steps"] + 1))
        if c["steps"] > 2000:
            w, n = c["warmup"], c["steps"]
            at = sorted(set(at[::7]) | {0, 1, w - 1, w, w + 1, n - 1, n})
        out.append({**c, "at": at, "lr": [f(s) for s in at]})
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps({"cases": out}, indent=1))
    print("wrote", OUT)


if __name__ == "__main__":
    main()
