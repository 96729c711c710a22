// generate_speed: how fast text-to-image runs — the work of one `generate` batch (sd::generate,
// what the program calls): text encoding of the prompts and of the empty negative prompt, DDIM
// (trailing timesteps) with classifier-free guidance (the UNet at batch 2·B), VAE decode and the
// uint8 images, with random weights (speed and memory do not depend on their values).
//
// The same work as the Python peer's `peer_generate.py` (../shared/peer, diffusers' UNet, VAE and
// CLIP-L): guidance 7.5 without rescaling (diffusers' default; SCEdit's recipe rescales by 0.5,
// `--guidance-rescale`), the weights in the row's dtype, the VAE decoding in it too (SDXL's in
// float32 under fp16: sd::upcasts_float16_vae; a float16 decode that overflows says so on stderr
// and runs again in float32). Per row: seconds per batch (median of the timed batches), images/s,
// UNet steps/s (denoising steps per second of one batch) and the peak memory (CUDA: the caching
// allocator's peak allocated bytes; CPU: an exact count of tensor bytes), weights included; on
// CUDA each step's UNet call is replayed from a CUDA graph unless `--cuda-graph off`, and the UNet
// runs generate's default kernel levers unless `--lean none`; with
// `--flops`, the FLOPs per image and the achieved rate as a share of the device's matmul peak.
// Without a GPU it runs the reduced model of SD 1.5's layout (step_bench.hpp's `reduced`).

#include "flop_count.hpp"
#include "step_bench.hpp"

#include <common/counting_allocator.hpp>
#include <common/lean.hpp>
#include <common/program.hpp>
#include <common/strings.hpp>
#include <sd/precision.hpp>
#include <sd/sampler.hpp>
#include <sd/tiny.hpp>

#include <scedit/atomic_file.hpp>

#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>
#include <torch/torch.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <string>
#include <vector>

namespace {

/// The flags.
struct Flags {
  std::string config = "auto";      // sd15 | sd21 | sdxl | reduced | reduced-sdxl | auto
  std::string device = "auto";
  std::string precisions = "auto";  // fp16 | bf16 | fp32, comma-separated
  std::string batches = "auto";
  int64_t steps = 50;
  int64_t size = 0;                 // 0: the configuration's
  double guidance_rescale = 0.0;
  int64_t warmup = 1, repeat = 3;
  std::string cuda_graph = "auto";  // auto | off: each step's UNet call replayed from a CUDA graph
  std::string lean = "default";     // the UNet's kernel levers (common/lean.hpp), as generate's --lean
  std::string vae = "model";        // model: the VAE in the row's dtype, as generate holds it | float32
  bool flops = false;
  std::string json_path;
};

/// The pipeline of `shapes` with random weights (seed 0) on `device` in `precision`'s dtype, as
/// `generate` holds a model; the VAE in float32 when `vae_float32`.
sd::StableDiffusion make_pipeline(const bench::Shapes& shapes, sd::Precision precision, const torch::Device& device,
                                  bool vae_float32) {
  const auto dtype = sd::compute_dtype(precision);
  auto pipe = sd::random_pipeline(shapes.unet, shapes.vae, shapes.text, /*seed=*/0, dtype, shapes.text_2);
  pipe.to(device, dtype);
  if (vae_float32) pipe.vae->to(torch::kFloat32);
  return pipe;
}

}  // namespace

