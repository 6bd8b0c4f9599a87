"""Cost of applying steering vectors, on a random-weight Llama-3.1-8B shape (bf16, one GPU):

(a) greedy generation tokens/s with and without a 5-layer vector applied at all positions,
    batch 16 and 1 (64 new tokens);
(b) capture (pooled, every layer) of 256 prompts, steered vs unsteered;
    in (a) and (b) steered and unsteered runs take turns, ``--repeats`` rounds after a warm-up,
    and the rows give the best and the median run of each (overhead from the best runs: what
    the code adds; from the medians: how much the run-to-run spread moves it);
(c) one full Phase 2.2 sweep of one pair (8 λ × 2 sides + 3 controls; 1,400 XSTest-shaped AQI
    prompts, 200 preference rows, 100 generations of 64 tokens), random vectors standing in for
    Phase 2.1's, several λ per forward (the pipeline's default). Progress (one line per group
    of λ blocks with its time split: scores / generation / capture / AQI) goes to stderr. The
    reference (t-SNE) AQI at the last layer is CPU work, timed apart: ``--reference-aqi`` adds
    it to the sweep, and the row always reports one reference AQI's seconds on 1,400 × d_model.

Prints one JSON row per measurement. ``--device cpu --tiny`` runs the same code on a 6-layer
model with small sizes (a smoke run, not a measurement).

Usage: python benchmarks/steering.py [--parts a b c] [--json results.jsonl] [--reference-aqi]
       python benchmarks/steering.py --device cpu --tiny
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import datetime
import io
import logging
import random
import statistics
import sys
import time
import zlib
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).parent))
from phase2 import write_conversations  # noqa: E402
from shapes import RandomLoader, random_sentence, report, word_tokenizer  # noqa: E402

from mahals.activations import capture  # noqa: E402
from mahals.aqi import evaluate_activations  # noqa: E402
from mahals.data.hh_rlhf import load_hh_rlhf  # noqa: E402
from mahals.data.safety import XSTEST_CONTRAST_GROUPS, load_xstest  # noqa: E402
from mahals.evaluation import row_hash  # noqa: E402
from mahals.models import load_model  # noqa: E402
from mahals.pipelines.phase2_pair import vector_files  # noqa: E402
from mahals.pipelines.phase22 import Phase22Config, run_phase22  # noqa: E402
from mahals.registry import load_registry  # noqa: E402
from mahals.steering import Steering, SteeringVector, steer  # noqa: E402
from mahals.tracing import generate  # noqa: E402

PAIR = "Llama3_8B"


class TinyLoader:
    """A 6-layer random Llama on the CPU (float32) for ``--tiny`` smoke runs; base and tuned get
    different weights (seeded by the registry key)."""

    def __init__(self) -> None:
        self.tokenizer = word_tokenizer()
        self.load_seconds: dict[str, float] = {}

    def __call__(self, spec=None):
        torch.manual_seed(zlib.crc32(spec.key.encode()) if spec is not None else 0)
        config = transformers.LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256,
                                          num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
        hf = transformers.AutoModelForCausalLM.from_config(config)
        return load_model(hf, tokenizer=self.tokenizer, device="cpu", verbose=False)

    def tokenizer_loader(self, spec):
        return self.tokenizer


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _timed(methods: dict, device, repeats: int) -> dict[str, list[float]]:
    """Seconds of each of ``repeats`` runs per method after one warm-up each; the methods take
    turns within every round, so a slow spell on the host or the card hits them alike."""
    for fn in methods.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in methods}
    for _ in range(repeats):
        for name, fn in methods.items():
            _sync(device)
            started = time.perf_counter()
            fn()
            _sync(device)
            times[name].append(time.perf_counter() - started)
    return times


def _vector(model, n_layers: int = 5) -> SteeringVector:
    layers = tuple(range(model.n_layers - n_layers, model.n_layers))
    rows = torch.randn(len(layers), model.d_model, generator=torch.Generator().manual_seed(0))
    return SteeringVector(rows, layers)


def part_a_b(model, args, base_row: dict) -> None:
    rng = random.Random(0)
    spec = Steering(_vector(model), alpha=1.0, positions="all")
    ids = [
        model.tokenizer(random_sentence(rng, rng.randint(20, 60)))["input_ids"] for _ in range(256)
    ]
    new_tokens = 8 if args.tiny else 64
    if "a" in args.parts:
        for batch in (16, 1):
            prompts = ids[:batch]
            row = {**base_row, "part": "a_generation", "batch": batch, "new_tokens": new_tokens}

            def run(specs, prompts=prompts):
                with steer(model, *specs) if specs else contextlib.nullcontext():
                    generate(model, prompts, max_new_tokens=new_tokens, min_new_tokens=new_tokens)

            times = _timed(
                {"unsteered": lambda: run(()), "steered": lambda: run((spec,))},
                model.device,
                args.repeats,
            )
            _overheads(row, times, lambda seconds, b=batch: b * new_tokens / seconds, "tokens_per_s")
            report(row, args.json)
    if "b" in args.parts:
        n = 32 if args.tiny else 256
        row = {**base_row, "part": "b_capture", "prompts": n}

        def run_capture(specs):
            with steer(model, *specs) if specs else contextlib.nullcontext():
                capture(model, ids[:n], pool="last", batch_size=32, progress=False)

        times = _timed(
            {"unsteered": lambda: run_capture(()), "steered": lambda: run_capture((spec,))},
            model.device,
            args.repeats,
        )
        _overheads(row, times, lambda seconds: seconds, "seconds")
        report(row, args.json)


def _overheads(row: dict, times: dict[str, list[float]], measure, unit: str) -> None:
    """Fill ``row`` with each method's ``measure`` at its best and median run, and the steered
    run's overhead in % of time (best runs: the cost the code adds; medians: how it spreads)."""
    for label, runs in times.items():
        row[f"{label}_{unit}"] = round(measure(min(runs)), 4)
        row[f"{label}_{unit}_median"] = round(measure(statistics.median(runs)), 4)
    for which, pick in (("", min), ("_median", statistics.median)):
        ratio = pick(times["steered"]) / pick(times["unsteered"])
        row[f"overhead_pct{which}"] = round(100 * (ratio - 1), 2)


