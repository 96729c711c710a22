// Tests of the built-in tiny model (sd/tiny.hpp), the sampler (sd/sampler.hpp) and tuner files
// (sd/tuner_files.hpp), all on the tiny model at 64×64 (one at 72×104) with few steps. SDXL and
// zero terminal SNR: test_generate_families.cpp.

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

// ---- the tiny model ------------------------------------------------------------------------------

TEST(TinyPipeline, SameSeedSameWeightsAndGlobalGeneratorUntouched) {
  torch::manual_seed(123);
  const auto before = torch::randn({4});
  torch::manual_seed(123);
  auto a = sd::tiny_pipeline(3);
  const auto after = torch::randn({4});
  EXPECT_TRUE(torch::equal(before, after)) << "tiny_pipeline changed the global generator's stream";

  auto b = sd::tiny_pipeline(3);
  auto c = sd::tiny_pipeline(4);
  const auto sa = scedit::state_dict(*a.unet), sb = scedit::state_dict(*b.unet),
             sc = scedit::state_dict(*c.unet);
  ASSERT_EQ(sa.size(), sb.size());
  bool any_differs = false;
  for (const auto& [key, value] : sa) {
    EXPECT_TRUE(torch::equal(value, sb.at(key))) << key;
    any_differs = any_differs || !torch::equal(value, sc.at(key));
  }
  EXPECT_TRUE(any_differs) << "seeds 3 and 4 gave the same UNet";
}

TEST(TinyPipeline, HasSD15Layout) {
  auto pipe = sd::tiny_pipeline();
  EXPECT_EQ(pipe.unet->skip_sites().size(), 12u);  // SD 1.5's 12 skip connections
  EXPECT_EQ(pipe.unet_config.down_block_types, sd::UNetConfig::sd15().down_block_types);
  EXPECT_EQ(pipe.unet_config.up_block_types, sd::UNetConfig::sd15().up_block_types);
  EXPECT_EQ(sd::vae_scale_factor(pipe), 8);
  EXPECT_EQ(sd::default_image_size(pipe), 64);
  EXPECT_EQ(pipe.unet_config.cross_attention_dim, pipe.text_config.hidden_size);
}

// What makes a tuner's learning show on random weights (tiny.hpp): a narrow posterior, latents of
// about unit spread, and v as the target, on SD 1.5's noise schedule.
TEST(TinyPipeline, PredictsVWithANarrowPosteriorAndLatentsOfUnitSpread) {
  auto pipe = sd::tiny_pipeline();
  EXPECT_EQ(sd::prediction_type(pipe), "v_prediction");
  EXPECT_EQ(sd::prediction_type(sd::StableDiffusion{}), "epsilon");  // no scheduler config: SD 1.5's
  const auto schedule = sd::noise_schedule(pipe);
  const auto reference = sd::NoiseSchedule();  // SD 1.5's
  EXPECT_TRUE(torch::allclose(schedule.alphas_cumprod(), reference.alphas_cumprod()));
  torch::NoGradGuard no_grad;
  auto image = [](uint64_t seed) {
    return scedit_test::random_image(64, 64, seed).permute({2, 0, 1}).to(torch::kFloat32) / 127.5 - 1;
  };
  const auto images = torch::stack({image(1), image(2)});
  const auto posterior = pipe.vae->encode(images);
  EXPECT_LT(posterior.logvar.max().item<double>(), -20.0);
  const double spread = sd::posterior_latents(pipe, posterior).std().item<double>();
  EXPECT_GT(spread, 0.3);
  EXPECT_LT(spread, 3.0);
}

TEST(TinyPipeline, TokenizerIsByteLevelWithClipIds) {
  auto pipe = sd::tiny_pipeline();
  const auto& tokenizer = *pipe.tokenizer;
  EXPECT_EQ(tokenizer.vocab_size(), pipe.text_config.vocab_size);
  EXPECT_EQ(tokenizer.bos_id(), 512);
  EXPECT_EQ(tokenizer.eos_id(), 513);
  // CLIP's vocab.json: "a</w>" = 320 and the bare byte symbols at 0..255 in bytes_to_unicode order
  // ('!' = 0, so 'a' = 0x61 − 0x21 = 64, 'c' = 66; "t</w>" = 256 + 0x74 − 0x21 = 339).
  EXPECT_EQ(tokenizer.encode("a cat"), (std::vector<int64_t>{512, 320, 66, 64, 339, 513}));
  EXPECT_EQ(tokenizer.decode(tokenizer.encode("Hello, world! 123")), "hello , world ! 1 2 3");
  const auto embeddings = sd::encode_prompts(pipe, {"a cat", ""});
  EXPECT_EQ(embeddings.sizes(), (std::vector<int64_t>{2, 77, 32}));
}

