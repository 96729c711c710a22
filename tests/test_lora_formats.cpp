// LoRA files as other tools write them, read into the tiny Stable Diffusion (UNet and text
// encoder): every layout gives the weights of the equivalent Kohya file; round trips of the
// multi-model exports; text-encoder LoRA in the prompt embeddings (SDXL's two text encoders
// too, through `sd::lora_targets`); refusals that name the key or the format.
//
// Where the key names come from (each writer below follows one):
//  - Kohya: sd-scripts `networks/lora.py` — `LORA_PREFIX_UNET = "lora_unet"`,
//    `LORA_PREFIX_TEXT_ENCODER = "lora_te"` (`lora_te1` / `lora_te2` for SDXL), the name
//    `prefix + "." + module path` with every '.' replaced by '_'; the text encoder is transformers'
//    CLIPTextModel (`text_model.encoder.layers.N.self_attn.q_proj`); tensors `.lora_down.weight`,
//    `.lora_up.weight`, `.alpha` (a buffer).
//  - Kohya with LDM names: the same, the module named as in the original LDM checkpoint
//    (`input_blocks_1_1_proj_in`), which A1111's and ComfyUI's key maps accept (ComfyUI
//    `comfy/lora.py` `model_lora_keys_unet`: `"lora_unet_" + ldm key with '.' -> '_'`).
//  - ComfyUI generic keys: `comfy/lora.py` maps `"diffusion_model.<ldm path>"` and, for CLIP,
//    `"text_encoders.clip_l.transformer.text_model.<path>"` to the weights; suffixes as Kohya's.
//  - diffusers (current): `lora_base.py` `_save_lora_weights` packs each model's peft state dict
//    under `unet.` / `text_encoder.` (`_pack_dict_with_prefix`) and writes the LoraConfig fields,
//    prefixed the same way, as JSON in the safetensors metadata `lora_adapter_metadata`.
//  - diffusers (lora.down/up, before peft): `unet.<path>.lora.down.weight`; the text encoder's
//    `text_encoder.<path>.lora_linear_layer.down.weight` (`state_dict_utils.py` DIFFUSERS_TO_PEFT).
//  - diffusers (attention processors): `<path>.processor.to_q_lora.down.weight`, `to_out_lora`
//    for `to_out.0` (`state_dict_utils.py` UNET_TO_DIFFUSERS); the text encoder's
//    `self_attn.to_q_lora` for `q_proj` (DIFFUSERS_OLD_TO_PEFT). No alphas: scale 1.
//  - LyCORIS (`hada_w1_a`, `lokr_w1`, `lora_mid`) and DoRA (`dora_scale`): the suffixes ComfyUI's
//    `comfy/lora.py` reads.

#include <sd/lora_targets.hpp>
#include <sd/tiny.hpp>
#include <sd/tuner_files.hpp>

#include <scedit/lora_io.hpp>
#include <scedit/safetensors.hpp>
#include <scedit/tuner_io.hpp>

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <nlohmann/json.hpp>
#include <torch/torch.h>

#include <algorithm>
#include <filesystem>
#include <map>
#include <memory>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "lora_models.hpp"
#include "test_util.hpp"

using ::testing::HasSubstr;
using scedit::LoRAFormat;
using scedit::LoRARole;
using scedit_test::error_of;

