"""Time the mahalanobis AQI: cross-validated shrinkage LDA + bootstrap CIs, every layer.

Random activations (8 categories x 2 labels, equal cells) are generated on the target device,
so the timing covers the metrics only (no host-to-device copy). Prints one markdown table row.

    python benchmarks/aqi_mahalanobis.py --device cpu
    python benchmarks/aqi_mahalanobis.py --device cuda
"""

from __future__ import annotations

import argparse
import datetime
import time

import torch
from aqi_metrics import device_name, synchronize  # same folder: run as a script

from mahals.aqi import evaluate_activations

N_CATEGORIES = 8


def run(n: int, d: int, layers: int, folds: int, bootstrap: int, device: torch.device) -> float:
    generator = torch.Generator(device=device).manual_seed(0)
    activations = torch.randn(n, layers, d, generator=generator, device=device)
    categories = [f"category_{i % N_CATEGORIES}" for i in range(n)]
    labels = ["unsafe" if (i // N_CATEGORIES) % 2 else "safe" for i in range(n)]
    synchronize(device)
    start = time.perf_counter()
    evaluate_activations(
        activations, categories, labels, n_folds=folds, n_bootstrap=bootstrap, layer="all"
    )
    synchronize(device)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--n", type=int, default=2800)
    parser.add_argument("--d", type=int, default=4096)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--bootstrap", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda":
        run(4 * args.folds * N_CATEGORIES, 16, 2, args.folds, 4, device)  # warm-up: context, cuBLAS, cuSOLVER
    seconds = [
        run(args.n, args.d, args.layers, args.folds, args.bootstrap, device)
        for _ in range(args.repeats)
    ]
    print("| device | date | n | d | layers | folds | bootstrap | seconds |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    print(
        f"| {device_name(device)} | {datetime.date.today().isoformat()} | {args.n} | {args.d} "
        f"| {args.layers} | {args.folds} | {args.bootstrap} | "
        + ", ".join(f"{s:.2f}" for s in seconds)
        + " |"
    )


if __name__ == "__main__":
    main()