// Another model's tokenizer (CLIP's 49,408 tokens before a text encoder of 1,000) is refused as
// the prompts are tokenized, naming the id and the vocabulary, not by an index error inside.
TEST(TinyPipeline, RefusesATokenizerWhoseIdsTheTextEncoderLacks) {
  auto pipe = sd::tiny_pipeline();
  pipe.tokenizer = sd::load_tokenizer(scedit_test::data_dir() / "clip");
  const auto message = error_of([&] { sd::encode_prompts(pipe, {"a cat"}); });
  EXPECT_NE(message.find("past the text encoder's vocabulary of " + std::to_string(pipe.text_config.vocab_size)),
            std::string::npos) << message;
}

// ---- sampling ----------------------------------------------------------------------------------

TEST(Generate, SameSeedSameImageOtherSeedOtherImage) {
  auto pipe = sd::tiny_pipeline();
  const auto a = sd::generate(pipe, {"a red circle"}, small_options(5));
  const auto b = sd::generate(pipe, {"a red circle"}, small_options(5));
  const auto c = sd::generate(pipe, {"a red circle"}, small_options(6));
  ASSERT_EQ(a.size(), 1u);
  EXPECT_EQ(a[0].sizes(), (std::vector<int64_t>{64, 64, 3}));
  EXPECT_EQ(a[0].scalar_type(), torch::kUInt8);
  EXPECT_TRUE(torch::equal(a[0], b[0]));
  EXPECT_FALSE(torch::equal(a[0], c[0]));
  // The images are not degenerate (all one value), or the comparisons above would mean little.
  EXPECT_GT(a[0].to(torch::kFloat32).std().item<double>(), 1.0);
}

TEST(Generate, ImageDependsOnlyOnItsSeedNotOnBatching) {
  auto pipe = sd::tiny_pipeline();
  auto options = small_options(20);
  options.batch_size = 2;
  options.images_per_prompt = 2;
  // Prompt-major: images 0, 1 from "p" (seeds 20, 21), 2, 3 from "q" (seeds 22, 23).
  const auto all = sd::sample_latents(pipe, {"p", "q"}, options);
  ASSERT_EQ(all.size(0), 4);
  auto single = small_options(23);
  const auto alone = sd::sample_latents(pipe, {"q"}, single);
  EXPECT_TRUE(torch::allclose(all[3], alone[0], 1e-5, 1e-5));
  EXPECT_FALSE(torch::allclose(all[2], all[3], 1e-3, 1e-3));
}

TEST(Generate, GuidanceOneEqualsTheConditionalPath) {
  auto pipe = sd::tiny_pipeline();
  torch::NoGradGuard no_grad;
  auto generator = at::detail::createCPUGenerator(3);
  const auto latents = torch::randn({2, 4, 8, 8}, generator);
  const auto cond = sd::encode_prompts(pipe, {"a", "b"});
  const auto uncond = sd::encode_prompts(pipe, {"", ""});
  const auto t = torch::full({1}, 500, torch::kInt64);
  const auto eps_cond = pipe.unet(latents, t, cond);
  const auto eps_uncond = pipe.unet(latents, t, uncond);
  // The batched [uncond; cond] call with guidance 1 (any rescale) is the conditional prediction.
  const auto guided_one = sd::predict_noise(pipe.unet, latents, 500, cond, uncond, 1.0, 0.5);
  EXPECT_TRUE(torch::allclose(guided_one, eps_cond, 1e-4, 1e-5));
  // Guidance 3 without rescale: uncond + 3·(cond − uncond), from two separate UNet calls.
  const auto guided = sd::predict_noise(pipe.unet, latents, 500, cond, uncond, 3.0, 0.0);
  EXPECT_TRUE(torch::allclose(guided, eps_uncond + 3.0 * (eps_cond - eps_uncond), 1e-4, 1e-5));
}

