"""Phase 2.1: extract D-STEER steering vectors from base/tuned model pairs (the seed's m03 script).

Takes the options of ``mahals phase2``, for example::

    python examples/phase2_extract_steering_vectors.py --mode sanity
    python examples/phase2_extract_steering_vectors.py --pairs Llama31_Tulu --n 200 --token mean
    python examples/phase2_extract_steering_vectors.py --dataset ../shared/data/hh-rlhf \\
        --data-dir harmless-base --split test --n 100
    python examples/phase2_extract_steering_vectors.py --demo      # offline, CPU, a few minutes

``--demo`` runs the offline preset: SmolLM2-135M-Instruct read as a plain transcript and through
its chat template (same weights: a *format* vector, not a tuning vector) on short conversations
of the local hh-rlhf harmless-base test split.

Per pair, ``<out>/<pair>/`` receives ``steering_vector.safetensors`` (+ ``_rejected``,
``_svd3``; each with a JSON sidecar, read back with ``SteeringVector.load``), ``metadata.json``,
the plots and ``hidden_states_cache/``; the run writes ``phase2_summary.json`` and the
comparison plots. An interrupted run resumes from ``phase2_steering_checkpoint.json``.
"""

from __future__ import annotations

import argparse
import sys

from mahals.pipelines import phase2


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    phase2.add_arguments(parser)
    parser.add_argument(
        "--demo", action="store_true", help="the offline demo preset (other data options ignored)"
    )
    args = parser.parse_args(argv)
    if not args.demo:
        return phase2.run_from_args(args)
    out = args.out if args.out != phase2.DEFAULT_OUT_DIR else "outputs/demo/phase2_steering_vectors"
    phase2.run_phase2(phase2.demo_config(out, checkpoint=args.checkpoint_choice))
    return 0


if __name__ == "__main__":
    sys.exit(main())