namespace {

/// One LoRA module of a test file: the model, our module path, its LDM name, its weights.
struct Module {
  LoRARole role = LoRARole::unet;
  std::string path;  // this repository's module path
  std::string ldm;   // LDM name (UNet only)
  torch::Tensor A, B;
  double alpha = 0;
};

std::string underscored(std::string s) {
  std::replace(s.begin(), s.end(), '.', '_');
  return s;
}

bool ends_with(const std::string& s, const std::string& t) {
  return s.size() >= t.size() && s.compare(s.size() - t.size(), t.size(), t) == 0;
}

/// The effective (LoRA-carrying) weight of the Linear / Conv2d at `path`.
torch::Tensor effective(torch::nn::Module& model, const std::string& path) {
  const auto m = scedit::detail::lora_find_module(model, path);
  if (auto l = std::dynamic_pointer_cast<torch::nn::LinearImpl>(m)) return l->weight.detach();
  return std::dynamic_pointer_cast<torch::nn::Conv2dImpl>(m)->weight.detach();
}

/// Modules of the tiny pipeline with random A and B: UNet ones chosen from the LDM alias table
/// (so each has an LDM name: attention, feed-forward, proj_in, a 3×3 conv, a renamed shortcut),
/// and text-encoder ones. `attention_only`: q and out projections only (the processor layout).
std::vector<Module> make_modules(sd::StableDiffusion& pipe, bool attention_only, bool alpha_is_r) {
  torch::manual_seed(7);
  const auto aliases = sd::unet_lora_aliases(pipe.unet_config);
  std::vector<std::string> unet_suffixes = {"attn1.to_q", "attn2.to_out.0"};
  std::vector<std::string> text_paths = {"encoder.layers.0.self_attn.q_proj",
                                         "encoder.layers.1.self_attn.out_proj"};
  if (!attention_only) {
    unet_suffixes.insert(unet_suffixes.end(), {"ff.net.0.proj", "proj_in", "resnets.0.conv1",
                                               "conv_shortcut"});
    text_paths.push_back("encoder.layers.0.mlp.fc1");
  }
  std::vector<Module> out;
  auto add = [&](LoRARole role, const std::string& path, const std::string& ldm,
                 torch::nn::Module& model) {
    const int64_t r = out.size() % 3 == 2 ? 3 : 4;
    const auto shapes = scedit::detail::lora_module_shapes(scedit::detail::lora_find_module(model, path), r);
    const double alpha = alpha_is_r ? static_cast<double>(r) : 2.0 + static_cast<double>(out.size());
    out.push_back({role, path, ldm, torch::randn(shapes->first) * 0.3,
                   torch::randn(shapes->second) * 0.3, alpha});
  };
  for (const auto& suffix : unet_suffixes) {
    for (const auto& [ldm, path] : aliases) {
      if (ends_with(path, suffix)) {
        add(LoRARole::unet, path, ldm, *pipe.unet);
        break;
      }
    }
  }
  for (const auto& path : text_paths) add(LoRARole::text_encoder, path, "", *pipe.text_encoder);
  return out;
}

enum class Tool { kohya, kohya_ldm, comfyui, diffusers, diffusers_legacy, diffusers_processor };

/// diffusers' attention-processor name of a module path (see the file comment).
std::string processor_name(const Module& m) {
  std::string p = m.path;
  if (m.role == LoRARole::unet) {
    const auto dot = p.rfind(ends_with(p, ".to_out.0") ? ".to_out.0" : ".");
    const std::string last = ends_with(p, ".to_out.0") ? "to_out" : p.substr(dot + 1);
    return p.substr(0, dot) + ".processor." + last + "_lora";
  }
  const std::map<std::string, std::string> names = {{"q_proj", "to_q"}, {"out_proj", "to_out"}};
  const auto dot = p.rfind('.');
  return "text_model." + p.substr(0, dot) + "." + names.at(p.substr(dot + 1)) + "_lora";
}

/// Writes `modules` in the key layout of `tool` to `file`.
void write_as(Tool tool, const std::vector<Module>& modules, const std::string& file) {
  scedit::TensorMap t;
  nlohmann::json metadata = nlohmann::json::object();
  for (const auto& m : modules) {
    const bool unet = m.role == LoRARole::unet;
    const std::string text = "text_model." + m.path;  // transformers' name
    std::string name, down = ".lora_down.weight", up = ".lora_up.weight";
    bool alpha = true;
    switch (tool) {
      case Tool::kohya: name = unet ? "lora_unet_" + underscored(m.path) : "lora_te_" + underscored(text); break;
      case Tool::kohya_ldm: name = unet ? "lora_unet_" + underscored(m.ldm) : "lora_te_" + underscored(text); break;
      case Tool::comfyui:
        name = unet ? "diffusion_model." + m.ldm : "text_encoders.clip_l.transformer." + text;
        break;
      case Tool::diffusers: {
        const std::string head = unet ? "unet" : "text_encoder";
        name = head + "." + (unet ? m.path : text);
        down = ".lora_A.weight", up = ".lora_B.weight", alpha = false;
        if (!metadata.contains(head + ".lora_alpha")) {
          metadata[head + ".r"] = m.A.size(0);
          metadata[head + ".lora_alpha"] = m.alpha;
          metadata[head + ".alpha_pattern"] = nlohmann::json::object();
        } else if (metadata[head + ".lora_alpha"].get<double>() != m.alpha) {
          metadata[head + ".alpha_pattern"][unet ? m.path : text] = m.alpha;
        }
        break;
      }
      case Tool::diffusers_legacy:
        name = unet ? "unet." + m.path : "text_encoder." + text;
        down = unet ? ".lora.down.weight" : ".lora_linear_layer.down.weight";
        up = unet ? ".lora.up.weight" : ".lora_linear_layer.up.weight";
        alpha = false;
        break;
      case Tool::diffusers_processor:
        name = (unet ? "unet." : "text_encoder.") + processor_name(m);
        down = ".down.weight", up = ".up.weight", alpha = false;
        break;
    }
    t[name + down] = m.A;
    t[name + up] = m.B;
    if (alpha) t[name + ".alpha"] = torch::scalar_tensor(m.alpha);
  }
  std::map<std::string, std::string> header = {{"format", "pt"}};
  if (!metadata.empty()) header["lora_adapter_metadata"] = metadata.dump(2);
  scedit::safetensors::save(file, t, header);
}

/// A fresh tiny pipeline (`model`, the tiny SD 1.5 unless given) with a file's LoRA loaded
/// through `sd::lora_targets`.
struct Loaded {
  sd::StableDiffusion pipe;
  std::unique_ptr<scedit::LoRAInjection> unet = std::make_unique<scedit::LoRAInjection>();
  std::unique_ptr<scedit::LoRAInjection> text = std::make_unique<scedit::LoRAInjection>();
  std::unique_ptr<scedit::LoRAInjection> text_2 = std::make_unique<scedit::LoRAInjection>();
  scedit::LoRALoadResult result;
  explicit Loaded(const std::string& file, const scedit::LoRALoadOptions& options = {},
                  sd::StableDiffusion model = sd::tiny_pipeline(0))
      : pipe(std::move(model)) {
    result = scedit::load_lora(file, sd::lora_targets(pipe, *unet, *text, *text_2), options);
  }
  torch::nn::Module& model(LoRARole role) {
    return role == LoRARole::unet ? static_cast<torch::nn::Module&>(*pipe.unet) : *pipe.text_encoder;
  }
};

class LoRAFormats : public ::testing::Test {
 protected:
  scedit_test::TempDir dir_{"lora_formats"};
};

}  // namespace