int main(int argc, char** argv) {
  Flags flags;
  CLI::App app{"generate_speed: seconds per batch, images/s, UNet steps/s and peak memory of text-to-image "
               "(text encoding, DDIM with classifier-free guidance, VAE decode), as generate runs it"};
  app.option_defaults()->always_capture_default();
  app.add_option("--config", flags.config, "sd15 | sd21 | sdxl | reduced | reduced-sdxl | auto (sd15 on CUDA, reduced on the CPU)");
  app.add_option("--device", flags.device, "auto | cpu | cuda[:N]");
  app.add_option("--precisions", flags.precisions, "Comma-separated: fp16 (CUDA only), bf16, fp32 (auto: fp16,bf16 on CUDA, fp32,bf16 on the CPU)");
  app.add_option("--batch-sizes", flags.batches, "Comma-separated images per batch (auto: 1,8 on CUDA, 1,2 on the CPU)");
  app.add_option("--steps", flags.steps, "DDIM steps per batch")->check(CLI::PositiveNumber);
  app.add_option("--size", flags.size, "Image side in pixels, a multiple of 8 (0: the configuration's: 512 for sd15)")->check(CLI::NonNegativeNumber);
  app.add_option("--guidance-rescale", flags.guidance_rescale, "diffusers' rescale_noise_cfg φ (0: plain guidance, as the peer)")->check(CLI::Range(0.0, 1.0));
  app.add_option("--warmup", flags.warmup, "Untimed batches per row")->check(CLI::NonNegativeNumber);
  app.add_option("--repeat", flags.repeat, "Timed batches per row (median reported)")->check(CLI::PositiveNumber);
  app.add_option("--lean", flags.lean, "The UNet's kernel levers, as generate's --lean: default (norm-dtype, plus the fused CUDA kernels where they run), none, or levers by name");
  app.add_option("--cuda-graph", flags.cuda_graph, "auto | off: replay each denoising step's UNet call from a CUDA graph where one applies (as generate does by default), or every step eager")->check(CLI::IsMember({"auto", "off"}));
  app.add_option("--vae", flags.vae, "model: the VAE in the row's dtype, as generate holds it (a float16 decode that overflows runs again in float32; SDXL's in float32 under fp16) | float32: held in float32 (generate before v0.10), to measure the half-precision decode")->check(CLI::IsMember({"model", "float32"}));
  app.add_flag("--flops", flags.flops, "After each row's timed batches, count one more batch's FLOPs (matrix products, convolutions, attention: bench/flop_count.hpp) and set the achieved rate against this device's measured matmul throughput");
  app.add_option("--json", flags.json_path, "Also write the rows as JSON to this file");
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  }
  return common::run_program("generate_speed", [&] {
    const auto device = common::resolve_device(flags.device);
    if (!device.is_cuda()) common::CountingCPUAllocator::install();
    if (flags.config == "auto") flags.config = device.is_cuda() ? "sd15" : "reduced";
    const auto shapes = bench::make_shapes(flags.config);
    const int64_t size = flags.size > 0 ? flags.size : 8 * shapes.latent;
    TORCH_CHECK(size % 8 == 0, "--size must be a multiple of 8, got ", size);
    if (flags.precisions == "auto") flags.precisions = device.is_cuda() ? "fp16,bf16" : "fp32,bf16";
    if (flags.batches == "auto") flags.batches = device.is_cuda() ? "1,8" : "1,2";
    std::vector<sd::Precision> precisions;
    for (const auto& name : common::split_list(flags.precisions)) {
      precisions.push_back(sd::parse_precision(name));
      sd::check_precision(precisions.back(), device);
    }
    const auto batch_sizes = bench::parse_ints(flags.batches, "--batch-sizes");
    at::globalContext().setFloat32MatmulPrecision("high");  // TF32, as the peer allows it
    std::string device_name = device.str();
#if defined(SCEDIT_WITH_CUDA)
    if (device.is_cuda()) device_name = at::cuda::getDeviceProperties(device.index() < 0 ? 0 : device.index())->name;
#endif

    const bool graphed = flags.cuda_graph == "auto" && sd::CudaGraph::available(device);
    const auto lean = common::parse_lean_activations(flags.lean, device);
    std::printf("config %s, %lld px, DDIM %lld steps (trailing), guidance 7.5 (rescale %.2g), device %s, "
                "%lld warm-up + %lld timed batches, %s, lean %s, VAE %s\n\n",
                flags.config.c_str(), static_cast<long long>(size), static_cast<long long>(flags.steps),
                flags.guidance_rescale, device_name.c_str(), static_cast<long long>(flags.warmup),
                static_cast<long long>(flags.repeat), graphed ? "UNet calls replayed from a CUDA graph" : "eager steps",
                common::to_string(lean).c_str(), flags.vae == "model" ? "in the row's dtype" : "in float32");
    std::printf("| precision | bs | s / batch | images/s | UNet steps/s | peak MiB |\n|---|---|---|---|---|---|\n");
    std::fflush(stdout);
    nlohmann::json rows = nlohmann::json::array();
    for (const auto precision : precisions) {
      auto pipe = make_pipeline(shapes, precision, device, flags.vae == "float32");
      pipe.unet->set_lean_activations(lean);
      for (const auto batch : batch_sizes) {
        sd::GenerateOptions options;
        options.width = options.height = size;
        options.steps = flags.steps;
        options.guidance_rescale = flags.guidance_rescale;
        options.batch_size = batch;
        options.precision = precision;
        options.device = device;
        options.cuda_graph = graphed;
        const std::vector<std::string> prompts(static_cast<size_t>(batch), "a photograph of an astronaut riding a horse");
        bench::PeakMeter meter{device};
        std::vector<double> seconds;
        for (int64_t i = 0; i < flags.warmup + flags.repeat; ++i) {
          if (i == flags.warmup) meter.reset();
          options.seed = static_cast<uint64_t>(i * batch);
          const auto began = std::chrono::steady_clock::now();
          const auto images = sd::generate(pipe, prompts, options);  // uint8 on the host: the GPU is done
          if (i >= flags.warmup) seconds.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - began).count());
        }
        std::sort(seconds.begin(), seconds.end());
        const double s = seconds[seconds.size() / 2];
        const double peak_mib = meter.peak() / 1048576.0;
        double flops = 0;
        if (flags.flops) {  // one more batch, after the peak was read, eager: a replay runs no operator
          bench::FlopCount count;
          auto counted = options;
          counted.cuda_graph = false;
          sd::generate(pipe, prompts, counted);
          flops = count.flops();
          TORCH_CHECK(count.unreadable_operators() == 0, count.unreadable_operators(), " operators of a counted "
                      "kind could not be read (bench/flop_count.hpp)");
        }
        std::printf("| %s | %lld | %.3f | %.2f | %.1f | %.0f |\n", sd::to_string(precision).c_str(),
                    static_cast<long long>(batch), s, batch / s, flags.steps / s, peak_mib);
        std::fflush(stdout);
        rows.push_back({{"precision", sd::to_string(precision)}, {"batch_size", batch}, {"steps", flags.steps},
                        {"size", size}, {"s_per_batch", s}, {"images_per_s", batch / s},
                        {"unet_steps_per_s", flags.steps / s}, {"peak_mib", peak_mib}, {"config", flags.config},
                        {"guidance_rescale", flags.guidance_rescale}, {"device", device_name},
                        {"cuda_graph", graphed}, {"lean", common::to_string(lean)},
                        {"vae", flags.vae}, {"flops_per_batch", flops}});
      }
    }
    if (flags.flops) {
      std::printf("\nFLOPs (bench/flop_count.hpp: matrix products, convolutions, attention) of one batch, against "
                  "this device's matmul throughput\n\n| precision | bs | GFLOP per image | achieved TFLOP/s | "
                  "matmul peak TFLOP/s | share of peak |\n|---|---|---|---|---|---|\n");
      for (auto& row : rows) {
        const auto name = row["precision"].get<std::string>();
        const double peak = bench::matmul_tflops(device, sd::compute_dtype(sd::parse_precision(name)));
        const double flops = row["flops_per_batch"].get<double>(), s = row["s_per_batch"].get<double>();
        const int64_t batch = row["batch_size"].get<int64_t>();
        std::printf("| %s | %lld | %s | %s | %s | %.0f%% |\n", name.c_str(),
                    static_cast<long long>(batch), bench::three_digits(flops / batch / 1e9).c_str(),
                    bench::three_digits(flops / s / 1e12).c_str(), bench::three_digits(peak).c_str(),
                    100.0 * flops / s / 1e12 / peak);
        row["matmul_tflops"] = peak;
      }
    }
    if (!flags.json_path.empty()) {
      scedit::write_text_file(flags.json_path, rows.dump(2) + "\n");
      std::printf("\nrows: %s\n", flags.json_path.c_str());
    }
    return 0;
  });
}
