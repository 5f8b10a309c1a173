#!/usr/bin/env bash
# Download (here, where PyPI is reachable) the wheels the GPU machine lacks into .whl/ (git-ignored).
# The GPU image has torch 2.11, transformers 5.17 and most of the scientific stack; it lacks Model
# Optimizer and pydantic, and its transformers is newer than this project admits (<5.3).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
mkdir -p .whl
PLAT=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
      --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
PKGS=(
  nvidia-modelopt==0.47.0 transformers==5.2.0 tokenizers==0.22.2 typer-slim==0.24.0
  pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
  omegaconf==2.3.0 pulp==3.3.2 gguf==0.19.0
)
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${PLAT[@]}" -d .whl "${PKGS[@]}"
# omegaconf's parser runtime is published as a source archive only: build its (pure Python) wheel here.
"$PY" -m pip wheel -q --no-deps -w .whl antlr4-python3-runtime==4.9.3
ls -la .whl
du -sh .whl