TEST_F(LoRAFormats, EveryLayoutGivesTheWeightsOfTheKohyaFile) {
  auto base = sd::tiny_pipeline(0);
  struct Case {
    Tool tool;
    const char* name;
    LoRAFormat unet, text;
    bool attention_only, alpha_is_r;
  };
  const std::vector<Case> cases = {
      {Tool::kohya, "kohya", LoRAFormat::kohya, LoRAFormat::kohya, false, false},
      {Tool::kohya_ldm, "kohya_ldm", LoRAFormat::kohya_ldm, LoRAFormat::kohya, false, false},
      {Tool::comfyui, "comfyui", LoRAFormat::comfyui, LoRAFormat::comfyui, false, false},
      {Tool::diffusers, "diffusers", LoRAFormat::diffusers, LoRAFormat::diffusers, false, false},
      {Tool::diffusers_legacy, "legacy", LoRAFormat::diffusers_legacy, LoRAFormat::diffusers_legacy,
       false, true},
      {Tool::diffusers_processor, "processor", LoRAFormat::diffusers_processor,
       LoRAFormat::diffusers_processor, true, true},
  };
  for (const auto& c : cases) {
    SCOPED_TRACE(c.name);
    const auto modules = make_modules(base, c.attention_only, c.alpha_is_r);
    const auto kohya_file = dir_.file(std::string(c.name) + "_reference.safetensors");
    const auto file = dir_.file(std::string(c.name) + ".safetensors");
    write_as(Tool::kohya, modules, kohya_file);
    write_as(c.tool, modules, file);
    Loaded reference(kohya_file), loaded(file);
    ASSERT_NE(loaded.result.role(LoRARole::unet), nullptr);
    ASSERT_NE(loaded.result.role(LoRARole::text_encoder), nullptr);
    EXPECT_EQ(loaded.result.role(LoRARole::unet)->format, c.unet);
    EXPECT_EQ(loaded.result.role(LoRARole::text_encoder)->format, c.text);
    EXPECT_EQ(loaded.result.paths.size(), modules.size());
    EXPECT_TRUE(loaded.result.ignored.empty());
    for (const auto& m : modules) {
      SCOPED_TRACE(m.path);
      const auto want = effective(reference.model(m.role), m.path);
      const auto got = effective(loaded.model(m.role), m.path);
      EXPECT_TRUE(torch::allclose(got, want, 1e-5, 1e-6));
      // The reference itself: W0 + alpha / r · B·A (a conv's A and B as matrices).
      const auto w0 = effective(m.role == LoRARole::unet ? static_cast<torch::nn::Module&>(*base.unet)
                                                         : *base.text_encoder, m.path);
      const auto r = static_cast<double>(m.A.size(0));
      const auto delta = (m.alpha / r) * m.B.flatten(1).matmul(m.A.flatten(1)).reshape(w0.sizes());
      EXPECT_TRUE(torch::allclose(want, w0 + delta, 1e-5, 1e-6));
    }
  }
}

