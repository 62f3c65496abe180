#!/usr/bin/env bash
# Train on a SLURM cluster.
#
# Usage:
#   sbatch [SBATCH OPTIONS] launch/slurm_train.sh SCRIPT.py [ARGS...]
#   sbatch [SBATCH OPTIONS] launch/slurm_train.sh -m MODULE [ARGS...]
#   salloc [OPTIONS] launch/slurm_train.sh SCRIPT.py [ARGS...]     (the #SBATCH lines are
#                                                                    ignored by salloc)
# e.g. sbatch --nodes=2 launch/slurm_train.sh examples/segmentation/train.py --resume auto
#      sbatch --ntasks-per-node=2 launch/slurm_train.sh -m syncsn.distributed   (a probe)
#
# The #SBATCH lines below are defaults (1 node, 8 GPUs, one task per GPU, 24 h). Override
# them on the sbatch command line (--nodes, --ntasks-per-node, --gpus-per-node,
# --cpus-per-task, --time, --partition, ...) or with sbatch's input variables
# (SBATCH_PARTITION, SBATCH_TIMELIMIT, SBATCH_ACCOUNT, SBATCH_QOS, ...).
#
# Environment read by this script (sbatch passes the submitting shell's environment on):
#   LAUNCH_MODE    how processes are started:
#                    tasks     (default) one srun task per GPU: srun --kill-on-bad-exit=1
#                              $PYTHON SCRIPT ...; each task finds its rank in SLURM_* and
#                              rank 0's address from the node list (syncsn.init_distributed).
#                    torchrun  one srun task per node running torchrun with --nproc_per_node
#                              processes and a c10d rendezvous on the job's first host,
#                              SLURM_JOB_ID as rendezvous id.
#   PYTHON         python interpreter for the tasks mode (default: python on PATH)
#   TORCHRUN       torchrun command for the torchrun mode (default: torchrun on PATH, else
#                  "$PYTHON -m torch.distributed.run")
#   GPUS           processes per node in the torchrun mode (default: SLURM_NTASKS_PER_NODE,
#                  else SLURM_NTASKS / nodes)
#   MASTER_PORT    rendezvous port (default: 20000 + SLURM_JOB_ID % 10000, the port
#                  init_distributed derives too)
#   SRUN_ARGS      extra srun options, e.g. "--gpus-per-task=1 --gpu-bind=closest"
#   TORCHRUN_ARGS  extra torchrun options
#   REQUEUE        1 (default): requeue the job after a USR1-triggered stop; 0: just stop
#
# Preemption and time limits: --signal=B:USR1@300 makes SLURM send USR1 to this script five
# minutes before the time limit. The script forwards it to every training process (srun
# forwards it to the tasks; torchrun to its workers, from torch 2.9 on: with an older torch
# use the tasks mode for jobs that must checkpoint), which write a checkpoint and exit;
# then it requeues the job (--requeue). The requeued job runs the same command again, so
# give the training script a resume option that finds the last checkpoint (the segmentation
# example's --resume auto). Output is appended (--open-mode=append) to one log per job.
# A job preempted by SLURM itself gets SIGTERM on every process and is requeued by SLURM.
#
#SBATCH --job-name=syncsn
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --time=24:00:00
#SBATCH --requeue
#SBATCH --signal=B:USR1@300
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out
set -euo pipefail

log() { echo "slurm_train.sh: $*" >&2; }

if [ $# -lt 1 ] || [ "$1" = "-h" ] || [ "$1" = "--help" ]; then
    sed -n '2,/^#SBATCH/p' "${BASH_SOURCE[0]}" | sed '$d' | sed 's/^# \{0,1\}//' >&2
    exit 2
fi
if [ -z "${SLURM_JOB_ID:-}" ]; then
    log "SLURM_JOB_ID is not set: submit with 'sbatch launch/slurm_train.sh ...'" \
        "or run inside an allocation ('salloc ... launch/slurm_train.sh ...')"
    exit 2
fi

read -r -a python <<<"${PYTHON:-python}"
if [ -n "${TORCHRUN:-}" ]; then
    read -r -a torchrun <<<"$TORCHRUN"
elif command -v torchrun >/dev/null 2>&1; then
    torchrun=(torchrun)
else
    torchrun=("${python[@]}" -m torch.distributed.run)
fi
# (Expanded as ${a[@]+"${a[@]}"} below: an empty array trips 'set -u' in bash < 4.4.)
read -r -a srun_extra <<<"${SRUN_ARGS:-}"
read -r -a torchrun_extra <<<"${TORCHRUN_ARGS:-}"
export PYTHONUNBUFFERED="${PYTHONUNBUFFERED:-1}" # progress lines reach the log at once

mode="${LAUNCH_MODE:-tasks}"
nnodes="${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}"
log "job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on ${SLURM_JOB_NODELIST:-?}:" \
    "$nnodes node(s), ${SLURM_NTASKS:-?} task(s), mode $mode"

srun_cmd=(srun --kill-on-bad-exit=1)
case "$mode" in
tasks)
    [ -z "${SLURM_CPUS_PER_TASK:-}" ] || srun_cmd+=(--cpus-per-task="$SLURM_CPUS_PER_TASK")
    srun_cmd+=(${srun_extra[@]+"${srun_extra[@]}"} "${python[@]}" "$@")
    ;;
