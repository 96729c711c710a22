// The ControlNet's weights (examples/sd/controlnet_weights.hpp): a diffusers folder, a diffusers
// file with its configuration, an original single file (control_model.* through the key table),
// in the dtype asked, and errors that name the file and the key.

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <nlohmann/json.hpp>

#include <scedit/safetensors.hpp>
#include <scedit/state_dict.hpp>
#include <sd/controlnet.hpp>
#include <sd/controlnet_weights.hpp>
#include <sd/ldm_keys.hpp>
#include <sd/unet.hpp>
#include <sd/weights.hpp>

#include "controlnet_fixtures.hpp"
#include "sd_fixtures.hpp"
#include "test_util.hpp"

#include <filesystem>
#include <fstream>
#include <map>
#include <set>
#include <string>
#include <vector>

namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;
using ::testing::AllOf;
using ::testing::HasSubstr;
using scedit_test::error_of;
using scedit_test::fixture;
using scedit_test::TempDir;
using namespace scedit_test::controlnet;

void write_json(const fs::path& path, const json& value) {
  fs::create_directories(path.parent_path());
  std::ofstream(path) << value.dump(2);
}

/// The tiny ControlNet as a diffusers folder `dir`/`name`: config.json as diffusers writes it,
/// the fixture's weights (as `.fp16` variant only, when asked).
fs::path write_diffusers_folder(const TempDir& dir, const std::string& name, bool fp16_only = false) {
  const fs::path folder = dir.path() / name;
  json config = manifest().at("configs_full").at("controlnet_tiny");
  config["_class_name"] = "ControlNetModel";
  config["_diffusers_version"] = manifest().at("versions").at("diffusers");
  write_json(folder / "config.json", config);
  scedit::TensorMap tensors;
  for (const auto& [key, t] : tiny_weights()) tensors.emplace(key, fp16_only ? t.to(torch::kFloat16) : t);
  scedit::safetensors::save(
      (folder / (fp16_only ? "diffusion_pytorch_model.fp16.safetensors" : "diffusion_pytorch_model.safetensors"))
          .string(),
      tensors);
  return folder;
}

/// The tiny ControlNet's weights under their original names with `prefix`, plus `extra` tensors.
scedit::TensorMap original_layout(const std::string& prefix, const scedit::TensorMap& extra = {}) {
  scedit::TensorMap checkpoint = extra;
  sd::diffusers_component_to_ldm(tiny_weights(), sd::ldm_controlnet_keys(tiny_config(), prefix), "ControlNet",
                                 checkpoint);
  return checkpoint;
}

/// Expects `controlnet`'s parameters to be the fixture's, in `dtype`.
void expect_fixture_weights(const sd::ControlNet& controlnet, torch::Dtype dtype,
                            torch::Dtype rounded_through = torch::kFloat32) {
  const auto loaded = scedit::state_dict(*controlnet);
  ASSERT_EQ(loaded.size(), tiny_weights().size());
  for (const auto& [key, tensor] : tiny_weights()) {
    ASSERT_TRUE(loaded.count(key)) << key;
    EXPECT_EQ(loaded.at(key).scalar_type(), dtype) << key;
    EXPECT_TRUE(torch::equal(loaded.at(key), tensor.to(rounded_through).to(dtype))) << key;
  }
}

class ControlNetWeights : public ::testing::Test {
 protected:
  void SetUp() override { torch::manual_seed(0); }
  TempDir scratch_{"controlnet"};  ///< where a test writes its folders and files
};

