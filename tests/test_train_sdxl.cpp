// The training step on SDXL's layout (examples/common on the tiny SDXL): batches with pooled
// captions and each sample's size conditioning, the VAE's float32 encode under float16, SC-Tuner
// steps eager and graphed, and text-encoder LoRA on both encoders.

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

using scedit_test::error_of;

// ---- SDXL ------------------------------------------------------------------------------------

namespace {

/// Two captioned images of other sizes than the resolution (64): "wide" 160x128 (W x H) and
/// "tall" 96x192, captions beside them.
fs::path write_two_sizes(const fs::path& folder) {
  fs::create_directories(folder);
  auto gen = common::make_cpu_generator(1);
  common::write_png((folder / "wide.png").string(), torch::randint(0, 256, {128, 160, 3}, gen, torch::kLong).to(torch::kUInt8));
  common::write_png((folder / "tall.png").string(), torch::randint(0, 256, {192, 96, 3}, gen, torch::kLong).to(torch::kUInt8));
  std::ofstream(folder / "wide.txt") << "a wide image";
  std::ofstream(folder / "tall.txt") << "a tall image";
  return folder;
}

/// diffusers' add_time_ids of each of the two images at 64 px, centre-cropped, by hand:
/// (original h, w, crop top, left, target h, w). wide 128x160 -> 64x80, crop from column 8;
/// tall 192x96 -> 128x64, crop from row 32.
std::vector<float> expected_time_ids(const std::string& file) {
  if (file.find("wide") != std::string::npos) return {128, 160, 0, 8, 64, 64};
  return {192, 96, 32, 0, 64, 64};
}

}  // namespace

TEST(Train, SDXLBatchesCarryThePooledCaptionsAndEachSamplesSizeAndCrop) {
  scedit_test::TempDir dir("sdxl_batches");
  auto pipe = sd::tiny_sdxl_pipeline();
  common::CaptionedImageDataset data(write_two_sizes(dir.path() / "data"), common::DatasetOptions(64).center_crop(true));
  ASSERT_EQ(data.size(), 2);
  const std::vector<int64_t> indices = {1, 0};
  std::vector<std::string> captions;
  for (auto i : indices) captions.push_back(data.items()[i].caption);
  const auto text = sd::encode_text(pipe, captions);
  const auto empty = sd::encode_text(pipe, {""});
  for (const bool cache : {false, true}) {
    common::BatchSource batches(pipe, data, common::BatchOptions().cache(cache), torch::kCPU);
    auto generator = common::step_generator(0, 0);
    const auto batch = batches.get(indices, generator);
    EXPECT_EQ(batch.text.sizes(), (std::vector<int64_t>{2, 77, 80})) << "cache " << cache;
    ASSERT_TRUE(batch.added.text_embeds.defined());
    EXPECT_EQ(batch.added.text_embeds.sizes(), (std::vector<int64_t>{2, 40}));
    EXPECT_TRUE(torch::allclose(batch.added.text_embeds, text.pooled, 1e-5, 1e-6));
    EXPECT_TRUE(torch::allclose(batch.text, text.context, 1e-5, 1e-6));
    ASSERT_EQ(batch.added.time_ids.sizes(), (std::vector<int64_t>{2, 6}));
    for (int64_t b = 0; b < 2; ++b) {
      const auto& file = data.items()[indices[b]].file;
      EXPECT_TRUE(torch::equal(batch.added.time_ids[b], torch::tensor(expected_time_ids(file)))) << file << ": "
          << batch.added.time_ids[b];
    }
  }
  // A dropped caption is the empty prompt's, its pooled embedding too (diffusers encodes "").
  common::BatchSource dropped(pipe, data, common::BatchOptions().caption_dropout(1.0), torch::kCPU);
  auto generator = common::step_generator(0, 0);
  const auto batch = dropped.get(indices, generator);
  for (int64_t b = 0; b < 2; ++b) {
    EXPECT_TRUE(torch::equal(batch.text[b], empty.context[0])) << b;
    EXPECT_TRUE(torch::equal(batch.added.text_embeds[b], empty.pooled[0])) << b;
  }
  // Token ids for a text encoder that trains: both tokenizers', and the time ids alone.
  common::BatchSource tokens(pipe, data, common::BatchOptions().tokens(true), torch::kCPU);
  auto again = common::step_generator(0, 0);
  const auto ids = tokens.get(indices, again);
  EXPECT_TRUE(torch::equal(ids.text, sd::tokenize_prompts(pipe, captions)));
  EXPECT_FALSE(ids.added.text_embeds.defined());
  EXPECT_TRUE(torch::equal(ids.added.time_ids, batch.added.time_ids));
  // SD 1.5 batches carry none.
  auto sd15 = sd::tiny_pipeline();
  common::BatchSource plain(sd15, data, common::BatchOptions(), torch::kCPU);
  auto third = common::step_generator(0, 0);
  EXPECT_FALSE(plain.get(indices, third).added.defined());
}

