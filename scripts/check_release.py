#!/usr/bin/env python3
"""Loads a released Sangsaeng model with the `safetensors` package and NumPy only
(no Sangsaeng code) and checks it reproduces the Rust model's outputs.

Usage: check_release.py MODEL.safetensors CASES.json [TOLERANCE]

CASES.json: {"activation": "relu"|"tanh"|"gelu", "inputs": [[...], ...],
             "logits": [[...], ...]} where `inputs` are standardised feature rows
and `logits` what the Rust model computed for them. The layout is burn's Linear:
layers.{i}.weight has shape [in, out], layers.{i}.bias [out]; a hidden
activation follows every layer but the last.
"""
import json
import math
import sys

import numpy as np
from safetensors.numpy import load_file


def activation(name, x):
    if name == "relu":
        return np.maximum(x, 0.0)
    if name == "tanh":
        return np.tanh(x)
    if name == "gelu":  # exact (erf) GELU, as burn computes it
        erf = np.vectorize(math.erf)
        return 0.5 * x * (1.0 + erf(x / math.sqrt(2.0)))
    raise SystemExit(f"unknown activation {name!r}")


def main():
    model_path, cases_path = sys.argv[1], sys.argv[2]
    tol = float(sys.argv[3]) if len(sys.argv) > 3 else 1e-5
    tensors = load_file(model_path)
    cases = json.load(open(cases_path))
    n_layers = len([k for k in tensors if k.endswith(".weight")])
    x = np.asarray(cases["inputs"], dtype=np.float64)
    for i in range(n_layers):
        w = tensors[f"layers.{i}.weight"].astype(np.float64)
        b = tensors[f"layers.{i}.bias"].astype(np.float64)
        x = x @ w + b
        if i < n_layers - 1:
            x = activation(cases["activation"], x)
    expected = np.asarray(cases["logits"], dtype=np.float64)
    if x.shape != expected.shape:
        raise SystemExit(f"shape {x.shape} differs from the Rust outputs {expected.shape}")
    worst = float(np.max(np.abs(x - expected)))
    print(f"{x.shape[0]} inputs, {n_layers} layers, largest difference {worst:.3g} (tolerance {tol})")
    if not worst <= tol:
        raise SystemExit("the released weights do not reproduce the Rust model's outputs")


if __name__ == "__main__":
    main()
