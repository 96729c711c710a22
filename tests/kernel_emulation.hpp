#pragma once
// A host emulation of as much of CUDA's execution model as examples/sd/kernels/fused_kernels.cu
// uses, so that a machine without a GPU runs its kernels and launchers for real: every block in
// turn, each of its threads on its own CPU thread, __syncthreads and __shfl_down_sync as
// barriers over the block and the warp, __shared__ arrays static (one block at a time).
//
// Included by fused_kernels.cu itself when SD_KERNELS_HOST_EMULATION names this file, before
// it includes any CUDA header. Slow (a thread per CUDA thread): for small shapes only.

#define __host__
#define __device__
#define __global__
#define __shared__ static

#include <cuda_runtime.h>

#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

inline thread_local uint3 threadIdx;
inline thread_local uint3 blockIdx;
inline thread_local dim3 blockDim;
inline thread_local dim3 gridDim;

inline float rsqrtf(float x) { return 1.f / std::sqrt(x); }

namespace sd_kernels_emulation {

/// A reusable barrier for a fixed number of threads (std::barrier is C++20).
class Barrier {
 public:
  explicit Barrier(int count) : count_(count) {}

  void arrive_and_wait() {
    std::unique_lock<std::mutex> lock(mutex_);
    const int64_t generation = generation_;
    if (++arrived_ == count_) {
      arrived_ = 0;
      ++generation_;
      released_.notify_all();
      return;
    }
    released_.wait(lock, [&] { return generation_ != generation; });
  }

 private:
  std::mutex mutex_;
  std::condition_variable released_;
  const int count_;
  int arrived_ = 0;
  int64_t generation_ = 0;
};

constexpr int kWarp = 32;

/// What the threads of the running block share.
struct Block {
  explicit Block(int threads) : barrier(threads) {
    for (int w = 0; w < threads / kWarp; ++w) warps.push_back(std::make_unique<Barrier>(kWarp));
    lanes.resize(threads);
  }
  Barrier barrier;
  std::vector<std::unique_ptr<Barrier>> warps;
  std::vector<float> lanes;  // each thread's value in a shuffle
};

inline thread_local Block* current_block = nullptr;

/// Runs `kernel(args...)` as a grid of `blocks` × `threads` (a multiple of 32, as CUDA's warps).
template <typename... Params, typename... Args>
void run(void (*kernel)(Params...), unsigned int blocks, int threads, Args... args) {
  if (threads % kWarp != 0) throw std::invalid_argument("emulation: blocks of whole warps only");
  for (unsigned int b = 0; b < blocks; ++b) {
    Block block(threads);
    std::vector<std::thread> workers;
    workers.reserve(threads);
    for (int t = 0; t < threads; ++t) {
      workers.emplace_back([&, t] {
        threadIdx = uint3{static_cast<unsigned int>(t), 0, 0};
        blockIdx = uint3{b, 0, 0};
        blockDim = dim3(threads);
        gridDim = dim3(blocks);
        current_block = &block;
        kernel(args...);
      });
    }
    for (auto& worker : workers) worker.join();
  }
}

}  // namespace sd_kernels_emulation

inline void __syncthreads() { sd_kernels_emulation::current_block->barrier.arrive_and_wait(); }

/// The value of lane + delta of the calling warp (the caller's own where that is past the warp).
/// All 32 lanes must call it, as in CUDA with a full mask.
inline float __shfl_down_sync(unsigned int /*mask*/, float value, int delta) {
  auto& block = *sd_kernels_emulation::current_block;
  const int t = static_cast<int>(threadIdx.x), lane = t % sd_kernels_emulation::kWarp;
  auto& warp = *block.warps[t / sd_kernels_emulation::kWarp];
  block.lanes[t] = value;
  warp.arrive_and_wait();
  const float result = lane + delta < sd_kernels_emulation::kWarp ? block.lanes[t + delta] : value;
  warp.arrive_and_wait();
  return result;
}
