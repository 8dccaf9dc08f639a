#!/usr/bin/env python3
"""Reference values of the counter-based erasing noise (ferroclip_data::erase), computed with
numpy int64 arrays using only the operations the spec allows (xor, shifts of non-negative
values, products of values < 2^32 by constants < 2^31, & 0xffffffff) — the same operations a
torch implementation uses on the device.

    .venv/bin/python scripts/gen-erase-fixtures.py   # writes data/tests/fixtures/erase_noise.json
"""
import json
import pathlib

import numpy as np

OUT = pathlib.Path(__file__).resolve().parent.parent / "data" / "tests" / "fixtures" / "erase_noise.json"
M = np.int64(0xFFFFFFFF)


def mix32(x):
    x = x ^ (x >> 16)
    x = (x * np.int64(0x21F0AAAD)) & M
    x = x ^ (x >> 15)
    x = (x * np.int64(0x735A2D97)) & M
    return x ^ (x >> 15)


def noise(seed, index):
    lo, hi = np.int64(seed & 0xFFFFFFFF), np.int64(seed >> 32)
    c = 2 * index.astype(np.int64)
    b1 = mix32(mix32(c ^ lo) ^ hi)
    b2 = mix32(mix32((c + 1) ^ lo) ^ hi)
    u1 = (b1.astype(np.float64) + 1.0) * 2.0**-32
    u2 = (b2.astype(np.float64) + 1.0) * 2.0**-32
    return (np.sqrt(-2.0 * np.log(u1)) * np.cos(6.283185307179586 * u2)).astype(np.float32)


cases = []
for seed in [0, 1, 0x9E3779B97F4A7C15, 2**64 - 1, 123456789012345]:
    index = np.concatenate([np.arange(64), np.array([1000, 99999, 3 * 224 * 224 - 1, 2**31 - 1])])
    z = noise(seed, index)
    cases.append({"seed": str(seed), "index": index.tolist(), "value": [float(v) for v in z],
                  "bits": [int(b) for b in mix32(mix32((2 * index.astype(np.int64)) ^ np.int64(seed & 0xFFFFFFFF)) ^ np.int64(seed >> 32))]})
OUT.write_text(json.dumps(cases) + "\n")
print(f"wrote {OUT}")
