#!/usr/bin/env bash
# Runs disel's PEFT-facing tests against the newest PEFT the package index serves, in a throwaway venv, so a
# PEFT release that breaks disel's registration shim (src/disel/methods/peft_registration.py) shows up
# before users meet it. The project pins peft<0.22; a newer PEFT is installed over that pin on purpose.
#
#   scripts/test_peft_latest.sh                 # venv in /tmp/disel-peft-latest (set VENV to change it)
#   scripts/test_peft_latest.sh -x -k mixed     # extra arguments go to pytest
#
# Exit status: pytest's (0 = disel passes on that PEFT). The PEFT version is printed first.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
VENV="${VENV:-/tmp/disel-peft-latest}"
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)

rm -rf "$VENV"
"$PY" -m venv "$VENV"
"${PIP[@]}" install -q --upgrade pip >/dev/null
# The CPU build of torch, pinned (a plain `torch` may pull a multi-GB CUDA build), then the project.
"${PIP[@]}" install -q "torch==2.13.0"
"${PIP[@]}" install -q -e ".[test]"
pinned="$("$VENV/bin/python" -c 'import peft; print(peft.__version__)')"
# The newest PEFT with whatever it needs; if that cannot resolve beside the project's pins, PEFT alone.
if ! "${PIP[@]}" install -q -U peft 2>/tmp/disel-peft-latest-pip.log; then
    echo "pip install -U peft did not resolve ($(tail -n 1 /tmp/disel-peft-latest-pip.log)); retrying with --no-deps"
    "${PIP[@]}" install -q -U --no-deps peft
fi
"$VENV/bin/python" - "$pinned" <<'EOF'
import sys

import peft
import torch
import transformers

print(
    f"peft {peft.__version__} (the project's pin resolved to {sys.argv[1]}), "
    f"transformers {transformers.__version__}, torch {torch.__version__}"
)
EOF
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
"$VENV/bin/python" -m pytest -q -p no:cacheprovider \
    tests/test_disel_peft.py tests/test_ecosystem_loading.py tests/test_queryable.py "$@"
