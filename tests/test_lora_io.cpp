// LoRA files: peft folders, diffusers and Kohya exports, their round trips and their errors.

#include <scedit/lora.hpp>
#include <scedit/lora_io.hpp>
#include <scedit/safetensors.hpp>

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <nlohmann/json.hpp>
#include <torch/torch.h>

#include <filesystem>
#include <fstream>
#include <set>
#include <string>

#include "lora_models.hpp"
#include "test_util.hpp"

namespace fs = std::filesystem;
using ::testing::HasSubstr;
using scedit_test::error_of;
using scedit_test::max_diff;
using scedit_test::randomize_B;
using scedit_test::registered;
using scedit_test::TinyNet;

namespace {

/// The same model with wrappers, for loading into existing LoRA layers.
struct WrappedImpl : torch::nn::Module {
  WrappedImpl() {
    to_q = register_module(
        "to_q", scedit::LoRALinear(torch::nn::LinearOptions(6, 6), scedit::LoRAOptions(2)));
    conv = register_module("conv", scedit::LoRAConv2d(torch::nn::Conv2dOptions(6, 6, 3).padding(1),
                                                      scedit::LoRAOptions(3).alpha(6)));
  }
  torch::Tensor forward(const torch::Tensor& x) {  // [B, 6, H, W]
    auto h = conv(x).permute({0, 2, 3, 1});        // -> [B, H, W, 6]
    return to_q(h);
  }
  scedit::LoRALinear to_q{nullptr};
  scedit::LoRAConv2d conv{nullptr};
};
TORCH_MODULE(Wrapped);

}  // namespace

class LoRA : public ::testing::Test {
 protected:
  void SetUp() override {
    torch::manual_seed(0);
    x_ = torch::randn({2, 3, 6, 6});
  }
  scedit_test::TempDir dir_{"lora"};
  torch::Tensor x_;  // [2, 3, 6, 6]
};

TEST_F(LoRA, PeftRoundTrip) {
  torch::manual_seed(1);
  TinyNet net;
  torch::manual_seed(1);
  TinyNet fresh;  // same base weights
  scedit::LoRAInjection lora;
  lora.inject(
      *net,
      scedit::LoRAConfig(scedit::LoRAOptions(2).alpha(6)).target_modules({"to_q", "to_k", "conv"}));
  lora.inject_at(*net, "ff.net.0.proj", scedit::LoRAOptions(4).alpha(2));
  randomize_B(lora);
  const auto folder = dir_.file("adapter");
  scedit::save_lora_peft(folder, lora);

  const auto keys = scedit::safetensors::load(folder + "/adapter_model.safetensors");
  EXPECT_TRUE(keys.count("base_model.model.to_q.lora_A.weight"));
  EXPECT_TRUE(keys.count("base_model.model.ff.net.0.proj.lora_B.weight"));
  EXPECT_EQ(keys.size(), 8u);
  std::ifstream in(folder + "/adapter_config.json");
  const auto config = nlohmann::json::parse(in);
  EXPECT_EQ(config["peft_type"], "LORA");
  EXPECT_EQ(config["r"], 2);
  EXPECT_EQ(config["lora_alpha"], 6.0);
  EXPECT_EQ(config["use_rslora"], false);
  EXPECT_EQ(config["rank_pattern"]["ff.net.0.proj"], 4);
  EXPECT_EQ(config["alpha_pattern"]["ff.net.0.proj"], 2.0);
  EXPECT_EQ(config["target_modules"].get<std::set<std::string>>(),
            (std::set<std::string>{"to_q", "to_k", "conv", "ff.net.0.proj"}));

  scedit::LoRAInjection loaded;
  const auto result = scedit::load_lora_peft(folder, loaded, *fresh);
  EXPECT_EQ(result.layout, scedit::LoRALayout::peft);
  EXPECT_EQ(result.created.size(), 4u);
  EXPECT_EQ(loaded.at("ff.net.0.proj").adapter("default").options.alpha(), 2.0);
  EXPECT_LT(max_diff(fresh(x_), net(x_)), 1e-6);

  // Into existing layers (wrappers), detected by load_lora from the folder.
  torch::manual_seed(2);
  Wrapped a;
  torch::manual_seed(2);
  Wrapped b;
  randomize_B(scedit::find_lora_layers(*a));
  scedit::save_lora_peft(dir_.file("wrapped"), scedit::find_lora_layers(*a));
  const auto xw = torch::randn({2, 6, 5, 5});
  EXPECT_GT(max_diff(b(xw), a(xw)), 1e-3);
  const auto r2 = scedit::load_lora(dir_.file("wrapped"), scedit::find_lora_layers(*b));
  EXPECT_TRUE(r2.created.empty());
  EXPECT_LT(max_diff(b(xw), a(xw)), 1e-6);
}