TEST(Generate, MatchesAHandWrittenDDIMLoopWithoutGuidance) {
  auto pipe = sd::tiny_pipeline();
  auto options = small_options(9);
  options.guidance_scale = 1.0;  // no classifier-free guidance
  const auto latents = sd::sample_latents(pipe, {"a blue square"}, options);
  const auto image = sd::generate(pipe, {"a blue square"}, options)[0];

  // The same sampler written out: SD 1.5's DDIM with trailing spacing, for a UNet that predicts
  // v as the tiny one does, noise from the seed.
  torch::NoGradGuard no_grad;
  sd::DDIMScheduler scheduler(
      sd::DDIMSchedulerOptions().timestep_spacing("trailing").prediction_type("v_prediction"));
  scheduler.set_timesteps(3);
  auto generator = at::detail::createCPUGenerator(9);
  auto x = torch::randn({1, 4, 8, 8}, generator);
  const auto text = pipe.text_encoder->forward((*pipe.tokenizer)({"a blue square"})).last_hidden_state;
  for (int64_t i = 0; i < 3; ++i) {
    const int64_t t = scheduler.timesteps()[i].item<int64_t>();
    x = scheduler.step(pipe.unet(x, torch::full({1}, t, torch::kInt64), text), t, x);
  }
  EXPECT_TRUE(torch::allclose(latents, x, 1e-5, 1e-6));
  const auto reference = sd::to_uint8(pipe.vae->decode(x / pipe.vae_config.scaling_factor))[0];
  EXPECT_LE(max_pixel_difference(image, reference), 1);
}

TEST(Generate, ImageToImageStrengthZeroIsTheVAERoundTrip) {
  auto pipe = sd::tiny_pipeline();
  const auto init = random_image(4);
  auto options = small_options(2);
  options.init_image = init;
  options.strength = 0.0;
  const auto image = sd::generate(pipe, {"anything"}, options)[0];
  torch::NoGradGuard no_grad;
  const auto round_trip =
      sd::to_uint8(pipe.vae->decode(pipe.vae->encode(sd::to_float(init).unsqueeze(0)).mean))[0];
  EXPECT_LE(max_pixel_difference(image, round_trip), 1);
  // With strength > 0 the image is denoised, so it changes.
  options.strength = 0.7;
  EXPECT_GT(max_pixel_difference(sd::generate(pipe, {"anything"}, options)[0], round_trip), 1);
}

TEST(Generate, RefusesBadSizesAndSteps) {
  auto pipe = sd::tiny_pipeline();
  auto options = small_options();
  options.width = 65;
  EXPECT_NE(error_of([&] { sd::generate(pipe, {"x"}, options); }).find("width must be a positive multiple of 8, got 65"),
            std::string::npos);
  options = small_options();
  options.height = 100;
  EXPECT_NE(error_of([&] { sd::generate(pipe, {"x"}, options); }).find("height must be a positive multiple of 8, got 100"),
            std::string::npos);
  for (int64_t steps : {0, -2}) {
    options = small_options();
    options.steps = steps;
    EXPECT_NE(error_of([&] { sd::generate(pipe, {"x"}, options); })
                  .find("steps must be > 0, got " + std::to_string(steps)),
              std::string::npos);
  }
  options = small_options();
  EXPECT_NE(error_of([&] { sd::generate(pipe, {}, options); }).find("no prompts"), std::string::npos);
  options.eta = 1.01;  // σ past √(1 − ᾱ_prev): a square root of a negative number
  EXPECT_NE(error_of([&] { sd::generate(pipe, {"x"}, options); }).find("eta must be in [0, 1], got 1.01"),
            std::string::npos);
  options = small_options();
  options.steps = 2;
  options.init_image = torch::zeros({options.height, options.width, 3}, torch::kUInt8);
  options.strength = 0.4;  // int(2 · 0.4) = 0 steps
  EXPECT_NE(error_of([&] { sd::generate(pipe, {"x"}, options); }).find("strength 0.4 of 2 steps runs none of them"),
            std::string::npos);
}