TEST_F(LoRAFormats, TextEncoderLoRAChangesThePromptEmbeddingsAsTheFormulaSays) {
  auto by_hand = sd::tiny_pipeline(0);
  auto modules = make_modules(by_hand, /*attention_only=*/false, /*alpha_is_r=*/false);
  modules.erase(std::remove_if(modules.begin(), modules.end(),
                               [](const Module& m) { return m.role == LoRARole::unet; }),
                modules.end());
  const auto file = dir_.file("te_only.safetensors");
  write_as(Tool::kohya, modules, file);
  const auto before = sd::encode_prompts(by_hand, {"a tiny red house"});
  {
    torch::NoGradGuard no_grad;  // W0 + alpha / r · B·A on q_proj, out_proj, fc1
    for (const auto& m : modules) {
      auto linear = std::dynamic_pointer_cast<torch::nn::LinearImpl>(
          scedit::detail::lora_find_module(*by_hand.text_encoder, m.path));
      linear->weight.add_(m.B.matmul(m.A) * (m.alpha / static_cast<double>(m.A.size(0))));
    }
  }
  Loaded loaded(file);  // a file without UNet keys is fine
  EXPECT_EQ(loaded.result.role(LoRARole::unet), nullptr);
  EXPECT_EQ(loaded.result.describe(), "text_encoder: 3 layers (Kohya)");
  const auto expected = sd::encode_prompts(by_hand, {"a tiny red house"});
  const auto got = sd::encode_prompts(loaded.pipe, {"a tiny red house"});
  EXPECT_GT((expected - before).abs().max().item<double>(), 1e-3);
  EXPECT_TRUE(torch::allclose(got, expected, 1e-4, 1e-5));
}

