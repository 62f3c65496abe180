#!/usr/bin/env bash
# Launch a training script with torchrun, on one node or as one node of several.
#
# Usage:
#   launch/dist_train.sh SCRIPT.py [ARGS...]     # a python file
#   launch/dist_train.sh -m MODULE [ARGS...]     # a module, e.g. -m syncsn.distributed
#
# Environment (all optional):
#   GPUS           processes on this node, one per GPU (default: the visible GPUs, counted
#                  from CUDA_VISIBLE_DEVICES or nvidia-smi; 1 without GPUs). On a CPU-only
#                  machine it is the number of CPU processes.
#   NNODES         number of nodes (default 1: a standalone rendezvous on this node).
#   RDZV_ENDPOINT  host:port of a c10d rendezvous, for NNODES > 1: run this script with the
#                  same value on every node; node ranks are assigned at the rendezvous and
#                  the agent on that host serves it.
#   RDZV_ID        rendezvous id shared by the nodes of one run (default: syncsn).
#   NODE_RANK, MASTER_ADDR, MASTER_PORT
#                  static multi-node rendezvous instead of RDZV_ENDPOINT: NODE_RANK 0..NNODES-1
#                  on each node, MASTER_ADDR/MASTER_PORT the address of node 0 (port 29500
#                  when unset).
#   TORCHRUN       the torchrun command (default: torchrun on PATH, else
#                  "${PYTHON:-python} -m torch.distributed.run"). The training processes use
#                  the python interpreter torchrun belongs to.
#   TORCHRUN_ARGS  extra torchrun options, e.g. "--max-restarts=3".
set -euo pipefail

usage() {
    sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d' | sed 's/^# \{0,1\}//' >&2
}

if [ $# -lt 1 ] || [ "$1" = "-h" ] || [ "$1" = "--help" ]; then
    usage
    exit 2
fi
if [ "$1" = "-m" ] && [ $# -lt 2 ]; then
    echo "dist_train.sh: -m needs a module name" >&2
    exit 2
fi

count_gpus() {
    if [ -n "${CUDA_VISIBLE_DEVICES+set}" ]; then
        # An empty or "-1" list hides every GPU.
        local visible="${CUDA_VISIBLE_DEVICES//[[:space:]]/}"
        if [ -z "$visible" ] || [ "$visible" = "-1" ]; then
            echo 0
        else
            echo $(($(tr -cd ',' <<<"$visible" | wc -c) + 1))
        fi
    elif command -v nvidia-smi >/dev/null 2>&1; then
        nvidia-smi -L 2>/dev/null | grep -c '^GPU ' || true
    else
        echo 0
    fi
}

if [ -n "${TORCHRUN:-}" ]; then
    read -r -a torchrun <<<"$TORCHRUN"
elif command -v torchrun >/dev/null 2>&1; then
    torchrun=(torchrun)
else
    torchrun=("${PYTHON:-python}" -m torch.distributed.run)
fi

positive() { # NAME VALUE: fail unless VALUE is a positive integer
    if ! [[ "$2" =~ ^[1-9][0-9]*$ ]]; then
        echo "dist_train.sh: $1 must be a positive integer, got '$2'" >&2
        exit 2
    fi
}
if [ -n "${GPUS:-}" ]; then
    positive GPUS "$GPUS"
    gpus="$GPUS"
else
    gpus="$(count_gpus)"
    [ "$gpus" -ge 1 ] || gpus=1 # no GPU: one CPU process
fi
nnodes="${NNODES:-1}"
positive NNODES "$nnodes"

args=(--nproc_per_node="$gpus")
if [ "$nnodes" = 1 ]; then
    args+=(--standalone)
elif [ -n "${RDZV_ENDPOINT:-}" ]; then
    args+=(--nnodes="$nnodes" --rdzv_backend=c10d --rdzv_endpoint="$RDZV_ENDPOINT"
        --rdzv_id="${RDZV_ID:-syncsn}")
elif [ -n "${NODE_RANK:-}" ] && [ -n "${MASTER_ADDR:-}" ]; then
    args+=(--nnodes="$nnodes" --node_rank="$NODE_RANK" --master_addr="$MASTER_ADDR"
        --master_port="${MASTER_PORT:-29500}")
else
    echo "dist_train.sh: NNODES=$nnodes needs RDZV_ENDPOINT=host:port (c10d rendezvous)" \
        "or NODE_RANK and MASTER_ADDR (static rendezvous); got neither" >&2
    exit 2
fi
if [ -n "${TORCHRUN_ARGS:-}" ]; then
    read -r -a extra <<<"$TORCHRUN_ARGS"
    args+=("${extra[@]}")
fi

# torchrun's own -m flag takes the module name as its script, like python -m.
echo "+ ${torchrun[*]} ${args[*]} $*" >&2
exec "${torchrun[@]}" "${args[@]}" "$@"
