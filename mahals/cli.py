"""``mahals`` command line: ``mahals phase1 …``, ``mahals phase2 …``, ``mahals demo``.

The pipelines log their progress; the CLI shows it on standard output as bare messages (the
reference implementation's console shape). A user error (bad argument, file, data, key or
checkpoint) is one line ``mahals <command>: error: …`` with exit status 2; set
MAHALS_TRACEBACK=1 to see its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from mahals.pipelines.common import exit_status
from mahals.pipelines.console import console

PHASES = {
    "phase1": ("mahals.pipelines.phase1", "Phase 1: baseline AQI of tuned models"),
    "phase2": ("mahals.pipelines.phase2", "Phase 2.1: extract steering vectors from base/tuned pairs"),
    "phase22": ("mahals.pipelines.phase22", "Phase 2.2: apply steering vectors, λ sweeps"),
    "phase23": ("mahals.pipelines.phase23", "Phase 2.3: carry a steering vector to other architectures"),
    "pair": ("mahals.pairs", "DPO-LoRA pairs: train an adapter (pair dpo) or check one (pair evaluate)"),
    "workers": ("mahals.workers", "warm Ray workers kept up between runs: workers up|down|status"),
    "demo": ("mahals.pipelines.demo", "offline demo: Phase 1 + Phase 2.1 on the small PyPI-shipped models"),
}  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mahals", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    for name, (module_name, help_text) in PHASES.items():
        sub = commands.add_parser(name, help=help_text, description=help_text)
        sub.set_defaults(module=module_name)
        importlib.import_module(module_name).add_arguments(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run ``mahals <command> …`` with the pipelines' log shown on standard output.

    Returns the exit status: 0 on success, 2 with a one-line ``mahals <command>: error: …`` on
    standard error for a user error, whichever the command
    (:func:`mahals.pipelines.common.exit_status`); a programming error keeps its traceback.
    """
    args = build_parser().parse_args(argv)
    module = importlib.import_module(args.module)
    with console():
        return exit_status(args.command, lambda: module.run_from_args(args))


if __name__ == "__main__":
    sys.exit(main())
