#!/usr/bin/env bash
# GPU check (../shared/gpu.md): build the extension against this machine's torch, run the CUDA tests, run the kernel,
# decode and train benchmarks, and leave a log and JSON results in OUTDIR. On a machine without a GPU it dry-runs:
# it builds the CPU extension, runs the same steps in their CPU modes with tiny budgets, and says what it skipped.
#
#   bash benchmarks/device_check.sh OUTDIR
#
# Environment: SKIP="decode train" leaves out steps by name (kernel_tests, kernel_bench, cuda_tests, decode,
# decode_sampling, decode_modes, decode_modes_llada, train);
# DECODE_BUDGET_S and TRAIN_BUDGET_S bound the timed part of those two benchmarks.
set -uo pipefail
out=${1:?usage: bash benchmarks/device_check.sh OUTDIR}
mkdir -p "$out"
out=$(cd "$out" && pwd)
repo=$(cd "$(dirname "$0")/.." && pwd)
log=$out/device_check.log
exec > >(tee "$log") 2>&1
export PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
status=0
step() { echo; echo "=== $* ($(date -u +%H:%M:%S))"; }
run() { "$@" || { echo "!!! failed ($?): $*"; status=1; }; }
wanted() { [[ " ${SKIP:-} " != *" $1 "* ]] || { echo "skipped: SKIP contains $1"; false; }; }

step "environment"
gpu=$($py -c "import torch; print(torch.cuda.get_device_name() if torch.cuda.is_available() else '')")
$py -c "import sys, torch; print('python', sys.version.split()[0], '| torch', torch.__version__, '| cuda', torch.version.cuda, '| gpu:', torch.cuda.get_device_name() if torch.cuda.is_available() else None)"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv
if [ -n "$gpu" ]; then
    export CUDA_HOME=${CUDA_HOME:-$(dirname "$(dirname "$(command -v nvcc)")")}
    cc=$($py -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
    export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$cc}
    echo "building for sm_${cc/./} with CUDA_HOME=$CUDA_HOME"
    quick=""
else
    echo "no GPU: dry run (CPU build, CPU modes of the benchmarks with small budgets)"
    quick="--quick"
fi

step "build (pip install --no-build-isolation --no-deps .)"
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
cd "$repo"
$py -m pip install --no-build-isolation --no-deps -q . || { echo "!!! build failed: nothing else can be checked"; exit 1; }
# Run everything from $out so that the installed package, not the source tree, is imported.
cd "$out"
$py -c "import softmask_ext.ops as o; print('extension loaded:', o.EXTENSION_LOADED, '| cuda kernels:', o.CUDA_KERNELS)"

step "CUDA kernel tests"
if ! wanted kernel_tests; then :
elif [ -n "$gpu" ]; then
    run $py -m pytest -q --tb=short --maxfail=8 -p no:cacheprovider "$repo/tests/test_ops_cuda.py" -m cuda
else
    run $py -m pytest -q -x -p no:cacheprovider "$repo/tests/test_ops.py"
fi

step "kernel benchmark"
wanted kernel_bench && run $py "$repo/benchmarks/kernel_bench.py" $quick --out "$out/kernel_bench.json"

step "other CUDA tests (model, decoding with CUDA graphs on and off, training)"
if ! wanted cuda_tests; then :
elif [ -n "$gpu" ]; then
    run $py -m pytest -q -p no:cacheprovider "$repo/tests" -m cuda --ignore "$repo/tests/test_ops_cuda.py"
else
    echo "skipped: no GPU"
fi

step "decode benchmark"
wanted decode && run $py "$repo/benchmarks/decode_bench.py" $quick --budget-s "${DECODE_BUDGET_S:-60}" --out "$out/decode_bench.json"

step "decode benchmark, the paper's sampling (temperature 0.1, top-p 0.9)"
wanted decode_sampling && run $py "$repo/benchmarks/decode_bench.py" $quick --temperature 0.1 --top-p 0.9 \
    --budget-s "${DECODE_BUDGET_S:-60}" --out "$out/decode_bench_sampling.json"

step "fast decoding modes: Dream's loop, plain, block+prefix, block+dual (bf16, Dream-7B / LLaDA-8B shape)"
modes_tokens=$([ -n "$gpu" ] && echo 1024 || echo 64)  # the CPU dry run: a short generation
wanted decode_modes && run $py "$repo/benchmarks/decode_bench.py" --modes dream,plain,prefix,dual \
    --new-tokens "$modes_tokens" --block-length 32 --threshold 0.9 --out "$out/decode_modes.json"
wanted decode_modes_llada && run $py "$repo/benchmarks/decode_bench.py" --family llada --modes plain,prefix,dual \
    --new-tokens "$modes_tokens" --block-length 32 --threshold 0.9 --out "$out/decode_modes_llada.json"

step "train benchmark"
wanted train && run $py "$repo/benchmarks/train_bench.py" $quick --budget-s "${TRAIN_BUDGET_S:-40}" --out "$out/train_bench.json"

step "done (status $status)"
exit $status
