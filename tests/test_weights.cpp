// Tests of examples/sd/ldm_keys.hpp and examples/sd/weights.hpp: the LDM <-> diffusers key
// tables over the manifest's key lists, and loading diffusers folders and single-file
// checkpoints written from the tiny fixtures. SD 2.1 and SDXL: test_weights_xl.cpp.

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <nlohmann/json.hpp>

#include <scedit/safetensors.hpp>
#include <scedit/sctuner.hpp>
#include <sd/ldm_keys.hpp>
#include <sd/pipeline.hpp>

#include "sd_fixtures.hpp"
#include "test_util.hpp"
#include "weights_fixtures.hpp"

#include <filesystem>
#include <fstream>
#include <map>
#include <set>
#include <string>

namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;
using ::testing::AllOf;
using ::testing::HasSubstr;
using scedit_test::config_json;
using scedit_test::error_of;
using scedit_test::fixture;
using scedit_test::manifest;
using scedit_test::rel_err;
using scedit_test::shapes_of;
using scedit_test::TempDir;
using scedit_test::weights::cast;
using scedit_test::weights::Weights;
using scedit_test::weights::write_json;

/// Tensors of the listed shapes that take no memory (stride 0): the full-size key lists.
scedit::TensorMap shape_only(const json& keys) {
  scedit::TensorMap out;
  for (const auto& [key, shape] : keys.items()) {
    out.emplace(key, torch::zeros({}).expand(shape.get<std::vector<int64_t>>()));
  }
  return out;
}

/// True for the VAE attention projection weights, which LDM stores as 1×1 convolutions.
bool is_vae_attention_weight(const std::string& key) {
  if (key.find("mid_block.attentions.") == std::string::npos) return false;
  for (const char* name : {".to_q.weight", ".to_k.weight", ".to_v.weight", ".to_out.0.weight"}) {
    const std::string n = name;
    if (key.size() > n.size() && key.compare(key.size() - n.size(), n.size(), n) == 0) return true;
  }
  return false;
}

// ---- key tables ---------------------------------------------------------------------------------

/// Maps the manifest's diffusers key lists (`suffix`: "sd15"/"l14" or "tiny") to LDM and back.
void check_round_trip(const std::string& unet_name, const std::string& vae_name,
                      const std::string& clip_name) {
  const auto unet_config = sd::UNetConfig::from_json(config_json(unet_name));
  const auto vae_config = sd::VAEConfig::from_json(config_json(vae_name));
  const auto text_config = sd::CLIPTextConfig::from_json(config_json(clip_name));
  const auto& unet_keys = manifest().at("keys_" + unet_name);
  const auto& vae_keys = manifest().at("keys_" + vae_name);
  const auto& clip_keys = manifest().at("keys_" + clip_name);

  // Each table is one-to-one and covers exactly the manifest's keys.
  for (const auto& [table, keys] :
       {std::pair{sd::ldm_unet_keys(unet_config), &unet_keys},
        std::pair{sd::ldm_vae_keys(vae_config), &vae_keys},
        std::pair{sd::ldm_clip_keys(text_config), &clip_keys}}) {
    std::set<std::string> ldm, diffusers;
    for (const auto& pair : table) {
      EXPECT_TRUE(ldm.insert(pair.ldm).second) << "duplicate LDM key " << pair.ldm;
      EXPECT_TRUE(diffusers.insert(pair.diffusers).second) << "duplicate key " << pair.diffusers;
    }
    std::set<std::string> expected;
    for (const auto& [key, shape] : keys->items()) expected.insert(key);
    EXPECT_EQ(diffusers, expected);
  }

  const auto unet = shape_only(unet_keys);
  const auto vae = shape_only(vae_keys);
  const auto clip = shape_only(clip_keys);
  const auto ldm = sd::diffusers_to_ldm(unet, vae, clip, unet_config, vae_config, text_config);
  EXPECT_EQ(ldm.size(), unet.size() + vae.size() + clip.size());
  size_t reshaped = 0;
  for (const auto& pair : sd::ldm_vae_keys(vae_config)) {
    const auto& d = vae.at(pair.diffusers);
    const auto& l = ldm.at(pair.ldm);
    if (is_vae_attention_weight(pair.diffusers)) {
      ++reshaped;
      EXPECT_EQ(l.sizes().vec(), (std::vector<int64_t>{d.size(0), d.size(1), 1, 1})) << pair.ldm;
    } else {
      EXPECT_EQ(l.sizes(), d.sizes()) << pair.ldm;
    }
  }
  EXPECT_EQ(reshaped, 8u);  // q, k, v, out of the encoder's and the decoder's mid attention

  const auto back = sd::ldm_to_diffusers(ldm, unet_config, vae_config, text_config);
  EXPECT_EQ(shapes_of(back.unet), shapes_of(unet_keys));
  EXPECT_EQ(shapes_of(back.vae), shapes_of(vae_keys));
  EXPECT_EQ(shapes_of(back.text_encoder), shapes_of(clip_keys));
}

