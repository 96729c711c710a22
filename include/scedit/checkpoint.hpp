#pragma once
/// @file checkpoint.hpp
/// @brief Activation recomputation ("gradient checkpointing") for LibTorch, which has no helper.
///
/// `checkpoint(fn, inputs)` runs `fn` without recording its intermediate activations and runs it
/// again during the backward pass to get them: memory for compute. It is a custom autograd
/// function whose backward re-enters autograd (like PyTorch's reentrant checkpoint): gradients
/// reach `inputs` that require them and every parameter `fn` uses. The autocast state of the
/// forward pass is restored for the recomputation. `fn` must be deterministic (no dropout in
/// training mode, no random draws) and must not change module state.
///
/// Example:
/// @code
/// h = scedit::checkpoint([block](const std::vector<torch::Tensor>& in) {
///       return block->forward(in[0], in[1]);
///     }, {h, temb});
/// @endcode

#include <scedit/compat.hpp>

#include <torch/torch.h>

#include <functional>
#include <utility>
#include <vector>

namespace scedit {

/// A recomputable piece of a model: tensors in, one tensor out.
using CheckpointFn = std::function<torch::Tensor(const std::vector<torch::Tensor>&)>;

namespace detail {

/// Carries the closure through the autograd context (which stores only IValues).
struct CheckpointClosure : torch::CustomClassHolder {
  explicit CheckpointClosure(CheckpointFn fn) : fn(std::move(fn)) {}
  CheckpointFn fn;
};

/// Forward without a graph, backward by recomputing with one.
class Checkpoint : public torch::autograd::Function<Checkpoint> {
 public:
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx,
                                                c10::intrusive_ptr<CheckpointClosure> closure,
                                                at::TensorList input_list) {
    // (A TensorList, not a std::vector: autograd only sees tensors passed as Tensor/TensorList.)
    const std::vector<torch::Tensor> inputs = input_list.vec();
    TORCH_CHECK(!inputs.empty() && inputs[0].defined(), "checkpoint: the first input must be a tensor");
    const auto device = inputs[0].device().type();
    const auto autocast = compat::autocast_state(device);
    ctx->saved_data["closure"] = c10::IValue::make_capsule(closure);
    ctx->saved_data["autocast"] = autocast.enabled;
    ctx->saved_data["autocast_dtype"] = static_cast<int64_t>(autocast.dtype);
    ctx->saved_data["device"] = static_cast<int64_t>(device);
    ctx->save_for_backward(inputs);
    torch::NoGradGuard no_grad;
    return {closure->fn(inputs)};
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grad_outputs) {
    auto saved = ctx->get_saved_variables();
    auto closure = c10::static_intrusive_pointer_cast<CheckpointClosure>(
        ctx->saved_data["closure"].toCapsule());
    std::vector<torch::Tensor> inputs;
    for (const auto& input : saved) {
      inputs.push_back(input.defined() ? input.detach().requires_grad_(input.requires_grad()) : input);
    }
    torch::Tensor output;
    {
      torch::AutoGradMode grad(true);
      const auto device = static_cast<torch::DeviceType>(ctx->saved_data["device"].toInt());
      const auto dtype = ctx->saved_data["autocast"].toBool()
                             ? static_cast<torch::ScalarType>(ctx->saved_data["autocast_dtype"].toInt())
                             : torch::kFloat32;
      compat::AutocastGuard autocast(device, dtype);
      output = closure->fn(inputs);
    }
    if (output.requires_grad()) torch::autograd::backward({output}, {grad_outputs[0]});
    torch::autograd::variable_list grads = {torch::Tensor()};  // none for the closure
    for (const auto& input : inputs) {
      grads.push_back(input.defined() && input.requires_grad() ? input.grad() : torch::Tensor());
    }
    return grads;
  }
};

}  // namespace detail

/// `fn(inputs)`, recomputed in the backward pass instead of keeping its activations. Without
/// grad mode (inference) it is a plain call.
inline torch::Tensor checkpoint(CheckpointFn fn, const std::vector<torch::Tensor>& inputs) {
  if (!torch::GradMode::is_enabled()) return fn(inputs);
  auto closure = c10::make_intrusive<detail::CheckpointClosure>(std::move(fn));
  return detail::Checkpoint::apply(closure, at::TensorList(inputs))[0];
}

}  // namespace scedit
