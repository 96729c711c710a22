#!/usr/bin/env bash
# Installs the dependencies, builds everything (library checks, tests, examples, benches, docs
# with warnings as errors) and runs the whole test suite with ctest. BUILD_DIR overrides ./build.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
build=${BUILD_DIR:-build}
cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DSCEDIT_DOCS_WARN_AS_ERROR=ON
cmake --build "$build" -j2
cmake --build "$build" --target docs
# ctest runs two tests at a time: each computes on half of the CPUs (examples/common/cpu_threads.hpp),
# unless the caller chose OMP_NUM_THREADS.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$((($(nproc) + 1) / 2))}
ctest --test-dir "$build" --output-on-failure -j2