TEST(LdmKeys, FullSizeTablesAreBijections) {
  check_round_trip("unet_sd15", "vae_sd15", "clip_text_l14");
}

TEST(LdmKeys, TinyTablesAreBijections) {
  check_round_trip("unet_tiny", "vae_tiny", "clip_text_tiny");
}

// Names of the SD 1.5 single-file checkpoint (v1-5-pruned-emaonly) and of diffusers'
// conversion (scripts/convert_original_stable_diffusion_to_diffusers.py), written out by hand.
TEST(LdmKeys, MatchesDiffusersConversionOnSD15) {
  const auto unet = sd::ldm_unet_keys(sd::UNetConfig::from_json(config_json("unet_sd15")));
  const auto vae = sd::ldm_vae_keys(sd::VAEConfig::from_json(config_json("vae_sd15")));
  const auto clip = sd::ldm_clip_keys(sd::CLIPTextConfig::from_json(config_json("clip_text_l14")));
  std::map<std::string, std::pair<std::string, sd::KeyTransform>> table;
  for (const auto* list : {&unet, &vae, &clip}) {
    for (const auto& p : *list) table[p.ldm] = {p.diffusers, p.transform};
  }
  const std::string u = "model.diffusion_model.", v = "first_stage_model.",
                    c = "cond_stage_model.transformer.text_model.";
  const std::vector<std::pair<std::string, std::string>> expected = {
      {u + "time_embed.0.weight", "time_embedding.linear_1.weight"},
      {u + "time_embed.2.bias", "time_embedding.linear_2.bias"},
      {u + "input_blocks.0.0.weight", "conv_in.weight"},
      {u + "input_blocks.1.0.in_layers.0.weight", "down_blocks.0.resnets.0.norm1.weight"},
      {u + "input_blocks.1.0.in_layers.2.bias", "down_blocks.0.resnets.0.conv1.bias"},
      {u + "input_blocks.1.0.out_layers.0.bias", "down_blocks.0.resnets.0.norm2.bias"},
      {u + "input_blocks.1.0.out_layers.3.weight", "down_blocks.0.resnets.0.conv2.weight"},
      {u + "input_blocks.1.1.proj_in.weight", "down_blocks.0.attentions.0.proj_in.weight"},
      {u + "input_blocks.2.1.transformer_blocks.0.attn1.to_q.weight",
       "down_blocks.0.attentions.1.transformer_blocks.0.attn1.to_q.weight"},
      {u + "input_blocks.3.0.op.weight", "down_blocks.0.downsamplers.0.conv.weight"},
      {u + "input_blocks.4.0.skip_connection.weight", "down_blocks.1.resnets.0.conv_shortcut.weight"},
      {u + "input_blocks.9.0.op.bias", "down_blocks.2.downsamplers.0.conv.bias"},
      {u + "input_blocks.11.0.emb_layers.1.weight", "down_blocks.3.resnets.1.time_emb_proj.weight"},
      {u + "middle_block.0.in_layers.0.weight", "mid_block.resnets.0.norm1.weight"},
      {u + "middle_block.1.transformer_blocks.0.attn2.to_k.weight",
       "mid_block.attentions.0.transformer_blocks.0.attn2.to_k.weight"},
      {u + "middle_block.2.out_layers.3.bias", "mid_block.resnets.1.conv2.bias"},
      {u + "output_blocks.0.0.skip_connection.weight", "up_blocks.0.resnets.0.conv_shortcut.weight"},
      {u + "output_blocks.2.1.conv.weight", "up_blocks.0.upsamplers.0.conv.weight"},
      {u + "output_blocks.3.1.transformer_blocks.0.ff.net.0.proj.weight",
       "up_blocks.1.attentions.0.transformer_blocks.0.ff.net.0.proj.weight"},
      {u + "output_blocks.5.2.conv.weight", "up_blocks.1.upsamplers.0.conv.weight"},
      {u + "output_blocks.8.2.conv.bias", "up_blocks.2.upsamplers.0.conv.bias"},
      {u + "output_blocks.11.1.proj_out.bias", "up_blocks.3.attentions.2.proj_out.bias"},
      {u + "out.0.weight", "conv_norm_out.weight"},
      {u + "out.2.bias", "conv_out.bias"},
      {v + "encoder.down.0.block.1.conv2.weight", "encoder.down_blocks.0.resnets.1.conv2.weight"},
      {v + "encoder.down.1.block.0.nin_shortcut.weight",
       "encoder.down_blocks.1.resnets.0.conv_shortcut.weight"},
      {v + "encoder.down.2.downsample.conv.bias", "encoder.down_blocks.2.downsamplers.0.conv.bias"},
      {v + "encoder.mid.block_2.norm1.weight", "encoder.mid_block.resnets.1.norm1.weight"},
      {v + "encoder.mid.attn_1.norm.bias", "encoder.mid_block.attentions.0.group_norm.bias"},
      {v + "encoder.norm_out.weight", "encoder.conv_norm_out.weight"},
      {v + "quant_conv.weight", "quant_conv.weight"},
      {v + "post_quant_conv.bias", "post_quant_conv.bias"},
      {v + "decoder.up.3.block.0.conv1.weight", "decoder.up_blocks.0.resnets.0.conv1.weight"},
      {v + "decoder.up.3.upsample.conv.weight", "decoder.up_blocks.0.upsamplers.0.conv.weight"},
      {v + "decoder.up.1.upsample.conv.weight", "decoder.up_blocks.2.upsamplers.0.conv.weight"},
      {v + "decoder.up.0.block.2.norm2.bias", "decoder.up_blocks.3.resnets.2.norm2.bias"},
      {v + "decoder.up.0.block.0.nin_shortcut.bias", "decoder.up_blocks.3.resnets.0.conv_shortcut.bias"},
      {v + "decoder.norm_out.bias", "decoder.conv_norm_out.bias"},
      {c + "embeddings.token_embedding.weight", "embeddings.token_embedding.weight"},
      {c + "encoder.layers.11.mlp.fc2.bias", "encoder.layers.11.mlp.fc2.bias"},
      {c + "encoder.layers.0.self_attn.out_proj.weight", "encoder.layers.0.self_attn.out_proj.weight"},
      {c + "final_layer_norm.weight", "final_layer_norm.weight"},
  };
  for (const auto& [ldm, diffusers] : expected) {
    ASSERT_TRUE(table.count(ldm)) << ldm;
    EXPECT_EQ(table.at(ldm).first, diffusers) << ldm;
    EXPECT_EQ(table.at(ldm).second, sd::KeyTransform::kNone) << ldm;
  }
  for (const char* part : {"encoder", "decoder"}) {
    for (const auto& [ldm, diffusers] : {std::pair{"q", "to_q"}, {"k", "to_k"}, {"v", "to_v"},
                                         {"proj_out", "to_out.0"}}) {
      const std::string key = v + part + ".mid.attn_1." + ldm;
      ASSERT_TRUE(table.count(key + ".weight")) << key;
      EXPECT_EQ(table.at(key + ".weight").first,
                std::string(part) + ".mid_block.attentions.0." + diffusers + ".weight");
      EXPECT_EQ(table.at(key + ".weight").second, sd::KeyTransform::kConv1x1ToLinear);
      EXPECT_EQ(table.at(key + ".bias").second, sd::KeyTransform::kNone);
    }
  }
}

