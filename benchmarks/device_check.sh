#!/usr/bin/env bash
# The one prepared run for a GPU machine: the CUDA tests, then the ImageNet benchmarks on
# CUDA (EI against one forward pass). It uses the Python that holds torch there and does not
# install anything (the package runs from this checkout), so it needs no network.
#
#   bash benchmarks/device_check.sh            # results in $OUT, else ./device-out
#   python benchmarks/make_table.py bench.json <out>/gpu_bench.json   # merge into the docs
#
# Each step has its own time limit, so that one slow step still leaves the others' output.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-device-out}
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
py=${PYTHON:-python3}

{
    date -u
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
    $py -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
} 2>&1 | tee "$out/device.txt"

timeout "${TESTS_S:-240}" $py -m pytest -q -p no:cacheprovider -m cuda -rs tests \
    2>&1 | tee "$out/cuda_tests.log"
tests_rc=${PIPESTATUS[0]}

timeout "${BENCH_S:-240}" $py -m pytest -q -p no:cacheprovider -rs \
    benchmarks/test_bench_imagenet.py -k cuda --benchmark-enable \
    --benchmark-json="$out/gpu_bench.json" 2>&1 | tee "$out/gpu_bench.log"
bench_rc=${PIPESTATUS[0]}

echo "cuda tests: exit $tests_rc; gpu benchmark: exit $bench_rc" | tee -a "$out/device.txt"
exit $(( tests_rc || bench_rc ))
