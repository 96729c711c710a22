#pragma once
// Peak memory, as a person reading the progress line wants it: the CUDA caching allocator's peak
// allocated bytes on a GPU (what the Python peer reports too: bench/RESULTS.md), the process's
// peak resident set on the CPU. And how a run on the CPU keeps the memory of freed tensors.

#include <torch/torch.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <string>

#if defined(__GLIBC__)
#include <malloc.h>
#endif

#if defined(SCEDIT_WITH_CUDA)
#include <c10/cuda/CUDACachingAllocator.h>
#endif

namespace common {

/// Peak bytes the CUDA caching allocator handed out on `device` since the last reset (0 on CPU
/// builds).
inline int64_t cuda_peak_allocated(const torch::Device& device) {
#if defined(SCEDIT_WITH_CUDA)
  const auto stats = c10::cuda::CUDACachingAllocator::getDeviceStats(device.index() < 0 ? 0 : device.index());
  return stats.allocated_bytes[0].peak;  // [0] = StatType::AGGREGATE
#else
  (void)device;
  return 0;
#endif
}

/// Resets the CUDA allocator's peak statistics on `device` (a no-op on CPU builds).
inline void reset_cuda_peak(const torch::Device& device) {
#if defined(SCEDIT_WITH_CUDA)
  c10::cuda::CUDACachingAllocator::resetPeakStats(device.index() < 0 ? 0 : device.index());
#else
  (void)device;
#endif
}

/// The process's peak resident set size in bytes (Linux VmHWM), or 0 where unknown.
inline int64_t peak_rss_bytes() {
  std::ifstream status("/proc/self/status");
  for (std::string line; std::getline(status, line);) {
    if (line.rfind("VmHWM:", 0) == 0) return std::stoll(line.substr(6)) * 1024;  // in kB
  }
  return 0;
}

/// Whether the environment sets malloc's mmap or trim threshold: `MALLOC_MMAP_THRESHOLD_`,
/// `MALLOC_TRIM_THRESHOLD_`, or either in `GLIBC_TUNABLES`.
inline bool malloc_thresholds_set_by_user() {
  const char* tunables = std::getenv("GLIBC_TUNABLES");
  return std::getenv("MALLOC_MMAP_THRESHOLD_") || std::getenv("MALLOC_TRIM_THRESHOLD_") ||
         (tunables && (std::strstr(tunables, "mmap_threshold") || std::strstr(tunables, "trim_threshold")));
}

/// Makes glibc's malloc keep the memory of freed tensors for the next step of a run on the CPU:
/// its mmap threshold becomes 256 MiB and its trim threshold 1 GiB. By default glibc maps every
/// block over 32 MiB afresh and hands freed heap over 128 KiB back to the kernel, so each step
/// faults its large activations in again: fp32 training steps ran up to 1.4× slower and varied
/// more from run to run (bench/RESULTS.md v0.10, v0.11). The cost: the largest step's memory stays
/// with the process until it ends. Thresholds the user set (`malloc_thresholds_set_by_user`) are
/// left alone, and so is any malloc but glibc's.
inline void keep_freed_cpu_memory() {
#if defined(__GLIBC__)
  if (malloc_thresholds_set_by_user()) return;
  mallopt(M_MMAP_THRESHOLD, 256 << 20);
  mallopt(M_TRIM_THRESHOLD, 1 << 30);
#endif
}

/// "1234 MiB" of CUDA peak allocated bytes on a GPU, "1234 MiB RSS" on the CPU.
inline std::string peak_memory_string(const torch::Device& device) {
  char text[48];
  if (device.is_cuda()) {
    std::snprintf(text, sizeof(text), "%.0f MiB", cuda_peak_allocated(device) / 1048576.0);
  } else {
    std::snprintf(text, sizeof(text), "%.0f MiB RSS", peak_rss_bytes() / 1048576.0);
  }
  return text;
}

}  // namespace common
