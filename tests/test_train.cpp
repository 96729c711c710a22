// The shared training step and checkpoints (examples/common): schedules, a short seeded run on
// the tiny model lowers the loss, checkpoints are complete or absent and corrupt ones are refused.

#include <common/checkpoint.hpp>
#include <common/graphed_step.hpp>
#include <common/train.hpp>
#include <scedit/foreach_adamw.hpp>
#include <sd/pipeline.hpp>
#include <sd/tiny.hpp>

#include <gtest/gtest.h>
#include <torch/torch.h>

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <vector>

namespace fs = std::filesystem;

namespace {

std::string error_of(const std::function<void()>& run) {
  try {
    run();
  } catch (const c10::Error& e) {
    return e.what_without_backtrace();
  }
  return "(no error)";
}

fs::path temp_dir(const std::string& name) {
  auto dir = fs::temp_directory_path() / ("scedit_train_" + std::to_string(::getpid()) + "_" + name);
  fs::remove_all(dir);
  fs::create_directories(dir);
  return dir;
}

/// The tiny model with tuners and a TrainStep on `device`, and a fixed batch of four "images"
/// (latents) and captions: the tuners learn to denoise them.
struct TinyTraining {
  sd::StableDiffusion pipe;
  common::TrainedTuners tuners;
  std::unique_ptr<common::TrainStep> step;
  torch::Tensor latents, text;

  TinyTraining(const std::string& method, common::Precision precision, torch::Device device,
               const common::OptimOptions& optim)
      : pipe(sd::tiny_pipeline(0, common::compute_dtype(precision))) {
    pipe.unet->to(device);
    torch::manual_seed(0);
    common::MethodOptions options;
    options.method = method;
    options.lora_rank = 4;
    tuners = common::attach_tuners(pipe.unet, options, device);
    pipe.unet->train();
    step = std::make_unique<common::TrainStep>(pipe.unet, tuners, sd::NoiseSchedule(), optim, precision, device);
    torch::NoGradGuard no_grad;
    latents = (torch::randn({4, 4, 8, 8}, common::step_generator(7, 0)) * 0.5).to(device);
    text = sd::encode_prompts(pipe, {"a red circle", "a blue square", "a green star", "a cat"}).to(device);
  }
};

/// Mean loss of the first and the last `window` steps of a seeded run on the tiny model.
std::pair<double, double> short_run(const std::string& method, common::Precision precision,
                                    int64_t steps, int64_t window) {
  common::OptimOptions optim;
  optim.lr = 1e-3;
  TinyTraining t(method, precision, torch::kCPU, optim);
  double first = 0, last = 0;
  for (int64_t s = 0; s < steps; ++s) {
    auto generator = common::step_generator(0, s);
    const double loss = t.step->forward_backward(t.latents, t.text, generator).item<double>();
    EXPECT_TRUE(std::isfinite(loss)) << "step " << s;
    t.step->optimizer_step(optim.lr);
    if (s < window) first += loss / window;
    if (s >= steps - window) last += loss / window;
  }
  return {first, last};
}

}  // namespace

TEST(Train, LearningRateSchedules) {
  common::OptimOptions o;
  o.lr = 1.0;
  EXPECT_EQ(common::learning_rate(o, 0, 100), 1.0);
  o.schedule = "warmup";
  o.warmup_steps = 10;
  EXPECT_DOUBLE_EQ(common::learning_rate(o, 0, 100), 0.1);
  EXPECT_DOUBLE_EQ(common::learning_rate(o, 9, 100), 1.0);
  EXPECT_DOUBLE_EQ(common::learning_rate(o, 50, 100), 1.0);
  o.schedule = "cosine";
  EXPECT_DOUBLE_EQ(common::learning_rate(o, 10, 110), 1.0);
  EXPECT_NEAR(common::learning_rate(o, 60, 110), 0.5, 1e-12);
  EXPECT_NEAR(common::learning_rate(o, 110, 110), 0.0, 1e-12);
  o.schedule = "linear";
  EXPECT_NE(error_of([&] { common::learning_rate(o, 0, 10); }).find("--lr-schedule must be"), std::string::npos);
}

