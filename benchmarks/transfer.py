"""Time Phase 2.3 map fitting: linear CKA of every layer pair + a residual map for every pair.

Default shapes are two 7–9B models (Llama/Mistral 32 layers × 4096 → Gemma-2 42 layers × 3584)
and 5,000 paired texts. The activations are random but not independent: every layer of both
models is a random linear image of one shared 64-dimensional latent plus isotropic noise, so CKA
and held-out R² are not trivially zero and ridge's cross-validation has a real optimum. They are
generated on the device before the clock starts (no host-to-device copy is timed).

Timed, in one pass: ``cka_matrix`` over all ``Ls × Lt`` pairs, then for each source layer
``fit_ridge_maps`` to all target layers (5-fold CV over the default 7-value α grid with the
default CV sketch, refit on the 80 % training rows, held-out R² / cosine on the other 20 %).
Maps are dropped after scoring (all 1,344 float64 maps would take 158 GB). ``--method
procrustes`` / ``cca`` fit one map per pair instead (use ``--pairs depth`` for those: one pair
per target layer). Prints a markdown table row and a JSON line.

    python benchmarks/transfer.py --device cuda
    python benchmarks/transfer.py --device cpu --threads 1 --n 1000 --source-layers 8 \\
        --target-layers 10 --d-source 512 --d-target 448
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import time

import torch

from mahals.transfer import (
    cka_matrix,
    fit_cca,
    fit_procrustes,
    fit_ridge_maps,
    match_by_depth,
)

LATENT_DIM = 64
NOISE = 1.0


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


def activations(
    latent: torch.Tensor, n_layers: int, width: int, generator: torch.Generator
) -> torch.Tensor:
    """``[n, n_layers, width]`` float32: ``latent @ A_l + noise`` per layer."""
    n, device = latent.shape[0], latent.device
    layers = []
    for _ in range(n_layers):
        mixing = torch.randn(LATENT_DIM, width, generator=generator, device=device)
        noise = NOISE * torch.randn(n, width, generator=generator, device=device)
        layers.append(latent @ mixing + noise)
    return torch.stack(layers, dim=1)


def run(args: argparse.Namespace, device: torch.device) -> dict:
    generator = torch.Generator(device=device).manual_seed(0)
    latent = torch.randn(args.n, LATENT_DIM, generator=generator, device=device)
    source = activations(latent, args.source_layers, args.d_source, generator)
    target = activations(latent, args.target_layers, args.d_target, generator)
    if args.pairs == "all":
        pairs = [(s, t) for s in range(args.source_layers) for t in range(args.target_layers)]
    else:
        pairs = list(match_by_depth(args.source_layers, args.target_layers))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    synchronize(device)

    start = time.perf_counter()
    cka = cka_matrix(source, target)
    synchronize(device)
    cka_seconds = time.perf_counter() - start

    r2 = []
    if args.method == "ridge":
        for s in dict.fromkeys(s for s, _ in pairs):
            targets = [t for s_, t in pairs if s_ == s]
            maps = fit_ridge_maps(
                source[:, s], target[:, targets], source_layer=s, target_layers=targets
            )
            r2.extend(m.quality.r2 for m in maps)
            del maps
    else:
        for s, t in pairs:
            if args.method == "procrustes":
                fitted = fit_procrustes(source[:, s], target[:, t], rank=args.rank)
            else:
                fitted = fit_cca(source[:, s], target[:, t], n_components=args.rank)
            r2.append(fitted.quality.r2)
    synchronize(device)
    total_seconds = time.perf_counter() - start
    return {
        "device": device_name(device),
        "date": datetime.date.today().isoformat(),
        "torch": torch.__version__,
        "n": args.n,
        "layers": f"{args.source_layers}x{args.target_layers}",
        "d_model": f"{args.d_source}x{args.d_target}",
        "method": args.method,
        "pairs": len(pairs),
        "cka_seconds": round(cka_seconds, 3),
        "fit_seconds": round(total_seconds - cka_seconds, 3),
        "total_seconds": round(total_seconds, 3),
        "mean_held_out_r2": round(sum(r2) / len(r2), 4),
        "cka_range": [round(float(cka.min()), 4), round(float(cka.max()), 4)],
        "peak_gpu_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
        if device.type == "cuda"
        else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--n", type=int, default=5000, help="paired texts")
    parser.add_argument("--source-layers", type=int, default=32)
    parser.add_argument("--target-layers", type=int, default=42)
    parser.add_argument("--d-source", type=int, default=4096)
    parser.add_argument("--d-target", type=int, default=3584)
    parser.add_argument("--method", choices=["ridge", "procrustes", "cca"], default="ridge")
    parser.add_argument("--pairs", choices=["all", "depth"], default="all")
    parser.add_argument("--rank", type=int, default=256, help="Procrustes rank / CCA components")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda":  # warm-up: CUDA context, cuBLAS / cuSOLVER handles
        warm = argparse.Namespace(
            **{
                **vars(args),
                "n": 100,
                "source_layers": 2,
                "target_layers": 2,
                "d_source": 32,
                "d_target": 16,
                "rank": 8,
            }
        )
        run(warm, device)
    row = run(args, device)
    print(
        "| device | date | n | layers | d_model | method | pairs | CKA s | fit s | total s | "
        "mean held-out R² | peak GPU GiB |"
    )
    print("|---|---|---:|---|---|---|---:|---:|---:|---:|---:|---:|")
    print(
        f"| {row['device']} | {row['date']} | {row['n']} | {row['layers']} | {row['d_model']} "
        f"| {row['method']} | {row['pairs']} | {row['cka_seconds']:.2f} | {row['fit_seconds']:.2f} "
        f"| {row['total_seconds']:.2f} | {row['mean_held_out_r2']:.4f} | {row['peak_gpu_gib']} |"
    )
    print(json.dumps(row))


if __name__ == "__main__":
    main()
