#!/usr/bin/env bash
# Every GPU check and benchmark in one command, for a lent GPU machine with
# torch and triton installed (nothing to install: mha runs from src/).
#
#     bash benchmarks/gpu_all.sh [LOGDIR [STEP...]]    # LOGDIR defaults to gpu-logs
#
# STEPs (default: all, in this order): checks profile tune dense train varlen weights.
# The checks (compiled kernels, and the module on CUDA) run in parallel processes,
# as compiling the kernels dominates them and takes CPU, not GPU; the timed steps
# follow one at a time on an otherwise idle GPU. Each step has its own time limit,
# so one that hangs or fails leaves the others' results. Everything goes to
# LOGDIR/gpu.log.
set -u
logdir=${1:-gpu-logs}
shift $(($# > 0 ? 1 : 0))
steps=${*:-checks profile tune dense train varlen weights}
mkdir -p "$logdir"
log="$logdir/gpu.log"
: >"$log"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
bench="$py benchmarks/gpu.py"

run() {  # run LIMIT_S NAME COMMAND...: one step, its exit status logged
    local limit=$1 name=$2
    shift 2
    local start=$SECONDS
    timeout "$limit" "$@" >>"$log" 2>&1
    echo "### $name: exit $? in $((SECONDS - start)) s" | tee -a "$log"
}

checks() {
    local start=$SECONDS tmp
    tmp=$(mktemp -d)
    for case in 0 1 2 3 4 5; do
        timeout 130 $bench --sections check --check-cases $case >"$tmp/check$case" 2>&1 &
    done
    timeout 130 $bench --sections module >"$tmp/module" 2>&1 &
    wait
    cat "$tmp"/check* "$tmp/module" >>"$log"
    echo "### checks (parallel): $(cat "$tmp"/* | grep -c PASS) PASS, $(cat "$tmp"/* | grep -c FAIL) FAIL in $((SECONDS - start)) s" | tee -a "$log"
}

{
    nvidia-smi -L
    $py -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
} >>"$log" 2>&1

for step in $steps; do
    case $step in
        checks) checks ;;
        profile) run 80 profile $bench --sections profile ;;
        tune) run 80 tune $bench --sections tune ;;
        dense) run 80 dense $bench --sections dense --no-flex --lengths 1024 4096 8192 16384 ;;
        train) run 50 train $bench --sections train --lengths 4096 16384 ;;
        varlen) run 100 varlen $bench --sections varlen --lengths 1024 4096 ;;
        weights) run 50 weights $bench --sections weights --lengths 1024 4096 ;;
        *) echo "unknown step $step" | tee -a "$log" ;;
    esac
done
grep -E "^(  |    |==|###)" "$log" | grep -vE "^\s+PASS" | tail -c 11000
