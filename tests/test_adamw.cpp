// The library's AdamW helpers (include/scedit/foreach_adamw.hpp): the multi-tensor step is
// torch::optim::AdamW's bitwise, and the capturable one (step count and learning rate on the
// device, device-side clipping) matches AdamW with clip_grad_norm_.

#include <scedit/compat.hpp>
#include <scedit/foreach_adamw.hpp>

#include <gtest/gtest.h>
#include <torch/torch.h>

#include <vector>

#include "test_util.hpp"

using scedit_test::error_of;

TEST(AdamW, ForeachStepIsAdamWBitwise) {
  // Two copies of the same parameters (several shapes), one stepped by AdamW::step, one by
  // foreach_adamw_step: every parameter and state tensor equal. Also through the fallbacks:
  // amsgrad, and a parameter that missed a step (its step count differs from the others').
  struct Case { bool amsgrad, skip_one; };
  for (const auto& c : {Case{false, false}, Case{true, false}, Case{false, true}}) {
    torch::manual_seed(0);
    std::vector<torch::Tensor> a, b;
    for (auto shape : std::vector<std::vector<int64_t>>{{3, 5}, {7}, {2, 3, 4, 4}, {1}}) {
      a.push_back(torch::randn(shape).requires_grad_(true));
      b.push_back(a.back().detach().clone().requires_grad_(true));
    }
    const auto options = torch::optim::AdamWOptions(3e-2).betas({0.8, 0.95}).eps(1e-6).weight_decay(0.1).amsgrad(c.amsgrad);
    torch::optim::AdamW reference(a, options), foreach(b, options);
    for (int step = 0; step < 6; ++step) {
      for (size_t i = 0; i < a.size(); ++i) {
        const bool skip = c.skip_one && step == 2 && i == 1;
        const auto grad = torch::randn(a[i].sizes());
        a[i].mutable_grad() = skip ? torch::Tensor() : grad.clone();
        b[i].mutable_grad() = skip ? torch::Tensor() : grad.clone();
      }
      reference.step();
      // After the skipped step the step counts differ, and the fallback takes over.
      const bool multi_tensor = !c.amsgrad && (!c.skip_one || step <= 2);
      EXPECT_EQ(scedit::foreach_adamw_step(foreach), multi_tensor) << "step " << step;
    }
    for (size_t i = 0; i < a.size(); ++i) {
      EXPECT_TRUE(torch::equal(a[i], b[i])) << "parameter " << i;
      const auto& sa = static_cast<torch::optim::AdamWParamState&>(*reference.state().at(scedit::compat::optimizer_state_key(a[i])));
      const auto& sb = static_cast<torch::optim::AdamWParamState&>(*foreach.state().at(scedit::compat::optimizer_state_key(b[i])));
      EXPECT_EQ(sa.step(), sb.step());
      EXPECT_TRUE(torch::equal(sa.exp_avg(), sb.exp_avg()));
      EXPECT_TRUE(torch::equal(sa.exp_avg_sq(), sb.exp_avg_sq()));
    }
  }
}

TEST(AdamW, CapturableMatchesAdamWAndClipGradNorm) {
  // The same parameters stepped by AdamW::step (after clip_grad_norm_) and by CapturableAdamW
  // (clip on the device), with a learning rate that changes every step: equal to float32
  // rounding, state included once synced.
  torch::manual_seed(0);
  std::vector<torch::Tensor> a, b;
  for (auto shape : std::vector<std::vector<int64_t>>{{3, 5}, {7}, {2, 3, 4, 4}, {1}}) {
    a.push_back(torch::randn(shape).requires_grad_(true));
    b.push_back(a.back().detach().clone().requires_grad_(true));
  }
  const auto options = torch::optim::AdamWOptions(3e-2).betas({0.8, 0.95}).eps(1e-6).weight_decay(0.1);
  torch::optim::AdamW reference(a, options), optimizer(b, options);
  scedit::CapturableAdamW capturable(optimizer);
  for (int step = 0; step < 8; ++step) {
    const double lr = 3e-2 / (1 + step);
    for (size_t i = 0; i < a.size(); ++i) {
      const auto grad = torch::randn(a[i].sizes()) * (step % 2 ? 10.0 : 0.1);  // clipped on odd steps
      a[i].mutable_grad() = grad.clone();
      b[i].mutable_grad() = grad.clone();
    }
    const double norm = torch::nn::utils::clip_grad_norm_(a, 1.0);
    static_cast<torch::optim::AdamWOptions&>(reference.param_groups()[0].options()).lr(lr);
    reference.step();
    EXPECT_NEAR(capturable.clip_grad_norm(1.0).item<double>(), norm, 1e-5 * norm) << "step " << step;
    capturable.set_lr(lr);
    capturable.step();
  }
  capturable.sync();
  for (size_t i = 0; i < a.size(); ++i) {
    EXPECT_TRUE(torch::allclose(a[i], b[i], 1e-6, 1e-7)) << "parameter " << i << ": "
        << (a[i] - b[i]).abs().max().item<double>();
    const auto& sa = static_cast<torch::optim::AdamWParamState&>(*reference.state().at(scedit::compat::optimizer_state_key(a[i])));
    const auto& sb = static_cast<torch::optim::AdamWParamState&>(*optimizer.state().at(scedit::compat::optimizer_state_key(b[i])));
    EXPECT_EQ(sb.step(), 8);
    EXPECT_EQ(sa.step(), sb.step());
    EXPECT_TRUE(torch::allclose(sa.exp_avg(), sb.exp_avg(), 1e-6, 1e-8));
    EXPECT_TRUE(torch::allclose(sa.exp_avg_sq(), sb.exp_avg_sq(), 1e-6, 1e-10));
  }
  // A second one built on the synced state carries on where the first stopped.
  scedit::CapturableAdamW resumed(optimizer);
  for (size_t i = 0; i < a.size(); ++i) {
    const auto grad = torch::randn(a[i].sizes());
    a[i].mutable_grad() = grad.clone();
    b[i].mutable_grad() = grad.clone();
  }
  reference.step();
  resumed.set_lr(3e-2 / 8);
  resumed.step();
  for (size_t i = 0; i < a.size(); ++i) EXPECT_TRUE(torch::allclose(a[i], b[i], 1e-6, 1e-7)) << "parameter " << i;
}

TEST(AdamW, CapturableRefusesWhatItCannotCapture) {
  auto p = torch::randn({3}).requires_grad_(true), q = torch::randn({2}).requires_grad_(true);
  torch::optim::AdamW amsgrad({p}, torch::optim::AdamWOptions(0.1).amsgrad(true));
  EXPECT_NE(error_of([&] { scedit::CapturableAdamW c(amsgrad); }).find("amsgrad"), std::string::npos);
  torch::optim::AdamW uneven({p, q}, torch::optim::AdamWOptions(0.1));
  p.mutable_grad() = torch::ones({3});
  uneven.step();  // q has no gradient: its state stays at step 0 while p's is at 1
  EXPECT_NE(error_of([&] { scedit::CapturableAdamW c(uneven); }).find("different step counts"), std::string::npos);
  torch::optim::AdamW fresh({p, q}, torch::optim::AdamWOptions(0.1));
  scedit::CapturableAdamW capturable(fresh);
  EXPECT_NE(error_of([&] { capturable.step(); }).find("shape [2] has no gradient"), std::string::npos);
}
