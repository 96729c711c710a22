#pragma once
// The arithmetic of a training step or of a generated batch, counted as it runs, to set a
// measured speed against what the device's matrix unit can do. LibTorch's RecordFunction
// callbacks see every operator with its inputs; the matrix products, convolutions and fused
// attention kernels — where the FLOPs are — are counted from their shapes, two per multiply-add,
// as PyTorch's torch.utils.flop_counter counts them: mm, addmm, bmm, baddbmm, convolution and
// convolution_backward (its grad-input and grad-weight products, as asked), and LibTorch 2.x's
// scaled-dot-product attention kernels (flash, memory-efficient, cuDNN; their backward as twice
// the forward). Norms, activations, softmax and AdamW move bytes rather than multiply and are left
// out. An operator inside a counted one (a backend's own GEMM) is not counted again.
// `matmul_tflops` measures the device's matrix throughput in a dtype: the figure to compare with.

#include <ATen/record_function.h>
#include <torch/torch.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

namespace bench {

/// FLOPs of the products that run while it lives (every thread: the backward pass too).
///
/// Example:
/// @code
/// bench::FlopCount count;
/// step();
/// const double gflop = count.flops() / 1e9;
/// @endcode
class FlopCount {
 public:
  /// Starts counting.
  FlopCount() {
    bool expected = false;
    TORCH_CHECK(active().compare_exchange_strong(expected, true), "FlopCount: one count at a time");
    total() = 0;
    unreadable() = 0;
    handle_ = at::addGlobalCallback(at::RecordFunctionCallback(&on_start, &on_end).needsInputs(true));
  }

  ~FlopCount() {
    at::removeCallback(handle_);
    active() = false;
  }

  FlopCount(const FlopCount&) = delete;
  FlopCount& operator=(const FlopCount&) = delete;

  /// FLOPs counted so far.
  double flops() const { return static_cast<double>(total().load()); }
  /// Operators of a counted kind whose inputs could not be read (their FLOPs are missing).
  int64_t unreadable_operators() const { return unreadable().load(); }

  /// The FLOPs of operator `name` on `inputs` (0 for one that is not counted).
  static double of(const std::string& name, c10::ArrayRef<const c10::IValue> inputs) {
    auto sizes = [&](size_t i) { return inputs.at(i).toTensor().sizes(); };
    auto numel = [&](size_t i) { return static_cast<double>(inputs.at(i).toTensor().numel()); };
    if (name == "aten::mm") return 2.0 * sizes(0)[0] * sizes(0)[1] * sizes(1)[1];
    if (name == "aten::addmm") return 2.0 * sizes(1)[0] * sizes(1)[1] * sizes(2)[1];
    if (name == "aten::bmm") return 2.0 * sizes(0)[0] * sizes(0)[1] * sizes(0)[2] * sizes(1)[2];
    if (name == "aten::baddbmm") return 2.0 * sizes(1)[0] * sizes(1)[1] * sizes(1)[2] * sizes(2)[2];
    if (name == "aten::convolution") {
      // (input, weight, bias, stride, padding, dilation, transposed, output_padding, groups)
      const auto weight = inputs.at(1).toTensor();
      const double per_position = 2.0 * weight.numel() / weight.size(0);  // MACs of one output (or input) element, ×2
      if (inputs.at(6).toBool()) return per_position * numel(0);  // transposed: each input element
      return per_position * weight.size(0) * output_positions(inputs);
    }
    if (name == "aten::convolution_backward") {
      // (grad_output, input, weight, bias_sizes, stride, padding, dilation, transposed,
      // output_padding, groups, output_mask): each of grad-input and grad-weight costs the forward.
      const auto weight = inputs.at(2).toTensor();
      const double per_position = 2.0 * weight.numel() / weight.size(0);
      const double forward = per_position * (inputs.at(7).toBool() ? numel(1) : numel(0));
      const auto mask = inputs.at(10).toBoolList();
      return forward * (static_cast<int>(mask.get(0)) + static_cast<int>(mask.get(1)));
    }
    // Fused attention, query [B, H, L, E], key [B, H, S, E], value [B, H, S, Ev]: Q·Kᵀ and P·V.
    const bool forward = name == "aten::_scaled_dot_product_flash_attention" ||
                         name == "aten::_scaled_dot_product_flash_attention_for_cpu" ||
                         name == "aten::_scaled_dot_product_efficient_attention" ||
                         name == "aten::_scaled_dot_product_cudnn_attention";
    const bool backward = name == "aten::_scaled_dot_product_flash_attention_backward" ||
                          name == "aten::_scaled_dot_product_flash_attention_for_cpu_backward" ||
                          name == "aten::_scaled_dot_product_efficient_attention_backward" ||
                          name == "aten::_scaled_dot_product_cudnn_attention_backward";
    if (forward || backward) {
      const size_t q = backward ? 1 : 0;  // a backward's first input is the output's gradient
      const auto query = sizes(q), key = sizes(q + 1), value = sizes(q + 2);
      const double products = 2.0 * query[0] * query[1] * query[2] * key[2] * (query[3] + value[3]);
      return backward ? 2 * products : products;
    }
    return 0;
  }

