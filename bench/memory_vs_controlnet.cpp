// memory_vs_controlnet: trainable parameters, peak memory and speed of one training step for
// controllable generation on the Stable Diffusion 1.5 UNet (or SD 2.1's, SDXL's: --config) — the
// CSC-Tuner (dense hint convs of kernel 1 and 3, with the layout's hint encoder) against ControlNet, with SCEdit's SC-Tuners measured in the same run for the
// step the CSC-Tuner builds on. Measured with this project's own models and training step.
//
// One step = forward, MSE on ε, backward, AdamW step (common::TrainStep on the method's
// Trainable, what train_control and train_style run), with the condition images the CSC-Tuner and
// the ControlNet read. Peak memory, the configurations and the shared flags: step_bench.hpp. The
// ControlNet gets the run's levers as the UNet does (as train_control gives them), so the
// comparison is between the methods, not between their settings.

#include "step_bench.hpp"

#include <common/control.hpp>
#include <common/program.hpp>
#include <common/tuners.hpp>
#include <sd/controlnet.hpp>

#include <CLI/CLI.hpp>
#include <torch/torch.h>

#include <algorithm>
#include <cstdio>
#include <string>
#include <vector>

namespace {

/// Every method, in the default order: ControlNet first, so that each row after it in the same
/// (precision, batch size) prints its ratio to ControlNet's.
const std::vector<std::string>& all_methods() {
  static const std::vector<std::string> methods = {"controlnet", "csc-k1", "csc-k3", "scedit"};
  return methods;
}

/// The targets (checked after the table).
constexpr double kParamRatioTarget = 0.08;   // CSC (kernel 1) trainable ÷ ControlNet's, at most
constexpr double kMemoryRatioTarget = 0.70;  // CSC peak ÷ ControlNet's at every batch size, at most
constexpr double kSpeedRatioTarget = 1.3;    // CSC images/s ÷ ControlNet's at batch 30, at least
constexpr int64_t kSpeedTargetBatch = 30;

/// One method attached to the UNet for one row (or for counting its parameters): what trains,
/// and on destruction the UNet as it was, so that one UNet serves every row. It stays where it
/// was built: the SC-Tuners' denoiser refers to the tuners held here.
class Attached {
 public:
  /// Attaches `method` (one of `all_methods`) to `unet`, its trainable weights float32 on the
  /// run's device; a ControlNet is made from `unet` and given the run's levers.
  Attached(sd::UNet unet, const std::string& method, const bench::Run& run) : unet_(std::move(unet)) {
    if (method == "scedit") {
      sc_ = common::attach_tuners(unet_, sc_options_, run.device);
      trainable_ = common::tuner_trainable(unet_, sc_, sc_options_);
    } else if (method == "controlnet") {
      controlnet_ = common::make_controlnet(unet_, run.device);
      bench::apply_levers(controlnet_, run);
      trainable_ = common::controlnet_trainable(unet_, controlnet_);
    } else {
      control_options_.kernel_size = method == "csc-k1" ? 1 : 3;
      control_ = common::attach_control_tuners(unet_, control_options_, run.device);
      trainable_ = common::control_trainable(unet_, control_, control_options_);
    }
    unet_->train();
  }
  Attached(const Attached&) = delete;
  Attached& operator=(const Attached&) = delete;

  /// Detaches the tuners (a ControlNet is a model beside the UNet: it goes with this object).
  ~Attached() {
    if (!sc_.sc.empty()) scedit::detach_tuners(*unet_, "sc");
    if (!control_.csc.is_empty()) scedit::detach_csc_tuner(*unet_, "csc");
  }

  /// What one training step trains.
  const common::Trainable& trainable() const { return trainable_; }

  /// Condition images per sample the denoiser reads: one for the CSC-Tuner and the ControlNet.
  int64_t conditions() const { return sc_.sc.empty() ? 1 : 0; }

  /// Trainable parameter elements.
  int64_t trainable_count() const {
    int64_t n = 0;
    for (const auto& p : trainable_.parameters) n += p.second.numel();
    return n;
  }

  /// Parameter elements of the models the step holds: the UNet with its tuners, and a ControlNet.
  int64_t model_count() const {
    return scedit::count_parameters(*unet_).total() +
           (controlnet_.is_empty() ? 0 : scedit::count_parameters(*controlnet_).total());
  }

