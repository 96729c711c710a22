// Tests of examples/sd/weights.hpp and examples/sd/single_file.hpp on SD 2.1 and SDXL: folders
// and single files written from tiny models of the fixtures' configurations
// (tests/data/fixtures/sd21) and `sd::tiny_sdxl_pipeline`, loaded back bitwise, with the
// family's scheduler, and refused with a clear message when incomplete.

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <nlohmann/json.hpp>

#include <scedit/safetensors.hpp>
#include <scedit/state_dict.hpp>
#include <sd/clip_projection.hpp>
#include <sd/ldm_keys_xl.hpp>
#include <sd/pipeline.hpp>
#include <sd/single_file.hpp>
#include <sd/tiny.hpp>

#include "sd_fixtures.hpp"
#include "test_util.hpp"
#include "weights_fixtures.hpp"

#include <filesystem>
#include <fstream>
#include <map>
#include <string>
#include <vector>

namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;
using ::testing::AllOf;
using ::testing::HasSubstr;
using scedit_test::error_of;
using scedit_test::weights::cast;
using scedit_test::weights::Weights;
using scedit_test::weights::write_json;

/// The configuration `name` of tests/data/fixtures/`family`/manifest.json.
const json& family_config(const std::string& family, const std::string& name) {
  static std::map<std::string, json> manifests;
  auto it = manifests.find(family);
  if (it == manifests.end()) {
    std::ifstream in(scedit_test::fixtures_dir() / family / "manifest.json");
    EXPECT_TRUE(in.good()) << "cannot open " << family << "/manifest.json";
    it = manifests.emplace(family, json::parse(in)).first;
  }
  return it->second.at("configs").at(name);
}

/// A tiny SD 2.1 of the fixtures' configurations (sd21/manifest.json) with random weights, the
/// tiny VAE and SD 2.1's scheduler configuration.
sd::StableDiffusion tiny_sd21_pipeline(uint64_t seed) {
  auto pipe = sd::random_pipeline(sd::UNetConfig::from_json(family_config("sd21", "unet_tiny")),
                                  sd::tiny_vae_config(),
                                  sd::CLIPTextConfig::from_json(family_config("sd21", "text_encoder_tiny")),
                                  seed);
  pipe.scheduler_config = family_config("sd21", "scheduler_sd21");
  return pipe;
}

/// `tensors` with transformers' `text_model.` before every key (as a `CLIPTextModel` saves).
scedit::TensorMap with_text_model(const scedit::TensorMap& tensors) {
  scedit::TensorMap out;
  for (const auto& [key, tensor] : tensors) out.emplace("text_model." + key, tensor);
  return out;
}

/// `pipe` as a diffusers folder `root`, laid out as diffusers' `save_pretrained` does:
/// model_index.json, each model's config.json and weights (plus `.fp16` variant files when
/// `fp16_variant`), the tiny tokenizer's files (the second with SDXL's pad token "!" in its
/// tokenizer_config.json) and the scheduler configuration.
fs::path write_pipeline_folder(const sd::StableDiffusion& pipe, const fs::path& root,
                               bool fp16_variant = false) {
  json index = {{"_class_name", pipe.is_sdxl() ? "StableDiffusionXLPipeline" : "StableDiffusionPipeline"},
                {"unet", {"diffusers", "UNet2DConditionModel"}},
                {"vae", {"diffusers", "AutoencoderKL"}},
                {"text_encoder", {"transformers", "CLIPTextModel"}},
                {"tokenizer", {"transformers", "CLIPTokenizer"}},
                {"scheduler", {"diffusers", "DDIMScheduler"}}};
  struct Part {
    std::string folder, stem;
    json config;
    scedit::TensorMap tensors;
  };
  std::vector<Part> parts = {
      {"unet", "diffusion_pytorch_model", pipe.unet_config.to_json(), scedit::state_dict(*pipe.unet)},
      {"vae", "diffusion_pytorch_model", pipe.vae_config.to_json(), scedit::state_dict(*pipe.vae)},
      {"text_encoder", "model", pipe.text_config.to_json(),
       with_text_model(scedit::state_dict(*pipe.text_encoder))}};
  std::vector<std::string> tokenizers = {"tokenizer"};
  if (pipe.is_sdxl()) {
    index["text_encoder_2"] = {"transformers", "CLIPTextModelWithProjection"};
    index["tokenizer_2"] = {"transformers", "CLIPTokenizer"};
    parts.push_back({"text_encoder_2", "model", pipe.text_config_2.to_json(),
                     scedit::state_dict(*pipe.text_encoder_2)});
    tokenizers.push_back("tokenizer_2");
  }
  write_json(root / "model_index.json", index);
  for (const auto& part : parts) {
    write_json(root / part.folder / "config.json", part.config);
    scedit::safetensors::save((root / part.folder / (part.stem + ".safetensors")).string(), part.tensors);
    if (fp16_variant) {
      scedit::safetensors::save((root / part.folder / (part.stem + ".fp16.safetensors")).string(),
                                cast(part.tensors, torch::kFloat16));
    }
  }
  for (const auto& name : tokenizers) {
    fs::create_directories(root / name);
    sd::write_tiny_tokenizer_files(root / name);
  }
  if (pipe.is_sdxl()) write_json(root / "tokenizer_2" / "tokenizer_config.json", {{"pad_token", "!"}});
  write_json(root / "scheduler" / "scheduler_config.json", pipe.scheduler_config);
  return root;
}

