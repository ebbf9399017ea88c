#!/usr/bin/env bash
# Install yqpack's two environments (idempotent):
#   .venv/                     build tools: torch, Ultralytics, ModelOpt (numpy 2), tritonclient, yqpack itself
#   .yqpack/server-env/        the embedded tritonserver's Python (nvidia-pytriton, numpy<2), made by yqpack itself
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}

if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
# torch first and pinned: an unpinned torch pulled in by Ultralytics/ModelOpt would fetch a multi-GB CUDA build.
.venv/bin/python -m pip install --quiet torch==2.14.1 torchvision==0.29.1
.venv/bin/python -m pip install --quiet -e '.[test]'
# The server env is created by yqpack on first `serve --local`; doing it here keeps that out of timed runs.
.venv/bin/yqpack server-env
