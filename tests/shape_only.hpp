#pragma once
/// @file shape_only.hpp
/// @brief Building a full-size model for its keys, shapes and parameter counts without its memory.

#include <gtest/gtest.h>
#include <torch/torch.h>

#include <c10/core/Allocator.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cstddef>

namespace scedit_test {

/// While alive, every CPU allocation of 1 MiB or more maps the same pages of one memory file: a
/// full-size model (SDXL's UNet: 2.6 billion parameters) is built for its keys, shapes and counts
/// at the cost of its largest tensor. Those tensors' values are meaningless (they alias each
/// other); smaller allocations (biases, norms, a generator's saved state) are real.
///
/// Example (the guard first, so that the model goes away before it):
/// @code
/// ShapeOnlyAllocation shape_only;
/// sd::UNet unet(sd::UNetConfig::sdxl());
/// EXPECT_EQ(parameter_count(*unet), 2567463684);
/// @endcode
class ShapeOnlyAllocation : public c10::Allocator {
 public:
  /// Makes itself LibTorch's CPU allocator.
  ShapeOnlyAllocation() : fd_(memfd_create("scedit_shape_only", 0)) {
    EXPECT_GE(fd_, 0) << "memfd_create failed";
    previous_ = c10::GetAllocator(c10::DeviceType::CPU);
    c10::SetAllocator(c10::DeviceType::CPU, this);
  }
  ShapeOnlyAllocation(const ShapeOnlyAllocation&) = delete;
  ShapeOnlyAllocation& operator=(const ShapeOnlyAllocation&) = delete;
  /// Puts the previous CPU allocator back.
  ~ShapeOnlyAllocation() override {
    c10::SetAllocator(c10::DeviceType::CPU, previous_);
    ::close(fd_);  // the mappings outlive it, each unmapped by its tensor
  }

  /// A mapping of the shared pages (`bytes` ≥ 1 MiB), else the previous allocator's memory.
  c10::DataPtr allocate(size_t bytes) const override {
    if (bytes < (size_t{1} << 20)) return previous_->allocate(bytes);
    const size_t page = static_cast<size_t>(::sysconf(_SC_PAGESIZE));
    const size_t size = std::max<size_t>(page, (bytes + page - 1) / page * page);
    if (size > size_) {
      TORCH_CHECK(::ftruncate(fd_, static_cast<off_t>(size)) == 0, "ftruncate failed");
      size_ = size;
    }
    void* data = ::mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd_, 0);
    TORCH_CHECK(data != MAP_FAILED, "mmap of ", size, " bytes failed");
    return {data, new Mapping{data, size}, &unmap, c10::Device(c10::DeviceType::CPU)};
  }

 private:
  struct Mapping {
    void* data;
    size_t size;
  };
  static void unmap(void* context) {
    auto* mapping = static_cast<Mapping*>(context);
    ::munmap(mapping->data, mapping->size);
    delete mapping;
  }
  int fd_;
  mutable size_t size_ = 0;
  c10::Allocator* previous_ = nullptr;
};

}  // namespace scedit_test
