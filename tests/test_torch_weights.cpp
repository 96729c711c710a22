// Stable Diffusion weights from torch.save files (examples/sd/weights.hpp through
// scedit::load_tensor_file): a Lightning-era single-file `.ckpt` and a diffusers folder of `.bin`
// files, written from the tiny fixtures with tests/torch_save_writer.hpp (the layouts of
// Python's torch.save) and with torch::pickle_save, against the same weights as safetensors.

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <nlohmann/json.hpp>

#include <scedit/safetensors.hpp>
#include <scedit/state_dict.hpp>
#include <sd/ldm_keys.hpp>
#include <sd/pipeline.hpp>

#include "test_util.hpp"
#include "torch_save_writer.hpp"

#include <filesystem>
#include <fstream>
#include <string>

namespace {

namespace fs = std::filesystem;
using ::testing::AllOf;
using ::testing::HasSubstr;
using scedit_test::config_json;
using scedit_test::error_of;
using scedit_test::fixture;
using scedit_test::Pickle;
using scedit_test::Records;

class TorchFileWeights : public ::testing::Test {
 protected:
  sd::UNetConfig unet_config_ = sd::UNetConfig::from_json(config_json("unet_tiny"));
  sd::VAEConfig vae_config_ = sd::VAEConfig::from_json(config_json("vae_tiny"));
  sd::CLIPTextConfig text_config_ = sd::CLIPTextConfig::from_json(config_json("clip_text_tiny"));
  scedit_test::TempDir dir_{"torch_weights"};

  /// The tiny models' weights in the original (LDM) single-file keys.
  scedit::TensorMap ldm() const {
    return sd::diffusers_to_ldm(fixture("unet_tiny.safetensors"), fixture("vae_tiny.safetensors"),
                                fixture("clip_text_tiny.safetensors"), unet_config_, vae_config_,
                                text_config_);
  }