TEST_F(LoRAFormats, MultiModelExportsRoundTrip) {
  // UNet, text encoder and a second text encoder (SDXL's layout: lora_te1_ / lora_te2_).
  auto make = [] {
    auto pipe = sd::tiny_pipeline(0);
    auto second = std::dynamic_pointer_cast<sd::CLIPTextModelImpl>(pipe.text_encoder->clone());
    return std::make_pair(pipe, second);
  };
  auto made = make();
  auto& pipe = made.first;
  auto& clip2 = made.second;
  torch::manual_seed(3);
  auto unet = scedit::inject_lora(*pipe.unet, scedit::LoRAConfig(scedit::LoRAOptions(4).alpha(8))
                                                  .target_modules({"to_q", "to_out.0", "proj_in"}));
  auto text = scedit::inject_lora(*pipe.text_encoder, scedit::LoRAConfig(scedit::LoRAOptions(2).alpha(3))
                                                          .target_modules({"q_proj", "fc1"}));
  auto text2 = scedit::inject_lora(*clip2, scedit::LoRAConfig(scedit::LoRAOptions(3).alpha(3).use_rslora(true))
                                               .target_modules({"v_proj"}));
  text.inject_at(*pipe.text_encoder, "encoder.layers.1.self_attn.k_proj", scedit::LoRAOptions(5).alpha(1));
  for (auto* layers : {&unet, &text, &text2}) scedit_test::randomize_B(*layers);
  const std::vector<scedit::LoRAPart> parts = {
      {LoRARole::unet, &unet}, {LoRARole::text_encoder, &text}, {LoRARole::text_encoder_2, &text2}};

  auto check = [&](const std::string& file, LoRAFormat format) {
    auto [fresh, fresh2] = make();
    scedit::LoRAInjection u, t, t2;
    const auto result = scedit::load_lora(
        file, {{LoRARole::unet, &u, fresh.unet.get(), {}},
               {LoRARole::text_encoder, &t, fresh.text_encoder.get(), {}},
               {LoRARole::text_encoder_2, &t2, fresh2.get(), {}}});
    EXPECT_EQ(result.format, format);
    ASSERT_EQ(result.roles.size(), 3u);
    EXPECT_EQ(result.roles[2].paths.size(), text2.size());
    for (const auto& [source, target, layers] :
         {std::make_tuple(static_cast<torch::nn::Module*>(pipe.unet.get()),
                          static_cast<torch::nn::Module*>(fresh.unet.get()), &unet),
          std::make_tuple(static_cast<torch::nn::Module*>(pipe.text_encoder.get()),
                          static_cast<torch::nn::Module*>(fresh.text_encoder.get()), &text),
          std::make_tuple(static_cast<torch::nn::Module*>(clip2.get()),
                          static_cast<torch::nn::Module*>(fresh2.get()), &text2)}) {
      for (const auto& path : layers->paths()) {
        EXPECT_TRUE(torch::allclose(effective(*target, path), effective(*source, path), 1e-5, 1e-6))
            << file << " " << path;
      }
    }
  };

  const auto kohya = dir_.file("kohya.safetensors");
  scedit::export_lora_kohya(kohya, parts);
  const auto keys = scedit::safetensors::load(kohya);
  EXPECT_TRUE(keys.count("lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight"));
  EXPECT_TRUE(keys.count("lora_te2_text_model_encoder_layers_1_self_attn_v_proj.alpha"));
  EXPECT_TRUE(keys.count("lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight"));
  check(kohya, LoRAFormat::kohya);

  const auto diffusers = dir_.file("diffusers.safetensors");
  scedit::export_lora_diffusers(diffusers, parts);
  const auto dkeys = scedit::safetensors::load(diffusers);
  EXPECT_TRUE(dkeys.count("text_encoder.text_model.encoder.layers.0.mlp.fc1.lora_A.weight"));
  EXPECT_TRUE(dkeys.count("text_encoder_2.text_model.encoder.layers.0.self_attn.v_proj.lora_B.weight"));
  EXPECT_TRUE(dkeys.count("unet.down_blocks.0.attentions.0.proj_in.lora_A.weight"));
  const auto metadata = nlohmann::json::parse(
      scedit::safetensors::load_metadata(diffusers).at("lora_adapter_metadata"));
  EXPECT_EQ(metadata["unet.r"], 4);
  EXPECT_EQ(metadata["text_encoder.r"], 2);
  EXPECT_EQ(metadata["text_encoder.rank_pattern"]["text_model.encoder.layers.1.self_attn.k_proj"], 5);
  EXPECT_EQ(metadata["text_encoder_2.lora_alpha"], 3);
  check(diffusers, LoRAFormat::diffusers);

  // A single text encoder is Kohya's `lora_te_`; peft's folder holds one model (here the CLIP).
  const auto single = dir_.file("single.safetensors");
  scedit::export_lora_kohya(single, {{LoRARole::unet, &unet}, {LoRARole::text_encoder, &text}});
  EXPECT_TRUE(scedit::safetensors::load(single).count(
      "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight"));
  EXPECT_EQ(Loaded(single).result.describe(), "unet: " + std::to_string(unet.size()) +
                                                  " layers (Kohya); text_encoder: 5 layers (Kohya)");
  // diffusers' save_lora_weights folder.
  const auto folder = dir_.path() / "diffusers_folder";
  std::filesystem::create_directories(folder);
  scedit::export_lora_diffusers((folder / "pytorch_lora_weights.safetensors").string(),
                                {{LoRARole::unet, &unet}, {LoRARole::text_encoder, &text}});
  EXPECT_EQ(sd::detect_tuner_path(folder.string()), scedit::TunerKind::kLoRA);
  EXPECT_EQ(Loaded(folder.string()).result.describe(),
            "unet: " + std::to_string(unet.size()) + " layers (diffusers); text_encoder: 5 layers (diffusers)");
  scedit::save_lora_peft(dir_.file("peft"), text);
  auto [fresh, unused] = make();
  scedit::LoRAInjection t;
  scedit::load_lora_peft(dir_.file("peft"), t, *fresh.text_encoder);
  for (const auto& path : text.paths()) {
    EXPECT_TRUE(torch::allclose(effective(*fresh.text_encoder, path),
                                effective(*pipe.text_encoder, path), 1e-5, 1e-6));
  }
}

