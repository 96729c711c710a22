#!/usr/bin/env bash
# The GPU checks and measurements of one device session, in stages meant to run in ONE device call
# (a session has 15 minutes of device time, a machine start included):
#
#   bash scripts/gpu_session.sh build   # configure + build every target against the machine's LibTorch 2.x + CUDA
#   bash scripts/gpu_session.sh tests   # every *_CUDA gtest (parity on the card, TF32 off)
#   bash scripts/gpu_session.sh kernels # lean_ops_bench: GroupNorm + SiLU, GEGLU, LayerNorm plain, lean, fused
#   bash scripts/gpu_session.sh bench   # issue 5: memory_vs_lora baseline, each lever, the best together
#   bash scripts/gpu_session.sh controlnet # memory_vs_controlnet at SD 1.5 size: CSC-Tuner (kernel 1, 3) vs ControlNet, bf16w and fp32, batches 1, 8, 30
#   bash scripts/gpu_session.sh train   # issue 4: train_style at SD 1.5 size, 512 px, bf16, SCEdit and LoRA
#   bash scripts/gpu_session.sh profile # where a batch-30 SCEdit step's time goes, operator by operator
#   bash scripts/gpu_session.sh sdxl    # issue 19: SDXL at 1024 px, bf16w, batches 1, 4, 8: SCEdit vs LoRA, then
#                                       # memory_vs_controlnet (CSC-Tuner vs ControlNet); bench/RESULTS.md's prediction
#   bash scripts/gpu_session.sh peer    # issue 18: the Python peer's training step on this card (bf16w, SCEdit
#                                       # batches 30 and 1, eager and torch.compile; LoRA batch 30, eager)
#   bash scripts/gpu_session.sh generate # issue 18: generate_speed (SD 1.5, 512 px, DDIM 50 with guidance,
#                                       # fp16 and bf16, batches 1 and 8; graphed, then eager, then graphed
#                                       # with the VAE in float32), then the peer's, eager and compiled
#   bash scripts/gpu_session.sh distributed # issue 15: distributed_scaling with NCCL, 1 vs 2 processes on the
#                                       # one GPU (the reduction's overhead; NCCL may refuse two ranks on one card)
#
# What the open issues still need from a GPU (2026-12-07), most telling first, as calls on one warm
# machine (the build folder stays between calls; each call under 10 minutes, SCEDIT_DEADLINE set
# to the call's start + 560 s):
#   1. build tests generate   # issue 18: the graphed and lever *_CUDA tests, generation beside the peer
#   2. bench peer             # issue 18: the training defaults (now under a CUDA graph) beside the peer
#   3. controlnet             # issue 14: CSC-Tuner vs ControlNet at SD 1.5 size
#   4. sdxl, then distributed # issues 19 and 15
#
# The sdxl stage after a build on a fresh machine, inside one 10-minute call:
#   SCEDIT_GPU_TARGETS="memory_vs_lora memory_vs_controlnet" SCEDIT_DEADLINE=$(($(date +%s) + 560)) \
#     bash scripts/gpu_session.sh build sdxl
# (SCEDIT_SDXL_CONFIG and SCEDIT_SDXL_BATCHES run the same stage at another size, e.g.
# reduced-sdxl and 1 on the CPU with BUILD=build, to check its commands.)
#
# Stages chain (`build tests kernels bench profile train`, the default). SCEDIT_DEADLINE (seconds since the epoch)
# stops starting benchmark rows and the training run after that time, so that one call ends inside
# its limit with what it measured so far. Results go to $OUT (default ./gpu-results), at most eight
# files as the device tool returns them: build.log, tests.log, kernels.md, bench.md, bench.json,
# profile.md, train.log (and controlnet.md, controlnet.json from the controlnet stage, sdxl.md and
# sdxl.json from the sdxl stage, distributed.md and distributed.json from the distributed stage,
# peer.md and its JSON rows from the peer stage, generate.md and generate*.json from the generate
# stage, which the default chain leaves out: name them, e.g. `build sdxl`).
# The peer stages read the Python peer from $SCEDIT_PEER_DIR (default .deps/peer, filled by
# `cp -r ../shared/peer .deps/peer`; carry .deps): ../shared does not travel to the GPU machine.
# Compare its rows with ours only from the same call (the same card, the same hour).
# CLI11 and stb are not installed on the GPU machine: their headers are taken from
# $SCEDIT_EXTRA_INCLUDE (default .deps/include, filled by `cp -r /usr/include/CLI /usr/include/stb`;
# carry .deps). The tests' reference data travel with the repository (tests/data).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu-results}
BUILD=${BUILD:-$PWD/build-gpu}
EXTRA_INCLUDE=${SCEDIT_EXTRA_INCLUDE:-$PWD/.deps/include}
DEADLINE=${SCEDIT_DEADLINE:-0}
mkdir -p "$OUT"

