#!/usr/bin/env python3
"""Which parameters OpenCLIP leaves trainable when it locks a tower, for the trainer's lock groups.

    gen-lock-fixtures.py --arch A [--arch B ...] --out FILE.json

For each architecture (a model-config path, as gen-model-fixtures.py takes it; an `hf_model_name`
text tower is registered as gen-xlmr-fixtures.py does, nothing downloaded), a fresh model per case
is locked with OpenCLIP's own `lock_image_tower(unlocked_groups=N)` / `lock_text_tower(unlocked_layers=M,
freeze_layer_norm=F)` — what open_clip_train's `--lock-image*` / `--lock-text*` flags call — and
the names of the parameters still requiring grad are written: {arch: [{"lock_image", "groups",
"lock_text", "layers", "freeze_layer_norm", "trainable": [...]} or {..., "refused": message}]}.
"""
import argparse
import importlib.util
import json
import sys
import tempfile
from pathlib import Path

import open_clip


def load(name):
    spec = importlib.util.spec_from_file_location(name.replace("-", "_"), Path(__file__).with_name(f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # timm's register_model looks its caller's module up there
    spec.loader.exec_module(module)
    return module


gmf = load("gen-model-fixtures")
gxf = load("gen-xlmr-fixtures")

CASES = (
    [dict(lock_image=True, groups=g, lock_text=False, layers=0, freeze_layer_norm=True) for g in (0, 1, 2, 3, 5, 99)]
    + [dict(lock_image=False, groups=0, lock_text=True, layers=n, freeze_layer_norm=f)
       for n in (0, 1, 2, 99) for f in (True, False)]
)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", action="append", required=True)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    result = {}
    with tempfile.TemporaryDirectory() as tmp:
        for arch in args.arch:
            cfg = json.loads(Path(arch).read_text())
            if "hf_model_name" in cfg["text_cfg"]:
                name, _ = gxf.register(Path(tmp), arch, None)
                make = lambda: open_clip.create_model(name, pretrained_text=False)  # noqa: E731
            else:
                name = gmf.register_arch(arch, Path(tmp))
                make = lambda: open_clip.create_model(name)  # noqa: E731
            rows = []
            for case in CASES:
                model = make()
                row = dict(case)
                try:
                    if case["lock_image"]:
                        model.lock_image_tower(unlocked_groups=case["groups"])
                    if case["lock_text"]:
                        model.lock_text_tower(unlocked_layers=case["layers"],
                                              freeze_layer_norm=case["freeze_layer_norm"])
                    row["trainable"] = sorted(n for n, p in model.named_parameters() if p.requires_grad)
                except AssertionError as e:
                    row["refused"] = str(e)
                rows.append(row)
            result[arch] = rows
    args.out.write_text(json.dumps(result))


if __name__ == "__main__":
    main()