TEST(LoRAKeys, ClassifiesEveryLayout) {
  struct Case {
    const char* key;
    scedit::LoRAKey::Part part;
    LoRAFormat format;
    LoRARole role;
    const char* module;
  };
  using P = scedit::LoRAKey::Part;
  const std::vector<Case> cases = {
      {"lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight", P::down, LoRAFormat::kohya, LoRARole::unet, "down_blocks_0_resnets_0_conv1"},
      {"lora_unet_input_blocks_1_0_in_layers_2.alpha", P::alpha, LoRAFormat::kohya_ldm, LoRARole::unet, "input_blocks_1_0_in_layers_2"},
      {"lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_up.weight", P::up, LoRAFormat::kohya, LoRARole::text_encoder_2, "text_model_encoder_layers_0_mlp_fc1"},
      {"unet.mid_block.attentions.0.proj_in.lora_B.weight", P::up, LoRAFormat::diffusers, LoRARole::unet, "mid_block.attentions.0.proj_in"},
      {"text_encoder.text_model.encoder.layers.3.self_attn.to_out_lora.up.weight", P::up, LoRAFormat::diffusers_processor, LoRARole::text_encoder, "text_model.encoder.layers.3.self_attn.out_proj"},
      {"up_blocks.1.attentions.2.transformer_blocks.0.attn2.processor.to_out_lora.down.weight", P::down, LoRAFormat::diffusers_processor, LoRARole::unet, "up_blocks.1.attentions.2.transformer_blocks.0.attn2.to_out.0"},
      {"unet.conv_in.lora.down.weight", P::down, LoRAFormat::diffusers_legacy, LoRARole::unet, "conv_in"},
      {"base_model.model.conv_in.lora_A.weight", P::down, LoRAFormat::peft, LoRARole::unet, "conv_in"},
      {"diffusion_model.output_blocks.2.1.conv.lora_up.weight", P::up, LoRAFormat::comfyui, LoRARole::unet, "output_blocks.2.1.conv"},
      {"text_encoders.clip_l.transformer.text_model.encoder.layers.0.mlp.fc2.alpha", P::alpha, LoRAFormat::comfyui, LoRARole::text_encoder, "text_model.encoder.layers.0.mlp.fc2"},
  };
  for (const auto& c : cases) {
    SCOPED_TRACE(c.key);
    const auto k = scedit::classify_lora_key(c.key);
    EXPECT_EQ(k.part, c.part);
    if (c.part != P::alpha) {  // an alpha does not tell the format
      EXPECT_EQ(k.format, c.format);
    }
    EXPECT_EQ(k.role, c.role);
    EXPECT_EQ(k.module, c.module);
  }
  EXPECT_EQ(scedit::classify_lora_key("lsc_identity.0.tuner_op.ln1.weight").part, P::not_lora);
  EXPECT_EQ(scedit::classify_lora_key("lora_unet_x.hada_w2_b").unsupported, "LyCORIS LoHa (hada_w2_b)");
}

TEST_F(LoRAFormats, UnknownKeysAreRefusedNamingThemOrListedWhenLenient) {
  auto base = sd::tiny_pipeline(0);
  const auto modules = make_modules(base, true, false);
  const auto file = dir_.file("unknown.safetensors");
  write_as(Tool::kohya, modules, file);
  auto tensors = scedit::safetensors::load(file);
  tensors["lora_unet_no_such_module.lora_down.weight"] = torch::randn({2, 8});
  tensors["lora_unet_no_such_module.lora_up.weight"] = torch::randn({8, 2});
  scedit::safetensors::save(file, tensors);
  auto e = error_of([&] { Loaded loaded(file); });
  EXPECT_THAT(e, HasSubstr(file));
  EXPECT_THAT(e, HasSubstr("lora_unet_no_such_module.lora_down.weight"));
  EXPECT_THAT(e, HasSubstr("lenient"));
  Loaded lenient(file, scedit::LoRALoadOptions().lenient(true));
  EXPECT_EQ(lenient.result.ignored,
            (std::vector<std::string>{"lora_unet_no_such_module.lora_down.weight",
                                      "lora_unet_no_such_module.lora_up.weight"}));
  EXPECT_EQ(lenient.result.paths.size(), modules.size());

  // Text-encoder keys with only the UNet given: refused, never dropped in silence.
  scedit::LoRAInjection unet_only;
  auto pipe = sd::tiny_pipeline(0);
  e = error_of([&] { scedit::load_lora(file, unet_only, *pipe.unet); });
  EXPECT_THAT(e, HasSubstr("lora_te_text_model_encoder_layers_"));
  EXPECT_THAT(e, HasSubstr("no text_encoder model was given"));
  EXPECT_TRUE(unet_only.empty());  // nothing changed
  const auto r = scedit::load_lora(file, unet_only, *pipe.unet, scedit::LoRALoadOptions().lenient(true));
  EXPECT_EQ(r.ignored.size(), 2u * 3u + 2u);  // two text modules (down, up, alpha), the unknown one
  EXPECT_EQ(r.paths.size(), 2u);

  // A key of no LoRA layout.
  tensors["sc.0.weight"] = torch::randn({3});
  scedit::safetensors::save(file, tensors);
  EXPECT_THAT(error_of([&] { Loaded loaded(file); }), HasSubstr("'sc.0.weight' is no LoRA key"));
}