def _write_xstest_like(path: Path, n: int) -> Path:
    """``n`` XSTest-shaped rows: random sentences over XSTest's types (safe and contrast_*)."""
    rng = random.Random(1)
    types = sorted(XSTEST_CONTRAST_GROUPS)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "prompt", "type", "label"])
        for i in range(n):
            kind = types[i % len(types)]
            label = "unsafe" if kind.startswith("contrast_") else "safe"
            writer.writerow([i + 1, random_sentence(rng, rng.randint(8, 30)), kind, label])
    return path


def _fake_vectors(folder: Path, n_layers: int, d_model: int, extraction_rows: list[str]) -> None:
    generator = torch.Generator().manual_seed(0)
    for name in vector_files(3):
        rows = torch.randn(n_layers, d_model, generator=generator)
        SteeringVector(rows, tuple(range(n_layers)), pool="last",
                       extra={"row_sha256": extraction_rows, "pairing": "shared-template"}).save(folder / name)  # fmt: skip


def part_c(args, base_row: dict, loader, n_layers: int, d_model: int) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    n_eval, n_aqi, n_generate = (8, 96, 4) if args.tiny else (200, 1400, 100)
    data = write_conversations(out / "test.jsonl", n_eval + 20)
    extraction = [row_hash(row) for row in load_hh_rlhf(str(data), split="test", verbose=False)][
        :20
    ]
    _fake_vectors(out / "vectors" / PAIR, n_layers, d_model, extraction)
    xstest = _write_xstest_like(out / "xstest.csv", n_aqi)
    config = Phase22Config(
        pairs=(PAIR,), vectors_dir=out / "vectors", dataset=str(data), split="test", n_eval=n_eval,
        xstest=str(xstest), n_generate=n_generate, max_new_tokens=8 if args.tiny else 64,
        batch_size=64, out_dir=out / "sweep", checkpoint="fresh", reference_aqi=args.reference_aqi,
    )  # fmt: skip
    progress = logging.StreamHandler(sys.stderr)
    progress.setFormatter(logging.Formatter("[%(relativeCreated)7.0f ms] %(message)s"))
    pair_log = logging.getLogger("mahals.pipelines.phase22_pair")
    pair_log.addHandler(progress)
    pair_log.setLevel(logging.INFO)
    console = io.StringIO()
    started = time.perf_counter()
    try:
        with contextlib.redirect_stdout(console):
            summary = run_phase22(config, loader=loader, tokenizer_loader=loader.tokenizer_loader)
    finally:
        pair_log.removeHandler(progress)
    total = time.perf_counter() - started
    weights = sum(getattr(loader, "load_seconds", {}).values())
    rows = load_xstest(str(xstest))
    states = torch.randn(n_aqi, d_model, generator=torch.Generator().manual_seed(0))
    tsne_started = time.perf_counter()
    evaluate_activations(states, rows.axioms, rows.labels, mode="reference", seed=0)
    row = {**base_row, "part": "c_phase22_sweep", "points": len(summary.results), "eval_rows": n_eval,
           "aqi_prompts": n_aqi, "generations": n_generate, "reference_aqi_in_sweep": args.reference_aqi,
           "seconds_excluding_weights": round(total - weights, 2), "weight_creation_seconds": round(weights, 2),
           "one_reference_aqi_seconds": round(time.perf_counter() - tsne_started, 2),
           "peak_gpu_gb_excluding_weight_creation": round(loader.peak_memory() / 1e9, 2)
           if torch.cuda.is_available() else None}  # fmt: skip
    report(row, args.json)