/// The configurations of `pipe`'s models, in `single_file.hpp`'s form.
sd::LdmConfigs configs_of(const sd::StableDiffusion& pipe) {
  return {pipe.unet_config, pipe.vae_config, pipe.text_config, pipe.text_config_2};
}

/// `pipe`'s weights as one single-file checkpoint of `family` at `path`, with `extra` tensors.
fs::path write_pipeline_single_file(const sd::StableDiffusion& pipe, sd::LdmFamily family,
                                    const fs::path& path, const scedit::TensorMap& extra = {}) {
  sd::LdmComponents parts;
  parts.unet = scedit::state_dict(*pipe.unet);
  parts.vae = scedit::state_dict(*pipe.vae);
  parts.text_encoder = scedit::state_dict(*pipe.text_encoder);
  if (pipe.is_sdxl()) parts.text_encoder_2 = scedit::state_dict(*pipe.text_encoder_2);
  auto checkpoint = sd::diffusers_to_ldm(parts, sd::ldm_layout(family, configs_of(pipe)));
  for (const auto& [key, tensor] : extra) checkpoint[key] = tensor;
  scedit::safetensors::save(path.string(), checkpoint);
  return path;
}

/// Options that load a single file of `pipe`'s configurations with the tokenizers of `tokenizer`.
sd::WeightsOptions single_file_options_of(const sd::StableDiffusion& pipe, const fs::path& tokenizer) {
  return sd::WeightsOptions()
      .unet_config(pipe.unet_config)
      .vae_config(pipe.vae_config)
      .text_config(pipe.text_config)
      .text_config_2(pipe.text_config_2)
      .tokenizer(tokenizer);
}

/// The models of `pipe` by name.
std::map<std::string, const torch::nn::Module*> models_of(const sd::StableDiffusion& pipe) {
  std::map<std::string, const torch::nn::Module*> out = {
      {"unet", pipe.unet.get()}, {"vae", pipe.vae.get()}, {"text_encoder", pipe.text_encoder.get()}};
  if (pipe.is_sdxl()) out.emplace("text_encoder_2", pipe.text_encoder_2.get());
  return out;
}

/// Every parameter of `loaded` is `original`'s, bitwise (rounded once to float16 and back when
/// `via_float16`).
void expect_same_parameters(const torch::nn::Module& loaded, const torch::nn::Module& original,
                            const std::string& name, bool via_float16 = false) {
  const auto expected = scedit::state_dict(original);
  const auto got = scedit::state_dict(loaded);
  ASSERT_EQ(got.size(), expected.size()) << name;
  for (const auto& [key, tensor] : expected) {
    ASSERT_TRUE(got.count(key)) << name << " " << key;
    const auto want = via_float16 ? tensor.to(torch::kFloat16).to(torch::kFloat32) : tensor;
    EXPECT_TRUE(torch::equal(got.at(key), want)) << name << " " << key;
  }
}