TEST(Train, LeanFlagNamesEveryLeverAndRefusesFusedKernelsWhereTheyCannotRun) {
  const torch::Device cpu(torch::kCPU);
  const auto all = common::parse_lean_activations("all", cpu);
  EXPECT_EQ(common::to_string(all), "norm-silu,geglu,norm-dtype,ff-recompute");
  EXPECT_EQ(common::to_string(common::parse_lean_activations("none", cpu)), "none");
  EXPECT_EQ(common::to_string(common::parse_lean_activations("default", cpu)), "norm-dtype");  // no fused kernels on the CPU
  EXPECT_EQ(common::to_string(common::parse_lean_activations("ff-recompute,norm-dtype", cpu)), "norm-dtype,ff-recompute");
  EXPECT_NE(error_of([&] { common::parse_lean_activations("norm-silu,fusion", cpu); }).find("--lean: 'fusion' is not"),
            std::string::npos);
  for (const std::string lever : {"fused", "fused-norm-silu", "fused-geglu", "fused-layer-norm"}) {
    const auto message = error_of([&] { common::parse_lean_activations("norm-dtype," + lever, cpu); });
    EXPECT_NE(message.find("--lean " + lever + ": "), std::string::npos) << message;
    EXPECT_NE(message.find(sd::fused::available() ? "not on cpu" : "no fused CUDA kernels"), std::string::npos) << message;
  }
  if (sd::fused::available() && torch::cuda::is_available()) {
    const auto fused = common::parse_lean_activations("norm-dtype,fused", torch::Device(torch::kCUDA, 0));
    EXPECT_EQ(common::to_string(fused), "norm-dtype,fused-norm-silu,fused-geglu,fused-layer-norm");
    EXPECT_EQ(common::to_string(common::parse_lean_activations("default", torch::Device(torch::kCUDA, 0))),
              common::to_string(fused));
  }
}

TEST(Train, SeededSCEditRunLowersTheLoss) {
  const auto [first, last] = short_run("scedit", common::Precision::kFP32, 60, 10);
  std::printf("SCEdit, tiny model, 60 steps: mean loss %.4f -> %.4f (%.1f%% lower)\n", first, last,
              100 * (1 - last / first));
  EXPECT_LT(last, 0.9 * first);
}

TEST(Train, SeededLoRARunLowersTheLoss) {
  const auto [first, last] = short_run("lora", common::Precision::kFP32, 60, 10);
  std::printf("LoRA r=4, tiny model, 60 steps: mean loss %.4f -> %.4f (%.1f%% lower)\n", first, last,
              100 * (1 - last / first));
  EXPECT_LT(last, first);
}

TEST(Train, BF16StepsStayFinite) {
  const auto [first, last] = short_run("scedit+lora", common::Precision::kBF16, 6, 3);
  EXPECT_TRUE(std::isfinite(first) && std::isfinite(last));
}

TEST(Train, StepsOnTheGpuAreSeededAndLowerTheLoss_CUDA) {
  if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA device";
  const torch::Device device(torch::kCUDA, 0);
  // Noise is drawn on the device from a generator seeded per micro-step: two runs agree exactly.
  auto run = [&] {
    common::OptimOptions optim;
    optim.lr = 1e-3;
    TinyTraining t("scedit", common::Precision::kBF16, device, optim);
    std::vector<double> losses;
    for (int64_t s = 0; s < 40; ++s) {
      auto generator = common::step_generator(0, s);
      auto loss = t.step->forward_backward(t.latents, t.text, generator);
      EXPECT_TRUE(loss.device().is_cuda());
      t.step->optimizer_step(optim.lr);
      losses.push_back(loss.item<double>());
    }
    return losses;
  };
  const auto first = run(), second = run();
  // The first loss depends only on the seeds; later ones may differ in the last bits (GPU backward
  // kernels that accumulate with atomics are not bitwise deterministic).
  EXPECT_EQ(first[0], second[0]);
  for (size_t s = 1; s < first.size(); ++s) EXPECT_NEAR(first[s], second[s], 1e-2 * first[s]) << "step " << s;
  const double early = (first[0] + first[1] + first[2] + first[3] + first[4]) / 5;
  const double late = (first[35] + first[36] + first[37] + first[38] + first[39]) / 5;
  EXPECT_LT(late, early);
}

