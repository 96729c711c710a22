#pragma once
/// @file validation.hpp
/// @brief What a training run shows of its model as it goes: sample grids, generated with fixed
/// seeds so that grids of different steps compare.

#include <common/image.hpp>
#include <common/png.hpp>

#include <sd/sampler.hpp>

#include <torch/torch.h>

#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <string>
#include <vector>

namespace common {

/// Generates one image per prompt with `options` and writes them as one grid (up to four per
/// row) to `path`.
inline void write_sample_grid(sd::StableDiffusion& pipe, const std::vector<std::string>& prompts,
                              const sd::GenerateOptions& options, const std::filesystem::path& path) {
  torch::NoGradGuard no_grad;
  if (path.has_parent_path()) std::filesystem::create_directories(path.parent_path());
  const auto images = sd::generate(pipe, prompts, options);
  write_png(path.string(), make_grid(images, std::min<int64_t>(4, static_cast<int64_t>(images.size()))));
  std::printf("samples: %s\n", path.string().c_str());
}

}  // namespace common
