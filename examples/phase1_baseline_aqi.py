"""Phase 1 — baseline AQI of the reference implementation's six tuned models (or any registry
models); the same as ``mahals phase1`` (``--help`` for the options).

    python examples/phase1_baseline_aqi.py --mode sanity
    python examples/phase1_baseline_aqi.py --models SmolLM2-135M-Instruct gemma-3-270m \
        --dataset ../shared/data/xstest/xstest_prompts.csv --dataset-format xstest

Outputs in ``outputs/phase1_baseline_aqi`` (docs/study.md describes them).
"""

import sys

from mahals.cli import main

if __name__ == "__main__":
    sys.exit(main(["phase1", *sys.argv[1:]]))