// ---- loading ------------------------------------------------------------------------------------

/// The tiny models as a diffusers folder `name` in `dir`: configs from the manifest, weights from
/// the fixtures (plus `.fp16` variant files when `fp16_variant`), the shared tokenizer files.
fs::path write_diffusers_folder(const TempDir& dir, const std::string& name, bool fp16_variant = false) {
  const fs::path root = dir.path() / name;
  write_json(root / "model_index.json", {{"_class_name", "StableDiffusionPipeline"},
                                         {"unet", {"diffusers", "UNet2DConditionModel"}},
                                         {"vae", {"diffusers", "AutoencoderKL"}},
                                         {"text_encoder", {"transformers", "CLIPTextModel"}},
                                         {"tokenizer", {"transformers", "CLIPTokenizer"}},
                                         {"scheduler", {"diffusers", "DDIMScheduler"}}});
  json vae_config = config_json("vae_tiny");
  vae_config["scaling_factor"] = 0.25;
  write_json(root / "unet" / "config.json", config_json("unet_tiny"));
  write_json(root / "vae" / "config.json", vae_config);
  write_json(root / "text_encoder" / "config.json", config_json("clip_text_tiny"));
  write_json(root / "scheduler" / "scheduler_config.json",
             {{"_class_name", "DDIMScheduler"}, {"num_train_timesteps", 1000}});
  const std::vector<std::tuple<std::string, std::string, std::string>> parts = {
      {"unet_tiny.safetensors", "unet", "diffusion_pytorch_model"},
      {"vae_tiny.safetensors", "vae", "diffusion_pytorch_model"},
      {"clip_text_tiny.safetensors", "text_encoder", "model"}};
  for (const auto& [source, folder, stem] : parts) {
    auto tensors = fixture(source);
    if (folder == "text_encoder") {
      // As transformers writes it: `text_model.` prefixed (older versions add position_ids).
      scedit::TensorMap prefixed;
      for (const auto& [key, tensor] : tensors) prefixed.emplace("text_model." + key, tensor);
      prefixed.emplace("text_model.embeddings.position_ids", torch::arange(77).unsqueeze(0));
      tensors = prefixed;
    }
    scedit::safetensors::save((root / folder / (stem + ".safetensors")).string(), tensors);
    if (fp16_variant) {
      scedit::safetensors::save((root / folder / (stem + ".fp16.safetensors")).string(),
                                cast(tensors, torch::kFloat16));
    }
  }
  fs::create_directories(root / "tokenizer");
  for (const char* file : {"vocab.json", "merges.txt"}) {
    fs::copy_file(scedit_test::data_dir() / "clip" / file, root / "tokenizer" / file,
                  fs::copy_options::overwrite_existing);
  }
  return root;
}