// 72×104 is 9×13 latents, which the UNet's downsamplers round up (5×7, 3×4, 2×2): its upsamplers
// follow the skips back, as diffusers' do. A CSC-Tuner's hints and a ControlNet's residuals line
// up with those skips too.
TEST(Generate, MakesImagesWhoseLatentsDoNotHalveEvenly) {
  auto pipe = sd::tiny_pipeline();
  sd::AttachedTuners tuners;
  const auto csc = sd::attach_tuner_file(pipe, csc_tuner_file(), 1.0, tuners);
  auto options = small_options();
  options.width = 72;
  options.height = 104;
  const int64_t latent_multiple = sd::vae_scale_factor(pipe) * pipe.unet->downsampling_factor();
  ASSERT_TRUE(options.width % latent_multiple != 0 && options.height % latent_multiple != 0);
  options.conditions = {{csc.name, scedit_test::random_image(options.height, options.width, 8)}};
  options.controlnets = {{sd::controlnet_from_unet(pipe.unet),
                          scedit_test::random_image(options.height, options.width, 9), 1.0}};
  const auto images = sd::generate(pipe, {"a cat"}, options);
  ASSERT_EQ(images.size(), 1u);
  EXPECT_EQ(images[0].sizes(), (std::vector<int64_t>{options.height, options.width, 3}));
  EXPECT_EQ(images[0].scalar_type(), torch::kUInt8);
}

// Latents that turn NaN or Inf are refused before the VAE, naming the step: decoded they would
// make a black image that looks like a result.
TEST(Generate, RefusesNonFiniteLatentsNamingTheStep) {
  auto options = small_options();
  const auto steps = std::to_string(options.steps);
  {
    // A NaN weight in the UNet spoils the first step.
    auto pipe = sd::tiny_pipeline();
    torch::NoGradGuard no_grad;
    pipe.unet->conv_out->bias.view(-1)[0] = std::numeric_limits<float>::quiet_NaN();
    EXPECT_NE(error_of([&] { sd::generate(pipe, {"a cat"}, options); })
                  .find("became NaN or Inf at denoising step 1 of " + steps),
              std::string::npos);
  }
  // A finite but absurd guidance scale overflows within the run; which step depends on the
  // model, but one is named, and neither entry point hands the latents on.
  auto pipe = sd::tiny_pipeline();
  options.guidance_scale = 1e30;
  for (const auto& run : std::vector<std::function<void()>>{
           [&] { sd::generate(pipe, {"a cat"}, options); },
           [&] { sd::sample_latents(pipe, {"a cat"}, options); }}) {
    const auto message = error_of(run);
    EXPECT_NE(message.find("became NaN or Inf at denoising step "), std::string::npos) << message;
    EXPECT_NE(message.find(" of " + steps + " (timestep "), std::string::npos) << message;
  }
}

TEST(Generate, RunsInBF16OnTheCPU) {
  auto pipe = sd::tiny_pipeline();
  auto options = small_options(3);
  options.steps = 2;
  const auto fp32 = sd::sample_latents(pipe, {"a cat"}, options);
  // bf16 weights and autocast, with a bf16 SC-Tuner attached (tuners take the UNet's dtype).
  auto half = sd::tiny_pipeline(0, torch::kBFloat16);
  sd::AttachedTuners tuners;
  sd::attach_tuner_file(half, sc_tuner_file(), 0.0, tuners);
  options.precision = sd::Precision::kBF16;
  const auto bf16 = sd::sample_latents(half, {"a cat"}, options);
  EXPECT_EQ(bf16.scalar_type(), torch::kFloat32);
  // bf16 weights and activations keep ~3 significant digits: the same latents within ~10%.
  const double error = (bf16 - fp32).norm().item<double>() / fp32.norm().item<double>();
  EXPECT_LT(error, 0.1);
  std::printf("bf16 vs fp32 latents: relative error %.4f\n", error);
  EXPECT_EQ(sd::generate(half, {"a cat"}, options)[0].sizes(), (std::vector<int64_t>{64, 64, 3}));
  options.precision = sd::Precision::kFP16;
  EXPECT_NE(error_of([&] { sd::generate(pipe, {"a cat"}, options); }).find("fp16 needs a CUDA device"),
            std::string::npos);
}

// ---- tuner files -------------------------------------------------------------------------------

