"""Phase 1 — baseline AQI of the seed's six instruct models (or any registry models).

    python examples/phase1_baseline_aqi.py --mode sanity
    python examples/phase1_baseline_aqi.py --models SmolLM2-135M-Instruct gemma-3-270m \
        --dataset ../shared/data/xstest/xstest_prompts.csv --dataset-format xstest

Same options as ``mahals phase1`` (``--help``); outputs in ``outputs/phase1_baseline_aqi``.
"""

import argparse
import sys

from mahals.pipelines import phase1

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    phase1.add_arguments(parser)
    sys.exit(phase1.run_from_args(parser.parse_args()))
