#pragma once
/// @file checkpoint.hpp
/// @brief Training checkpoints: complete and intact, or refused.
///
/// A checkpoint is a folder `step-00000100/` holding `tuners.safetensors` (every trainable tensor
/// by its parameter name), `optimizer.pt` (AdamW state), and `state.json` (step, seed, loss scale,
/// the run's settings, and the size and CRC-32 of the other two files — the run's randomness is a
/// pure function of seed and step, so these are its RNG state). Every file is written through the
/// atomic writer (fsynced) into a temporary sibling folder, which is renamed into place only once
/// complete: a crash or a full disk mid-save leaves at most a `*.tmp-*` folder that `latest` never
/// picks and the next run removes (`remove_stale_temporaries`); earlier checkpoints stay
/// untouched. Reading one checks every file against `state.json`, so that flipped bytes are
/// refused naming the file rather than resumed from.

#include <common/files.hpp>

#include <scedit/atomic_file.hpp>
#include <scedit/safetensors.hpp>
#include <scedit/state_dict.hpp>

#include <nlohmann/json.hpp>
#include <torch/torch.h>

#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <optional>
#include <regex>
#include <sstream>
#include <string>
#include <system_error>
#include <vector>

namespace common {

/// What a checkpoint records besides the weights and the optimizer.
struct TrainState {
  int64_t step = 0;          ///< optimizer steps done
  uint64_t seed = 0;         ///< the run's seed (with `step`, the state of every random draw)
  double loss_scale = 1.0;   ///< fp16 dynamic loss scale
  nlohmann::json run;        ///< the run's settings (method, precision, ...), checked on resume
};

/// How a run splits its global batch: processes × per-process batch × accumulation steps.
/// Checkpoints record it under the settings' `layout`; a resume may change it as long as the
/// global batch stays the same (SampleOrder gives every layout the same samples per step).
struct BatchLayout {
  int64_t processes = 1;   ///< ranks of the run
  int64_t batch_size = 1;  ///< --batch-size, per process
  int64_t grad_accum = 1;  ///< --grad-accum