# True (0) while at least $1 seconds (default 0) are left before SCEDIT_DEADLINE, or none is set.
time_left() { [ "$DEADLINE" -eq 0 ] || [ $(($(date +%s) + ${1:-0})) -lt "$DEADLINE" ]; }

configure() {  # extra compiler flags, then extra CMake arguments
  cmake -S . -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=Release -DCMAKE_PREFIX_PATH="$torch" \
    -DCMAKE_CXX_FLAGS="-I$EXTRA_INCLUDE $1" -DSCEDIT_BUILD_DOCS=OFF "${@:2}"
}

# Every target, so that every *_CUDA test runs (SCEDIT_GPU_TARGETS names fewer). The fused
# kernels must build: their absence or failure is an error to fix, not a reason to measure
# without them. Writes into build.log, whose configure lines it reads.
build_all() {
  configure "" || return 1
  grep -q "scedit: fused CUDA kernels for" "$OUT/build.log" ||
    { echo "error: the fused CUDA kernels are not configured (no nvcc found?)"; return 1; }
  cmake --build "$BUILD" -j"$(nproc)" ${SCEDIT_GPU_TARGETS:+--target $SCEDIT_GPU_TARGETS}
}

stage_build() {
  torch=$(python3 -c 'import torch;print(torch.utils.cmake_prefix_path)')
  {
    date -u
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    build_all
  } > "$OUT/build.log" 2>&1
  local rc=$?
  grep -E "error|warning" "$OUT/build.log" | head -40
  echo "build: exit $rc, $SECONDS s since the script started"
  return $rc
}

stage_tests() {
  (cd "$BUILD" && ctest -R "_CUDA" --output-on-failure --timeout 180) > "$OUT/tests.log" 2>&1
  local rc=$?
  tail -25 "$OUT/tests.log"
  echo "tests: $SECONDS s since the script started"
  return $rc
}

stage_train() {
  local method
  for method in scedit lora; do
    time_left 90 || { echo "== train_style --method $method: skipped, too near SCEDIT_DEADLINE"; continue; }
    echo "== train_style --method $method ($(date -u))"
    timeout 150 "$BUILD/bin/train_style" --model random:sd15 --precision bf16 --batch-size 8 --max-steps 36 \
      --cache --method "$method" --log-every 6 --output "$BUILD/train_$method"
    echo "exit $?"
  done > "$OUT/train.log" 2>&1
  grep -E "==|step +36|peak|images/s|exit" "$OUT/train.log" | tail -20
}

stage_kernels() {
  timeout 120 "$BUILD/bin/lean_ops_bench" --benchmark_min_time=0.2 > "$OUT/kernels.md" 2>&1
  local rc=$?
  grep -E "ForwardBackward" "$OUT/kernels.md" | head -30
  return $rc
}