struct TinyConfigs {
  sd::UNetConfig unet = sd::UNetConfig::from_json(config_json("unet_tiny"));
  sd::VAEConfig vae = sd::VAEConfig::from_json(config_json("vae_tiny"));
  sd::CLIPTextConfig text = sd::CLIPTextConfig::from_json(config_json("clip_text_tiny"));
};

/// The same tiny weights as one LDM single-file checkpoint `name` in `dir`.
fs::path write_single_file(const TempDir& dir, const std::string& name, const scedit::TensorMap& extra = {}) {
  const TinyConfigs c;
  auto ldm = sd::diffusers_to_ldm(fixture("unet_tiny.safetensors"), fixture("vae_tiny.safetensors"),
                                  fixture("clip_text_tiny.safetensors"), c.unet, c.vae, c.text);
  for (const auto& [key, tensor] : extra) ldm[key] = tensor;
  const fs::path path = dir.path() / name;
  scedit::safetensors::save(path.string(), ldm);
  return path;
}

sd::WeightsOptions single_file_options() {
  const TinyConfigs c;
  return sd::WeightsOptions()
      .unet_config(c.unet)
      .vae_config(c.vae)
      .text_config(c.text)
      .tokenizer(scedit_test::data_dir() / "clip");
}

/// Every output of the three models on the fixtures' inputs (float32).
struct Outputs {
  torch::Tensor unet, vae_mean, vae_logvar, vae_decoded, clip_hidden, clip_pooled;
};

Outputs run(sd::StableDiffusion& pipe) {
  torch::NoGradGuard no_grad;
  const auto unet_cases = fixture("unet_cases.safetensors");
  const auto other = fixture("other_cases.safetensors");
  Outputs o;
  o.unet = pipe.unet->forward(unet_cases.at("input.sample").to(torch::kFloat32),
                              unet_cases.at("input.timestep"),
                              unet_cases.at("input.encoder_hidden_states").to(torch::kFloat32));
  auto posterior = pipe.vae->encode(other.at("vae.input.image").to(torch::kFloat32));
  o.vae_mean = posterior.mean;
  o.vae_logvar = posterior.logvar;
  o.vae_decoded = pipe.vae->decode(other.at("vae.input.latent").to(torch::kFloat32));
  auto text = pipe.text_encoder->forward(other.at("clip.input.ids"));
  o.clip_hidden = text.last_hidden_state;
  o.clip_pooled = text.pooled;
  return o;
}

