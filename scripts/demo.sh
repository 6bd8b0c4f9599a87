#!/usr/bin/env bash
# Install and run the offline demo: Phase 1 (AQI on SmolLM2-135M-Instruct and Gemma-3-270M with
# XSTest), Phase 2.1 (the DPO demo pair's steering vector, from hh-rlhf) and a short Phase 2.2
# sweep of that vector with its controls, all on CPU, no network.
# Usage: bash scripts/demo.sh [--out DIR] [--fresh]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
HF_HUB_OFFLINE=1 .venv/bin/mahals demo "$@"
