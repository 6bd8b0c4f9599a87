"""Peak GPU memory above the weights: plain decoder forward vs mahals capture (all layers).

Random-weight models in the registry's shapes, one batch of ``--batch`` x ``--seq`` tokens.
Usage: python benchmarks/capture_memory.py [--archs llama gemma2 falcon] [--batch 16 --seq 400]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from shapes import RandomLoader  # noqa: E402

from mahals.activations import capture  # noqa: E402
from mahals.registry import ModelSpec  # noqa: E402


def peak_above(weights: int, fn) -> float:
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return round((torch.cuda.max_memory_allocated() - weights) / 1e9, 3)


def measure(arch: str, batch: int, seq: int) -> dict:
    model = RandomLoader()(ModelSpec(key=arch, source="random", architecture=arch, n_layers=0, d_model=0))
    weights = torch.cuda.memory_allocated()
    ids = torch.randint(10, 150, (batch, seq))
    mask = torch.ones_like(ids)
    rows = {
        "decoder_forward": lambda: model.hf.get_decoder()(input_ids=ids.cuda(), attention_mask=mask.cuda()),
        "full_forward": lambda: model.hf(input_ids=ids.cuda(), attention_mask=mask.cuda()),
        "capture_mean_all_layers": lambda: capture(model, list(ids), pool="mean", batch_size=batch),
        "capture_last_all_layers": lambda: capture(model, list(ids), pool="last", batch_size=batch),
    }
    with torch.inference_mode():
        result = {name: peak_above(weights, fn) for name, fn in rows.items()}
    model.free()
    return {"arch": arch, "card": torch.cuda.get_device_name(), "batch": batch, "seq": seq,
            "weights_gb": round(weights / 1e9, 2), "peak_above_weights_gb": result}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--archs", nargs="+", default=["llama", "gemma2", "falcon"])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=400)
    args = parser.parse_args()
    for arch in args.archs:
        print(json.dumps(measure(arch, args.batch, args.seq)), flush=True)


if __name__ == "__main__":
    main()