TEST_F(Weights, FolderAndSingleFileMatchEachOtherAndTheFixtures) {
  const auto folder = write_diffusers_folder(scratch_, "pipeline");
  const auto single = write_single_file(scratch_, "tiny.safetensors");
  auto a = sd::load_pipeline(folder);
  auto b = sd::load_pipeline(single, single_file_options());

  EXPECT_DOUBLE_EQ(a.vae_config.scaling_factor, 0.25);
  EXPECT_EQ(a.scheduler_config.value("num_train_timesteps", 0), 1000);
  EXPECT_EQ(a.files.at("unet").filename(), "diffusion_pytorch_model.safetensors");
  EXPECT_EQ(b.files.at("vae"), single);
  EXPECT_EQ(a.tokenizer->encode("a photo of an astronaut"), b.tokenizer->encode("a photo of an astronaut"));

  const auto oa = run(a);
  const auto ob = run(b);
  EXPECT_TRUE(torch::equal(oa.unet, ob.unet));
  EXPECT_TRUE(torch::equal(oa.vae_mean, ob.vae_mean));
  EXPECT_TRUE(torch::equal(oa.vae_logvar, ob.vae_logvar));
  EXPECT_TRUE(torch::equal(oa.vae_decoded, ob.vae_decoded));
  EXPECT_TRUE(torch::equal(oa.clip_hidden, ob.clip_hidden));
  EXPECT_TRUE(torch::equal(oa.clip_pooled, ob.clip_pooled));

  const auto unet_cases = fixture("unet_cases.safetensors");
  const auto other = fixture("other_cases.safetensors");
  EXPECT_LE(rel_err(oa.unet, unet_cases.at("output.base")), 1e-4);
  EXPECT_LE(rel_err(oa.vae_mean, other.at("vae.output.mean")), 1e-4);
  EXPECT_LE(rel_err(oa.vae_logvar, other.at("vae.output.logvar")), 1e-4);
  EXPECT_LE(rel_err(oa.vae_decoded, other.at("vae.output.decoded")), 1e-4);
  EXPECT_LE(rel_err(oa.clip_hidden, other.at("clip.output.last_hidden_state")), 1e-4);
  EXPECT_LE(rel_err(oa.clip_pooled, other.at("clip.output.pooler_output")), 1e-4);
}

TEST_F(Weights, ComponentLoadersReadFoldersAndSingleFiles) {
  const auto folder = write_diffusers_folder(scratch_, "components");
  const auto single = write_single_file(scratch_, "components.safetensors");
  const auto options = single_file_options();
  // Parameters equal the fixture tensors converted to float32, whichever layout they came from.
  const auto check = [](const torch::nn::Module& module, const scedit::TensorMap& expected) {
    const auto loaded = scedit::state_dict(module);
    ASSERT_EQ(loaded.size(), expected.size());
    for (const auto& [key, tensor] : expected) {
      ASSERT_TRUE(loaded.count(key)) << key;
      EXPECT_TRUE(torch::equal(loaded.at(key), tensor.to(torch::kFloat32))) << key;
    }
  };
  check(*sd::load_unet(folder / "unet"), fixture("unet_tiny.safetensors"));
  check(*sd::load_unet(single, options), fixture("unet_tiny.safetensors"));
  check(*sd::load_vae(folder), fixture("vae_tiny.safetensors"));
  check(*sd::load_vae(single, options), fixture("vae_tiny.safetensors"));
  check(*sd::load_text_encoder(folder / "text_encoder" / "model.safetensors"),
        fixture("clip_text_tiny.safetensors"));
  check(*sd::load_text_encoder(single, options), fixture("clip_text_tiny.safetensors"));
}

TEST_F(Weights, BaseWeightsLoadUnderAttachedTuners) {
  const auto folder = write_diffusers_folder(scratch_, "tuners");
  auto unet = sd::load_unet(folder);
  auto tuners = scedit::attach_sc_tuners(*unet);
  ASSERT_FALSE(tuners.empty());
  {
    torch::NoGradGuard no_grad;
    for (auto& p : unet->parameters()) p.zero_();  // tuners too: they must stay zero
  }
  sd::load_unet_weights(unet, write_single_file(scratch_, "tuners.safetensors"), single_file_options());
  const auto expected = fixture("unet_tiny.safetensors");
  const auto loaded = scedit::state_dict(*unet);
  for (const auto& [key, tensor] : expected) {
    EXPECT_TRUE(torch::equal(loaded.at(key), tensor.to(torch::kFloat32))) << key;
  }
  for (const auto& p : tuners.front()->named_parameters()) {
    EXPECT_EQ(p.value().abs().sum().item<double>(), 0.0) << p.key();
  }

  // A caller's predicate: module keys it names are neither expected nor written.
  auto partial = expected;
  partial.erase("conv_out.weight");
  partial.erase("conv_out.bias");
  const auto file = scratch_.path() / "partial" / "diffusion_pytorch_model.safetensors";
  fs::create_directories(file.parent_path());
  write_json(file.parent_path() / "config.json", config_json("unet_tiny"));
  scedit::safetensors::save(file.string(), partial);
  EXPECT_THAT(error_of([&] { sd::load_unet_weights(unet, file); }),
              AllOf(HasSubstr("conv_out.weight"), HasSubstr(file.string())));
  const auto skip_conv_out = [](const std::string& key) { return key.rfind("conv_out.", 0) == 0; };
  EXPECT_NO_THROW(sd::load_unet_weights(unet, file, sd::WeightsOptions().skip_module_key(skip_conv_out)));
}

