#pragma once
/// @file tiny.hpp
/// @brief A built-in tiny Stable Diffusion with SD 1.5's layout and seeded random weights: the
/// model the example programs use when no `--model` is given, so they run anywhere, in seconds,
/// with no download.
///
/// Same architecture as SD 1.5, only narrower: a UNet with CrossAttnDown×3 + Down / Up +
/// CrossAttnUp×3, 2 resnets per down block, 12 skip connections (so every SC-, CSC- and LoRA
/// code path is the real one), a 4-level VAE (8× downsampling, like SD's) and a 2-layer CLIP text
/// encoder, with a byte-level tokenizer that needs no files. Its weights are random: its images
/// are noise-like patterns, useful for trying the programs and for tests, not for pictures. Unlike
/// SD 1.5 it predicts v (its scheduler config), and its VAE's posterior is narrow and its latents
/// scaled to about unit spread, as a trained model's are, so that what a tuner learns shows.
///
/// Example:
/// @code
/// sd::StableDiffusion pipe = sd::tiny_pipeline(/*seed=*/0);
/// auto images = sd::generate(pipe, {"a red circle"}, options);  // see sampler.hpp
/// @endcode

#include <sd/clip.hpp>
#include <sd/config.hpp>
#include <sd/stable_diffusion.hpp>
#include <sd/tokenizer.hpp>
#include <sd/unet.hpp>
#include <sd/vae.hpp>

#include <nlohmann/json.hpp>
#include <torch/torch.h>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include <unistd.h>