TEST_F(ControlNetWeights, KeyTableMapsTheOriginalLayoutOnSd15) {
  const auto config = sd::ControlNetConfig::from_json(manifest().at("configs").at("controlnet_sd15"));
  const auto table = sd::ldm_controlnet_keys(config);
  std::set<std::string> ldm, diffusers, expected;
  std::map<std::string, std::string> to_diffusers;
  for (const auto& pair : table) {
    EXPECT_TRUE(ldm.insert(pair.ldm).second) << "duplicate " << pair.ldm;
    EXPECT_TRUE(diffusers.insert(pair.diffusers).second) << "duplicate " << pair.diffusers;
    EXPECT_EQ(pair.transform, sd::KeyTransform::kNone) << pair.ldm;
    to_diffusers[pair.ldm] = pair.diffusers;
  }
  for (const auto& [key, shape] : manifest().at("keys_controlnet_sd15").items()) expected.insert(key);
  EXPECT_EQ(diffusers, expected);
  // The encoder's names are the UNet's, under control_model. instead of model.diffusion_model.
  size_t shared = 0;
  const std::string unet_prefix = sd::kLdmUNetPrefix, prefix = sd::kLdmControlNetPrefix;
  for (const auto& pair : sd::ldm_unet_keys(config.unet)) {
    if (!diffusers.count(pair.diffusers)) continue;
    ++shared;
    const std::string key = prefix + pair.ldm.substr(unet_prefix.size());
    ASSERT_TRUE(to_diffusers.count(key)) << key;
    EXPECT_EQ(to_diffusers.at(key), pair.diffusers);
  }
  size_t encoder_keys = 0;
  for (const auto& key : expected) {
    encoder_keys += under(key, manifest().at("from_unet").at("prefixes_copied_from_unet")) ? 1 : 0;
  }
  EXPECT_EQ(shared, encoder_keys);
  // The control-specific names of diffusers' conversion.
  const size_t steps = config.conditioning_embedding_out_channels.size() - 1;
  const size_t last_zero = config.residual_channels().size() - 1;
  const std::vector<std::pair<std::string, std::string>> names = {
      {"time_embed.0.weight", "time_embedding.linear_1.weight"},
      {"input_blocks.0.0.weight", "conv_in.weight"},
      {"input_hint_block.0.weight", "controlnet_cond_embedding.conv_in.weight"},
      {"input_hint_block.2.bias", "controlnet_cond_embedding.blocks.0.bias"},
      {"input_hint_block." + std::to_string(4 * steps) + ".weight",
       "controlnet_cond_embedding.blocks." + std::to_string(2 * steps - 1) + ".weight"},
      {"input_hint_block." + std::to_string(4 * steps + 2) + ".weight", "controlnet_cond_embedding.conv_out.weight"},
      {"zero_convs.0.0.weight", "controlnet_down_blocks.0.weight"},
      {"zero_convs." + std::to_string(last_zero) + ".0.bias",
       "controlnet_down_blocks." + std::to_string(last_zero) + ".bias"},
      {"middle_block_out.0.weight", "controlnet_mid_block.weight"},
      {"middle_block.1.proj_in.weight", "mid_block.attentions.0.proj_in.weight"}};
  for (const auto& [name, expected_key] : names) {
    ASSERT_TRUE(to_diffusers.count(prefix + name)) << name;
    EXPECT_EQ(to_diffusers.at(prefix + name), expected_key) << name;
  }
}

TEST_F(ControlNetWeights, LoadsADiffusersFolderInTheDtypeAsked) {
  const auto folder = write_diffusers_folder(scratch_, "controlnet");
  expect_fixture_weights(sd::load_controlnet(folder), torch::kFloat32);
  auto f64 = sd::load_controlnet(folder, sd::WeightsOptions().dtype(torch::kFloat64));
  expect_fixture_weights(f64, torch::kFloat64);
  EXPECT_FALSE(f64->is_training());
  EXPECT_LE(max_error(run(f64, torch::kFloat64, 1.0, true), "output"), kFloat64ReferenceFeatures);
  // A pipeline folder's controlnet/, and the fp16 variant where only it is there.
  write_json(scratch_.path() / "model_index.json", {{"_class_name", "StableDiffusionControlNetPipeline"}});
  expect_fixture_weights(sd::load_controlnet(scratch_.path()), torch::kFloat32);
  const auto fp16 = write_diffusers_folder(scratch_, "fp16", /*fp16_only=*/true);
  expect_fixture_weights(sd::load_controlnet(fp16, sd::WeightsOptions().variant("fp16").verbose(false)),
                         torch::kFloat32, torch::kFloat16);
}

TEST_F(ControlNetWeights, LoadsADiffusersFileWithItsConfiguration) {
  const auto file = scratch_.path() / "alone" / "controlnet.safetensors";
  fs::create_directories(file.parent_path());
  scedit::safetensors::save(file.string(), tiny_weights());
  expect_fixture_weights(sd::load_controlnet(file, {}, tiny_config()), torch::kFloat32);
  // Without a configuration it is SD 1.5's, which these weights do not fit: the strict load says so.
  EXPECT_THAT(error_of([&] { sd::load_controlnet(file); }), AllOf(HasSubstr(file.string()), HasSubstr("conv_in.weight")));
  // The config.json beside it, when there is one.
  write_json(file.parent_path() / "config.json", manifest().at("configs").at("controlnet_tiny"));
  expect_fixture_weights(sd::load_controlnet(file), torch::kFloat32);
}