TEST_F(Weights, VariantFileIsPickedWhenAsked) {
  const auto folder = write_diffusers_folder(scratch_, "variant", /*fp16_variant=*/true);
  const auto vae_fixture = fixture("vae_tiny.safetensors").at("encoder.conv_in.weight");
  const auto rounded = vae_fixture.to(torch::kFloat16).to(torch::kFloat32);
  ASSERT_FALSE(torch::equal(rounded, vae_fixture));  // the two files differ in value

  auto fp16 = sd::load_pipeline(folder, sd::WeightsOptions().variant("fp16"));
  for (const char* part : {"unet", "vae", "text_encoder"}) {
    EXPECT_NE(fp16.files.at(part).filename().string().find(".fp16.safetensors"), std::string::npos)
        << part;
  }
  EXPECT_TRUE(torch::equal(scedit::state_dict(*fp16.vae).at("encoder.conv_in.weight"), rounded));

  auto plain = sd::load_pipeline(folder);
  EXPECT_EQ(plain.files.at("vae").filename(), "diffusion_pytorch_model.safetensors");
  EXPECT_TRUE(torch::equal(scedit::state_dict(*plain.vae).at("encoder.conv_in.weight"), vae_fixture));

  // The other file, with a notice, when the asked one is absent.
  const fs::path only_fp16 = scratch_.path() / "only_fp16";
  fs::create_directories(only_fp16);
  fs::copy_file(folder / "vae" / "diffusion_pytorch_model.fp16.safetensors",
                only_fp16 / "diffusion_pytorch_model.fp16.safetensors");
  EXPECT_EQ(sd::resolve_weights_file(only_fp16, "diffusion_pytorch_model", "", false).filename(),
            "diffusion_pytorch_model.fp16.safetensors");
  EXPECT_EQ(sd::resolve_weights_file(folder / "vae", "diffusion_pytorch_model", "", false).filename(),
            "diffusion_pytorch_model.safetensors");
  fs::remove(folder / "vae" / "diffusion_pytorch_model.fp16.safetensors");
  EXPECT_EQ(sd::resolve_weights_file(folder / "vae", "diffusion_pytorch_model", "fp16", false)
                .filename(),
            "diffusion_pytorch_model.safetensors");
}

TEST_F(Weights, LoadsInTheDtypeAsked) {
  const auto folder = write_diffusers_folder(scratch_, "dtypes");
  for (const auto dtype : {torch::kBFloat16, torch::kFloat16}) {
    auto pipe = sd::load_pipeline(folder, sd::WeightsOptions().dtype(dtype));
    for (const torch::nn::Module* module :
         {static_cast<torch::nn::Module*>(pipe.unet.get()),
          static_cast<torch::nn::Module*>(pipe.vae.get()),
          static_cast<torch::nn::Module*>(pipe.text_encoder.get())}) {
      for (const auto& p : module->named_parameters()) {
        EXPECT_EQ(p.value().scalar_type(), dtype) << p.key();
      }
    }
    // Values are the fixture's, rounded once to the dtype.
    const auto expected = fixture("vae_tiny.safetensors").at("decoder.conv_out.weight").to(dtype);
    EXPECT_TRUE(torch::equal(scedit::state_dict(*pipe.vae).at("decoder.conv_out.weight"), expected));
  }
}

