#!/usr/bin/env bash
# Prepared check for a CUDA machine (see benchmarks/gpu_check.py for what it checks):
#   (a) DISeL's fused kernel against the reference module path in bf16 and fp16, forward and gradients,
#       with tolerances; exit status 1 on a mismatch;
#   (b) speed ratios vs PEFT LoRA with 95% confidence intervals on a Llama-7B-like layer (d = 4096,
#       r = 64 and 256, 4096 tokens) and on a small whole model, and CUDA peak memory.
#
#   bash benchmarks/gpu_check.sh [--out results.json] [--repeats N] [--skip-speed]
#   bash benchmarks/gpu_check.sh --cpu-dry-run      # the same code on the CPU at tiny sizes
#
# Installs nothing from the network. It needs a Python with torch (and the project's other dependencies,
# transformers and peft, as on any machine that runs disel); it uses this checkout: if `import disel` does
# not already resolve to it, it tries `pip install --no-deps --no-build-isolation --no-index -e .` and
# otherwise (or with GPU_CHECK_NO_INSTALL=1) puts src/ on PYTHONPATH. PYTHON=... picks the interpreter.
# Exit status: 0 all good, 1 kernel mismatch, 2 environment problem (no torch, no CUDA, missing package).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"
DRY=0
for arg in "$@"; do
    if [ "$arg" = "--cpu-dry-run" ]; then DRY=1; fi
done
cd "$ROOT"

if ! "$PY" -c "import torch" 2>/dev/null; then
    echo "gpu_check: torch is not importable with $PY (this script installs nothing; set PYTHON=...)" >&2
    exit 2
fi
if [ "$DRY" = 0 ] && ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check: torch sees no CUDA device; run with --cpu-dry-run to check the script itself" >&2
    exit 2
fi
missing="$("$PY" -c "
import importlib.util
print(' '.join(m for m in ('transformers', 'peft', 'safetensors') if importlib.util.find_spec(m) is None))
")"
if [ -n "$missing" ]; then
    echo "gpu_check: missing Python packages: $missing (not installed from here; install them offline first)" >&2
    exit 2
fi

where="$("$PY" -c "import os, disel; print(os.path.dirname(os.path.abspath(disel.__file__)))" 2>/dev/null || true)"
if [ "$where" != "$ROOT/src/disel" ]; then
    if [ "${GPU_CHECK_NO_INSTALL:-0}" != 1 ] \
        && "$PY" -m pip install --quiet --no-deps --no-build-isolation --no-index -e "$ROOT" >/dev/null 2>&1; then
        echo "gpu_check: installed this checkout in editable mode (pip --no-deps --no-index)"
    else
        export PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}"
        echo "gpu_check: using $ROOT/src through PYTHONPATH"
    fi
fi

"$PY" - <<'PYEOF'
import platform, torch
print(f"python {platform.python_version()}, torch {torch.__version__}, cuda {torch.version.cuda}, "
      f"devices: {[torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]}")
PYEOF

exec "$PY" "$ROOT/benchmarks/gpu_check.py" "$@"
