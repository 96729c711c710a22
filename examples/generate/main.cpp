// generate: text-to-image and image-to-image with Stable Diffusion 1.5, 2.1 and SDXL in C++,
// with SCEdit's SC-Tuners, CSC-Tuners and LoRA files applied at any strength.
//
// With no --model it runs the built-in tiny model (SD 1.5 layout, random weights), so the whole
// path can be tried in seconds without a download. See README.md for the flags and examples.

#include <sd/controlnet_weights.hpp>
#include <sd/sampler.hpp>
#include <sd/tuner_files.hpp>

#include <common/files.hpp>
#include <common/image.hpp>
#include <common/lean.hpp>
#include <common/model.hpp>
#include <common/png.hpp>
#include <common/program.hpp>

#include <CLI/CLI.hpp>
#include <torch/torch.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <limits>
#include <optional>
#include <regex>
#include <sstream>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include <unistd.h>

namespace fs = std::filesystem;

namespace {

/// The command line.
struct Flags {
  common::ModelFlags model;           // --model, --tokenizer, --zero-terminal-snr
  std::string prediction;             // the scheduler config's prediction_type; empty: as it says
  std::string original_size;          // SDXL: "HEIGHT,WIDTH"; empty: the image's size
  std::string crop_top_left;          // SDXL: "TOP,LEFT"; empty: 0,0
  std::string target_size;            // SDXL: "HEIGHT,WIDTH"; empty: the image's size
  std::vector<std::string> prompts;   // --prompt, repeatable
  std::string prompts_file;           // one prompt per line
  std::string negative_prompt;        // "" (SCEdit's recipe)
  int64_t width = 0;                  // 0 = the model's native size
  int64_t height = 0;
  int64_t steps = 50;
  double guidance_scale = 7.5;
  double guidance_rescale = 0.5;
  double eta = 0.0;
  uint64_t seed = 0;
  std::string spacing = "trailing";
  int64_t batch_size = 1;
  int64_t images_per_prompt = 1;
  std::string precision = "fp32";
  std::string device = "auto";
  std::string cuda_graph = "auto";  // auto | on | off
  std::string lean = "default";     // the UNet's kernel levers, as common/lean.hpp spells them
  std::vector<std::string> tuners;    // FILE[:SCALE], repeatable
  std::vector<std::string> conditions;  // condition images, one per CSC-Tuner in --tuner order
  std::vector<std::string> controlnets;  // ControlNet PATH[:SCALE], repeatable
  std::vector<std::string> controlnet_images;  // one per --controlnet, in order
  std::string init_image;             // image-to-image start
  std::string mask;                   // inpainting: where the init image is made anew
  double control_scale = 1.0;         // global strength of every CSC-Tuner
  double strength = 0.8;
  std::string output = "out/generate";
};

/// A `--tuner FILE[:SCALE]` value.
struct TunerFlag {
  std::string path;
  double scale = 1.0;
};

/// Splits the `FILE[:SCALE]` value of `flag`. A text that names an existing file or folder is
/// that path (so paths containing ':' work); otherwise the text after the last ':' is the scale,
/// a finite decimal number, and anything else there is refused, naming it.
TunerFlag parse_tuner_flag(const std::string& flag, const std::string& text) {
  const size_t colon = text.rfind(':');
  if (fs::exists(text) || colon == std::string::npos || colon == 0 || colon + 1 == text.size()) {
    return {text, 1.0};
  }
  const std::string number = text.substr(colon + 1);
  static const std::regex decimal(R"([-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?)");
  TORCH_CHECK(std::regex_match(number, decimal), flag, ": '", number, "' in '", text, "' is not a ",
              "scale (give FILE[:SCALE], e.g. style.safetensors:0.8), and no file is called '", text, "'");
  const double scale = std::strtod(number.c_str(), nullptr);
  TORCH_CHECK(std::isfinite(scale), flag, ": the scale ", number, " in '", text, "' is not a finite number");
  return {text.substr(0, colon), scale};
}

/// The two non-negative integers of an `A,B` flag value (`--original-size 1024,768`), naming the
/// flag and what it wants (`what`: "HEIGHT,WIDTH") when the text is not that.
std::pair<int64_t, int64_t> parse_pair(const std::string& flag, const std::string& text,
                                       const char* what) {
  static const std::regex pattern(R"((\d{1,9}),(\d{1,9}))");
  std::smatch match;
  TORCH_CHECK(std::regex_match(text, match, pattern), flag, " takes ", what,
              " (two whole numbers, diffusers' order), got '", text, "'");
  return {std::stoll(match[1]), std::stoll(match[2])};
}

/// SDXL's size conditioning of `flags` for images of `height` × `width` (diffusers' defaults for
/// what is not given: the image's size, no crop); unset when no size flag is given.
std::optional<sd::SizeConditioning> size_conditioning(const Flags& flags, int64_t height, int64_t width) {
  if (flags.original_size.empty() && flags.crop_top_left.empty() && flags.target_size.empty()) return {};
  auto size = sd::SizeConditioning::uncropped(height, width);
  if (!flags.original_size.empty()) {
    std::tie(size.original_height, size.original_width) =
        parse_pair("--original-size", flags.original_size, "HEIGHT,WIDTH");
  }
  if (!flags.crop_top_left.empty()) {
    std::tie(size.crop_top, size.crop_left) = parse_pair("--crop-top-left", flags.crop_top_left, "TOP,LEFT");
  }
  if (!flags.target_size.empty()) {
    std::tie(size.target_height, size.target_width) =
        parse_pair("--target-size", flags.target_size, "HEIGHT,WIDTH");
  }
  for (const auto& [flag, value] : {std::make_pair("--original-size", size.original_height),
                                    std::make_pair("--original-size", size.original_width),
                                    std::make_pair("--target-size", size.target_height),
                                    std::make_pair("--target-size", size.target_width)}) {
    TORCH_CHECK(value > 0, flag, " must be positive, got ", value);
  }
  return size;
}

/// The size flags given, for an error message: "--original-size, --target-size".
std::string size_flags_given(const Flags& flags) {
  std::string names;
  for (const auto& [flag, value] : {std::make_pair("--original-size", &flags.original_size),
                                    std::make_pair("--crop-top-left", &flags.crop_top_left),
                                    std::make_pair("--target-size", &flags.target_size)}) {
    if (!value->empty()) names += (names.empty() ? "" : ", ") + std::string(flag);
  }
  return names;
}

/// Refuses a prompt that is not valid UTF-8 before any model loads, naming where it came from
/// (`where`: "--prompt 2", "--prompts-file 'p.txt' line 3").
void check_utf8(const std::string& prompt, const std::string& where) {
  const auto invalid = sd::unicode::utf8_problem(prompt);
  TORCH_CHECK(invalid.empty(), where, ": \"", sd::unicode::escape_invalid_utf8(prompt),
              "\" is not valid UTF-8 ", invalid);
}

/// The lines of a prompts file that hold more than white space (a leading UTF-8 byte-order mark
/// and trailing '\r' removed), each valid UTF-8 without NUL bytes (a PNG's text cannot hold one).
std::vector<std::string> read_prompts_file(const std::string& path) {
  std::ifstream in(path);
  TORCH_CHECK(in.good(), "--prompts-file: cannot open '", path, "'");
  std::vector<std::string> prompts;
  int64_t number = 0;
  for (std::string line; std::getline(in, line);) {
    ++number;
    if (number == 1) line.erase(0, common::utf8_bom_size(line));
    if (!line.empty() && line.back() == '\r') line.pop_back();
    const std::string where = "--prompts-file '" + path + "' line " + std::to_string(number);
    TORCH_CHECK(line.find('\0') == std::string::npos, where, " holds a NUL byte (is the file UTF-16? "
                "save it as UTF-8)");
    check_utf8(line, where);
    if (line.find_first_not_of(" \t\v\f") != std::string::npos) prompts.push_back(line);
  }
  TORCH_CHECK(!prompts.empty(), "--prompts-file '", path, "' holds no prompts");
  return prompts;
}

/// The first file number to try in `dir`: one more than the largest `NNNNN-*.png` there (numbers
/// of up to 18 digits: longer ones are not this program's, and would not fit an int64). Another
/// run writing there at the same time may take it first: the writes never replace a file.
int64_t next_file_number(const fs::path& dir) {
  static const std::regex pattern(R"((\d{5,18})-.*\.png)");
  int64_t next = 0;
  for (const auto& entry : fs::directory_iterator(dir)) {
    std::smatch match;
    const std::string name = entry.path().filename().string();
    if (std::regex_match(name, match, pattern)) next = std::max<int64_t>(next, std::stoll(match[1]) + 1);
  }
  return next;
}

/// A number as a person writes it: 7.5, 0.5, 1, 0.
std::string number(double value) {
  std::ostringstream out;
  out << value;
  return out.str();
}

/// The "parameters" text stored in each PNG (the layout other Stable Diffusion tools use:
/// prompt, negative prompt, then `Key: value` pairs).
std::string parameters_text(const Flags& flags, const std::string& prompt, uint64_t seed,
                            const sd::GenerateOptions& options, const std::string& model,
                            const sd::AttachedTuners& tuners) {
  std::ostringstream out;
  out << prompt << "\nNegative prompt: " << options.negative_prompt << "\nSteps: " << options.steps
      << ", Sampler: DDIM, Timestep spacing: " << options.timestep_spacing
      << ", CFG scale: " << number(options.guidance_scale)
      << ", Guidance rescale: " << number(options.guidance_rescale)
      << ", Eta: " << number(options.eta) << ", Seed: " << seed << ", Size: " << options.width
      << "x" << options.height << ", Model: " << model << ", Precision: " << sd::to_string(options.precision);
  if (const auto& size = options.size_conditioning) {  // diffusers' (height, width) / (top, left) order
    out << ", Original size: " << size->original_height << "," << size->original_width
        << ", Crop top left: " << size->crop_top << "," << size->crop_left
        << ", Target size: " << size->target_height << "," << size->target_width;
  }
  if (!tuners.tuners.empty()) out << ", Tuners: [" << tuners.describe() << "]";
  for (const auto& condition : flags.conditions) {
    out << ", Condition: " << fs::path(condition).filename().string();
  }
  if (!flags.init_image.empty()) {
    out << ", Init image: " << fs::path(flags.init_image).filename().string()
        << ", Strength: " << number(options.strength);
  }
  if (!flags.mask.empty()) out << ", Mask: " << fs::path(flags.mask).filename().string();
  for (size_t i = 0; i < flags.controlnets.size(); ++i) {
    out << ", ControlNet: " << fs::path(flags.controlnets[i]).filename().string() << " with "
        << fs::path(flags.controlnet_images[i]).filename().string();
  }
  if (flags.control_scale != 1.0) out << ", Control scale: " << number(flags.control_scale);
  return out.str();
}

/// Refuses `path`, given to `flag`, unless it is a file that can be read whole (`pipe_allowed`:
/// or a pipe, as `<(...)` gives).
void check_input_file(const std::string& flag, const std::string& path, bool pipe_allowed = false) {
  const auto status = fs::status(path);
  TORCH_CHECK(fs::exists(status), flag, ": '", path, "' does not exist");
  TORCH_CHECK(fs::is_regular_file(status) || (pipe_allowed && !fs::is_directory(status)), flag, ": '",
              path, "' is not a file");
}

/// The largest image side `--width` and `--height` take: far past any model's training size, and
/// small enough that the latents' sizes cannot overflow.
constexpr int64_t kMaxImageSide = 16384;

/// Checks every flag that needs no model, so a mistake is reported before a long load.
void check_flags(const Flags& flags) {
  for (const auto& [flag, side] : {std::make_pair("--width", flags.width), std::make_pair("--height", flags.height)}) {
    TORCH_CHECK(side >= 0 && side % 8 == 0 && side <= kMaxImageSide, flag, " must be a positive multiple of 8 "
                "up to ", kMaxImageSide, " (or 0, the model's size), got ", side);
  }
  TORCH_CHECK(flags.steps > 0, "--steps must be > 0, got ", flags.steps);
  TORCH_CHECK(flags.batch_size > 0, "--batch-size must be > 0, got ", flags.batch_size);
  TORCH_CHECK(flags.images_per_prompt > 0, "--images-per-prompt must be > 0, got ",
              flags.images_per_prompt);
  TORCH_CHECK(std::isfinite(flags.guidance_scale) && flags.guidance_scale >= 0,
              "--guidance-scale must be a finite number >= 0 (<= 1: no guidance; SCEdit's recipe: "
              "7.5), got ", flags.guidance_scale);
  TORCH_CHECK(flags.guidance_rescale >= 0 && flags.guidance_rescale <= 1,
              "--guidance-rescale must be in [0, 1], got ", flags.guidance_rescale);
  TORCH_CHECK(flags.eta >= 0 && flags.eta <= 1, "--eta must be in [0, 1] (0: deterministic DDIM), got ",
              flags.eta);
  TORCH_CHECK(flags.strength >= 0 && flags.strength <= 1, "--strength must be in [0, 1], got ",
              flags.strength);
  TORCH_CHECK(flags.init_image.empty() || flags.strength == 0 ||
                  sd::image_to_image_steps(flags.steps, flags.strength) > 0,
              "--strength ", flags.strength, " of --steps ", flags.steps, " runs no denoising step (int(",
              flags.steps, " · ", flags.strength, ") = 0): raise --steps or --strength");
  TORCH_CHECK(!flags.prompts.empty() || !flags.prompts_file.empty(),
              "give a prompt: --prompt TEXT (repeatable) or --prompts-file FILE");
  TORCH_CHECK(flags.prompts.empty() || flags.prompts_file.empty(),
              "give either --prompt or --prompts-file, not both");
  for (size_t i = 0; i < flags.prompts.size(); ++i) {
    check_utf8(flags.prompts[i], "--prompt " + std::to_string(i + 1));
  }
  check_utf8(flags.negative_prompt, "--negative-prompt");
  common::check_model_flags(flags.model);
  TORCH_CHECK(flags.mask.empty() || !flags.init_image.empty(),
              "--mask needs --init-image (the image whose masked region is made anew)");
  TORCH_CHECK(std::isfinite(flags.control_scale), "--control-scale must be finite, got ",
              flags.control_scale);
  size_conditioning(flags, 8, 8);  // the flags' syntax, before the model loads
  if (!flags.prompts_file.empty()) check_input_file("--prompts-file", flags.prompts_file, /*pipe_allowed=*/true);
  size_t csc_tuners = 0;
  for (const auto& text : flags.tuners) {
    const auto tuner = parse_tuner_flag("--tuner", text);
    TORCH_CHECK(fs::exists(tuner.path), "--tuner: '", tuner.path, "' does not exist");
    csc_tuners += sd::detect_tuner_path(tuner.path) == scedit::TunerKind::kCSC;  // reads the header only
  }
  for (const auto& text : flags.controlnets) {
    const auto controlnet = parse_tuner_flag("--controlnet", text);
    TORCH_CHECK(fs::exists(controlnet.path), "--controlnet: '", controlnet.path, "' does not exist");
  }
  TORCH_CHECK(flags.controlnet_images.size() == flags.controlnets.size(), "give one --controlnet-image "
              "per --controlnet, in order: ", flags.controlnets.size(), " --controlnet and ",
              flags.controlnet_images.size(), " --controlnet-image");
  TORCH_CHECK(flags.conditions.size() == csc_tuners, "give one --condition image per CSC-Tuner, "
              "in --tuner order: ", csc_tuners, " CSC-Tuner", csc_tuners == 1 ? "" : "s", " and ",
              flags.conditions.size(), " --condition");
}

/// The images the flags name, decoded before the model loads, so that a bad file is said at once.
struct InputImages {
  std::vector<torch::Tensor> conditions;         ///< one per --condition, uint8 [H, W, 3]
  std::vector<torch::Tensor> controlnet_images;  ///< one per --controlnet-image
  torch::Tensor init_image;                      ///< undefined without --init-image
  torch::Tensor mask;                            ///< undefined without --mask
};

/// The image file `path`, given to `flag`, as uint8 [H, W, 3]; errors name the flag and the file.
torch::Tensor read_input_image(const std::string& flag, const std::string& path) {
  check_input_file(flag, path);
  try {
    return common::read_image(path);
  } catch (const c10::Error& error) {
    TORCH_CHECK(false, flag, ": ", error.what_without_backtrace());
  }
}

InputImages read_input_images(const Flags& flags) {
  InputImages images;
  for (const auto& path : flags.conditions) images.conditions.push_back(read_input_image("--condition", path));
  for (const auto& path : flags.controlnet_images) {
    images.controlnet_images.push_back(read_input_image("--controlnet-image", path));
  }
  if (!flags.init_image.empty()) images.init_image = read_input_image("--init-image", flags.init_image);
  if (!flags.mask.empty()) images.mask = read_input_image("--mask", flags.mask);
  return images;
}

/// `image` (the file `path`, given to `flag`) as uint8 [height, width, 3]; resized, saying so,
/// when it has another size.
torch::Tensor fit_to_size(const std::string& flag, const std::string& path, const torch::Tensor& image,
                          int64_t height, int64_t width) {
  if (image.size(0) == height && image.size(1) == width) return image;
  std::printf("%s %s: %lldx%lld, resized to the output size %lldx%lld\n", flag.c_str(), path.c_str(),
              static_cast<long long>(image.size(1)), static_cast<long long>(image.size(0)),
              static_cast<long long>(width), static_cast<long long>(height));
  return common::resize(image, height, width);
}

int run(Flags flags) {
  check_flags(flags);
  const auto prompts = flags.prompts_file.empty() ? flags.prompts : read_prompts_file(flags.prompts_file);
  int64_t total = 0;  // images: each prompt's in turn, image i seeded with seed + i
  TORCH_CHECK(!__builtin_mul_overflow(static_cast<int64_t>(prompts.size()), flags.images_per_prompt, &total) &&
                  static_cast<uint64_t>(total - 1) <= std::numeric_limits<uint64_t>::max() - flags.seed,
              prompts.size(), " prompt", prompts.size() == 1 ? "" : "s", " × --images-per-prompt ",
              flags.images_per_prompt, " images from --seed ", flags.seed, " are more than there are seeds");
  const auto images = read_input_images(flags);
  const fs::path output(flags.output);
  common::prepare_output_folder(output, "--output");
  const auto device = common::resolve_device(flags.device);
  const auto precision = sd::parse_precision(flags.precision);
  sd::check_precision(precision, device);
  TORCH_CHECK(flags.cuda_graph != "on" || sd::CudaGraph::available(device), "--cuda-graph on: ",
              device.is_cuda() ? "this build has no CUDA graphs"
                               : "not a CUDA device (--device " + flags.device + ")");
  const auto lean = common::parse_lean_activations(flags.lean, device);

  // The model: weights in the compute dtype (as the training programs), autocast for what mixes
  // dtypes (tuners).
  auto pipe = common::load_model(flags.model, device, precision, /*seed=*/0);
  if (!flags.prediction.empty()) {  // e.g. an SD 2.1-v single file, whose scheduler config is a guess
    sd::set_scheduler_option(pipe.scheduler_config, "prediction_type", flags.prediction);
  }
  const auto scheduler = sd::make_scheduler(pipe, flags.spacing);  // refuses ε with zero terminal SNR
  try {
    auto probe = scheduler;
    probe.set_timesteps(flags.steps);  // what generate does first: refuse its steps now, by flag
  } catch (const c10::Error& error) {
    TORCH_CHECK(false, "--steps ", flags.steps, " with --spacing ", flags.spacing, ": ", error.what_without_backtrace());
  }
  pipe.unet->set_lean_activations(lean);
  TORCH_CHECK(pipe.unet_config.has_text_time() || size_flags_given(flags).empty(), size_flags_given(flags),
              ": size conditioning is SDXL's, and this model (", flags.model.model.empty() ? "built-in tiny"
              : flags.model.model, ") is not an SDXL: its UNet takes no size conditioning");
  const std::string model_name = flags.model.model.empty() ? "built-in tiny (seed 0)"
                                                           : fs::path(flags.model.model).filename().string();
  const auto is_cut = [&](const std::string& prompt) { return pipe.tokenizer->cuts(prompt); };
  if (const auto cut = std::count_if(prompts.begin(), prompts.end(), is_cut)) {
    const auto first = std::find_if(prompts.begin(), prompts.end(), is_cut) - prompts.begin() + 1;
    std::printf("%lld of the %zu prompts %s longer than %lld tokens and cut (first: prompt %lld)\n",
                static_cast<long long>(cut), prompts.size(), cut == 1 ? "is" : "are",
                static_cast<long long>(pipe.tokenizer->max_length()), static_cast<long long>(first));
  }

  // The tuners. Each CSC-Tuner takes the next --condition image, in --tuner order.
  sd::AttachedTuners tuners;
  std::vector<std::string> csc_names;
  for (const auto& text : flags.tuners) {
    const auto flag = parse_tuner_flag("--tuner", text);
    const auto tuner = sd::attach_tuner_file(pipe, flag.path, flag.scale, tuners);
    if (tuner.kind == scedit::TunerKind::kCSC) csc_names.push_back(tuner.name);
    if (tuner.kind == scedit::TunerKind::kLoRA) {  // e.g. "unet: 160 layers (Kohya); text_..."
      std::printf("tuner: %s (LoRA, %s; scale %s)\n", flag.path.c_str(), tuner.summary.c_str(),
                  number(tuner.scale).c_str());
    } else {
      std::printf("tuner: %s (%s on %lld skips, %s; scale %s)\n", flag.path.c_str(),
                  sd::tuner_kind_name(tuner.kind), static_cast<long long>(tuner.count),
                  tuner.summary.c_str(), number(tuner.scale).c_str());
    }
  }
  scedit::set_control_scale(*pipe.unet, flags.control_scale);

  // The ControlNets, in the frozen weights' dtype beside the UNet.
  std::vector<std::pair<sd::ControlNetModel, double>> controlnets;
  for (const auto& text : flags.controlnets) {
    const auto flag = parse_tuner_flag("--controlnet", text);
    controlnets.emplace_back(
        sd::load_controlnet(flag.path, sd::WeightsOptions().dtype(sd::compute_dtype(precision)).device(device)),
        flag.scale);
    controlnets.back().first->config.check_fits(pipe.unet_config, "--controlnet '" + flag.path + "'");
    controlnets.back().first->set_lean_activations(lean);
    std::printf("controlnet: %s (scale %s)\n", flag.path.c_str(), number(flag.scale).c_str());
  }

  // The settings.
  sd::GenerateOptions options;
  options.width = flags.width > 0 ? flags.width : sd::default_image_size(pipe);
  options.height = flags.height > 0 ? flags.height : sd::default_image_size(pipe);
  options.steps = flags.steps;
  options.guidance_scale = flags.guidance_scale;
  options.guidance_rescale = flags.guidance_rescale;
  options.eta = flags.eta;
  options.negative_prompt = flags.negative_prompt;
  options.timestep_spacing = flags.spacing;
  options.precision = precision;
  options.device = device;
  options.cuda_graph = flags.cuda_graph != "off";
  options.strength = flags.strength;
  options.size_conditioning = size_conditioning(flags, options.height, options.width);
  const auto fit = [&](const char* flag, const std::string& path, const torch::Tensor& image) {
    return fit_to_size(flag, path, image, options.height, options.width);
  };
  for (size_t i = 0; i < csc_names.size(); ++i) {
    options.conditions.push_back({csc_names[i], fit("--condition", flags.conditions[i], images.conditions[i])});
  }
  for (size_t i = 0; i < controlnets.size(); ++i) {
    options.controlnets.push_back({controlnets[i].first,
                                   fit("--controlnet-image", flags.controlnet_images[i], images.controlnet_images[i]),
                                   controlnets[i].second});
  }
  if (!flags.init_image.empty()) options.init_image = fit("--init-image", flags.init_image, images.init_image);
  if (!flags.mask.empty()) {  // white (>= 128) where the image is made anew
    options.mask = fit("--mask", flags.mask, images.mask).ge(128).to(torch::kUInt8) * 255;
  }
  options.validate();

  // The images: prompt-major order, image i seeded with seed + i, written as they come, each
  // under the next file number no other file has.
  int64_t file_number = next_file_number(output);
  const int64_t batches = (total + flags.batch_size - 1) / flags.batch_size;
  std::printf("generating %lld image%s of %lldx%lld, %lld steps (%s), on %s (%s)\n",
              static_cast<long long>(total), total == 1 ? "" : "s",
              static_cast<long long>(options.width), static_cast<long long>(options.height),
              static_cast<long long>(options.steps), scheduler.options().prediction_type().c_str(),
              device.str().c_str(), flags.precision.c_str());
  const bool interactive = isatty(fileno(stdout)) != 0;  // step-by-step progress on a terminal
  const auto start_time = std::chrono::steady_clock::now();
  for (int64_t start = 0, batch = 0; start < total; start += flags.batch_size, ++batch) {
    const int64_t n = std::min(flags.batch_size, total - start);
    std::vector<std::string> batch_prompts;
    for (int64_t i = start; i < start + n; ++i) {
      batch_prompts.push_back(prompts[static_cast<size_t>(i / flags.images_per_prompt)]);
    }
    sd::GenerateOptions batch_options = options;
    batch_options.seed = flags.seed + static_cast<uint64_t>(start);  // image i: seed + i
    batch_options.batch_size = n;
    if (interactive) batch_options.progress = [&](const sd::GenerateProgress& p) {
      std::printf("\rbatch %lld/%lld: step %lld/%lld", static_cast<long long>(batch + 1),
                  static_cast<long long>(batches), static_cast<long long>(p.step),
                  static_cast<long long>(p.steps));
      std::fflush(stdout);
    };
    std::vector<torch::Tensor> made;
    try {
      made = sd::generate(pipe, batch_prompts, batch_options);
    } catch (const c10::Error& error) {  // say which flags size the memory a batch needs
      const std::string what = error.what_without_backtrace();
      if (what.find("can't allocate memory") == std::string::npos && what.find("out of memory") == std::string::npos) throw;
      TORCH_CHECK(false, "out of memory in batch ", batch + 1, " (", n, " image", n == 1 ? "" : "s", " of ",
                  options.width, "x", options.height, " on ", device.str(), "): lower --batch-size, or --width "
                  "and --height (", what, ")");
    }
    if (interactive) std::printf("\n");
    for (int64_t k = 0; k < n; ++k) {
      const uint64_t seed = sd::image_seed(batch_options, k);
      auto image_options = options;
      image_options.seed = seed;
      const std::string png = common::encode_png(
          made[static_cast<size_t>(k)],
          {{"parameters", parameters_text(flags, batch_prompts[static_cast<size_t>(k)], seed, image_options,
                                          model_name, tuners)},
           {"Software", "scedit generate"}});
      fs::path path;
      do {
        char name[64];
        std::snprintf(name, sizeof(name), "%05lld-%llu.png", static_cast<long long>(file_number++),
                      static_cast<unsigned long long>(seed));
        path = output / name;
      } while (!common::write_new_file_atomic(path, png));
      std::printf("wrote %s\n", path.string().c_str());
    }
  }
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start_time).count();
  std::printf("done: %lld image%s in %.1f s (%.2f s/image)\n", static_cast<long long>(total),
              total == 1 ? "" : "s", seconds, seconds / static_cast<double>(total));
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"Text-to-image (and image-to-image) with Stable Diffusion 1.5, 2.1 and SDXL and SCEdit tuners. "
               "With no --model: the built-in tiny model (random weights), for trying it out."};
  app.option_defaults()->always_capture_default();
  Flags flags;
  common::add_model_flags(app, flags.model);
  app.add_option("--prompt", flags.prompts, "Prompt (repeatable)")->allow_extra_args(false);
  app.add_option("--prompts-file", flags.prompts_file, "File with one prompt per line");
  app.add_option("--negative-prompt", flags.negative_prompt, "Negative (unconditional) prompt");
  app.add_option("--prediction", flags.prediction, "What the model predicts, overriding its scheduler "
                 "config: epsilon | v_prediction (SD 2.1 768-v predicts v; a single file's is guessed from its family)")
      ->check(CLI::IsMember({"epsilon", "v_prediction"}))->default_str("the model's");
  app.add_option("--width", flags.width, "Image width, a multiple of 8")
      ->default_str("the model's: 512 SD 1.5, 768 SD 2.1, 1024 SDXL, 64 the built-in models");
  app.add_option("--height", flags.height, "Image height, a multiple of 8")
      ->default_str("the model's: 512 SD 1.5, 768 SD 2.1, 1024 SDXL, 64 the built-in models");
  app.add_option("--original-size", flags.original_size, "SDXL: size conditioning HEIGHT,WIDTH of "
                 "the source the image should seem made from (diffusers' original_size)")
      ->default_str("the image's size");
  app.add_option("--crop-top-left", flags.crop_top_left, "SDXL: size conditioning TOP,LEFT of the "
                 "crop the image should seem cut at (diffusers' crops_coords_top_left)")
      ->default_str("0,0");
  app.add_option("--target-size", flags.target_size, "SDXL: size conditioning HEIGHT,WIDTH of the "
                 "image made (diffusers' target_size)")->default_str("the image's size");
  app.add_option("--steps", flags.steps, "DDIM steps (> 0)");
  app.add_option("--guidance-scale", flags.guidance_scale, "Classifier-free guidance scale (<= 1: off)");
  app.add_option("--guidance-rescale", flags.guidance_rescale, "Guidance rescale in [0, 1]");
  app.add_option("--eta", flags.eta, "DDIM eta (0: deterministic)");
  app.add_option("--seed", flags.seed, "Seed of the first image; image i uses seed + i")
      ->check([](const std::string& text) -> std::string {  // CLI11 would wrap -1 and clamp 2^64
        static const std::regex digits(R"(\d{1,20})");
        const bool fits = std::regex_match(text, digits) &&
                          (text.size() < 20 || text <= std::string("18446744073709551615"));
        return fits ? "" : "a whole number from 0 to 18446744073709551615, got " + text;
      });
  app.add_option("--spacing", flags.spacing, "Timestep spacing: trailing | leading | linspace")
      ->check(CLI::IsMember({"trailing", "leading", "linspace"}));
  app.add_option("--batch-size", flags.batch_size, "Images per UNet batch");
  app.add_option("--images-per-prompt", flags.images_per_prompt, "Images made from each prompt");
  app.add_option("--precision", flags.precision, "fp32 | bf16 | fp16 (fp16: CUDA only)")
      ->check(CLI::IsMember({"fp32", "bf16", "fp16"}));
  app.add_option("--device", flags.device, "auto | cpu | cuda[:N]");
  app.add_option("--lean", flags.lean, "The UNet's and ControlNets' kernel levers, comma-separated as "
                 "train_style's --lean: default (norm-dtype: norms in the half-precision dtype under autocast; "
                 "plus the fused CUDA kernels where they run), none, or levers by name");
  app.add_option("--cuda-graph", flags.cuda_graph, "auto | on | off: replay each denoising step's UNet "
                 "call from a CUDA graph (auto: on CUDA; on: refuse a device without)")
      ->check(CLI::IsMember({"auto", "on", "off"}));
  app.add_option("--tuner", flags.tuners,
                 "Tuner file FILE[:SCALE] (SC-Tuners, CSC-Tuner or LoRA; repeatable; scale 1 if absent)")
      ->allow_extra_args(false);
  app.add_option("--condition", flags.conditions,
                 "Condition image of a CSC-Tuner (repeatable: one per CSC-Tuner, in --tuner order; "
                 "resized to the output size when it differs)")->allow_extra_args(false);
  app.add_option("--controlnet", flags.controlnets,
                 "ControlNet PATH[:SCALE]: a diffusers folder or file, or an original single file "
                 "(repeatable; their residuals add up; scale 1 if absent)")->allow_extra_args(false);
  app.add_option("--controlnet-image", flags.controlnet_images,
                 "Condition image of a ControlNet (repeatable: one per --controlnet, in order; "
                 "resized to the output size, saying so, when it differs)")->allow_extra_args(false);
  app.add_option("--control-scale", flags.control_scale,
                 "Global strength of every CSC-Tuner (SCEdit's control_scale; each --tuner keeps its own scale)");
  app.add_option("--init-image", flags.init_image, "Start image for image-to-image");
  app.add_option("--mask", flags.mask, "Inpainting: white where --init-image is made anew, black where it "
                 "is kept (resized to the output size, saying so, when it differs)");
  app.add_option("--strength", flags.strength,
                 "Image-to-image strength in [0, 1] (1: from noise, 0: the init image)");
  app.add_option("--output", flags.output, "Output folder for the PNG files");
  try {
    app.parse(argc, argv);
  } catch (const CLI::Success& e) {
    return app.exit(e);  // --help
  } catch (const CLI::ParseError& e) {
    std::cerr << "generate: error: " << e.what() << " (see --help)\n";
    return e.get_exit_code() != 0 ? e.get_exit_code() : 2;
  }
  return common::run_program("generate", [&] { return run(flags); });
}