TEST_F(LoRAFormats, LyCORISAndDoRAAreRefusedNamingTheFormat) {
  const std::vector<std::pair<std::string, std::string>> cases = {
      {"lora_unet_down_blocks_0_attentions_0_proj_in.hada_w1_a", "LyCORIS LoHa (hada_w1_a) is not supported"},
      {"lora_unet_down_blocks_0_attentions_0_proj_in.lokr_w1", "LyCORIS LoKr (lokr_w1) is not supported"},
      {"lora_unet_down_blocks_0_attentions_0_proj_in.lora_mid.weight", "LyCORIS LoCon with a Tucker core"},
      {"lora_unet_down_blocks_0_attentions_0_proj_in.dora_scale", "DoRA (dora_scale) is not supported"},
  };
  for (const auto& [key, message] : cases) {
    const auto file = dir_.file("refused.safetensors");
    scedit::safetensors::save(
        file, {{"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight", torch::randn({2, 32})},
               {"lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight", torch::randn({32, 2})},
               {key, torch::randn({2, 2})}});
    std::string format;
    EXPECT_EQ(scedit::detect_tuner_file(file, &format), scedit::TunerKind::kLoRA);
    EXPECT_THAT(format, HasSubstr("not supported"));
    const auto e = error_of([&] { Loaded loaded(file); });
    EXPECT_THAT(e, HasSubstr(message));
    EXPECT_THAT(e, HasSubstr(key));
  }
}

TEST_F(LoRAFormats, DetectionReportsTheFormat) {
  auto base = sd::tiny_pipeline(0);
  const auto file = dir_.file("ldm.safetensors");
  write_as(Tool::kohya_ldm, make_modules(base, false, false), file);
  std::string format;
  EXPECT_EQ(scedit::detect_tuner_file(file, &format), scedit::TunerKind::kLoRA);
  EXPECT_EQ(format, "Kohya (LDM names) (unet); Kohya (text_encoder)");
  write_as(Tool::diffusers, make_modules(base, false, false), file);
  EXPECT_EQ(scedit::detect_tuner_file(file, &format), scedit::TunerKind::kLoRA);
  EXPECT_EQ(format, "diffusers (unet, text_encoder)");
}

TEST_F(LoRAFormats, GeneratesTunerFileWithTextEncoderKeysChangesThePromptEmbeddings) {
  auto base = sd::tiny_pipeline(0);
  auto modules = make_modules(base, false, false);
  const auto file = dir_.file("lora_te.safetensors");
  write_as(Tool::kohya_ldm, modules, file);
  const auto plain = sd::encode_prompts(base, {"a cat"});
  for (const double scale : {0.0, 1.0}) {
    auto pipe = sd::tiny_pipeline(0);
    sd::AttachedTuners tuners;
    const auto tuner = sd::attach_tuner_file(pipe, file, scale, tuners);
    EXPECT_EQ(tuner.count, static_cast<int64_t>(modules.size()));
    EXPECT_THAT(tuner.summary, HasSubstr("text_encoder: 3 layers (Kohya)"));
    EXPECT_THAT(tuner.summary, HasSubstr("unet: 6 layers (Kohya (LDM names))"));
    const auto embeddings = sd::encode_prompts(pipe, {"a cat"});
    if (scale == 0) {
      EXPECT_TRUE(torch::equal(embeddings, plain));
    } else {
      EXPECT_GT((embeddings - plain).abs().max().item<double>(), 1e-3);
    }
  }
}

