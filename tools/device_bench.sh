#!/usr/bin/env bash
# The GPU benchmark of docs/benchmarks.md, "What remains to measure on H100 / H200", as one
# command for the lent machine (../.library/device), under its 10-minute limit:
#
#   tools/device_wheels.sh                      # here, once: .whl/ for the image
#   run(command="bash tools/device_bench.sh", carry=[".whl"], timeout_s=600)
#
# In the order the performance issue asks: (a) the SSD kernels, pallas_gpu against xla;
# (b) B/16 against Adventurer-B/16 forward, bf16, 224² to 2048², XLA / cuDNN / blocked
# attention beside PyTorch's SDPA; (c) the distillation step; (d) backbone + UperNet.
# Each part is its own main.py run with its own time limit, so a part that fails (a
# kernel that does not compile on the device's jax) leaves the others' figures. Each
# part's bench.json and log come back under $OUT/<part>/ (8 files at most come back).
#
# Tried on a CPU first: PYTHON=.venv/bin/python WHEELS=0 SMOKE=1 bash tools/device_bench.sh
# (the benchmark's tiny models; WHEELS=0 leaves the environment as it is).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/device_bench}
PYTHON=${PYTHON:-python3}
SMOKE=${SMOKE:+smoke,}
if [ -d .whl ] && [ "${WHEELS:-1}" = 1 ]; then
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONUNBUFFERED=1
"$PYTHON" -c "import jax, flax, torch; print('jax', jax.__version__, 'flax', flax.__version__, \
'torch', torch.__version__, jax.devices())"
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,power.draw --format=csv 2>/dev/null

part() {  # part NAME SECONDS CONFIG-ARGS...
  local name=$1 limit=$2
  shift 2
  mkdir -p "$OUT/$name"
  timeout "$limit" "$PYTHON" main.py --config "configs/bench.py:$SMOKE$1" "${@:2}" \
    --workdir "/tmp/bench_$name" >"$OUT/$name/log.txt" 2>&1
  echo "part $name: exit $? ($(tail -n 1 "$OUT/$name/log.txt"))"
  cp "/tmp/bench_$name/bench/bench.json" "$OUT/$name/" 2>/dev/null
}

part ssd 120 "parts=ssd"
part forward 240 "parts=forward" --config.bench.max_batch_limit=0  # no batch search
part train 60 "parts=train_step"
part segment 120 "parts=segment"
