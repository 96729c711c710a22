#pragma once
/// @file cuda_graph.hpp
/// @brief Work recorded once as a CUDA graph and replayed: at small batch sizes a UNet call is
/// bound by the CPU launching its thousands of small kernels, and a replay launches them all at
/// once. The training step (common/graphed_step.hpp) and the sampler's noise prediction
/// (noise_prediction.hpp) are recorded through it.
///
/// What recorded work may do: read and write tensors that stay where they are (a replay reads
/// the inputs' addresses as they were at the capture, so callers copy each new input into them),
/// and never wait for the host (no `item`, no copy from pageable memory). What it returns is
/// rewritten by every replay. The autocast cache is off while recording: a cast it served from
/// the cache would point the graph at a tensor the cache frees when the autocast region ends.

#include <torch/torch.h>
#include <ATen/autocast_mode.h>

#include <memory>
#include <optional>

/// 1 where work can be recorded as CUDA graphs: LibTorch with CUDA, unless built with
/// -DSCEDIT_NO_CUDA_GRAPHS (then CUDA runs take the same work uncaptured).
#if defined(SCEDIT_WITH_CUDA) && !defined(SCEDIT_NO_CUDA_GRAPHS)
#define SCEDIT_CUDA_GRAPHS 1
#else
#define SCEDIT_CUDA_GRAPHS 0
#endif

#if SCEDIT_CUDA_GRAPHS
#include <ATen/cuda/CUDAGraph.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

namespace sd {

/// A piece of work recorded once as a CUDA graph and then replayed.
///
/// Example:
/// @code
/// sd::CudaGraph graph(device);
/// graph.warm_up([&] { out = f(in); });    // uncaptured: lazy initialisation happens here
/// graph.capture([&] { out = f(in); });    // recorded, then replayed once
/// in.copy_(next);
/// graph.replay();                          // out now holds f(next)
/// @endcode
class CudaGraph {
 public:
  /// Whether work on `device` can be recorded in this build.
  static bool available(const torch::Device& device) { return SCEDIT_CUDA_GRAPHS && device.is_cuda(); }

  /// A graph for work on `device` (where `available`).
  explicit CudaGraph(const torch::Device& device) : device_(device) {
    TORCH_CHECK(available(device), "CudaGraph: no CUDA graphs on ", device,
                SCEDIT_CUDA_GRAPHS ? "" : " in this build");
  }

  /// Runs `body` uncaptured where a capture runs it (a side stream: a capture cannot use the
  /// default one), and waits for it. Lazy initialisation — library handles, workspaces, cached
  /// device tensors — must happen in such a run, not during the capture.
  template <typename Body>
  void warm_up(Body&& body) {
#if SCEDIT_CUDA_GRAPHS
    c10::cuda::device_synchronize();
    c10::cuda::CUDAStreamGuard side(stream());
    body();
    c10::cuda::device_synchronize();
#else
    (void)body;
#endif
  }

  /// Records `body` (its kernels do not run while recording), then replays it once. The tensors
  /// it writes or returns keep their addresses; each `replay` rewrites them.
  template <typename Body>
  void capture(Body&& body) {
#if SCEDIT_CUDA_GRAPHS
    c10::cuda::device_synchronize();
    {
      c10::cuda::CUDAStreamGuard side(stream());
      AutocastCacheOff no_cache;
      graph_ = std::make_unique<at::cuda::CUDAGraph>();
      graph_->capture_begin();
      body();
      graph_->capture_end();
    }
    c10::cuda::device_synchronize();
    replay();
#else
    (void)body;
#endif
  }

  /// Runs the recorded work again, on the current stream after what is queued there.
  void replay() {
#if SCEDIT_CUDA_GRAPHS
    TORCH_CHECK(graph_ != nullptr, "CudaGraph: replay before capture");
    graph_->replay();
#endif
  }

  /// Whether `capture` has recorded the work.
  bool captured() const {
#if SCEDIT_CUDA_GRAPHS
    return graph_ != nullptr;
#else
    return false;
#endif
  }

 private:
  // The autocast cache off for a scope (see the file comment).
  struct AutocastCacheOff {
    bool was = at::autocast::is_autocast_cache_enabled();
    AutocastCacheOff() { at::autocast::set_autocast_cache_enabled(false); }
    ~AutocastCacheOff() { at::autocast::set_autocast_cache_enabled(was); }
    AutocastCacheOff(const AutocastCacheOff&) = delete;
    AutocastCacheOff& operator=(const AutocastCacheOff&) = delete;
  };

#if SCEDIT_CUDA_GRAPHS
  c10::cuda::CUDAStream stream() {
    if (!stream_) stream_ = c10::cuda::getStreamFromPool(false, device_.index());
    return *stream_;
  }

  std::unique_ptr<at::cuda::CUDAGraph> graph_;
  std::optional<c10::cuda::CUDAStream> stream_;
#endif
  torch::Device device_;
};

}  // namespace sd
