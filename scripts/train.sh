#!/usr/bin/env bash
# Quick start: the segmentation example on its built-in synthetic data, on NPROC processes
# (default 2; CPU/gloo here, one GPU per process with NCCL where there are GPUs).
# Sets up .venv first; extra arguments go to examples/segmentation/train.py.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/setup_env.sh"
cd "$root"
exec .venv/bin/torchrun --standalone --nproc_per_node="${NPROC:-2}" \
    examples/segmentation/train.py "$@"
