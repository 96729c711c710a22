#pragma once
// Peak memory, as a person reading the progress line wants it: the CUDA caching allocator's peak
// allocated bytes on a GPU (what the Python peer reports too: bench/RESULTS.md), the process's
// peak resident set on the CPU.

#include <torch/torch.h>

#include <cstdio>
#include <fstream>
#include <string>

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