TEST_F(ControlNetWeights, LoadsAnOriginalSingleFile) {
  // A whole ControlLDM checkpoint: the ControlNet's keys beside another model's, which are ignored.
  const auto whole = scratch_.path() / "control_tiny.safetensors";
  const std::string unet_key = std::string(sd::kLdmUNetPrefix) + "out.2.bias";
  scedit::safetensors::save(whole.string(), original_layout(sd::kLdmControlNetPrefix, {{unet_key, torch::zeros({4})}}));
  auto controlnet = sd::load_controlnet(whole, sd::WeightsOptions().dtype(torch::kFloat64), tiny_config());
  expect_fixture_weights(controlnet, torch::kFloat64);
  EXPECT_LE(max_error(run(controlnet, torch::kFloat64, 1.0, true), "output"), kFloat64ReferenceFeatures);
  // A standalone original file: the same keys without the prefix.
  const auto standalone = scratch_.path() / "standalone.safetensors";
  scedit::safetensors::save(standalone.string(), original_layout(""));
  expect_fixture_weights(sd::load_controlnet(standalone, {}, tiny_config()), torch::kFloat32);
}

TEST_F(ControlNetWeights, ErrorsNameTheFileAndTheKey) {
  // A missing original key, named with its diffusers name; an unexpected one.
  auto checkpoint = original_layout(sd::kLdmControlNetPrefix);
  const std::string zero_conv = std::string(sd::kLdmControlNetPrefix) + "zero_convs.1.0.weight";
  checkpoint.erase(zero_conv);
  const auto missing = scratch_.path() / "missing.safetensors";
  scedit::safetensors::save(missing.string(), checkpoint);
  EXPECT_THAT(error_of([&] { sd::load_controlnet(missing, {}, tiny_config()); }),
              AllOf(HasSubstr(zero_conv), HasSubstr("controlnet_down_blocks.1.weight"), HasSubstr(missing.string())));
  auto unexpected = original_layout(sd::kLdmControlNetPrefix);
  const std::string stray = std::string(sd::kLdmControlNetPrefix) + "zero_convs.99.0.weight";
  unexpected.emplace(stray, torch::zeros({1}));
  const auto extra = scratch_.path() / "extra.safetensors";
  scedit::safetensors::save(extra.string(), unexpected);
  EXPECT_THAT(error_of([&] { sd::load_controlnet(extra, {}, tiny_config()); }),
              AllOf(HasSubstr(stray), HasSubstr(extra.string())));
  // A diffusers folder missing a key.
  const auto folder = write_diffusers_folder(scratch_, "partial");
  auto partial = tiny_weights();
  partial.erase("controlnet_mid_block.bias");
  scedit::safetensors::save((folder / "diffusion_pytorch_model.safetensors").string(), partial);
  EXPECT_THAT(error_of([&] { sd::load_controlnet(folder); }),
              AllOf(HasSubstr("controlnet_mid_block.bias"), HasSubstr("diffusion_pytorch_model.safetensors")));
  // A config key that is not supported, naming the file.
  json config = manifest().at("configs").at("controlnet_tiny");
  config["global_pool_conditions"] = true;
  write_json(folder / "config.json", config);
  EXPECT_THAT(error_of([&] { sd::load_controlnet(folder); }),
              AllOf(HasSubstr("global_pool_conditions"), HasSubstr((folder / "config.json").string())));
  // Pickles, and files holding no ControlNet.
  EXPECT_THAT(error_of([&] { sd::load_controlnet(scratch_.path() / "missing.ckpt"); }), HasSubstr("does not exist"));
  scedit_test::write_file(scratch_.path() / "control.ckpt", "not read");
  EXPECT_THAT(error_of([&] { sd::load_controlnet(scratch_.path() / "control.ckpt"); }), HasSubstr("pickle"));
  const auto unet_file = scratch_.path() / "unet.safetensors";
  scedit::safetensors::save(unet_file.string(), fixture("unet_tiny.safetensors"));
  EXPECT_THAT(error_of([&] { sd::load_controlnet(unet_file, {}, tiny_config()); }),
              AllOf(HasSubstr("holds no ControlNet"), HasSubstr(unet_file.string())));
}

}  // namespace