TEST_F(LoRA, DiffusersRoundTrip) {
  torch::manual_seed(1);
  TinyNet net;
  torch::manual_seed(1);
  TinyNet fresh;
  auto lora = scedit::inject_lora(*net, scedit::LoRAConfig(scedit::LoRAOptions(3).alpha(12))
                                            .target_modules({"to_q", "ff.net.0.proj", "conv"}));
  randomize_B(lora);
  const auto file = dir_.file("diffusers.safetensors");
  scedit::export_lora_diffusers(file, lora);
  const auto keys = scedit::safetensors::load(file);
  // diffusers' save_lora_weights layout: lora_A / lora_B under `unet.`, the scale baked into B
  // (lora_alpha = r in the metadata, so readers that ignore it agree).
  EXPECT_TRUE(keys.count("unet.to_q.lora_A.weight"));
  EXPECT_TRUE(keys.count("unet.ff.net.0.proj.lora_B.weight"));
  EXPECT_TRUE(torch::allclose(keys.at("unet.to_q.lora_B.weight"),
                              4.0 * lora.at("to_q").lora_B_weight("default")));
  const auto metadata = nlohmann::json::parse(
      scedit::safetensors::load_metadata(file).at("lora_adapter_metadata"));
  EXPECT_EQ(metadata["unet.r"], 3);
  EXPECT_EQ(metadata["unet.lora_alpha"], 3);

  scedit::LoRAInjection loaded;
  const auto result = scedit::load_lora(file, loaded, *fresh);
  EXPECT_EQ(result.format, scedit::LoRAFormat::diffusers);
  EXPECT_DOUBLE_EQ(loaded.at("to_q").adapter("default").options.scale(), 1.0);
  EXPECT_LT(max_diff(fresh(x_), net(x_)), 1e-5);
}

TEST_F(LoRA, KohyaRoundTrip) {
  torch::manual_seed(1);
  TinyNet net;
  torch::manual_seed(1);
  TinyNet fresh;
  auto lora =
      scedit::inject_lora(*net, scedit::LoRAConfig(scedit::LoRAOptions(4).alpha(3).use_rslora(true))
                                    .target_modules({"to_q", "ff.net.0.proj", "conv"}));
  randomize_B(lora);
  const auto file = dir_.file("kohya.safetensors");
  scedit::export_lora_kohya(file, lora);
  const auto keys = scedit::safetensors::load(file);
  EXPECT_TRUE(keys.count("lora_unet_ff_net_0_proj.lora_down.weight"));
  EXPECT_TRUE(keys.count("lora_unet_conv.lora_up.weight"));
  ASSERT_TRUE(keys.count("lora_unet_to_q.alpha"));
  EXPECT_EQ(keys.at("lora_unet_to_q.alpha").dim(), 0);
  EXPECT_FLOAT_EQ(keys.at("lora_unet_to_q.alpha").item<float>(), 6.0f);  // 3·√4: alpha/r = 3/√4

  scedit::LoRAInjection loaded;
  const auto result = scedit::load_lora(file, loaded, *fresh);
  EXPECT_EQ(result.layout, scedit::LoRALayout::kohya);
  EXPECT_EQ(std::set<std::string>(result.paths.begin(), result.paths.end()),
            (std::set<std::string>{"to_q", "ff.net.0.proj", "conv"}));
  EXPECT_NEAR(loaded.at("ff.net.0.proj").adapter("default").options.scale(), 1.5, 1e-6);
  EXPECT_LT(max_diff(fresh(x_), net(x_)), 1e-5);
}