TEST_F(Weights, LoadsOntoTheGpu_CUDA) {
  if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA device";
  const auto folder = write_diffusers_folder(scratch_, "cuda");
  auto pipe = sd::load_pipeline(
      folder, sd::WeightsOptions().dtype(torch::kFloat16).device(torch::Device(torch::kCUDA)));
  for (const torch::nn::Module* module :
       {static_cast<torch::nn::Module*>(pipe.unet.get()),
        static_cast<torch::nn::Module*>(pipe.vae.get()),
        static_cast<torch::nn::Module*>(pipe.text_encoder.get())}) {
    for (const auto& p : module->named_parameters()) {
      EXPECT_TRUE(p.value().is_cuda()) << p.key();
      EXPECT_EQ(p.value().scalar_type(), torch::kFloat16) << p.key();
    }
  }
  const auto expected = fixture("vae_tiny.safetensors").at("decoder.conv_out.weight");
  EXPECT_TRUE(torch::equal(scedit::state_dict(*pipe.vae).at("decoder.conv_out.weight").cpu(),
                           expected.to(torch::kFloat16)));

  auto unet = sd::load_unet(write_single_file(scratch_, "cuda.safetensors"),
                            single_file_options().device(torch::Device(torch::kCUDA)));
  const auto loaded = scedit::state_dict(*unet);
  for (const auto& [key, tensor] : fixture("unet_tiny.safetensors")) {
    EXPECT_TRUE(torch::equal(loaded.at(key).cpu(), tensor.to(torch::kFloat32))) << key;
  }
}

TEST_F(Weights, RefusesMissingConfigAndWeights) {
  const auto folder = write_diffusers_folder(scratch_, "missing");
  fs::remove(folder / "unet" / "config.json");
  EXPECT_THAT(error_of([&] { sd::load_pipeline(folder); }),
              AllOf(HasSubstr("config.json"), HasSubstr((folder / "unet").string())));
  EXPECT_THAT(error_of([&] { sd::load_unet(folder / "unet"); }), HasSubstr("config.json"));

  fs::remove(folder / "vae" / "diffusion_pytorch_model.safetensors");
  EXPECT_THAT(error_of([&] { sd::load_vae(folder / "vae"); }),
              AllOf(HasSubstr("missing weights file"), HasSubstr((folder / "vae").string()),
                    HasSubstr("diffusion_pytorch_model.safetensors")));

  // A .bin is read when it is the only weights file; one that is no torch.save zip is refused.
  std::ofstream(folder / "vae" / "diffusion_pytorch_model.bin") << "pickle";
  EXPECT_THAT(error_of([&] { sd::load_vae(folder / "vae"); }),
              AllOf(HasSubstr("diffusion_pytorch_model.bin"), HasSubstr("not supported")));
}

TEST_F(Weights, RefusesMissingUnexpectedAndMisshapenKeys) {
  const auto folder = write_diffusers_folder(scratch_, "keys");
  const auto file = folder / "text_encoder" / "model.safetensors";
  auto tensors = fixture("clip_text_tiny.safetensors");

  auto removed = tensors;
  removed.erase("final_layer_norm.bias");
  scedit::safetensors::save(file.string(), removed);
  EXPECT_THAT(error_of([&] { sd::load_text_encoder(folder); }),
              AllOf(HasSubstr("final_layer_norm.bias"), HasSubstr(file.string())));

  auto extra = tensors;
  extra["encoder.layers.9.mlp.fc1.weight"] = tensors.at("encoder.layers.0.mlp.fc1.weight");
  scedit::safetensors::save(file.string(), extra);
  EXPECT_THAT(error_of([&] { sd::load_text_encoder(folder); }),
              AllOf(HasSubstr("encoder.layers.9.mlp.fc1.weight"), HasSubstr(file.string())));

  auto misshapen = tensors;
  misshapen["encoder.layers.1.mlp.fc1.weight"] = misshapen.at("encoder.layers.1.mlp.fc1.weight").t();
  scedit::safetensors::save(file.string(), misshapen);
  EXPECT_THAT(error_of([&] { sd::load_text_encoder(folder); }),
              AllOf(HasSubstr("encoder.layers.1.mlp.fc1.weight"), HasSubstr(file.string())));

  auto integer = tensors;
  integer["final_layer_norm.weight"] = torch::ones_like(integer.at("final_layer_norm.weight"), torch::kInt64);
  scedit::safetensors::save(file.string(), integer);
  EXPECT_THAT(error_of([&] { sd::load_text_encoder(folder); }),
              AllOf(HasSubstr("final_layer_norm.weight"), HasSubstr(file.string())));

  // Single file: a removed key and a stray one under a model prefix are named with the file;
  // other top-level entries (EMA bookkeeping, schedules) and position_ids are ignored.
  const auto options = single_file_options();
  const auto full = write_single_file(scratch_, "keys_full.safetensors",
                                      {{"alphas_cumprod", torch::ones({10})},
                                       {"cond_stage_model.transformer.text_model.embeddings.position_ids",
                                        torch::arange(77).unsqueeze(0)}});
  EXPECT_NO_THROW(sd::load_pipeline(full, options));
  auto ldm = scedit::safetensors::load(full.string());
  const std::string gone = "model.diffusion_model.output_blocks.5.2.conv.weight";
  ldm.erase(gone);
  const auto broken = scratch_.path() / "keys_broken.safetensors";
  scedit::safetensors::save(broken.string(), ldm);
  EXPECT_THAT(error_of([&] { sd::load_pipeline(broken, options); }),
              AllOf(HasSubstr(gone), HasSubstr(broken.string())));
  EXPECT_THAT(error_of([&] { sd::load_unet(broken, options); }), AllOf(HasSubstr(gone), HasSubstr(broken.string())));

  ldm = scedit::safetensors::load(full.string());
  const std::string bad = "model.diffusion_model.input_blocks.1.0.in_layers.2.weight";
  ldm[bad] = ldm.at(bad).narrow(0, 0, 1).contiguous();  // one output channel only
  scedit::safetensors::save(broken.string(), ldm);
  EXPECT_THAT(error_of([&] { sd::load_pipeline(broken, options); }), AllOf(HasSubstr(bad), HasSubstr(broken.string())));

  ldm = scedit::safetensors::load(full.string());
  ldm["first_stage_model.decoder.up.9.block.0.conv1.weight"] = torch::zeros({1});
  scedit::safetensors::save(broken.string(), ldm);
  EXPECT_THAT(error_of([&] { sd::load_vae(broken, options); }),
              AllOf(HasSubstr("first_stage_model.decoder.up.9.block.0.conv1.weight"), HasSubstr(broken.string())));
}

