#!/usr/bin/env bash
# The GPU checks and measurements of one device session, in stages that fit the device tool's
# 10-minute calls (the build folder survives between calls on a warm machine):
#
#   bash scripts/gpu_session.sh build   # configure + build against the machine's LibTorch 2.x + CUDA
#   bash scripts/gpu_session.sh tests   # the *_CUDA gtests (parity on the card, TF32 off)
#   bash scripts/gpu_session.sh train   # issue 4: train_style at SD 1.5 size, 512 px, bf16, SCEdit and LoRA
#   bash scripts/gpu_session.sh bench   # issue 5: memory_vs_lora baseline and each lever, one at a time
#
# Stages can be chained (`build tests train`). Results go to $OUT (default ./gpu-results), at most
# eight files as the device tool returns them: build.log, tests.log, train.log, bench.md, bench.json.
# CLI11 and stb are not installed on the GPU machine: their headers are taken from
# $SCEDIT_EXTRA_INCLUDE (default .deps/include, filled by `cp -r /usr/include/CLI /usr/include/stb`).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu-results}
BUILD=${BUILD:-$PWD/build-gpu}
EXTRA_INCLUDE=${SCEDIT_EXTRA_INCLUDE:-$PWD/.deps/include}
mkdir -p "$OUT"

configure() {  # extra compiler flags
  cmake -S . -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=Release -DCMAKE_PREFIX_PATH="$torch" \
    -DCMAKE_CXX_FLAGS="-I$EXTRA_INCLUDE $1" -DSCEDIT_BUILD_DOCS=OFF
}

build_targets() {
  cmake --build "$BUILD" -j"$(nproc)" --target memory_vs_lora train_style test_adapters \
    test_safetensors test_weights test_models test_train
}

stage_build() {
  torch=$(python3 -c 'import torch;print(torch.utils.cmake_prefix_path)')
  {
    date -u
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    configure "" && build_targets || {
      # The CUDA-graph code (examples/common/graphed_step.hpp) was written without a GPU
      # machine: if it is what fails, build everything else without it.
      echo "== build failed: again with -DSCEDIT_NO_CUDA_GRAPHS"
      configure "-DSCEDIT_NO_CUDA_GRAPHS" && build_targets
    }
  } > "$OUT/build.log" 2>&1
  local rc=$?
  grep -E "error|warning" "$OUT/build.log" | head -40
  echo "build: exit $rc"
  return $rc
}

stage_tests() {
  (cd "$BUILD" && ctest -R "CUDA|Lean|Attention|Foreach|Capturable|Graphed|ChannelsLast" --output-on-failure --timeout 300) > "$OUT/tests.log" 2>&1
  local rc=$?
  tail -25 "$OUT/tests.log"
  return $rc
}

stage_train() {
  local method
  for method in scedit lora; do
    echo "== train_style --method $method ($(date -u))"
    "$BUILD/bin/train_style" --model random:sd15 --precision bf16 --batch-size 8 --max-steps 36 \
      --cache --method "$method" --log-every 6 --output "$BUILD/train_$method"
    echo "exit $?"
  done > "$OUT/train.log" 2>&1
  grep -E "==|step +36|peak|images/s|exit" "$OUT/train.log" | tail -20
}

stage_bench() {
  local bench="$BUILD/bin/memory_vs_lora"
  local common=(--precisions bf16w --steps 4)
  local rows=()
  run_bench() {  # name, then memory_vs_lora flags
    local name=$1
    shift
    echo "== $name: memory_vs_lora ${common[*]} $*" >> "$OUT/bench.md"
    "$bench" "${common[@]}" "$@" --json "$BUILD/bench_$name.json" >> "$OUT/bench.md" 2>&1
    rows+=("$BUILD/bench_$name.json")
  }
  : > "$OUT/bench.md"
  # Most telling first: a stage cut short by the call's time limit still returns what it wrote.
  run_bench baseline --batch-sizes 30,1 --optimizer per-tensor
  run_bench all --batch-sizes 30,1 --lean all
  run_bench cuda-graph --methods scedit --batch-sizes 1,10 --cuda-graph
  run_bench all-recompute --methods scedit --batch-sizes 30 --lean all --recompute
  run_bench foreach --methods scedit --batch-sizes 30,1
  run_bench channels-last --methods scedit --batch-sizes 30,1 --channels-last
  run_bench norm-dtype --methods scedit --batch-sizes 30 --lean norm-dtype
  run_bench norm-silu --methods scedit --batch-sizes 30 --lean norm-silu
  run_bench geglu --methods scedit --batch-sizes 30 --lean geglu
  python3 - "$OUT/bench.json" "${rows[@]}" <<'EOF'
import json, sys
rows = []
for path in sys.argv[2:]:
    try:
        rows += json.load(open(path))
    except (OSError, ValueError) as e:
        print(f"{path}: {e}")
json.dump(rows, open(sys.argv[1], "w"), indent=1)
EOF
  cat "$OUT/bench.md"
}

[ $# -gt 0 ] || set -- build tests train bench
status=0
for stage in "$@"; do
  case $stage in
    build | tests | train | bench) "stage_$stage" || status=1 ;;
    *) echo "unknown stage '$stage' (build, tests, train, bench)" >&2; exit 2 ;;
  esac
done
exit $status