namespace sd {

/// The tiny UNet: SD 1.5's block types and skip layout with narrow channels.
inline UNetConfig tiny_unet_config() {
  UNetConfig c;                           // block types: SD 1.5's (CrossAttnDown×3 + Down, ...)
  c.sample_size = 8;                      // native latent side: 8 (64-pixel images)
  c.block_out_channels = {32, 64, 64, 64};  // SD 1.5: 320, 640, 1280, 1280
  c.layers_per_block = 2;                 // as SD 1.5: 12 skips
  c.norm_num_groups = 8;                  // SD 1.5: 32
  c.cross_attention_dim = 32;             // = the tiny CLIP's hidden size (SD 1.5: 768)
  c.attention_head_dim = {4};             // 4 heads (diffusers' historical naming; SD 1.5: 8)
  return c;
}

/// The tiny VAE: 4 levels (8× downsampling, as SD's), 4 latent channels.
inline VAEConfig tiny_vae_config() {
  VAEConfig c;
  const std::string down = "DownEncoderBlock2D", up = "UpDecoderBlock2D";
  c.down_block_types = {down, down, down, down};
  c.up_block_types = {up, up, up, up};
  c.block_out_channels = {16, 32, 32, 32};  // SD: 128, 256, 512, 512
  c.layers_per_block = 1;                   // SD: 2
  c.norm_num_groups = 8;                    // SD: 32
  c.sample_size = 64;                       // native image side
  c.scaling_factor = 2.9;  // as SD chose 0.18215: the latents of the demo images get a std of about 1
  return c;
}

/// Number of ids of the tiny tokenizer: 256 byte symbols, the same 256 with `</w>`, bos, eos.
constexpr int64_t kTinyVocabSize = 514;

/// The tiny CLIP text encoder: 2 layers of width 32 over the byte-level vocabulary.
inline CLIPTextConfig tiny_text_config() {
  CLIPTextConfig c;
  c.vocab_size = kTinyVocabSize;  // covers every id of tiny_tokenizer()
  c.hidden_size = 32;             // SD 1.5: 768
  c.intermediate_size = 64;       // SD 1.5: 3072
  c.num_hidden_layers = 2;        // SD 1.5: 12
  c.num_attention_heads = 4;      // SD 1.5: 12
  c.max_position_embeddings = 77;
  c.bos_token_id = kTinyVocabSize - 2;  // <|startoftext|>
  c.eos_token_id = kTinyVocabSize - 1;  // <|endoftext|>: pooling takes its first position
  c.pad_token_id = kTinyVocabSize - 1;
  c.projection_dim = 32;
  return c;
}

namespace detail {

/// OpenAI's `bytes_to_unicode()` symbols in CLIP's vocabulary order: the printable bytes
/// ('!'..'~', '¡'..'¬', '®'..'ÿ') as themselves, then the other 68 bytes as U+0100 onwards.
/// These are the first 256 entries of CLIP's vocab.json.
inline std::vector<std::string> clip_byte_symbols() {
  auto utf8 = [](char32_t c) {
    std::string out;
    if (c < 0x80) {
      out.push_back(static_cast<char>(c));
    } else {  // every symbol here is below U+0800: two bytes
      out.push_back(static_cast<char>(0xC0 | (c >> 6)));
      out.push_back(static_cast<char>(0x80 | (c & 0x3F)));
    }
    return out;
  };
  auto printable = [](int b) { return (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || b >= 0xAE; };
  std::vector<std::string> symbols;
  for (int b = 0; b < 256; ++b) {
    if (printable(b)) symbols.push_back(utf8(static_cast<char32_t>(b)));
  }
  char32_t next = 256;
  for (int b = 0; b < 256; ++b) {
    if (!printable(b)) symbols.push_back(utf8(next++));
  }
  return symbols;
}

}  // namespace detail

/// Writes the tiny tokenizer's files (see `tiny_tokenizer`), `vocab.json` and `merges.txt`, into
/// the existing `folder`: a tokenizer folder that `load_tokenizer` (weights.hpp) reads.
inline void write_tiny_tokenizer_files(const std::filesystem::path& folder) {
  const auto symbols = detail::clip_byte_symbols();
  nlohmann::json vocab = nlohmann::json::object();
  int64_t id = 0;
  for (const auto& s : symbols) vocab[s] = id++;
  for (const auto& s : symbols) vocab[s + "</w>"] = id++;
  vocab[CLIPTokenizer::kBosToken] = id++;
  vocab[CLIPTokenizer::kEosToken] = id++;
  TORCH_CHECK(id == kTinyVocabSize, "write_tiny_tokenizer_files: built ", id, " ids, expected ", kTinyVocabSize);
  {
    std::ofstream out(folder / "vocab.json", std::ios::binary);
    out << vocab.dump();
    TORCH_CHECK(out.good(), "write_tiny_tokenizer_files: cannot write '", (folder / "vocab.json").string(), "'");
  }
  {
    std::ofstream out(folder / "merges.txt", std::ios::binary);
    out << "#version: 0.2\n" << CLIPTokenizer::kBosToken << ' ' << CLIPTokenizer::kEosToken << '\n';
    TORCH_CHECK(out.good(), "write_tiny_tokenizer_files: cannot write '", (folder / "merges.txt").string(), "'");
  }
}

/// The tiny model's tokenizer: CLIP's byte-level BPE with no merges, so every byte of a prompt
/// is one token (`a cat` → `a</w>`, `c`, `a`, `t</w>`). Vocabulary: the 256 byte symbols (ids
/// 0–255, as in CLIP's vocab.json), the same with `</w>` (256–511, also as CLIP's), then
/// `<|startoftext|>` (512) and `<|endoftext|>` (513). Prompts are truncated at 75 bytes.
///
/// `sd::CLIPTokenizer` reads its vocabulary from files, so they are written to a private
/// temporary folder, read and removed. Its merges file must hold at least one rule; the one
/// written (`<|startoftext|> <|endoftext|>`) can never fire, since BPE only ever sees byte
/// symbols and their concatenations, so the tokenizer is purely byte-level.
///
/// `options` as for any CLIP tokenizer (SDXL's second pads with `!`).
inline CLIPTokenizer tiny_tokenizer(CLIPTokenizerOptions options = {}) {
  static std::atomic<uint64_t> counter{0};
  const auto stamp = std::chrono::steady_clock::now().time_since_epoch().count();
  const auto folder = std::filesystem::temp_directory_path() /
                      ("scedit-tiny-tokenizer-" + std::to_string(::getpid()) + "-" +
                       std::to_string(stamp) + "-" + std::to_string(counter++));
  std::filesystem::create_directories(folder);
  // Removed with POSIX calls: linked against PyTorch's pip LibTorch 2.11, whose libtorch.so
  // exports its own std::filesystem::remove_all, that symbol was seen to jump to null.
  struct Cleanup {
    std::filesystem::path path;
    ~Cleanup() {
      ::unlink((path / "vocab.json").c_str());
      ::unlink((path / "merges.txt").c_str());
      ::rmdir(path.c_str());
    }
  } cleanup{folder};
  write_tiny_tokenizer_files(folder);
  return CLIPTokenizer(folder.string(), std::move(options));
}

/// A Stable Diffusion of the given configurations with random weights drawn from `seed` (the
/// same seed gives the same weights; the global random generator's state is restored afterwards;
/// do not build modules on other threads meanwhile), in `dtype`, on the CPU, in eval mode, with
/// the byte-level tokenizer (its ids fit any CLIP vocabulary of at least `kTinyVocabSize`). With
/// `text_config_2` it is an SDXL: a second text encoder with its projection, and a second
/// byte-level tokenizer that pads with `!` as SDXL's does.
inline StableDiffusion random_pipeline(const UNetConfig& unet_config, const VAEConfig& vae_config,
                                       const CLIPTextConfig& text_config, uint64_t seed = 0,
                                       torch::Dtype dtype = torch::kFloat32,
                                       const std::optional<CLIPTextConfig>& text_config_2 = std::nullopt) {
  for (const auto* config : {&text_config, text_config_2 ? &*text_config_2 : &text_config}) {
    TORCH_CHECK(config->vocab_size >= kTinyVocabSize, "random_pipeline: the text encoder's "
                "vocabulary (", config->vocab_size, ") is smaller than the byte-level tokenizer's ",
                kTinyVocabSize, " ids");
  }
  TORCH_CHECK(unet_config.has_text_time() == text_config_2.has_value(), "random_pipeline: a UNet ",
              unet_config.has_text_time() ? "with" : "without", " added conditioning goes with ",
              unet_config.has_text_time() ? "two text encoders" : "one text encoder");
  StableDiffusion sd;
  sd.unet_config = unet_config;
  sd.vae_config = vae_config;
  sd.text_config = text_config;
  if (text_config_2) sd.text_config_2 = *text_config_2;
  {
    // Module constructors draw from the default CPU generator: seed it for the build only.
    // (Not under the generator's mutex: the initialisers lock it themselves.)
    auto generator = at::detail::getDefaultCPUGenerator();
    const torch::Tensor saved = generator.get_state();
    generator.set_current_seed(seed);
    try {
      sd.unet = UNet(sd.unet_config);
      sd.vae = VAE(sd.vae_config);
      sd.text_encoder = CLIPTextModel(sd.text_config);
      if (text_config_2) sd.text_encoder_2 = CLIPTextModelWithProjection(sd.text_config_2);
    } catch (...) {
      generator.set_state(saved);
      throw;
    }
    generator.set_state(saved);
  }
  if (!sd.vae->quant_conv.is_empty()) {
    // A trained VAE's posterior is narrow: its draws are the image's latents; random weights
    // would give logvar ≈ 0, a σ of 1 that drowns the image in every sampled latent, so that
    // nothing (a prompt, a condition) could be learnt from it. Make it near-deterministic.
    torch::NoGradGuard no_grad;
    const int64_t latent = sd.vae_config.latent_channels;
    sd.vae->quant_conv->weight.slice(0, latent).zero_();
    sd.vae->quant_conv->bias.slice(0, latent).fill_(-30.0);
  }
  sd.to(torch::kCPU, dtype);
  sd.unet->eval();
  sd.vae->eval();
  for (auto* encoder : sd.text_encoders()) encoder->eval();
  sd.tokenizer = tiny_tokenizer();
  if (text_config_2) sd.tokenizer_2 = tiny_tokenizer(CLIPTokenizerOptions().pad_token("!"));
  return sd;
}

/// The built-in tiny Stable Diffusion (see the file comment): `random_pipeline` of the tiny
/// configurations.
inline StableDiffusion tiny_pipeline(uint64_t seed = 0, torch::Dtype dtype = torch::kFloat32) {
  auto sd = random_pipeline(tiny_unet_config(), tiny_vae_config(), tiny_text_config(), seed, dtype);
  // It predicts v, as SD 2.1 (768-v) does, on SD 1.5's noise schedule. A model with random weights
  // learns slowly, and an ε loss hardly shows what it learnt of the image from a prompt or a
  // condition: at high noise ε ≈ x_t whatever the image, while v's target is the image itself
  // (−x₀). train_control's default measures that difference (examples/train_control/README.md).
  sd.scheduler_config = {{"_class_name", "DDIMScheduler"}, {"num_train_timesteps", 1000},
                         {"beta_start", 0.00085}, {"beta_end", 0.012},
                         {"beta_schedule", "scaled_linear"}, {"steps_offset", 1},
                         {"set_alpha_to_one", false}, {"clip_sample", false},
                         {"prediction_type", "v_prediction"}};
  sd.files = {{"unet", "<built-in tiny>"}, {"vae", "<built-in tiny>"},
              {"text_encoder", "<built-in tiny>"}, {"tokenizer", "<built-in tiny>"}};
  return sd;
}

/// The full-size SD 1.5 architecture (UNet 859.5M, VAE 83.7M, CLIP-L 123.1M parameters) with
/// random weights: for measuring speed and memory at real size without downloading weights
/// (`--model random:sd15` in the programs). Its images are noise.
inline StableDiffusion random_sd15_pipeline(uint64_t seed = 0, torch::Dtype dtype = torch::kFloat32) {
  auto sd = random_pipeline(UNetConfig::sd15(), VAEConfig::sd15(), CLIPTextConfig::sd15(), seed, dtype);
  sd.files = {{"unet", "<random sd15>"}, {"vae", "<random sd15>"},
              {"text_encoder", "<random sd15>"}, {"tokenizer", "<built-in byte-level>"}};
  return sd;
}

/// SD 2.1's scheduler configuration (stabilityai/stable-diffusion-2-1's
/// `scheduler/scheduler_config.json`, read as a DDIM one) predicting `prediction`: "v_prediction"
/// (SD 2.1, 768-v) or "epsilon" (SD 2.1-base, 512 pixels).
inline nlohmann::json sd21_scheduler_config(const std::string& prediction) {
  return {{"_class_name", "DDIMScheduler"}, {"num_train_timesteps", 1000},
          {"beta_start", 0.00085}, {"beta_end", 0.012}, {"beta_schedule", "scaled_linear"},
          {"steps_offset", 1}, {"set_alpha_to_one", false}, {"clip_sample", false},
          {"prediction_type", prediction}, {"timestep_spacing", "leading"}};
}

/// The full-size SD 2.1 (768-v) architecture (UNet 865.9M, VAE 83.7M, OpenCLIP ViT-H text
/// 340.4M parameters) with random weights and SD 2.1's v-prediction scheduler configuration
/// (`--model random:sd21` in the programs). Its images are noise.
inline StableDiffusion random_sd21_pipeline(uint64_t seed = 0, torch::Dtype dtype = torch::kFloat32) {
  auto sd = random_pipeline(UNetConfig::sd21(), VAEConfig::sd15(), CLIPTextConfig::sd21(), seed, dtype);
  sd.scheduler_config = sd21_scheduler_config("v_prediction");
  sd.files = {{"unet", "<random sd21>"}, {"vae", "<random sd21>"},
              {"text_encoder", "<random sd21>"}, {"tokenizer", "<built-in byte-level>"}};
  return sd;
}

/// SDXL base's scheduler configuration (stabilityai/stable-diffusion-xl-base-1.0's
/// `scheduler/scheduler_config.json`, read as a DDIM one): ε, SD's betas, "leading" spacing.
inline nlohmann::json sdxl_scheduler_config() {
  return {{"_class_name", "EulerDiscreteScheduler"}, {"num_train_timesteps", 1000},
          {"beta_start", 0.00085}, {"beta_end", 0.012}, {"beta_schedule", "scaled_linear"},
          {"steps_offset", 1}, {"set_alpha_to_one", false}, {"clip_sample", false},
          {"prediction_type", "epsilon"}, {"timestep_spacing", "leading"}};
}

/// The tiny SDXL: SDXL base's layout (three levels, the first without attention, 1, 1, 2
/// transformer layers, linear projections, "text_time" added conditioning, two text encoders —
/// CLIP-L-like with quick GELU and a bigG-like one with exact GELU and a projection — and their
/// two tokenizers) at the tiny model's widths, with the tiny VAE. 9 skips, as SDXL's. It predicts
/// v, as the tiny SD does (see `tiny_pipeline`).
inline StableDiffusion tiny_sdxl_pipeline(uint64_t seed = 0, torch::Dtype dtype = torch::kFloat32) {
  UNetConfig unet = UNetConfig::sdxl();
  unet.sample_size = 8;                        // 64-pixel images (SDXL: 128, 1024 pixels)
  unet.block_out_channels = {32, 64, 64};      // SDXL: 320, 640, 1280
  unet.transformer_layers_per_block = {1, 1, 2};  // SDXL: 1, 2, 10
  unet.attention_head_dim = {2, 4, 4};         // heads; 16 channels each (SDXL: 64)
  unet.norm_num_groups = 8;
  CLIPTextConfig text = tiny_text_config(), text_2 = tiny_text_config();
  text_2.hidden_size = 48;                     // SDXL: 768 and 1280
  text_2.intermediate_size = 96;
  text_2.hidden_act = "gelu";
  text_2.projection_dim = 40;                  // SDXL: 1280
  text_2.num_hidden_layers = 3;
  unet.cross_attention_dim = text.hidden_size + text_2.hidden_size;  // 80 (SDXL: 2048)
  unet.addition_time_embed_dim = 8;                                   // SDXL: 256
  unet.projection_class_embeddings_input_dim =
      text_2.projection_dim + UNetConfig::kTextTimeIds * unet.addition_time_embed_dim;  // 88
  auto sd = random_pipeline(unet, tiny_vae_config(), text, seed, dtype, text_2);
  sd.scheduler_config = sdxl_scheduler_config();
  sd.scheduler_config["prediction_type"] = "v_prediction";
  sd.files = {{"unet", "<built-in tiny sdxl>"}, {"vae", "<built-in tiny sdxl>"},
              {"text_encoder", "<built-in tiny sdxl>"}, {"text_encoder_2", "<built-in tiny sdxl>"},
              {"tokenizer", "<built-in tiny>"}, {"tokenizer_2", "<built-in tiny>"}};
  return sd;
}

/// The full-size SDXL base architecture (UNet 2,567.5M, VAE 83.7M, CLIP-L 123.1M and OpenCLIP
/// bigG 694.7M parameters) with random weights and SDXL's scheduler configuration
/// (`--model random:sdxl` in the programs). Its images are noise.
inline StableDiffusion random_sdxl_pipeline(uint64_t seed = 0, torch::Dtype dtype = torch::kFloat32) {
  auto sd = random_pipeline(UNetConfig::sdxl(), VAEConfig::sdxl(), CLIPTextConfig::sd15(), seed, dtype,
                            CLIPTextConfig::sdxl_2());
  sd.scheduler_config = sdxl_scheduler_config();
  sd.files = {{"unet", "<random sdxl>"}, {"vae", "<random sdxl>"}, {"text_encoder", "<random sdxl>"},
              {"text_encoder_2", "<random sdxl>"}, {"tokenizer", "<built-in byte-level>"},
              {"tokenizer_2", "<built-in byte-level>"}};
  return sd;
}

}  // namespace sd
