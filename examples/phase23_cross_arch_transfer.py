"""Phase 2.3 — carry a pair's Phase 2.1 steering vector to other architectures through
residual maps and judge it there with λ sweeps; the same as ``mahals phase23`` (``--help`` for
the options), for example::

    python examples/phase23_cross_arch_transfer.py --source Llama31_Tulu \\
        --targets Mistral_7B Qwen2_7B Gemma2_9B Falcon_7B \\
        --dataset ../shared/data/hh-rlhf --data-dir harmless-base \\
        --xstest ../shared/data/xstest/xstest_prompts.csv
    python examples/phase23_cross_arch_transfer.py --demo     # offline, CPU

``--demo`` runs the Phase 2.1 demo (the DPO demo pair on SmolLM2-135M) and then carries its
vector to Gemma-3-270M (:func:`mahals.pipelines.phase23.demo_config`). docs/transfer.md
describes the outputs and the numbers measured.
"""

import sys

from mahals.cli import main
from mahals.pipelines.console import console
from mahals.pipelines.demo import phase2_demo_config
from mahals.pipelines.phase2 import run_phase2
from mahals.pipelines.phase23 import demo_config, run_phase23

if __name__ == "__main__":
    arguments = sys.argv[1:]
    if "--demo" not in arguments:
        sys.exit(main(["phase23", *arguments]))
    with console():
        vectors = phase2_demo_config()
        run_phase2(vectors)
        run_phase23(demo_config(vectors_dir=vectors.out_dir))
