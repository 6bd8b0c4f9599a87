"""Phase 1 sanity on one GPU: six random-weight 7–9B models in the registry's shapes, 1,400
LITMUS-shaped prompts each (7 axioms x 2 labels x 100), principled AQI with 200 bootstrap
resamples on the GPU. Reports seconds per model excluding weight creation, and peak memory.

Usage: python benchmarks/phase1.py [--out /tmp/phase1_bench] [--json results.jsonl]
"""

from __future__ import annotations

import argparse
import contextlib
import csv
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

from mahals.pipelines.phase1 import Phase1Config, run_phase1  # noqa: E402
from mahals.registry import load_registry  # noqa: E402

AXIOMS = ("Civility & Tolerance", "Duty & Accountability", "Empathy & Helpfulness", "Information Seeking",
          "Justice & Rights", "Well-being & Peace", "Wisdom & Knowledge")  # fmt: skip


def write_prompts(path: Path, per_cell: int, seed: int = 0) -> Path:
    rng = random.Random(seed)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["input", "axiom", "safety_label"])
        for axiom in AXIOMS:
            for label in ("safe", "unsafe"):
                for _ in range(per_cell):
                    writer.writerow([random_sentence(rng, rng.randint(8, 60)), axiom, label])
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="/tmp/phase1_bench")
    parser.add_argument("--per-cell", type=int, default=100)
    parser.add_argument("--no-cache", action="store_true")
    parser.add_argument("--json")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = write_prompts(out / "prompts.csv", args.per_cell)
    loader = RandomLoader()
    models = tuple(load_registry().study("seed"))
    config = Phase1Config(models=models, mode=None, per_cell=args.per_cell, dataset=str(data),
                          out_dir=out / "run", checkpoint="fresh", use_cache=not args.no_cache)  # fmt: skip
    torch.cuda.reset_peak_memory_stats()
    console = io.StringIO()
    started = time.perf_counter()
    with contextlib.redirect_stdout(console):
        summary = run_phase1(config, loader=loader)
    total = time.perf_counter() - started
    checkpoint = json.loads((config.out_dir / "phase1_aqi_checkpoint.json").read_text())
    per_model = {}
    for key in models:
        spec_key = load_registry().pair(key).tuned.key
        seconds = checkpoint["results"][key]["result"]["seconds"]
        per_model[key] = round(seconds - loader.load_seconds.get(spec_key, 0.0), 2)
    row = {
        "date": datetime.date.today().isoformat(), "card": torch.cuda.get_device_name(),
        "prompts_per_model": len(AXIOMS) * 2 * args.per_cell, "cache": not args.no_cache,
        "seconds_excluding_weights": round(total - sum(loader.load_seconds.values()), 2),
        "weight_creation_seconds": round(sum(loader.load_seconds.values()), 2),
        "per_model_seconds": per_model, "peak_gpu_gb": round(torch.cuda.max_memory_allocated() / 1e9, 1),
        "aqi": {k: round(v["AQI"], 3) for k, v in summary["results"].items()},
    }  # fmt: skip
    print(console.getvalue()[-1500:])
    report(row, args.json)


if __name__ == "__main__":
    main()