/// `expect_same_parameters` for every model of the two pipelines.
void expect_same_weights(const sd::StableDiffusion& loaded, const sd::StableDiffusion& original,
                         bool via_float16 = false) {
  const auto models = models_of(original);
  const auto loaded_models = models_of(loaded);
  ASSERT_EQ(loaded_models.size(), models.size());
  for (const auto& [name, module] : models) {
    expect_same_parameters(*loaded_models.at(name), *module, name, via_float16);
  }
}

}  // namespace

TEST_F(Weights, Sd21AndSdxlSingleFilesAndFoldersGiveTheSameWeights) {
  const std::vector<std::string> prompts = {"a tiny red house", "x"};
  for (const auto family : {sd::LdmFamily::kSD2, sd::LdmFamily::kSDXL}) {
    SCOPED_TRACE(sd::ldm_family_name(family));
    const bool xl = family == sd::LdmFamily::kSDXL;
    const auto original = xl ? sd::tiny_sdxl_pipeline(3) : tiny_sd21_pipeline(3);
    const std::string name = xl ? "sdxl" : "sd21";
    const auto folder = write_pipeline_folder(original, scratch_.path() / name);
    const auto single = write_pipeline_single_file(original, family, scratch_.path() / (name + ".safetensors"));
    auto from_folder = sd::load_pipeline(folder);
    auto from_file = sd::load_pipeline(single, single_file_options_of(original, folder));
    for (const auto* loaded : {&from_folder, &from_file}) {
      EXPECT_EQ(loaded->is_sdxl(), xl);
      EXPECT_EQ(loaded->unet_config.to_json(), original.unet_config.to_json());
      EXPECT_EQ(loaded->vae_config.to_json(), original.vae_config.to_json());
      EXPECT_EQ(loaded->text_config.to_json(), original.text_config.to_json());
      if (xl) {
        EXPECT_EQ(loaded->text_config_2.to_json(), original.text_config_2.to_json());
      }
      expect_same_weights(*loaded, original);
      // The tokenizers' ids (the second's padding with "!" read from tokenizer_config.json).
      EXPECT_TRUE(torch::equal(sd::tokenize_prompts(*loaded, prompts), sd::tokenize_prompts(original, prompts)));
    }
    // The component loaders read the single file as well.
    const auto options = single_file_options_of(original, folder);
    expect_same_parameters(*sd::load_unet(single, options), *original.unet, "unet");
    expect_same_parameters(*sd::load_vae(single, options), *original.vae, "vae");
    expect_same_parameters(*sd::load_text_encoder(single, options), *original.text_encoder, "text_encoder");
    EXPECT_EQ(from_folder.scheduler_config, original.scheduler_config);
    EXPECT_EQ(from_file.files.at("unet"), single);
    EXPECT_EQ(from_file.files.at("tokenizer"), folder / "tokenizer");
    EXPECT_EQ(from_folder.files.at("text_encoder"), folder / "text_encoder" / "model.safetensors");
    if (xl) {
      EXPECT_EQ(from_folder.files.at("text_encoder_2"), folder / "text_encoder_2" / "model.safetensors");
      EXPECT_EQ(from_folder.files.at("tokenizer_2"), folder / "tokenizer_2");
      EXPECT_EQ(from_file.files.at("text_encoder_2"), single);
      EXPECT_EQ(from_file.files.at("tokenizer_2"), folder / "tokenizer_2");
    } else {
      EXPECT_EQ(from_folder.files.count("text_encoder_2"), 0u);
    }
  }
}