namespace {

/// Attaches `file` at scale 0 and at 1 to fresh tiny pipelines: 0 must give the plain pipeline's
/// latents exactly, 1 must change them; `check` sees what was attached.
void expect_zero_scale_exact_and_one_changes(const std::string& file,
                                             const std::function<void(const sd::AttachedTuner&)>& check) {
  auto plain = sd::tiny_pipeline();
  const auto base = sd::sample_latents(plain, {"a cat"}, small_options());
  for (double scale : {0.0, 1.0}) {
    auto pipe = sd::tiny_pipeline();
    sd::AttachedTuners tuners;
    check(sd::attach_tuner_file(pipe, file, scale, tuners));
    const auto latents = sd::sample_latents(pipe, {"a cat"}, small_options());
    if (scale == 0.0) {
      EXPECT_TRUE(torch::equal(latents, base));
    } else {
      EXPECT_FALSE(torch::allclose(latents, base, 1e-3, 1e-3));
    }
  }
}

}  // namespace

TEST(TunerFiles, SCTunerAtScaleZeroIsExactAndAtOneChangesTheImage) {
  expect_zero_scale_exact_and_one_changes(sc_tuner_file(), [](const sd::AttachedTuner& tuner) {
    EXPECT_EQ(tuner.kind, scedit::TunerKind::kSC);
    EXPECT_EQ(tuner.count, 12);
  });
}

TEST(TunerFiles, LoRAAtWeightZeroIsExactAndAtOneChangesTheImage) {
  const auto file = lora_file();
  ASSERT_EQ(scedit::detect_tuner_file(file), scedit::TunerKind::kLoRA);
  expect_zero_scale_exact_and_one_changes(file, [](const sd::AttachedTuner& tuner) {
    EXPECT_EQ(tuner.kind, scedit::TunerKind::kLoRA);
    EXPECT_GT(tuner.count, 0);
  });
}

TEST(TunerFiles, SeveralFilesShareOnePipeline) {
  auto pipe = sd::tiny_pipeline();
  sd::AttachedTuners tuners;
  sd::attach_tuner_file(pipe, sc_tuner_file(), 0.5, tuners);
  sd::attach_tuner_file(pipe, lora_file(), 0.5, tuners);
  sd::attach_tuner_file(pipe, lora_file(), 0.0, tuners);  // a second LoRA: same injection
  ASSERT_EQ(tuners.tuners.size(), 3u);
  EXPECT_EQ(tuners.tuners[1].name, "lora1");
  EXPECT_EQ(tuners.describe(), "sc.safetensors:0.5, lora_kohya.safetensors:0.5, lora_kohya.safetensors:0");
  EXPECT_EQ(sd::generate(pipe, {"x"}, small_options()).size(), 1u);
}

TEST(TunerFiles, CSCTunerNeedsItsConditionAndIsExactAtScaleZero) {
  const auto file = csc_tuner_file();
  const auto condition = random_image(8);
  auto plain = sd::tiny_pipeline();
  const auto base = sd::sample_latents(plain, {"a cat"}, small_options());
  EXPECT_NE(error_of([&] {
              auto options = small_options();
              options.conditions = {{"csc0", condition}};
              sd::generate(plain, {"a cat"}, options);
            }).find("a condition is given for CSC-Tuner 'csc0', but the UNet has no CSC-Tuner"),
            std::string::npos);
  for (double scale : {0.0, 1.0}) {
    auto pipe = sd::tiny_pipeline();
    sd::AttachedTuners tuners;
    const auto tuner = sd::attach_tuner_file(pipe, file, scale, tuners);
    EXPECT_EQ(tuner.kind, scedit::TunerKind::kCSC);
    auto options = small_options();
    if (scale == 1.0) {
      EXPECT_NE(error_of([&] { sd::generate(pipe, {"a cat"}, options); })
                    .find("CSC-Tuner '" + tuner.name + "' is attached but has no condition image"),
                std::string::npos);
    }
    options.conditions = {{tuner.name, condition}};
    const auto latents = sd::sample_latents(pipe, {"a cat"}, options);
    if (scale == 0.0) {
      EXPECT_TRUE(torch::equal(latents, base));
    } else {
      EXPECT_FALSE(torch::allclose(latents, base, 1e-3, 1e-3));
      EXPECT_FALSE(scedit::csc_tuners(*pipe.unet)[tuner.name]->has_condition())
          << "the condition outlived the call";
    }
  }
}