TEST_F(Weights, AcceptsTextKeysWithoutTextModelSegment) {
  auto ldm = scedit::safetensors::load(write_single_file(scratch_, "with_text_model.safetensors").string());
  const std::string long_prefix = "cond_stage_model.transformer.text_model.";
  scedit::TensorMap old_style;
  for (const auto& [key, tensor] : ldm) {
    const bool text = key.rfind(long_prefix, 0) == 0;
    old_style.emplace(text ? "cond_stage_model.transformer." + key.substr(long_prefix.size()) : key,
                      tensor);
  }
  const TinyConfigs c;
  const auto parts = sd::ldm_to_diffusers(old_style, c.unet, c.vae, c.text);
  const auto expected = fixture("clip_text_tiny.safetensors");
  ASSERT_EQ(parts.text_encoder.size(), expected.size());
  for (const auto& [key, tensor] : expected) {
    EXPECT_TRUE(torch::equal(parts.text_encoder.at(key), tensor)) << key;
  }
}

TEST_F(Weights, RefusesTruncatedFilesPicklesAndMissingTokenizer) {
  const auto folder = write_diffusers_folder(scratch_, "truncated");
  const auto file = folder / "unet" / "diffusion_pytorch_model.safetensors";
  fs::resize_file(file, fs::file_size(file) - 1000);
  EXPECT_THAT(error_of([&] { sd::load_unet(folder); }), HasSubstr(file.string()));
  EXPECT_THAT(error_of([&] { sd::load_pipeline(folder); }), HasSubstr(file.string()));

  const auto ckpt = scratch_.path() / "model.ckpt";  // neither a safetensors file nor a zip
  std::ofstream(ckpt) << "not really a pickle";
  EXPECT_THAT(error_of([&] { sd::load_pipeline(ckpt); }), AllOf(HasSubstr(ckpt.string()), HasSubstr("not supported")));
  EXPECT_THAT(error_of([&] { sd::load_unet(ckpt); }), AllOf(HasSubstr(ckpt.string()), HasSubstr("not supported")));

  const auto single = write_single_file(scratch_, "no_tokenizer.safetensors");
  auto options = single_file_options();
  options.tokenizer(fs::path());
  EXPECT_THAT(error_of([&] { sd::load_pipeline(single, options); }), HasSubstr("tokenizer"));
  options.tokenizer(scratch_.path() / "nowhere");
  EXPECT_THAT(error_of([&] { sd::load_pipeline(single, options); }), HasSubstr("vocab.json"));
}

}  // namespace