TEST(Train, SDXLFloat16VaeEncodesBatchesInFloat32) {
  // SDXL's VAE says force_upcast: in float16 it encodes training batches in float32, as diffusers'
  // SDXL training script holds its VAE. The float32 VAE's latents, from the same float16-rounded
  // weights (and the CPU, which has no float16 convolutions, can run it).
  scedit_test::TempDir dir("sdxl_float16_vae");
  auto pipe = sd::tiny_sdxl_pipeline();
  common::CaptionedImageDataset data(write_two_sizes(dir.path() / "data"), common::DatasetOptions(64).center_crop(true));
  auto latents_of = [&](bool cache) {
    auto draws = common::step_generator(0, 0);
    return common::BatchSource(pipe, data, common::BatchOptions().cache(cache), torch::kCPU).get({1, 0}, draws).latents;
  };
  pipe.vae->to(torch::kHalf);
  for (const bool cache : {false, true}) {
    pipe.vae->to(torch::kFloat32);
    const auto rounded = latents_of(cache);
    pipe.vae->to(torch::kHalf);
    EXPECT_TRUE(torch::equal(latents_of(cache), rounded)) << "cache " << cache;
    EXPECT_EQ(pipe.vae->parameters().front().scalar_type(), torch::kHalf);
  }
}

TEST(Train, TinySDXLTrainsSCTunersEagerAndGraphedAlike) {
  scedit_test::TempDir dir("sdxl_steps");
  common::CaptionedImageDataset data(write_two_sizes(dir.path() / "data"), common::DatasetOptions(64));
  common::OptimOptions optim;
  optim.lr = 1e-3;
  auto run = [&](bool graphed) {
    auto pipe = sd::tiny_sdxl_pipeline();
    torch::manual_seed(0);
    common::MethodOptions options;
    auto tuners = common::attach_tuners(pipe.unet, options, torch::kCPU);
    EXPECT_EQ(tuners.sc.size(), 9u);
    pipe.unet->train();
    const auto trainable = common::tuner_trainable(pipe.unet, tuners, options);
    common::TrainStep step(trainable.denoiser, trainable.tensors(), sd::noise_schedule(pipe), optim,
                           sd::Precision::kFP32, torch::kCPU, "v_prediction");
    common::BatchSource batches(pipe, data, common::BatchOptions(), torch::kCPU);
    auto generator = common::step_generator(0, 0);
    const auto batch = batches.get({0, 1, 0, 1}, generator);
    std::optional<common::GraphedTrainStep> graphed_step;
    if (graphed) graphed_step.emplace(step);
    std::vector<double> losses;
    for (int s = 0; s < 4; ++s) {
      auto draws = common::step_generator(5, s);
      if (graphed) {
        losses.push_back(graphed_step->run(batch, optim.lr, draws).item<double>());
      } else {
        losses.push_back(step.forward_backward(batch, draws).item<double>());
        step.optimizer_step(optim.lr);
      }
      EXPECT_TRUE(std::isfinite(losses.back())) << "step " << s;
    }
    double moved = 0;
    for (const auto& tuner : tuners.sc) moved = std::max(moved, tuner->tuner_op->ln2->weight.abs().max().item<double>());
    EXPECT_GT(moved, 0.0) << "the SC-Tuners' zero-initialised ln2 trained";
    return losses;
  };
  const auto eager = run(false), graphed = run(true);
  for (size_t s = 0; s < eager.size(); ++s) EXPECT_NEAR(graphed[s], eager[s], 1e-6 * eager[s]) << "step " << s;
}

