#!/usr/bin/env bash
# Install and run the offline demo: Phase 1 (AQI on SmolLM2-135M-Instruct and Gemma-3-270M with
# XSTest) and Phase 2.1 (steering-vector extraction on hh-rlhf), all on CPU, no network.
# Usage: bash scripts/demo.sh [--out DIR] [--fresh]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
HF_HUB_OFFLINE=1 .venv/bin/mahals demo "$@"
