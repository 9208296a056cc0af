#!/usr/bin/env bash
# The GPU table of BENCHMARKS.md in one command, on a GPU machine that has jax (CUDA build), flax, optax, orbax and
# torch but not the rest of requirements.txt (no internet needed there).
#
#   bash tools/gpu_table.sh wheels DIR   # on a connected machine: the missing wheels into DIR (about 7.5 MiB)
#   bash tools/gpu_table.sh run [DIR]    # on the GPU machine: installs DIR's wheels (if given), writes runs/gpu/
#
# 'run' takes the train step of every paper config at its paper batch in float32 (true float32) and bfloat16 beside
# the official PyTorch step (float32), then the evaluation of the full BAIR test set size (256 videos x 100 samples,
# PSNR+SSIM, then +LPIPS) in bfloat16. TensorFlow, clu and grain are not needed (the benchmark never imports them).
set -euo pipefail
cd "$(dirname "$0")/.."
# What the benchmark imports beyond jax / flax / optax / orbax / torch (their own dependencies come with those).
WHEELS=(ml_collections==1.1.0 dm_pix==0.4.5 lpips==0.1.4 tqdm==4.70.1 torchvision==0.29.1)
PYTHON="${PYTHON:-python}"

case "${1:-}" in
  wheels)
    dir="${2:?usage: bash tools/gpu_table.sh wheels DIR}"
    "$PYTHON" -m pip download --no-deps --python-version 3.11 --only-binary=:all: -d "$dir" "${WHEELS[@]}"
    du -sh "$dir"
    ;;
  run)
    if [[ -n "${2:-}" ]]; then
      "$PYTHON" -m pip install --no-index --no-deps "$2"/*.whl
    fi
    mkdir -p runs/gpu
    # JAX's persistent compilation cache: a rerun skips the 15-45 s GPU compiles of each program.
    export JAX_COMPILATION_CACHE_DIR="${JAX_COMPILATION_CACHE_DIR:-runs/gpu/jax_cache}"
    "$PYTHON" -m srvp_jax.benchmark --configs smmnist,mmnist_deterministic,kth,human,bair --dtypes float32,bfloat16 \
        --torch --steps 20 --warmup 3 --json runs/gpu/train.json | tee runs/gpu/train.txt
    "$PYTHON" -m srvp_jax.benchmark --configs bair --dtypes bfloat16 --steps 1 --warmup 0 --eval --eval_videos 256 \
        --json runs/gpu/eval_bair.json | tee runs/gpu/eval_bair.txt
    ;;
  *)
    echo "error: usage: bash tools/gpu_table.sh wheels DIR | run [DIR]" >&2
    exit 2
    ;;
esac
