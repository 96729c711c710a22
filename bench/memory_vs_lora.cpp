// memory_vs_lora: the seed's table — training memory and speed of SCEdit against LoRA on the
// Stable Diffusion 1.5 UNet — measured with this project's own model and training step.
//
// One step = forward, MSE on ε, backward, AdamW step (common::TrainStep on the tuners'
// Trainable, what train_style runs).
// Peak memory: on CUDA the caching allocator's peak allocated bytes (what the Python peer reports
// too: bench/RESULTS.md), on the CPU an exact count of tensor bytes
// (examples/common/counting_allocator.hpp); weights included.
// Without a GPU it runs a reduced model of the same layout by default (see --config).

#include "op_profile.hpp"

#include <common/counting_allocator.hpp>
#include <common/graphed_step.hpp>
#include <common/lean.hpp>
#include <common/memory.hpp>
#include <common/model.hpp>
#include <common/sample_order.hpp>
#include <common/strings.hpp>
#include <common/train_step.hpp>
#include <common/tuners.hpp>
#include <sd/clip.hpp>
#include <sd/tiny.hpp>
#include <sd/unet.hpp>
#include <sd/vae.hpp>

#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>
#include <torch/torch.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <iostream>
#include <optional>
#include <string>
#include <vector>

#if defined(SCEDIT_WITH_CUDA)
#include <ATen/cuda/CUDAContext.h>
#endif

namespace {

/// The models one configuration measures.
struct Shapes {
  sd::UNetConfig unet;
  sd::VAEConfig vae;
  sd::CLIPTextConfig text;
  int64_t latent = 64;  // latent side (64 = 512 px)
  std::string name;
};

Shapes make_shapes(const std::string& name) {
  Shapes s;
  s.name = name;
  if (name == "sd15") {
    s.unet = sd::UNetConfig::sd15();
    s.vae = sd::VAEConfig::sd15();
    s.text = sd::CLIPTextConfig::sd15();
    s.latent = 64;
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
    TORCH_CHECK(false, "--config must be sd15 or reduced, got '", name, "'");
  }
  return s;
}

/// One row of the table.
struct Row {
  std::string method, precision;
  int64_t batch_size = 0, trainable = 0;
  double trainable_percent = 0;
  int64_t peak_bytes = 0;
  double step_ms = 0, images_per_s = 0;
  std::string operators;  // --op-profile's table of one more step (empty without)
};

/// How every row is run.
struct Run {
  int64_t warmup = 2, steps = 5;
  torch::Device device = torch::kCPU;
  int64_t pipeline_params = 0;  // VAE + text encoder parameters, for the percentages
  common::OptimOptions optim;
  bool cuda_graph = false;
  size_t op_profile = 0;  // operators listed for one profiled step after the timed ones (0: none)
};

int64_t count_elements(const torch::nn::Module& module) {
  return scedit::count_parameters(module).total();
}

/// Peak bytes since the last reset, on the device that runs the step.
struct PeakMeter {
  torch::Device device;
  void reset() {
    if (device.is_cuda()) {
      common::reset_cuda_peak(device);
    } else {
      common::CountingCPUAllocator::install().reset_peak();
    }
  }
  int64_t peak() const {
    return device.is_cuda() ? common::cuda_peak_allocated(device)
                            : common::CountingCPUAllocator::install().peak();
  }
};

void synchronize(const torch::Device& device) {
  if (device.is_cuda()) torch::cuda::synchronize(device.index() < 0 ? 0 : device.index());
}

/// Measures one row on `unet` (frozen weights already on the device in the precision's dtype);
/// the tuners are attached for the row and removed again, so one UNet serves every row.
Row measure(sd::UNet& unet, const Shapes& shapes, const std::string& method,
            const std::string& precision_name, int64_t batch, const Run& run) {
  const auto& device = run.device;
  const auto precision = sd::parse_precision(precision_name == "bf16w" ? "bf16" : precision_name);
  const auto dtype = sd::compute_dtype(precision);
  PeakMeter meter{device};
  meter.reset();

  torch::manual_seed(0);
  common::MethodOptions options;
  options.method = method == "lora" ? "lora" : "scedit";
  auto tuners = common::attach_tuners(unet, options, device);
  unet->train();
  const auto count = scedit::count_parameters(*unet);
  const auto trainable = common::tuner_trainable(unet, tuners, options);
  common::TrainStep step(trainable.denoiser, trainable.tensors(), sd::NoiseSchedule(), run.optim,
                         precision, device);
  // Captured in the last warm-up step, so the timed steps are replays.
  std::optional<common::GraphedTrainStep> graphed;
  if (run.cuda_graph) graphed.emplace(step, /*seed=*/0, /*eager_steps=*/std::max<int64_t>(1, run.warmup - 1));

  common::TrainBatch inputs;
  inputs.latents = torch::randn({batch, 4, shapes.latent, shapes.latent}).to(device);
  inputs.text = torch::randn({batch, 77, shapes.unet.cross_attention_dim}).to(device, dtype);
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
      graphed->run(inputs, 1e-4);
    } else {
      eager_step(i);
    }
    synchronize(device);
    const double ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - begin).count();
    if (i >= run.warmup) times.push_back(ms);
  }
  std::sort(times.begin(), times.end());
  Row row;
  row.peak_bytes = meter.peak();
  if (run.op_profile > 0) {  // one more eager step, after the peak was read
    bench::OpProfile profile(device);
    eager_step(run.warmup + run.steps);
    synchronize(device);
    row.operators = profile.table(run.op_profile);
  }
  row.method = method;
  row.precision = precision_name;
  row.batch_size = batch;
  row.trainable = count.trainable;
  row.trainable_percent = 100.0 * count.trainable / (count.total() + run.pipeline_params);
  row.step_ms = times[times.size() / 2];
  row.images_per_s = batch * 1000.0 / row.step_ms;
  if (tuners.lora) tuners.lora->unload();
  if (!tuners.sc.empty()) scedit::detach_tuners(*unet, "sc");
  return row;
}