torchrun)
    head="$(scontrol show hostnames "$SLURM_JOB_NODELIST" 2>/dev/null | head -n 1 || true)"
    if [ -z "$head" ]; then
        head="$("${python[@]}" -c 'import os; from syncsn.distributed import expand_hostlist
print(expand_hostlist(os.environ["SLURM_JOB_NODELIST"])[0])')"
    fi
    port="${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 10000))}"
    ntasks="${SLURM_NTASKS:-$nnodes}"
    nproc="${GPUS:-${SLURM_NTASKS_PER_NODE:-$((ntasks / nnodes))}}"
    nproc="${nproc%%(*}" # "8(x2)" when nodes differ: take the first
    rdzv=(--nnodes="$nnodes" --nproc_per_node="$nproc" --rdzv_backend=c10d
        --rdzv_endpoint="$head:$port" --rdzv_id="$SLURM_JOB_ID")
    # torchrun (torch >= 2.9) forwards the signals listed here to its workers; USR1 is not
    # among its defaults, and would stop the agent itself before the workers could checkpoint.
    # An environment variable rather than --signals_to_handle, which older versions reject.
    export PET_SIGNALS_TO_HANDLE="${PET_SIGNALS_TO_HANDLE:-SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1}"
    srun_cmd+=(--nodes="$nnodes" --ntasks="$nnodes" --ntasks-per-node=1
        --cpus-per-task="${SLURM_CPUS_ON_NODE:-1}" ${srun_extra[@]+"${srun_extra[@]}"}
        "${torchrun[@]}" "${rdzv[@]}" ${torchrun_extra[@]+"${torchrun_extra[@]}"} "$@")
    ;;
*)
    log "LAUNCH_MODE must be 'tasks' or 'torchrun', got '$mode'"
    exit 2
    ;;
esac

stop_requested=0
on_usr1() {
    log "USR1: time limit near; asking the training processes to checkpoint and exit"
    stop_requested=1
    [ -z "$step_pid" ] || kill -USR1 "$step_pid" 2>/dev/null || true # srun forwards it to every task
}
on_term() {
    # SLURM sends SIGTERM to the tasks itself (preemption, scancel, time limit).
    log "SIGTERM: the job is ending; the training processes got SIGTERM too"
}

step_pid=""
trap on_usr1 USR1
trap on_term TERM
log "+ ${srun_cmd[*]}"
# In the background, so that the traps run while srun is going: bash runs a trap only
# between commands, and 'wait' returns early when one fires.
"${srun_cmd[@]}" &
step_pid=$!
rc=0
while :; do
    wait "$step_pid" && rc=0 || rc=$?
    kill -0 "$step_pid" 2>/dev/null || break # still running: a signal interrupted 'wait'
done
# Collect the real status if the last 'wait' was cut short as srun ended; 127 means it was
# already collected above.
wait "$step_pid" 2>/dev/null && rc2=0 || rc2=$?
[ "$rc2" = 127 ] || rc=$rc2
log "training step exited with status $rc"

if [ "$stop_requested" = 1 ] && [ "${REQUEUE:-1}" = 1 ]; then
    if scontrol requeue "$SLURM_JOB_ID"; then
        log "job $SLURM_JOB_ID requeued; it resumes from its last checkpoint"
        exit 0
    fi
    log "could not requeue job $SLURM_JOB_ID (an interactive allocation, or --no-requeue?)"
fi
exit "$rc"
