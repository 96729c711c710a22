#pragma once
// An exact count of CPU tensor bytes: a CPU allocator that wraps LibTorch's and keeps the current
// and peak number of bytes it handed out. The CPU counterpart of the CUDA caching allocator's
// "peak allocated bytes" (common/memory.hpp); unlike RSS it sees only tensors, so a benchmark or
// a test can compare the memory that two ways of computing the same thing hold.

#include <scedit/compat.hpp>

#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <c10/core/impl/alloc_cpu.h>

#include <algorithm>
#include <atomic>
#include <cstring>

namespace common {

/// Counts the bytes of every CPU tensor allocation while installed (see `install`).
class CountingCPUAllocator final : public c10::Allocator {
 public:
  /// Installs the counter as LibTorch's CPU allocator (once; later calls return the same one).
  static CountingCPUAllocator& install() {
    static CountingCPUAllocator* instance = [] {
      auto* counter = new CountingCPUAllocator();
      c10::SetCPUAllocator(counter, /*priority=*/100);
      return counter;
    }();
    return *instance;
  }

  /// Bytes currently held by live CPU tensors allocated through the counter.
  int64_t current() const { return current_.load(); }
  /// The most bytes held at once since the last `reset_peak`.
  int64_t peak() const { return peak_.load(); }
  /// Starts a new peak from the current holding.
  void reset_peak() { peak_.store(current_.load()); }

  c10::DataPtr allocate(size_t bytes) SCEDIT_ALLOCATOR_ALLOCATE_CONST override {
    // The size lives in a 64-byte header before the data, so the data pointer is also the
    // context (LibTorch's raw_allocate insists) and alignment stays LibTorch's 64 bytes.
    auto* base = static_cast<char*>(c10::alloc_cpu(bytes + kHeader));
    *reinterpret_cast<int64_t*>(base) = static_cast<int64_t>(bytes);
    const int64_t now = current_.fetch_add(static_cast<int64_t>(bytes)) + static_cast<int64_t>(bytes);
    int64_t previous = peak_.load();
    while (now > previous && !peak_.compare_exchange_weak(previous, now)) {
    }
    void* data = base + kHeader;
    return c10::DataPtr(data, data, &release, c10::Device(c10::DeviceType::CPU));
  }

  c10::DeleterFnPtr raw_deleter() const override { return &release; }

#if SCEDIT_TORCH_AT_LEAST(2, 3)
  void copy_data(void* dest, const void* src, std::size_t count) const override {
    std::memcpy(dest, src, count);
  }
#endif

 private:
  static constexpr size_t kHeader = 64;

  CountingCPUAllocator() = default;

  static void release(void* data) {
    if (data == nullptr) return;
    auto* base = static_cast<char*>(data) - kHeader;
    install().current_.fetch_sub(*reinterpret_cast<int64_t*>(base));
    c10::free_cpu(base);
  }

  mutable std::atomic<int64_t> current_{0};
  mutable std::atomic<int64_t> peak_{0};
};

}  // namespace common