 private:
  // Output positions (batch × spatial) of a convolution that is not transposed.
  static double output_positions(c10::ArrayRef<const c10::IValue> inputs) {
    const auto input = inputs.at(0).toTensor().sizes(), weight = inputs.at(1).toTensor().sizes();
    const auto stride = inputs.at(3).toIntVector(), padding = inputs.at(4).toIntVector(),
               dilation = inputs.at(5).toIntVector();
    double positions = static_cast<double>(input[0]);
    for (size_t d = 0; d + 2 < input.size(); ++d) {
      const auto at = [](const std::vector<int64_t>& v, size_t i) { return v.size() == 1 ? v[0] : v.at(i); };
      positions *= (input[d + 2] + 2 * at(padding, d) - at(dilation, d) * (weight[d + 2] - 1) - 1) / at(stride, d) + 1;
    }
    return positions;
  }

  static std::atomic<bool>& active() {
    static std::atomic<bool> a{false};
    return a;
  }
  static std::atomic<int64_t>& total() {
    static std::atomic<int64_t> t{0};
    return t;
  }
  static std::atomic<int64_t>& unreadable() {
    static std::atomic<int64_t> u{0};
    return u;
  }
  // How many counted operators the calling thread is inside.
  static int& depth() {
    thread_local int d = 0;
    return d;
  }
  // Marks a counted operator, so that its end leaves it.
  struct Counted : at::ObserverContext {};

  static std::unique_ptr<at::ObserverContext> on_start(const at::RecordFunction& fn) {
    double flops = 0;
    try {
      flops = of(fn.name(), fn.inputs());
    } catch (const std::exception&) {
      ++unreadable();  // inputs not as this file expects them: said in the report, not guessed
      return nullptr;
    }
    if (flops <= 0) return nullptr;
    if (depth()++ == 0) total() += static_cast<int64_t>(flops);
    return std::make_unique<Counted>();
  }

  static void on_end(const at::RecordFunction&, at::ObserverContext* context) {
    if (context != nullptr) --depth();
  }

  at::CallbackHandle handle_ = 0;
};

/// `value` with three significant digits in fixed notation (0.0123, 1.23, 123, 1234): rates that
/// span a CPU's and a GPU's.
inline std::string three_digits(double value) {
  const int decimals = value > 0 ? std::max(0, 2 - static_cast<int>(std::floor(std::log10(value)))) : 0;
  char text[64];
  std::snprintf(text, sizeof(text), "%.*f", decimals, value);
  return text;
}

/// The matrix throughput of `device` in `dtype` (TFLOP/s): square products of 8192 (CUDA) or 1024
/// (CPU), the median of a few timed runs after a warm-up, measured once per device and dtype in a
/// process (every row of a bench sets its rate against the same figure). fp32 runs as the benches
/// do (TF32 allowed where the device has it).
inline double matmul_tflops(const torch::Device& device, torch::Dtype dtype) {
  static std::map<std::pair<std::string, torch::Dtype>, double> measured;
  const auto key = std::make_pair(device.str(), dtype);
  if (const auto it = measured.find(key); it != measured.end()) return it->second;
  const int64_t n = device.is_cuda() ? 8192 : 1024;
  const int reps = device.is_cuda() ? 20 : 3;
  const auto options = torch::TensorOptions().dtype(dtype).device(device);
  const auto a = torch::randn({n, n}, options), b = torch::randn({n, n}, options);
  auto sync = [&] {
    if (device.is_cuda()) torch::cuda::synchronize(device.index() < 0 ? 0 : device.index());
  };
  torch::NoGradGuard no_grad;
  std::vector<double> seconds;
  for (int i = 0; i < reps + 2; ++i) {
    sync();
    const auto began = std::chrono::steady_clock::now();
    auto c = a.mm(b);
    sync();
    if (i >= 2) seconds.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - began).count());
  }
  std::sort(seconds.begin(), seconds.end());
  return measured[key] = 2.0 * n * n * n / seconds[seconds.size() / 2] / 1e12;
}

}  // namespace bench
