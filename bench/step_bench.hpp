#pragma once
/// @file step_bench.hpp
/// @brief What the training-step benchmarks share (memory_vs_lora, memory_vs_controlnet): the
/// model configurations, the flags every row of a run shares, the peak meter, the timed loop of
/// one training step over a `common::Trainable` and the rows it fills, as a table line and as JSON.
///
/// One step = forward, MSE on ε, backward, AdamW step: `common::TrainStep` on the method's
/// `Trainable`, what the training programs run. Peak memory: on CUDA the caching allocator's peak
/// allocated bytes (what the Python peer reports too: bench/RESULTS.md), on the CPU an exact count
/// of tensor bytes (examples/common/counting_allocator.hpp); weights included. The configurations
/// (`--config`): SD 1.5, SD 2.1 and SDXL at their native sizes, and reduced models of SD 1.5's and
/// SDXL's layouts. Without a GPU a run measures the reduced SD 1.5 by default, whose CPU byte counts
/// are deterministic: a change to a bench can be checked against them. SDXL's UNet reads its added
/// conditioning (a pooled text embedding and the size conditioning's time ids) in every forward
/// pass: `random_batch` gives it with the batch.
///
/// A bench declares its own flags (methods, batch sizes) and the shared ones (`add_run_flags`),
/// resolves them (`resolve`), and for each row attaches its method to the UNet, makes the batch
/// (`random_batch`) and measures it (`time_steps`).

#include "flop_count.hpp"
#include "op_profile.hpp"

#include <common/counting_allocator.hpp>
#include <common/graphed_step.hpp>
#include <common/lean.hpp>
#include <common/memory.hpp>
#include <common/model.hpp>
#include <common/sample_order.hpp>
#include <common/strings.hpp>
#include <common/train_step.hpp>
#include <sd/clip.hpp>
#include <sd/clip_projection.hpp>
#include <sd/precision.hpp>
#include <sd/stable_diffusion.hpp>
#include <sd/tiny.hpp>
#include <sd/unet.hpp>
#include <sd/vae.hpp>

#include <scedit/atomic_file.hpp>
#include <scedit/compat.hpp>
#include <scedit/trainable.hpp>

#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>
#include <torch/torch.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <optional>
#include <string>
#include <vector>

#if defined(SCEDIT_WITH_CUDA)
#include <ATen/cuda/CUDAContext.h>
#endif

