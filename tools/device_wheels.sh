#!/usr/bin/env bash
# Fetches, on this machine, the wheels the GPU machine's image lacks (../.library/device:
# it has jax, flax, optax, orbax, torch and transformers, but not ml_collections or grain)
# into .whl/ (git-ignored), for tools/device_bench.sh; `run` carries it with carry=[".whl"].
# The image's Python is 3.12; the versions are our pins (requirements.txt).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
rm -rf .whl && mkdir .whl
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
  ml-collections==1.1.0 grain==0.2.18 array-record==0.8.6 portpicker==1.6.0
ls -l .whl