TEST(TunerFiles, EachCSCTunerTakesItsOwnCondition) {
  auto pipe = sd::tiny_pipeline();
  sd::AttachedTuners tuners;
  const auto first = sd::attach_tuner_file(pipe, csc_tuner_file(), 1.0, tuners);
  const auto second = sd::attach_tuner_file(pipe, csc_tuner_file(), 0.5, tuners);
  const auto a = random_image(8), b = random_image(9);
  auto with = [&](const torch::Tensor& for_first, const torch::Tensor& for_second) {
    auto options = small_options();
    options.conditions = {{first.name, for_first}, {second.name, for_second}};
    return sd::sample_latents(pipe, {"a cat"}, options);
  };
  const auto ab = with(a, b);
  EXPECT_TRUE(torch::equal(with(a, b), ab));
  EXPECT_FALSE(torch::allclose(with(b, a), ab, 1e-3, 1e-3)) << "the tuners' conditions are not their own";
  // A condition must line up with the image pixel for pixel: another size is refused.
  auto options = small_options();
  options.conditions = {{first.name, a}, {second.name, torch::zeros({32, 64, 3}, torch::kUInt8)}};
  EXPECT_NE(error_of([&] { sd::generate(pipe, {"a cat"}, options); })
                .find("the condition of CSC-Tuner '" + second.name + "' is 64x32 but the images are 64x64"),
            std::string::npos);
}

// Each kind of tuner file holding a NaN is refused on attaching, naming the file and the tensor,
// and leaves the model as it was.
TEST(TunerFiles, RefusesFilesHoldingNaNNamingTheTensor) {
  auto pipe = sd::tiny_pipeline();
  const auto before = scedit::state_dict(*pipe.unet).size();
  for (const auto& file : {sc_tuner_file(), csc_tuner_file(), lora_file()}) {
    auto tensors = scedit::safetensors::load(file);
    auto metadata = scedit::safetensors::load_metadata(file);
    const auto key = tensors.rbegin()->first;  // the last by name: not the one a scan meets first
    auto spoiled = tensors.rbegin()->second.clone();
    spoiled.view(-1)[0] = std::numeric_limits<float>::quiet_NaN();
    tensors[key] = spoiled;
    const auto path = (scratch() / ("nan_" + std::filesystem::path(file).filename().string())).string();
    scedit::safetensors::save(path, tensors, metadata);
    sd::AttachedTuners tuners;
    const auto message = error_of([&] { sd::attach_tuner_file(pipe, path, 1.0, tuners); });
    EXPECT_NE(message.find("'" + path + "'"), std::string::npos) << message;
    EXPECT_NE(message.find("tensor '" + key + "'"), std::string::npos) << message;
    EXPECT_TRUE(tuners.tuners.empty());
  }
  EXPECT_EQ(scedit::state_dict(*pipe.unet).size(), before) << "a refused file left something attached";
}

TEST(TunerFiles, RefusesMissingAndUnknownFiles) {
  auto pipe = sd::tiny_pipeline();
  sd::AttachedTuners tuners;
  EXPECT_NE(error_of([&] { sd::attach_tuner_file(pipe, "/nonexistent/x.safetensors", 1, tuners); })
                .find("does not exist"),
            std::string::npos);
  const auto unknown = (scratch() / "unknown.safetensors").string();
  scedit::safetensors::save(unknown, {{"foo.weight", torch::zeros({2})}});
  EXPECT_NE(error_of([&] { sd::attach_tuner_file(pipe, unknown, 1, tuners); }).find("holds neither"),
            std::string::npos);
  EXPECT_TRUE(tuners.tuners.empty());
}


// ---- conditions and inpainting -------------------------------------------------------------------