namespace bench {

/// The models one configuration measures.
struct Shapes {
  sd::UNetConfig unet;     ///< the UNet (and the ControlNet made from it)
  sd::VAEConfig vae;       ///< counted towards the pipeline; resident with `--pipeline`
  sd::CLIPTextConfig text; ///< counted towards the pipeline; resident with `--pipeline`
  /// SDXL's second text encoder (with its projection): counted and resident as `text`; none else.
  std::optional<sd::CLIPTextConfig> text_2;
  int64_t latent = 64;     ///< latent side (64 = 512 px)
  std::string name;        ///< sd15 | sd21 | sdxl | reduced | reduced-sdxl
};

/// The configuration `name`: `sd15` (SD 1.5 at 512 px), `sd21` (SD 2.1 at 768 px), `sdxl`
/// (SDXL base at 1024 px),
/// `reduced` (SD 1.5's layout, narrower and at 128 px, which two CPU cores measure in seconds) or
/// `reduced-sdxl` (SDXL's layout — 3 levels, 9 skips, 1, 2, 10 transformer layers, added
/// conditioning, two text encoders — narrower and at 128 px).
inline Shapes make_shapes(const std::string& name) {
  Shapes s;
  s.name = name;
  if (name == "sd15") {
    s.unet = sd::UNetConfig::sd15();
    s.vae = sd::VAEConfig::sd15();
    s.text = sd::CLIPTextConfig::sd15();
    s.latent = 64;
  } else if (name == "sd21") {  // the architecture of random_sd21_pipeline (examples/sd/tiny.hpp)
    s.unet = sd::UNetConfig::sd21();
    s.vae = sd::VAEConfig::sd15();
    s.text = sd::CLIPTextConfig::sd21();
    s.latent = 96;  // 768 px
  } else if (name == "sdxl" || name == "reduced-sdxl") {
    // The architecture of random_sdxl_pipeline (examples/sd/tiny.hpp).
    s.unet = sd::UNetConfig::sdxl();
    s.vae = sd::VAEConfig::sdxl();
    s.text = sd::CLIPTextConfig::sd15();
    s.text_2 = sd::CLIPTextConfig::sdxl_2();
    s.latent = 128;  // 1024 px
    if (name == "reduced-sdxl") {
      // SDXL's layout (its depth at the last level included: that is where it differs most from
      // SD 1.5) at widths two CPU cores measure in seconds.
      s.unet.block_out_channels = {32, 64, 128};     // SDXL: 320, 640, 1280
      s.unet.attention_head_dim = {2, 4, 8};         // heads of 16 channels (SDXL: 64)
      s.unet.norm_num_groups = 16;                   // SDXL: 32
      s.text = sd::tiny_text_config();               // SDXL: CLIP ViT-L
      s.text_2 = sd::tiny_text_config();             // SDXL: OpenCLIP bigG
      s.unet.cross_attention_dim = s.text.hidden_size + s.text_2->hidden_size;  // 64 (SDXL: 2048)
      s.unet.addition_time_embed_dim = 8;                                         // SDXL: 256
      s.unet.projection_class_embeddings_input_dim =
          s.text_2->projection_dim + sd::UNetConfig::kTextTimeIds * s.unet.addition_time_embed_dim;
      s.vae = sd::tiny_vae_config();
      s.latent = 16;  // 128 px
    }
  } else if (name == "reduced") {
    // SD 1.5's layout (4 levels, 12 skips, cross-attention in the first three) at a width and
    // latent size two CPU cores measure in seconds.
    s.unet = sd::UNetConfig::sd15();
    s.unet.block_out_channels = {32, 64, 128, 128};  // SD 1.5: 320, 640, 1280, 1280
    s.unet.cross_attention_dim = 64;                  // SD 1.5: 768
    s.unet.norm_num_groups = 16;                      // SD 1.5: 32
    s.vae = sd::tiny_vae_config();
    s.text = sd::tiny_text_config();
    s.text.hidden_size = 64;
    s.latent = 16;  // 128 px
  } else {
    TORCH_CHECK(false, "--config must be sd15, sd21, sdxl, reduced or reduced-sdxl, got '", name, "'");
  }
  return s;
}

/// One row of a table: one method at one precision and batch size.
struct Row {
  std::string method;     ///< the bench's name of the method (`scedit`, `lora`, `controlnet`, …)
  std::string precision;  ///< fp32 | bf16w
  int64_t batch_size = 0;
  int64_t trainable = 0;          ///< trainable parameter elements in the measured configuration
  double trainable_percent = 0;   ///< of the whole pipeline's (UNet, method, VAE, text encoder)
  int64_t peak_bytes = 0;         ///< peak of the timed steps, weights included
  double step_ms = 0;             ///< median of the timed steps
  double images_per_s = 0;        ///< batch_size / step time
  std::string operators;  ///< `--op-profile`'s table of one more step (empty without)
  double flops = 0;        ///< `--flops`: the FLOPs of one more step (0 without)
  int64_t flops_unreadable = 0;  ///< operators of a counted kind the count could not read
};

/// How every row of a run is measured: the flags the step benchmarks share (`add_run_flags`),
/// then what `resolve` derives from them.
struct Run {
  // ---- as given ------------------------------------------------------------------------------
  std::string config = "auto";          ///< sd15 | sd21 | sdxl | reduced | reduced-sdxl | auto
  int64_t latent = 0;                   ///< latent side; 0: the configuration's
  std::string precisions = "fp32,bf16w";  ///< comma-separated: fp32 | bf16w
  std::string device_flag = "auto";     ///< auto | cpu | cuda[:N]
  int64_t warmup = 2, steps = 5;        ///< untimed, then timed steps per row
  bool pipeline = false;                ///< VAE and text encoder resident on the device too
  bool recompute = false;               ///< recompute activations in the backward pass
  std::string lean_flag = "default";    ///< `--lean`, as common::parse_lean_activations reads it
  std::string optimizer = "foreach";    ///< foreach | per-tensor
  bool channels_last = false;           ///< convolution weights and inputs NHWC
  std::string attention = "auto";       ///< fused attention kernels on CUDA
  bool cudnn_benchmark = false;         ///< cuDNN times its algorithms in the warm-up steps
  std::string cuda_graph = "auto";      ///< auto | on | off: the step captured in the last warm-up step, then replayed
  size_t op_profile = 0;  ///< operators listed for one profiled step after the timed ones (0: none)
  bool flops = false;     ///< count one more step's FLOPs and set them against the matmul peak
  std::string json_path;                ///< `--json`: the rows also go there (empty: nowhere)