TEST_F(LoRAFormats, SdxlLoRAOnBothTextEncodersLoadsThroughLoraTargets) {
  // A LoRA on the UNet and on both of SDXL's text encoders, exported as Kohya (lora_unet_,
  // lora_te1_, lora_te2_) and diffusers (unet., text_encoder., text_encoder_2.) files.
  auto trained = sd::tiny_sdxl_pipeline(0);
  torch::manual_seed(11);
  auto unet = scedit::inject_lora(*trained.unet, scedit::LoRAConfig(scedit::LoRAOptions(4).alpha(8))
                                                     .target_modules({"to_q", "to_v"}));
  auto text = scedit::inject_lora(*trained.text_encoder, scedit::LoRAConfig(scedit::LoRAOptions(2).alpha(3))
                                                             .target_modules({"q_proj", "fc1"}));
  auto text_2 = scedit::inject_lora(*trained.text_encoder_2, scedit::LoRAConfig(scedit::LoRAOptions(3).alpha(6))
                                                                 .target_modules({"v_proj", "out_proj", "fc2"}));
  for (auto* layers : {&unet, &text, &text_2}) scedit_test::randomize_B(*layers);
  ASSERT_EQ(text_2.paths().front().rfind("text_model.", 0), 0u);  // transformers' own paths
  const std::vector<scedit::LoRAPart> parts = {{LoRARole::unet, &unet},
                                               {LoRARole::text_encoder, &text},
                                               {LoRARole::text_encoder_2, &text_2}};
  const auto kohya = dir_.file("sdxl_kohya.safetensors");
  const auto diffusers = dir_.file("sdxl_diffusers.safetensors");
  scedit::export_lora_kohya(kohya, parts);
  scedit::export_lora_diffusers(diffusers, parts);
  EXPECT_TRUE(scedit::safetensors::load(kohya).count(
      "lora_te2_text_model_encoder_layers_0_self_attn_v_proj.lora_down.weight"));
  EXPECT_TRUE(scedit::safetensors::load(diffusers).count(
      "text_encoder_2.text_model.encoder.layers.0.self_attn.v_proj.lora_A.weight"));

  // By hand: W0 + alpha / r · B·A on every adapted Linear of a fresh pipeline.
  auto by_hand = sd::tiny_sdxl_pipeline(0);
  const std::vector<std::string> prompts = {"a tiny red house", "two cats"};
  const auto before = sd::encode_text(by_hand, prompts);
  {
    torch::NoGradGuard no_grad;
    for (const auto& [layers, model] :
         {std::make_pair(&unet, static_cast<torch::nn::Module*>(by_hand.unet.get())),
          std::make_pair(&text, static_cast<torch::nn::Module*>(by_hand.text_encoder.get())),
          std::make_pair(&text_2, static_cast<torch::nn::Module*>(by_hand.text_encoder_2.get()))}) {
      for (const auto& [path, layer] : layers->entries()) {
        auto linear = std::dynamic_pointer_cast<torch::nn::LinearImpl>(
            scedit::detail::lora_find_module(*model, path));
        ASSERT_TRUE(linear) << path;
        const auto& options = layer->adapter("default").options;
        linear->weight.add_(layer->lora_B_weight("default").matmul(layer->lora_A_weight("default")) *
                            (options.alpha() / static_cast<double>(options.r())));
      }
    }
  }
  const auto expected = sd::encode_text(by_hand, prompts);
  EXPECT_GT((expected.context - before.context).abs().max().item<double>(), 1e-3);
  EXPECT_GT((expected.pooled - before.pooled).abs().max().item<double>(), 1e-3);

  for (const auto& [file, format] : {std::make_pair(kohya, LoRAFormat::kohya),
                                     std::make_pair(diffusers, LoRAFormat::diffusers)}) {
    SCOPED_TRACE(file);
    Loaded loaded(file, {}, sd::tiny_sdxl_pipeline(0));
    ASSERT_EQ(loaded.result.roles.size(), 3u);
    const auto* second = loaded.result.role(LoRARole::text_encoder_2);
    ASSERT_NE(second, nullptr);
    EXPECT_EQ(second->format, format);
    EXPECT_EQ(second->paths.size(), text_2.size());
    EXPECT_EQ(loaded.text_2->size(), text_2.size());
    EXPECT_TRUE(loaded.result.ignored.empty());
    const auto got = sd::encode_text(loaded.pipe, prompts);
    EXPECT_TRUE(torch::allclose(got.context, expected.context, 1e-4, 1e-5));
    EXPECT_TRUE(torch::allclose(got.pooled, expected.pooled, 1e-4, 1e-5));
    for (const auto& path : unet.paths()) {
      EXPECT_TRUE(torch::allclose(effective(*loaded.pipe.unet, path), effective(*by_hand.unet, path),
                                  1e-5, 1e-6)) << path;
    }
  }
}
