// Generation on the other families' settings, on tiny models with few steps: SDXL's pooled
// prompt and size conditioning (sd/sampler.hpp with a tiny SDXL), and the zero-terminal-SNR
// schedule that SD 2.1-v style models sample from (sd/scheduler.hpp).

#include <sd/controlnet_weights.hpp>
#include <sd/pipeline.hpp>
#include <sd/sampler.hpp>
#include <sd/tiny.hpp>
#include <sd/tuner_files.hpp>

#include <scedit/csctuner.hpp>
#include <scedit/safetensors.hpp>
#include <scedit/state_dict.hpp>
#include <scedit/tuner_io.hpp>

#include <gtest/gtest.h>
#include <torch/torch.h>

#include <filesystem>
#include <functional>
#include <limits>
#include <string>
#include <vector>

#include "generate_fixtures.hpp"
#include "test_util.hpp"

using namespace scedit_test::generate;
using scedit_test::error_of;

// ---- SDXL --------------------------------------------------------------------------------------

TEST(GenerateSdxl, SameSeedSameImageAndTheFamilysDefaultSize) {
  auto pipe = sd::tiny_sdxl_pipeline();
  const auto a = sd::generate(pipe, {"a red circle"}, small_options(5));
  const auto b = sd::generate(pipe, {"a red circle"}, small_options(5));
  const auto c = sd::generate(pipe, {"a red circle"}, small_options(6));
  ASSERT_EQ(a.size(), 1u);
  EXPECT_EQ(a[0].sizes(), (std::vector<int64_t>{64, 64, 3}));
  EXPECT_TRUE(torch::equal(a[0], b[0]));
  EXPECT_FALSE(torch::equal(a[0], c[0]));
  EXPECT_GT(a[0].to(torch::kFloat32).std().item<double>(), 1.0);
  // The native sizes generate defaults to: UNet sample_size × VAE factor of each family.
  sd::StableDiffusion sd21, sdxl;
  sd21.unet_config = sd::UNetConfig::sd21();
  sd21.vae_config = sd::VAEConfig::sd15();
  sdxl.unet_config = sd::UNetConfig::sdxl();
  sdxl.vae_config = sd::VAEConfig::sdxl();
  EXPECT_EQ(sd::default_image_size(sd21), 768);
  EXPECT_EQ(sd::default_image_size(sdxl), 1024);
  EXPECT_EQ(sd::default_image_size(pipe), 64);
}

// One guided step written out as diffusers' StableDiffusionXLPipeline runs it: the empty negative
// prompt is zeros (context and pooled), the time ids (original, crop, target) default to the
// image's size without a crop, and both halves of the batch read them.
TEST(GenerateSdxl, OneGuidedStepMatchesAHandWrittenOneWithZerosForTheEmptyNegativePrompt) {
  auto pipe = sd::tiny_sdxl_pipeline();
  auto options = small_options(4);
  options.steps = 1;
  options.guidance_scale = 5.0;
  const auto latents = sd::sample_latents(pipe, {"a cat"}, options);

  torch::NoGradGuard no_grad;
  auto generator = at::detail::createCPUGenerator(4);
  const auto x = torch::randn({1, 4, 8, 8}, generator);
  const auto text = sd::encode_text(pipe, {"a cat"});
  const auto time_ids = torch::tensor({64.f, 64.f, 0.f, 0.f, 64.f, 64.f}).expand({2, 6});
  auto scheduler = sd::make_scheduler(pipe, "trailing");
  scheduler.set_timesteps(1);
  ASSERT_EQ(scheduler.timesteps()[0].item<int64_t>(), 999);
  auto step = [&](const sd::TextConditioning& negative) {
    const auto v = pipe.unet(torch::cat({x, x}), torch::full({1}, 999, torch::kInt64),
                             torch::cat({negative.context, text.context}),
                             sd::UNetAddedConditions{torch::cat({negative.pooled, text.pooled}), time_ids});
    const auto halves = v.chunk(2);
    return scheduler.step(sd::classifier_free_guidance(halves[0], halves[1], 5.0, 0.5), 999, x);
  };
  EXPECT_TRUE(torch::allclose(latents, step({torch::zeros_like(text.context), torch::zeros_like(text.pooled)}),
                              1e-5, 1e-6));
  // The empty prompt's encoding would have given other latents: the test tells the two apart.
  EXPECT_FALSE(torch::allclose(latents, step(sd::encode_text(pipe, {""})), 1e-4, 1e-4));
  // A negative prompt that is not empty is encoded.
  options.negative_prompt = "blurry";
  EXPECT_TRUE(torch::allclose(sd::sample_latents(pipe, {"a cat"}, options),
                              step(sd::encode_text(pipe, {"blurry"})), 1e-5, 1e-6));
}

