#pragma once
/// @file tensor_file.hpp
/// @brief Named tensors from a file whatever its container: safetensors, or a `torch.save` zip
/// (`.bin`, `.pt`, `.ckpt`), told apart by the file's first bytes rather than its extension.
///
/// Example:
/// @code
/// scedit::TensorMap tensors = scedit::load_tensor_file("pytorch_model.bin");
/// @endcode

#include <scedit/safetensors.hpp>
#include <scedit/torch_pickle.hpp>

#include <torch/torch.h>

#include <array>
#include <fstream>
#include <string>

namespace scedit {

/// The containers `load_tensor_file` tells apart.
enum class TensorFileFormat {
  safetensors,  ///< 8-byte little-endian header length, then a JSON header.
  torch_zip,    ///< `torch.save` since PyTorch 1.6: a zip ("PK\3\4") holding `data.pkl`.
  unknown,      ///< Anything else (including the pre-1.6 `torch.save` format).
};

/// The container of the file at `path`, from its first bytes. Throws naming the file when it
/// cannot be opened.
inline TensorFileFormat tensor_file_format(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  TORCH_CHECK(in.good(), "cannot open '", path, "'");
  std::array<unsigned char, 9> head{};
  in.read(reinterpret_cast<char*>(head.data()), head.size());
  if (in.gcount() >= 4 && head[0] == 'P' && head[1] == 'K' && head[2] == 3 && head[3] == 4) {
    return TensorFileFormat::torch_zip;
  }
  if (in.gcount() == 9 && head[8] == '{') return TensorFileFormat::safetensors;
  return TensorFileFormat::unknown;
}

/// Throws naming the file when its container is none of `TensorFileFormat`'s (or it cannot be
/// opened); reads only its first bytes.
inline void check_tensor_file_format(const std::string& path) {
  TORCH_CHECK(tensor_file_format(path) != TensorFileFormat::unknown, "'", path,
              "' is neither a safetensors file nor a torch.save zip (PyTorch 1.6 or later); other "
              "formats, such as torch.save's legacy one, are not supported");
}

/// Every tensor of the file at `path`, by name: `safetensors::load` or `load_torch_file` (for a
/// `torch.save` zip: the tensors of its dict, or of its `"state_dict"` entry, with nested dicts
/// joined by '.'). Throws naming the file when its container is none of `TensorFileFormat`'s.
inline TensorMap load_tensor_file(const std::string& path) {
  switch (tensor_file_format(path)) {
    case TensorFileFormat::safetensors: return safetensors::load(path);
    case TensorFileFormat::torch_zip: return load_torch_file(path);
    case TensorFileFormat::unknown: break;
  }
  check_tensor_file_format(path);  // throws
  return {};
}

}  // namespace scedit
