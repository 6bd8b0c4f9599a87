#!/usr/bin/env bash
# Install (with the dev, dpo and cluster extras) and run ruff + the whole test suite. Fails on any error,
# including pytest's exit code 5 (no tests collected).
set -uo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh dev,dpo,cluster || exit 1
.venv/bin/ruff check mahals tests examples benchmarks || exit 1
.venv/bin/python -m pytest -q -p no:cacheprovider "$@"
rc=$?
if [ "$rc" -eq 5 ]; then
    echo "pytest collected no tests: failing" >&2
    exit 1
fi
exit "$rc"
