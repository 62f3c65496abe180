#!/usr/bin/env bash
# The GPU check of syncsn: one script, one GPU, under 8 minutes, every result in one folder.
#
#   benchmarks/gpu_check.sh [OUT_DIR]        # default OUT_DIR: gpu_results/
#
# Parts, each with its own time limit and log (OUT_DIR/<part>.log); one failing part does
# not stop the others, and a summary ends the run (OUT_DIR/summary.txt):
#
#   env          the GPU, Python, torch and Triton versions
#   warm         benchmarks/warm_kernels.py: the benchmark's Triton kernels compiled in
#                parallel processes (Triton's disk cache), so the timing runs only load them
#   bench        benchmarks/bench_layers.py --device cuda: SN, SyncSN (world 1), SyncBatchNorm
#                and SSN against torch's BatchNorm2d and GroupNorm, float32 and bfloat16,
#                contiguous and channels_last, kernels per call, CUDA-graph timing and the
#                fraction of copy bandwidth (bench_layers.md / .json)
#   cuda_checks  tests/test_cuda.py: the Triton backend selected on CUDA, its kernels per
#                call, every kernel of a whole SN / SyncBN call (at most 3 each way),
#                training steps without host synchronization (sync debug mode "error",
#                no .item()/nonzero), a training step in a CUDA graph against
#                eager, torch.compile(mode="reduce-overhead")
#   cuda_tests   the rest of tests/test_cuda.py (gloo on CUDA tensors; NCCL needs 2 GPUs)
#   triton_tests tests/test_triton.py on CUDA tensors against the reference backend
#
# Runs from a copy of the repository with the system python3 (PYTHON=... to change it)
# and no installation: PYTHONPATH is the repository. The C++ CPU kernels are not built
# (SYNCSN_NATIVE=0); SYNCSN_BACKEND=auto keeps the Triton backend on CUDA tensors. Without
# pytest, benchmarks/minitest.py runs the test files.
set -u

cd "$(dirname "$0")/.."
OUT=${1:-gpu_results}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
BUDGET=${GPU_CHECK_SECONDS:-470}
START=$(date +%s)
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export SYNCSN_NATIVE=0
export SYNCSN_BACKEND=auto
export PYTHONUNBUFFERED=1
export TRITON_DEFAULT_FP_FUSION=1
unset TRITON_INTERPRET
SUMMARY=()

# run_part NAME LIMIT_SECONDS COMMAND...: run with a limit cut to what is left of the budget.
run_part() {
    local name=$1 limit=$2
    shift 2
    local left=$((BUDGET - ($(date +%s) - START)))
    if ((limit > left)); then limit=$left; fi
    if ((limit < 15)); then
        SUMMARY+=("$(printf '%-13s NOT RUN (the %ss budget was spent)' "$name" "$BUDGET")")
        return
    fi
    echo "== $name (limit ${limit}s): $*"
    local t0=$(date +%s)
    timeout --kill-after=15 "$limit" "$@" >"$OUT/$name.log" 2>&1
    local rc=$? took=$(($(date +%s) - t0))
    local verdict="ok"
    if ((rc == 124 || rc == 137)); then
        verdict="TIMED OUT after ${limit}s"
    elif ((rc != 0)); then
        verdict="FAILED (exit $rc)"
    fi
    local last
    last=$(grep -E "passed|failed|skipped|warmed|error|Error" "$OUT/$name.log" | tail -n 1)
    SUMMARY+=("$(printf '%-13s %-22s %4ss  %s' "$name" "$verdict" "$took" "$last")")
    echo "   $verdict in ${took}s; log: $OUT/$name.log"
}

if "$PY" -c "import pytest" 2>/dev/null; then
    TEST=("$PY" -m pytest -v -rfEs -p no:cacheprovider)
else
    TEST=("$PY" benchmarks/minitest.py)
fi

run_part env 60 bash -c "nvidia-smi; '$PY' -c 'import sys, torch, triton; print(sys.version); \
print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, torch.cuda.get_device_name(0)); \
print(\"triton\", triton.__version__)'"

SHAPES=(8,64,56,56 2,256,200,304 2,1024,50,76)
run_part warm 90 "$PY" benchmarks/warm_kernels.py --shapes "${SHAPES[@]}" \
    --dtypes float32 bfloat16 --layouts contiguous channels_last
run_part bench 240 "$PY" benchmarks/bench_layers.py --device cuda --world-sizes 1 \
    --shapes "${SHAPES[@]}" --dtypes float32 bfloat16 \
    --layouts contiguous channels_last --layers bn gn sn sync_sn sync_bn ssn \
    --warmup 5 --repeat 20 --json "$OUT/bench_layers.json" --markdown "$OUT/bench_layers.md"

CHECKS="triton_backend_is_selected or kernels_per_training_call or three_kernels_each_way \
or host_synchronization or cuda_graph or reduce_overhead"
run_part cuda_checks 140 "${TEST[@]}" tests/test_cuda.py -k "$CHECKS"
run_part cuda_tests 120 "${TEST[@]}" tests/test_cuda.py -k "not ($CHECKS)"
run_part triton_tests 150 "${TEST[@]}" tests/test_triton.py -k "not compile_for_sm90"

{
    echo "syncsn GPU check, $(date -u +%Y-%m-%dT%H:%M:%SZ), $(($(date +%s) - START))s of ${BUDGET}s"
    printf '%s\n' "${SUMMARY[@]}"
} | tee "$OUT/summary.txt"