stage_bench() {
  local bench="$BUILD/bin/memory_vs_lora"
  local common=(--precisions bf16w --steps 6)
  local rows=()
  run_bench() {  # name, then memory_vs_lora flags
    local name=$1
    shift
    if ! time_left; then
      echo "== $name: skipped, past SCEDIT_DEADLINE" >> "$OUT/bench.md"
      return
    fi
    echo "== $name: memory_vs_lora ${common[*]} $* ($(date -u +%T))" >> "$OUT/bench.md"
    timeout 150 "$bench" "${common[@]}" "$@" --json "$BUILD/bench_$name.json" >> "$OUT/bench.md" 2>&1 ||
      echo "exit $?" >> "$OUT/bench.md"
    rows+=("$BUILD/bench_$name.json")
  }
  : > "$OUT/bench.md"
  # Most telling first: rows past the deadline are skipped, and what ran is kept. (The v0.3 to
  # v0.6 rows of bench/RESULTS.md came from this stage at commits b4576d5, 342a860, ce1b1ce and
  # 86bb28a, with the rows listed there.)
  # The defaults as a plain run gets them (norm-dtype + the fused kernels where they run, the step
  # under a CUDA graph), the same eager, with ff-recompute (both methods), and LoRA's row for the
  # memory ratio.
  run_bench default --methods scedit --batch-sizes 30,1
  run_bench default-eager --methods scedit --batch-sizes 30,1 --cuda-graph off
  run_bench default-ff --batch-sizes 30 --lean default,ff-recompute
  run_bench default-lora --methods lora --batch-sizes 30
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

# bench/RESULTS.md v0.7: one run per precision (the default levers, which the ControlNet gets too),
# bf16w first, the most telling; a precision past SCEDIT_DEADLINE is skipped, and what ran is kept.
stage_controlnet() {
  local precision rows=()
  : > "$OUT/controlnet.md"
  for precision in bf16w fp32; do
    if ! time_left 60; then
      echo "== $precision: skipped, too near SCEDIT_DEADLINE" >> "$OUT/controlnet.md"
      continue
    fi
    echo "== memory_vs_controlnet --config sd15 --precisions $precision --batch-sizes 1,8,30 ($(date -u +%T))" >> "$OUT/controlnet.md"
    timeout 240 "$BUILD/bin/memory_vs_controlnet" --config sd15 --precisions "$precision" --batch-sizes 1,8,30 \
      --json "$OUT/controlnet_$precision.json" >> "$OUT/controlnet.md" 2>&1 || echo "exit $?" >> "$OUT/controlnet.md"
    [ -f "$OUT/controlnet_$precision.json" ] && rows+=("$OUT/controlnet_$precision.json")
  done
  python3 - "$OUT/controlnet.json" "${rows[@]}" <<'EOF'
import json, os, sys
rows = []
for path in sys.argv[2:]:
    rows += json.load(open(path))
    os.remove(path)  # one file back: the device tool returns at most eight
json.dump(rows, open(sys.argv[1], "w"), indent=1)
EOF
  cat "$OUT/controlnet.md"
}

# Issue 19: SDXL base at 1024 px (128x128 latents, with its added conditioning), bf16w, the default
# levers, batches 1, 4, 8 (a batch that runs out of memory ends its bench: the smaller rows come
# first and are printed). memory_vs_lora first (SCEdit against LoRA),
# then memory_vs_controlnet (CSC-Tuner with SDXL's hint encoder against SDXL's ControlNet); a
# bench not started 150 s before SCEDIT_DEADLINE is skipped, one started runs until the deadline
# at most, and the rows each printed are kept in sdxl.md even where its timeout cut it short (the
# JSON is written at the end of a run).
stage_sdxl() {
  local config=${SCEDIT_SDXL_CONFIG:-sdxl} batches=${SCEDIT_SDXL_BATCHES:-1,4,8} bench limit rows=()
  local flags=(--config "$config" --precisions bf16w --batch-sizes "$batches" --warmup 2 --steps 4)
  : > "$OUT/sdxl.md"
  for bench in memory_vs_lora memory_vs_controlnet; do
    if ! time_left 150; then
      echo "== $bench: skipped, too near SCEDIT_DEADLINE" >> "$OUT/sdxl.md"
      continue
    fi
    limit=270  # building SDXL's UNet (and a ControlNet per row) on the host takes its share
    [ "$DEADLINE" -gt 0 ] && [ $((DEADLINE - $(date +%s))) -lt $limit ] && limit=$((DEADLINE - $(date +%s)))
    echo "== $bench ${flags[*]} ($(date -u +%T), at most $limit s)" >> "$OUT/sdxl.md"
    timeout "$limit" "$BUILD/bin/$bench" "${flags[@]}" --json "$OUT/sdxl_$bench.json" >> "$OUT/sdxl.md" 2>&1 ||
      echo "exit $?" >> "$OUT/sdxl.md"
    [ -f "$OUT/sdxl_$bench.json" ] && rows+=("$OUT/sdxl_$bench.json")
  done
  python3 - "$OUT/sdxl.json" "${rows[@]}" <<'EOF'
import json, os, sys
rows = []
for path in sys.argv[2:]:
    for row in json.load(open(path)):
        row["bench"] = os.path.basename(path)[len("sdxl_"):-len(".json")]
        rows.append(row)
    os.remove(path)  # one file back: the device tool returns at most eight
json.dump(rows, open(sys.argv[1], "w"), indent=1)
EOF
  cat "$OUT/sdxl.md"
}

PEER_DIR=${SCEDIT_PEER_DIR:-$PWD/.deps/peer}
# Unpacks the peer's diffusers source once (the GPU machine's Python has torch, transformers and
# peft, not diffusers).
peer_ready() {
  [ -f "$PEER_DIR/peer_memory.py" ] || { echo "error: no peer in $PEER_DIR (cp -r ../shared/peer .deps/peer)"; return 1; }
  [ -d /tmp/peer/src ] || { mkdir -p /tmp/peer && tar -xzf "$PEER_DIR/diffusers-src.tar.gz" -C /tmp/peer; }
}

# Runs the peer script $1 with the environment in the rest, appending to $OUT/$2.md, unless too
# near SCEDIT_DEADLINE (a compiled run spends minutes compiling).
run_peer() {
  local script=$1 log=$2
  shift 2
  if ! time_left 240; then
    echo "== $script $*: skipped, too near SCEDIT_DEADLINE" >> "$OUT/$log.md"
    return 0
  fi
  echo "== $script $* ($(date -u +%T))" >> "$OUT/$log.md"
  env DIFFUSERS_SRC=/tmp/peer/src OUT="$OUT" "$@" timeout 420 python3 "$PEER_DIR/$script" >> "$OUT/$log.md" 2>&1 ||
    echo "exit $?" >> "$OUT/$log.md"
}

stage_peer() {
  : > "$OUT/peer.md"
  peer_ready >> "$OUT/peer.md" 2>&1 || { cat "$OUT/peer.md"; return 1; }
  run_peer peer_memory.py peer PEER_PRECISIONS=bf16w PEER_BS=30,1 PEER_METHODS=scedit PEER_JSON=peer_eager.json
  run_peer peer_memory.py peer PEER_PRECISIONS=bf16w PEER_BS=30,1 PEER_METHODS=scedit PEER_COMPILE=1 PEER_JSON=peer_compiled.json
  run_peer peer_memory.py peer PEER_PRECISIONS=bf16w PEER_BS=30 PEER_METHODS=lora PEER_JSON=peer_lora.json
  cat "$OUT/peer.md"
}

stage_generate() {  # SCEDIT_GENERATE_CONFIG / _PRECISIONS: another size (e.g. reduced, bf16 on the CPU)
  local flags=(--config "${SCEDIT_GENERATE_CONFIG:-sd15}" --precisions "${SCEDIT_GENERATE_PRECISIONS:-fp16,bf16}"
               --batch-sizes 1,8 --steps 50 --repeat 3)
  : > "$OUT/generate.md"
  local levers
  # generate's default (UNet calls replayed from a CUDA graph, norm-dtype and the fused kernels,
  # the VAE in the row's dtype), then each step eager on the plain ATen ops, then the default with
  # the VAE in float32 (v0.10's lever: the half-precision decode).
  for levers in "--cuda-graph auto --lean default" "--cuda-graph off --lean none" \
                "--cuda-graph auto --lean default --vae float32"; do
    echo "== generate_speed ${flags[*]} $levers ($(date -u +%T))" >> "$OUT/generate.md"
    # shellcheck disable=SC2086  # $levers is two flags and their values
    timeout 300 "$BUILD/bin/generate_speed" "${flags[@]}" $levers --json "$OUT/generate_${levers##* }.json" \
      >> "$OUT/generate.md" 2>&1 || echo "exit $?" >> "$OUT/generate.md"
  done
  if peer_ready >> "$OUT/generate.md" 2>&1; then
    run_peer peer_generate.py generate GEN_DTYPES=fp16,bf16 GEN_BS=1,8 GEN_STEPS=50 GEN_REPEAT=3 PEER_JSON=peer_generate_eager.json
    run_peer peer_generate.py generate GEN_DTYPES=fp16,bf16 GEN_BS=1,8 GEN_STEPS=50 GEN_REPEAT=3 PEER_COMPILE=1 PEER_JSON=peer_generate_compiled.json
  fi
  cat "$OUT/generate.md"
}

stage_distributed() {
  local flags=(--device cuda --config sd15 --precisions bf16w --batch-size 8 --processes 1,2 --warmup 2 --steps 5)
  grep -h "scedit: .*\(c10d\|NCCL\|nccl\)" "$OUT/build.log" > "$OUT/distributed.md" 2>/dev/null
  echo "== distributed_scaling ${flags[*]} ($(date -u +%T))" >> "$OUT/distributed.md"
  timeout 300 "$BUILD/bin/distributed_scaling" "${flags[@]}" --json "$OUT/distributed.json" >> "$OUT/distributed.md" 2>&1 ||
    echo "exit $?" >> "$OUT/distributed.md"
  cat "$OUT/distributed.md"
}

stage_profile() {
  local flags=(--precisions bf16w --methods scedit --batch-sizes 30 --steps 3 --op-profile 45)
  {
    echo "== memory_vs_lora ${flags[*]} (default levers)"
    "$BUILD/bin/memory_vs_lora" "${flags[@]}"
  } > "$OUT/profile.md" 2>&1
  tail -60 "$OUT/profile.md"
}

[ $# -gt 0 ] || set -- build tests kernels bench profile train
status=0
for stage in "$@"; do
  case $stage in
    build | tests | kernels | train | bench | profile | controlnet | sdxl | distributed | peer | generate)
      "stage_$stage" || status=1 ;;
    *) echo "unknown stage '$stage' (build, tests, kernels, train, bench, profile, controlnet, sdxl, distributed, peer, generate)" >&2
       exit 2 ;;
  esac
done
exit $status
