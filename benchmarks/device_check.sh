#!/usr/bin/env bash
# Everything that needs a GPU, in one run: build the extension against this machine's torch, run every CUDA test
# (the top-k/entropy ones once per kernel variant), compare the kernel variants, then every GPU benchmark row, and
# leave a log and JSON results in OUTDIR. Steps run cheapest and most important first, so a run cut short still
# returns the essentials. On a GPU machine it fails loudly (exit 1 and a line starting with "!!!") when the CUDA
# kernels did not build or a CUDA test was skipped. Without a GPU it dry-runs: the CPU kernel tests and the CPU modes
# of the benchmarks with tiny budgets, saying what it skipped.
#
#   bash benchmarks/device_check.sh OUTDIR
#
# Environment: SKIP="train decode" leaves out steps by name (build, kernel_tests, variants, kernel_bench, cuda_tests,
# decode, decode_sampling, decode_llada, decode_mdlm, decode_modes, decode_modes_llada, train); SKIP=build uses the source tree as it is (with
# its in-place build) instead of installing it. DECODE_BUDGET_S and TRAIN_BUDGET_S bound the timed part of those benchmarks.
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
started=$(date +%s)
step() { echo; echo "=== $* ($(date -u +%H:%M:%S), +$(($(date +%s) - started)) s)"; }
fail() { echo "!!! $*"; status=1; }
run() { "$@" || fail "failed ($?): $*"; }
wanted() { [[ " ${SKIP:-} " != *" $1 "* ]] || { echo "skipped: SKIP contains $1"; false; }; }
# pytest that must neither fail nor skip anything (on the GPU machine a skip means the CUDA kernels are missing).
pytest_all_run() {
    local report
    report=$($py -m pytest -q -rs --tb=short -p no:cacheprovider "$@" 2>&1)
    local rc=$?
    echo "$report" | tail -n 25
    [ $rc -eq 0 ] || fail "CUDA tests failed (pytest exit $rc): $*"
    if echo "$report" | grep -qE "^SKIPPED|[0-9]+ skipped"; then fail "CUDA tests were skipped: $*"; fi
}

step "environment"
gpu=$($py -c "import torch; print(torch.cuda.get_device_name() if torch.cuda.is_available() else '')")
$py -c "import sys, torch; print('python', sys.version.split()[0], '| torch', torch.__version__, '| cuda', torch.version.cuda, '| gpu:', torch.cuda.get_device_name() if torch.cuda.is_available() else None)"
git -C "$repo" log -1 --format='commit %H (%cd)' 2>/dev/null
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv
if [ -n "$gpu" ]; then
    export CUDA_HOME=${CUDA_HOME:-$(dirname "$(dirname "$(command -v nvcc)")")}
    cc=$($py -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
    export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$cc}
    echo "building for sm_${cc/./} with CUDA_HOME=$CUDA_HOME"
    quick=""
else
    echo "no GPU: dry run (CPU kernel tests, CPU modes of the benchmarks with small budgets; GPU steps skipped)"
    quick="--quick"
fi

step "build (pip install --no-build-isolation --no-deps .)"
if wanted build; then
    export MAX_JOBS=${MAX_JOBS:-$(nproc)}  # the variants' kernels are separate files: they compile in parallel
    (cd "$repo" && $py -m pip install --no-build-isolation --no-deps -q .) || { echo "!!! build failed: nothing else can be checked"; exit 1; }
else
    export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
fi
# Run everything from $out so that the installed package, not the source tree, is imported (unless SKIP=build).
cd "$out"
$py -c "import softmask_ext.ops as o; print('extension loaded:', o.EXTENSION_LOADED, '| cuda kernels:', o.CUDA_KERNELS, '| top-k variants:', ', '.join(o.TOPK_VARIANTS), '| default:', o.DEFAULT_TOPK_VARIANT)"
if [ -n "$gpu" ] && ! $py -c "import softmask_ext.ops as o, sys; sys.exit(0 if o.CUDA_KERNELS else 1)"; then
    echo "!!! the CUDA kernels were not built: every CUDA test would skip, nothing GPU-side can be checked"
    exit 1
