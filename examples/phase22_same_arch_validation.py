"""Phase 2.2 — apply Phase 2.1 steering vectors and judge them with λ sweeps; the same as
``mahals phase22`` (``--help`` for the options), for example::

    python examples/phase22_same_arch_validation.py --pairs Llama31_Tulu \\
        --dataset ../shared/data/hh-rlhf --data-dir harmless-base --xstest ../shared/data/xstest/xstest_prompts.csv
    python examples/phase22_same_arch_validation.py --demo     # offline, CPU, a few minutes

``--demo`` runs the Phase 2.1 demo (SmolLM2-135M) and then a small Phase 2.2 sweep on its
vectors (:func:`mahals.pipelines.phase22.demo_config`). docs/steering.md describes the outputs.
"""

import sys

from mahals.cli import main
from mahals.pipelines.console import console
from mahals.pipelines.demo import phase2_demo_config
from mahals.pipelines.phase2 import run_phase2
from mahals.pipelines.phase22 import demo_config, run_phase22

if __name__ == "__main__":
    arguments = sys.argv[1:]
    if "--demo" not in arguments:
        sys.exit(main(["phase22", *arguments]))
    with console():
        vectors = phase2_demo_config()
        run_phase2(vectors)
        run_phase22(demo_config(vectors_dir=vectors.out_dir))
