#pragma once
/// @file strings.hpp
/// @brief The little text handling the programs share: comma-separated flag values, regular
/// expressions given as flags, and the h:mm:ss of a progress line.

#include <cstdint>
#include <cstdio>
#include <regex>
#include <sstream>
#include <string>
#include <vector>

#include <torch/torch.h>

namespace common {

/// The non-empty parts of `text` between `separator`s: `"a,,b"` -> {"a", "b"}.
inline std::vector<std::string> split_list(const std::string& text, char separator = ',') {
  std::vector<std::string> parts;
  std::stringstream stream(text);
  for (std::string part; std::getline(stream, part, separator);) {
    if (!part.empty()) parts.push_back(part);
  }
  return parts;
}

/// Refuses a `flag` whose value `pattern` is not a regular expression (ECMAScript, as the tuner
/// site patterns are matched), naming the flag; an empty pattern is fine.
inline void check_regex_flag(const char* flag, const std::string& pattern) {
  try {
    std::regex compiled(pattern);
  } catch (const std::regex_error& e) {
    TORCH_CHECK(false, flag, ": '", pattern, "' is not a regular expression (", e.what(), ")");
  }
}

/// `seconds` as h:mm:ss.
inline std::string format_duration(double seconds) {
  const auto s = static_cast<long long>(seconds);
  char text[32];
  std::snprintf(text, sizeof(text), "%lld:%02lld:%02lld", s / 3600, (s / 60) % 60, s % 60);
  return text;
}

}  // namespace common
