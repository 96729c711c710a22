// train_style: fine-tune Stable Diffusion 1.5 for a style with SCEdit's SC-Tuners, LoRA, or both.
//
// With no --model it runs on a built-in tiny model with the SD 1.5 layout and a generated demo
// dataset, so the whole path (data, frozen encoders, tuners, AdamW, checkpoints, samples, loss
// curve) runs in under a minute on two CPU cores. See README.md beside this file.

#include <common/checkpoint.hpp>
#include <common/dataset.hpp>
#include <common/graphed_step.hpp>
#include <common/image.hpp>
#include <common/memory.hpp>
#include <common/plot.hpp>
#include <common/train.hpp>
#include <sd/pipeline.hpp>
#include <sd/tiny.hpp>
#include <sd/weights.hpp>

#include <CLI/CLI.hpp>
#include <torch/torch.h>

#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <map>
#include <optional>
#include <string>
#include <vector>

namespace fs = std::filesystem;

namespace {

/// Every flag of the program, with its default.
struct Flags {
  std::string model;      // diffusers folder or single-file checkpoint; empty = built-in tiny
  std::string tokenizer;  // tokenizer folder for single-file checkpoints
  std::string data;       // captioned image folder; empty (with no --model) = generated demo data
  std::string output = "out/train_style";
  common::MethodOptions method;
  std::string lora_targets = "to_q,to_k,to_v,to_out.0,ff.net.0.proj,ff.net.2";
  int64_t resolution = 0;  // 0 = 512 for real models, 64 for the tiny one
  bool random_crop = false;
  bool random_flip = false;
  double caption_dropout = 0.0;
  std::string bad_data = "skip";
  bool cache = false;
  bool gradient_checkpointing = false;
  bool cuda_graph = false;
  bool channels_last = false;
  std::string lean = "default";  // norm-dtype (+ fused kernels on CUDA): fastest and leanest measured (bench/RESULTS.md v0.5, v0.6)
  std::string precision = "fp32";
  std::string device = "auto";
  common::OptimOptions optim = [] {
    common::OptimOptions o;
    o.lr = 0;  // 0 = the default for the model (see --lr)
    return o;
  }();
  int64_t grad_accum = 1;
  int64_t max_steps = 0;  // 0 = from --epochs, or 300 on the tiny default
  double epochs = 0;
  int64_t batch_size = 4;
  uint64_t seed = 0;
  std::string prediction = "epsilon";
  int64_t checkpoint_every = 100;
  int64_t keep_last = 2;
  std::string resume;
  int64_t validation_every = 0;  // 0 = only at the end
  std::vector<std::string> validation_prompts;
  int64_t validation_steps = 20;
  int64_t log_every = 10;
};

/// A training sample source: latents and text embeddings for a list of dataset indices.
class Batches {
 public:
  Batches(sd::StableDiffusion& pipe, const common::CaptionedImageDataset& data, const Flags& flags,
          torch::Device device, torch::Dtype dtype)
      : pipe_(pipe), data_(data), flags_(flags), device_(device), dtype_(dtype) {
    torch::NoGradGuard no_grad;
    empty_text_ = encode({""});
    if (!flags_.cache) return;
    // Cache once: the VAE posterior of every image and the embedding of every caption; training
    // then only runs the UNet. (run() turns random crops and flips off with --cache.)
    std::map<std::string, torch::Tensor> by_caption;
    for (int64_t i = 0; i < data_.size(); ++i) {
      auto generator = common::make_cpu_generator(0);
      auto sample = data_.get(i, generator);
      auto posterior = pipe_.vae->encode(sample.image.unsqueeze(0).to(device_, dtype_));
      means_.push_back(posterior.mean);
      logvars_.push_back(posterior.logvar);
      auto it = by_caption.find(sample.caption);
      if (it == by_caption.end()) it = by_caption.emplace(sample.caption, encode({sample.caption})).first;
      texts_.push_back(it->second);
    }
    std::printf("cached %lld latents and %zu caption embeddings\n",
                static_cast<long long>(data_.size()), by_caption.size());
  }

