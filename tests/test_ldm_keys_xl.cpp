// Tests of examples/sd/ldm_keys_xl.hpp (and the fused / transposed pairs of ldm_key_pairs.hpp):
// the single-file key tables of SD 2.1 and SDXL against the full-size diffusers key lists of
// tests/data/fixtures/{sd21,sdxl}/manifest.json, a round trip of the tiny fixtures' weights
// through the single-file layout, names taken from the reference converters, refusals, and the
// family of a single file told by its keys (examples/sd/single_file.hpp).

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <nlohmann/json.hpp>

#include <scedit/safetensors.hpp>
#include <sd/clip_projection.hpp>
#include <sd/ldm_keys_xl.hpp>
#include <sd/single_file.hpp>
#include <sd/unet.hpp>

#include "test_util.hpp"

#include <algorithm>
#include <fstream>
#include <functional>
#include <map>
#include <numeric>
#include <set>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

namespace {

using json = nlohmann::json;
using ::testing::AllOf;
using ::testing::HasSubstr;
using scedit_test::error_of;

// ---- the fixtures of a model family (sd21/ or sdxl/) --------------------------------------------

const json& family_manifest(const std::string& family) {
  static std::map<std::string, json> cache;
  auto it = cache.find(family);
  if (it == cache.end()) {
    std::ifstream in(scedit_test::fixtures_dir() / family / "manifest.json");
    EXPECT_TRUE(in.good()) << "cannot open " << family << "/manifest.json in "
                           << scedit_test::fixtures_dir();
    it = cache.emplace(family, json::parse(in)).first;
  }
  return it->second;
}

const json& config_of(const std::string& family, const std::string& name) {
  return family_manifest(family).at("configs").at(name);
}

sd::UNetConfig unet_config(const std::string& family, const std::string& name) {
  return sd::UNetConfig::from_json(config_of(family, name));
}

sd::CLIPTextConfig text_config(const std::string& family, const std::string& name) {
  return sd::CLIPTextConfig::from_json(config_of(family, name));
}

/// `map` with transformers' `text_model.` taken off its keys when `strip` (`CLIPTextModel`'s
/// layout here; `CLIPTextModelWithProjection` keeps it).
template <typename V>
std::map<std::string, V> without_text_model(const std::map<std::string, V>& map,
                                            bool strip = true) {
  std::map<std::string, V> out;
  for (const auto& [key, value] : map) {
    out.emplace(strip && key.rfind("text_model.", 0) == 0 ? key.substr(11) : key, value);
  }
  return out;
}

/// A manifest key list: diffusers key -> shape.
using Shapes = std::map<std::string, std::vector<int64_t>>;
Shapes manifest_keys(const json& keys, bool strip = true) {
  return without_text_model(keys.get<Shapes>(), strip);
}

scedit::TensorMap fixture_of(const std::string& family, const std::string& file) {
  return scedit::safetensors::load(scedit_test::fixture_path(family + "/" + file));
}

/// The full-size tables of both families, by name, with the diffusers keys they must cover.
struct Case {
  std::string name;
  sd::LdmComponentKeys keys;
  Shapes diffusers;
};

std::vector<Case> full_size_cases() {
  const auto unet21 = unet_config("sd21", "unet_sd21");
  const auto unetxl = unet_config("sdxl", "unet_sdxl");
  const auto& m21 = family_manifest("sd21");
  const auto& mxl = family_manifest("sdxl");
  return {
      {"sd21 UNet", {sd::kLdmUNetPrefix, sd::ldm_unet_keys(unet21), {}},
       manifest_keys(m21.at("keys_unet_full"))},
      {"sdxl UNet", {sd::kLdmUNetPrefix, sd::ldm_unet_keys(unetxl), {}},
       manifest_keys(mxl.at("keys_unet_full"))},
      {"sd21 text encoder", sd::ldm_open_clip_keys(text_config("sd21", "text_encoder_sd21")),
       manifest_keys(m21.at("keys_text_encoder_sd21"))},
      {"sdxl text encoder", sd::sdxl_clip_keys(text_config("sdxl", "text_encoder_sdxl")),
       manifest_keys(mxl.at("keys_text_encoder_sdxl"))},
      {"sdxl text encoder 2", sd::sdxl_open_clip_keys(text_config("sdxl", "text_encoder_2_sdxl")),
       manifest_keys(mxl.at("keys_text_encoder_2_sdxl"), /*strip=*/false)},
  };
}

// ---- coverage of the full-size key lists --------------------------------------------------------

TEST(LdmKeysXL, TablesCoverEveryFullSizeDiffusersKeyExactlyOnce) {
  for (const auto& c : full_size_cases()) {
    SCOPED_TRACE(c.name);
    std::map<std::string, int> diffusers_uses;
    std::map<std::string, std::set<int64_t>> ldm_parts;  // LDM key -> the parts it gives
    std::map<std::string, int> ldm_uses;
    int64_t diffusers_numel = 0;
    std::map<std::string, int64_t> ldm_numel;  // each LDM tensor's size, from the diffusers shapes
    for (const auto& pair : c.keys.pairs) {
      EXPECT_EQ(pair.ldm.rfind(c.keys.prefix, 0), 0u) << pair.ldm;
      EXPECT_FALSE(c.keys.ignores(pair.ldm)) << pair.ldm;
      ++diffusers_uses[pair.diffusers];
      ++ldm_uses[pair.ldm];
      const auto it = c.diffusers.find(pair.diffusers);
      if (it == c.diffusers.end()) continue;  // reported below
      const auto& shape = it->second;
      const int64_t numel = std::accumulate(shape.begin(), shape.end(), int64_t{1},
                                            std::multiplies<int64_t>());
      diffusers_numel += numel;
      if (pair.transform == sd::KeyTransform::kFusedQKV) {
        EXPECT_TRUE(ldm_parts[pair.ldm].insert(pair.part).second) << pair.ldm;
        EXPECT_EQ(pair.rows, shape.at(0)) << pair.diffusers;  // the table's rows are the model's
        ldm_numel[pair.ldm] += numel;
      } else {
        EXPECT_TRUE(pair.transform != sd::KeyTransform::kTranspose || shape.size() == 2)
            << pair.diffusers;
        ldm_numel[pair.ldm] = numel;
      }
    }
    for (const auto& [key, uses] : diffusers_uses) {
      EXPECT_EQ(uses, 1) << key;
      EXPECT_EQ(c.diffusers.count(key), 1u) << "not a diffusers key of the model: " << key;
    }
    for (const auto& [key, shape] : c.diffusers) {
      EXPECT_EQ(diffusers_uses.count(key), 1u) << "not in the table: " << key;
    }
    for (const auto& [key, uses] : ldm_uses) {
      EXPECT_EQ(uses, ldm_parts.count(key) ? 3 : 1) << key;  // a fused tensor gives q, k and v
      const std::set<int64_t> qkv{0, 1, 2};
      EXPECT_TRUE(!ldm_parts.count(key) || ldm_parts.at(key) == qkv) << key;
    }
    // The file holds as many numbers as the model (ignored keys aside).
    int64_t file_numel = 0;
    for (const auto& [key, numel] : ldm_numel) file_numel += numel;
    EXPECT_EQ(file_numel, diffusers_numel);
  }
}

TEST(LdmKeysXL, UNetTablesChangeNoTensorAndFollowEachLevel) {
  // SD 2.1 and SDXL: linear proj_in / proj_out in both layouts, so no 1x1 conv transform.
  for (const auto& c : full_size_cases()) {
    if (c.name.find("UNet") == std::string::npos) continue;
    for (const auto& pair : c.keys.pairs) {
      EXPECT_EQ(pair.transform, sd::KeyTransform::kNone) << pair.ldm;
      if (pair.diffusers.find("proj_in.weight") != std::string::npos) {
        EXPECT_EQ(c.diffusers.at(pair.diffusers).size(), 2u) << pair.diffusers;
      }
    }
  }
  // SDXL: level 0 has no attention (input_blocks.1/2, output_blocks.6-8 are resnets only), the
  // last up level no upsampler, and no attention key names a transformer_blocks index past its
  // level's depth.
  const auto config = unet_config("sdxl", "unet_sdxl");
  std::set<std::string> ldm;
  for (const auto& pair : sd::ldm_unet_keys(config)) ldm.insert(pair.ldm);
  const std::string p = sd::kLdmUNetPrefix;
  for (const auto& key : ldm) {
    for (const char* block : {"input_blocks.1.1.", "input_blocks.2.1.", "output_blocks.6.1.",
                              "output_blocks.7.1.", "output_blocks.8.1.", "output_blocks.8.2."}) {
      EXPECT_NE(key.rfind(p + block, 0), 0u) << key;
    }
    EXPECT_EQ(key.find("transformer_blocks.10."), std::string::npos) << key;
  }
  EXPECT_EQ(ldm.count(p + "input_blocks.8.1.transformer_blocks.9.attn1.to_q.weight"), 1u);
  EXPECT_EQ(ldm.count(p + "input_blocks.5.1.transformer_blocks.2.attn1.to_q.weight"), 0u);
}

TEST(LdmKeysXL, TablesNameTheParametersOfThisExamplesModules) {
  // What a file converts to loads straight into the modules: the diffusers side is their keys.
  const auto module_keys = [](const torch::nn::Module& module) {
    std::set<std::string> out;
    for (const auto& item : module.named_parameters()) out.insert(item.key());
    return out;
  };
  const auto table_keys = [](const std::vector<sd::KeyPair>& pairs) {
    std::set<std::string> out;
    for (const auto& pair : pairs) out.insert(pair.diffusers);
    return out;
  };
  const auto unet = unet_config("sdxl", "unet_tiny");
  EXPECT_EQ(module_keys(*sd::UNet(unet)), table_keys(sd::ldm_unet_keys(unet)));
  const auto text_2 = text_config("sdxl", "text_encoder_2_tiny");
  EXPECT_EQ(module_keys(*sd::CLIPTextModelWithProjection(text_2)),
            table_keys(sd::sdxl_open_clip_keys(text_2).pairs));
  const auto text = text_config("sd21", "text_encoder_tiny");
  EXPECT_EQ(module_keys(*sd::CLIPTextModel(text)), table_keys(sd::ldm_open_clip_keys(text).pairs));
}

// ---- names from the reference converters --------------------------------------------------------

TEST(LdmKeysXL, KnownNamesFromTheReferenceConverters) {
  using T = sd::KeyTransform;
  std::map<std::string, sd::LdmComponentKeys> tables;
  for (auto& c : full_size_cases()) tables.emplace(c.name, c.keys);
  const std::string u = "model.diffusion_model.";
  const std::string x2 = "conditioner.embedders.1.model.";
  // {table, LDM key, diffusers key, transform}; the source of each group is above it.
  const std::vector<std::tuple<std::string, std::string, std::string, T>> known = {
      // diffusers src/diffusers/loaders/single_file_utils.py, CHECKPOINT_KEY_NAMES ("v1", "v2",
      // "open_clip", "clip_sdxl", "open_clip_sdxl", "xl_base"): keys of the real files.
      {"sd21 UNet", u + "output_blocks.11.0.skip_connection.weight",
       "up_blocks.3.resnets.2.conv_shortcut.weight", T::kNone},
      {"sd21 UNet", u + "input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight",
       "down_blocks.0.attentions.1.transformer_blocks.0.attn2.to_k.weight", T::kNone},
      {"sd21 text encoder", "cond_stage_model.model.token_embedding.weight",
       "embeddings.token_embedding.weight", T::kNone},
      {"sdxl text encoder",
       "conditioner.embedders.0.transformer.text_model.embeddings.position_embedding.weight",
       "embeddings.position_embedding.weight", T::kNone},
      {"sdxl text encoder 2", "conditioner.embedders.1.model.positional_embedding",
       "text_model.embeddings.position_embedding.weight", T::kNone},
      {"sdxl text encoder 2", x2 + "transformer.resblocks.9.mlp.c_proj.bias",
       "text_model.encoder.layers.9.mlp.fc2.bias", T::kNone},
      // The same file, DIFFUSERS_TO_LDM_MAPPING: "addition_embed_type" and "openclip".
      {"sdxl UNet", u + "label_emb.0.0.weight", "add_embedding.linear_1.weight", T::kNone},
      {"sdxl UNet", u + "label_emb.0.2.bias", "add_embedding.linear_2.bias", T::kNone},
      {"sdxl text encoder 2", "conditioner.embedders.1.model.text_projection",
       "text_projection.weight", T::kTranspose},
      {"sd21 text encoder", "cond_stage_model.model.ln_final.weight", "final_layer_norm.weight",
       T::kNone},
      {"sd21 text encoder", "cond_stage_model.model.transformer.resblocks.22.ln_2.bias",
       "encoder.layers.22.layer_norm2.bias", T::kNone},
      {"sd21 text encoder", "cond_stage_model.model.transformer.resblocks.0.mlp.c_fc.weight",
       "encoder.layers.0.mlp.fc1.weight", T::kNone},
      // The same file, convert_open_clip_checkpoint: in_proj split q, k, v along dim 0.
      {"sd21 text encoder", "cond_stage_model.model.transformer.resblocks.22.attn.in_proj_weight",
       "encoder.layers.22.self_attn.v_proj.weight", T::kFusedQKV},
      {"sdxl text encoder 2", x2 + "transformer.resblocks.31.attn.in_proj_bias",
       "text_model.encoder.layers.31.self_attn.q_proj.bias", T::kFusedQKV},
      // diffusers scripts/convert_diffusers_to_original_sdxl.py (unet_conversion_map_layer):
      // input_blocks.{3(i+1)}.0.op, output_blocks.{3i+j}.1 (i < 2), the upsamplers at
      // output_blocks.{2,5}.2.conv, middle_block.{0,1,2}.
      {"sdxl UNet", u + "input_blocks.6.0.op.weight", "down_blocks.1.downsamplers.0.conv.weight",
       T::kNone},
      {"sdxl UNet", u + "output_blocks.5.1.proj_out.weight",
       "up_blocks.1.attentions.2.proj_out.weight", T::kNone},
      {"sdxl UNet", u + "output_blocks.2.2.conv.weight", "up_blocks.0.upsamplers.0.conv.weight",
       T::kNone},
      {"sdxl UNet", u + "output_blocks.5.2.conv.bias", "up_blocks.1.upsamplers.0.conv.bias",
       T::kNone},
      {"sdxl UNet", u + "middle_block.2.out_layers.3.weight", "mid_block.resnets.1.conv2.weight",
       T::kNone},
      {"sdxl UNet", u + "input_blocks.1.0.in_layers.0.weight",
       "down_blocks.0.resnets.0.norm1.weight", T::kNone},
      // ComfyUI comfy/utils.py unet_to_diffusers (transformer_depth per block, the upsampler at
      // output_blocks.{n}.{1 + has attention}.conv) on SDXL's and SD 2.1's configurations.
      {"sdxl UNet", u + "middle_block.1.transformer_blocks.9.ff.net.2.weight",
       "mid_block.attentions.0.transformer_blocks.9.ff.net.2.weight", T::kNone},
      {"sdxl UNet", u + "output_blocks.0.1.transformer_blocks.9.norm3.bias",
       "up_blocks.0.attentions.0.transformer_blocks.9.norm3.bias", T::kNone},
      {"sdxl UNet", u + "output_blocks.3.1.transformer_blocks.1.attn2.to_v.weight",
       "up_blocks.1.attentions.0.transformer_blocks.1.attn2.to_v.weight", T::kNone},
      {"sd21 UNet", u + "output_blocks.2.1.conv.weight", "up_blocks.0.upsamplers.0.conv.weight",
       T::kNone},
      {"sd21 UNet", u + "output_blocks.11.1.proj_out.weight",
       "up_blocks.3.attentions.2.proj_out.weight", T::kNone},
  };
  for (const auto& [table, ldm, diffusers, transform] : known) {
    const auto& pairs = tables.at(table).pairs;
    const auto it = std::find_if(pairs.begin(), pairs.end(),
                                 [&](const sd::KeyPair& p) { return p.diffusers == diffusers; });
    ASSERT_NE(it, pairs.end()) << table << ": " << diffusers;
    EXPECT_EQ(it->ldm, ldm) << table << ": " << diffusers;
    EXPECT_EQ(it->transform, transform) << ldm;
  }
  // SD 2.x's unused keys: diffusers' SD_2_TEXT_ENCODER_KEYS_TO_IGNORE (block 23, the projection)
  // and logit_scale, which convert_open_clip_checkpoint maps to nothing.
  const auto& sd21 = tables.at("sd21 text encoder");
  EXPECT_TRUE(sd21.ignores("cond_stage_model.model.transformer.resblocks.23.attn.in_proj_weight"));
  EXPECT_TRUE(sd21.ignores("cond_stage_model.model.text_projection"));
  EXPECT_TRUE(sd21.ignores("cond_stage_model.model.logit_scale"));
  EXPECT_FALSE(sd21.ignores("cond_stage_model.model.transformer.resblocks.22.ln_1.weight"));
  EXPECT_FALSE(sd21.ignores("cond_stage_model.model.transformer.resblocks.230.ln_1.weight"));
}

// ---- round trips of the tiny weights ------------------------------------------------------------

/// Expects `a` and `b` to hold the same keys and bitwise the same tensors (dtype, shape, values).
void expect_same_tensors(const scedit::TensorMap& a, const scedit::TensorMap& b,
                         const std::string& what) {
  ASSERT_EQ(a.size(), b.size()) << what;
  for (const auto& [key, tensor] : a) {
    const auto it = b.find(key);
    ASSERT_NE(it, b.end()) << what << ": " << key;
    EXPECT_EQ(tensor.scalar_type(), it->second.scalar_type()) << key;
    EXPECT_TRUE(tensor.sizes() == it->second.sizes() && torch::equal(tensor, it->second))
        << what << ": " << key;
  }
}

/// The SDXL tiny fixtures (and the SD 1.5 tiny VAE, whose layout SDXL shares) as components.
std::pair<sd::LdmComponents, sd::LdmLayout> sdxl_tiny() {
  const auto unet = unet_config("sdxl", "unet_tiny");
  EXPECT_TRUE(unet.has_text_time());
  sd::LdmComponents parts;
  parts.unet = fixture_of("sdxl", "unet_tiny.safetensors");
  parts.vae = scedit_test::fixture("vae_tiny.safetensors");
  parts.text_encoder = without_text_model(fixture_of("sdxl", "text_encoder_tiny.safetensors"));
  parts.text_encoder_2 = fixture_of("sdxl", "text_encoder_2_tiny.safetensors");
  const auto vae = sd::VAEConfig::from_json(scedit_test::config_json("vae_tiny"));
  return {parts, sd::sdxl_ldm_layout(unet, vae, text_config("sdxl", "text_encoder_tiny"),
                                     text_config("sdxl", "text_encoder_2_tiny"))};
}

TEST(LdmKeysXL, SDXLRoundTripThroughAFileIsBitwise) {
  const auto [parts, layout] = sdxl_tiny();
  const auto file = sd::diffusers_to_ldm(parts, layout);
  // Fused q/k/v: q, k, v stacked along dim 0; the projection transposed; label_emb as it was.
  const std::string b = "conditioner.embedders.1.model.transformer.resblocks.3.attn.";
  const std::string d = "text_model.encoder.layers.3.self_attn.";
  const auto& te2 = parts.text_encoder_2;
  EXPECT_TRUE(torch::equal(file.at(b + "in_proj_weight"),
                           torch::cat({te2.at(d + "q_proj.weight"), te2.at(d + "k_proj.weight"),
                                       te2.at(d + "v_proj.weight")})));
  EXPECT_TRUE(
      torch::equal(file.at(b + "in_proj_bias").narrow(0, 48, 48), te2.at(d + "k_proj.bias")));
  EXPECT_EQ(file.at("conditioner.embedders.1.model.text_projection").sizes(),
            (std::vector<int64_t>{48, 40}));  // [hidden, projection]
  EXPECT_TRUE(torch::equal(file.at("conditioner.embedders.1.model.text_projection"),
                           te2.at("text_projection.weight").t()));
  EXPECT_TRUE(torch::equal(file.at("model.diffusion_model.label_emb.0.0.weight"),
                           parts.unet.at("add_embedding.linear_1.weight")));
  EXPECT_EQ(file.count("conditioner.embedders.0.transformer.text_model.final_layer_norm.bias"), 1u);
  // Through a safetensors file (the transposed view is written contiguous), with the keys a
  // real file carries and this model does not use.
  scedit_test::TempDir dir;
  auto written = file;
  written.emplace("conditioner.embedders.1.model.logit_scale", torch::ones({}));
  written.emplace("conditioner.embedders.0.transformer.text_model.embeddings.position_ids",
                  torch::arange(77).unsqueeze(0));
  written.emplace("alphas_cumprod", torch::ones({1000}));
  scedit::safetensors::save(dir.file("sdxl.safetensors"), written);
  const auto back = sd::ldm_to_diffusers(scedit::safetensors::load(dir.file("sdxl.safetensors")),
                                         layout, "'sdxl.safetensors'");
  expect_same_tensors(parts.unet, back.unet, "UNet");
  expect_same_tensors(parts.vae, back.vae, "VAE");
  expect_same_tensors(parts.text_encoder, back.text_encoder, "text encoder");
  expect_same_tensors(parts.text_encoder_2, back.text_encoder_2, "text encoder 2");
}

TEST(LdmKeysXL, SD21RoundTripPassesOverTheUnusedLastBlock) {
  const auto unet = unet_config("sd21", "unet_tiny");
  const auto text = text_config("sd21", "text_encoder_tiny");
  const auto layout = sd::sd21_ldm_layout(
      unet, sd::VAEConfig::from_json(scedit_test::config_json("vae_tiny")), text);
  sd::LdmComponents parts;
  parts.unet = fixture_of("sd21", "unet_tiny.safetensors");
  parts.vae = scedit_test::fixture("vae_tiny.safetensors");
  parts.text_encoder = without_text_model(fixture_of("sd21", "text_encoder_tiny.safetensors"));
  auto file = sd::diffusers_to_ldm(parts, layout);
  const std::string p = sd::kLdmOpenCLIPPrefix;
  const std::string last = p + "transformer.resblocks." + std::to_string(text.num_hidden_layers);
  EXPECT_EQ(file.count(last + ".ln_1.weight"), 0u);  // written with the blocks the model has
  EXPECT_EQ(file.count(p + "text_projection"), 0u);
  const auto fused_bias = file.at(p + "transformer.resblocks.2.attn.in_proj_bias");
  EXPECT_TRUE(torch::equal(fused_bias.narrow(0, 64, 32),
                           parts.text_encoder.at("encoder.layers.2.self_attn.v_proj.bias")));
  // A real file has one more block, the projection and the logit scale: all passed over.
  for (const auto& [key, tensor] : scedit::TensorMap(file)) {
    const std::string block0 = p + "transformer.resblocks.0.";
    if (key.rfind(block0, 0) == 0) file.emplace(last + "." + key.substr(block0.size()), tensor);
  }
  file.emplace(p + "text_projection", torch::zeros({32, 16}));
  file.emplace(p + "logit_scale", torch::ones({}));
  const auto back = sd::ldm_to_diffusers(file, layout);
  expect_same_tensors(parts.unet, back.unet, "UNet");
  expect_same_tensors(parts.vae, back.vae, "VAE");
  expect_same_tensors(parts.text_encoder, back.text_encoder, "text encoder");
  EXPECT_TRUE(back.text_encoder_2.empty());
  // A block beyond that one is no SD 2.x key.
  const std::string beyond =
      p + "transformer.resblocks." + std::to_string(text.num_hidden_layers + 1) + ".ln_1.weight";
  file.emplace(beyond, torch::ones({32}));
  EXPECT_THAT(error_of([&] { sd::ldm_to_diffusers(file, layout, "'sd21.ckpt'"); }),
              AllOf(HasSubstr("unexpected key '" + beyond + "'"), HasSubstr("'sd21.ckpt'")));
}

// ---- refusals -----------------------------------------------------------------------------------

TEST(LdmKeysXL, RefusesAFusedProjectionOfTheWrongSize) {
  const auto tiny = sdxl_tiny();
  const sd::LdmComponents& parts = tiny.first;
  const sd::LdmLayout& layout = tiny.second;
  const auto file = sd::diffusers_to_ldm(parts, layout);
  const std::string blocks = "conditioner.embedders.1.model.transformer.resblocks.";
  const std::string key = blocks + "1.attn.in_proj_weight";
  const std::vector<std::vector<int64_t>> shapes = {{147, 48}, {96, 48}, {144, 47}, {144}};
  for (const auto& shape : shapes) {
    auto bad = file;
    bad[key] = torch::zeros(shape);
    EXPECT_THAT(error_of([&] { sd::ldm_to_diffusers(bad, layout); }),
                AllOf(HasSubstr("'" + key + "'"), HasSubstr("3 x 48 = 144 rows, [144, 48]"),
                      HasSubstr("got " + c10::str(c10::IntArrayRef(shape)))));
  }
  auto bad_bias = file;
  const std::string bias = blocks + "0.attn.in_proj_bias";
  bad_bias[bias] = torch::zeros({96});
  EXPECT_THAT(error_of([&] { sd::ldm_to_diffusers(bad_bias, layout); }),
              AllOf(HasSubstr("'" + bias + "'"), HasSubstr("[96]")));
}

TEST(LdmKeysXL, RefusesQKVPartsThatDoNotFuse) {
  const auto tiny = sdxl_tiny();
  const sd::LdmComponents& parts = tiny.first;
  const sd::LdmLayout& layout = tiny.second;
  const std::string k = "text_model.encoder.layers.2.self_attn.k_proj.weight";
  auto wrong = parts;
  wrong.text_encoder_2[k] = torch::zeros({47, 48});
  EXPECT_THAT(error_of([&] { sd::diffusers_to_ldm(wrong, layout); }),
              AllOf(HasSubstr("'" + k + "'"), HasSubstr("[47, 48]"),
                    HasSubstr("model.transformer.resblocks.2.attn.in_proj_weight")));
  auto missing = parts;
  missing.text_encoder_2.erase("text_model.encoder.layers.0.self_attn.v_proj.bias");
  EXPECT_THAT(error_of([&] { sd::diffusers_to_ldm(missing, layout); }),
              HasSubstr("lack key 'text_model.encoder.layers.0.self_attn.v_proj.bias'"));
  // A fused part cannot be converted alone; a projection must be a matrix.
  const auto& pairs = layout.text_encoder_2->pairs;
  const auto fused = std::find_if(pairs.begin(), pairs.end(), [](const sd::KeyPair& p) {
    return p.transform == sd::KeyTransform::kFusedQKV;
  });
  ASSERT_NE(fused, pairs.end());
  EXPECT_THAT(error_of([&] { sd::diffusers_tensor_to_ldm(torch::zeros({48, 48}), *fused); }),
              HasSubstr("diffusers_component_to_ldm"));
  auto flat = sd::diffusers_to_ldm(parts, layout);
  flat["conditioner.embedders.1.model.text_projection"] = torch::zeros({48 * 40});
  EXPECT_THAT(error_of([&] { sd::ldm_to_diffusers(flat, layout); }),
              AllOf(HasSubstr("'conditioner.embedders.1.model.text_projection'"),
                    HasSubstr("[1920]")));
  // Without "text_time" (no label_emb in the table), an SDXL file's add embedding is unexpected.
  auto unet = unet_config("sdxl", "unet_tiny");
  unet.addition_embed_type.clear();
  unet.addition_time_embed_dim = 0;
  unet.projection_class_embeddings_input_dim = 0;
  auto no_added = layout;
  no_added.unet.pairs = sd::ldm_unet_keys(unet);
  EXPECT_THAT(error_of([&] { sd::ldm_to_diffusers(flat, no_added); }),
              HasSubstr("unexpected key 'model.diffusion_model.label_emb.0."));
}

// ---- the family of a single file ---------------------------------------------------------------

/// A checkpoint of `layout`'s LDM keys (each tensor a placeholder scalar).
scedit::TensorMap ldm_key_names(const sd::LdmLayout& layout) {
  scedit::TensorMap out;
  for (const auto* component : {&layout.unet, &layout.vae, &layout.text_encoder}) {
    for (const auto& pair : component->pairs) out.emplace(pair.ldm, torch::zeros({}));
  }
  if (layout.text_encoder_2) {
    for (const auto& pair : layout.text_encoder_2->pairs) out.emplace(pair.ldm, torch::zeros({}));
  }
  return out;
}

/// The UNet alone, LDM keys with the manifest's shapes (the UNet's tensors keep theirs), of no
/// memory (stride 0).
scedit::TensorMap ldm_unet_only(const sd::UNetConfig& config, const json& keys) {
  const auto shapes = keys.get<Shapes>();
  scedit::TensorMap out;
  for (const auto& pair : sd::ldm_unet_keys(config)) {
    out.emplace(pair.ldm, torch::zeros({}).expand(shapes.at(pair.diffusers)));
  }
  return out;
}

TEST(LdmKeysXL, FamilyOfASingleFileIsToldByItsKeys) {
  const auto vae = sd::VAEConfig::from_json(scedit_test::config_json("vae_tiny"));
  const auto sd15_unet = sd::UNetConfig::from_json(scedit_test::config_json("unet_sd15"));
  const auto sd15_text = sd::CLIPTextConfig::from_json(scedit_test::config_json("clip_text_l14"));
  const sd::LdmConfigs sd15{sd15_unet, vae, sd15_text, {}};
  const sd::LdmConfigs sd21{unet_config("sd21", "unet_sd21"), vae,
                            text_config("sd21", "text_encoder_sd21"), {}};
  const sd::LdmConfigs sdxl{unet_config("sdxl", "unet_sdxl"), vae,
                            text_config("sdxl", "text_encoder_sdxl"),
                            text_config("sdxl", "text_encoder_2_sdxl")};
  const std::vector<std::tuple<sd::LdmFamily, sd::LdmConfigs, json>> cases = {
      {sd::LdmFamily::kSD1, sd15, scedit_test::manifest().at("keys_unet_sd15")},
      {sd::LdmFamily::kSD2, sd21, family_manifest("sd21").at("keys_unet_full")},
      {sd::LdmFamily::kSDXL, sdxl, family_manifest("sdxl").at("keys_unet_full")}};
  for (const auto& [family, configs, unet_keys] : cases) {
    SCOPED_TRACE(sd::ldm_family_name(family));
    const auto whole = ldm_key_names(sd::ldm_layout(family, configs));
    EXPECT_TRUE(sd::is_ldm_checkpoint(whole));
    EXPECT_EQ(sd::detect_ldm_family(whole), family);
    // A UNet alone: told by its added embedding (SDXL) or its linear proj_in (SD 2.x).
    const auto unet = ldm_unet_only(configs.unet, unet_keys);
    EXPECT_TRUE(sd::is_ldm_checkpoint(unet));
    EXPECT_EQ(sd::detect_ldm_family(unet), family);
    // A diffusers model's keys are none of these.
    scedit::TensorMap diffusers;
    for (const auto& [key, shape] : unet_keys.items()) diffusers.emplace(key, torch::zeros({}));
    EXPECT_FALSE(sd::is_ldm_checkpoint(diffusers));
  }
  // The released configurations each family defaults to are the manifests' (the text encoders'
  // layouts; the manifests leave the special token ids out).
  EXPECT_EQ(sd::default_ldm_configs(sd::LdmFamily::kSD2).unet.to_json(), sd21.unet.to_json());
  EXPECT_EQ(sd::default_ldm_configs(sd::LdmFamily::kSDXL).unet.to_json(), sdxl.unet.to_json());
  EXPECT_EQ(sd::default_ldm_configs(sd::LdmFamily::kSD1).unet.to_json(), sd15.unet.to_json());
  for (const auto& [family, configs, keys] : cases) {
    const auto defaults = sd::default_ldm_configs(family);
    EXPECT_EQ(defaults.text.hidden_size, configs.text.hidden_size) << sd::ldm_family_name(family);
    EXPECT_EQ(defaults.text.num_hidden_layers, configs.text.num_hidden_layers);
    EXPECT_EQ(defaults.text.hidden_act, configs.text.hidden_act);
  }
  EXPECT_EQ(sd::default_ldm_configs(sd::LdmFamily::kSDXL).text_2.num_hidden_layers,
            sdxl.text_2.num_hidden_layers);
  EXPECT_EQ(sd::default_ldm_configs(sd::LdmFamily::kSDXL).text_2.projection_dim,
            sdxl.text_2.projection_dim);
}

}  // namespace