TEST_F(Weights, Fp16VariantOfAnSdxlFolder) {
  const auto original = sd::tiny_sdxl_pipeline(4);
  const auto folder = write_pipeline_folder(original, scratch_.path() / "fp16", /*fp16_variant=*/true);
  auto fp16 = sd::load_pipeline(folder, sd::WeightsOptions().variant("fp16"));
  for (const char* part : {"unet", "vae", "text_encoder", "text_encoder_2"}) {
    EXPECT_NE(fp16.files.at(part).filename().string().find(".fp16.safetensors"), std::string::npos)
        << part;
  }
  const auto weight = scedit::state_dict(*original.text_encoder_2).at("text_projection.weight");
  ASSERT_FALSE(torch::equal(weight.to(torch::kFloat16).to(torch::kFloat32), weight));  // the files differ
  expect_same_weights(fp16, original, /*via_float16=*/true);
  expect_same_weights(sd::load_pipeline(folder), original);
}

TEST_F(Weights, SdxlFolderGivesTheTextConditioningOfItsModels) {
  auto original = sd::tiny_sdxl_pipeline(5);
  auto loaded = sd::load_pipeline(write_pipeline_folder(original, scratch_.path() / "text"));
  const std::vector<std::string> prompts = {"a tiny red house", "two cats on a mat"};
  torch::NoGradGuard no_grad;
  const auto ids_1 = (*original.tokenizer)(prompts);
  const auto ids_2 = (*original.tokenizer_2)(prompts);
  ASSERT_FALSE(torch::equal(ids_1, ids_2));  // the second pads with "!"
  const auto expected =
      sd::sdxl_text_conditioning(*original.text_encoder, *original.text_encoder_2, ids_1, ids_2);
  const auto got = sd::encode_text(loaded, prompts);
  EXPECT_TRUE(torch::equal(got.context, expected.context));
  EXPECT_TRUE(torch::equal(got.pooled, expected.text_embeds));
}

TEST_F(Weights, SingleFilesGetTheirFamilysScheduler) {
  auto sd21 = tiny_sd21_pipeline(6);
  const auto file = write_pipeline_single_file(sd21, sd::LdmFamily::kSD2, scratch_.path() / "sd21.safetensors");
  const auto tokenizer = write_pipeline_folder(sd21, scratch_.path() / "sd21") / "tokenizer";
  auto options = single_file_options_of(sd21, tokenizer);
  // The fixture UNet's sample size is not 96: an SD 2.x-base (512 px), which predicts ε.
  ASSERT_NE(sd21.unet_config.sample_size, 96);
  EXPECT_EQ(sd::load_pipeline(file, options).scheduler_config.at("prediction_type"), "epsilon");
  // 96 (768 px, SD 2.1's own configuration): SD 2.1's scheduler, v.
  auto config = sd21.unet_config;
  config.sample_size = sd::UNetConfig::sd21().sample_size;
  const auto v = sd::load_pipeline(file, options.unet_config(config)).scheduler_config;
  for (const auto& [key, value] : family_config("sd21", "scheduler_sd21").items()) {
    EXPECT_EQ(v.at(key), value) << key;
  }
  auto xl = sd::tiny_sdxl_pipeline(6);
  const auto folder = write_pipeline_folder(xl, scratch_.path() / "sdxl");
  const auto xl_file = write_pipeline_single_file(xl, sd::LdmFamily::kSDXL, scratch_.path() / "sdxl.safetensors");
  EXPECT_EQ(sd::load_pipeline(xl_file, single_file_options_of(xl, folder)).scheduler_config,
            sd::sdxl_scheduler_config());
}

// A diffusers folder without scheduler/ gets its family's, as a single file does: SD 2.x's (OpenCLIP's
// gelu text encoder) predicting v at a sample size of 96, SDXL's, none for SD 1.x (the sampler's).
TEST_F(Weights, FoldersWithoutASchedulerGetTheirFamilysScheduler) {
  auto sd21 = tiny_sd21_pipeline(7);
  sd21.unet_config.sample_size = sd::UNetConfig::sd21().sample_size;
  auto xl = sd::tiny_sdxl_pipeline(7);
  auto sd15 = sd::tiny_pipeline(7);
  const std::vector<std::pair<const sd::StableDiffusion*, nlohmann::json>> cases = {
      {&sd21, sd::default_ldm_scheduler_config(sd::LdmFamily::kSD2, sd21.unet_config)},
      {&xl, sd::sdxl_scheduler_config()},
      {&sd15, nullptr}};
  for (size_t i = 0; i < cases.size(); ++i) {
    const auto folder = write_pipeline_folder(*cases[i].first, scratch_.path() / ("no_scheduler_" + std::to_string(i)));
    fs::remove_all(folder / "scheduler");
    EXPECT_EQ(sd::load_pipeline(folder).scheduler_config, cases[i].second) << i;
  }
  EXPECT_EQ(cases[0].second.at("prediction_type"), "v_prediction");
}

