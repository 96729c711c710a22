// Tests of the built-in tiny model (sd/tiny.hpp), the sampler (sd/sampler.hpp), tuner files
// (sd/tuner_files.hpp) and the `generate` program, all on the tiny model at 64×64 with few steps.

#include <sd/sampler.hpp>
#include <sd/tiny.hpp>
#include <sd/tuner_files.hpp>

#include <common/image.hpp>
#include <common/png.hpp>

#include <scedit/csctuner.hpp>
#include <scedit/lora.hpp>
#include <scedit/lora_io.hpp>
#include <scedit/safetensors.hpp>
#include <scedit/sctuner.hpp>
#include <scedit/state_dict.hpp>
#include <scedit/trainable.hpp>
#include <scedit/tuner_io.hpp>

#include <gtest/gtest.h>
#include <torch/torch.h>

#include "test_util.hpp"

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <functional>
#include <sstream>
#include <string>
#include <vector>

#include <sys/wait.h>
#include <unistd.h>

namespace fs = std::filesystem;

namespace {

/// The settings every test starts from: 64×64 (8×8 latents), 3 steps, SCEdit's guidance.
sd::GenerateOptions small_options(uint64_t seed = 1) {
  sd::GenerateOptions options;
  options.width = 64;
  options.height = 64;
  options.steps = 3;
  options.seed = seed;
  return options;
}

using scedit_test::error_of;

/// A per-process scratch folder, removed at exit.
const fs::path& scratch() {
  static const scedit_test::TempDir dir("generate");
  return dir.path();
}

/// Fills every parameter of `module` with N(0, std²) from a seeded generator.
void randomize(torch::nn::Module& module, double std, uint64_t seed) {
  torch::NoGradGuard no_grad;
  auto generator = at::detail::createCPUGenerator(seed);
  for (auto& p : module.parameters()) p.copy_(torch::randn(p.sizes(), generator) * std);
}

/// SC-Tuners for the tiny UNet with random weights (ln2 non-zero, so they change the skips).
std::string sc_tuner_file() {
  const auto path = (scratch() / "sc.safetensors").string();
  if (fs::exists(path)) return path;
  auto pipe = sd::tiny_pipeline(0);
  auto tuners = scedit::attach_sc_tuners(*pipe.unet);
  for (auto& tuner : tuners) randomize(*tuner, 0.2, 11);
  scedit::save_sc_tuners(path, tuners);
  return path;
}

/// A Kohya-layout LoRA file for the tiny UNet's attention projections, B non-zero.
std::string lora_file() {
  const auto path = (scratch() / "lora_kohya.safetensors").string();
  if (fs::exists(path)) return path;
  auto pipe = sd::tiny_pipeline(0);
  auto lora = scedit::inject_lora(*pipe.unet, scedit::LoRAConfig(scedit::LoRAOptions(4).alpha(4))
                                                  .target_modules({"to_q", "to_k", "to_v", "to_out.0"}));
  {
    torch::NoGradGuard no_grad;
    auto generator = at::detail::createCPUGenerator(12);
    for (const auto& [path_in_model, layer] : lora.entries()) {
      auto b = layer->lora_B_weight("default");
      b.copy_(torch::randn(b.sizes(), generator) * 0.5);
    }
  }
  scedit::export_lora_kohya(path, lora);
  return path;
}

/// A CSC-Tuner for the tiny UNet with random weights everywhere (so its hint is non-zero).
std::string csc_tuner_file() {
  const auto path = (scratch() / "csc.safetensors").string();
  if (fs::exists(path)) return path;
  auto pipe = sd::tiny_pipeline(0);
  scedit::CSCTuner csc(scedit::CSCTunerOptions(pipe.unet->skip_channels(), pipe.unet->skip_down_flags())
                           .hint_channels(32));
  randomize(*csc, 0.1, 13);
  scedit::save_csc_tuner(path, csc);
  return path;
}

/// A random uint8 [64, 64, 3] image.
torch::Tensor random_image(uint64_t seed) {
  auto generator = at::detail::createCPUGenerator(seed);
  return torch::randint(0, 256, {64, 64, 3}, generator, torch::kInt64).to(torch::kUInt8);
}

/// Largest absolute difference of two uint8 images.
int64_t max_pixel_difference(const torch::Tensor& a, const torch::Tensor& b) {
  return (a.to(torch::kInt32) - b.to(torch::kInt32)).abs().max().item<int64_t>();
}

}  // namespace

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

  // The same sampler written out: SD 1.5's DDIM with trailing spacing, noise from the seed.
  torch::NoGradGuard no_grad;
  sd::DDIMScheduler scheduler(sd::DDIMSchedulerOptions().timestep_spacing("trailing"));
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
  options = small_options();
  options.width = 72;  // a multiple of 8, but the UNet halves 8×9 latents three times
  EXPECT_NE(error_of([&] { sd::generate(pipe, {"x"}, options); }).find("not a multiple of 64"),
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

// ---- the generate program ----------------------------------------------------------------------

namespace {

/// The `generate` program: <build>/bin/generate beside <build>/tests/test_generate (or
/// SCEDIT_GENERATE_BIN when the build defines it).
fs::path generate_program() {
#ifdef SCEDIT_GENERATE_BIN
  return SCEDIT_GENERATE_BIN;
#else
  std::error_code error;
  const auto self = fs::read_symlink("/proc/self/exe", error);
  return error ? fs::path() : self.parent_path().parent_path() / "bin" / "generate";
#endif
}

/// Exit code, stdout and stderr of one run of the program.
struct RunResult {
  int code = -1;
  std::string out, err;
};

std::string read_text(const fs::path& path) {
  std::ifstream in(path);
  std::stringstream text;
  text << in.rdbuf();
  return text.str();
}

RunResult run_generate(const std::string& arguments) {
  const auto out = scratch() / "stdout.txt", err = scratch() / "stderr.txt";
  const std::string command = "'" + generate_program().string() + "' " + arguments + " > '" +
                              out.string() + "' 2> '" + err.string() + "'";
  const int status = std::system(command.c_str());
  RunResult result;
  result.code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  result.out = read_text(out);
  result.err = read_text(err);
  return result;
}

#define SKIP_WITHOUT_PROGRAM()                                                                 \
  if (!fs::is_regular_file(generate_program()))                                               \
  GTEST_SKIP() << "the generate program is not built at '" << generate_program().string()    \
               << "' (configure with -DSCEDIT_BUILD_EXAMPLES=ON and build target 'generate')"

}  // namespace

TEST(GenerateProgram, HelpListsEveryFlag) {
  SKIP_WITHOUT_PROGRAM();
  const auto result = run_generate("--help");
  EXPECT_EQ(result.code, 0);
  for (const char* flag : {"--model", "--tokenizer", "--prompt", "--prompts-file", "--negative-prompt",
                           "--width", "--height", "--steps", "--guidance-scale", "--guidance-rescale",
                           "--eta", "--seed", "--spacing", "--batch-size", "--images-per-prompt",
                           "--precision", "--device", "--tuner", "--condition", "--init-image",
                           "--strength", "--output"}) {
    EXPECT_NE(result.out.find(flag), std::string::npos) << flag;
  }
  EXPECT_NE(result.out.find("7.5"), std::string::npos) << "defaults are shown";
}

TEST(GenerateProgram, BadInputsEndWithOneClearLine) {
  SKIP_WITHOUT_PROGRAM();
  const auto unknown = (scratch() / "unknown_kind.safetensors").string();
  scedit::safetensors::save(unknown, {{"foo.weight", torch::zeros({2})}});
  const auto image = (scratch() / "condition.png").string();
  common::write_png(image, random_image(3));
  const std::vector<std::pair<std::string, std::string>> cases = {
      {"--prompt x --width 65", "--width must be a multiple of 8, got 65"},
      {"--prompt x --height 12", "--height must be a multiple of 8, got 12"},
      {"--prompt x --steps 0", "--steps must be > 0, got 0"},
      {"--prompt x --steps -3", "--steps must be > 0, got -3"},
      {"--prompt x --bogus", "--bogus"},
      {"--steps 2", "give a prompt"},
      {"--prompt x --model /nonexistent/model", "'/nonexistent/model' does not exist"},
      {"--prompt x --tuner /nonexistent/t.safetensors:0.5", "'/nonexistent/t.safetensors' does not exist"},
      {"--prompt x --steps 1 --tuner '" + unknown + "'", "holds neither"},
      {"--prompt x --precision fp8", "--precision"},
      {"--prompt x --steps 1 --condition '" + image + "'", "give one --condition image per CSC-Tuner"},
      {"--prompt x --steps 1 --tuner '" + csc_tuner_file() + "'", "give one --condition image per CSC-Tuner"},
  };
  for (const auto& [arguments, expected] : cases) {
    const auto result = run_generate(arguments + " --output '" + (scratch() / "bad").string() + "'");
    EXPECT_NE(result.code, 0) << arguments;
    EXPECT_NE(result.err.find(expected), std::string::npos) << arguments << "\nstderr: " << result.err;
    EXPECT_EQ(std::count(result.err.begin(), result.err.end(), '\n'), 1) << arguments << "\nstderr: " << result.err;
  }
}

TEST(GenerateProgram, WritesPngsWithTheirParametersMatchingTheLibrary) {
  SKIP_WITHOUT_PROGRAM();
  const auto output = scratch() / "run";
  const auto result = run_generate("--prompt 'a red circle' --steps 2 --seed 11 --images-per-prompt 2 "
                                   "--batch-size 2 --output '" + output.string() + "'");
  ASSERT_EQ(result.code, 0) << result.err;
  EXPECT_NE(result.out.find("built-in tiny model"), std::string::npos);
  const auto first = output / "00000-11.png", second = output / "00001-12.png";
  ASSERT_TRUE(fs::exists(first) && fs::exists(second)) << result.out;
  EXPECT_NE(result.out.find(first.string()), std::string::npos) << "prints where each image went";

  const auto text = common::read_png_text(second.string());
  ASSERT_FALSE(text.empty());
  EXPECT_EQ(text[0].first, "parameters");
  EXPECT_EQ(text[0].second.rfind("a red circle\n", 0), 0u) << text[0].second;
  EXPECT_NE(text[0].second.find("Seed: 12"), std::string::npos) << text[0].second;
  EXPECT_NE(text[0].second.find("Steps: 2"), std::string::npos) << text[0].second;

  // The same images as the library with the same settings (PNG is lossless).
  auto pipe = sd::tiny_pipeline(0);
  auto options = small_options(11);
  options.steps = 2;
  options.images_per_prompt = 2;
  options.batch_size = 2;  // as the run: batching changes float rounding, not the seeds
  const auto images = sd::generate(pipe, {"a red circle"}, options);
  EXPECT_TRUE(torch::equal(common::read_image(first.string()), images[0]));
  EXPECT_TRUE(torch::equal(common::read_image(second.string()), images[1]));
}

TEST(GenerateProgram, ConditionOfAnotherSizeIsResizedSayingSo) {
  SKIP_WITHOUT_PROGRAM();
  const auto image = (scratch() / "small_condition.png").string();
  common::write_png(image, torch::randint(0, 256, {32, 48, 3}, torch::kInt64).to(torch::kUInt8));
  const auto result = run_generate("--prompt x --steps 1 --tuner '" + csc_tuner_file() + "' --condition '" +
                                   image + "' --output '" + (scratch() / "resized").string() + "'");
  ASSERT_EQ(result.code, 0) << result.err;
  EXPECT_NE(result.out.find("48x32, resized to the output size 64x64"), std::string::npos) << result.out;
}
