"""Compares two model files (safetensors) tensor by tensor: same keys, same shapes, and the largest
absolute difference at most TOL (0 asks for bitwise equality). Prints the largest difference.

    python tests/compare_weights.py A.safetensors B.safetensors TOL
"""
import sys

import numpy as np
from safetensors.numpy import load_file


def main() -> int:
    a_path, b_path, tol = sys.argv[1], sys.argv[2], float(sys.argv[3])
    a, b = load_file(a_path), load_file(b_path)
    if a.keys() != b.keys():
        print(f"different keys: only in A {sorted(a.keys() - b.keys())}, only in B {sorted(b.keys() - a.keys())}")
        return 1
    worst, where = 0.0, ""
    for k in sorted(a):
        if a[k].shape != b[k].shape:
            print(f"{k}: shape {a[k].shape} vs {b[k].shape}")
            return 1
        d = float(np.max(np.abs(a[k].astype(np.float64) - b[k].astype(np.float64)))) if a[k].size else 0.0
        if d > worst or not where:
            worst, where = d, k
    print(f"max |A - B| = {worst:.3e} (at {where}) over {len(a)} tensors, tolerance {tol:g}")
    return 0 if worst <= tol else 1


if __name__ == "__main__":
    sys.exit(main())
