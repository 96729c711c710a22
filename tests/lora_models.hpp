#pragma once
/// @file lora_models.hpp
/// @brief What the LoRA test files share: a small model written the LibTorch way (typed members
/// called in `forward`, as injection must handle), its registered weights, adapters with random
/// B, and a relative difference.

#include <scedit/lora.hpp>

#include <torch/torch.h>

#include <algorithm>
#include <string>

namespace scedit_test {

/// max |a − b| / max(1, max |b|).
inline double max_diff(const torch::Tensor& a, const torch::Tensor& b) {
  const auto a64 = a.to(torch::kFloat64), b64 = b.to(torch::kFloat64);
  return (a64 - b64).abs().max().item<double>() / std::max(1.0, b64.abs().max().item<double>());
}

/// Gives B of adapter `name` on every layer random values (B starts at zero), then refreshes.
inline void randomize_B(const scedit::LoRALayers& layers, const std::string& name = "default") {
  {
    torch::NoGradGuard no_grad;
    for (const auto& e : layers.entries()) {
      if (e.second->has_adapter(name)) e.second->lora_B_weight(name).normal_(0.0, 0.5);
    }
  }
  for (const auto& e : layers.entries()) e.second->refresh();
}

/// The registered (not the member) parameter `name` of `module`.
inline torch::Tensor registered(const torch::nn::Module& module, const std::string& name) {
  return module.named_parameters(/*recurse=*/false)[name];
}

// ---- a small model written the LibTorch way: typed members called in forward ----------------

struct GegluImpl : torch::nn::Module {
  GegluImpl(int64_t dim, int64_t hidden) {
    proj = register_module("proj", torch::nn::Linear(dim, 2 * hidden));
  }
  torch::Tensor forward(const torch::Tensor& x) {
    auto h = proj(x).chunk(2, -1);  // [B, L, 2·hidden] -> 2 × [B, L, hidden]
    return h[0] * torch::gelu(h[1]);
  }
  torch::nn::Linear proj{nullptr};
};
TORCH_MODULE(Geglu);

struct FeedForwardImpl : torch::nn::Module {
  FeedForwardImpl(int64_t dim, int64_t hidden) : geglu(dim, hidden), out(hidden, dim) {
    net = register_module("net", torch::nn::ModuleList(geglu, torch::nn::Dropout(0.0), out));
  }
  torch::Tensor forward(const torch::Tensor& x) { return out(geglu(x)); }
  Geglu geglu;
  torch::nn::Linear out;
  torch::nn::ModuleList net{nullptr};
};
TORCH_MODULE(FeedForward);

struct TinyNetImpl : torch::nn::Module {
  TinyNetImpl() {
    conv = register_module(
        "conv", torch::nn::Conv2d(torch::nn::Conv2dOptions(3, 8, 3).stride(2).padding(1)));
    to_q = register_module("to_q", torch::nn::Linear(8, 8));
    to_k = register_module("to_k", torch::nn::Linear(8, 8));
    to_q_extra = register_module("to_q_extra", torch::nn::Linear(8, 8));
    ff = register_module("ff", FeedForward(8, 12));
  }
  torch::Tensor forward(const torch::Tensor& x) {
    auto h = conv(x);                  // [B, 3, H, W] -> [B, 8, H/2, W/2]
    h = h.flatten(2).transpose(1, 2);  // -> [B, L, 8]
    return ff(to_q(h) + to_k(h) + to_q_extra(h));
  }
  torch::nn::Conv2d conv{nullptr};
  torch::nn::Linear to_q{nullptr}, to_k{nullptr}, to_q_extra{nullptr};
  FeedForward ff{nullptr};
};
TORCH_MODULE(TinyNet);

}  // namespace scedit_test
