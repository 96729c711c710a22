#pragma once
/// @file config_json.hpp
/// @brief Reading diffusers' `config.json` files: typed values, int-or-list values, unknown keys
/// refused, values only their defaults accepted for (the UNet's and the VAE's configurations).

#include <torch/torch.h>

#include <nlohmann/json.hpp>

#include <cmath>
#include <set>
#include <string>
#include <type_traits>
#include <vector>

namespace sd {

namespace detail {

/// The value of `key` in `config`, or null when the key is absent or JSON null.
inline const nlohmann::json* config_value(const nlohmann::json& config, const std::string& key) {
  auto it = config.find(key);
  if (it == config.end() || it->is_null()) return nullptr;
  return &*it;
}

/// Reads `key` as a `T` when present (and not null) into `out`; a value of the wrong type is an
/// error naming the model, the key and the value.
template <typename T>
void read_config(const nlohmann::json& config, const std::string& key, T& out,
                 const char* model) {
  const nlohmann::json* value = config_value(config, key);
  if (value == nullptr) return;
  bool ok = true;
  try {
    if constexpr (std::is_same_v<T, bool>) {
      ok = value->is_boolean();
    } else if constexpr (std::is_integral_v<T>) {
      ok = value->is_number_integer() ||
           (value->is_number_float() && value->get<double>() == std::floor(value->get<double>()));
    } else if constexpr (std::is_floating_point_v<T>) {
      ok = value->is_number();
    } else if constexpr (std::is_same_v<T, std::string>) {
      ok = value->is_string();
    }
    if (ok) out = value->get<T>();
  } catch (const nlohmann::json::exception&) {
    ok = false;
  }
  TORCH_CHECK(ok, model, " config: key '", key, "' has the value ", value->dump(),
              ", which has the wrong type");
}

/// Reads `key` as an int or a list of ints into `out` (an int becomes a one-element list).
inline void read_int_or_list(const nlohmann::json& config, const std::string& key,
                             std::vector<int64_t>& out, const char* model) {
  const nlohmann::json* value = config_value(config, key);
  if (value == nullptr) return;
  bool ok = true;
  std::vector<int64_t> values;
  if (value->is_number_integer()) {
    values.push_back(value->get<int64_t>());
  } else if (value->is_array()) {
    for (const auto& item : *value) {
      ok = ok && item.is_number_integer();
      if (ok) values.push_back(item.get<int64_t>());
    }
  } else {
    ok = false;
  }
  TORCH_CHECK(ok && !values.empty(), model, " config: key '", key, "' has the value ",
              value->dump(), "; expected an int or a list of ints");
  out = values;
}

/// Reads `key` as a list of `T` into `out`.
template <typename T>
void read_list(const nlohmann::json& config, const std::string& key, std::vector<T>& out,
               const char* model) {
  const nlohmann::json* value = config_value(config, key);
  if (value == nullptr) return;
  bool ok = value->is_array();
  std::vector<T> values;
  if (ok) {
    for (const auto& item : *value) {
      ok = ok && (std::is_same_v<T, std::string> ? item.is_string() : item.is_number_integer());
      if (ok) values.push_back(item.get<T>());
    }
  }
  TORCH_CHECK(ok, model, " config: key '", key, "' has the value ", value->dump(),
              "; expected a list");
  out = values;
}

/// Rejects keys that are neither known nor metadata (`_...`): an unknown key may change the
/// architecture, and building something else than the checkpoint describes would be silent.
inline void check_known_keys(const nlohmann::json& config, const std::set<std::string>& known,
                             const char* model) {
  TORCH_CHECK(config.is_object(), model, " config: expected a JSON object, got ", config.dump());
  for (const auto& item : config.items()) {
    if (!item.key().empty() && item.key()[0] == '_') continue;
    TORCH_CHECK(known.count(item.key()) == 1, model, " config: unknown key '", item.key(),
                "' (value ", item.value().dump(), ")");
  }
}

/// Requires `key` to be absent, null or equal to `expected` (a value this implementation does
/// not build otherwise).
inline void require_default(const nlohmann::json& config, const std::string& key,
                            const nlohmann::json& expected, const char* model) {
  const nlohmann::json* value = config_value(config, key);
  if (value == nullptr) return;
  TORCH_CHECK(*value == expected, model, " config: key '", key, "' = ", value->dump(),
              " is not supported (only ", expected.dump(), ")");
}

/// `values[block]` for per-block lists, or `values[0]` when one value serves every block.
inline int64_t per_block(const std::vector<int64_t>& values, size_t block) {
  return values.size() == 1 ? values[0] : values.at(block);
}

}  // namespace detail

}  // namespace sd