fi

step "1. CUDA kernel tests, every top-k/entropy variant (tests/test_ops_cuda.py)"
if ! wanted kernel_tests; then :
elif [ -n "$gpu" ]; then
    pytest_all_run --maxfail=8 "$repo/tests/test_ops_cuda.py" -m cuda
else
    echo "no GPU: the CPU kernel tests and the op contract instead"
    run $py -m pytest -q -x -p no:cacheprovider "$repo/tests/test_ops.py" "$repo/tests/test_ops_contract.py"
fi

step "2. top-k/entropy variants side by side (bf16, V 152064, rows 1024/4096, k 1/3/5)"
if ! wanted variants; then :
elif [ -n "$gpu" ]; then
    run $py "$repo/benchmarks/kernel_bench.py" --variants --out "$out/kernel_variants.json"
else
    echo "skipped: no GPU"
fi

step "3. kernel benchmark (every shape, both ops)"
wanted kernel_bench && run $py "$repo/benchmarks/kernel_bench.py" $quick --out "$out/kernel_bench.json"

step "4. other CUDA tests (model, decoding with CUDA graphs on and off, training)"
if ! wanted cuda_tests; then :
elif [ -n "$gpu" ]; then
    pytest_all_run "$repo/tests" -m cuda --ignore "$repo/tests/test_ops_cuda.py"
else
    echo "skipped: no GPU"
fi

step "5. decode benchmark"
wanted decode && run $py "$repo/benchmarks/decode_bench.py" $quick --budget-s "${DECODE_BUDGET_S:-60}" --out "$out/decode_bench.json"

step "6. decode benchmark, the paper's sampling (temperature 0.1, top-p 0.9)"
wanted decode_sampling && run $py "$repo/benchmarks/decode_bench.py" $quick --temperature 0.1 --top-p 0.9 \
    --budget-s "${DECODE_BUDGET_S:-60}" --out "$out/decode_bench_sampling.json"

step "6b. decode benchmark, LLaDA (LLaDA-8B shape, bf16): the SM share of a step"
wanted decode_llada && run $py "$repo/benchmarks/decode_bench.py" --family llada $quick \
    --budget-s "${DECODE_BUDGET_S:-60}" --out "$out/decode_bench_llada.json"

step "6c. MDLM sampling step (169M DiT, length 1024, batch 16, bf16): the SM share of a step"
wanted decode_mdlm && run $py "$repo/benchmarks/decode_bench.py" --family mdlm $quick --out "$out/decode_mdlm.json"

step "7. decoding modes: Dream's loop, plain, block+prefix, block+dual (bf16, Dream-7B / LLaDA-8B shape)"
modes_tokens=$([ -n "$gpu" ] && echo 1024 || echo 64)  # the CPU dry run: a short generation
wanted decode_modes && run $py "$repo/benchmarks/decode_bench.py" --modes dream,plain,prefix,dual $quick \
    --new-tokens "$modes_tokens" --block-length 32 --threshold 0.9 --out "$out/decode_modes.json"
wanted decode_modes_llada && run $py "$repo/benchmarks/decode_bench.py" --family llada --modes plain,prefix,dual $quick \
    --new-tokens "$modes_tokens" --block-length 32 --threshold 0.9 --out "$out/decode_modes_llada.json"

step "8. train benchmark"
wanted train && run $py "$repo/benchmarks/train_bench.py" $quick --budget-s "${TRAIN_BUDGET_S:-40}" --out "$out/train_bench.json"

step "done (status $status, $(($(date +%s) - started)) s)"
[ $status -eq 0 ] || echo "!!! some steps failed: see the lines starting with !!! above"
exit $status
