"""Phase 2.1 — D-STEER steering vectors from base/tuned model pairs; the same as
``mahals phase2`` (``--help`` for the options), for example::

    python examples/phase2_extract_steering_vectors.py --mode sanity
    python examples/phase2_extract_steering_vectors.py --pairs Llama31_Tulu --n 200 --pool mean
    python examples/phase2_extract_steering_vectors.py --dataset ../shared/data/hh-rlhf \\
        --data-dir harmless-base --split test --n 100
    python examples/phase2_extract_steering_vectors.py --demo      # offline, CPU, a few minutes

``--demo`` is ``mahals demo --phase 2`` (its options: ``--out``, ``--data``, ``--resume`` …):
SmolLM2-135M-Instruct read as a plain transcript and through its chat template (same weights:
a *format* vector, not a tuning vector). docs/study.md describes the outputs.
"""

import sys

from mahals.cli import main

if __name__ == "__main__":
    arguments = sys.argv[1:]
    if "--demo" in arguments:
        arguments.remove("--demo")
        sys.exit(main(["demo", "--phase", "2", *arguments]))
    sys.exit(main(["phase2", *arguments]))