  /// Single-file options with the tiny configurations and the test tokenizer.
  sd::WeightsOptions options() const {
    return sd::WeightsOptions()
        .unet_config(unet_config_)
        .vae_config(vae_config_)
        .text_config(text_config_)
        .tokenizer(scedit_test::data_dir() / "clip");
  }
};

void write_json(const fs::path& path, const nlohmann::json& value) {
  fs::create_directories(path.parent_path());
  std::ofstream(path) << value.dump(2);
}

/// `module`'s state dict equals `expected` converted to float32, key for key.
void expect_weights(const torch::nn::Module& module, const scedit::TensorMap& expected) {
  const auto loaded = scedit::state_dict(module);
  ASSERT_EQ(loaded.size(), expected.size());
  for (const auto& [key, tensor] : expected) {
    ASSERT_TRUE(loaded.count(key)) << key;
    EXPECT_TRUE(torch::equal(loaded.at(key), tensor.to(torch::kFloat32))) << key;
  }
}

// A Lightning checkpoint as the original SD releases ship it: `state_dict` holding the LDM keys,
// beside `epoch` and `global_step`.
TEST_F(TorchFileWeights, CkptLoadsLikeTheSafetensorsSingleFile) {
  const auto weights = ldm();
  const auto safetensors = dir_.path() / "tiny.safetensors";
  scedit::safetensors::save(safetensors.string(), weights);
  Pickle p;
  Records records;
  p.proto(2).op('}').op('(').str("epoch").integer(6).str("global_step").integer(840000);
  scedit_test::state_dict(p.str("state_dict"), weights, records).op('u').op('.');
  const auto ckpt = dir_.path() / "tiny.ckpt";
  scedit_test::write_torch_zip(ckpt.string(), p.bytes, records);

  auto a = sd::load_pipeline(safetensors, options());
  auto b = sd::load_pipeline(ckpt, options());
  EXPECT_EQ(b.files.at("unet"), ckpt);
  const auto same = [](const torch::nn::Module& x, const torch::nn::Module& y) {
    const auto sx = scedit::state_dict(x);
    const auto sy = scedit::state_dict(y);
    ASSERT_EQ(sx.size(), sy.size());
    for (const auto& [key, t] : sx) EXPECT_TRUE(torch::equal(t, sy.at(key))) << key;
  };
  same(*a.unet, *b.unet);
  same(*a.vae, *b.vae);
  same(*a.text_encoder, *b.text_encoder);
  expect_weights(*b.unet, fixture("unet_tiny.safetensors"));
  expect_weights(*sd::load_vae(ckpt, options()), fixture("vae_tiny.safetensors"));

  // A key missing from the ckpt is named with the file, as for a safetensors file.
  auto partial = weights;
  const std::string gone = "model.diffusion_model.out.2.weight";
  partial.erase(gone);
  Pickle q;
  Records partial_records;
  scedit_test::state_dict(q.proto(2).op('}').str("state_dict"), partial, partial_records).op('s').op('.');
  const auto broken = dir_.path() / "broken.ckpt";
  scedit_test::write_torch_zip(broken.string(), q.bytes, partial_records);
  EXPECT_THAT(error_of([&] { sd::load_pipeline(broken, options()); }),
              AllOf(HasSubstr(gone), HasSubstr(broken.string())));
}

// A diffusers folder of `.bin` files only (as older models ship): the UNet's and VAE's written by
// torch::pickle_save, the text encoder's (with transformers' `text_model.` prefix) in the
// torch.save state-dict layout.
TEST_F(TorchFileWeights, DiffusersFolderOfBinFilesLoads) {
  const fs::path root = dir_.path() / "pipeline";
  write_json(root / "model_index.json", {{"_class_name", "StableDiffusionPipeline"}});
  write_json(root / "unet" / "config.json", config_json("unet_tiny"));
  write_json(root / "vae" / "config.json", config_json("vae_tiny"));
  write_json(root / "text_encoder" / "config.json", config_json("clip_text_tiny"));
  for (const auto& [source, folder] : {std::pair{"unet_tiny.safetensors", "unet"}, {"vae_tiny.safetensors", "vae"}}) {
    c10::Dict<std::string, torch::Tensor> dict;
    for (const auto& [key, t] : fixture(source)) dict.insert(key, t);
    const auto bytes = torch::pickle_save(dict);
    scedit_test::write_file(root / folder / "diffusion_pytorch_model.bin", std::string(bytes.begin(), bytes.end()));
  }
  scedit::TensorMap text;
  for (const auto& [key, t] : fixture("clip_text_tiny.safetensors")) text.emplace("text_model." + key, t);
  Pickle p;
  Records records;
  scedit_test::state_dict(p.proto(2), text, records).op('.');
  scedit_test::write_torch_zip((root / "text_encoder" / "model.bin").string(), p.bytes, records);
  fs::create_directories(root / "tokenizer");
  for (const char* file : {"vocab.json", "merges.txt"}) {
    fs::copy_file(scedit_test::data_dir() / "clip" / file, root / "tokenizer" / file);
  }

  auto pipe = sd::load_pipeline(root);
  EXPECT_EQ(pipe.files.at("unet").filename(), "diffusion_pytorch_model.bin");
  EXPECT_EQ(pipe.files.at("text_encoder").filename(), "model.bin");
  expect_weights(*pipe.unet, fixture("unet_tiny.safetensors"));
  expect_weights(*pipe.vae, fixture("vae_tiny.safetensors"));
  expect_weights(*pipe.text_encoder, fixture("clip_text_tiny.safetensors"));

  // .safetensors is preferred when both are there; an fp16 .bin when it alone is asked.
  const auto vae = root / "vae";
  EXPECT_EQ(sd::resolve_weights_file(vae, "diffusion_pytorch_model", "", false).filename(),
            "diffusion_pytorch_model.bin");
  fs::copy_file(vae / "diffusion_pytorch_model.bin", vae / "diffusion_pytorch_model.fp16.bin");
  EXPECT_EQ(sd::resolve_weights_file(vae, "diffusion_pytorch_model", "fp16", false).filename(),
            "diffusion_pytorch_model.fp16.bin");
  scedit::safetensors::save((vae / "diffusion_pytorch_model.safetensors").string(), fixture("vae_tiny.safetensors"));
  EXPECT_EQ(sd::resolve_weights_file(vae, "diffusion_pytorch_model", "fp16", false).filename(),
            "diffusion_pytorch_model.safetensors");
  fs::remove(vae / "diffusion_pytorch_model.safetensors");

  // A hostile .bin is refused by name, with its file.
  Pickle hostile;
  hostile.proto(2).op('}').str("x").global("os", "system").str("rm -rf /").op(0x85).op('R').op('s').op('.');
  const auto bin = root / "unet" / "diffusion_pytorch_model.bin";
  scedit_test::write_torch_zip(bin.string(), hostile.bytes, {});
  EXPECT_THAT(error_of([&] { sd::load_pipeline(root); }), AllOf(HasSubstr(bin.string()), HasSubstr("'os.system'")));
}

TEST_F(TorchFileWeights, RefusesOtherFilesByName) {
  const auto text = dir_.path() / "weights.txt";
  std::ofstream(text) << "weights";
  EXPECT_THAT(error_of([&] { sd::load_pipeline(text, options()); }),
              AllOf(HasSubstr(text.string()), HasSubstr("not a weights file")));
  const auto legacy = dir_.path() / "legacy.ckpt";  // torch.save's pre-1.6 format: a bare pickle
  std::ofstream(legacy) << "\x80\x02K\x01.";
  EXPECT_THAT(error_of([&] { sd::load_pipeline(legacy, options()); }),
              AllOf(HasSubstr(legacy.string()), HasSubstr("not supported")));
  EXPECT_THAT(error_of([&] { sd::load_unet(legacy, options()); }),
              AllOf(HasSubstr(legacy.string()), HasSubstr("not supported")));
}

}  // namespace