  // ---- resolved --------------------------------------------------------------------------------
  torch::Device device = torch::kCPU;   ///< where every row runs
  std::string device_name;  ///< the GPU's name, or the device's
  Shapes shapes;                        ///< the configuration, with `--latent` applied
  std::vector<std::string> precision_list;  ///< `precisions`, checked
  sd::LeanActivations lean;             ///< the levers the UNet (and a ControlNet) run with
  bool graphed = false;                 ///< steps go through common::GraphedTrainStep (`cuda_graph`)
  common::OptimOptions optim;           ///< AdamW, foreach or per-tensor
  int64_t pipeline_params = 0;  ///< VAE + text encoder parameters, for the percentages
};

/// Declares the shared flags on `app`, writing into `run`.
inline void add_run_flags(CLI::App& app, Run& run) {
  app.add_option("--config", run.config, "sd15 | sd21 | sdxl | reduced | reduced-sdxl | auto (sd15 on CUDA, reduced on the CPU); reduced-sdxl is SDXL's layout at reduced width");
  app.add_option("--latent", run.latent, "Latent side (0: the config's: 64 = 512 px for sd15, 96 = 768 px for sd21, 128 = 1024 px for sdxl, 16 = 128 px for the reduced ones)")->check(CLI::NonNegativeNumber);
  app.add_option("--precisions", run.precisions, "Comma-separated: fp32 (TF32 matmuls allowed), bf16w (frozen bf16, trainable fp32, bf16 autocast)");
  app.add_option("--device", run.device_flag, "auto | cpu | cuda[:N]");
  app.add_option("--warmup", run.warmup, "Warm-up steps (not timed)");
  app.add_option("--steps", run.steps, "Timed steps (median reported)")->check(CLI::PositiveNumber);
  app.add_flag("--pipeline", run.pipeline, "Keep the VAE and the text encoder resident on the device too (as the seed's run)");
  app.add_flag("--recompute", run.recompute, "Recompute the decoder's resnets and transformers in the backward pass (gradient checkpointing; a ControlNet recomputes its encoder's)");
  app.add_option("--lean", run.lean_flag, "Lean activations, comma-separated: norm-silu (GroupNorm+SiLU keeps only its input), geglu (GEGLU keeps only its projection), norm-dtype (norms in bf16 under autocast), ff-recompute (feed-forwards recomputed in backward), all (those four), fused-norm-silu and fused-geglu (the fused CUDA kernels, what norm-silu and geglu keep in fewer passes; CUDA builds), fused-layer-norm (the transformers' LayerNorms on a fused CUDA kernel), fused (all three), default (norm-dtype, plus fused where they run), none");
  app.add_option("--optimizer", run.optimizer, "AdamW kernels: foreach (multi-tensor) | per-tensor (torch::optim::AdamW::step)")->check(CLI::IsMember({"foreach", "per-tensor"}));
  app.add_flag("--channels-last", run.channels_last, "Convolution weights and the input in channels-last (NHWC) memory order");
  app.add_option("--attention", run.attention, "Fused attention kernels on CUDA: auto | flash | efficient | cudnn | math (LibTorch 2.5+)");
  app.add_flag("--cudnn-benchmark", run.cudnn_benchmark, "Let cuDNN time its convolution algorithms in the first steps and keep the fastest (the warm-up steps)");
  app.add_option("--cuda-graph", run.cuda_graph, "auto | on | off: capture the whole step (forward, backward, AdamW) as a CUDA graph in the last warm-up step and replay it. auto: as the programs (common::choose_cuda_graph), except with --op-profile, --flops or --warmup under 2, which time eager steps; on: on the CPU the same step runs uncaptured")->check(CLI::IsMember({"auto", "on", "off"}));
  app.add_option("--op-profile", run.op_profile, "After each row's timed steps, time the operators of one more step and list the N slowest (0: off; the step runs slower while profiled, see bench/op_profile.hpp)");
  app.add_flag("--flops", run.flops, "After each row's timed steps, count one more step's FLOPs (matrix products, convolutions, attention: bench/flop_count.hpp) and set the achieved rate against this device's measured matmul throughput");
  app.add_option("--json", run.json_path, "Also write the rows as JSON to this file");
}

/// Resolves the shared flags: the device (installing the CPU byte counter off CUDA), the
/// configuration, precisions, levers and optimizer; checks their combinations; sets the global
/// matmul, cuDNN and attention settings every row runs with.
inline void resolve(Run& run) {
  run.device = common::resolve_device(run.device_flag);
  const auto& device = run.device;
  if (!device.is_cuda()) common::CountingCPUAllocator::install();
  if (run.config == "auto") run.config = device.is_cuda() ? "sd15" : "reduced";
  run.shapes = make_shapes(run.config);
  if (run.latent > 0) run.shapes.latent = run.latent;
  run.precision_list = common::split_list(run.precisions);
  run.lean = common::parse_lean_activations(run.lean_flag, device);
  run.optim.foreach = run.optimizer == "foreach";  // otherwise SCEdit's recipe, as train_style
  const bool on = run.cuda_graph == "on";
  TORCH_CHECK(!on || run.warmup >= 2, "--cuda-graph on needs --warmup 2 or more (one eager step, then "
              "the capture), got ", run.warmup);
  TORCH_CHECK(!on || run.op_profile == 0, "--op-profile times eager operators, which a CUDA graph replay "
              "does not run: leave out --cuda-graph on");
  TORCH_CHECK(!on || !run.flops, "--flops counts the operators of an eager step, which a CUDA graph replay "
              "does not run: leave out --cuda-graph on (the captured step does the same arithmetic)");
  // The rows' precisions (fp32, bf16w) and a single process never rule a graph out.
  const bool eager_only = run.op_profile > 0 || run.flops || run.warmup < 2;
  run.graphed = run.cuda_graph != "off" && (on || !eager_only) &&
                common::choose_cuda_graph(run.cuda_graph, device, sd::Precision::kFP32, 1, 1).graphed;
  for (const auto& p : run.precision_list) {
    TORCH_CHECK(p == "fp32" || p == "bf16w", "--precisions: '", p, "' is not fp32 or bf16w");
  }
  // TF32 matmuls on fp32, as the peer measured.
  at::globalContext().setFloat32MatmulPrecision("high");
  at::globalContext().setBenchmarkCuDNN(run.cudnn_benchmark);
  scedit::compat::set_attention_kernels(run.attention);
  run.device_name = device.str();
#if defined(SCEDIT_WITH_CUDA)
  if (device.is_cuda()) run.device_name = at::cuda::getDeviceProperties(device.index() < 0 ? 0 : device.index())->name;
#endif
}

/// The precision a row name means (`bf16w`: bf16 frozen weights and autocast, fp32 trainables).
inline sd::Precision parse_precision(const std::string& name) {
  return sd::parse_precision(name == "bf16w" ? "bf16" : name);
}

/// The dtype of the frozen weights at precision `name`.
inline torch::Dtype frozen_dtype(const std::string& name) {
  return name == "fp32" ? torch::kFloat32 : torch::kBFloat16;
}

/// The VAE and text encoder: counted towards the percentages (as the seed computes them), and with
/// `--pipeline` kept on the device in the frozen dtype while the UNet trains.
struct FrozenEncoders {
  sd::VAE vae{nullptr};                                      ///< the VAE
  sd::CLIPTextModel text_encoder{nullptr};                   ///< the (first) text encoder
  sd::CLIPTextModelWithProjection text_encoder_2{nullptr};  ///< SDXL's second; else empty