TEST_F(LoRA, LoadsPrefixedPeftTensorsAlone) {
  // The fixture's layout: `lora.<path>.lora_{A,B}.weight` beside other tuners' keys, no config.
  TinyNet net;
  const auto A = torch::randn({4, 8}), B = torch::randn({8, 4});
  const auto file = dir_.file("mixed.safetensors");
  scedit::safetensors::save(file, {{"lora.to_q.lora_A.weight", A},
                                   {"lora.to_q.lora_B.weight", B},
                                   {"sc.0.weight", torch::randn({3})}});
  scedit::LoRAInjection lora;
  EXPECT_THAT(error_of([&] {
                scedit::load_lora_peft(file, lora, *net, scedit::LoRALoadOptions().prefix("lora"));
              }),
              HasSubstr("adapter_config.json"));
  scedit::load_lora_peft(file, lora, *net, scedit::LoRALoadOptions().prefix("lora").alpha(8));
  EXPECT_TRUE(torch::equal(lora.at("to_q").lora_A_weight("default"), A));
  EXPECT_TRUE(
      torch::allclose(net->to_q->weight, registered(*net->to_q, "weight") + 2.0 * B.matmul(A)));
}

TEST_F(LoRA, ClearErrors) {
  TinyNet net;
  scedit::LoRAInjection lora;
  const auto opts = scedit::LoRALoadOptions().alpha(8);

  const auto unknown = dir_.file("unknown.safetensors");
  scedit::safetensors::save(unknown,
                            {{"base_model.model.nope.lora_A.weight", torch::randn({2, 8})},
                             {"base_model.model.nope.lora_B.weight", torch::randn({8, 2})}});
  auto e = error_of([&] { scedit::load_lora_peft(unknown, lora, *net, opts); });
  EXPECT_THAT(e, HasSubstr(unknown));
  EXPECT_THAT(e, HasSubstr("base_model.model.nope.lora_A.weight"));
  EXPECT_THAT(error_of([&] { scedit::load_lora(unknown, lora, opts); }),
              HasSubstr("not a LoRA layer here"));

  const auto shape = dir_.file("shape.safetensors");
  scedit::safetensors::save(shape, {{"to_q.lora_A.weight", torch::randn({2, 7})},
                                    {"to_q.lora_B.weight", torch::randn({8, 2})}});
  e = error_of([&] { scedit::load_lora(shape, lora, *net, opts); });
  EXPECT_THAT(e, HasSubstr(shape));
  EXPECT_THAT(e, HasSubstr("'to_q.lora_A.weight'"));
  EXPECT_THAT(e, HasSubstr("[2, 7]"));
  EXPECT_THAT(e, HasSubstr("[2, 8]"));
  EXPECT_TRUE(lora.empty());  // nothing injected on error

  // A layer owned by another injection is refused before anything changes.
  const auto other = dir_.file("other.safetensors");
  scedit::safetensors::save(other, {{"to_k.lora_A.weight", torch::randn({2, 8})},
                                    {"to_k.lora_B.weight", torch::randn({8, 2})},
                                    {"to_q.lora_A.weight", torch::randn({2, 8})},
                                    {"to_q.lora_B.weight", torch::randn({8, 2})}});
  auto owner = scedit::inject_lora(*net, scedit::LoRAConfig(2).target_modules({"to_q"}));
  e = error_of([&] { scedit::load_lora(other, lora, *net, opts); });
  EXPECT_THAT(e, HasSubstr("'to_q.lora_A.weight'"));
  EXPECT_THAT(e, HasSubstr("another injection"));
  EXPECT_TRUE(lora.empty());
  owner.unload();

  const auto folder = dir_.path() / "no_config";
  fs::create_directories(folder);
  scedit::safetensors::save(
      (folder / "adapter_model.safetensors").string(),
      {{"to_q.lora_A.weight", torch::randn({2, 8})}, {"to_q.lora_B.weight", torch::randn({8, 2})}});
  EXPECT_THAT(error_of([&] { scedit::load_lora_peft(folder.string(), lora, *net); }),
              HasSubstr((folder / "adapter_config.json").string()));

  const auto half = dir_.file("half.safetensors");
  scedit::safetensors::save(half, {{"lora_unet_to_q.lora_down.weight", torch::randn({2, 8})}});
  e = error_of([&] { scedit::load_lora(half, lora, *net); });
  EXPECT_THAT(e, HasSubstr("lora_unet_to_q.lora_down.weight"));
  EXPECT_THAT(e, HasSubstr("no up/B key"));
}
