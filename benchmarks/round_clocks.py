"""Line up ``tracing_overhead.py`` rounds with the GPU's clock and utilisation over the same time.

Reads a row of ``tracing_overhead.py --json`` (which keeps each round's start and length) and a
log of ``nvidia-smi --query-gpu=timestamp,clocks.sm,clocks.mem,power.draw,utilization.gpu,
temperature.gpu,clocks_throttle_reasons.active --format=csv -lms 100`` taken beside it (plain or
``.gz``; read-only queries). For each method it prints the median round, the SM clock and the
share of time a kernel ran (``utilization.gpu``) over its rounds, the throttle reasons seen, and
the same for its ten fastest rounds: whether a slow round was a slow GPU or a host that fell
behind it.

Usage: ``python benchmarks/round_clocks.py ROWS.jsonl CLOCKS.csv[.gz] [ROW_INDEX ...]``
"""

from __future__ import annotations

import datetime
import gzip
import json
import statistics
import sys
from pathlib import Path


def read_clocks(path: Path) -> list[tuple[float, float, float, str]]:
    """``(unix seconds, SM MHz, utilisation %, throttle reasons)`` per sample."""
    opener = gzip.open if path.suffix == ".gz" else open
    samples = []
    with opener(path, "rt") as lines:
        next(lines)
        for line in lines:
            fields = [field.strip() for field in line.split(",")]
            try:
                when = datetime.datetime.strptime(fields[0], "%Y/%m/%d %H:%M:%S.%f")
            except ValueError:
                continue
            stamp = when.replace(tzinfo=datetime.UTC).timestamp()
            samples.append(
                (stamp, float(fields[1].split()[0]), float(fields[4].split()[0]), fields[6])
            )
    return samples


def summarise(row: dict, samples: list[tuple[float, float, float, str]]) -> list[str]:
    lines = [f"{row['batch']} x {row['seq']} x {row['batches']}, {row['repeats']} rounds"]
    for method, seconds in row["round_seconds"].items():
        starts = row.get("round_starts", {}).get(method)
        if not starts:
            continue
        rounds = []
        for start, length in zip(starts, seconds, strict=True):
            inside = [s for s in samples if start + 0.05 <= s[0] <= start + length - 0.05]
            if inside:
                clock = statistics.mean(s[1] for s in inside)
                busy = statistics.mean(s[2] for s in inside)
                rounds.append((length, clock, busy, {s[3] for s in inside}))
        if not rounds:
            continue
        fastest = sorted(rounds)[:10]
        reasons = sorted(set().union(*(r[3] for r in rounds)))
        lines.append(
            f"  {method:14s} round {statistics.median(r[0] for r in rounds):.3f} s "
            f"(min {min(r[0] for r in rounds):.3f}) | SM {statistics.median(r[1] for r in rounds):4.0f} MHz"
            f" | kernel running {statistics.median(r[2] for r in rounds):4.1f} % | fastest 10: "
            f"{statistics.mean(r[0] for r in fastest):.3f} s, {statistics.mean(r[2] for r in fastest):4.1f} %"
            f" | reasons {','.join(reasons)}"
        )
    return lines


def main() -> None:
    rows_path, clocks_path, *indices = sys.argv[1:]
    rows = [json.loads(line) for line in Path(rows_path).read_text().splitlines() if line]
    samples = read_clocks(Path(clocks_path))
    for index in [int(i) for i in indices] or range(len(rows)):
        print("\n".join(summarise(rows[index], samples)))


if __name__ == "__main__":
    main()
