"""Phase 2.1 sanity on one GPU: 100 hh-rlhf-shaped conversations (chosen + rejected) through the
base and the tuned model of random-weight Llama-3.1-8B / Gemma-2-9B / Falcon-7B shapes, one
model resident at a time. Reports seconds per pair excluding weight creation, and peak GPU
memory against one model's weights.

Usage: python benchmarks/phase2.py [--pairs Llama3_8B Gemma2_9B Falcon_7B] [--json results.jsonl]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import io
import json
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from shapes import RandomLoader, random_sentence, report  # noqa: E402

from mahals.pipelines.phase2 import Phase2Config, run_phase2  # noqa: E402
from mahals.registry import load_registry  # noqa: E402


def write_conversations(path: Path, n: int, seed: int = 0) -> Path:
    rng = random.Random(seed)
    with path.open("w") as handle:
        for _ in range(n):
            prompt = (
                "".join(
                    f"\n\nHuman: {random_sentence(rng, rng.randint(10, 60))}\n\nAssistant: {random_sentence(rng, rng.randint(10, 60))}"
                    for _ in range(rng.randint(0, 2))
                )
                + f"\n\nHuman: {random_sentence(rng, rng.randint(10, 60))}"
            )
            answers = [
                f"\n\nAssistant: {random_sentence(rng, rng.randint(20, 150))}" for _ in range(2)
            ]
            handle.write(
                json.dumps({"chosen": prompt + answers[0], "rejected": prompt + answers[1]}) + "\n"
            )
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--pairs", nargs="+", default=["Llama3_8B", "Gemma2_9B", "Falcon_7B"])
    parser.add_argument("--n", type=int, default=100)
    parser.add_argument("--out", default="/tmp/phase2_bench")
    parser.add_argument("--json")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = write_conversations(out / "test.jsonl", args.n)
    registry = load_registry()
    rows = []
    for key in args.pairs:
        loader = RandomLoader()
        config = Phase2Config(mode="custom", n=args.n, pairs=(key,), dataset=str(data), split="test",
                              out_dir=out / key, checkpoint="fresh", use_cache=False)  # fmt: skip
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        console = io.StringIO()
        started = time.perf_counter()
        with contextlib.redirect_stdout(console):
            summary = run_phase2(config, loader=loader, tokenizer_loader=loader.tokenizer_loader)
        total = time.perf_counter() - started
        pair = registry.pair(key)
        weights = max(loader.weight_bytes.values())
        row = {
            "date": datetime.date.today().isoformat(), "card": torch.cuda.get_device_name(), "pair": key,
            "n_conversations": args.n, "seconds_excluding_weights": round(total - sum(loader.load_seconds.values()), 2),
            "weight_creation_seconds": round(sum(loader.load_seconds.values()), 2),
            "peak_gpu_gb": round(loader.peak_memory() / 1e9, 2), "one_model_weights_gb": round(weights / 1e9, 2),
            "models_loaded": len(loader.load_seconds), "layers_x_d": [pair.tuned.n_layers, pair.tuned.d_model],
            "cos_chosen": summary.results[key]["cosine_chosen_mean"],
        }  # fmt: skip
        rows.append(row)
        print(console.getvalue()[-1200:])
        report(row, args.json)


if __name__ == "__main__":
    main()
