#!/usr/bin/env bash
# Installs what scedit needs on Debian 12 (bookworm) or later: a compiler, CMake, Ninja,
# LibTorch (CPU), the gloo headers of its c10d (training on several processes), GoogleTest, Google Benchmark, nlohmann-json, stb, CLI11, Doxygen and OpenCV's
# imgproc (optional for the build: only the Canny condition needs it). OpenBLAS (its OpenMP build, on
# LibTorch's own threads) takes over libblas.so.3, where Debian's LibTorch does its float32 matrix
# products: with the reference BLAS, float32 steps on the CPU run about 4x slower (bench/RESULTS.md v0.13).
set -euo pipefail
packages=(g++ cmake ninja-build libtorch-dev libgloo-dev libgtest-dev libgmock-dev libbenchmark-dev
          nlohmann-json3-dev libstb-dev libcli11-dev doxygen libopencv-imgproc-dev libopenblas0-openmp)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