  /// The global batch: images per optimizer step.
  int64_t images() const { return processes * batch_size * grad_accum; }
  /// "4 (2 processes × batch 2 × accumulation 1)".
  std::string describe() const {
    std::ostringstream out;
    out << images() << " (" << processes << (processes == 1 ? " process" : " processes") << " × batch "
        << batch_size << " × accumulation " << grad_accum << ")";
    return out.str();
  }
  bool operator==(const BatchLayout& other) const {
    return processes == other.processes && batch_size == other.batch_size && grad_accum == other.grad_accum;
  }
  /// `settings` with this layout under `layout`.
  nlohmann::json put_into(nlohmann::json settings) const {
    settings["layout"] = {{"processes", processes}, {"batch_size", batch_size}, {"grad_accum", grad_accum}};
    return settings;
  }
  /// The layout that a checkpoint's `settings` record, removed from them (with the global batch
  /// it implies left in). Checkpoints of earlier versions name batch_size and grad_accum at the
  /// top level: one process.
  static BatchLayout take_from(nlohmann::json& settings) {
    BatchLayout layout;
    if (!settings.is_object()) return layout;
    const auto& from = settings.contains("layout") ? settings["layout"] : settings;
    layout.processes = from.value("processes", int64_t{1});
    layout.batch_size = from.value("batch_size", int64_t{1});
    layout.grad_accum = from.value("grad_accum", int64_t{1});
    for (const char* key : {"layout", "batch_size", "grad_accum"}) settings.erase(key);
    settings["global_batch"] = layout.images();
    return layout;
  }
};

/// A checkpoint whose files were checked against its `state.json`.
struct VerifiedCheckpoint {
  std::filesystem::path folder;  ///< the checkpoint's folder
  TrainState state;              ///< what its state.json says
};

/// The folder name of the checkpoint after `step` optimizer steps.
inline std::string checkpoint_name(int64_t step) {
  char name[32];
  std::snprintf(name, sizeof(name), "step-%08lld", static_cast<long long>(step));
  return name;
}

namespace detail {

inline const std::regex& checkpoint_pattern() {
  static const std::regex pattern("step-([0-9]{8})");
  return pattern;
}

/// `{"bytes": n, "crc32": "1a2b3c4d"}` of a file's content, as state.json lists it.
inline nlohmann::json file_digest(const std::string& bytes) {
  char crc[9];
  std::snprintf(crc, sizeof(crc), "%08x", static_cast<unsigned>(crc32(bytes.data(), bytes.size())));
  return {{"bytes", bytes.size()}, {"crc32", crc}};
}

}  // namespace detail

/// Complete checkpoints under `root` (folders `step-NNNNNNNN` with a `state.json`), oldest first.
inline std::vector<std::filesystem::path> list_checkpoints(const std::filesystem::path& root) {
  std::vector<std::filesystem::path> found;
  if (!std::filesystem::is_directory(root)) return found;
  for (const auto& entry : std::filesystem::directory_iterator(root)) {
    const auto name = entry.path().filename().string();
    if (entry.is_directory() && std::regex_match(name, detail::checkpoint_pattern()) &&
        std::filesystem::exists(entry.path() / "state.json")) {
      found.push_back(entry.path());
    }
  }
  std::sort(found.begin(), found.end());
  return found;
}

/// The step in a checkpoint folder's name (`step-00000100` → 100), or none for another name.
inline std::optional<int64_t> checkpoint_step(const std::filesystem::path& folder) {
  std::smatch match;
  const auto name = folder.filename().string();
  if (!std::regex_match(name, match, detail::checkpoint_pattern())) return std::nullopt;
  return std::stoll(match[1].str());
}

/// Removes what an interrupted save left under `root`: `step-*.tmp-*` folders, `step-*.old`
/// folders whose checkpoint is back in place, and the atomic writer's `.*.tmp.*` files. Call it
/// only while holding the output folder (`OutputLock`). Returns how many were removed.
inline int64_t remove_stale_temporaries(const std::filesystem::path& root) {
  namespace fs = std::filesystem;
  int64_t removed = 0;
  if (!fs::is_directory(root)) return removed;
  static const std::regex stale_folder("step-[0-9]{8}\\.tmp-[0-9]+");
  static const std::regex old_folder("(step-[0-9]{8})\\.old");
  static const std::regex stale_file("\\..+\\.tmp\\.[A-Za-z0-9]{6}");
  std::vector<fs::path> doomed;
  for (const auto& entry : fs::directory_iterator(root)) {
    const auto name = entry.path().filename().string();
    std::smatch old;
    if ((entry.is_directory() && std::regex_match(name, stale_folder)) ||
        (entry.is_regular_file() && std::regex_match(name, stale_file)) ||
        (entry.is_directory() && std::regex_match(name, old, old_folder) &&
         fs::exists(root / old[1].str() / "state.json"))) {
      doomed.push_back(entry.path());
    }
  }
  for (const auto& path : doomed) removed += fs::remove_all(path) > 0;
  return removed;
}

/// Writes a checkpoint of `tensors` (name → trainable tensor), `optimizer` and `state` under
/// `root` (see the file comment), then keeps only the newest `keep_last` (0 = keep all) of those
/// up to its step. Returns its folder. On failure (a full disk, say) it throws one line naming
/// the file, having removed its temporary folder; earlier checkpoints are untouched.
inline std::filesystem::path save_checkpoint(const std::filesystem::path& root,
                                             const scedit::TensorMap& tensors,
                                             torch::optim::Optimizer& optimizer,
                                             const TrainState& state, int64_t keep_last) {
  namespace fs = std::filesystem;
  fs::create_directories(root);
  const auto name = checkpoint_name(state.step);
  const fs::path final_dir = root / name;
  const fs::path temp_dir = root / (name + ".tmp-" + std::to_string(::getpid()));
  const fs::path old_dir = root / (name + ".old");
  fs::remove_all(temp_dir);
  try {
    fs::create_directories(temp_dir);
    nlohmann::json files;
    const auto tuners = temp_dir / "tuners.safetensors";
    scedit::safetensors::save(tuners.string(), tensors);
    files["tuners.safetensors"] = detail::file_digest(read_file_bytes(tuners));
    // Serialised in memory, then written by the atomic writer: LibTorch's own file writer throws
    // from a destructor when the disk fills, which aborts the process.
    std::ostringstream optimizer_bytes;
    torch::save(optimizer, optimizer_bytes);
    write_file_atomic(temp_dir / "optimizer.pt", optimizer_bytes.str());
    files["optimizer.pt"] = detail::file_digest(optimizer_bytes.str());
    const nlohmann::json json = {{"step", state.step}, {"seed", state.seed}, {"loss_scale", state.loss_scale},
                                 {"run", state.run}, {"files", files}};
    write_file_atomic(temp_dir / "state.json", json.dump(2) + "\n");
    // Replacing an existing checkpoint of the same step: move the old one aside first.
    if (fs::exists(final_dir)) fs::rename(final_dir, old_dir);
    fs::rename(temp_dir, final_dir);
    scedit::sync_folder(root.string());
    fs::remove_all(old_dir);
  } catch (const std::exception& e) {
    std::error_code ignored;
    fs::remove_all(temp_dir, ignored);
    if (!fs::exists(final_dir, ignored) && fs::exists(old_dir, ignored)) fs::rename(old_dir, final_dir, ignored);
    const auto* c10_error = dynamic_cast<const c10::Error*>(&e);
    TORCH_CHECK(false, "checkpoint at step ", state.step, " not saved (the earlier ones are intact): ",
                c10_error ? c10_error->what_without_backtrace() : e.what());
  }
  if (keep_last > 0) {
    std::vector<fs::path> older;  // only those up to this step: later ones are not this run's
    for (const auto& folder : list_checkpoints(root)) {
      if (checkpoint_step(folder).value_or(0) <= state.step) older.push_back(folder);
    }
    for (size_t i = 0; i + static_cast<size_t>(keep_last) < older.size(); ++i) fs::remove_all(older[i]);
  }
  return final_dir;
}

/// Checks checkpoint `folder`: `state.json` readable and plausible (its step the folder name's,
/// a positive loss scale), and every file it lists of the recorded size and CRC-32. Throws naming
/// the file at fault. Checkpoints of earlier versions list no files: only their state is checked.
inline VerifiedCheckpoint verify_checkpoint(const std::filesystem::path& folder) {
  namespace fs = std::filesystem;
  const auto state_path = folder / "state.json";
  TORCH_CHECK(fs::is_directory(folder), "checkpoint '", folder.string(), "' is not a folder");
  TORCH_CHECK(fs::exists(state_path), "checkpoint '", folder.string(), "' is incomplete: no state.json");
  VerifiedCheckpoint checkpoint{folder, {}};
  auto& state = checkpoint.state;
  nlohmann::json files;
  try {
    const auto json = nlohmann::json::parse(read_file_bytes(state_path));
    state.step = json.at("step").get<int64_t>();
    state.seed = json.at("seed").get<uint64_t>();
    state.loss_scale = json.at("loss_scale").get<double>();
    state.run = json.at("run");
    if (json.contains("files")) files = json.at("files");
  } catch (const nlohmann::json::exception& e) {
    TORCH_CHECK(false, "checkpoint '", state_path.string(), "' is unreadable: ", e.what());
  }
  const auto named = checkpoint_step(folder);
  TORCH_CHECK(state.step >= 0 && (!named || *named == state.step), "checkpoint '", state_path.string(),
              "' says step ", state.step, named ? ", its folder's name step " + std::to_string(*named) : "");
  TORCH_CHECK(std::isfinite(state.loss_scale) && state.loss_scale > 0, "checkpoint '", state_path.string(),
              "' has a loss scale of ", state.loss_scale);
  for (const char* name : {"tuners.safetensors", "optimizer.pt"}) {
    const auto path = folder / name;
    TORCH_CHECK(fs::exists(path), "checkpoint '", folder.string(), "' is incomplete: no ", name);
    if (files.is_null()) continue;
    TORCH_CHECK(files.contains(name), "checkpoint '", state_path.string(), "' lists no checksum of ", name);
    const auto expected = files.at(name);
    const auto actual = detail::file_digest(read_file_bytes(path));
    TORCH_CHECK(actual.at("bytes") == expected.at("bytes"), "checkpoint file '", path.string(),
                "' is damaged: it holds ", actual.at("bytes"), " bytes, state.json recorded ", expected.at("bytes"));
    TORCH_CHECK(actual.at("crc32") == expected.at("crc32"), "checkpoint file '", path.string(),
                "' is damaged: its CRC-32 is ", actual.at("crc32").get<std::string>(), ", state.json recorded ",
                expected.at("crc32").get<std::string>());
  }
  return checkpoint;
}

/// The checkpoint `spec` names, checked (`verify_checkpoint`): a folder, or `latest`, the newest
/// intact one under `root` — a damaged newer one is passed over, saying so.
inline VerifiedCheckpoint resolve_checkpoint(const std::filesystem::path& root, const std::string& spec) {
  if (spec != "latest") {
    TORCH_CHECK(std::filesystem::is_directory(spec), "--resume: '", spec,
                "' is not a checkpoint folder (nor 'latest')");
    return verify_checkpoint(spec);
  }
  const auto all = list_checkpoints(root);
  TORCH_CHECK(!all.empty(), "--resume latest: no complete checkpoint under '", root.string(), "'");
  for (auto it = all.rbegin(); it != all.rend(); ++it) {
    try {
      return verify_checkpoint(*it);
    } catch (const c10::Error& e) {
      std::printf("--resume latest: passing over %s: %s\n", it->string().c_str(), e.what_without_backtrace());
    }
  }
  TORCH_CHECK(false, "--resume latest: none of the ", all.size(), " checkpoints under '", root.string(),
              "' is intact (see above)");
}

/// Loads `checkpoint` into the trainable tensors (`tensors`: name → parameter, strict: names and
/// shapes must match) and `optimizer`, and returns its state. Anything missing, non-finite or
/// inconsistent is refused naming the file; the tensors change only once both files have loaded.
inline TrainState load_checkpoint(const VerifiedCheckpoint& checkpoint, const scedit::TensorMap& tensors,
                                  torch::optim::Optimizer& optimizer) {
  const auto weights = (checkpoint.folder / "tuners.safetensors").string();
  const auto saved = scedit::safetensors::load(weights);  // validated: truncation is refused
  for (const auto& [name, tensor] : tensors) {
    auto it = saved.find(name);
    TORCH_CHECK(it != saved.end(), "checkpoint '", weights, "' lacks tensor '", name, "'");
    TORCH_CHECK(it->second.sizes() == tensor.sizes(), "checkpoint '", weights, "': tensor '", name,
                "' has shape ", it->second.sizes(), ", the run has ", tensor.sizes());
  }
  scedit::check_finite(saved, "checkpoint '" + weights + "'");
  TORCH_CHECK(saved.size() == tensors.size(), "checkpoint '", weights, "' holds ", saved.size(),
              " tensors, the run trains ", tensors.size(), ": another method or model?");
  const auto optimizer_path = (checkpoint.folder / "optimizer.pt").string();
  try {
    std::istringstream bytes(read_file_bytes(optimizer_path));
    torch::load(optimizer, bytes);
  } catch (const c10::Error& e) {
    TORCH_CHECK(false, "checkpoint '", optimizer_path, "' is unreadable: ", e.what_without_backtrace());
  }
  torch::NoGradGuard no_grad;
  for (const auto& [name, tensor] : tensors) {
    auto target = tensor;
    target.copy_(saved.at(name));
  }
  return checkpoint.state;
}

}  // namespace common
