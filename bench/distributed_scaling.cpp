// distributed_scaling: what training on several processes costs and gains — images/s of the
// training step (common::TrainStep, what train_style runs) on 1 and N processes (c10d: Gloo on the
// CPU, NCCL on CUDA), the time the gradient all-reduce adds after the backward pass, and the share
// of it that overlapping with the backward pass hides.
//
// Each world of N > 1 processes is started by the built-in launcher (examples/common/launcher.hpp)
// as copies of this program; every rank trains the same UNet with its own random batch. For each
// world the step is timed twice: with the all-reduces started after the backward pass (`after`)
// and while it runs (`overlap`, what the programs do). Columns: `all-reduce alone`, the buckets
// all-reduced right after a barrier (the communication itself); `after backward`, the median time
// the step spends in the reduction's finish once its backward pass is done (the all-reduces left,
// and waiting for a slower rank); `hidden by overlap`, 1 − overlap's after-backward time ÷ after's.
// Configurations and shared flags: step_bench.hpp.

#include "step_bench.hpp"

#include <common/cpu_threads.hpp>
#include <common/distributed.hpp>
#include <common/gradient_reducer.hpp>
#include <common/launcher.hpp>
#include <common/program.hpp>
#include <common/tuners.hpp>

#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>
#include <torch/torch.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <string>
#include <vector>

namespace {

/// What the bench adds to the shared flags.
struct Options {
  std::string processes = "1,2";  ///< the world sizes measured
  int64_t batch = 2;              ///< per process
  std::string method = "scedit";  ///< scedit | lora
  double bucket_mb = 25;          ///< as --bucket-mb of the programs
  int64_t threads = 0;            ///< intra-op threads per process (0: common::use_cpu_cores)
};

/// One measured row: a world, with or without overlap.
struct ScalingRow {
  int64_t processes = 1;
  std::string reduction;  // none | after | overlap
  double step_ms = 0;     // median
  double images_per_s = 0;
  double finish_ms = 0;   // median time in the reduction's finish per step
  double alone_ms = 0;    // median time of the same reduction alone, the ranks in step
  int64_t buckets = 0;    // per step
  double started_in_backward = 0;  // share of the buckets
};

double median(std::vector<double> values) {
  std::sort(values.begin(), values.end());
  return values[values.size() / 2];
}

/// Times `run.warmup` + `run.steps` steps of `method` on this rank; with `overlap` set (and a
/// world of several processes) the gradients go through a GradientReducer.
ScalingRow measure(sd::UNet& unet, common::Distributed& dist, const Options& options, const std::string& reduction,
                   const bench::Run& run) {
  const auto& precision = run.precision_list.front();
  torch::manual_seed(100 + dist.rank());  // every rank its own batch
  const auto batch = bench::random_batch(run, options.batch, precision);
  torch::manual_seed(0);  // the same tuners everywhere
  common::MethodOptions method;
  method.method = options.method;
  auto tuners = common::attach_tuners(unet, method, run.device);
  unet->train();
  const auto trainable = common::tuner_trainable(unet, tuners, method);
  common::TrainStep step(trainable.denoiser, trainable.tensors(), sd::NoiseSchedule(), run.optim,
                         bench::parse_precision(precision), run.device);
  std::shared_ptr<common::GradientReducer> reducer;
  if (reduction != "none") {
    common::ReducerOptions reducer_options;
    reducer_options.bucket_bytes = static_cast<int64_t>(options.bucket_mb * (1 << 20));
    reducer_options.overlap = reduction == "overlap";
    reducer = std::make_shared<common::GradientReducer>(dist, trainable.tensors(), reducer_options);
    step.set_gradient_reduction(reducer);
  }
  std::vector<double> times, finish_ms;
  common::ReducerStats before;
  for (int64_t i = 0; i < run.warmup + run.steps; ++i) {
    if (reducer) before = reducer->stats();
    dist.barrier();  // the ranks start each step together
    bench::synchronize(run.device);
    const auto began = std::chrono::steady_clock::now();
    auto generator = common::step_generator(dist.rank(), i);
    step.forward_backward(batch, generator);
    step.optimizer_step(1e-4);
    bench::synchronize(run.device);
    const double ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - began).count();
    if (i < run.warmup) continue;
    times.push_back(ms);
    if (reducer) finish_ms.push_back(1000.0 * (reducer->stats().finish_seconds - before.finish_seconds));
  }
  ScalingRow row;
  row.processes = dist.world_size();
  row.reduction = reduction;
  row.step_ms = median(times);
  row.images_per_s = options.batch * dist.world_size() * 1000.0 / row.step_ms;
  if (reducer) {
    const auto& after = reducer->stats();
    row.finish_ms = median(finish_ms);
    row.buckets = (after.buckets - before.buckets);
    row.started_in_backward = static_cast<double>(after.started_in_backward - before.started_in_backward) /
                              static_cast<double>(after.buckets - before.buckets);
    // The reduction alone: the same buckets (zeros) all-reduced right after a barrier, with no
    // backward pass to hide behind and no rank to wait for.
    std::vector<double> alone;
    for (int64_t i = 0; i < run.steps; ++i) {
      dist.barrier();
      const auto began = std::chrono::steady_clock::now();
      reducer->begin_backward(true);
      reducer->finish();
      bench::synchronize(run.device);
      alone.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - began).count());
    }
    row.alone_ms = median(alone);
  }
  reducer.reset();
  if (tuners.lora) tuners.lora->unload();
  if (!tuners.sc.empty()) scedit::detach_tuners(*unet, "sc");
  return row;
}

