#pragma once
/// @file sample_order.hpp
/// @brief The randomness of a training run as pure functions of its seed: one CPU generator per
/// micro-step, and the order in which the samples are seen, per process of a multi-process run.
/// So a resumed run — on the same or another number of processes — draws exactly what an
/// uninterrupted one would.

#include <torch/torch.h>
#include <ATen/CPUGeneratorImpl.h>

#include <cstdint>
#include <map>
#include <vector>

namespace common {

/// A CPU generator for micro-step `index` (and `stream`, to keep independent draws apart): the
/// run's randomness is a pure function of (seed, index).
inline torch::Generator step_generator(uint64_t seed, int64_t index, uint64_t stream = 0) {
  return torch::make_generator<at::CPUGeneratorImpl>(
      seed * 0x9E3779B97F4A7C15ULL + static_cast<uint64_t>(index) * 0xBF58476D1CE4E5B9ULL + stream);
}

/// Which samples each micro-step trains on. Epoch e is a permutation of the dataset drawn from
/// (seed, e); the epochs are laid end to end, and micro-step m of process `rank` in a world of
/// `world_size` processes takes the `batch_size` positions starting at
/// `(m · world_size + rank) · batch_size`. Every sample is seen once per epoch across the
/// processes, and the order depends on (seed, epoch, step, rank, world size) alone.
class SampleOrder {
 public:
  /// The order of `dataset_size` samples in micro-batches of `batch_size` per process.
  SampleOrder(int64_t dataset_size, int64_t batch_size, uint64_t seed, int64_t rank = 0,
              int64_t world_size = 1)
      : size_(dataset_size), batch_(batch_size), seed_(seed), rank_(rank), world_(world_size) {
    TORCH_CHECK(size_ > 0, "SampleOrder: the dataset is empty");
    TORCH_CHECK(batch_ > 0, "SampleOrder: batch_size must be positive, got ", batch_);
    TORCH_CHECK(world_ > 0 && rank_ >= 0 && rank_ < world_, "SampleOrder: rank ", rank_,
                " is not in a world of ", world_, " processes");
  }

  /// The dataset indices of micro-step `micro_step` on this process. (Steps go forwards: the
  /// permutations of the epochs before this step's are forgotten.)
  std::vector<int64_t> indices(int64_t micro_step) {
    std::vector<int64_t> out;
    const int64_t first = (micro_step * world_ + rank_) * batch_;
    permutations_.erase(permutations_.begin(), permutations_.lower_bound(first / size_));
    for (int64_t j = 0; j < batch_; ++j) {
      const int64_t position = first + j;
      out.push_back(permutation(position / size_)[position % size_].item<int64_t>());
    }
    return out;
  }

 private:
  // Epoch e's permutation, drawn once.
  const torch::Tensor& permutation(int64_t epoch) {
    auto it = permutations_.find(epoch);
    if (it == permutations_.end()) {
      auto generator = step_generator(seed_, epoch, /*stream=*/1);
      it = permutations_.emplace(epoch, torch::randperm(size_, generator, torch::kLong)).first;
    }
    return it->second;
  }

  int64_t size_, batch_;
  uint64_t seed_;
  int64_t rank_, world_;
  std::map<int64_t, torch::Tensor> permutations_;
};

}  // namespace common
