// memory_vs_lora: the seed's table — training memory and speed of SCEdit against LoRA on the
// Stable Diffusion 1.5 UNet (or SD 2.1's, SDXL's: --config) — measured with this project's own
// model and training step.
//
// One step = forward, MSE on ε, backward, AdamW step (common::TrainStep on the tuners'
// Trainable, what train_style runs). Peak memory, the configurations and the shared flags:
// step_bench.hpp. Without a GPU it runs a reduced model of SD 1.5's layout by default (--config).

#include "step_bench.hpp"

#include <common/program.hpp>
#include <common/tuners.hpp>

#include <CLI/CLI.hpp>
#include <torch/torch.h>

#include <cstdio>
#include <string>
#include <vector>

namespace {

/// Measures one row on `unet` (frozen weights already on the device in the precision's dtype);
/// the tuners are attached for the row and removed again, so one UNet serves every row.
bench::Row measure(sd::UNet& unet, const std::string& method, const std::string& precision,
                   int64_t batch, const bench::Run& run) {
  bench::PeakMeter{run.device}.reset();
  torch::manual_seed(0);
  common::MethodOptions options;
  options.method = method == "lora" ? "lora" : "scedit";
  auto tuners = common::attach_tuners(unet, options, run.device);
  unet->train();
  const auto count = scedit::count_parameters(*unet);
  const auto trainable = common::tuner_trainable(unet, tuners, options);
  auto row = bench::time_steps(trainable, bench::random_batch(run, batch, precision), precision, run);
  row.method = method;
  row.trainable = count.trainable;
  row.trainable_percent = 100.0 * count.trainable / (count.total() + run.pipeline_params);
  if (tuners.lora) tuners.lora->unload();
  if (!tuners.sc.empty()) scedit::detach_tuners(*unet, "sc");
  return row;
}

}  // namespace

int main(int argc, char** argv) {
  std::string batches = "auto", methods = "lora,scedit";
  bench::Run run;
  CLI::App app{"memory_vs_lora: peak memory and speed of one SD 1.5 (SD 2.1, SDXL) training step, "
               "SCEdit vs LoRA (r=64 on to_q/to_k/to_v/to_out.0/ff.net.0.proj/ff.net.2)"};
  app.option_defaults()->always_capture_default();
  app.add_option("--batch-sizes", batches, "Comma-separated batch sizes (auto: 1,10,30 for sd15, 1,4,8 for sd21 and sdxl, 1,4 for the reduced ones)");
  app.add_option("--methods", methods, "Comma-separated: lora, scedit");
  bench::add_run_flags(app, run);
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  }
  return common::run_program("memory_vs_lora", [&] {
    bench::resolve(run);
    if (batches == "auto") {
      batches = run.config == "sd15" ? "1,10,30" : run.config == "sd21" || run.config == "sdxl" ? "1,4,8" : "1,4";
    }
    const auto batch_sizes = bench::parse_ints(batches, "--batch-sizes");
    const auto method_list = common::split_list(methods);
    for (const auto& m : method_list) {
      TORCH_CHECK(m == "lora" || m == "scedit", "--methods: '", m, "' is not lora or scedit");
    }
    bench::FrozenEncoders encoders(run);

    std::printf("%s\n", bench::settings_line(run).c_str());
    std::printf("| method | precision | bs | trainable (M, %% of pipeline) | peak MiB | step ms | images/s | SCEdit ÷ LoRA memory |\n");
    std::printf("|---|---|---|---|---|---|---|---|\n");
    std::fflush(stdout);

    std::vector<bench::Row> rows;
    for (const auto& precision : run.precision_list) {
      encoders.to(run, precision);
      auto unet = bench::make_unet(run, precision);
      for (int64_t batch : batch_sizes) {
        int64_t peak_of[2] = {0, 0};  // LoRA, SCEdit
        for (const auto& method : method_list) {
          auto row = measure(unet, method, precision, batch, run);
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
    bench::finish(rows, run);
    return 0;
  });
}
