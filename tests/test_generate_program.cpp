// The `generate` program as a user runs it: its flags, its refusals (one clear line each), the
// PNGs it writes with their parameters, and the images the library makes with the same settings.

#include <sd/sampler.hpp>
#include <sd/tiny.hpp>

#include <common/image.hpp>
#include <common/png.hpp>

#include <scedit/safetensors.hpp>

#include <gtest/gtest.h>
#include <torch/torch.h>

#include <algorithm>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <tuple>
#include <limits>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include <sys/wait.h>

#include "generate_fixtures.hpp"
#include "test_util.hpp"

namespace fs = std::filesystem;
using namespace scedit_test::generate;

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
                           "--strength", "--mask", "--control-scale", "--output", "--prediction",
                           "--zero-terminal-snr", "--original-size", "--crop-top-left", "--target-size", "--lean",
                           "--cuda-graph"}) {
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
  const auto json = (scratch() / "sc_options.json").string();
  std::ofstream(json) << R"({"kind": "sc_tuner", "options": [{"channels": 320}]})" << "\n";
  const auto nan_tuner = (scratch() / "nan_sc.safetensors").string();
  auto spoiled = scedit::safetensors::load(sc_tuner_file());
  const auto nan_key = spoiled.begin()->first;
  spoiled[nan_key] = spoiled.begin()->second.clone().fill_(std::numeric_limits<float>::quiet_NaN());
  scedit::safetensors::save(nan_tuner, spoiled, scedit::safetensors::load_metadata(sc_tuner_file()));
  const auto not_an_image = (scratch() / "notes.png").string();
  std::ofstream(not_an_image) << "not an image";
  const auto utf16 = (scratch() / "utf16_prompts.txt").string();
  std::ofstream(utf16, std::ios::binary) << std::string("\xFF\xFE" "a\0 \0c\0a\0t\0\n\0", 14);
  // {arguments, what the one line says, whether it says so before the model loads (all but the
  // tuners whose tensors are read when they are attached)}.
  const std::vector<std::tuple<std::string, std::string, bool>> cases = {
      {"--prompt x --width 65", "--width must be a positive multiple of 8 up to 16384 (or 0, the model's size), got 65", true},
      {"--prompt x --width 16392", "--width must be a positive multiple of 8 up to 16384", true},
      {"--prompt x --guidance-scale -1", "--guidance-scale must be a finite number >= 0", true},
      {"--prompt x --guidance-scale inf", "--guidance-scale must be a finite number >= 0", true},
      {"--prompt x --tuner '" + sc_tuner_file() + ":abc'", "'abc' in '" + sc_tuner_file() + ":abc' is not a scale", true},
      {"--prompt x --tuner '" + json + "'", "'" + json + "' is neither a safetensors file nor a torch.save zip", true},
      {"--prompt x --steps 1 --tuner '" + nan_tuner + "'", "tuner file '" + nan_tuner + "': tensor '" + nan_key + "'", false},
      {"--prompt x --height 12", "--height must be a positive multiple of 8 up to 16384 (or 0, the model's size), got 12", true},
      {"--prompt x --tuner '" + sc_tuner_file() + ":nan'", "'nan' in '" + sc_tuner_file() + ":nan' is not a scale", true},
      {"--prompt x --tuner '" + sc_tuner_file() + ":0x10'", "'0x10' in '" + sc_tuner_file() + ":0x10' is not a scale", true},
      {"--prompt x --tuner '" + sc_tuner_file() + ":1e999'", "the scale 1e999 in '" + sc_tuner_file() + ":1e999' is not a finite number", true},
      {"--prompt x --eta 1.5", "--eta must be in [0, 1]", true},
      {"--prompt x --steps 2 --init-image '" + image + "' --strength 0.1", "--strength 0.1 of --steps 2 runs no denoising step", true},
      {"--prompt x --init-image '" + not_an_image + "'", "--init-image: cannot decode '" + not_an_image + "'", true},
      {"--prompt x --init-image '" + scratch().string() + "'", "--init-image: '" + scratch().string() + "' is not a file", true},
      {"--prompts-file '" + utf16 + "'", "--prompts-file '" + utf16 + "' line 1 holds a NUL byte", true},
      {"--prompt x --seed -1", "--seed: a whole number from 0 to 18446744073709551615, got -1", true},
      {"--prompt x --seed 18446744073709551616", "got 18446744073709551616", true},
      {"--prompt x --seed 18446744073709551615 --images-per-prompt 2", "are more than there are seeds", true},
      {"--prompt x --model tiny:sd21", "'tiny:sd21' does not exist (give a diffusers folder, a single file, or a "
       "built-in model: tiny:sdxl, random:sd15", true},
      {"--prompt x --steps 1000 --spacing leading", "--steps 1000 with --spacing leading: ", false},
      {"--prompt x --steps 0", "--steps must be > 0, got 0", true},
      {"--prompt x --steps -3", "--steps must be > 0, got -3", true},
      {"--prompt x --bogus", "--bogus", true},
      {"--steps 2", "give a prompt", true},
      {"--prompt x --model /nonexistent/model", "'/nonexistent/model' does not exist", true},
      {"--prompt x --tuner /nonexistent/t.safetensors:0.5", "'/nonexistent/t.safetensors' does not exist", true},
      {"--prompt x --steps 1 --tuner '" + unknown + "'", "holds neither", false},
      {"--prompt x --precision fp8", "--precision", true},
      {"--prompt x --steps 1 --condition '" + image + "'", "give one --condition image per CSC-Tuner", true},
      {"--prompt x --steps 1 --tuner '" + csc_tuner_file() + "'", "give one --condition image per CSC-Tuner", true},
      {"--prompt x --steps 1 --mask '" + image + "'", "--mask needs --init-image", true},
      {"--prompt x --original-size 64x64", "--original-size takes HEIGHT,WIDTH (two whole numbers", true},
      {"--prompt x --crop-top-left 4", "--crop-top-left takes TOP,LEFT", true},
      {"--prompt x --target-size 0,64", "--target-size must be positive, got 0", true},
      {"--prompt x --prediction sample", "--prediction", true},
      {"--prompt x --device cpu --cuda-graph on", "--cuda-graph on: not a CUDA device (--device cpu)", true},
      {"--prompt x --cuda-graph always", "--cuda-graph: always not in {auto,on,off}", true},
      {"--prompt x --lean fusion", "--lean: 'fusion' is not", true},
      {"--prompt x --device cpu --lean fused-geglu", "--lean fused-geglu:", true},
      // The built-in tiny model is SD 1.5's layout: no size conditioning.
      {"--prompt x --steps 1 --original-size 64,64 --crop-top-left 0,0", "--original-size, --crop-top-left: "
       "size conditioning is SDXL's, and this model (built-in tiny) is not an SDXL", false},
      {"--prompt x --steps 1 --zero-terminal-snr --prediction epsilon", "needs prediction_type v_prediction, "
       "not epsilon", false},
  };
  for (const auto& [arguments, expected, before_model] : cases) {
    const auto result = run_generate(arguments + " --output '" + (scratch() / "bad").string() + "'");
    EXPECT_NE(result.code, 0) << arguments;
    if (before_model) {
      EXPECT_EQ(result.out.find("no --model given"), std::string::npos) << arguments << "\n" << result.out;
    }
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

TEST(GenerateProgram, NumbersAfterTheFilesThereIgnoringNamesNotItsOwn) {
  SKIP_WITHOUT_PROGRAM();
  const auto output = scratch() / "numbered";
  fs::create_directories(output);
  for (const char* name : {"00041-7.png", "123456789012345678901234-x.png", "99999-notes.txt"}) {
    std::ofstream(output / name) << "not an image";
  }
  const auto result = run_generate("--prompt x --steps 1 --seed 3 --output '" + output.string() + "'");
  ASSERT_EQ(result.code, 0) << result.err;
  EXPECT_TRUE(fs::exists(output / "00042-3.png")) << result.out;
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

// An --output where no file can be made is refused before the model loads, not after the images.
TEST(GenerateProgram, OutputThatCannotHoldFilesIsRefusedFirst) {
  SKIP_WITHOUT_PROGRAM();
  const auto file = scratch() / "a_file";
  std::ofstream(file) << "taken";
  const auto result = run_generate("--prompt x --steps 1 --output '" + file.string() + "'");
  EXPECT_NE(result.code, 0);
  EXPECT_NE(result.err.find("--output '" + file.string() + "': cannot create the folder"), std::string::npos)
      << result.err;
  EXPECT_EQ(result.out.find("no --model given"), std::string::npos) << result.out;
}

// A prompts file as editors save it: a byte-order mark is not part of the first prompt, and lines
// of white space are no prompts.
TEST(GenerateProgram, PromptsFileSkipsItsByteOrderMarkAndBlankLines) {
  SKIP_WITHOUT_PROGRAM();
  const auto prompts = scratch() / "bom_prompts.txt";
  std::ofstream(prompts, std::ios::binary) << "\xEF\xBB\xBF" "a cat\r\n  \n\t\n";
  const auto output = scratch() / "bom";
  const auto result = run_generate("--prompts-file '" + prompts.string() + "' --steps 1 --output '" +
                                   output.string() + "'");
  ASSERT_EQ(result.code, 0) << result.err;
  EXPECT_NE(result.out.find("generating 1 image "), std::string::npos) << result.out;
  const auto text = common::read_png_text((output / "00000-0.png").string());
  ASSERT_FALSE(text.empty());
  EXPECT_EQ(text[0].second.rfind("a cat\n", 0), 0u) << text[0].second;
}

// Latents that overflow (here through an absurd but finite guidance scale) stop the run naming the
// denoising step; no PNG is written.
TEST(GenerateProgram, NonFiniteLatentsWriteNoImage) {
  SKIP_WITHOUT_PROGRAM();
  const auto output = scratch() / "overflow";
  const auto result = run_generate("--prompt x --steps 3 --guidance-scale 1e30 --output '" + output.string() + "'");
  EXPECT_NE(result.code, 0);
  EXPECT_NE(result.err.find("became NaN or Inf at denoising step "), std::string::npos) << result.err;
  EXPECT_EQ(std::count(result.err.begin(), result.err.end(), '\n'), 1) << result.err;
  size_t pngs = 0;
  if (fs::exists(output)) {
    for (const auto& entry : fs::directory_iterator(output)) pngs += entry.path().extension() == ".png";
  }
  EXPECT_EQ(pngs, 0u);
}

// A tuner whose path holds a ':' followed by no number is that file, when it exists.
TEST(GenerateProgram, TunerPathWithAColonIsTheWholePathWhenThatFileExists) {
  SKIP_WITHOUT_PROGRAM();
  const auto path = scratch() / "style:v2.safetensors";
  fs::copy_file(sc_tuner_file(), path, fs::copy_options::overwrite_existing);
  const auto result = run_generate("--prompt x --steps 1 --tuner '" + path.string() + "' --output '" +
                                   (scratch() / "colon").string() + "'");
  ASSERT_EQ(result.code, 0) << result.err;
  EXPECT_NE(result.out.find("tuner: " + path.string() + " (SC-Tuners"), std::string::npos) << result.out;
}

// SDXL's size conditioning from the flags, in diffusers' (height, width) and (top, left) order:
// the PNG is the library's image with the same conditioning, and says what it was.
TEST(GenerateProgram, SdxlWithSizeConditioningMatchesTheLibrary) {
  SKIP_WITHOUT_PROGRAM();
  const auto output = scratch() / "sdxl";
  const auto result = run_generate("--model tiny:sdxl --prompt 'a red circle' --steps 2 --seed 5 "
                                   "--original-size 128,96 --crop-top-left 8,4 --output '" + output.string() + "'");
  ASSERT_EQ(result.code, 0) << result.err;
  const auto png = output / "00000-5.png";
  ASSERT_TRUE(fs::exists(png)) << result.out;
  const auto image = common::read_image(png.string());
  EXPECT_EQ(image.sizes(), (std::vector<int64_t>{64, 64, 3}));  // the tiny SDXL's native size
  const auto text = common::read_png_text(png.string());
  ASSERT_FALSE(text.empty());
  EXPECT_NE(text[0].second.find("Original size: 128,96, Crop top left: 8,4, Target size: 64,64"),
            std::string::npos) << text[0].second;

  auto pipe = sd::tiny_sdxl_pipeline(0);
  auto options = small_options(5);
  options.steps = 2;
  options.size_conditioning = sd::SizeConditioning{128, 96, 8, 4, 64, 64};
  EXPECT_TRUE(torch::equal(image, sd::generate(pipe, {"a red circle"}, options)[0]));
  options.size_conditioning.reset();
  EXPECT_FALSE(torch::equal(image, sd::generate(pipe, {"a red circle"}, options)[0]));
}

// --zero-terminal-snr on the tiny model (v prediction): the library's image on the rescaled schedule.
TEST(GenerateProgram, ZeroTerminalSnrSamplesOnTheRescaledSchedule) {
  SKIP_WITHOUT_PROGRAM();
  const auto output = scratch() / "zero_snr";
  const auto result = run_generate("--prompt x --steps 2 --seed 2 --zero-terminal-snr --output '" +
                                   output.string() + "'");
  ASSERT_EQ(result.code, 0) << result.err;
  auto pipe = sd::tiny_pipeline(0);
  sd::set_scheduler_option(pipe.scheduler_config, "rescale_betas_zero_snr", true);
  auto options = small_options(2);
  options.steps = 2;
  EXPECT_TRUE(torch::equal(common::read_image((output / "00000-2.png").string()),
                           sd::generate(pipe, {"x"}, options)[0]));
}
