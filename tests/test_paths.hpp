#pragma once
// Where the tests find the shared reference data: $SCEDIT_FIXTURES and $SCEDIT_DATA, else
// ../shared/fixtures and ../shared/data beside the repository.

#include <cstdlib>
#include <filesystem>
#include <string>

namespace scedit_test {

inline std::filesystem::path env_or(const char* variable, const char* fallback) {
  if (const char* value = std::getenv(variable); value != nullptr && *value != '\0') {
    std::filesystem::path path(value);
    return path.is_absolute() ? path : std::filesystem::path(SCEDIT_SOURCE_DIR) / path;
  }
  return std::filesystem::path(SCEDIT_SOURCE_DIR) / fallback;
}

/// Folder of the reference fixtures (manifest.json, *.safetensors).
inline std::filesystem::path fixtures_dir() { return env_or("SCEDIT_FIXTURES", "../shared/fixtures"); }

/// Folder of the shared data (clip/, images/).
inline std::filesystem::path data_dir() { return env_or("SCEDIT_DATA", "../shared/data"); }

}  // namespace scedit_test
