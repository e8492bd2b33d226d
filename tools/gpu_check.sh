#!/usr/bin/env bash
# Everything dnnpar checks on a real GPU, in one go (a few minutes on an H100):
#   bash tools/gpu_check.sh [OUTDIR] [STEP ...]
# STEP is any of: info tests bench sparse train memcheck racecheck controls tc (default: info tests bench sparse train).
# tc: the tensor-core GEMMs alone (their gpu tests, racecheck on them, the gemm benchmark rows), for a short session.
# Uses the CuPy already installed (PYTHONPATH=. when dnnpar is not installed). Each step is
# time-limited and its log lands in OUTDIR; a step's failure does not stop the next one.
set -u
OUTDIR=${1:-gpu-check}; shift || true
STEPS=${*:-info tests bench sparse train}
mkdir -p "$OUTDIR"
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD PYTHONUNBUFFERED=1 MPLBACKEND=Agg
export DNNPAR_CACHE=${DNNPAR_CACHE:-/tmp/dnnpar-cache}
PY=${PYTHON:-python3}
DATA=${DNNPAR_DATA:-.gpudata}
step() { local name=$1 limit=$2; shift 2; echo "=== $name ($(date -u +%FT%TZ))"; 
         timeout "$limit" "$@" >"$OUTDIR/$name.log" 2>&1; local rc=$?; tail -n 25 "$OUTDIR/$name.log";
         echo "=== $name rc=$rc"; echo "$name $rc" >>"$OUTDIR/status.txt"; }
for s in $STEPS; do case $s in
  info) step info 30 bash -c "nvidia-smi; nvcc --version; $PY -c 'import cupy, numpy; print(cupy.__version__, numpy.__version__); cupy.show_config()'" ;;
  tests) step tests 200 $PY -m pytest -m gpu -q -rfE -p no:cacheprovider tests ;;
  bench) step bench 160 $PY benchmarks/kernels.py --backend cuda --out "$OUTDIR/bench" ;;
  sparse) step sparse 90 $PY benchmarks/sparse_inference.py --backend cuda --out "$OUTDIR/sparse" ;;
  train) step train 100 $PY -m dnnpar.cli train --model lenet5 --backend cuda --epochs 3 --subset full \
           --data-dir "$DATA" --checkpoint /tmp/lenet5-gpu.npz --plot "$OUTDIR/lenet5-gpu.png" --quiet ;;
  memcheck) step memcheck 280 compute-sanitizer --tool memcheck --target-processes all --error-exitcode 9 \
           $PY -m pytest -m gpu -q -p no:cacheprovider tests/test_ops.py tests/test_ops_backward.py ;;
  racecheck) step racecheck 280 compute-sanitizer --tool racecheck --racecheck-report analysis --target-processes all \
           --error-exitcode 9 $PY -m pytest -m gpu -q -p no:cacheprovider tests/test_ops.py -k "gemm or depthwise or spmv or spmm" ;;
  controls)  # planted bugs: the sanitizer must flag both, else its clean reports above prove nothing
    step control-oob 60 compute-sanitizer --tool memcheck --error-exitcode 9 $PY tools/sanitizer_control.py oob
    step control-race 60 compute-sanitizer --tool racecheck --error-exitcode 9 $PY tools/sanitizer_control.py race ;;
  tc) step tc-tests 120 $PY -m pytest -m gpu -q -rfE -p no:cacheprovider tests/test_ops.py -k "tensor_cores"
      step tc-racecheck 200 compute-sanitizer --tool racecheck --racecheck-report analysis --error-exitcode 9 \
           $PY -m pytest -m gpu -q -p no:cacheprovider tests/test_ops.py -k "tensor_cores and 129x67x100"
      step tc-bench 160 $PY benchmarks/kernels.py --backend cuda --only gemm --out "$OUTDIR/bench-tc" ;;
  *) echo "unknown step $s"; exit 2 ;;
esac; done
cat "$OUTDIR/status.txt"