TEST(Conditions, SeveralCSCTunersAndAnSCTunerSampleAsTheFormula) {
  // generate with two CSC-Tuners (scales 1 and 0.5, control scale 0.8) and an SC-Tuner equals a
  // DDIM loop written out whose every UNet call gives each CSC-Tuner its own condition.
  auto pipe = sd::tiny_pipeline();
  sd::AttachedTuners tuners;
  const auto a = sd::attach_tuner_file(pipe, csc_tuner_file(), 1.0, tuners);
  const auto b = sd::attach_tuner_file(pipe, csc_tuner_file(), 0.5, tuners);
  sd::attach_tuner_file(pipe, sc_tuner_file(), 1.0, tuners);
  scedit::set_control_scale(*pipe.unet, 0.8);
  const auto image_a = random_image(21), image_b = random_image(22);
  auto options = small_options(9);
  options.guidance_scale = 1.0;
  options.conditions = {{a.name, image_a}, {b.name, image_b}};
  const auto latents = sd::sample_latents(pipe, {"a house"}, options);

  torch::NoGradGuard no_grad;
  const auto csc = scedit::csc_tuners(*pipe.unet);
  scedit::ConditionScope scope;
  auto to_condition = [](const torch::Tensor& image) {  // uint8 [H, W, 3] -> [1, 3, H, W] in [0, 1]
    return image.permute({2, 0, 1}).unsqueeze(0).to(torch::kFloat32) / 255.0;
  };
  scope.set(csc[a.name], to_condition(image_a)).set(csc[b.name], to_condition(image_b));
  sd::DDIMScheduler scheduler(  // the tiny model's: it predicts v
      sd::DDIMSchedulerOptions().timestep_spacing("trailing").prediction_type("v_prediction"));
  scheduler.set_timesteps(3);
  auto generator = at::detail::createCPUGenerator(9);
  auto x = torch::randn({1, 4, 8, 8}, generator);
  const auto text = sd::encode_prompts(pipe, {"a house"});
  for (int64_t i = 0; i < 3; ++i) {
    const int64_t t = scheduler.timesteps()[i].item<int64_t>();
    x = scheduler.step(pipe.unet(x, torch::full({1}, t, torch::kInt64), text), t, x);
  }
  EXPECT_TRUE(torch::allclose(latents, x, 1e-5, 1e-6));
}

TEST(Conditions, AConditionAtScaleZeroIsNoCondition) {
  auto with_second = [](double scale) {
    auto pipe = sd::tiny_pipeline();
    sd::AttachedTuners tuners;
    const auto a = sd::attach_tuner_file(pipe, csc_tuner_file(), 1.0, tuners);
    auto options = small_options(4);
    options.conditions = {{a.name, random_image(31)}};
    if (scale >= 0) {
      const auto b = sd::attach_tuner_file(pipe, csc_tuner_file(), scale, tuners);
      options.conditions.push_back({b.name, random_image(32)});
    }
    return sd::sample_latents(pipe, {"a tree"}, options);
  };
  const auto alone = with_second(-1);
  EXPECT_TRUE(torch::equal(with_second(0.0), alone));
  EXPECT_FALSE(torch::allclose(with_second(1.0), alone, 1e-3, 1e-3));
}

TEST(Conditions, InpaintingKeepsTheInitImageOutsideTheMask) {
  auto pipe = sd::tiny_pipeline();
  auto options = small_options(6);
  options.init_image = random_image(5);
  options.strength = 1.0;
  auto mask = torch::zeros({64, 64}, torch::kUInt8);
  mask.narrow(1, 0, 32).fill_(255);  // the left half is made anew: latent columns 0-3
  options.mask = mask;
  const auto latents = sd::sample_latents(pipe, {"a cat"}, options);
  const auto init = sd::encode_images(pipe, sd::to_float(options.init_image).unsqueeze(0));
  EXPECT_TRUE(torch::equal(latents.narrow(3, 4, 4), init.narrow(3, 4, 4))) << "the kept region changed";
  EXPECT_FALSE(torch::allclose(latents.narrow(3, 0, 4), init.narrow(3, 0, 4), 1e-2, 1e-2));
  // Without the mask the kept half changes too.
  options.mask = torch::Tensor();
  EXPECT_FALSE(torch::allclose(sd::sample_latents(pipe, {"a cat"}, options).narrow(3, 4, 4),
                               init.narrow(3, 4, 4), 1e-2, 1e-2));
  options.mask = mask;
  options.init_image = torch::Tensor();
  EXPECT_NE(error_of([&] { sd::generate(pipe, {"a cat"}, options); }).find("a mask needs the init_image"),
            std::string::npos);
}