  /// Latents (× scaling factor) [B, 4, h, w] and text embeddings [B, 77, D] for `indices`;
  /// all randomness (crop, flip, posterior sample, caption dropout) from `generator`.
  std::pair<torch::Tensor, torch::Tensor> get(const std::vector<int64_t>& indices,
                                              torch::Generator& generator) {
    torch::NoGradGuard no_grad;
    torch::Tensor mean, logvar, text;
    if (flags_.cache) {
      std::vector<torch::Tensor> means, logvars, texts;
      for (int64_t i : indices) {
        means.push_back(means_[i]);
        logvars.push_back(logvars_[i]);
        texts.push_back(texts_[i]);
      }
      mean = torch::cat(means), logvar = torch::cat(logvars), text = torch::cat(texts);
    } else {
      // One VAE and one text-encoder call for the whole batch.
      auto batch = data_.get_batch(indices, generator);  // images [B, 3, R, R]
      auto posterior = pipe_.vae->encode(batch.images.to(device_, dtype_));
      mean = posterior.mean, logvar = posterior.logvar, text = encode(batch.captions);
    }
    mean = mean.to(torch::kFloat32), logvar = logvar.to(torch::kFloat32);
    // z ~ N(mean, exp(logvar)), then × scaling factor (diffusers train_text_to_image.py).
    auto noise = torch::randn(mean.sizes(), generator, torch::kFloat32).to(device_);
    auto latents = (mean + torch::exp(0.5 * logvar) * noise) * pipe_.scaling_factor;
    if (flags_.caption_dropout > 0) {
      auto drop = torch::rand({static_cast<int64_t>(indices.size())}, generator) < flags_.caption_dropout;
      for (int64_t b = 0; b < drop.size(0); ++b) {
        if (drop[b].item<bool>()) text[b].copy_(empty_text_[0]);
      }
    }
    return {latents, text};
  }

 private:
  torch::Tensor encode(const std::vector<std::string>& captions) {
    return sd::encode_prompts(pipe_, captions).to(device_);
  }