TEST(GenerateSdxl, SizeConditioningChangesTheImageAndDefaultsToTheImageSize) {
  auto pipe = sd::tiny_sdxl_pipeline();
  auto options = small_options(7);
  const auto plain = sd::sample_latents(pipe, {"a cat"}, options);
  options.size_conditioning = sd::SizeConditioning::uncropped(64, 64);  // diffusers' default
  EXPECT_TRUE(torch::equal(sd::sample_latents(pipe, {"a cat"}, options), plain));
  options.size_conditioning = sd::SizeConditioning{256, 128, 0, 0, 64, 64};  // another original size
  const auto other_original = sd::sample_latents(pipe, {"a cat"}, options);
  EXPECT_FALSE(torch::allclose(other_original, plain, 1e-3, 1e-3));
  options.size_conditioning = sd::SizeConditioning{64, 64, 16, 8, 64, 64};  // a crop
  EXPECT_FALSE(torch::allclose(sd::sample_latents(pipe, {"a cat"}, options), plain, 1e-3, 1e-3));
  // The negative half's own conditioning (diffusers' negative_original_size …) takes part too.
  options.size_conditioning.reset();
  options.negative_size_conditioning = sd::SizeConditioning{256, 128, 0, 0, 64, 64};
  EXPECT_FALSE(torch::allclose(sd::sample_latents(pipe, {"a cat"}, options), plain, 1e-3, 1e-3));
  options.negative_size_conditioning = sd::SizeConditioning{0, 64, 0, 0, 64, 64};
  EXPECT_NE(error_of([&] { sd::generate(pipe, {"a cat"}, options); }).find("sizes must be positive"),
            std::string::npos);
}

TEST(GenerateSdxl, RefusesSizeConditioningOnSD15AndGivesControlNetsTheAddedConditioning) {
  auto sd15 = sd::tiny_pipeline();
  auto options = small_options();
  options.size_conditioning = sd::SizeConditioning::uncropped(64, 64);
  EXPECT_NE(error_of([&] { sd::generate(sd15, {"a cat"}, options); })
                .find("size conditioning (original size, crop, target size) is SDXL's"),
            std::string::npos);
  // A ControlNet made from the SDXL UNet adds nothing until its zero convolutions learn; then its
  // residuals, which read the pooled text and the size ids as the UNet does, change the image.
  auto sdxl = sd::tiny_sdxl_pipeline();
  options = small_options();
  const auto plain = sd::sample_latents(sdxl, {"a cat"}, options);
  auto controlnet = sd::controlnet_from_unet(sdxl.unet);
  options.controlnets = {{controlnet, scedit_test::random_image(64, 64, 2), 1.0}};
  EXPECT_TRUE(torch::equal(sd::sample_latents(sdxl, {"a cat"}, options), plain));
  {
    torch::NoGradGuard no_grad;
    for (auto& p : controlnet->controlnet_mid_block->parameters()) p.normal_(0.0, 0.05);
  }
  const auto controlled = sd::sample_latents(sdxl, {"a cat"}, options);
  EXPECT_FALSE(torch::allclose(controlled, plain, 1e-3, 1e-3));
  options.size_conditioning = sd::SizeConditioning{256, 128, 0, 0, 64, 64};
  EXPECT_FALSE(torch::allclose(sd::sample_latents(sdxl, {"a cat"}, options), controlled, 1e-3, 1e-3));
  // SD 1.5's ControlNet reads no added conditioning: refused, not run on the wrong inputs.
  options = small_options();
  options.controlnets = {{sd::controlnet_from_unet(sd15.unet), scedit_test::random_image(64, 64, 2), 1.0}};
  EXPECT_NE(error_of([&] { sd::generate(sdxl, {"a cat"}, options); }).find("ControlNetModel"),
            std::string::npos);
}

// ---- zero terminal SNR -------------------------------------------------------------------------

