// The shared training step (examples/common): schedules, a short seeded run on the tiny model
// lowers the loss, the gradient reduction's place in the step, batches with conditions.
// SDXL's batches and steps: test_train_sdxl.cpp. Checkpoints and the output folder:
// test_checkpoints.cpp.

#include <common/batches.hpp>
#include <common/checkpoint.hpp>
#include <common/distributed.hpp>
#include <common/graphed_step.hpp>
#include <common/lean.hpp>
#include <common/png.hpp>
#include <common/run.hpp>
#include <common/sample_order.hpp>
#include <common/train_step.hpp>
#include <common/tuners.hpp>
#include <scedit/csctuner.hpp>
#include <sd/stable_diffusion.hpp>
#include <sd/tiny.hpp>

#include <gtest/gtest.h>
#include <torch/torch.h>

#include <cstdio>
#include <filesystem>
#include <algorithm>
#include <fstream>
#include <optional>
#include <string>
#include <vector>

#include "test_util.hpp"

namespace fs = std::filesystem;

namespace {

using scedit_test::error_of;

/// The tiny model with tuners and a TrainStep on `device`, and a fixed batch of four "images"
/// (latents) and captions: the tuners learn to denoise them.
struct TinyTraining {
  sd::StableDiffusion pipe;
  common::TrainedTuners tuners;
  common::Trainable trainable;
  std::unique_ptr<common::TrainStep> step;
  common::TrainBatch batch;

