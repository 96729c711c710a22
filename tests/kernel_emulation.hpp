#pragma once
// A host emulation of as much of CUDA's execution model as examples/sd/kernels/fused_kernels.cuh
// uses, so that a machine without a GPU runs its kernels and launchers for real: the blocks one
// after another, each CUDA thread of a block as a coroutine (ucontext) on the calling thread,
// __syncthreads, __shfl_down_sync and __shfl_sync as barriers over the block and the warp at which a thread
// yields until all have arrived, __shared__ arrays static (one block at a time).
//
// Included by fused_kernels.cuh itself when SD_KERNELS_HOST_EMULATION names this file, before
// it includes any CUDA header. Coroutines, not OS threads: a barrier then costs a few context
// switches instead of waking hundreds of threads on two cores.

#define __host__
#define __device__
#define __global__
#define __shared__ static

#include <cuda_runtime.h>
#include <ucontext.h>

#include <cmath>
#include <cstdint>
#include <functional>
#include <stdexcept>
#include <vector>

inline uint3 threadIdx;
inline uint3 blockIdx;
inline dim3 blockDim;
inline dim3 gridDim;

inline float rsqrtf(float x) { return 1.f / std::sqrt(x); }

namespace sd_kernels_emulation {

constexpr int kWarp = 32;
constexpr size_t kStackBytes = 64 * 1024;

/// A barrier for `count` coroutines: each arrival but the last yields until the generation moves.
struct Barrier {
  int count = 0, arrived = 0;
  uint64_t generation = 0;
};

/// One CUDA thread of the running block.
struct Fiber {
  ucontext_t context{};
  std::vector<char> stack;
  unsigned int index = 0;
  bool done = false;
  const Barrier* waiting = nullptr;  // the barrier it yielded at, until its generation moves
  uint64_t waiting_generation = 0;
};

/// What the coroutines of the running block share.
struct Block {
  ucontext_t scheduler{};
  std::vector<Fiber> fibers;
  Fiber* current = nullptr;
  std::function<void()> body;  // the kernel call every fiber runs
  Barrier block_barrier;
  std::vector<Barrier> warp_barriers;
  std::vector<float> lanes[2];     // each thread's value in a shuffle, alternating buffers
  std::vector<unsigned> shuffles;  // shuffles each thread has made in this block
};

inline Block* running = nullptr;
/// Kernels launched so far (tests check that a path did run on the kernels).
inline int64_t launches = 0;

inline void fiber_main() {
  running->body();
  running->current->done = true;  // returning resumes the scheduler (uc_link)
}

/// Yields the current fiber at `barrier` until every one of its threads has arrived.
inline void arrive_and_wait(Barrier& barrier) {
  const uint64_t generation = barrier.generation;
  if (++barrier.arrived == barrier.count) {
    barrier.arrived = 0;
    ++barrier.generation;
    return;
  }
  Fiber& self = *running->current;
  self.waiting = &barrier;
  self.waiting_generation = generation;
  swapcontext(&self.context, &running->scheduler);
}

/// A context to start fibers from (getcontext is a system call: once per launch, not per fiber;
/// and in its own frame, which `returns_twice` then concerns alone).
[[gnu::noinline]] inline ucontext_t blank_context() {
  ucontext_t context{};
  getcontext(&context);
  return context;
}

/// Runs `kernel(args...)` as a grid of `blocks` × `threads` (a multiple of 32, as CUDA's warps).
template <typename... Params, typename... Args>
void run(void (*kernel)(Params...), unsigned int blocks, int threads, Args... args) {
  if (threads % kWarp != 0) throw std::invalid_argument("emulation: blocks of whole warps only");
  ++launches;
  Block block;
  block.fibers.resize(threads);
  block.block_barrier.count = threads;
  block.warp_barriers.resize(threads / kWarp);
  for (auto& warp : block.warp_barriers) warp.count = kWarp;
  block.lanes[0].resize(threads);
  block.lanes[1].resize(threads);
  block.shuffles.resize(threads);
  block.body = [&] { kernel(args...); };
  running = &block;
  blockDim = dim3(threads);
  gridDim = dim3(blocks);
  const ucontext_t blank = blank_context();
  for (unsigned int b = 0; b < blocks; ++b) {
    blockIdx = uint3{b, 0, 0};
    for (int t = 0; t < threads; ++t) {
      Fiber& f = block.fibers[t];
      f.stack.resize(kStackBytes);
      f.index = static_cast<unsigned int>(t);
      f.done = false;
      f.waiting = nullptr;
      block.shuffles[t] = 0;
      f.context = blank;
      f.context.uc_stack.ss_sp = f.stack.data();
      f.context.uc_stack.ss_size = f.stack.size();
      f.context.uc_link = &block.scheduler;
      makecontext(&f.context, fiber_main, 0);
    }
    // Round-robin over the fibers that can go on, until all are done.
    for (int left = threads; left > 0;) {
      bool progressed = false;
      for (auto& f : block.fibers) {
        if (f.done || (f.waiting != nullptr && f.waiting->generation == f.waiting_generation)) continue;
        f.waiting = nullptr;
        block.current = &f;
        threadIdx = uint3{f.index, 0, 0};
        swapcontext(&block.scheduler, &f.context);
        progressed = true;
        if (f.done) --left;
      }
      if (!progressed) throw std::logic_error("emulation: a barrier that not every thread reaches");
    }
  }
  running = nullptr;
}

}  // namespace sd_kernels_emulation

inline void __syncthreads() {
  sd_kernels_emulation::arrive_and_wait(sd_kernels_emulation::running->block_barrier);
}

/// The value of lane + delta of the calling warp (the caller's own where that is past the warp).
/// All 32 lanes must call it, as in CUDA with a full mask. Successive shuffles alternate between
/// two buffers, so one barrier each is enough: a lane can only write a buffer again after the
/// next shuffle's barrier, which every lane reaches after reading it.
inline float __shfl_down_sync(unsigned int /*mask*/, float value, int delta) {
  auto& block = *sd_kernels_emulation::running;
  const int t = static_cast<int>(threadIdx.x), lane = t % sd_kernels_emulation::kWarp;
  auto& lanes = block.lanes[block.shuffles[t]++ % 2];
  lanes[t] = value;
  sd_kernels_emulation::arrive_and_wait(block.warp_barriers[t / sd_kernels_emulation::kWarp]);
  return lane + delta < sd_kernels_emulation::kWarp ? lanes[t + delta] : value;
}

/// The value of lane `source` of the calling warp, in every lane (all 32 must call it).
inline float __shfl_sync(unsigned int /*mask*/, float value, int source) {
  auto& block = *sd_kernels_emulation::running;
  const int t = static_cast<int>(threadIdx.x), first = t - t % sd_kernels_emulation::kWarp;
  auto& lanes = block.lanes[block.shuffles[t]++ % 2];
  lanes[t] = value;
  sd_kernels_emulation::arrive_and_wait(block.warp_barriers[t / sd_kernels_emulation::kWarp]);
  return lanes[first + source % sd_kernels_emulation::kWarp];
}