 private:
  sd::UNet unet_;
  common::MethodOptions sc_options_;  // SC-Tuners on every skip, as memory_vs_lora's `scedit`
  common::TrainedTuners sc_;
  common::ControlOptions control_options_;  // the layout's released CSC settings (SDXL: r = 2, P = 320), but the kernel
  common::ControlTuners control_;
  sd::ControlNetModel controlnet_{nullptr};
  common::Trainable trainable_;
};

/// A method's trainable parameters and its share of the pipeline's (UNet, method, VAE, text).
struct Count {
  int64_t trainable = 0;
  double percent = 0;
};

/// Counts every method's trainable parameters on `unet` by attaching it and detaching it again.
std::vector<Count> count_methods(sd::UNet& unet, const bench::Run& run) {
  std::vector<Count> counts;
  for (const auto& method : all_methods()) {
    torch::manual_seed(0);
    Attached attached(unet, method, run);
    const auto n = attached.trainable_count();
    counts.push_back({n, 100.0 * n / (attached.model_count() + run.pipeline_params)});
  }
  return counts;
}

/// Prints the parameter table and the parameter target (SD 1.5's: at other configurations an
/// indication only; `--config sd15 --params-only` gives SD 1.5's ratio exactly).
void print_params(const std::vector<Count>& counts, const sd::UNet& unet, const bench::Run& run) {
  const auto& controlnet = counts[0];
  std::printf("trainable parameters, config %s (UNet %.3f M frozen, VAE + text encoder %.3f M):\n\n",
              run.config.c_str(), scedit::count_parameters(*unet).total() / 1e6, run.pipeline_params / 1e6);
  std::printf("| method | trainable | %% of pipeline | ÷ ControlNet |\n|---|---|---|---|\n");
  for (size_t i = 0; i < counts.size(); ++i) {
    std::printf("| %s | %lld (%.3f M) | %.2f%% | %.4f |\n", all_methods()[i].c_str(),
                static_cast<long long>(counts[i].trainable), counts[i].trainable / 1e6, counts[i].percent,
                static_cast<double>(counts[i].trainable) / controlnet.trainable);
  }
  const double ratio = static_cast<double>(counts[1].trainable) / controlnet.trainable;
  std::printf("\ntarget: csc-k1 trainable ≤ %.0f%% of controlnet's: %.2f%% — %s%s\n\n",
              100 * kParamRatioTarget, 100 * ratio, ratio <= kParamRatioTarget ? "met" : "NOT met",
              run.config == "sd15" ? "" : (" (config " + run.config + ": the target is SD 1.5's, an indication only)").c_str());
}

/// Measures one row: `method` attached to `unet` (frozen weights on the device in the precision's
/// dtype) for `batch` random samples (with random condition images where the method reads them).
bench::Row measure(sd::UNet& unet, const std::string& method, const std::string& precision,
                   int64_t batch, const bench::Run& run) {
  torch::manual_seed(0);
  Attached attached(unet, method, run);
  // The peak from here: making a ControlNet copies the encoder in the UNet's dtype before
  // converting it to float32, a transient of the set-up that no training step holds.
  bench::PeakMeter{run.device}.reset();
  auto inputs = bench::random_batch(run, batch, precision, attached.conditions());
  auto row = bench::time_steps(attached.trainable(), inputs, precision, run);
  row.method = method;
  row.trainable = attached.trainable_count();
  row.trainable_percent = 100.0 * row.trainable / (attached.model_count() + run.pipeline_params);
  return row;
}

/// The row of (`method`, `precision`, `batch`), or null where it was not measured.
const bench::Row* find_row(const std::vector<bench::Row>& rows, const std::string& method,
                           const std::string& precision, int64_t batch) {
  for (const auto& r : rows) {
    if (r.method == method && r.precision == precision && r.batch_size == batch) return &r;
  }
  return nullptr;
}

/// Prints the memory and speed targets for each CSC method measured beside ControlNet, and how
/// close the CSC step comes to the SC step of the same run, with the measured values. Time targets
/// are judged on CUDA only; on the CPU the reduced model's memory ratios are an indication.
void print_targets(const std::vector<bench::Row>& rows, const std::vector<int64_t>& batches,
                   const bench::Run& run) {
  const bool gpu = run.device.is_cuda();
  std::printf("\ntargets%s%s:\n", run.config == "sd15" ? "" : " (SD 1.5's, an indication only at this config)",
              gpu ? "" : " (on the CPU: time targets are judged on the GPU only)");
  const int64_t speed_batch = std::count(batches.begin(), batches.end(), kSpeedTargetBatch) > 0
                                  ? kSpeedTargetBatch : *std::max_element(batches.begin(), batches.end());
  for (const auto& precision : run.precision_list) {
    for (const std::string csc : {"csc-k1", "csc-k3"}) {
      std::string ratios;
      double worst = 0;
      for (int64_t batch : batches) {
        const auto* c = find_row(rows, csc, precision, batch);
        const auto* n = find_row(rows, "controlnet", precision, batch);
        if (c == nullptr || n == nullptr) continue;
        const double ratio = static_cast<double>(c->peak_bytes) / n->peak_bytes;
        worst = std::max(worst, ratio);
        char part[64];
        std::snprintf(part, sizeof(part), "%s%.2f (bs %lld)", ratios.empty() ? "" : ", ", ratio,
                      static_cast<long long>(batch));
        ratios += part;
      }
      if (ratios.empty()) continue;
      std::printf("- %s, %s: peak ≤ %.2f× controlnet's at every batch size: %s — %s\n", csc.c_str(),
                  precision.c_str(), kMemoryRatioTarget, ratios.c_str(),
                  worst <= kMemoryRatioTarget ? "met" : "NOT met");
      const auto* c = find_row(rows, csc, precision, speed_batch);
      const auto* n = find_row(rows, "controlnet", precision, speed_batch);
      if (c != nullptr && n != nullptr) {
        const double ratio = c->images_per_s / n->images_per_s;
        const char* verdict = !gpu ? "GPU only"
                              : speed_batch != kSpeedTargetBatch ? "not judged: batch 30 was not run"
                              : ratio >= kSpeedRatioTarget ? "met" : "NOT met";
        std::printf("- %s, %s: images/s ≥ %.1f× controlnet's at batch 30: %.2f× (bs %lld) — %s\n",
                    csc.c_str(), precision.c_str(), kSpeedRatioTarget, ratio,
                    static_cast<long long>(speed_batch), verdict);
      }
      const auto* sc = find_row(rows, "scedit", precision, speed_batch);
      if (c != nullptr && sc != nullptr) {
        std::printf("- %s, %s: step %.1f ms against the SC step's %.1f ms (scedit, bs %lld, these "
                    "levers): %.2f×%s\n", csc.c_str(), precision.c_str(), c->step_ms, sc->step_ms,
                    static_cast<long long>(speed_batch), c->step_ms / sc->step_ms, gpu ? "" : " (GPU only)");
      }
    }
  }
}

}  // namespace

