"""Where a streamed capture's host time goes outside the GPU's work, next to the floor's.

One ``capture(pool="mean")`` over all the batches (Llama-3.1-8B shape, random bf16 weights, as
``tracing_overhead.py``'s ``mahals_stream``), with host timestamps at its phases:

* ``pre``: from the call to the first trace (checking and tokenising the inputs, planning the
  batches, allocating the result and the staging buffer): the GPU is idle throughout;
* ``traces``: from the first trace to the last batch staged;
* ``wait_gpu``: :meth:`finish`'s wait for the GPU (a ``torch.cuda.synchronize`` put in front
  of it);
* ``land_last``: from the GPU being done to :meth:`finish` returning (the landing steps still
  due, the last batch's included): host work after the GPU is done;
* ``post``: from there to ``capture`` returning; ``free``: dropping the result (outside
  ``wall``; inside ``tracing_overhead.py``'s timed rounds, whose methods drop their result).

The floor (the decoder stack alone over the same batches) is timed in the same rounds:
``floor_wall``, and ``floor_tail``, the time its host waits for the GPU after launching the last
batch. Medians over ``--repeats`` rounds after two warm-up rounds, in milliseconds.

Usage (GPU): python benchmarks/capture_phases.py 16 256 8 --json rows.jsonl
(``--smoke``: tiny layers on the CPU, where nothing is staged: checks the script runs.)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from shapes import word_tokenizer  # noqa: E402
from tracing_overhead import (  # noqa: E402
    floor_forward,
    llama_8b_shape,
    random_batches,
    synchronize,
)

import mahals.activations as activations  # noqa: E402
from mahals.models import load_model  # noqa: E402

PHASES = ("pre", "traces", "wait_gpu", "land_last", "post", "free", "wall")


def instrument(stamps: dict[str, float]) -> None:
    """Wrap the capture's trace, staging and finish calls to record host timestamps."""
    run_trace, add, finish = (
        activations.run_trace,
        activations._Staging.add,
        activations._Staging.finish,
    )

    def timed_run_trace(*args, **kwargs):
        stamps.setdefault("first_trace", time.perf_counter())
        return run_trace(*args, **kwargs)

    def timed_add(self, *args):
        add(self, *args)
        stamps["last_add"] = time.perf_counter()

    def timed_finish(self):
        stamps["finish_enter"] = time.perf_counter()
        synchronize()
        stamps["gpu_done"] = time.perf_counter()
        finish(self)
        stamps["finish_exit"] = time.perf_counter()

    activations.run_trace = timed_run_trace
    activations._Staging.add, activations._Staging.finish = timed_add, timed_finish


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("batch", type=int)
    parser.add_argument("seq", type=int)
    parser.add_argument("batches", type=int)
    parser.add_argument("--repeats", type=int, default=9, help="rounds, the first two warm-up")
    parser.add_argument("--json")
    parser.add_argument("--smoke", action="store_true", help="tiny layers on the CPU")
    args = parser.parse_args()
    device = torch.device("cpu" if args.smoke else "cuda")
    hf = llama_8b_shape(device, smoke=args.smoke)
    model = load_model(hf, tokenizer=word_tokenizer(), verbose=False)
    decoder = hf.get_decoder()
    generator = torch.Generator().manual_seed(0)
    batches = random_batches(args.batch, args.seq, args.batches, device, generator)
    texts = [row for ids in batches for row in ids.tolist()]
    stamps: dict[str, float] = {}
    instrument(stamps)
    times: dict[str, list[float]] = {key: [] for key in (*PHASES, "floor_wall", "floor_tail")}
    for _ in range(args.repeats):
        synchronize()
        start = time.perf_counter()
        for ids in batches:
            floor_forward(decoder, ids)
        launched = time.perf_counter()
        synchronize()
        done = time.perf_counter()
        times["floor_wall"].append(done - start)
        times["floor_tail"].append(done - launched)
        stamps.clear()
        synchronize()
        start = time.perf_counter()
        result = activations.capture(
            model, texts, pool="mean", batch_size=args.batch, progress=False
        )
        returned = time.perf_counter()
        del result
        freed = time.perf_counter()
        times["pre"].append(stamps["first_trace"] - start)
        times["traces"].append(stamps["last_add"] - stamps["first_trace"])
        times["wait_gpu"].append(stamps["gpu_done"] - stamps["finish_enter"])
        times["land_last"].append(stamps["finish_exit"] - stamps["gpu_done"])
        times["post"].append(returned - stamps["finish_exit"])
        times["free"].append(freed - returned)
        times["wall"].append(returned - start)
    row = {
        "card": "cpu (smoke)" if args.smoke else torch.cuda.get_device_name(),
        "batch": args.batch,
        "seq": args.seq,
        "batches": args.batches,
        "median_ms": {key: round(statistics.median(v[2:]) * 1e3, 2) for key, v in times.items()},
    }
    print(json.dumps(row), flush=True)
    if args.json:
        with open(args.json, "a") as handle:
            handle.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
