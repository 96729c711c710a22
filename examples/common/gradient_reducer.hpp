#pragma once
/// @file gradient_reducer.hpp
/// @brief Averages the trainable gradients over the ranks of a multi-process run
/// (examples/common/distributed.hpp) while the backward pass is still running, as PyTorch's
/// DistributedDataParallel does: the gradients are laid into a few flat buckets, and a bucket's
/// all-reduce starts as soon as the step's last backward pass has produced all of its gradients,
/// while the backward pass goes on through the layers before them. Frozen weights are never sent.
///
/// How: a hook on each trainable tensor (`Tensor::register_hook`) adds the gradient the backward
/// pass hands it to the tensor's slot in its bucket. The buckets accumulate the step's micro-steps
/// themselves, so a bucket is complete the moment the last micro-step has reached all of its
/// tensors. Buckets start in one fixed order, the same on every rank (collectives must be called
/// in the same order everywhere): a bucket waits for those before it. The first step learns the
/// order in which the gradients arrive; from the second on the buckets follow it (rank 0's, shared
/// through the store), so that the first bucket is the first one complete. `finish` starts what
/// has not started (a tensor without a gradient takes part as zeros), waits for every bucket and
/// writes the averages into the tensors' `.grad`: every rank then takes the same optimizer step.

#include <common/distributed.hpp>
#include <common/train_step.hpp>

#include <torch/torch.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <mutex>
#include <sstream>
#include <string>
#include <vector>

namespace common {

/// How the gradients are bucketed and when their all-reduces start.
struct ReducerOptions {
  int64_t bucket_bytes = int64_t{25} << 20;       ///< a bucket's size (DDP's default, 25 MiB)
  int64_t first_bucket_bytes = int64_t{1} << 20;  ///< the first bucket's: small, so the first all-reduce starts early
  bool overlap = true;  ///< start buckets during the backward pass; false: all in `finish` (what overlap hides is measured against it)
};

/// Where the reduction's time went, summed over the steps.
struct ReducerStats {
  int64_t steps = 0;                ///< steps reduced
  int64_t buckets = 0;              ///< bucket all-reduces
  int64_t started_in_backward = 0;  ///< of those, started while a backward pass was running
  double finish_seconds = 0;        ///< spent in `finish`: the reduction time the backward pass did not hide
};

/// The gradient reduction of a multi-process run's `TrainStep` (see the file's comment).
class GradientReducer : public GradientReduction {
 public:
  /// Reduces the gradients of `parameters` (the trainable tensors, in optimizer order) over the
  /// ranks of `dist`, which must outlive it.
  GradientReducer(Distributed& dist, std::vector<torch::Tensor> parameters, ReducerOptions options = {})
      : dist_(dist), params_(std::move(parameters)), options_(options), written_(params_.size(), false),
        arrived_(params_.size(), false) {
    TORCH_CHECK(options_.bucket_bytes > 0 && options_.first_bucket_bytes > 0,
                "GradientReducer: bucket sizes must be positive");
    std::vector<size_t> order;  // the backward pass reaches the last layers first
    for (size_t i = params_.size(); i-- > 0;) order.push_back(i);
    lay_out(order);
    expect_all();
    for (size_t i = 0; i < params_.size(); ++i) {
      TORCH_CHECK(params_[i].requires_grad(), "GradientReducer: trainable tensor ", i, " does not require grad");
      hooks_.push_back(params_[i].register_hook([this, i](const torch::Tensor& grad) { on_gradient(i, grad); }));
    }
  }

  GradientReducer(const GradientReducer&) = delete;
  GradientReducer& operator=(const GradientReducer&) = delete;
  ~GradientReducer() override {
    for (size_t i = 0; i < params_.size(); ++i) params_[i].remove_hook(hooks_[i]);
  }

  void begin_backward(bool last) override {
    std::lock_guard<std::mutex> lock(mutex_);
    last_ = last;
    if (last) expect_all();
  }

  void finish() override {
    const auto began = std::chrono::steady_clock::now();
    std::lock_guard<std::mutex> lock(mutex_);
    torch::NoGradGuard no_grad;
    for (; next_ < buckets_.size(); ++next_) {
      for (const auto i : buckets_[next_].members) {
        if (!written_[i]) slot(i).zero_();
      }
      start(buckets_[next_], /*in_backward=*/false);
    }
    for (auto& bucket : buckets_) {
      dist_.wait(bucket.work, "averaging the gradients");
      bucket.flat.div_(static_cast<double>(dist_.world_size()));
    }
    for (size_t i = 0; i < params_.size(); ++i) {
      auto& grad = params_[i].mutable_grad();
      auto average = slot(i).view_as(params_[i]);
      if (grad.defined()) {
        grad.copy_(average);
      } else {
        grad = average.clone();
      }
      written_[i] = false;
    }
    next_ = 0;
    ++stats_.steps;
    if (!ordered_) follow_arrivals();
    expect_all();
    stats_.finish_seconds += std::chrono::duration<double>(std::chrono::steady_clock::now() - began).count();
  }

  /// Where the reduction's time went so far.
  const ReducerStats& stats() const { return stats_; }
  /// The buckets as indices into the parameters, in the order they start.
  std::vector<std::vector<size_t>> buckets() const {
    std::vector<std::vector<size_t>> out;
    for (const auto& bucket : buckets_) out.push_back(bucket.members);
    return out;
  }

