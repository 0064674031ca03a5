#!/usr/bin/env bash
# Create (or update) .venv-gptq, a SEPARATE environment with GPTQModel + optimum, used only by
# tests/test_gptq_parity.py (GPTQModel's own per-layer GPTQ vs ours; transformers loading our GPTQ export).
# Idempotent: re-running with the same pins does nothing. The main .venv is not touched.
#
# Pins: torch 2.13.0 (the CPU build on a CPU machine; installed FIRST so that gptqmodel cannot pull a CUDA
# torch), transformers 5.23.0 (as the main env). gptqmodel 7.7.0 (newest) needs torch>=2.14.1;
# 7.5.0 is the newest release that accepts torch 2.13 and imports without torchvision (7.3.6 imports
# torchvision at package import, and the PyPI torchvision wheels are CUDA builds that do not load on the
# CPU torch). gptqmodel is an sdist with no compiled extension at install time.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
ENV=${GPTQ_PARITY_ENV:-.venv-gptq}
TORCH=$(sed -n 's/^torch==//p' envs/constraints.txt)
TRANSFORMERS=$(sed -n 's/^transformers==//p' envs/constraints.txt)
GPTQMODEL=7.5.0
OPTIMUM=2.3.0
export GPTQMODEL_CPU_WORKERS=${GPTQMODEL_CPU_WORKERS:-2}

if [ ! -x "$ENV/bin/python" ]; then
  "$PY" -m venv "$ENV"
fi
stamp="$ENV/.qftbench-gptq-installed"
want="torch==$TORCH transformers==$TRANSFORMERS gptqmodel==$GPTQMODEL optimum==$OPTIMUM"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  cons=$(mktemp)
  printf 'torch==%s\ntransformers==%s\n' "$TORCH" "$TRANSFORMERS" > "$cons"
  "$ENV/bin/python" -m pip install -q --upgrade pip
  "$ENV/bin/python" -m pip install -q "torch==$TORCH"
  "$ENV/bin/python" -m pip install -q -c "$cons" "gptqmodel==$GPTQMODEL" "optimum==$OPTIMUM" requests
  rm -f "$cons"
  "$ENV/bin/python" -c "import gptqmodel, optimum; from gptqmodel.quantization.gptq import GPTQ" >/dev/null
  echo "$want" > "$stamp"
fi
echo "GPTQModel parity env ready: $ENV ($want)"
