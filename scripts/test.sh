#!/usr/bin/env bash
# Installs everything the tests need into .venv (CPU torch) and runs lint + the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip >/dev/null
# The CPU build of torch (a plain `torch` may pull a multi-GB CUDA build); users on GPUs install their own.
.venv/bin/python -m pip install -q --disable-pip-version-check "torch==2.13.0" -e ".[test,encoder]"
.venv/bin/ruff check src tests benchmarks
.venv/bin/ruff format --check src tests benchmarks
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
.venv/bin/python -m pytest -q "$@"
