#!/usr/bin/env bash
# The test command of the README (and CI): install with the dev extra, then the default (fast) test run.
# Slow end-to-end checks on the real offline assets: python -m pytest -m slow
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh --dev
python -m pytest "$@"