  /// Builds them (seed 0), counts them into `run.pipeline_params`, and frees them again unless
  /// `--pipeline`, so that the CPU's byte count holds only what the GPU's would.
  explicit FrozenEncoders(Run& run) {
    torch::manual_seed(0);
    vae = sd::VAE(run.shapes.vae);
    text_encoder = sd::CLIPTextModel(run.shapes.text);
    if (run.shapes.text_2) text_encoder_2 = sd::CLIPTextModelWithProjection(*run.shapes.text_2);
    run.pipeline_params = scedit::count_parameters(*vae).total() + scedit::count_parameters(*text_encoder).total() +
                          (text_encoder_2.is_empty() ? 0 : scedit::count_parameters(*text_encoder_2).total());
    if (!run.pipeline) {
      vae = sd::VAE(nullptr);
      text_encoder = sd::CLIPTextModel(nullptr);
      text_encoder_2 = sd::CLIPTextModelWithProjection(nullptr);
    }
  }

  /// With `--pipeline`, moves them to the device in precision `name`'s frozen dtype.
  void to(const Run& run, const std::string& name) {
    if (vae.is_empty()) return;
    vae->to(run.device, frozen_dtype(name));
    text_encoder->to(run.device, frozen_dtype(name));
    if (!text_encoder_2.is_empty()) text_encoder_2->to(run.device, frozen_dtype(name));
  }
};

/// Applies the run's levers to a model that trains or runs in the step (the UNet, a ControlNet):
/// recomputation, lean activations and fused kernels, channels-last — as `TrainingRun` does.
template <typename Model>
void apply_levers(Model& model, const Run& run) {
  model->set_gradient_checkpointing(run.recompute);
  model->set_lean_activations(run.lean);
  model->set_channels_last(run.channels_last);
}

/// The UNet of the configuration (seed 0) on the device in precision `name`'s frozen dtype, with
/// the run's levers; one UNet serves every row of that precision.
inline sd::UNet make_unet(const Run& run, const std::string& name) {
  torch::manual_seed(0);
  sd::UNet unet(run.shapes.unet);
  unet->to(run.device, frozen_dtype(name));
  apply_levers(unet, run);
  return unet;
}

/// The header line of a run: configuration, device, steps, levers and optimizer.
inline std::string settings_line(const Run& run) {
  std::string settings;  // what differs from the plain eager step
  if (run.pipeline) settings += ", VAE + CLIP resident";
  if (run.recompute) settings += ", decoder recomputed in backward";
  if (run.channels_last) settings += ", channels-last";
  if (run.cudnn_benchmark) settings += ", cuDNN benchmark";
  if (run.attention != "auto") settings += ", " + run.attention + " attention";
  const auto& s = run.shapes;
  char added[128] = "";
  if (s.unet.has_text_time()) {
    std::snprintf(added, sizeof(added), ", pooled %lld, time ids of %lldx%lld px",
                  static_cast<long long>(s.unet.text_embeds_dim()), static_cast<long long>(8 * s.latent),
                  static_cast<long long>(8 * s.latent));
  }
  char line[1024];
  std::snprintf(line, sizeof(line), "config %s (latents 4x%lldx%lld, text 77x%lld%s), device %s, %lld warm-up + %lld timed steps%s, lean %s, %s\n",
                run.config.c_str(), static_cast<long long>(s.latent), static_cast<long long>(s.latent),
                static_cast<long long>(s.unet.cross_attention_dim), added, run.device_name.c_str(),
                static_cast<long long>(run.warmup), static_cast<long long>(run.steps), settings.c_str(),
                common::to_string(run.lean).c_str(),
                run.graphed ? (run.device.is_cuda() ? "captured AdamW, CUDA graph replays" : "capturable AdamW, uncaptured on the CPU")
                               : (run.optimizer + " AdamW").c_str());
  return line;
}

/// Peak bytes since the last reset, on the device that runs the step.
struct PeakMeter {
  torch::Device device;
  /// Starts a new peak from what is held now.
  void reset() {
    if (device.is_cuda()) {
      common::reset_cuda_peak(device);
    } else {
      common::CountingCPUAllocator::install().reset_peak();
    }
  }
  /// The most bytes held at once since `reset`.
  int64_t peak() const {
    return device.is_cuda() ? common::cuda_peak_allocated(device)
                            : common::CountingCPUAllocator::install().peak();
  }
};

/// Waits for the device's queued work (nothing to wait for on the CPU).
inline void synchronize(const torch::Device& device) {
  if (device.is_cuda()) torch::cuda::synchronize(device.index() < 0 ? 0 : device.index());
}

/// A batch of random latents [B, 4, l, l] (float32) and text embeddings [B, 77, D] (the frozen
/// dtype), from the global generator; for a UNet with added conditioning (SDXL) a random pooled
/// embedding [B, P] (the frozen dtype) and the time ids of an uncropped 8l × 8l image, as
/// training at that size gives them; and `conditions` condition images [B, 3, 8l, 8l], uniform in
/// [0, 1] (float32, as `BatchSource` gives them), drawn after them: random, and fixed for the row.
inline common::TrainBatch random_batch(const Run& run, int64_t batch, const std::string& precision,
                                       int64_t conditions = 0) {
  const auto& s = run.shapes;
  common::TrainBatch inputs;
  inputs.latents = torch::randn({batch, 4, s.latent, s.latent}).to(run.device);
  inputs.text = torch::randn({batch, 77, s.unet.cross_attention_dim}).to(run.device, frozen_dtype(precision));
  if (s.unet.has_text_time()) {
    const auto pooled = torch::randn({batch, s.unet.text_embeds_dim()});
    const auto time_ids = sd::SizeConditioning::uncropped(8 * s.latent, 8 * s.latent).time_ids();
    inputs.added = {pooled.to(run.device, frozen_dtype(precision)),
                    time_ids.expand({batch, -1}).to(run.device, frozen_dtype(precision))};
  }
  for (int64_t i = 0; i < conditions; ++i) {
    inputs.conditions.push_back(torch::rand({batch, 3, 8 * s.latent, 8 * s.latent}).to(run.device));
  }
  return inputs;
}

/// Measures `trainable` on `inputs`: `run.warmup` untimed and `run.steps` timed training steps
/// (eager, or with `--cuda-graph` captured in the last warm-up step and replayed), then with
/// `--op-profile` one more eager step, profiled. Returns a row with the precision, batch size,
/// median step time, images/s, the operators and the peak since the caller's `PeakMeter::reset`
/// (read before the profiled step); the caller adds the method and its parameter counts.
inline Row time_steps(const common::Trainable& trainable, const common::TrainBatch& inputs,
                      const std::string& precision, const Run& run) {
  const auto& device = run.device;
  common::TrainStep step(trainable.denoiser, trainable.tensors(), sd::NoiseSchedule(), run.optim,
                         parse_precision(precision), device);
  // Captured in the last warm-up step, so the timed steps are replays.
  std::optional<common::GraphedTrainStep> graphed;
  if (run.graphed) graphed.emplace(step, /*eager_steps=*/std::max<int64_t>(1, run.warmup - 1));

  // Step i without a graph: its noise from the i-th generator, then AdamW.
  auto eager_step = [&](int64_t i) {
    auto generator = common::step_generator(0, i);
    step.forward_backward(inputs, generator);
    step.optimizer_step(1e-4);
  };
  std::vector<double> times;
  for (int64_t i = 0; i < run.warmup + run.steps; ++i) {
    synchronize(device);
    const auto begin = std::chrono::steady_clock::now();
    if (graphed) {
      auto generator = common::step_generator(0, i);
      graphed->run(inputs, 1e-4, generator);
    } else {
      eager_step(i);
    }
    synchronize(device);
    const double ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - begin).count();
    if (i >= run.warmup) times.push_back(ms);
  }
  std::sort(times.begin(), times.end());
  Row row;
  row.peak_bytes = PeakMeter{device}.peak();
  if (run.flops) {  // one more eager step, after the peak was read
    FlopCount count;
    eager_step(run.warmup + run.steps);
    synchronize(device);
    row.flops = count.flops();
    row.flops_unreadable = count.unreadable_operators();
  }
  if (run.op_profile > 0) {  // one more eager step, after the peak was read
    OpProfile profile(device);
    eager_step(run.warmup + run.steps);
    synchronize(device);
    row.operators = profile.table(run.op_profile);
  }
  row.precision = precision;
  row.batch_size = inputs.latents.size(0);
  row.step_ms = times[times.size() / 2];
  row.images_per_s = row.batch_size * 1000.0 / row.step_ms;
  return row;
}

