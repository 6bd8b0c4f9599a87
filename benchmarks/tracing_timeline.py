"""Where a small batch's time goes: the GPU's busy and idle time per batch, and the host's.

For the decoder stack alone, plain hooks and the streamed capture (Llama-3.1-8B shape, random
bf16 weights, 4 x 128 by default): wall time per batch (best of ``--repeats`` rounds, methods
interleaved), and from one torch.profiler run per method the GPU's busy time (union of its kernel
and copy intervals), the idle time between them (inflated: profiling slows the host) and GPU
operations per batch. A GPU busy for less than the wall time is waiting for the host: that
method's host work is then on the critical path. ``--breakdown`` times the capture's parts on
the host (wrappers around them); ``--profile`` writes the functions whose host time grows most
from the floor to each method (cProfile).

Usage (GPU): python benchmarks/tracing_timeline.py --json rows.jsonl
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import statistics
import sys
import time
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).parent))
from shapes import word_tokenizer  # noqa: E402
from tracing_overhead import (  # noqa: E402
    floor_forward,
    hooked_pooling,
    llama_8b_shape,
    random_batches,
    rounds,
)

from mahals.activations import capture  # noqa: E402
from mahals.models import load_model  # noqa: E402


def gpu_intervals(profile) -> list[tuple[float, float]]:
    spans = []
    for event in profile.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            start = event.time_range.start
            spans.append((start, start + event.time_range.elapsed_us()))
    return sorted(spans)


def busy_and_idle(spans: list[tuple[float, float]]) -> tuple[float, float]:
    """Microseconds the GPU was busy (union of ``spans``) and idle between the first start and
    the last end."""
    busy, end = 0.0, None
    for start, stop in spans:
        if end is None or start > end:
            busy += stop - start
            end = stop
        elif stop > end:
            busy += stop - end
            end = stop
    return busy, (spans[-1][1] - spans[0][0]) - busy


def host_profile(fn, batches: int) -> dict[str, tuple[float, float]]:
    """cProfile of one run of ``fn``: per function, (calls, own seconds) per batch."""
    profiler = cProfile.Profile()
    torch.cuda.synchronize()
    profiler.enable()
    fn()
    torch.cuda.synchronize()
    profiler.disable()
    stats = pstats.Stats(profiler).stats
    return {
        f"{Path(file).name}:{line}({name})": (calls / batches, own / batches)
        for (file, line, name), (_, calls, own, _, _) in stats.items()
    }


def host_difference(method: dict, floor: dict, top: int = 40) -> list[str]:
    """The functions whose own host time per batch grows most from ``floor`` to ``method``."""
    names = set(method) | set(floor)
    rows = sorted(
        (
            (
                method.get(n, (0, 0))[1] - floor.get(n, (0, 0))[1],
                n,
                method.get(n, (0, 0))[0] - floor.get(n, (0, 0))[0],
            )
            for n in names
        ),
        reverse=True,
    )
    total = sum(r[0] for r in rows)
    lines = [f"total own time per batch beyond the floor (under cProfile): {total * 1e6:.0f} us"]
    lines += [f"{d * 1e6:8.1f} us  {calls:+8.1f} calls  {n}" for d, n, calls in rows[:top]]
    lines += ["..."] + [
        f"{d * 1e6:8.1f} us  {calls:+8.1f} calls  {n}" for d, n, calls in rows[-15:]
    ]
    return lines


def host_breakdown(decoder, methods: dict, batches: int, repeats: int) -> dict:
    """Host seconds per batch inside the parts of the floor and of the streamed capture,
    timed by wrappers around them (best of ``repeats`` runs of each part's total)."""
    from mahals import activations, tracing

    totals: dict[str, float] = {}

    def timed(name, fn):
        def run(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                totals[name] = totals.get(name, 0.0) + time.perf_counter() - start

        return run

    saved = (
        tracing.Batch.__dict__["pad"], activations.run_trace, tracing._read_held,
        activations._Staging.add, activations._stack_on,
    )  # fmt: skip
    tracing.Batch.pad = classmethod(timed("pad", saved[0].__func__))
    activations.run_trace = timed("run_trace", saved[1])
    tracing._read_held = timed("read_held", saved[2])
    activations._Staging.add = timed("staging_add", saved[3])
    activations._stack_on = timed("stack_on", saved[4])
    decoder.forward = timed("decoder_forward", decoder.forward)
    best: dict[str, dict[str, float]] = {}
    try:
        for _ in range(repeats):
            for name in ("decoder", "mahals_stream"):
                totals.clear()
                torch.cuda.synchronize()
                start = time.perf_counter()
                methods[name]()
                torch.cuda.synchronize()
                totals["wall"] = time.perf_counter() - start
                run = {key: value / batches * 1e6 for key, value in totals.items()}
                if name not in best or run["wall"] < best[name]["wall"]:
                    best[name] = run
    finally:
        tracing.Batch.pad = saved[0]
        activations.run_trace, tracing._read_held = saved[1], saved[2]
        activations._Staging.add, activations._stack_on = saved[3], saved[4]
        del decoder.forward
    return {name: {key: round(value) for key, value in run.items()} for name, run in best.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batches", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--json")
    parser.add_argument("--profile", help="write the host-time difference to the floor here")
    parser.add_argument(
        "--breakdown", action="store_true", help="time the capture's parts on the host"
    )
    args = parser.parse_args()
    hf = llama_8b_shape(torch.device("cuda"))
    model = load_model(hf, tokenizer=word_tokenizer(), verbose=False)
    decoder = hf.get_decoder()
    layers = model.adapter.decoder_layers(hf)
    generator = torch.Generator().manual_seed(0)
    batches = random_batches(args.batch, args.seq, args.batches, torch.device("cuda"), generator)
    texts = [row for ids in batches for row in ids.tolist()]
    hooks = hooked_pooling(decoder, layers)
    methods = {
        "decoder": lambda: [floor_forward(decoder, ids) for ids in batches],
        "hooks": lambda: hooks(batches),
        "mahals_stream": lambda: capture(
            model, texts, pool="mean", batch_size=args.batch, progress=False
        ),
    }
    walls = {
        name: [seconds / args.batches * 1e6 for seconds in times]
        for name, times in rounds(methods, args.repeats).items()
    }
    row = {
        "card": torch.cuda.get_device_name(),
        "batch": args.batch,
        "seq": args.seq,
        "batches": args.batches,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
    for name, fn in methods.items():
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize()
        spans = gpu_intervals(prof)
        busy, idle = busy_and_idle(spans)
        row[name] = {
            "wall_us_best": round(min(walls[name])),
            "wall_us_median": round(statistics.median(walls[name])),
            "gpu_busy_us": round(busy / args.batches),
            "gpu_idle_us": round(idle / args.batches),
            "gpu_ops_per_batch": round(len(spans) / args.batches, 1),
        }
        print(name, row[name], flush=True)
    if args.breakdown:
        row["host_us_per_batch"] = host_breakdown(decoder, methods, args.batches, args.repeats)
        print(row["host_us_per_batch"], flush=True)
    if args.profile:
        floor = host_profile(methods["decoder"], args.batches)
        sections = []
        for name in ("hooks", "mahals_stream"):
            lines = host_difference(host_profile(methods[name], args.batches), floor)
            sections.append(f"### {name} - decoder, {args.batch} x {args.seq}\n" + "\n".join(lines))
        text = "\n\n".join(sections)
        print(text)
        Path(args.profile).write_text(text + "\n")
    if args.json:
        with open(args.json, "a") as handle:
            handle.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