// Lin et al. 2023, algorithm 1, recomputed in float64 from the betas: √ᾱ shifted to end at 0 and
// scaled to start where it started. The float32 schedule (diffusers' arithmetic) must match it.
TEST(ZeroTerminalSnr, RescalesTheRootOfAlphaBarLinearlyToZero) {
  for (const std::string kind : {"scaled_linear", "linear"}) {
    const auto options = sd::NoiseScheduleOptions().beta_schedule(kind);
    const sd::NoiseSchedule plain(options), zero(sd::NoiseScheduleOptions(options).rescale_betas_zero_snr(true));
    const auto betas = kind == "linear" ? torch::linspace(0.00085, 0.012, 1000, torch::kFloat64)
                                        : torch::linspace(std::sqrt(0.00085), std::sqrt(0.012), 1000,
                                                          torch::kFloat64).pow(2);
    const auto root = (1 - betas).cumprod(0).sqrt();
    const auto first = root[0], last = root[-1];
    const auto expected = ((root - last) * (first / (first - last))).pow(2);
    const auto& alphas = zero.alphas_cumprod();
    EXPECT_EQ(alphas[-1].item<float>(), 0.0f) << kind;        // ᾱ_{T−1} = 0 exactly
    EXPECT_EQ(zero.betas()[-1].item<float>(), 1.0f) << kind;
    EXPECT_GT(alphas[-2].item<float>(), 0.0f) << kind;        // only the last one
    EXPECT_NEAR(alphas[0].item<float>(), plain.alphas_cumprod()[0].item<float>(), 1e-6) << kind;
    EXPECT_TRUE(torch::allclose(zero.alphas_cumprod64(), expected, 1e-4, 1e-12)) << kind;
    EXPECT_FALSE(torch::allclose(plain.alphas_cumprod64(), expected, 1e-2, 1e-6)) << kind;
  }
}

TEST(ZeroTerminalSnr, FromJsonTakesItAndEpsilonIsRefusedWhereTheScheduleIsUsed) {
  nlohmann::json config = sd::DDIMSchedulerOptions().prediction_type("v_prediction").to_json();
  config["rescale_betas_zero_snr"] = true;
  const auto options = sd::DDIMSchedulerOptions::from_json(config);
  EXPECT_TRUE(options.schedule().rescale_betas_zero_snr());
  EXPECT_EQ(sd::DDIMScheduler(options).schedule().alphas_cumprod()[-1].item<float>(), 0.0f);
  // Sampling with ε is refused, saying why; training too, when its target is ε.
  config["prediction_type"] = "epsilon";
  const auto epsilon = sd::DDIMSchedulerOptions::from_json(config);
  EXPECT_NE(error_of([&] { sd::DDIMScheduler scheduler(epsilon); })
                .find("needs prediction_type v_prediction, not epsilon: at the last timestep ᾱ = 0"),
            std::string::npos);
  sd::StableDiffusion pipe;
  pipe.scheduler_config = config;
  const auto schedule = sd::noise_schedule(pipe);  // training may choose v itself
  const auto x0 = torch::randn({1, 4, 8, 8}), noise = torch::randn({1, 4, 8, 8});
  const auto t = torch::full({1}, 999, torch::kInt64);
  EXPECT_NE(error_of([&] { schedule.prediction_target("epsilon", x0, noise, t); })
                .find("needs prediction_type v_prediction"),
            std::string::npos);
  EXPECT_TRUE(torch::equal(schedule.prediction_target("v_prediction", x0, noise, t), -x0));  // v = −x₀ at ᾱ = 0
}

TEST(ZeroTerminalSnr, VPredictionSamplingFromTheLastTimestepIsFinite) {
  auto options = sd::DDIMSchedulerOptions().timestep_spacing("trailing").prediction_type("v_prediction");
  options.schedule().rescale_betas_zero_snr(true);
  sd::DDIMScheduler scheduler(options);
  scheduler.set_timesteps(4);
  ASSERT_EQ(scheduler.timesteps()[0].item<int64_t>(), 999);
  // At ᾱ = 0 the predicted x₀ is −v, whatever the sample.
  const auto sample = torch::randn({1, 4, 8, 8}), v = torch::randn({1, 4, 8, 8});
  EXPECT_TRUE(torch::equal(scheduler.step_output(v, 999, sample).pred_original_sample, -v));

  // The tiny model (v prediction) with the flag's config key: finite latents, other than without.
  auto pipe = sd::tiny_pipeline();
  const auto plain = sd::sample_latents(pipe, {"a cat"}, small_options(3));
  sd::set_scheduler_option(pipe.scheduler_config, "rescale_betas_zero_snr", true);
  const auto zero = sd::sample_latents(pipe, {"a cat"}, small_options(3));
  EXPECT_TRUE(torch::isfinite(zero).all().item<bool>());
  EXPECT_FALSE(torch::allclose(zero, plain, 1e-3, 1e-3));
  // A model without a scheduler config gets SD 1.5's, with the key set.
  sd::StableDiffusion bare;
  sd::set_scheduler_option(bare.scheduler_config, "rescale_betas_zero_snr", true);
  const auto bare_options = sd::scheduler_options(bare);
  EXPECT_TRUE(bare_options.schedule().rescale_betas_zero_snr());
  EXPECT_EQ(bare_options.schedule().beta_schedule(), "scaled_linear");
  EXPECT_EQ(bare_options.steps_offset(), 1);
  EXPECT_FALSE(bare_options.set_alpha_to_one());
  EXPECT_EQ(sd::DDIMSchedulerOptions::from_json(bare_options.to_json()).to_json(), bare_options.to_json());
}