 private:
  struct Bucket {
    std::vector<size_t> members;  // parameter indices
    torch::Tensor flat;           // their gradients, end to end
    int64_t pending = 0;          // members the last backward pass has not reached yet
    Work work;
  };

  // The hook of parameter i: its gradient of this backward pass, into its slot; during the last
  // micro-step, the buckets that are complete (and all before them) start.
  void on_gradient(size_t i, const torch::Tensor& grad) {
    std::lock_guard<std::mutex> lock(mutex_);
    torch::NoGradGuard no_grad;
    const bool again = last_ && arrived_[i];  // a second gradient in one backward pass
    // (a tensor used in two recomputed segments, say): added while its bucket waits; refused once
    // the bucket's all-reduce has started, which it would change under way.
    TORCH_CHECK(!again || bucket_of_[i] >= next_, "GradientReducer: trainable tensor ", i, " received a "
                "second gradient in one backward pass after its bucket's all-reduce had started");
    auto target = slot(i);
    const auto flat = grad.reshape({-1});
    if (written_[i]) {
      target.add_(flat);
    } else {
      target.copy_(flat);
      written_[i] = true;
    }
    if (!last_ || again) return;
    arrived_[i] = true;
    arrivals_.push_back(i);
    --buckets_[bucket_of_[i]].pending;
    while (options_.overlap && next_ < buckets_.size() && buckets_[next_].pending == 0) {
      start(buckets_[next_++], /*in_backward=*/true);
    }
  }

  // Every bucket waits for all of its members' gradients again.
  void expect_all() {
    for (auto& bucket : buckets_) bucket.pending = static_cast<int64_t>(bucket.members.size());
    arrived_.assign(params_.size(), false);
    arrivals_.clear();
  }

  void start(Bucket& bucket, bool in_backward) {
    bucket.work = dist_.start_sum(bucket.flat);
    ++stats_.buckets;
    stats_.started_in_backward += in_backward ? 1 : 0;
  }

  // Parameter i's slot in its bucket, flat.
  torch::Tensor slot(size_t i) {
    return buckets_[bucket_of_[i]].flat.narrow(0, offset_of_[i], params_[i].numel());
  }

  // Buckets of the parameters in `order`: the first up to first_bucket_bytes (or bucket_bytes,
  // when smaller), the others up to bucket_bytes; one dtype per bucket.
  void lay_out(const std::vector<size_t>& order) {
    buckets_.clear();
    bucket_of_.assign(params_.size(), 0);
    offset_of_.assign(params_.size(), 0);
    std::vector<int64_t> sizes;
    int64_t bytes = 0;
    for (const auto i : order) {
      const auto& p = params_[i];
      const int64_t size = p.numel() * p.element_size();
      const int64_t cap = buckets_.size() == 1 ? std::min(options_.first_bucket_bytes, options_.bucket_bytes)
                                               : options_.bucket_bytes;
      const bool fits = !buckets_.empty() && bytes + size <= cap &&
                        params_[buckets_.back().members.front()].scalar_type() == p.scalar_type();
      if (!fits) {
        buckets_.emplace_back();
        sizes.push_back(0);
        bytes = 0;
      }
      bucket_of_[i] = buckets_.size() - 1;
      offset_of_[i] = sizes.back();
      buckets_.back().members.push_back(i);
      sizes.back() += p.numel();
      bytes += size;
    }
    for (size_t b = 0; b < buckets_.size(); ++b) {
      const auto& first = params_[buckets_[b].members.front()];
      buckets_[b].flat = torch::zeros({sizes[b]}, first.options().requires_grad(false));
    }
  }

  // After the first step: the buckets follow the order in which rank 0's gradients arrived (the
  // parameters that never got one last, in the first order), the same on every rank.
  void follow_arrivals() {
    ordered_ = true;
    std::ostringstream mine;
    for (const auto i : arrivals_) mine << i << ' ';
    std::istringstream shared(dist_.share("the order of the gradients", mine.str()));
    std::vector<size_t> order;
    std::vector<bool> placed(params_.size(), false);
    for (size_t i; shared >> i;) {
      TORCH_CHECK(i < params_.size() && !placed[i], "GradientReducer: rank 0's order of the gradients names "
                  "tensor ", i, " of ", params_.size(), " twice or out of range");
      order.push_back(i);
      placed[i] = true;
    }
    for (const auto& bucket : buckets_) {
      for (const auto i : bucket.members) {
        if (!placed[i]) order.push_back(i);
      }
    }
    lay_out(order);
  }

  Distributed& dist_;
  std::vector<torch::Tensor> params_;
  ReducerOptions options_;
  std::vector<unsigned> hooks_;
  std::vector<Bucket> buckets_;
  std::vector<size_t> bucket_of_;    // parameter -> bucket
  std::vector<int64_t> offset_of_;   // parameter -> offset in its bucket's flat tensor
  std::vector<bool> written_;        // parameter's slot holds this step's gradient
  std::vector<bool> arrived_;        // parameter's gradient of the last backward pass has come
  std::vector<size_t> arrivals_;     // parameters in the order the last backward pass reached them
  size_t next_ = 0;                  // the next bucket to start
  bool last_ = true;                 // the backward pass under way is the step's last
  bool ordered_ = false;             // the buckets follow the arrivals of the first step
  ReducerStats stats_;
  std::mutex mutex_;                 // hooks may run on autograd's device threads
};

}  // namespace common
