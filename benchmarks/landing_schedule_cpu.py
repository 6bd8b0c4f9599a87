"""CPU emulation: what handing landing steps to a helper thread costs a busy Python main thread.

A 4 x 128 streamed capture is host-bound: its main thread runs Python (nnsight's trace, kernel
launches) almost without pause, and the landing thread needs Python's lock for its own Python
steps. This emulates that without a GPU: 40 "batches" of pure-Python work on the main thread,
each staging 4 rows; a landing step, handed to a one-thread pool after the batches named by a
schedule, waits 0.5 ms (the CUDA event, lock released), reads one flag per staged batch and
copies its rows into the result in input order, as ``mahals.activations._Staging._land`` did
in code h (code j reads one sum per step and copies with numpy: benchmarks/README.md, runs 24–27).
Schedules (batch indices after which a step is handed off; the rest lands at the end):

* ``f``: every 128 rows (``LANDING_BYTES`` at 512 KB a row), as session 7's code;
* ``halving``: also whenever the rows not handed off reach the rows still to come (code g/h);
* ``before_last``: every 128 rows and once before the last batch.

Prints the median and best wall time of each schedule over interleaved rounds (milliseconds).
Usage: python benchmarks/landing_schedule_cpu.py [--width 4096] [--rounds 40]
"""

from __future__ import annotations

import argparse
import statistics
import time
from concurrent.futures import ThreadPoolExecutor

import torch

BATCHES, ROWS = 40, 4
SCHEDULES = {"f": {31}, "halving": {19, 29, 34, 37, 38}, "before_last": {31, 38}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--width", type=int, default=4096, help="d_model of a row (32 layers)")
    parser.add_argument("--rounds", type=int, default=40)
    args = parser.parse_args()
    out = torch.empty(BATCHES * ROWS, 32, args.width)
    staged = torch.empty(BATCHES * ROWS, 32, args.width)
    flags = torch.ones(BATCHES, dtype=torch.bool)

    def land(segment):
        time.sleep(0.0005)
        for index, _, _ in segment:
            assert bool(flags[index])
        order = [row for _, rows, _ in segment for row in rows]
        first = segment[0][2]
        out.index_copy_(0, torch.tensor(order), staged[first : first + len(order)])

    def python_work() -> int:
        total = 0
        for i in range(60000):
            total += i * i
        return total

    def capture(points: set[int]) -> float:
        lander = ThreadPoolExecutor(1)
        landing, segment = [], []
        start = time.perf_counter()
        for batch in range(BATCHES):
            python_work()
            segment.append((batch, list(range(ROWS * batch, ROWS * batch + ROWS)), ROWS * batch))
            if batch in points:
                landing.append(lander.submit(land, segment))
                segment = []
        for future in landing:
            future.result()
        land(segment)
        seconds = time.perf_counter() - start
        lander.shutdown()
        return seconds

    times: dict[str, list[float]] = {name: [] for name in SCHEDULES}
    for _ in range(args.rounds):
        for name, points in SCHEDULES.items():
            times[name].append(capture(points))
    for name, seconds in times.items():
        print(
            f"{name:12s} median {statistics.median(seconds) * 1e3:7.2f} ms   best {min(seconds) * 1e3:7.2f} ms"
        )


if __name__ == "__main__":
    main()