/// The positive integers of a comma-separated flag value; `flag` names it in errors.
inline std::vector<int64_t> parse_ints(const std::string& text, const char* flag) {
  std::vector<int64_t> values;
  for (const auto& part : common::split_list(text)) {
    try {
      values.push_back(std::stoll(part));
    } catch (const std::exception&) {
      TORCH_CHECK(false, flag, ": '", part, "' is not an integer");
    }
    TORCH_CHECK(values.back() > 0, flag, ": values must be positive, got ", values.back());
  }
  TORCH_CHECK(!values.empty(), flag, " is empty");
  return values;
}

/// Prints each profiled row's operator table (`--op-profile`), after the run's table.
inline void print_operators(const std::vector<Row>& rows) {
  for (const auto& r : rows) {
    if (r.operators.empty()) continue;
    std::printf("\noperators of one profiled step: %s, %s, batch %lld\n\n%s", r.method.c_str(),
                r.precision.c_str(), static_cast<long long>(r.batch_size), r.operators.c_str());
  }
}

/// A row as JSON, with the run's settings (the fields bench/results/*.json hold).
inline nlohmann::json to_json(const Row& r, const Run& run) {
  return {{"method", r.method}, {"precision", r.precision}, {"batch_size", r.batch_size},
          {"trainable_params", r.trainable}, {"peak_bytes", r.peak_bytes},
          {"step_ms", r.step_ms}, {"images_per_s", r.images_per_s},
          {"device", run.device_name}, {"config", run.config}, {"pipeline", run.pipeline},
          {"recompute", run.recompute}, {"channels_last", run.channels_last}, {"cudnn_benchmark", run.cudnn_benchmark}, {"attention", run.attention}, {"lean", common::to_string(run.lean)},
          {"optimizer", run.graphed ? "capturable" : run.optimizer}, {"cuda_graph", run.graphed && run.device.is_cuda()},
          {"flops_per_step", r.flops}, {"matmul_tflops", run.flops ? matmul_tflops(run.device, frozen_dtype(r.precision)) : 0.0}};
}