int main(int argc, char** argv) {
  std::string batches = "auto", methods = "controlnet,csc-k1,csc-k3,scedit";
  bool params_only = false;
  bench::Run run;
  CLI::App app{"memory_vs_controlnet: trainable parameters, peak memory and speed of one SD 1.5 "
               "(SD 2.1, SDXL) training step with condition images, CSC-Tuner (kernel 1 and 3) vs ControlNet, "
               "and the SC-Tuners' step beside them"};
  app.option_defaults()->always_capture_default();
  app.add_option("--batch-sizes", batches, "Comma-separated batch sizes (auto: 1,8,30 for sd15, 1,4,8 for sd21 and sdxl, 1,2 for the reduced ones)");
  app.add_option("--methods", methods, "Comma-separated: controlnet, csc-k1, csc-k3, scedit (a row's ratios to ControlNet need controlnet before it)");
  app.add_flag("--params-only", params_only, "Print the trainable parameters of every method and the parameter target, and measure no step");
  bench::add_run_flags(app, run);
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  }
  return common::run_program("memory_vs_controlnet", [&] {
    bench::resolve(run);
    const auto method_list = common::split_list(methods);
    for (const auto& m : method_list) {
      TORCH_CHECK(std::count(all_methods().begin(), all_methods().end(), m) > 0, "--methods: '", m,
                  "' is not controlnet, csc-k1, csc-k3 or scedit");
    }
    if (batches == "auto") {
      batches = run.config == "sd15" ? "1,8,30" : run.config == "sd21" || run.config == "sdxl" ? "1,4,8" : "1,2";
    }
    const auto batch_sizes = bench::parse_ints(batches, "--batch-sizes");
    bench::FrozenEncoders encoders(run);

    std::vector<bench::Row> rows;
    for (size_t p = 0; p < run.precision_list.size(); ++p) {
      const auto& precision = run.precision_list[p];
      encoders.to(run, precision);
      auto unet = bench::make_unet(run, precision);
      if (p == 0) {  // the counts are the same at every precision
        print_params(count_methods(unet, run), unet, run);
        if (params_only) return 0;
        std::printf("%s\n", bench::settings_line(run).c_str());
        std::printf("| method | precision | bs | trainable (M, %% of pipeline) | peak MiB | step ms | images/s | ÷ ControlNet memory | ÷ ControlNet images/s |\n");
        std::printf("|---|---|---|---|---|---|---|---|---|\n");
        std::fflush(stdout);
      }
      for (int64_t batch : batch_sizes) {
        for (const auto& method : method_list) {
          auto row = measure(unet, method, precision, batch, run);
          rows.push_back(row);
          char memory[32] = "", speed[32] = "";
          const auto* controlnet = find_row(rows, "controlnet", precision, batch);
          if (controlnet != nullptr && method != "controlnet") {
            std::snprintf(memory, sizeof(memory), "%.2f", static_cast<double>(row.peak_bytes) / controlnet->peak_bytes);
            std::snprintf(speed, sizeof(speed), "%.2f", row.images_per_s / controlnet->images_per_s);
          }
          std::printf("| %s | %s | %lld | %.3f (%.2f%%) | %.0f | %.1f | %.1f | %s | %s |\n",
                      method.c_str(), precision.c_str(), static_cast<long long>(batch),
                      row.trainable / 1e6, row.trainable_percent, row.peak_bytes / 1048576.0,
                      row.step_ms, row.images_per_s, memory, speed);
          std::fflush(stdout);
        }
      }
    }
    print_targets(rows, batch_sizes, run);
    bench::finish(rows, run);
    return 0;
  });
}