TEST(Train, ForeachAdamWIsAdamWBitwise) {
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

TEST(Train, CapturableAdamWMatchesAdamWAndClipGradNorm) {
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

TEST(Train, CapturableAdamWRefusesWhatItCannotCapture) {
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

TEST(Train, GraphedStepIsTrainStepWhenUncaptured) {
  // On the CPU the graphed step runs uncaptured: the same draws, loss and update as TrainStep with
  // AdamW and clip_grad_norm_ (here SC-Tuners and LoRA together, clipping on, lr changing).
  common::OptimOptions optim;
  optim.lr = 1e-3;
  optim.max_grad_norm = 0.05;
  TinyTraining plain("scedit+lora", common::Precision::kFP32, torch::kCPU, optim);
  TinyTraining graphed("scedit+lora", common::Precision::kFP32, torch::kCPU, optim);
  common::GraphedTrainStep graphed_step(*graphed.step, /*seed=*/5);
  EXPECT_FALSE(graphed_step.captures());
  auto generator = torch::make_generator<at::CPUGeneratorImpl>(5);  // what the graphed step draws from
  for (int s = 0; s < 5; ++s) {
    const double lr = optim.lr / (1 + s);
    const double expected = plain.step->forward_backward(plain.latents, plain.text, generator).item<double>();
    plain.step->optimizer_step(lr);
    const double loss = graphed_step.run(graphed.latents, graphed.text, lr).item<double>();
    EXPECT_NEAR(loss, expected, 1e-6 * expected) << "step " << s;
  }
  graphed_step.sync_optimizer_state();
  const auto& a = plain.step->parameters();
  const auto& b = graphed.step->parameters();
  ASSERT_EQ(a.size(), b.size());
  for (size_t i = 0; i < a.size(); ++i) {
    EXPECT_TRUE(torch::allclose(a[i], b[i], 1e-5, 1e-7)) << "parameter " << i << ": "
        << (a[i] - b[i]).abs().max().item<double>();
    const auto& state = static_cast<torch::optim::AdamWParamState&>(
        *graphed.step->optimizer().state().at(scedit::compat::optimizer_state_key(b[i])));
    EXPECT_EQ(state.step(), 5);
  }
  // CUDA graphs replay fixed shapes: another batch size is refused, naming both.
  const auto message = error_of([&] { graphed_step.run(graphed.latents.slice(0, 0, 2), graphed.text.slice(0, 0, 2), 1e-3); });
  EXPECT_NE(message.find("[2, 4, 8, 8]"), std::string::npos) << message;
  EXPECT_NE(message.find("[4, 4, 8, 8]"), std::string::npos) << message;
}

TEST(Train, GraphedStepReplaysTheEagerStep_CUDA) {
  if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA device";
  const torch::Device device(torch::kCUDA, 0);
  // The same seeded run captured after two eager steps and replayed, and never captured: the
  // replays draw the same noise and make the same updates.
  common::OptimOptions optim;
  optim.lr = 1e-3;
  optim.max_grad_norm = 1.0;
  auto run = [&](bool capture) {
    TinyTraining t("scedit+lora", common::Precision::kBF16, device, optim);
    common::GraphedTrainStep graphed(*t.step, /*seed=*/5, /*eager_steps=*/2, capture);
    EXPECT_EQ(graphed.captures(), capture);
    std::vector<double> losses;
    for (int s = 0; s < 30; ++s) losses.push_back(graphed.run(t.latents, t.text, optim.lr).item<double>());
    graphed.sync_optimizer_state();
    std::vector<torch::Tensor> params;
    for (const auto& p : t.step->parameters()) params.push_back(p.detach().cpu());
    return std::make_pair(losses, params);
  };
  const auto [eager_losses, eager_params] = run(false);
  const auto [graphed_losses, graphed_params] = run(true);
  for (size_t s = 0; s < eager_losses.size(); ++s) {
    EXPECT_NEAR(graphed_losses[s], eager_losses[s], 1e-2 * eager_losses[s]) << "step " << s;
  }
  for (size_t i = 0; i < eager_params.size(); ++i) {
    EXPECT_TRUE(torch::allclose(graphed_params[i], eager_params[i], 1e-2, 1e-4)) << "parameter " << i;
  }
  const double early = (graphed_losses[0] + graphed_losses[1] + graphed_losses[2]) / 3;
  const double late = (graphed_losses[27] + graphed_losses[28] + graphed_losses[29]) / 3;
  EXPECT_LT(late, early);
}

TEST(Train, TrainableWeightsStayFloat32UnderHalfPrecision) {
  auto pipe = sd::tiny_pipeline(0, torch::kBFloat16);
  common::MethodOptions options;
  options.method = "scedit+lora";
  options.lora_rank = 4;
  auto tuners = common::attach_tuners(pipe.unet, options, torch::kCPU);
  for (const auto& p : pipe.unet->named_parameters()) {
    EXPECT_EQ(p.value().scalar_type(), p.value().requires_grad() ? torch::kFloat32 : torch::kBFloat16) << p.key();
  }
}

class Checkpoints : public ::testing::Test {
 protected:
  void SetUp() override {
    torch::manual_seed(0);
    layer = torch::nn::Linear(3, 2);
    optimizer = std::make_unique<torch::optim::AdamW>(layer->parameters(), torch::optim::AdamWOptions(0.1));
    layer(torch::randn({4, 3})).sum().backward();
    optimizer->step();  // give AdamW some state
    tensors = {{"weight", layer->weight}, {"bias", layer->bias}};
    root = temp_dir(::testing::UnitTest::GetInstance()->current_test_info()->name());
  }
  common::TrainState state(int64_t step) { return {step, 7, 1.0, {{"method", "scedit"}}}; }

  torch::nn::Linear layer{nullptr};
  std::unique_ptr<torch::optim::AdamW> optimizer;
  scedit::TensorMap tensors;
  fs::path root;
};

TEST_F(Checkpoints, RoundTripRestoresWeightsOptimizerAndState) {
  const auto saved_weight = layer->weight.detach().clone();
  common::save_checkpoint(root, tensors, *optimizer, state(10), 0);
  {
    torch::NoGradGuard no_grad;
    layer->weight.zero_();
  }
  auto fresh = torch::optim::AdamW(layer->parameters(), torch::optim::AdamWOptions(0.1));
  auto loaded = common::load_checkpoint(common::resolve_checkpoint(root, "latest"), tensors, fresh);
  EXPECT_EQ(loaded.step, 10);
  EXPECT_EQ(loaded.seed, 7u);
  EXPECT_EQ(loaded.run.at("method"), "scedit");
  EXPECT_TRUE(torch::equal(layer->weight, saved_weight));
  EXPECT_EQ(fresh.state().size(), optimizer->state().size());
}

TEST_F(Checkpoints, KeepsOnlyTheNewestAndIgnoresUnfinishedSaves) {
  for (int64_t step : {10, 20, 30}) common::save_checkpoint(root, tensors, *optimizer, state(step), 2);
  auto all = common::list_checkpoints(root);
  ASSERT_EQ(all.size(), 2u);
  EXPECT_EQ(all.back().filename(), "step-00000030");
  // A save that crashed midway leaves a temporary folder: never picked, whatever it holds.
  fs::create_directories(root / "step-00000040.tmp-999");
  std::ofstream(root / "step-00000040.tmp-999" / "state.json") << "{}";
  EXPECT_EQ(common::resolve_checkpoint(root, "latest").filename(), "step-00000030");
}

TEST_F(Checkpoints, CorruptCheckpointsAreRefusedByName) {
  auto folder = common::save_checkpoint(root, tensors, *optimizer, state(10), 0);
  // Truncated weights.
  fs::resize_file(folder / "tuners.safetensors", fs::file_size(folder / "tuners.safetensors") - 5);
  auto message = error_of([&] { common::load_checkpoint(folder, tensors, *optimizer); });
  EXPECT_NE(message.find("tuners.safetensors"), std::string::npos) << message;
  // Broken state.json.
  folder = common::save_checkpoint(root, tensors, *optimizer, state(20), 0);
  std::ofstream(folder / "state.json") << "{\"step\": ";
  message = error_of([&] { common::load_checkpoint(folder, tensors, *optimizer); });
  EXPECT_NE(message.find("state.json"), std::string::npos) << message;
  // Garbage optimizer state.
  folder = common::save_checkpoint(root, tensors, *optimizer, state(30), 0);
  std::ofstream(folder / "optimizer.pt") << "not a torch archive";
  message = error_of([&] { common::load_checkpoint(folder, tensors, *optimizer); });
  EXPECT_NE(message.find("optimizer.pt"), std::string::npos) << message;
  // Another run's tensors.
  folder = common::save_checkpoint(root, tensors, *optimizer, state(40), 0);
  scedit::TensorMap other = {{"weight", layer->weight}};
  message = error_of([&] { common::load_checkpoint(folder, other, *optimizer); });
  EXPECT_NE(message.find("another method or model"), std::string::npos) << message;
  EXPECT_NE(error_of([&] { common::resolve_checkpoint(root / "none", "latest"); }).find("no complete checkpoint"),
            std::string::npos);
}

TEST(Train, GradientCheckpointingGivesTheSameGradients) {
  // Float64, SC-Tuners and LoRA with random (non-identity) weights: one loss, two ways.
  auto pipe = sd::tiny_pipeline(0, torch::kFloat64);
  torch::manual_seed(0);
  common::MethodOptions options;
  options.method = "scedit+lora";
  options.lora_rank = 4;
  auto tuners = common::attach_tuners(pipe.unet, options, torch::kCPU);
  auto params = scedit::tuner_parameters(*pipe.unet);
  {
    torch::NoGradGuard no_grad;
    for (auto& p : params) p.set_data(p.data().to(torch::kFloat64).normal_(0, 0.1));
  }
  auto latents = torch::randn({2, 4, 8, 8}, torch::kFloat64);
  auto text = torch::randn({2, 77, 32}, torch::kFloat64);
  auto t = torch::tensor({10, 700}, torch::kLong);
  auto gradients = [&](bool checkpointing) {
    pipe.unet->set_gradient_checkpointing(checkpointing);
    for (auto& p : params) p.mutable_grad() = torch::Tensor();
    tuners.refresh();
    pipe.unet->forward(latents, t, text).square().mean().backward();
    std::vector<torch::Tensor> grads;
    for (auto& p : params) grads.push_back(p.grad().clone());
    return grads;
  };
  const auto plain = gradients(false), recomputed = gradients(true);
  ASSERT_EQ(plain.size(), recomputed.size());
  for (size_t i = 0; i < plain.size(); ++i) {
    ASSERT_TRUE(recomputed[i].defined()) << "parameter " << i;
    EXPECT_TRUE(torch::allclose(plain[i], recomputed[i], 1e-10, 1e-12)) << "parameter " << i;
  }
}
