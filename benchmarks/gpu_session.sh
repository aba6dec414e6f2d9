#!/usr/bin/env bash
# One call on a lent GPU machine (benchmarks/README.md): build the CUDA extension, run the whole test suite, run
# compute-sanitizer on a small case, then the benchmarks. Logs go to $OUT (default benchmarks/out/gpu).
# Expects, carried in .carry/dev/: pylib.tar.xz (the pure-Python packages and cp312 wheels the machine lacks, unpacked:
# nibabel, pydicom, pynrrd, xraydb + sqlalchemy, kornia + kornia_rs) and lidc-idri-0001.nii.gz (the chest CT of
# ../shared, which does not travel). Arguments are passed to benchmarks/run.py.
set -uo pipefail
OUT=${OUT:-benchmarks/out/gpu}
mkdir -p "$OUT"
tar -C /tmp -xJf .carry/dev/pylib.tar.xz && export PYTHONPATH="/tmp/pylib${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p ../shared/data/chest-ct && cp .carry/dev/lidc-idri-0001.nii.gz ../shared/data/chest-ct/
# The image's default CC/CXX (/opt/gcc) links libstdc++ statically, which setup.py refuses; use the system GCC.
export CC=/usr/bin/gcc CXX=/usr/bin/g++
export TORCHDRR_CUDA=1 TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" MAX_JOBS=16
{ nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv
  python3 -c "import torch, sys; print(sys.version.split()[0], torch.__version__, torch.version.cuda)"
  nvcc --version | tail -2; } > "$OUT/machine.txt" 2>&1
cat "$OUT/machine.txt"

if [ "${SKIP_BUILD:-0}" != 1 ]; then
  start=$(date +%s)
  python3 -m pip install --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1
  echo "build rc=$? in $(( $(date +%s) - start )) s"; tail -3 "$OUT/build.log"
fi
python3 -c "import json, torchdrr; print(json.dumps(torchdrr.build_info()))" || exit 1

start=$(date +%s)
python3 -m pytest -q -rs -p no:cacheprovider ${PYTEST_ARGS:-tests} > "$OUT/pytest.log" 2>&1
echo "pytest rc=$? in $(( $(date +%s) - start )) s"; tail -4 "$OUT/pytest.log"
grep -E "FAILED|Error" "$OUT/pytest.log" | head -20

if [ "${SKIP_SANITIZER:-0}" != 1 ]; then
compute-sanitizer --tool memcheck --error-exitcode 9 python3 -m tests.cuda_sanitize_case > "$OUT/sanitizer.log" 2>&1
echo "memcheck rc=$?"; tail -3 "$OUT/sanitizer.log"
compute-sanitizer --tool racecheck --error-exitcode 9 python3 -m tests.cuda_sanitize_case > "$OUT/racecheck.log" 2>&1
echo "racecheck rc=$?"; tail -2 "$OUT/racecheck.log"
fi

if [ "${SKIP_PHYSICS:-0}" != 1 ]; then
  python3 benchmarks/physics.py --device cuda --sizes 1240x960 ${PHYSICS_ARGS:-} > "$OUT/physics.log" 2>&1
  echo "physics bench rc=$?"; cat "$OUT/physics.log"
fi

if [ "${DATA:-1}" = 1 ]; then  # training-scale data: throughput of the DataModule, the example and generate
  python3 benchmarks/data_throughput.py > "$OUT/data.log" 2>&1; echo "data bench rc=$?"; tail -6 "$OUT/data.log"
  python3 examples/train_landmarks.py --steps 100 --size 256 --batch-size 64 --device cuda --render-on cuda \
    --log-dir /tmp/torchdrr_logs > "$OUT/example.log" 2>&1; echo "example rc=$?"; tail -3 "$OUT/example.log"
  for format in png16 tiff hdf5; do
    rm -rf "/tmp/torchdrr_gen_$format"
    python3 -m torchdrr generate "/tmp/torchdrr_gen_$format" --count "${GEN_COUNT:-8192}" --size 256 256 \
      --device cuda --format "$format" --batch-size 64 --no-progress > "$OUT/generate_$format.log" 2>&1
    echo "generate $format rc=$?"; tail -2 "$OUT/generate_$format.log"
  done
fi

if [ "${REGISTRATION:-1}" = 1 ]; then  # 2D/3D registration benchmark, with the peers when peerlib.tar.xz travels
  peers=()
  if [ -f .carry/dev/peerlib.tar.xz ]; then
    mkdir -p /tmp/carry && tar -C /tmp/carry -xJf .carry/dev/peerlib.tar.xz
    export PYTHONPATH="$PYTHONPATH:/tmp/carry/peerlib/site" PEERS_EXTRA_PATH=/tmp/carry/peerlib/fallback
    python3 benchmarks/peers/register_peers.py --check > "$OUT/peers_check.log" 2>&1; cat "$OUT/peers_check.log"
    peers=(--peers --peers-python python3)
  fi
  python3 benchmarks/registration.py --device cuda --cases "${REG_CASES:-50}" --size "${REG_SIZE:-256}" "${peers[@]}" \
    --out "$OUT/registration.json" ${REG_ARGS:-} > "$OUT/registration.log" 2>&1
  echo "registration bench rc=$?"; sed -n '/^| method/,$p' "$OUT/registration.log"
fi

if [ "${SKIP_RUN_BENCH:-0}" != 1 ]; then
  python3 benchmarks/run.py --devices cuda "$@" > "$OUT/bench.log" 2>&1
  echo "bench rc=$?"
  sed -n '/^| renderer/,$p' "$OUT/bench.log"
  cp benchmarks/out/results-*.json "$OUT/" 2>/dev/null
fi
exit 0
