#pragma once
/// @file validation.hpp
/// @brief What a training run shows of its model as it goes: sample grids, generated with fixed
/// seeds so that grids of different steps compare, condition grids (each condition beside what
/// was made from it), and for controllable generation a number that proves the model uses its
/// conditions (`ConditionProbe`).

#include <common/batches.hpp>
#include <common/dataset.hpp>
#include <common/files.hpp>
#include <common/image.hpp>
#include <common/png.hpp>
#include <common/sample_order.hpp>
#include <common/train_step.hpp>

#include <sd/sampler.hpp>

#include <nlohmann/json.hpp>
#include <torch/torch.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <functional>
#include <string>
#include <utility>
#include <vector>

namespace common {

/// Writes `images` (uint8 [H, W, 3], equal sizes) as one grid of `columns` per row to `path`,
/// creating its folder, and says where.
inline void write_grid(const std::vector<torch::Tensor>& images, int64_t columns,
                       const std::filesystem::path& path) {
  if (path.has_parent_path()) std::filesystem::create_directories(path.parent_path());
  write_png(path.string(), make_grid(images, std::min<int64_t>(columns, static_cast<int64_t>(images.size()))));
  std::printf("samples: %s\n", path.string().c_str());
}

/// Generates one image per prompt with `options` and writes them as one grid (up to four per
/// row) to `path`.
inline void write_sample_grid(sd::StableDiffusion& pipe, const std::vector<std::string>& prompts,
                              const sd::GenerateOptions& options, const std::filesystem::path& path) {
  torch::NoGradGuard no_grad;
  write_grid(sd::generate(pipe, prompts, options), 4, path);
}

/// Writes, for each (condition, prompt) pair, the condition beside the image `generate_one` made
/// from it: one row per pair, to `path`.
inline void write_condition_grid(
    const std::vector<std::pair<torch::Tensor, std::string>>& pairs,
    const std::function<torch::Tensor(const torch::Tensor& condition, const std::string& prompt)>& generate_one,
    const std::filesystem::path& path) {
  torch::NoGradGuard no_grad;
  std::vector<torch::Tensor> cells;
  for (const auto& [condition, prompt] : pairs) {
    cells.push_back(condition);
    cells.push_back(generate_one(condition, prompt));
  }
  write_grid(cells, 2, path);
}

/// Whether a model uses its conditions. On a fixed held-out batch — every held-out sample at
/// `timesteps_per_sample` fixed timesteps spread over [0, T), with fixed noise — it measures the
/// training loss with each sample's own conditions (`loss_matched`) and with the conditions
/// shifted by one sample (`loss_shuffled`). A model that has learnt from its conditions does
/// clearly better on the first; one that ignores them does the same on both.
class ConditionProbe {
 public:
  /// One measurement.
  struct Result {
    double matched = 0;   ///< loss with each sample's own conditions
    double shuffled = 0;  ///< loss with another sample's conditions
  };

  /// Encodes `held_out` (at least two samples, each with its conditions) once through `pipe`'s
  /// frozen encoders; the noise and the timesteps are drawn from `seed`.
  ConditionProbe(sd::StableDiffusion& pipe, const ImageSource& held_out, DenoisingLoss loss,
                 torch::Device device, uint64_t seed, int64_t timesteps_per_sample = 4)
      : loss_(std::move(loss)) {
    TORCH_CHECK(held_out.size() >= 2, "ConditionProbe: needs at least two held-out samples to "
                "shuffle their conditions, got ", held_out.size());
    TORCH_CHECK(timesteps_per_sample > 0, "ConditionProbe: timesteps_per_sample must be positive");
    torch::NoGradGuard no_grad;
    BatchSource source(pipe, held_out, BatchOptions(), device);
    std::vector<int64_t> indices;
    for (int64_t i = 0; i < held_out.size(); ++i) indices.insert(indices.end(), timesteps_per_sample, i);
    auto generator = step_generator(seed, 0, /*stream=*/2);
    batch_ = source.get(indices, generator);
    TORCH_CHECK(!batch_.conditions.empty(), "ConditionProbe: the held-out samples carry no conditions");
    const auto rows = static_cast<int64_t>(indices.size());
    noise_ = torch::randn(batch_.latents.sizes(), generator, torch::kFloat32).to(device);
    const int64_t steps = loss_.schedule.num_train_timesteps();
    std::vector<int64_t> t(static_cast<size_t>(rows));
    for (int64_t r = 0; r < rows; ++r) {  // the middles of equal parts of [0, T)
      t[static_cast<size_t>(r)] = ((r % timesteps_per_sample) * steps + steps / 2) / timesteps_per_sample;
    }
    t_ = torch::tensor(t, torch::kLong).to(device);
    shuffled_ = batch_;
    for (auto& c : shuffled_.conditions) c = c.roll(timesteps_per_sample, 0);  // the next sample's
  }

  /// The two losses of the model that `denoiser` runs.
  Result measure(const Denoiser& denoiser) const {
    torch::NoGradGuard no_grad;
    return {loss_(denoiser, batch_, noise_, t_).item<double>(),
            loss_(denoiser, shuffled_, noise_, t_).item<double>()};
  }

  /// Continues the JSON list at `path` that a resumed run wrote before: its entries up to `step`
  /// are kept and `record` appends to them. A missing or unreadable file starts afresh (saying
  /// why: it is a log, the run goes on without it).
  void continue_history(const std::filesystem::path& path, int64_t step) {
    history_ = nlohmann::json::array();
    if (!std::filesystem::exists(path)) return;
    try {
      for (const auto& entry : nlohmann::json::parse(read_file_bytes(path))) {
        if (entry.at("step").get<int64_t>() <= step) history_.push_back(entry);
      }
    } catch (const std::exception& e) {
      std::printf("%s: not continued: %s\n", path.string().c_str(), e.what());
      history_ = nlohmann::json::array();
    }
  }

  /// Adds `result` at `step` to the JSON list at `path` (`[{"step", "loss_matched",
  /// "loss_shuffled"}, ...]`), rewriting the file atomically, and prints it.
  void record(int64_t step, const Result& result, const std::filesystem::path& path) {
    history_.push_back({{"step", step}, {"loss_matched", result.matched}, {"loss_shuffled", result.shuffled}});
    write_file_atomic(path, history_.dump(2) + "\n");
    std::printf("validation: step %lld, loss with own conditions %.4f, with shuffled ones %.4f (%s)\n",
                static_cast<long long>(step), result.matched, result.shuffled, path.string().c_str());
  }

 private:
  DenoisingLoss loss_;
  TrainBatch batch_, shuffled_;
  torch::Tensor noise_, t_;
  nlohmann::json history_ = nlohmann::json::array();
};

}  // namespace common