TEST(Train, SDXLTextEncoderLoRATrainsBothEncodersFromTokens) {
  scedit_test::TempDir dir("sdxl_text_lora");
  auto pipe = sd::tiny_sdxl_pipeline();
  torch::manual_seed(0);
  common::MethodOptions options;
  options.method = "lora";
  options.lora_rank = 4;
  options.train_text_encoder = true;
  auto tuners = common::attach_tuners(pipe.unet, options, torch::kCPU);
  common::attach_text_encoder_lora(tuners, pipe, options, torch::kCPU);
  ASSERT_TRUE(tuners.text_lora.has_value());
  ASSERT_TRUE(tuners.text_lora_2.has_value());
  const double lr = 1e-3;
  const auto trainable = common::tuner_trainable(pipe.unet, tuners, options, &pipe, lr);
  EXPECT_TRUE(trainable.text_as_tokens);
  const auto text_count = scedit::tuner_parameters(*pipe.text_encoder).size() +
                          scedit::tuner_parameters(*pipe.text_encoder_2).size();
  ASSERT_EQ(trainable.groups.size(), 2u);
  EXPECT_EQ(trainable.groups[1].first, text_count);
  EXPECT_EQ(trainable.parameters.back().first.rfind("text_encoder_2.", 0), 0u) << trainable.parameters.back().first;

  // At init the denoiser on token ids and time ids is the UNet on the frozen encoders'
  // context and pooled embedding.
  const std::vector<std::string> captions = {"a red circle", "a cat"};
  const auto ids = sd::tokenize_prompts(pipe, captions);
  const auto sizes = std::vector<sd::SizeConditioning>{sd::SizeConditioning::uncropped(64, 64)};
  auto noisy = torch::randn({2, 4, 8, 8});
  auto t = torch::tensor({10, 700}, torch::kLong);
  const auto time_ids = sd::SizeConditioning::uncropped(64, 64).time_ids().expand({2, 6});
  {
    torch::NoGradGuard no_grad;
    const auto text = sd::encode_text(pipe, captions);
    const auto frozen = pipe.unet->forward(noisy, t, text.context, sd::added_conditions(pipe, text.pooled, sizes));
    EXPECT_TRUE(torch::allclose(trainable.denoiser(noisy, t, ids, {{}, time_ids}, {}), frozen, 1e-5, 1e-6));
  }
  // One step reaches the second encoder's LoRA (its B, zero at init, gets a gradient).
  common::OptimOptions optim;
  optim.lr = lr;
  common::TrainStep step(trainable.denoiser, trainable.tensors(), sd::NoiseSchedule(), optim,
                         sd::Precision::kFP32, torch::kCPU, "epsilon", trainable.groups);
  common::TrainBatch batch{torch::randn({2, 4, 8, 8}), ids, {{}, time_ids}, {}};
  auto generator = common::step_generator(0, 0);
  EXPECT_TRUE(std::isfinite(step.forward_backward(batch, generator).item<double>()));
  double second = 0;
  for (const auto& p : scedit::tuner_parameters(*pipe.text_encoder_2)) {
    if (p.grad().defined()) second = std::max(second, p.grad().abs().max().item<double>());
  }
  EXPECT_GT(second, 0.0);
  ASSERT_TRUE(step.optimizer_step(lr));

  // Saved: a peft folder per text encoder, and one Kohya file naming them te1 and te2.
  const auto written = tuners.save(dir.path() / "out");
  EXPECT_TRUE(fs::exists(dir.path() / "out" / "lora_text_encoder_2" / "adapter_model.safetensors"));
  const auto kohya = scedit::safetensors::load((dir.path() / "out" / "lora_kohya.safetensors").string());
  bool te1 = false, te2 = false;
  for (const auto& entry : kohya) {
    te1 |= entry.first.rfind("lora_te1_", 0) == 0;
    te2 |= entry.first.rfind("lora_te2_", 0) == 0;
  }
  EXPECT_TRUE(te1 && te2);
}

