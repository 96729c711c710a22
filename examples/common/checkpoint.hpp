#pragma once
// Training checkpoints: complete or absent.
//
// A checkpoint is a folder `step-00000100/` holding `tuners.safetensors` (every trainable tensor
// by its parameter name), `optimizer.pt` (AdamW state), and `state.json` (step, seed, loss scale,
// method — the run's randomness is a pure function of seed and step, so these are its RNG state).
// It is written into a temporary sibling folder and renamed into place only once every file is
// complete: a crash mid-save leaves at most a `*.tmp-*` folder that `latest` never picks, and the
// previous checkpoints stay untouched. Old checkpoints beyond `keep_last` are then removed.

#include <scedit/safetensors.hpp>

#include <nlohmann/json.hpp>
#include <torch/torch.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <regex>
#include <string>
#include <vector>

namespace common {

/// What a checkpoint records besides the weights and the optimizer.
struct TrainState {
  int64_t step = 0;          ///< optimizer steps done
  uint64_t seed = 0;         ///< the run's seed (with `step`, the state of every random draw)
  double loss_scale = 1.0;   ///< fp16 dynamic loss scale
  nlohmann::json run;        ///< the run's settings (method, precision, ...), checked on resume
};

/// The folder name of the checkpoint after `step` optimizer steps.
inline std::string checkpoint_name(int64_t step) {
  char name[32];
  std::snprintf(name, sizeof(name), "step-%08lld", static_cast<long long>(step));
  return name;
}

/// Complete checkpoints under `root`, oldest first.
inline std::vector<std::filesystem::path> list_checkpoints(const std::filesystem::path& root) {
  std::vector<std::filesystem::path> found;
  if (!std::filesystem::is_directory(root)) return found;
  static const std::regex pattern("step-[0-9]{8}");
  for (const auto& entry : std::filesystem::directory_iterator(root)) {
    const auto name = entry.path().filename().string();
    if (entry.is_directory() && std::regex_match(name, pattern) &&
        std::filesystem::exists(entry.path() / "state.json")) {
      found.push_back(entry.path());
    }
  }
  std::sort(found.begin(), found.end());
  return found;
}

/// Writes a checkpoint of `tensors` (name → trainable tensor), `optimizer` and `state` under
/// `root`, atomically, then keeps only the newest `keep_last` (0 = keep all). Returns its folder.
inline std::filesystem::path save_checkpoint(const std::filesystem::path& root,
                                             const scedit::TensorMap& tensors,
                                             torch::optim::Optimizer& optimizer,
                                             const TrainState& state, int64_t keep_last) {
  namespace fs = std::filesystem;
  fs::create_directories(root);
  const fs::path final_dir = root / checkpoint_name(state.step);
  const fs::path temp_dir = root / (checkpoint_name(state.step) + ".tmp-" + std::to_string(::getpid()));
  fs::remove_all(temp_dir);
  fs::create_directories(temp_dir);
  try {
    scedit::safetensors::save((temp_dir / "tuners.safetensors").string(), tensors);
    torch::save(optimizer, (temp_dir / "optimizer.pt").string());
    nlohmann::json json = {{"step", state.step}, {"seed", state.seed},
                           {"loss_scale", state.loss_scale}, {"run", state.run}};
    std::ofstream out(temp_dir / "state.json");
    out << json.dump(2) << "\n";
    out.close();
    TORCH_CHECK(out.good(), "writing '", (temp_dir / "state.json").string(), "' failed");
    // Replacing an existing checkpoint of the same step: move the old one aside first.
    if (fs::exists(final_dir)) fs::rename(final_dir, root / (checkpoint_name(state.step) + ".old"));
    fs::rename(temp_dir, final_dir);
    fs::remove_all(root / (checkpoint_name(state.step) + ".old"));
  } catch (...) {
    std::error_code ignored;
    fs::remove_all(temp_dir, ignored);
    throw;
  }
  if (keep_last > 0) {
    auto all = list_checkpoints(root);
    for (size_t i = 0; i + static_cast<size_t>(keep_last) < all.size(); ++i) fs::remove_all(all[i]);
  }
  return final_dir;
}

/// The checkpoint `spec` names: `latest` (the newest complete one under `root`) or a folder.
inline std::filesystem::path resolve_checkpoint(const std::filesystem::path& root,
                                                const std::string& spec) {
  if (spec == "latest") {
    const auto all = list_checkpoints(root);
    TORCH_CHECK(!all.empty(), "--resume latest: no complete checkpoint under '", root.string(), "'");
    return all.back();
  }
  const std::filesystem::path path(spec);
  TORCH_CHECK(std::filesystem::is_directory(path), "--resume: '", spec,
              "' is not a checkpoint folder (nor 'latest')");
  return path;
}

/// Loads checkpoint `folder` into the trainable tensors (`tensors`: name → parameter, strict:
/// names and shapes must match) and `optimizer`, and returns its state. Anything missing,
/// truncated or inconsistent is refused naming the file.
inline TrainState load_checkpoint(const std::filesystem::path& folder,
                                  const scedit::TensorMap& tensors,
                                  torch::optim::Optimizer& optimizer) {
  const auto state_path = folder / "state.json";
  TORCH_CHECK(std::filesystem::exists(state_path), "checkpoint '", folder.string(),
              "' is incomplete: no state.json");
  TrainState state;
  try {
    const auto json = nlohmann::json::parse(std::ifstream(state_path));
    state.step = json.at("step").get<int64_t>();
    state.seed = json.at("seed").get<uint64_t>();
    state.loss_scale = json.at("loss_scale").get<double>();
    state.run = json.at("run");
  } catch (const nlohmann::json::exception& e) {
    TORCH_CHECK(false, "checkpoint '", state_path.string(), "' is unreadable: ", e.what());
  }
  const auto weights = (folder / "tuners.safetensors").string();
  const auto saved = scedit::safetensors::load(weights);  // validated: truncation is refused
  for (const auto& [name, tensor] : tensors) {
    auto it = saved.find(name);
    TORCH_CHECK(it != saved.end(), "checkpoint '", weights, "' lacks tensor '", name, "'");
    TORCH_CHECK(it->second.sizes() == tensor.sizes(), "checkpoint '", weights, "': tensor '", name,
                "' has shape ", it->second.sizes(), ", the run has ", tensor.sizes());
  }
  TORCH_CHECK(saved.size() == tensors.size(), "checkpoint '", weights, "' holds ", saved.size(),
              " tensors, the run trains ", tensors.size(), ": another method or model?");
  const auto optimizer_path = (folder / "optimizer.pt").string();
  try {
    torch::load(optimizer, optimizer_path);
  } catch (const c10::Error& e) {
    TORCH_CHECK(false, "checkpoint '", optimizer_path, "' is unreadable: ", e.what_without_backtrace());
  }
  torch::NoGradGuard no_grad;
  for (const auto& [name, tensor] : tensors) {
    auto target = tensor;
    target.copy_(saved.at(name));
  }
  return state;
}

}  // namespace common