/// One world's rows, measured on every rank and returned on rank 0 (empty elsewhere).
std::vector<ScalingRow> measure_world(const Options& options, bench::Run& run) {
  common::Distributed dist(common::DistributedFlags{}, run.device);
  if (options.threads > 0) {
    torch::set_num_threads(static_cast<int>(options.threads));
  } else {
    common::use_cpu_cores();  // the cores shared among this world's processes (LOCAL_WORLD_SIZE)
  }
  auto unet = bench::make_unet(run, run.precision_list.front());
  std::vector<ScalingRow> rows;
  for (const auto& reduction : dist.active() ? std::vector<std::string>{"after", "overlap"}
                                                   : std::vector<std::string>{"none"}) {
    rows.push_back(measure(unet, dist, options, reduction, run));
  }
  return dist.is_main() ? rows : std::vector<ScalingRow>{};
}

void print(const std::vector<ScalingRow>& world, const Options& options) {
  const double after_ms = world.front().reduction == "after" ? world.front().finish_ms : 0;
  for (const auto& r : world) {
    char reduce[64] = "–", alone[32] = "–", hidden[32] = "–", early[32] = "–";
    if (r.reduction != "none") {
      std::snprintf(alone, sizeof(alone), "%.1f (%lld buckets)", r.alone_ms, static_cast<long long>(r.buckets));
      std::snprintf(reduce, sizeof(reduce), "%.1f", r.finish_ms);
      std::snprintf(early, sizeof(early), "%.0f%%", 100.0 * r.started_in_backward);
    }
    if (r.reduction == "overlap" && after_ms > 0) std::snprintf(hidden, sizeof(hidden), "%.0f%%", 100.0 * (1 - r.finish_ms / after_ms));
    std::printf("| %lld | %s | %lld | %lld | %.1f | %.2f | %s | %s | %s | %s |\n", static_cast<long long>(r.processes),
                r.reduction.c_str(), static_cast<long long>(options.batch),
                static_cast<long long>(options.batch * r.processes), r.step_ms, r.images_per_s, alone, reduce,
                early, hidden);
  }
  std::fflush(stdout);
}

nlohmann::json to_json(const ScalingRow& r, const Options& options, const bench::Run& run) {
  return {{"processes", r.processes}, {"reduction", r.reduction}, {"batch_per_process", options.batch},
          {"step_ms", r.step_ms}, {"images_per_s", r.images_per_s}, {"finish_ms", r.finish_ms}, {"alone_ms", r.alone_ms},
          {"buckets", r.buckets}, {"started_in_backward", r.started_in_backward},
          {"method", options.method}, {"precision", run.precision_list.front()}, {"config", run.config},
          {"device", run.device_name}, {"bucket_mb", options.bucket_mb}};
}

// Leaves no trace of a launched world for the next one (launch_local starts only where RANK is unset).
void forget_world() {
  for (const char* name : {"RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"}) {
    ::unsetenv(name);
  }
}

}  // namespace

int main(int argc, char** argv) {
  Options options;
  bench::Run run;
  run.precisions = "fp32";
  CLI::App app{"distributed_scaling: images/s of the training step on 1 and N processes (Gloo on the CPU, "
               "NCCL on CUDA), the all-reduce time after the backward pass, and the share overlap hides"};
  app.option_defaults()->always_capture_default();
  app.add_option("--processes", options.processes, "Comma-separated world sizes, each started by the built-in launcher");
  app.add_option("--batch-size", options.batch, "Batch per process (the global batch grows with the processes)")->check(CLI::PositiveNumber);
  app.add_option("--method", options.method, "scedit | lora")->check(CLI::IsMember({"scedit", "lora"}));
  app.add_option("--bucket-mb", options.bucket_mb, "MiB of gradients per all-reduce bucket (the first holds 1 MiB)")->check(CLI::PositiveNumber);
  app.add_option("--threads", options.threads, "Intra-op threads per process (0: the physical cores / processes, or OMP_NUM_THREADS)")->check(CLI::NonNegativeNumber);
  bench::add_run_flags(app, run);
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  }
  return common::run_program("distributed_scaling", [&] {
    bench::resolve(run);
    TORCH_CHECK(run.precision_list.size() == 1, "--precisions: one precision per run, got '", run.precisions, "'");
    TORCH_CHECK(run.cuda_graph != "on", "--cuda-graph on: a captured step cannot hold a multi-process all-reduce here");
    run.graphed = false;
    if (std::getenv("RANK") != nullptr) {  // a copy started by the launcher: one world's rank
      measure_world(options, run);
      return 0;
    }
    const auto worlds = bench::parse_ints(options.processes, "--processes");
    std::printf("%s", bench::settings_line(run).c_str());
    std::printf("method %s, %s, buckets of %.3g MiB (the first at most 1 MiB), %lld physical cores\n\n",
                options.method.c_str(), run.precision_list.front().c_str(), options.bucket_mb,
                static_cast<long long>(common::cpu_cores_available()));
    std::printf("| processes | all-reduce | batch / process | global batch | step ms | images/s | all-reduce alone ms | after backward ms | buckets started in backward | hidden by overlap |\n");
    std::printf("|---|---|---|---|---|---|---|---|---|---|\n");
    std::fflush(stdout);
    nlohmann::json rows = nlohmann::json::array();
    for (const auto world : worlds) {
      std::vector<ScalingRow> measured;
      const int status = common::launch_local(world, argv, [&] {
        measured = measure_world(options, run);
        return 0;
      });
      forget_world();
      TORCH_CHECK(status == 0, "the world of ", world, " processes failed");
      print(measured, options);
      for (const auto& r : measured) rows.push_back(to_json(r, options, run));
    }
    if (!run.json_path.empty()) {
      scedit::write_text_file(run.json_path, rows.dump(2) + "\n");
      std::printf("\nrows: %s\n", run.json_path.c_str());
    }
    return 0;
  });
}