def profile_generation(model, path: str, new_tokens: int) -> None:
    """cProfile of one batch-1 greedy generation without and with the 5-layer steer (after a
    warm-up of each): where the steered run's extra host time goes."""
    import cProfile
    import pstats

    spec = Steering(_vector(model), alpha=1.0, positions="all")
    prompt = [model.tokenizer(random_sentence(random.Random(0), 40))["input_ids"]]
    sections = []
    for label, specs in (("unsteered", ()), ("steered", (spec,))):

        def run(specs=specs):
            with steer(model, *specs) if specs else contextlib.nullcontext():
                generate(model, prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens)

        run()
        profiler = cProfile.Profile()
        _sync(model.device)
        profiler.enable()
        run()
        _sync(model.device)
        profiler.disable()
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(40)
        sections.append(f"### {label}: batch 1, {new_tokens} new tokens\n{text.getvalue()}")
    Path(path).write_text("\n".join(sections))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--parts", nargs="+", default=["a", "b", "c"], choices=["a", "b", "c"])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="6-layer CPU smoke run")
    parser.add_argument(
        "--reference-aqi", action="store_true", help="(c): t-SNE AQI at every point"
    )
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", default="/tmp/steering_bench")
    parser.add_argument("--json")
    parser.add_argument(
        "--profile", help="write cProfile tables of one batch-1 generation, unsteered and steered"
    )
    args = parser.parse_args()
    loader = TinyLoader() if args.tiny else RandomLoader(args.device)
    spec = load_registry().pair(PAIR).base
    model = loader(spec)
    base_row = {"date": datetime.date.today().isoformat(),
                "card": torch.cuda.get_device_name() if model.device.type == "cuda" else "cpu",
                "model": "tiny-llama" if args.tiny else "Llama-3.1-8B shape, random bf16"}  # fmt: skip
    part_a_b(model, args, base_row)
    if args.profile:
        profile_generation(model, args.profile, new_tokens=8 if args.tiny else 64)
    n_layers, d_model = model.n_layers, model.d_model
    model.free()
    if "c" in args.parts:
        part_c(args, base_row, loader, n_layers, d_model)


if __name__ == "__main__":
    sys.exit(main())
