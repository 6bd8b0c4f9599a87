"""Time geometry-mode AQI metrics: CHI + XB + stratified bootstrap, all layers, 7 axioms + overall.

Random activations (7 axioms x 2 labels, equal cells) are generated on the target device, so
the timing covers the metrics only (no host-to-device copy). Prints one markdown table row.

    python benchmarks/aqi_metrics.py --device cpu
    python benchmarks/aqi_metrics.py --device cuda
"""

from __future__ import annotations

import argparse
import datetime
import platform
import time

import torch

from mahals.aqi import evaluate_activations

N_AXIOMS = 7


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            model = next(line.split(":", 1)[1].strip() for line in handle if "model name" in line)
    except (OSError, StopIteration):
        model = platform.processor() or "CPU"
    return f"{model} ({torch.get_num_threads()} threads)"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run(n: int, d: int, layers: int, n_bootstrap: int, device: torch.device) -> float:
    generator = torch.Generator(device=device).manual_seed(0)
    activations = torch.randn(n, layers, d, generator=generator, device=device)
    axioms = [f"axiom_{i % N_AXIOMS}" for i in range(n)]
    labels = ["unsafe" if (i // N_AXIOMS) % 2 else "safe" for i in range(n)]
    synchronize(device)
    start = time.perf_counter()
    evaluate_activations(
        activations, axioms, labels, mode="geometry", layer="all", n_bootstrap=n_bootstrap
    )
    synchronize(device)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--n", type=int, default=2800)
    parser.add_argument("--d", type=int, default=4096)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--bootstrap", type=int, default=200)
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda":
        run(4 * N_AXIOMS, 8, 2, 4, device)  # warm-up: CUDA context and cuBLAS handles
    seconds = run(args.n, args.d, args.layers, args.bootstrap, device)
    print("| device | date | n | d | layers | bootstrap | seconds |")
    print("|---|---|---:|---:|---:|---:|---:|")
    print(
        f"| {device_name(device)} | {datetime.date.today().isoformat()} | {args.n} | {args.d} "
        f"| {args.layers} | {args.bootstrap} | {seconds:.2f} |"
    )


if __name__ == "__main__":
    main()