  sd::StableDiffusion& pipe_;
  const common::CaptionedImageDataset& data_;
  const Flags& flags_;
  torch::Device device_;
  torch::Dtype dtype_;
  torch::Tensor empty_text_;
  std::vector<torch::Tensor> means_, logvars_, texts_;
};

/// The dataset indices of micro-step `m`: epochs are seeded permutations, so the order is a pure
/// function of (seed, m) and a resumed run sees the same batches.
std::vector<int64_t> batch_indices(int64_t m, int64_t batch, int64_t n, uint64_t seed,
                                   std::map<int64_t, torch::Tensor>& permutations) {
  std::vector<int64_t> indices;
  for (int64_t j = 0; j < batch; ++j) {
    const int64_t position = m * batch + j;
    const int64_t epoch = position / n;
    auto it = permutations.find(epoch);
    if (it == permutations.end()) {
      auto generator = common::step_generator(seed, epoch, /*stream=*/1);
      it = permutations.emplace(epoch, torch::randperm(n, generator, torch::kLong)).first;
    }
    indices.push_back(it->second[position % n].item<int64_t>());
  }
  return indices;
}

/// Samples the validation prompts with a fixed seed and writes them as one grid image.
void write_samples(sd::StableDiffusion& pipe, common::TrainedTuners& tuners, const Flags& flags,
                   const std::vector<std::string>& prompts, int64_t resolution,
                   torch::Device device, const fs::path& path) {
  torch::NoGradGuard no_grad;
  tuners.refresh();
  sd::GenerateOptions options;
  options.width = resolution;
  options.height = resolution;
  options.steps = flags.validation_steps;
  options.seed = flags.seed;
  options.device = device;
  options.precision = flags.precision;
  auto images = sd::generate(pipe, prompts, options);
  common::write_png(path.string(), common::make_grid(images, std::min<int64_t>(4, images.size())));
  std::printf("samples: %s\n", path.string().c_str());
}

std::vector<std::string> split_commas(const std::string& text) {
  std::vector<std::string> parts;
  std::stringstream stream(text);
  for (std::string part; std::getline(stream, part, ',');) {
    if (!part.empty()) parts.push_back(part);
  }
  return parts;
}

std::string format_duration(double seconds) {
  const auto s = static_cast<long long>(seconds);
  char text[32];
  std::snprintf(text, sizeof(text), "%lld:%02lld:%02lld", s / 3600, (s / 60) % 60, s % 60);
  return text;
}

int run(const Flags& flags_in) {
  Flags flags = flags_in;
  const bool tiny = flags.model.empty();
  const auto device = common::resolve_device(flags.device);
  const auto precision = common::parse_precision(flags.precision);
  const auto lean = common::parse_lean_activations(flags.lean, device);
  common::check_precision(precision, device);
  const auto dtype = common::compute_dtype(precision);
  flags.method.lora_targets = split_commas(flags.lora_targets);
  if (flags.resolution == 0) flags.resolution = tiny ? 64 : 512;
  if (flags.optim.lr == 0) flags.optim.lr = tiny ? 1e-3 : 1e-4;
  TORCH_CHECK(flags.resolution % 8 == 0, "--resolution must be a multiple of 8, got ", flags.resolution);
  TORCH_CHECK(flags.batch_size > 0, "--batch-size must be positive, got ", flags.batch_size);
  TORCH_CHECK(flags.grad_accum > 0, "--grad-accum must be positive, got ", flags.grad_accum);
  TORCH_CHECK(!flags.cuda_graph || flags.grad_accum == 1, "--cuda-graph captures one micro-batch per "
              "step: it cannot be combined with --grad-accum ", flags.grad_accum);
  if (flags.cuda_graph) common::GraphedTrainStep::check_precision(precision);
  TORCH_CHECK(flags.max_steps >= 0 && flags.epochs >= 0, "--max-steps and --epochs must not be negative");
  TORCH_CHECK(flags.checkpoint_every >= 0 && flags.keep_last >= 0, "--checkpoint-every and --keep-last must not be negative");
  TORCH_CHECK(flags.data.empty() || fs::exists(flags.data), "--data: '", flags.data, "' does not exist");
  TORCH_CHECK(tiny || flags.model == "random:sd15" || fs::exists(flags.model), "--model: '", flags.model,
              "' does not exist");
  const fs::path output(flags.output);
  fs::create_directories(output);

  // The model: real weights, or the built-in tiny SD 1.5-layout model.
  sd::StableDiffusion pipe;
  if (tiny) {
    std::printf("no --model given: training the built-in tiny model (SD 1.5 layout, random weights) "
                "on generated demo data — a demonstration of the whole path, not a useful style\n");
    pipe = sd::tiny_pipeline(flags.seed);
    pipe.unet->to(device, dtype);
    pipe.vae->to(device, dtype);
    pipe.text_encoder->to(device, dtype);
  } else if (flags.model == "random:sd15") {
    std::printf("--model random:sd15: the full SD 1.5 architecture with random weights, for "
                "measuring speed and memory at real size\n");
    pipe = sd::random_sd15_pipeline(flags.seed);
    pipe.unet->to(device, dtype);
    pipe.vae->to(device, dtype);
    pipe.text_encoder->to(device, dtype);
  } else {
    sd::WeightsOptions options;
    options.dtype(dtype).device(device);
    if (!flags.tokenizer.empty()) options.tokenizer(flags.tokenizer);
    pipe = sd::load_pipeline(flags.model, options);
  }
  for (auto* module : std::initializer_list<torch::nn::Module*>{pipe.vae.get(), pipe.text_encoder.get()}) {
    module->eval();
    for (auto& p : module->parameters()) p.set_requires_grad(false);
  }

  // The data.
  const bool random_model = tiny || flags.model == "random:sd15";
  if (flags.data.empty()) {
    TORCH_CHECK(random_model, "--data is required with --model (a folder of images with captions)");
    flags.data = common::make_demo_dataset(output / "demo_data", 16, flags.resolution, flags.seed).string();
    if (flags.validation_prompts.empty()) {
      flags.validation_prompts = {"a red circle on a blue background, flat style",
                                  "a yellow star on a green background, flat style"};
    }
  }
  if (flags.validation_prompts.empty()) flags.validation_prompts = {"A boy in a camouflage jacket with a scarf"};
  TORCH_CHECK(flags.bad_data == "skip" || flags.bad_data == "fatal", "--bad-data must be skip or fatal, got '", flags.bad_data, "'");
  if (flags.cache && (flags.random_crop || flags.random_flip)) {
    std::printf("--cache encodes each image once (centre crop, no flip): ignoring --random-crop "
                "and --random-flip\n");
    flags.random_crop = flags.random_flip = false;
  }
  common::DatasetOptions data_options(flags.resolution);
  data_options.center_crop(!flags.random_crop).random_flip(flags.random_flip)
      .bad_data(flags.bad_data == "skip" ? common::BadDataPolicy::skip : common::BadDataPolicy::fatal);
  common::CaptionedImageDataset data(flags.data, data_options);
  std::printf("data: %lld images from %s (%s layout)", static_cast<long long>(data.size()),
              flags.data.c_str(), common::to_string(data.layout()).c_str());
  if (data.skipped() > 0) {
    std::printf(", %lld skipped:\n", static_cast<long long>(data.skipped()));
    for (const auto& problem : data.problems()) std::printf("  %s\n", problem.c_str());
  } else {
    std::printf("\n");
  }
  Batches batches(pipe, data, flags, device, dtype);

  // The tuners and the step. Their initial values (ln1, LoRA's A) come from the global
  // generator: seed it, so a run is a pure function of its flags.
  torch::manual_seed(flags.seed);
  auto tuners = common::attach_tuners(pipe.unet, flags.method, device);
  const auto count = scedit::count_parameters(*pipe.unet);
  std::printf("method %s: %lld trainable parameters (%.3f%% of the UNet)\n", flags.method.method.c_str(),
              static_cast<long long>(count.trainable), 100.0 * count.trainable / count.total());
  pipe.unet->train();
  pipe.unet->set_gradient_checkpointing(flags.gradient_checkpointing);
  pipe.unet->set_lean_activations(lean);
  pipe.unet->set_channels_last(flags.channels_last);
  sd::NoiseSchedule schedule;
  common::TrainStep step(pipe.unet, tuners, schedule, flags.optim, precision, device, flags.prediction);

  const int64_t images_per_step = flags.batch_size * flags.grad_accum;
  int64_t total = flags.max_steps;
  if (total == 0 && flags.epochs > 0) {
    total = static_cast<int64_t>(std::ceil(flags.epochs * data.size() / images_per_step));
  }
  if (total == 0) {
    TORCH_CHECK(random_model, "give --max-steps or --epochs");
    total = 300;
  }

  // Checkpoint tensors by parameter name, and resume.
  scedit::TensorMap trainable;
  for (const auto& p : pipe.unet->named_parameters()) {
    if (p.value().requires_grad()) trainable[p.key()] = p.value();
  }
  nlohmann::json run_settings = {{"method", flags.method.method}, {"precision", flags.precision},
                                 {"batch_size", flags.batch_size}, {"grad_accum", flags.grad_accum},
                                 {"model", flags.model}};
  const fs::path checkpoints = output / "checkpoints";
  int64_t start = 0;
  if (!flags.resume.empty()) {
    const auto folder = common::resolve_checkpoint(checkpoints, flags.resume);
    auto state = common::load_checkpoint(folder, trainable, step.optimizer());
    TORCH_CHECK(state.seed == flags.seed, "checkpoint '", folder.string(), "' was trained with --seed ",
                state.seed, ", this run has ", flags.seed);
    TORCH_CHECK(state.run == run_settings, "checkpoint '", folder.string(), "' comes from a run with ",
                state.run.dump(), ", this run has ", run_settings.dump());
    step.set_loss_scale(state.loss_scale);
    start = state.step;
    std::printf("resumed from %s at step %lld\n", folder.string().c_str(), static_cast<long long>(start));
    if (flags.cuda_graph) {
      std::printf("--cuda-graph: the noise after a resume is not the uninterrupted run's (the device "
                  "generator is seeded from --seed and the step, not restored)\n");
    }
  }
  // With --cuda-graph the whole step is captured after two eager ones and replayed. Its noise
  // comes from the device generator (seeded from the seed and the first step), not from the
  // per-micro-step CPU generators; the batches still come from them.
  std::optional<common::GraphedTrainStep> graphed;
  if (flags.cuda_graph) {
    graphed.emplace(step, common::step_generator(flags.seed, start, /*stream=*/1).current_seed());
    if (!device.is_cuda()) std::printf("--cuda-graph: no CUDA device, the step runs uncaptured\n");
  }

  // The loop.
  std::vector<common::LossRecord> records;
  std::map<int64_t, torch::Tensor> permutations;
  const auto began = std::chrono::steady_clock::now();
  double smoothed = 0;
  for (int64_t s = start; s < total; ++s) {
    const double lr = common::learning_rate(flags.optim, s, total);
    torch::Tensor loss_sum;  // on the device: read once the whole step is queued
    for (int64_t a = 0; a < flags.grad_accum; ++a) {
      const int64_t m = s * flags.grad_accum + a;
      auto generator = common::step_generator(flags.seed, m);
      auto [latents, text] = batches.get(batch_indices(m, flags.batch_size, data.size(), flags.seed, permutations), generator);
      if (graphed) {  // the whole step, optimizer included (--grad-accum is 1)
        loss_sum = graphed->run(latents, text, lr);
      } else {
        auto micro = step.forward_backward(latents, text, generator, flags.grad_accum);
        loss_sum = a == 0 ? micro : loss_sum + micro;
      }
    }
    if (!graphed) step.optimizer_step(lr);
    const double loss = loss_sum.item<double>() / flags.grad_accum;
    const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - began).count();
    records.push_back({s + 1, loss, lr, seconds});
    smoothed = s == start ? loss : 0.9 * smoothed + 0.1 * loss;
    if ((s + 1) % flags.log_every == 0 || s + 1 == total) {
      const double rate = (s + 1 - start) * images_per_step / std::max(seconds, 1e-9);
      const double eta = (total - s - 1) * images_per_step / std::max(rate, 1e-9);
      std::printf("step %lld/%lld  loss %.4f (avg %.4f)  lr %.2e  %.1f img/s  ETA %s  peak %s\n",
                  static_cast<long long>(s + 1), static_cast<long long>(total), loss, smoothed, lr,
                  rate, format_duration(eta).c_str(), common::peak_memory_string(device).c_str());
      std::fflush(stdout);
    }
    if (flags.checkpoint_every > 0 && (s + 1) % flags.checkpoint_every == 0 && s + 1 < total) {
      if (graphed) graphed->sync_optimizer_state();
      common::TrainState state{s + 1, flags.seed, step.loss_scale(), run_settings};
      auto folder = common::save_checkpoint(checkpoints, trainable, step.optimizer(), state, flags.keep_last);
      std::printf("checkpoint: %s\n", folder.string().c_str());
    }
    if (flags.validation_every > 0 && (s + 1) % flags.validation_every == 0 && s + 1 < total) {
      pipe.unet->eval();
      write_samples(pipe, tuners, flags, flags.validation_prompts, flags.resolution, device,
                    output / "samples" / ("step-" + std::to_string(s + 1) + ".png"));
      pipe.unet->train();
    }
  }