  TinyTraining(const std::string& method, sd::Precision precision, torch::Device device,
               const common::OptimOptions& optim)
      : pipe(sd::tiny_pipeline(0, sd::compute_dtype(precision))) {
    pipe.unet->to(device);
    torch::manual_seed(0);
    common::MethodOptions options;
    options.method = method;
    options.lora_rank = 4;
    tuners = common::attach_tuners(pipe.unet, options, device);
    pipe.unet->train();
    trainable = common::tuner_trainable(pipe.unet, tuners, options);
    step = std::make_unique<common::TrainStep>(trainable.denoiser, trainable.tensors(), sd::NoiseSchedule(),
                                               optim, precision, device);
    torch::NoGradGuard no_grad;
    batch.latents = (torch::randn({4, 4, 8, 8}, common::step_generator(7, 0)) * 0.5).to(device);
    batch.text = sd::encode_prompts(pipe, {"a red circle", "a blue square", "a green star", "a cat"}).to(device);
  }
};

/// Mean loss of the first and the last `window` steps of a seeded run on the tiny model.
std::pair<double, double> short_run(const std::string& method, sd::Precision precision,
                                    int64_t steps, int64_t window) {
  common::OptimOptions optim;
  optim.lr = 1e-3;
  TinyTraining t(method, precision, torch::kCPU, optim);
  double first = 0, last = 0;
  for (int64_t s = 0; s < steps; ++s) {
    auto generator = common::step_generator(0, s);
    const double loss = t.step->forward_backward(t.batch, generator).item<double>();
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
  EXPECT_NE(error_of([&] { common::check_optim_options(o); }).find("--lr-schedule must be"), std::string::npos);
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

// A run learns what its model predicts (the tiny model's v) unless --prediction names a target;
// a target the step cannot learn is refused by name.
TEST(Train, RunLearnsWhatTheModelPredictsUnlessTold) {
  scedit_test::TempDir dir("run");
  common::RunFlags flags;
  flags.output.output = (dir.path() / "out").string();
  const auto pipe = sd::tiny_pipeline();
  EXPECT_EQ(common::TrainingRun("test", flags).loss(pipe).prediction_type, "v_prediction");
  flags.optim.prediction = "epsilon";
  EXPECT_EQ(common::TrainingRun("test", flags).loss(pipe).prediction_type, "epsilon");
  flags.optim.prediction.clear();
  sd::StableDiffusion predicts_samples;
  predicts_samples.scheduler_config = {{"prediction_type", "sample"}};
  EXPECT_ERROR_MENTIONS(common::TrainingRun("test", flags).loss(predicts_samples), "predicts 'sample'");
}

TEST(Train, SeededSCEditRunLowersTheLoss) {
  const auto [first, last] = short_run("scedit", sd::Precision::kFP32, 60, 10);
  std::printf("SCEdit, tiny model, 60 steps: mean loss %.4f -> %.4f (%.1f%% lower)\n", first, last,
              100 * (1 - last / first));
  EXPECT_LT(last, 0.9 * first);
}

TEST(Train, SeededLoRARunLowersTheLoss) {
  const auto [first, last] = short_run("lora", sd::Precision::kFP32, 60, 10);
  std::printf("LoRA r=4, tiny model, 60 steps: mean loss %.4f -> %.4f (%.1f%% lower)\n", first, last,
              100 * (1 - last / first));
  EXPECT_LT(last, first);
}

TEST(Train, BF16StepsStayFinite) {
  const auto [first, last] = short_run("scedit+lora", sd::Precision::kBF16, 6, 3);
  EXPECT_TRUE(std::isfinite(first) && std::isfinite(last));
}

TEST(Train, StepsOnTheGpuAreSeededAndLowerTheLoss_CUDA) {
  if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA device";
  const torch::Device device(torch::kCUDA, 0);
  // Noise is drawn on the device from a generator seeded per micro-step: two runs agree exactly.
  auto run = [&] {
    common::OptimOptions optim;
    optim.lr = 1e-3;
    TinyTraining t("scedit", sd::Precision::kBF16, device, optim);
    std::vector<double> losses;
    for (int64_t s = 0; s < 40; ++s) {
      auto generator = common::step_generator(0, s);
      auto loss = t.step->forward_backward(t.batch, generator);
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

TEST(Train, GraphedStepIsTrainStepWhenUncaptured) {
  // On the CPU the graphed step runs uncaptured: the same draws, loss and update as TrainStep with
  // AdamW and clip_grad_norm_ (here SC-Tuners and LoRA together, clipping on, lr changing).
  common::OptimOptions optim;
  optim.lr = 1e-3;
  optim.max_grad_norm = 0.05;
  TinyTraining plain("scedit+lora", sd::Precision::kFP32, torch::kCPU, optim);
  TinyTraining graphed("scedit+lora", sd::Precision::kFP32, torch::kCPU, optim);
  common::GraphedTrainStep graphed_step(*graphed.step);
  EXPECT_FALSE(graphed_step.captures());
  for (int s = 0; s < 5; ++s) {
    const double lr = optim.lr / (1 + s);
    auto generator = common::step_generator(5, s), same = common::step_generator(5, s);
    const double expected = plain.step->forward_backward(plain.batch, generator).item<double>();
    plain.step->optimizer_step(lr);
    const double loss = graphed_step.run(graphed.batch, lr, same).item<double>();
    EXPECT_NEAR(loss, expected, 1e-6 * expected) << "step " << s;
  }
  graphed_step.sync_optimizer_state();
  const auto& a = plain.step->parameters();
  const auto& b = graphed.step->parameters();
  ASSERT_EQ(a.size(), b.size());
  // The two AdamW steps round differently (a device step count, another order of operations):
  // float32 rounding of updates of ~1e-3, on parameters that start at zero.
  for (size_t i = 0; i < a.size(); ++i) {
    EXPECT_TRUE(torch::allclose(a[i], b[i], 1e-5, 1e-6)) << "parameter " << i << ": "
        << (a[i] - b[i]).abs().max().item<double>();
    const auto& state = static_cast<torch::optim::AdamWParamState&>(
        *graphed.step->optimizer().state().at(scedit::compat::optimizer_state_key(b[i])));
    EXPECT_EQ(state.step(), 5);
  }
  // CUDA graphs replay fixed shapes: another batch size is refused, naming both.
  common::TrainBatch half{graphed.batch.latents.slice(0, 0, 2), graphed.batch.text.slice(0, 0, 2), {}, {}};
  auto generator = common::step_generator(5, 5);
  const auto message = error_of([&] { graphed_step.run(half, 1e-3, generator); });
  EXPECT_NE(message.find("[2, 4, 8, 8]"), std::string::npos) << message;
  EXPECT_NE(message.find("[4, 4, 8, 8]"), std::string::npos) << message;
}

TEST(Train, GraphedStepReplaysTheEagerStep_CUDA) {
  if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA device";
  const torch::Device device(torch::kCUDA, 0);
  // The same seeded run captured after two eager steps and replayed, and TrainStep's eager
  // steps: the replays train on the same draws and make the same updates.
  common::OptimOptions optim;
  optim.lr = 1e-3;
  optim.max_grad_norm = 1.0;
  auto run = [&](bool capture) {
    TinyTraining t("scedit+lora", sd::Precision::kBF16, device, optim);
    std::optional<common::GraphedTrainStep> graphed;
    if (capture) graphed.emplace(*t.step);
    EXPECT_TRUE(!capture || graphed->captures());
    std::vector<double> losses;
    for (int s = 0; s < 30; ++s) {
      auto generator = common::step_generator(5, s);
      if (capture) {
        losses.push_back(graphed->run(t.batch, optim.lr, generator).item<double>());
      } else {
        losses.push_back(t.step->forward_backward(t.batch, generator).item<double>());
        t.step->optimizer_step(optim.lr);
      }
    }
    if (capture) graphed->sync_optimizer_state();
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

TEST(Train, TunerTrainableIsWhatTheOptimizerAndCheckpointsSee) {
  auto pipe = sd::tiny_pipeline();
  common::MethodOptions options;
  options.method = "scedit+lora";
  options.lora_rank = 4;
  auto tuners = common::attach_tuners(pipe.unet, options, torch::kCPU);
  const auto trainable = common::tuner_trainable(pipe.unet, tuners, options);
  const auto expected = scedit::tuner_parameters(*pipe.unet);
  const auto tensors = trainable.tensors();
  ASSERT_EQ(tensors.size(), expected.size());
  for (size_t i = 0; i < tensors.size(); ++i) EXPECT_TRUE(tensors[i].is_same(expected[i])) << i;
  EXPECT_EQ(trainable.by_name().size(), tensors.size());
  EXPECT_EQ(trainable.settings, nlohmann::json({{"method", "scedit+lora"}}));
  // SC-Tuners and LoRA take no condition.
  auto x = torch::randn({1, 4, 8, 8});
  EXPECT_NE(error_of([&] {
              trainable.denoiser(x, torch::tensor({1}), torch::randn({1, 77, 32}), {}, {torch::rand({1, 3, 64, 64})});
            }).find("take no condition images"),
            std::string::npos);
}

// Counts what the step tells its gradient reduction, and zeroes the gradients in `finish` (as
// an all-reduce with nothing but zeros would).
struct ZeroingReduction : common::GradientReduction {
  std::vector<torch::Tensor> params;
  std::vector<bool> begun;  // begin_backward's `last`, call by call
  int64_t finished = 0;
  void begin_backward(bool last) override { begun.push_back(last); }
  void finish() override {
    ++finished;
    torch::NoGradGuard no_grad;
    for (const auto& p : params) {
      ASSERT_TRUE(p.grad().defined()) << "finish runs after the backward pass";
      p.grad().zero_();
    }
  }
};

TEST(Train, GradientReductionFinishesBeforeTheOptimizer) {
  // AdamW without weight decay then leaves the parameters as they were, eager (two micro-steps a
  // step: the second is the last) and graphed.
  common::OptimOptions optim;
  optim.lr = 1e-2;
  optim.weight_decay = 0;
  for (const bool graphed : {false, true}) {
    TinyTraining t("scedit", sd::Precision::kFP32, torch::kCPU, optim);
    auto reduction = std::make_shared<ZeroingReduction>();
    reduction->params = t.step->parameters();
    t.step->set_gradient_reduction(reduction);
    std::vector<torch::Tensor> before;
    for (const auto& p : t.step->parameters()) before.push_back(p.detach().clone());
    if (graphed) {
      common::GraphedTrainStep step(*t.step);
      for (int s = 0; s < 2; ++s) {
        auto generator = common::step_generator(3, s);
        step.run(t.batch, optim.lr, generator);
      }
      EXPECT_EQ(reduction->begun, std::vector<bool>({true, true}));
    } else {
      for (int s = 0; s < 2; ++s) {
        for (int a = 0; a < 2; ++a) {
          auto generator = common::step_generator(0, 2 * s + a);
          t.step->forward_backward(t.batch, generator, /*accumulation=*/2);
        }
        t.step->optimizer_step(optim.lr);
      }
      EXPECT_EQ(reduction->begun, std::vector<bool>({false, true, false, true}));
    }
    EXPECT_EQ(reduction->finished, 2) << (graphed ? "graphed" : "eager");
    for (size_t i = 0; i < before.size(); ++i) {
      EXPECT_TRUE(torch::equal(t.step->parameters()[i], before[i])) << "parameter " << i;
    }
  }
}

namespace {

/// Four samples, each with a condition image that is a function of its index, cropped and
/// flipped with its image (the one draw: flip).
class ConditionedSamples : public common::ImageSource {
 public:
  int64_t size() const override { return 4; }
  common::CaptionedImage get(int64_t index, torch::Generator& generator) const override {
    auto image = torch::linspace(-1, 1, 64).view({1, 1, 64}).expand({3, 64, 64}).clone() * (index + 1) / 4.0;
    auto condition = (image + 1) / 2;
    if (torch::rand({1}, generator).item<double>() < 0.5) {
      image = image.flip({2});
      condition = condition.flip({2});
    }
    return {image, "sample " + std::to_string(index), "", {condition}, {}};
  }
  std::string sample_key(int64_t index) const override { return "sample " + std::to_string(index); }
};

}  // namespace

TEST(Train, BatchesCarryConditionsAndACSCTunerTrainsOnThem) {
  auto pipe = sd::tiny_pipeline();
  ConditionedSamples data;
  common::BatchSource uncached(pipe, data, common::BatchOptions(), torch::kCPU);
  auto generator = common::step_generator(0, 0);
  const auto batch = uncached.get({2, 0, 3}, generator);
  EXPECT_EQ(batch.latents.sizes(), (std::vector<int64_t>{3, 4, 8, 8}));
  EXPECT_EQ(batch.text.sizes(), (std::vector<int64_t>{3, 77, 32}));
  ASSERT_EQ(batch.conditions.size(), 1u);
  EXPECT_EQ(batch.conditions[0].sizes(), (std::vector<int64_t>{3, 3, 64, 64}));
  for (int64_t b = 0; b < 3; ++b) {  // each condition belongs to its own sample: max (i + 1)/4 ... in [0, 1]
    const int64_t index = std::vector<int64_t>{2, 0, 3}[b];
    EXPECT_NEAR(batch.conditions[0][b].max().item<double>(), (1 + (index + 1) / 4.0) / 2, 1e-6) << b;
  }
  common::BatchSource cached(pipe, data, common::BatchOptions().cache(true), torch::kCPU);
  auto again = common::step_generator(0, 0);
  EXPECT_EQ(cached.get({2, 0, 3}, again).conditions[0].sizes(), batch.conditions[0].sizes());

  // A CSC-Tuner whose denoiser gives each batch its conditions through a ConditionScope: its
  // parameters (the hint encoder too) get gradients, and no condition outlives the step.
  torch::manual_seed(0);
  scedit::freeze_except_tuners(*pipe.unet);
  for (auto& p : pipe.unet->parameters()) p.set_requires_grad(false);
  scedit::CSCTuner csc(scedit::CSCTunerOptions(pipe.unet->skip_channels(), pipe.unet->skip_down_flags())
                           .hint_channels(16));
  scedit::attach_csc_tuner(*pipe.unet, csc, "canny");
  auto unet = pipe.unet;
  common::Denoiser denoiser = [unet, csc](const torch::Tensor& noisy, const torch::Tensor& t,
                                          const torch::Tensor& text, const sd::UNetAddedConditions&,
                                          const std::vector<torch::Tensor>& conditions) mutable {
    scedit::ConditionScope scope;
    scope.set(csc, conditions.at(0));
    return unet->forward(noisy, t, text);
  };
  common::TrainStep step(denoiser, csc->parameters(), sd::NoiseSchedule(), common::OptimOptions(),
                         sd::Precision::kFP32, torch::kCPU);
  auto draw = common::step_generator(0, 1);
  EXPECT_TRUE(std::isfinite(step.forward_backward(batch, draw).item<double>()));
  EXPECT_FALSE(csc->has_condition());
  for (const auto& p : csc->named_parameters()) {
    EXPECT_TRUE(p.value().grad().defined()) << p.key();
  }
}

TEST(Train, CaptionDropoutOfOneTrainsEveryCaptionEmptyAndZeroNone) {
  auto pipe = sd::tiny_pipeline();
  ConditionedSamples data;
  const auto empty = sd::encode_prompts(pipe, {""});
  for (const double dropout : {0.0, 1.0}) {
    common::BatchSource batches(pipe, data, common::BatchOptions().caption_dropout(dropout), torch::kCPU);
    auto generator = common::step_generator(0, 0);
    const auto text = batches.get({0, 1, 2, 3}, generator).text;
    for (int64_t b = 0; b < 4; ++b) EXPECT_EQ(torch::equal(text[b], empty[0]), dropout == 1.0) << b;
  }
  EXPECT_NE(error_of([&] {
              common::BatchSource(pipe, data, common::BatchOptions().caption_dropout(1.5), torch::kCPU);
            }).find("--caption-dropout must be in [0, 1], got 1.5"),
            std::string::npos);
}

TEST(Train, TextEncoderLoRATrainsFromTokensInItsOwnGroup) {
  auto pipe = sd::tiny_pipeline();
  torch::manual_seed(0);
  common::MethodOptions options;
  options.method = "lora";
  options.lora_rank = 4;
  options.train_text_encoder = true;
  options.text_encoder_lr = 2e-3;
  auto tuners = common::attach_tuners(pipe.unet, options, torch::kCPU);
  common::attach_text_encoder_lora(tuners, pipe, options, torch::kCPU);
  ASSERT_TRUE(tuners.text_lora.has_value());
  const double lr = 1e-3;
  const auto trainable = common::tuner_trainable(pipe.unet, tuners, options, &pipe, lr);
  EXPECT_TRUE(trainable.text_as_tokens);
  const auto unet_count = scedit::tuner_parameters(*pipe.unet).size();
  const auto text_count = scedit::tuner_parameters(*pipe.text_encoder).size();
  ASSERT_GT(text_count, 0u);
  ASSERT_EQ(trainable.groups.size(), 2u);
  EXPECT_EQ(trainable.groups[0], std::make_pair(unet_count, 1.0));
  EXPECT_EQ(trainable.groups[1].first, text_count);
  EXPECT_DOUBLE_EQ(trainable.groups[1].second, 2.0);
  EXPECT_EQ(trainable.parameters.back().first.rfind("text_encoder.", 0), 0u) << trainable.parameters.back().first;
  for (const auto& p : pipe.text_encoder->named_parameters()) {
    const bool lora = p.key().find("lora_") != std::string::npos;
    EXPECT_EQ(p.value().requires_grad(), lora) << p.key();
  }

  // At init (B = 0) the denoiser on token ids is the UNet on the frozen encoder's embeddings.
  const std::vector<std::string> captions = {"a red circle", "a cat"};
  const auto tokens = (*pipe.tokenizer)(captions);
  auto noisy = torch::randn({2, 4, 8, 8});
  auto t = torch::tensor({10, 700}, torch::kLong);
  {
    torch::NoGradGuard no_grad;
    const auto frozen = pipe.unet->forward(noisy, t, sd::encode_prompts(pipe, captions));
    EXPECT_TRUE(torch::allclose(trainable.denoiser(noisy, t, tokens, {}, {}), frozen, 1e-5, 1e-6));
  }

  // One step: AdamW's first update is ±lr per element, so each group moves at its own rate, and
  // the text encoder's base weights stay as they were.
  const auto base = pipe.text_encoder->named_parameters()["encoder.layers.0.self_attn.q_proj.weight"].clone();
  common::OptimOptions optim;
  optim.lr = lr;
  optim.weight_decay = 0;
  common::TrainStep step(trainable.denoiser, trainable.tensors(), sd::NoiseSchedule(), optim,
                         sd::Precision::kFP32, torch::kCPU, "epsilon", trainable.groups);
  EXPECT_EQ(step.learning_rates(lr), (std::vector<double>{lr, 2 * lr}));
  const auto before = trainable.tensors();
  std::vector<torch::Tensor> start;
  for (const auto& p : before) start.push_back(p.detach().clone());
  common::TrainBatch batch{torch::randn({2, 4, 8, 8}), tokens, {}, {}};
  auto generator = common::step_generator(0, 0);
  step.forward_backward(batch, generator);
  ASSERT_TRUE(step.optimizer_step(lr));
  auto largest_move = [&](size_t begin, size_t end) {
    double most = 0;
    for (size_t i = begin; i < end; ++i) most = std::max(most, (before[i] - start[i]).abs().max().item<double>());
    return most;
  };
  EXPECT_NEAR(largest_move(0, unet_count), lr, lr * 1e-3);
  EXPECT_NEAR(largest_move(unet_count, before.size()), 2 * lr, lr * 1e-3);
  EXPECT_TRUE(torch::equal(pipe.text_encoder->named_parameters()["encoder.layers.0.self_attn.q_proj.weight"], base));
}

TEST(Train, TextEncoderLoRANeedsLoRA) {
  common::MethodOptions options;
  options.train_text_encoder = true;
  EXPECT_NE(error_of([&] { common::check_method_options(options); }).find("--train-text-encoder"),
            std::string::npos);
  options.method = "lora";
  options.text_encoder_lr = -1;
  EXPECT_NE(error_of([&] { common::check_method_options(options); }).find("--text-encoder-lr"), std::string::npos);
}