/// With `--flops`, each row's FLOPs per image and its achieved rate as a share of the device's
/// matmul throughput in the row's precision (bf16w: bf16 products; fp32: with TF32 where allowed).
inline void print_flops(const std::vector<Row>& rows, const Run& run) {
  if (!run.flops) return;
  std::printf("\nFLOPs (bench/flop_count.hpp: matrix products, convolutions, attention) of one step, against "
              "this device's matmul throughput\n\n| method | precision | bs | GFLOP per image | achieved TFLOP/s | "
              "matmul peak TFLOP/s | share of peak |\n|---|---|---|---|---|---|---|\n");
  for (const auto& r : rows) {
    const double peak = matmul_tflops(run.device, frozen_dtype(r.precision)), achieved = r.flops / (r.step_ms / 1000.0) / 1e12;
    std::printf("| %s | %s | %lld | %s | %s | %s | %.0f%% |\n", r.method.c_str(), r.precision.c_str(),
                static_cast<long long>(r.batch_size), three_digits(r.flops / r.batch_size / 1e9).c_str(),
                three_digits(achieved).c_str(), three_digits(peak).c_str(), 100.0 * achieved / peak);
    if (r.flops_unreadable > 0) {
      std::printf("  (%lld operators of a counted kind could not be read: their FLOPs are missing)\n",
                  static_cast<long long>(r.flops_unreadable));
    }
  }
}

/// Ends a run: each profiled row's operator table (`--op-profile`), the FLOPs (`--flops`), then
/// the rows as JSON with the run's settings in `--json`'s file, if one was given (written
/// atomically).
inline void finish(const std::vector<Row>& rows, const Run& run) {
  print_operators(rows);
  print_flops(rows, run);
  if (run.json_path.empty()) return;
  nlohmann::json out = nlohmann::json::array();
  for (const auto& r : rows) out.push_back(to_json(r, run));
  scedit::write_text_file(run.json_path, out.dump(2) + "\n");
  std::printf("\nrows: %s\n", run.json_path.c_str());
}

}  // namespace bench
