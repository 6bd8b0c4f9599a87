"""Time the mahalanobis AQI: cross-validated shrinkage LDA + bootstrap CIs, every layer.

Random activations (8 categories x 2 labels, equal cells; float32, as captured) are generated
on the target device, so the timing covers the metrics only (no host-to-device copy). Prints
one markdown table row. On a shared CPU the wall time depends on the other processes, so the
row also gives the process CPU time, the load average, and the time of a fixed reference
operation (a 2048 x 2048 float32 matmul, 10 times) measured just before the run: a loaded
machine slows both, and the ratio is steadier than either.

    python benchmarks/aqi_mahalanobis.py --device cpu --threads 2
    python benchmarks/aqi_mahalanobis.py --device cuda
"""

from __future__ import annotations

import argparse
import datetime
import os
import time

import torch
from aqi_metrics import device_name, synchronize  # same folder: run as a script

from mahals.aqi import evaluate_activations

N_CATEGORIES = 8


def run(
    n: int, d: int, layers: int, folds: int, bootstrap: int, device: torch.device
) -> tuple[float, float]:
    """``(wall seconds, process CPU seconds)`` of one evaluation."""
    generator = torch.Generator(device=device).manual_seed(0)
    activations = torch.randn(n, layers, d, generator=generator, device=device)
    categories = [f"category_{i % N_CATEGORIES}" for i in range(n)]
    labels = ["unsafe" if (i // N_CATEGORIES) % 2 else "safe" for i in range(n)]
    synchronize(device)
    cpu, start = time.process_time(), time.perf_counter()
    evaluate_activations(
        activations, categories, labels, n_folds=folds, n_bootstrap=bootstrap, layer="all"
    )
    synchronize(device)
    return time.perf_counter() - start, time.process_time() - cpu


def reference_seconds(device: torch.device) -> float:
    """Wall time of ten 2048 x 2048 float32 matmuls on ``device``."""
    matrix = torch.randn(2048, 2048, device=device)
    matrix @ matrix
    synchronize(device)
    start = time.perf_counter()
    for _ in range(10):
        matrix @ matrix
    synchronize(device)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--n", type=int, default=2800)
    parser.add_argument("--d", type=int, default=4096)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--bootstrap", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda":  # warm-up: context, cuBLAS, cuSOLVER
        run(4 * args.folds * N_CATEGORIES, 16, 2, args.folds, 4, device)
    print(
        "| device | date | n | d | layers | folds | bootstrap | seconds | CPU seconds "
        "| load avg (1 min) | reference op (s) | seconds / reference |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for _ in range(args.repeats):
        reference = reference_seconds(device)
        load = os.getloadavg()[0]
        wall, cpu = run(args.n, args.d, args.layers, args.folds, args.bootstrap, device)
        print(
            f"| {device_name(device)} | {datetime.date.today().isoformat()} | {args.n} "
            f"| {args.d} | {args.layers} | {args.folds} | {args.bootstrap} | {wall:.2f} "
            f"| {cpu:.1f} | {load:.1f} | {reference:.3f} | {wall / reference:.0f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