std::vector<int64_t> parse_ints(const std::string& text, const char* flag) {
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


}  // namespace

int main(int argc, char** argv) {
  std::string config = "auto", batches = "auto", precisions = "fp32,bf16w", methods = "lora,scedit";
  std::string device_flag = "auto", json_path, lean_flag = "default", optimizer = "foreach", attention = "auto";
  int64_t latent = 0;
  bool pipeline = false, recompute = false, channels_last = false, cudnn_benchmark = false;
  Run run;
  CLI::App app{"memory_vs_lora: peak memory and speed of one SD 1.5 training step, SCEdit vs LoRA "
               "(r=64 on to_q/to_k/to_v/to_out.0/ff.net.0.proj/ff.net.2)"};
  app.option_defaults()->always_capture_default();
  app.add_option("--config", config, "sd15 | reduced | auto (sd15 on CUDA, reduced on the CPU)");
  app.add_option("--latent", latent, "Latent side (0: the config's, 64 = 512 px for sd15, 16 for reduced)")->check(CLI::NonNegativeNumber);
  app.add_option("--batch-sizes", batches, "Comma-separated batch sizes (auto: 1,10,30 for sd15, 1,4 for reduced)");
  app.add_option("--precisions", precisions, "Comma-separated: fp32 (TF32 matmuls allowed), bf16w (frozen bf16, trainable fp32, bf16 autocast)");
  app.add_option("--methods", methods, "Comma-separated: lora, scedit");
  app.add_option("--device", device_flag, "auto | cpu | cuda[:N]");
  app.add_option("--warmup", run.warmup, "Warm-up steps (not timed)");
  app.add_option("--steps", run.steps, "Timed steps (median reported)")->check(CLI::PositiveNumber);
  app.add_flag("--pipeline", pipeline, "Keep the VAE and the text encoder resident on the device too (as the seed's run)");
  app.add_flag("--recompute", recompute, "Recompute the decoder's resnets and transformers in the backward pass (gradient checkpointing)");
  app.add_option("--lean", lean_flag, "Lean activations, comma-separated: norm-silu (GroupNorm+SiLU keeps only its input), geglu (GEGLU keeps only its projection), norm-dtype (norms in bf16 under autocast), ff-recompute (feed-forwards recomputed in backward), all (those four), fused-norm-silu and fused-geglu (the fused CUDA kernels, what norm-silu and geglu keep in fewer passes; CUDA builds), fused-layer-norm (the transformers' LayerNorms on a fused CUDA kernel), fused (all three), default (norm-dtype, plus fused where they run), none");
  app.add_option("--optimizer", optimizer, "AdamW kernels: foreach (multi-tensor) | per-tensor (torch::optim::AdamW::step)")->check(CLI::IsMember({"foreach", "per-tensor"}));
  app.add_flag("--channels-last", channels_last, "Convolution weights and the input in channels-last (NHWC) memory order");
  app.add_option("--attention", attention, "Fused attention kernels on CUDA: auto | flash | efficient | cudnn | math (LibTorch 2.5+)");
  app.add_flag("--cudnn-benchmark", cudnn_benchmark, "Let cuDNN time its convolution algorithms in the first steps and keep the fastest (the warm-up steps)");
  app.add_flag("--cuda-graph", run.cuda_graph, "Capture the whole step (noise draw, forward, backward, AdamW) as a CUDA graph in the last warm-up step and replay it (on the CPU the same step runs uncaptured)");
  app.add_option("--op-profile", run.op_profile, "After each row's timed steps, time the operators of one more step and list the N slowest (0: off; the step runs slower while profiled, see bench/op_profile.hpp)");
  app.add_option("--json", json_path, "Also write the rows as JSON to this file");
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  }
  try {
    run.device = common::resolve_device(device_flag);
    const auto& device = run.device;
    if (!device.is_cuda()) common::CountingCPUAllocator::install();
    if (config == "auto") config = device.is_cuda() ? "sd15" : "reduced";
    auto shapes = make_shapes(config);
    if (latent > 0) shapes.latent = latent;
    if (batches == "auto") batches = config == "sd15" ? "1,10,30" : "1,4";
    const auto batch_sizes = parse_ints(batches, "--batch-sizes");
    const auto precision_list = common::split_list(precisions);
    const auto method_list = common::split_list(methods);
    const auto lean = common::parse_lean_activations(lean_flag, device);
    run.optim.foreach = optimizer == "foreach";  // otherwise SCEdit's recipe, as train_style
    TORCH_CHECK(!run.cuda_graph || run.warmup >= 2, "--cuda-graph needs --warmup 2 or more (one eager "
                "step, then the capture), got ", run.warmup);
    TORCH_CHECK(!run.cuda_graph || run.op_profile == 0, "--op-profile times eager operators, which a "
                "CUDA graph replay does not run: leave out --cuda-graph");
    for (const auto& p : precision_list) {
      TORCH_CHECK(p == "fp32" || p == "bf16w", "--precisions: '", p, "' is not fp32 or bf16w");
    }
    for (const auto& m : method_list) {
      TORCH_CHECK(m == "lora" || m == "scedit", "--methods: '", m, "' is not lora or scedit");
    }
    // TF32 matmuls on fp32, as the peer measured.
    at::globalContext().setFloat32MatmulPrecision("high");
    at::globalContext().setBenchmarkCuDNN(cudnn_benchmark);
    scedit::compat::set_attention_kernels(attention);

    // The VAE and text encoder count towards the percentages (as the seed computes them); with
    // --pipeline they also stay on the device in the frozen dtype while the UNet trains.
    torch::manual_seed(0);
    sd::VAE vae(shapes.vae);
    sd::CLIPTextModel text_encoder(shapes.text);
    run.pipeline_params = count_elements(*vae) + count_elements(*text_encoder);
    if (!pipeline) {  // freed, so that the CPU's byte count holds only what the GPU's would
      vae = sd::VAE(nullptr);
      text_encoder = sd::CLIPTextModel(nullptr);
    }

    std::string device_name = device.str();
#if defined(SCEDIT_WITH_CUDA)
    if (device.is_cuda()) device_name = at::cuda::getDeviceProperties(device.index() < 0 ? 0 : device.index())->name;
#endif
    std::string settings;  // what differs from the plain eager step
    if (pipeline) settings += ", VAE + CLIP resident";
    if (recompute) settings += ", decoder recomputed in backward";
    if (channels_last) settings += ", channels-last";
    if (cudnn_benchmark) settings += ", cuDNN benchmark";
    if (attention != "auto") settings += ", " + attention + " attention";
    std::printf("config %s (latents 4x%lldx%lld, text 77x%lld), device %s, %lld warm-up + %lld timed steps%s, lean %s, %s\n\n",
                config.c_str(), static_cast<long long>(shapes.latent), static_cast<long long>(shapes.latent),
                static_cast<long long>(shapes.unet.cross_attention_dim), device_name.c_str(),
                static_cast<long long>(run.warmup), static_cast<long long>(run.steps), settings.c_str(),
                common::to_string(lean).c_str(),
                run.cuda_graph ? (device.is_cuda() ? "captured AdamW, CUDA graph replays" : "capturable AdamW, uncaptured on the CPU")
                           : (optimizer + " AdamW").c_str());
    std::printf("| method | precision | bs | trainable (M, %% of pipeline) | peak MiB | step ms | images/s | SCEdit ÷ LoRA memory |\n");
    std::printf("|---|---|---|---|---|---|---|---|\n");
    std::fflush(stdout);

    std::vector<Row> rows;
    for (const auto& precision : precision_list) {
      if (pipeline) {
        const auto dtype = precision == "fp32" ? torch::kFloat32 : torch::kBFloat16;
        vae->to(device, dtype);
        text_encoder->to(device, dtype);
      }
      torch::manual_seed(0);
      sd::UNet unet(shapes.unet);
      unet->to(device, precision == "fp32" ? torch::kFloat32 : torch::kBFloat16);
      unet->set_gradient_checkpointing(recompute);
      unet->set_lean_activations(lean);
      unet->set_channels_last(channels_last);
      for (int64_t batch : batch_sizes) {
        int64_t peak_of[2] = {0, 0};  // LoRA, SCEdit
        for (const auto& method : method_list) {
          auto row = measure(unet, shapes, method, precision, batch, run);
          peak_of[method == "scedit"] = row.peak_bytes;
          char ratio[32] = "";
          if (peak_of[0] > 0 && peak_of[1] > 0) {  // on the second of the pair
            std::snprintf(ratio, sizeof(ratio), "%.2f", static_cast<double>(peak_of[1]) / peak_of[0]);
          }
          std::printf("| %s | %s | %lld | %.3f (%.2f%%) | %.0f | %.1f | %.1f | %s |\n",
                      method == "lora" ? "LoRA" : "SCEdit", precision.c_str(),
                      static_cast<long long>(batch), row.trainable / 1e6, row.trainable_percent,
                      row.peak_bytes / 1048576.0, row.step_ms, row.images_per_s, ratio);
          std::fflush(stdout);
          rows.push_back(row);
        }
      }
    }
    for (const auto& r : rows) {
      if (r.operators.empty()) continue;
      std::printf("\noperators of one profiled step: %s, %s, batch %lld\n\n%s", r.method.c_str(),
                  r.precision.c_str(), static_cast<long long>(r.batch_size), r.operators.c_str());
    }
    if (!json_path.empty()) {
      nlohmann::json out = nlohmann::json::array();
      for (const auto& r : rows) {
        out.push_back({{"method", r.method}, {"precision", r.precision}, {"batch_size", r.batch_size},
                       {"trainable_params", r.trainable}, {"peak_bytes", r.peak_bytes},
                       {"step_ms", r.step_ms}, {"images_per_s", r.images_per_s},
                       {"device", device_name}, {"config", config}, {"pipeline", pipeline},
                       {"recompute", recompute}, {"channels_last", channels_last}, {"cudnn_benchmark", cudnn_benchmark}, {"attention", attention}, {"lean", common::to_string(lean)},
                       {"optimizer", run.cuda_graph ? "capturable" : optimizer}, {"cuda_graph", run.cuda_graph && device.is_cuda()}});
      }
      std::ofstream(json_path) << out.dump(2) << "\n";
      std::printf("\nrows: %s\n", json_path.c_str());
    }
    return 0;
  } catch (const c10::Error& e) {
    std::cerr << "memory_vs_lora: " << e.what_without_backtrace() << "\n";
  } catch (const std::exception& e) {
    std::cerr << "memory_vs_lora: " << e.what() << "\n";
  }
  return 1;
}