TEST_F(Weights, RefusesIncompleteSdxlFoldersAndFiles) {
  auto xl = sd::tiny_sdxl_pipeline(7);
  const auto folder = write_pipeline_folder(xl, scratch_.path() / "sdxl");
  const auto file = write_pipeline_single_file(xl, sd::LdmFamily::kSDXL, scratch_.path() / "sdxl.safetensors");

  // A single SDXL file with one tokenizer folder only: the second is asked for.
  const auto one_tokenizer = single_file_options_of(xl, folder / "tokenizer");
  EXPECT_THAT(error_of([&] { sd::load_pipeline(file, one_tokenizer); }),
              AllOf(HasSubstr(file.string()), HasSubstr("tokenizer_2")));
  EXPECT_NO_THROW(sd::load_pipeline(file, sd::WeightsOptions(one_tokenizer).tokenizer_2(folder / "tokenizer_2")));

  // A key gone from the file, one under an unknown prefix, a truncated file.
  auto ldm = scedit::safetensors::load(file.string());
  const std::string gone = "conditioner.embedders.1.model.text_projection";
  ASSERT_TRUE(ldm.count(gone));
  ldm.erase(gone);
  const auto broken = scratch_.path() / "broken.safetensors";
  scedit::safetensors::save(broken.string(), ldm);
  EXPECT_THAT(error_of([&] { sd::load_pipeline(broken, single_file_options_of(xl, folder)); }),
              AllOf(HasSubstr(gone), HasSubstr(broken.string())));
  // A fused q/k/v tensor of integers: named with the part it was read for.
  ldm = scedit::safetensors::load(file.string());
  const std::string fused = "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight";
  ldm[fused] = torch::ones(ldm.at(fused).sizes(), torch::kInt64);
  scedit::safetensors::save(broken.string(), ldm);
  EXPECT_THAT(error_of([&] { sd::load_pipeline(broken, single_file_options_of(xl, folder)); }),
              AllOf(HasSubstr(fused + " (its part 'text_model.encoder.layers.0.self_attn."),
                    HasSubstr(broken.string()), HasSubstr("dtype")));
  const auto unknown = scratch_.path() / "unknown.safetensors";
  scedit::safetensors::save(unknown.string(), {{"transformer.blocks.0.weight", torch::ones({2})}});
  EXPECT_THAT(error_of([&] { sd::load_pipeline(unknown, single_file_options_of(xl, folder)); }),
              AllOf(HasSubstr(unknown.string()), HasSubstr("model.diffusion_model.")));
  auto refiner = scedit::TensorMap{{"model.diffusion_model.label_emb.0.0.weight", torch::ones({2, 2})},
                                   {"conditioner.embedders.0.model.ln_final.weight", torch::ones({2})}};
  scedit::safetensors::save(unknown.string(), refiner);
  EXPECT_THAT(error_of([&] { sd::load_pipeline(unknown, single_file_options_of(xl, folder)); }),
              AllOf(HasSubstr(unknown.string()), HasSubstr("refiner")));
  fs::resize_file(file, fs::file_size(file) - 1000);
  EXPECT_THAT(error_of([&] { sd::load_pipeline(file, single_file_options_of(xl, folder)); }),
              HasSubstr(file.string()));

  // A folder whose model_index.json names text_encoder_2 and tokenizer_2 without them.
  fs::remove_all(folder / "tokenizer_2");
  EXPECT_THAT(error_of([&] { sd::load_pipeline(folder); }), HasSubstr((folder / "tokenizer_2").string()));
  fs::remove_all(folder / "text_encoder_2");
  EXPECT_THAT(error_of([&] { sd::load_pipeline(folder); }),
              HasSubstr((folder / "text_encoder_2").string()));
}