  // What a person wants to look at: the tuners, the loss curve, samples.
  if (start < total) {
    if (graphed) graphed->sync_optimizer_state();
    common::TrainState state{total, flags.seed, step.loss_scale(), run_settings};
    common::save_checkpoint(checkpoints, trainable, step.optimizer(), state, flags.keep_last);
  }
  for (const auto& path : tuners.save(output)) std::printf("tuners: %s\n", path.c_str());
  if (!records.empty()) {
    common::write_loss_csv((output / "loss.csv").string(), records);
    std::vector<int64_t> steps;
    std::vector<double> losses;
    for (const auto& r : records) {
      steps.push_back(r.step);
      losses.push_back(r.loss);
    }
    common::write_loss_plot((output / "loss.png").string(), steps, losses, "train_style " + flags.method.method);
    std::printf("loss: %s, %s\n", (output / "loss.csv").string().c_str(), (output / "loss.png").string().c_str());
  }
  pipe.unet->eval();
  write_samples(pipe, tuners, flags, flags.validation_prompts, flags.resolution, device, output / "samples.png");
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  Flags flags;
  CLI::App app{"train_style: fine-tune Stable Diffusion 1.5 for a style with SCEdit (SC-Tuners), "
               "LoRA, or both. With no --model: the built-in tiny model on generated demo data."};
  app.option_defaults()->always_capture_default();
  app.add_option("--model", flags.model, "Diffusers folder or single-file .safetensors checkpoint (empty: built-in tiny model; random:sd15: SD 1.5's architecture with random weights, for speed and memory measurements)");
  app.add_option("--tokenizer", flags.tokenizer, "Tokenizer folder (vocab.json, merges.txt) for single-file checkpoints");
  app.add_option("--data", flags.data, "Image folder with captions: CSV (Image:FILE,Text), metadata.jsonl, or .txt beside each image");
  app.add_option("--output", flags.output, "Output folder: tuners, loss.csv, loss.png, samples, checkpoints");
  app.add_option("--method", flags.method.method, "scedit | lora | scedit+lora")->check(CLI::IsMember({"scedit", "lora", "scedit+lora"}));
  app.add_option("--sc-down-ratio", flags.method.sc_down_ratio, "SC-Tuner hidden width / skip channels");
  app.add_option("--sc-skips", flags.method.sc_pattern, "Regex over skip-site paths (lsc_identity.0 … 11, decoder order); empty = all");
  app.add_option("--lora-rank", flags.method.lora_rank, "LoRA rank r");
  app.add_option("--lora-alpha", flags.method.lora_alpha, "LoRA alpha (scale alpha / r)");
  app.add_option("--lora-targets", flags.lora_targets, "Comma-separated peft-style module names");
  app.add_option("--resolution", flags.resolution, "Training image side (multiple of 8; 0: 512, or 64 for the tiny model)");
  app.add_flag("--random-crop", flags.random_crop, "Random instead of centre crop");
  app.add_flag("--random-flip", flags.random_flip, "Mirror images left-right at random");
  app.add_option("--caption-dropout", flags.caption_dropout, "Probability of training on the empty caption")->check(CLI::Range(0.0, 1.0));
  app.add_option("--bad-data", flags.bad_data, "skip | fatal: what to do with unreadable images, empty captions, small images");
  app.add_flag("--cache", flags.cache, "Encode every image and caption once (centre crop, no flip) and train on the cache");
  app.add_flag("--gradient-checkpointing", flags.gradient_checkpointing, "Recompute the decoder in the backward pass: less memory, more compute");
  app.add_flag("--channels-last", flags.channels_last, "UNet convolutions in channels-last (NHWC) memory order (measured 7% slower on an H200 at SD 1.5 size: bench/RESULTS.md)");
  app.add_flag("--cuda-graph", flags.cuda_graph, "Capture the whole step (noise, forward, backward, AdamW) as a CUDA graph after two eager steps and replay it: faster at small batches; bf16/fp32, no --grad-accum, fixed batch shape");
  app.add_option("--lean", flags.lean, "Lean activations (less memory, same result in fp32), comma-separated: norm-silu, geglu, norm-dtype, ff-recompute, all (those four), fused-norm-silu, fused-geglu, fused-layer-norm, fused (all three; the fused CUDA kernels, CUDA builds), default (norm-dtype, plus fused where they run), none");
  app.add_option("--precision", flags.precision, "fp32 | bf16 | fp16 (frozen weights in half precision, trainable in fp32)");
  app.add_option("--device", flags.device, "auto | cpu | cuda[:N]");
  app.add_option("--lr", flags.optim.lr, "AdamW learning rate (0: SCEdit's 1e-4; 1e-3 on the tiny default, whose random weights learn slowly)");
  app.add_option("--adam-beta1", flags.optim.beta1, "AdamW beta1");
  app.add_option("--adam-beta2", flags.optim.beta2, "AdamW beta2");
  app.add_option("--adam-eps", flags.optim.eps, "AdamW epsilon");
  app.add_option("--weight-decay", flags.optim.weight_decay, "AdamW weight decay");
  app.add_option("--lr-schedule", flags.optim.schedule, "constant | warmup | cosine");
  app.add_option("--warmup-steps", flags.optim.warmup_steps, "Linear warm-up steps");
  app.add_option("--max-grad-norm", flags.optim.max_grad_norm, "Clip the gradient norm (0: off)");
  app.add_option("--grad-accum", flags.grad_accum, "Micro-batches per optimizer step");
  app.add_option("--max-steps", flags.max_steps, "Optimizer steps (0: from --epochs; 300 on the tiny default)");
  app.add_option("--epochs", flags.epochs, "Passes over the data (when --max-steps is 0)");
  app.add_option("--batch-size", flags.batch_size, "Images per micro-batch");
  app.add_option("--seed", flags.seed, "Seed of every random draw");
  app.add_option("--prediction", flags.prediction, "epsilon | v_prediction");
  app.add_option("--checkpoint-every", flags.checkpoint_every, "Steps between checkpoints (0: only at the end)");
  app.add_option("--keep-last", flags.keep_last, "Checkpoints to keep (0: all)");
  app.add_option("--resume", flags.resume, "Checkpoint folder, or 'latest' under --output/checkpoints");
  app.add_option("--validation-every", flags.validation_every, "Steps between sample grids (0: only at the end)");
  app.add_option("--validation-prompt", flags.validation_prompts, "Prompt for the sample grid (repeatable)");
  app.add_option("--validation-steps", flags.validation_steps, "DDIM steps of the samples");
  app.add_option("--log-every", flags.log_every, "Steps between progress lines")->check(CLI::PositiveNumber);
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  }
  try {
    return run(flags);
  } catch (const c10::Error& e) {
    std::cerr << "train_style: " << e.what_without_backtrace() << "\n";
  } catch (const std::exception& e) {
    std::cerr << "train_style: " << e.what() << "\n";
  }
  return 1;
}
