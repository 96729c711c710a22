// Tests of examples/sd/{config,layers,transformer,unet_blocks,unet,vae}.hpp: the SD UNet and VAE
// against the reference fixtures (parity in float32 and float64, key lists, parameter counts),
// their skip sites, configuration parsing, bf16 autocast, clone, and errors on bad input.

#include <gtest/gtest.h>
#include <torch/torch.h>

#include <nlohmann/json.hpp>

#include <scedit/compat.hpp>
#include <scedit/safetensors.hpp>
#include <scedit/sites.hpp>
#include <scedit/state_dict.hpp>
#include <sd/config.hpp>
#include <sd/unet.hpp>
#include <sd/vae.hpp>

#include <common/counting_allocator.hpp>

#include "test_util.hpp"

#include <ATen/CPUGeneratorImpl.h>

#include <chrono>
#include <cstdio>
#include <fstream>
#include <functional>
#include <map>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

namespace {

using json = nlohmann::json;

// ---- fixtures ----------------------------------------------------------------------------------

const json& manifest() {
  static const json m = [] {
    std::ifstream in(scedit_test::fixtures_dir() / "manifest.json");
    EXPECT_TRUE(in.good()) << "cannot open manifest.json in " << scedit_test::fixtures_dir();
    return json::parse(in);
  }();
  return m;
}

const json& config_json(const std::string& name) { return manifest().at("configs").at(name); }

const scedit::TensorMap& fixture(const std::string& file) {
  static std::map<std::string, scedit::TensorMap> cache;
  auto it = cache.find(file);
  if (it == cache.end()) {
    it = cache.emplace(file, scedit::safetensors::load((scedit_test::fixtures_dir() / file).string()))
             .first;
  }
  return it->second;
}

const torch::Tensor& fixture_tensor(const std::string& file, const std::string& key) {
  const auto& tensors = fixture(file);
  auto it = tensors.find(key);
  EXPECT_NE(it, tensors.end()) << key << " not in " << file;
  return it->second;
}

torch::Tensor unet_case(const std::string& key) {
  return fixture_tensor("unet_cases.safetensors", key);
}
torch::Tensor other_case(const std::string& key) {
  return fixture_tensor("other_cases.safetensors", key);
}

using scedit_test::float64_leaf;
using scedit_test::fused_tolerance;
using scedit_test::randomize_affine;
using scedit_test::rel_err;

sd::UNetConfig tiny_unet_config() { return sd::UNetConfig::from_json(config_json("unet_tiny")); }
sd::VAEConfig tiny_vae_config() { return sd::VAEConfig::from_json(config_json("vae_tiny")); }

/// The tiny UNet with the fixture weights, in `dtype`, eval mode.
sd::UNet tiny_unet(torch::ScalarType dtype) {
  sd::UNet unet(tiny_unet_config());
  unet->to(dtype);
  scedit::load_state_dict(*unet, fixture("unet_tiny.safetensors"));
  unet->eval();
  return unet;
}

/// The tiny VAE with the fixture weights, in `dtype`, eval mode.
sd::VAE tiny_vae(torch::ScalarType dtype) {
  sd::VAE vae(tiny_vae_config());
  vae->to(dtype);
  scedit::load_state_dict(*vae, fixture("vae_tiny.safetensors"));
  vae->eval();
  return vae;
}

/// The base case's output of `unet` in `dtype` (inputs cast to it).
torch::Tensor run_base(sd::UNet& unet, torch::ScalarType dtype) {
  torch::NoGradGuard no_grad;
  return unet(unet_case("input.sample").to(dtype), unet_case("input.timestep"),
              unet_case("input.encoder_hidden_states").to(dtype));
}

std::map<std::string, std::vector<int64_t>> shapes_of(const torch::nn::Module& module) {
  std::map<std::string, std::vector<int64_t>> out;
  for (const auto& [key, tensor] : scedit::state_dict(module)) out.emplace(key, tensor.sizes().vec());
  return out;
}

std::map<std::string, std::vector<int64_t>> shapes_of(const json& keys) {
  std::map<std::string, std::vector<int64_t>> out;
  for (const auto& [key, shape] : keys.items()) out.emplace(key, shape.get<std::vector<int64_t>>());
  return out;
}

int64_t parameter_count(const torch::nn::Module& module) {
  int64_t count = 0;
  for (const auto& p : module.parameters()) count += p.numel();
  return count;
}

/// Runs `fn`, expecting a c10::Error whose message contains every one of `parts`.
void expect_error(const std::function<void()>& fn, const std::vector<std::string>& parts) {
  try {
    fn();
    ADD_FAILURE() << "expected an error mentioning '" << parts.at(0) << "'";
  } catch (const c10::Error& e) {
    const std::string message = e.what_without_backtrace();
    for (const auto& part : parts) {
      EXPECT_NE(message.find(part), std::string::npos) << "'" << part << "' not in: " << message;
    }
  }
}

/// A skip editor for probing the sites: records the skips it sees, adds `scale · s` (0 by
/// default, so the output must not change).
struct ProbeEditor : scedit::SkipEditor {
  std::vector<std::vector<int64_t>> shapes;
  bool saw_graph = false;
  torch::Tensor factor;  // optional trainable factor: delta = factor · s
  double value = 0.0;

  torch::Tensor delta(const torch::Tensor& skip) override {
    shapes.push_back(skip.sizes().vec());
    saw_graph = saw_graph || skip.requires_grad() || skip.grad_fn() != nullptr;
    if (factor.defined()) return factor * skip;
    return skip * value;
  }
  double scale() const override { return 1.0; }
  void set_scale(double) override {}
};

class Models : public ::testing::Test {
 protected:
  void SetUp() override { torch::manual_seed(0); }

  /// The base case's output of the float32 tiny UNet on `device`, set up by `configure`, with a
  /// trainable factor 0.1 on each skip, and the gradients of mean(output²) with respect to those
  /// factors (both returned on the CPU).
  static std::pair<torch::Tensor, torch::Tensor> output_and_skip_gradients(
      const std::function<void(sd::UNet&)>& configure, torch::Device device = torch::kCPU) {
    auto unet = tiny_unet(torch::kFloat32);
    unet->to(device);
    for (auto& p : unet->parameters()) p.requires_grad_(false);
    configure(unet);
    std::vector<std::shared_ptr<ProbeEditor>> probes;
    for (auto& site : unet->skip_sites()) {
      probes.push_back(std::make_shared<ProbeEditor>());
      probes.back()->factor = torch::full({}, 0.1, torch::TensorOptions().device(device).requires_grad(true));
      site->attach("probe", probes.back());
    }
    auto out = unet(unet_case("input.sample").to(device, torch::kFloat32), unet_case("input.timestep").to(device),
                    unet_case("input.encoder_hidden_states").to(device, torch::kFloat32));
    out.square().mean().backward();
    std::vector<torch::Tensor> grads;
    for (auto& probe : probes) grads.push_back(probe->factor.grad());
    return {out.detach().cpu(), torch::stack(grads).cpu()};
  }
};

// ---- configuration -----------------------------------------------------------------------------

TEST_F(Models, UNetConfigReadsManifestAndAppliesDiffusersDefaults) {
  const json j = config_json("unet_tiny");
  const auto c = tiny_unet_config();
  EXPECT_EQ(c.block_out_channels, j.at("block_out_channels").get<std::vector<int64_t>>());
  EXPECT_EQ(c.down_block_types, j.at("down_block_types").get<std::vector<std::string>>());
  EXPECT_EQ(c.up_block_types, j.at("up_block_types").get<std::vector<std::string>>());
  EXPECT_EQ(c.cross_attention_dim, j.at("cross_attention_dim").get<int64_t>());
  EXPECT_EQ(c.norm_num_groups, j.at("norm_num_groups").get<int64_t>());
  EXPECT_EQ(c.layers_per_block, j.at("layers_per_block").get<int64_t>());
  // num_attention_heads is null, so attention_head_dim is the number of heads (diffusers quirk).
  ASSERT_FALSE(j.contains("num_attention_heads"));
  for (size_t i = 0; i < c.num_blocks(); ++i) {
    EXPECT_EQ(c.heads(i), j.at("attention_head_dim").get<int64_t>());
  }
  // Keys the manifest leaves out take diffusers' defaults.
  EXPECT_EQ(c.act_fn, "silu");
  EXPECT_DOUBLE_EQ(c.norm_eps, 1e-5);
  EXPECT_TRUE(c.flip_sin_to_cos);
  EXPECT_EQ(c.freq_shift, 0);
  EXPECT_DOUBLE_EQ(c.mid_block_scale_factor, 1.0);
  EXPECT_EQ(c.downsample_padding, 1);
  EXPECT_FALSE(c.use_linear_projection);
  EXPECT_FALSE(c.only_cross_attention);
  EXPECT_FALSE(c.center_input_sample);
  EXPECT_EQ(c.transformer_layers(0), 1);
  EXPECT_EQ(c.time_embed_dim(), 4 * c.block_out_channels[0]);
}

TEST_F(Models, UNetConfigSd15MatchesManifestAndRoundTrips) {
  EXPECT_EQ(sd::UNetConfig::from_json(config_json("unet_sd15")).to_json(),
            sd::UNetConfig::sd15().to_json());
  const auto tiny = tiny_unet_config();
  EXPECT_EQ(sd::UNetConfig::from_json(tiny.to_json()).to_json(), tiny.to_json());
  // SD 2.x style: per-block head counts, linear projections, metadata keys.
  json v2 = config_json("unet_tiny");
  v2["attention_head_dim"] = {1, 2, 4, 4};
  v2["use_linear_projection"] = true;
  v2["upcast_attention"] = true;
  v2["_class_name"] = "UNet2DConditionModel";
  const auto c = sd::UNetConfig::from_json(v2);
  EXPECT_EQ(c.heads(0), 1);
  EXPECT_EQ(c.heads(3), 4);
  EXPECT_EQ(sd::UNetConfig::from_json(c.to_json()).to_json(), c.to_json());
}

TEST_F(Models, UNetConfigRejectsWhatItCannotBuild) {
  auto with = [](const std::string& key, const json& value) {
    json j = config_json("unet_tiny");
    j[key] = value;
    return j;
  };
  expect_error([&] { sd::UNetConfig::from_json(with("class_embed_type", "timestep")); },
               {"class_embed_type", "timestep"});
  expect_error([&] { sd::UNetConfig::from_json(with("addition_embed_type", "text_time")); },
               {"addition_embed_type"});
  expect_error(
      [&] {
        sd::UNetConfig::from_json(with("down_block_types", {"SimpleCrossAttnDownBlock2D",
                                                            "CrossAttnDownBlock2D",
                                                            "CrossAttnDownBlock2D", "DownBlock2D"}));
      },
      {"SimpleCrossAttnDownBlock2D"});
  expect_error([&] { sd::UNetConfig::from_json(with("mid_block_type", "UNetMidBlock2DSimpleCrossAttn")); },
               {"mid_block_type", "UNetMidBlock2DSimpleCrossAttn"});
  expect_error([&] { sd::UNetConfig::from_json(with("act_fn", "gelu")); }, {"act_fn", "gelu"});
  expect_error([&] { sd::UNetConfig::from_json(with("layers_per_block", "two")); },
               {"layers_per_block", "two"});
  expect_error([&] { sd::UNetConfig::from_json(with("new_feature", 3)); }, {"unknown key", "new_feature"});
  expect_error([&] { sd::UNetConfig::from_json(with("attention_head_dim", 7)); },
               {"block_out_channels[0]", "7 attention heads"});
}

TEST_F(Models, VAEConfigReadsManifest) {
  const json j = config_json("vae_tiny");
  const auto c = tiny_vae_config();
  EXPECT_EQ(c.block_out_channels, j.at("block_out_channels").get<std::vector<int64_t>>());
  EXPECT_EQ(c.layers_per_block, j.at("layers_per_block").get<int64_t>());
  EXPECT_EQ(c.latent_channels, j.at("latent_channels").get<int64_t>());
  EXPECT_EQ(c.norm_num_groups, j.at("norm_num_groups").get<int64_t>());
  EXPECT_DOUBLE_EQ(c.scaling_factor, 0.18215);  // diffusers' default (not in the manifest)
  EXPECT_TRUE(c.mid_block_add_attention);
  EXPECT_EQ(sd::VAEConfig::from_json(config_json("vae_sd15")).to_json(),
            sd::VAEConfig::sd15().to_json());
  EXPECT_EQ(sd::VAEConfig::from_json(c.to_json()).to_json(), c.to_json());
  json bad = j;
  bad["latents_mean"] = {0.1, 0.2, 0.3, 0.4};
  expect_error([&] { sd::VAEConfig::from_json(bad); }, {"latents_mean"});
  bad = j;
  bad["up_block_types"][0] = "AttnUpDecoderBlock2D";
  expect_error([&] { sd::VAEConfig::from_json(bad); }, {"AttnUpDecoderBlock2D"});
}

// ---- UNet --------------------------------------------------------------------------------------

TEST_F(Models, UNetTinyKeysAndShapesMatchManifest) {
  sd::UNet unet(tiny_unet_config());
  EXPECT_EQ(shapes_of(*unet), shapes_of(manifest().at("keys_unet_tiny")));
}

/// Sets the default dtype for a scope (restored on exit).
struct DefaultDtypeGuard {
  explicit DefaultDtypeGuard(caffe2::TypeMeta dtype) : previous(torch::get_default_dtype()) {
    torch::set_default_dtype(dtype);
  }
  ~DefaultDtypeGuard() { torch::set_default_dtype(previous); }
  caffe2::TypeMeta previous;
};

TEST_F(Models, UNetSd15KeysShapesAndParameterCount) {
  const auto start = std::chrono::steady_clock::now();
  // Built in bfloat16 (half the memory and page faults of float32): only keys, shapes and
  // counts are checked here.
  DefaultDtypeGuard bf16(caffe2::TypeMeta::Make<at::BFloat16>());
  sd::UNet unet(sd::UNetConfig::from_json(config_json("unet_sd15")));
  EXPECT_EQ(unet->conv_in->weight.scalar_type(), torch::kBFloat16);
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  std::printf("[ info     ] SD 1.5 UNet construction: %.1f s\n", seconds);
  EXPECT_EQ(shapes_of(*unet), shapes_of(manifest().at("keys_unet_sd15")));
  EXPECT_EQ(parameter_count(*unet), manifest().at("params_unet_sd15").get<int64_t>());
  EXPECT_EQ(unet->skip_sites().size(), 12u);
}

TEST_F(Models, UNetMatchesReferenceFloat32) {
  auto unet = tiny_unet(torch::kFloat32);
  const auto out = run_base(unet, torch::kFloat32);
  EXPECT_EQ(out.scalar_type(), torch::kFloat32);
  const double err = rel_err(out, unet_case("output.base"));
  std::printf("[ info     ] UNet float32 rel err %.3g\n", err);
  EXPECT_LE(err, 1e-4);
}

TEST_F(Models, UNetMatchesReferenceFloat64) {
  auto unet = tiny_unet(torch::kFloat64);
  const auto out = run_base(unet, torch::kFloat64);
  const double err = rel_err(out, unet_case("output.base"));
  std::printf("[ info     ] UNet float64 rel err %.3g\n", err);
  // Looser than 1e-9 on purpose: diffusers computes the time embedding in float32, and its libm
  // (MKL / Sleef / CUDA) and the correctly rounded values used here may differ by one float32 ulp
  // in an element, which alone moves the output by ~2e-9. Everything after it is float64 and
  // agrees to ~1e-15 (the VAE, which has no time embedding, shows the same layers at that level).
  EXPECT_LE(err, 5e-9);
}

TEST_F(Models, TimestepEmbeddingIsDiffusersSinusoid) {
  // Independent float64 formula: [cos(t·f_j), sin(t·f_j)] with f_j = 10000^(-j / (half - shift)).
  const auto t = torch::tensor({0.0, 10.0, 999.0}, torch::kFloat64);
  const int64_t dim = 32, half = dim / 2;
  for (double shift : {0.0, 1.0}) {
    const auto emb = sd::functional::timestep_embedding(t, dim, /*flip_sin_to_cos=*/true, shift);
    ASSERT_EQ(emb.sizes(), (torch::IntArrayRef{3, dim}));
    EXPECT_EQ(emb.scalar_type(), torch::kFloat32);
    const auto freqs = torch::exp(-std::log(10000.0) * torch::arange(half, torch::kFloat64) /
                                  (static_cast<double>(half) - shift));
    const auto args = t.unsqueeze(1) * freqs.unsqueeze(0);
    const auto expected = torch::cat({args.cos(), args.sin()}, 1);
    // float32 arguments up to ~1000 rad carry ~6e-5 absolute error.
    EXPECT_LT((emb.to(torch::kFloat64) - expected).abs().max().item<double>(), 2e-4);
  }
  const auto unflipped = sd::functional::timestep_embedding(t, dim, false, 0.0);
  const auto flipped = sd::functional::timestep_embedding(t, dim, true, 0.0);
  EXPECT_TRUE(torch::equal(unflipped.slice(1, 0, half), flipped.slice(1, half)));
  EXPECT_EQ(sd::functional::timestep_embedding(t, 33, true, 0.0).size(1), 33);  // zero-padded
}

TEST_F(Models, UNetSkipSitesAreIdentityInDecoderOrder) {
  auto unet = tiny_unet(torch::kFloat32);
  const auto dims = manifest().at("tiny_skip_dims_encoder_order").get<std::vector<int64_t>>();
  const auto flags = manifest().at("tiny_input_down_flag").get<std::vector<bool>>();
  EXPECT_EQ(unet->skip_channels(), dims);
  EXPECT_EQ(unet->skip_down_flags(), flags);

  // lsc_identity.{i} in decoder order, with the reversed channels; no parameters.
  auto sites = unet->skip_sites();
  ASSERT_EQ(sites.size(), dims.size());
  const auto found = scedit::find_sites(*unet);
  ASSERT_EQ(found.size(), dims.size());
  for (size_t i = 0; i < sites.size(); ++i) {
    EXPECT_EQ(sites[i]->skip_channels(), dims[dims.size() - 1 - i]) << "site " << i;
    EXPECT_EQ(found[i].path, "lsc_identity." + std::to_string(i));
    EXPECT_EQ(found[i].site, static_cast<scedit::SkipEditing*>(sites[i].get()));
    EXPECT_TRUE(sites[i]->parameters().empty());
  }

  // A probe on every site sees the skips in decoder order with the expected shapes; adding
  // zero leaves the output as the reference's.
  const auto sample = unet_case("input.sample").to(torch::kFloat32);
  std::vector<std::shared_ptr<ProbeEditor>> probes;
  for (auto& site : sites) {
    probes.push_back(std::make_shared<ProbeEditor>());
    site->attach("probe", probes.back());
  }
  const auto base = run_base(unet, torch::kFloat32);
  EXPECT_LE(rel_err(base, unet_case("output.base")), 1e-4);
  int64_t halvings = 0;
  std::vector<std::vector<int64_t>> expected(dims.size());
  for (size_t j = 0; j < dims.size(); ++j) {  // encoder order
    halvings += flags[j] ? 1 : 0;
    expected[dims.size() - 1 - j] = {sample.size(0), dims[j], sample.size(2) >> halvings,
                                     sample.size(3) >> halvings};
  }
  for (size_t i = 0; i < probes.size(); ++i) {
    ASSERT_EQ(probes[i]->shapes.size(), 1u) << "site " << i;
    EXPECT_EQ(probes[i]->shapes[0], expected[i]) << "site " << i;
  }

  // The sites are on the path: a non-zero edit at one site changes the output.
  probes[5]->value = 0.1;
  EXPECT_GT(rel_err(run_base(unet, torch::kFloat32), base), 1e-4);
}

TEST_F(Models, UNetEncoderRecordsNoGraphAndGradientsReachOnlyTheTuner) {
  auto unet = tiny_unet(torch::kFloat32);
  for (auto& p : unet->parameters()) p.requires_grad_(false);
  const auto sample = unet_case("input.sample").to(torch::kFloat32);
  const auto context = unet_case("input.encoder_hidden_states").to(torch::kFloat32);
  const auto t = unet_case("input.timestep");
  EXPECT_FALSE(unet(sample, t, context).requires_grad());  // frozen model: no graph at all

  auto probe = std::make_shared<ProbeEditor>();
  probe->factor = torch::zeros({}, torch::requires_grad());
  unet->skip_sites()[0]->attach("probe", probe);
  auto out = unet(sample, t, context);
  ASSERT_TRUE(out.requires_grad());
  EXPECT_FALSE(probe->saw_graph);  // the encoder's skip carries no graph
  out.square().sum().backward();
  ASSERT_TRUE(probe->factor.grad().defined());
  EXPECT_NE(probe->factor.grad().item<float>(), 0.0f);
  for (const auto& p : unet->parameters()) EXPECT_FALSE(p.grad().defined());
}

TEST_F(Models, UNetTimestepBroadcastsScalarsAndFloats) {
  auto unet = tiny_unet(torch::kFloat64);
  torch::NoGradGuard no_grad;
  const auto sample = unet_case("input.sample");
  const auto context = unet_case("input.encoder_hidden_states");
  const int64_t t0 = unet_case("input.timestep")[0].item<int64_t>();
  const auto per_sample = unet(sample, torch::full({sample.size(0)}, t0, torch::kInt64), context);
  EXPECT_TRUE(torch::equal(unet(sample, torch::tensor(t0), context), per_sample));
  EXPECT_TRUE(torch::equal(unet(sample, torch::full({1}, t0, torch::kInt64), context), per_sample));
  EXPECT_TRUE(torch::equal(unet(sample, torch::tensor(static_cast<double>(t0)), context), per_sample));
}

TEST_F(Models, UNetNonSquareLatentKeepsItsShape) {
  auto unet = tiny_unet(torch::kFloat32);
  torch::NoGradGuard no_grad;
  const auto context = unet_case("input.encoder_hidden_states").to(torch::kFloat32);
  const auto sample = torch::randn({2, 4, 16, 24});
  const auto out = unet(sample, unet_case("input.timestep"), context);
  EXPECT_EQ(out.sizes(), sample.sizes());
  EXPECT_TRUE(torch::isfinite(out).all().item<bool>());
}

TEST_F(Models, Transformer2DModelReturnsContiguousNCHW) {
  sd::Transformer2DModel transformer(sd::Transformer2DModelOptions(32, 8, 16).norm_num_groups(8));
  torch::NoGradGuard no_grad;
  const auto x = torch::randn({2, 32, 4, 6});
  const auto out = transformer(x, torch::randn({2, 5, 16}));
  EXPECT_EQ(out.sizes(), x.sizes());
  EXPECT_TRUE(out.is_contiguous());
}

TEST_F(Models, UNetLinearProjectionAndPerBlockHeadsRun) {
  json j = config_json("unet_tiny");
  j["attention_head_dim"] = {1, 2, 4, 4};
  j["use_linear_projection"] = true;
  sd::UNet unet(sd::UNetConfig::from_json(j));
  const auto shapes = shapes_of(*unet);
  const int64_t c0 = unet->config.block_out_channels[0];
  EXPECT_EQ(shapes.at("down_blocks.0.attentions.0.proj_in.weight"), (std::vector<int64_t>{c0, c0}));
  const auto& mid = unet->mid_block->transformers.at(0)->blocks.at(0)->attn1->options;
  EXPECT_EQ(mid.heads(), 4);
  torch::NoGradGuard no_grad;
  const auto sample = torch::randn({1, 4, 16, 16});
  const auto out = unet(sample, torch::tensor(10), torch::randn({1, 5, unet->config.cross_attention_dim}));
  EXPECT_EQ(out.sizes(), sample.sizes());
  EXPECT_TRUE(torch::isfinite(out).all().item<bool>());
}

TEST_F(Models, UNetBFloat16AutocastOnCpuStaysClose) {
  auto unet = tiny_unet(torch::kBFloat16);
  torch::Tensor out;
  {
    scedit::compat::AutocastGuard autocast(torch::kCPU, torch::kBFloat16);
    out = run_base(unet, torch::kFloat32);
  }
  EXPECT_TRUE(torch::isfinite(out).all().item<bool>());
  const double err = rel_err(out, unet_case("output.base"));
  std::printf("[ info     ] UNet bf16 autocast rel err %.3g (dtype %s)\n", err,
              c10::toString(out.scalar_type()));
  EXPECT_LT(err, 5e-2);
}

// ---- lean activations (training-memory levers) --------------------------------------------------

/// Runs `fn` (which builds a graph) and returns the CPU bytes it leaves held: the tensors its
/// autograd graph saved for backward, plus its output.
int64_t bytes_held_after(const std::function<torch::Tensor()>& fn, torch::Tensor& keep) {
  auto& counter = common::CountingCPUAllocator::install();
  const int64_t before = counter.current();
  keep = fn();
  return counter.current() - before;
}

TEST_F(Models, LeanGroupNormSiLUMatchesPlainOpsWithGradients) {
  torch::nn::GroupNorm norm(torch::nn::GroupNormOptions(4, 12).eps(1e-5));
  norm->to(torch::kFloat64);
  {
    torch::NoGradGuard no_grad;
    norm->weight.uniform_(0.5, 1.5);
    norm->bias.uniform_(-0.5, 0.5);
  }
  // NCHW, non-contiguous NCHW and [B, C, L].
  for (auto x0 : {torch::randn({2, 12, 5, 3}, torch::kFloat64),
                  torch::randn({2, 5, 3, 12}, torch::kFloat64).permute({0, 3, 1, 2}),
                  torch::randn({3, 12, 7}, torch::kFloat64)}) {
    const auto grad_out = torch::randn(x0.sizes(), torch::kFloat64);
    auto run = [&](bool lean) {
      auto x = x0.detach().requires_grad_(true);
      for (auto& p : norm->parameters()) p.mutable_grad() = torch::Tensor();
      auto y = lean ? sd::group_norm_silu(x, *norm) : torch::silu(norm(x));
      y.backward(grad_out);
      return std::vector<torch::Tensor>{y.detach(), x.grad(), norm->weight.grad().clone(), norm->bias.grad().clone()};
    };
    const auto plain = run(false), lean = run(true);
    for (size_t i = 0; i < plain.size(); ++i) EXPECT_LE(rel_err(lean[i], plain[i]), 1e-12) << "output " << i;
  }
  expect_error([&] { sd::group_norm_silu(torch::randn({2, 8, 4}), *norm); }, {"[2, 8, 4]", "12 channels"});
  // Without affine parameters.
  torch::nn::GroupNorm bare(torch::nn::GroupNormOptions(4, 12).affine(false));
  const auto x = torch::randn({2, 12, 3});
  EXPECT_LE(rel_err(sd::group_norm_silu(x, *bare), torch::silu(bare(x))), 1e-6);
}

TEST_F(Models, LeanGEGLUMatchesPlainOpsWithGradients) {
  const auto projected0 = torch::randn({2, 5, 16}, torch::kFloat64);
  const auto grad_out = torch::randn({2, 5, 8}, torch::kFloat64);
  auto run = [&](bool lean) {
    auto projected = projected0.detach().requires_grad_(true);
    auto parts = projected.chunk(2, -1);
    auto y = lean ? sd::geglu(projected) : parts[0] * torch::gelu(parts[1]);
    y.backward(grad_out);
    return std::vector<torch::Tensor>{y.detach(), projected.grad()};
  };
  const auto plain = run(false), lean = run(true);
  EXPECT_LE(rel_err(lean[0], plain[0]), 1e-14);
  EXPECT_LE(rel_err(lean[1], plain[1]), 1e-14);
  expect_error([] { sd::geglu(torch::randn({2, 5})); }, {"[2, 5]", "even"});
}

TEST_F(Models, LinearFoldsTheBiasAndMatchesTorchLinear) {
  // sd::linear against torch::nn::Linear's forward, float64, outputs and input gradients, through
  // an in-place residual add (which a view output would turn into an extra copy in backward).
  for (const bool bias : {true, false}) {
    torch::nn::Linear layer(torch::nn::LinearOptions(7, 5).bias(bias));
    layer->to(torch::kFloat64);
    for (auto x0 : {torch::randn({2, 3, 7}, torch::kFloat64), torch::randn({6, 7}, torch::kFloat64),
                    torch::randn({3, 7, 2}, torch::kFloat64).transpose(1, 2)}) {
      auto run = [&](bool folded) {
        auto x = x0.detach().requires_grad_(true);
        auto out = folded ? sd::linear(layer, x) : layer(x);
        EXPECT_FALSE(out.is_view()) << "bias " << bias << ", input " << x0.sizes();
        auto residual = torch::ones_like(out);
        out.add_(residual);
        out.square().sum().backward();
        return std::make_pair(out.detach(), x.grad());
      };
      const auto [folded_out, folded_grad] = run(true);
      const auto [plain_out, plain_grad] = run(false);
      EXPECT_LE(rel_err(folded_out, plain_out), 1e-12);
      EXPECT_LE(rel_err(folded_grad, plain_grad), 1e-12);
    }
  }
}

TEST_F(Models, LeanActivationsKeepLessForBackward) {
  // A resnet block: the plain ops keep both normalised tensors (SiLU's inputs) besides what the
  // lean ones keep, so the lean graph holds at least two activation-sized tensors less.
  sd::ResnetBlock2D resnet(sd::ResnetBlock2DOptions(32, 32).groups(8).eps(1e-5));
  const auto x = torch::randn({2, 32, 8, 8}, torch::requires_grad());
  const int64_t activation = x.numel() * 4;
  torch::Tensor kept;
  const int64_t plain = bytes_held_after([&] { return resnet(x); }, kept);
  kept = torch::Tensor();
  resnet->lean.group_norm_silu = true;
  const int64_t lean = bytes_held_after([&] { return resnet(x); }, kept);
  std::printf("[ info     ] resnet graph holds %lld bytes plain, %lld lean\n",
              static_cast<long long>(plain), static_cast<long long>(lean));
  EXPECT_GE(plain - lean, 2 * activation);

  // GEGLU: the plain ops also keep GELU(gate).
  sd::GEGLU geglu(sd::GEGLUOptions(16, 64));
  const auto tokens = torch::randn({2, 10, 16}, torch::requires_grad());
  kept = torch::Tensor();
  const int64_t plain_geglu = bytes_held_after([&] { return geglu(tokens); }, kept);
  kept = torch::Tensor();
  geglu->lean.geglu = true;
  const int64_t lean_geglu = bytes_held_after([&] { return geglu(tokens); }, kept);
  EXPECT_GE(plain_geglu - lean_geglu, 2 * 10 * 64 * 4);

  // A transformer block whose feed-forward is recomputed keeps neither the [tokens, 8·dim]
  // projection nor the [tokens, 4·dim] GEGLU output that the next Linear saves.
  const int64_t dim = 16, n_tokens = 2 * 10;
  sd::BasicTransformerBlock block(sd::BasicTransformerBlockOptions(dim, 2, 8, 12));
  const auto context = torch::randn({2, 3, 12});
  const auto block_in = torch::randn({2, 10, dim}, torch::requires_grad());
  kept = torch::Tensor();
  const int64_t plain_block = bytes_held_after([&] { return block(block_in, context); }, kept);
  kept = torch::Tensor();
  block->lean.recompute_feed_forward = true;
  const int64_t lean_block = bytes_held_after([&] { return block(block_in, context); }, kept);
  std::printf("[ info     ] transformer block graph holds %lld bytes plain, %lld with ff-recompute\n",
              static_cast<long long>(plain_block), static_cast<long long>(lean_block));
  EXPECT_GE(plain_block - lean_block, (8 + 4) * dim * n_tokens * 4);
}

TEST_F(Models, AttentionGradientsMatchTheTextbookAndKeepNoProbabilities) {
  const int64_t b = 2, heads = 3, d = 4;
  // Both 1.13 paths: small probabilities are kept (autograd's textbook backward), large ones
  // (896 × 640 per head, 27 MB in float64, over kRecomputeAttentionAbove) are recomputed.
  for (const auto& [lq, lk] : {std::make_pair(int64_t{7}, int64_t{5}), std::make_pair(int64_t{896}, int64_t{640})}) {
    auto textbook = [&, lq = lq, lk = lk](const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                                          const torch::Tensor& mask, bool causal) {
      auto scores = torch::matmul(q, k.transpose(-2, -1)) / std::sqrt(static_cast<double>(d));
      if (causal) scores = scores.masked_fill(torch::ones({lq, lk}, torch::kBool).triu(1), -INFINITY);
      if (mask.defined()) scores = scores + mask;
      return torch::matmul(scores.softmax(-1), v);
    };
    const auto mask = torch::randn({1, 1, lq, lk}, torch::kFloat64);
    for (const auto& [use_mask, causal, k_grad] : {std::make_tuple(false, false, true),
                                                   std::make_tuple(true, false, true),
                                                   std::make_tuple(false, true, true),
                                                   std::make_tuple(false, false, false)}) {
      const auto q0 = torch::randn({b, heads, lq, d}, torch::kFloat64);
      const auto k0 = torch::randn({b, heads, lk, d}, torch::kFloat64);
      const auto v0 = torch::randn({b, heads, lk, d}, torch::kFloat64);
      const auto grad_out = torch::randn({b, heads, lq, d}, torch::kFloat64);
      auto run = [&, use_mask = use_mask, causal = causal, k_grad = k_grad](bool reference) {
        auto q = q0.clone().requires_grad_(true), k = k0.clone().requires_grad_(k_grad),
             v = v0.clone().requires_grad_(k_grad);
        const auto m = use_mask ? mask : torch::Tensor();
        auto out = reference ? textbook(q, k, v, m, causal)
                             : scedit::compat::scaled_dot_product_attention(q, k, v, m, causal);
        out.backward(grad_out);
        return std::vector<torch::Tensor>{out.detach(), q.grad(), k_grad ? k.grad() : q.grad(),
                                          k_grad ? v.grad() : q.grad()};
      };
      const auto expected = run(true), got = run(false);
      for (size_t i = 0; i < expected.size(); ++i) {
        EXPECT_LE(rel_err(got[i], expected[i]), 1e-12)
            << lq << "x" << lk << " mask " << use_mask << " causal " << causal << " output " << i;
      }
    }
  }
#if !SCEDIT_TORCH_2
  // LibTorch 1.13: a large attention's graph keeps q, k, v and the output, not its probabilities.
  const int64_t length = 1024;  // 2 · 3 · 1024² float32 probabilities = 24 MiB
  const auto q = torch::randn({b, heads, length, d}, torch::requires_grad());
  const auto k = torch::randn({b, heads, length, d}, torch::requires_grad());
  torch::Tensor kept;
  const int64_t held = bytes_held_after([&] { return scedit::compat::scaled_dot_product_attention(q, k, k); }, kept);
  EXPECT_LT(held, b * heads * length * length * 4 / 100);
#endif
}

TEST_F(Models, UNetLeanActivationsMatchReferenceAndPlainGradients) {
  sd::LeanActivations all;
  all.group_norm_silu = all.geglu = all.norms_in_activation_dtype = all.recompute_feed_forward = true;
  const auto [plain_out, plain_grads] = output_and_skip_gradients([](sd::UNet&) {});
  const auto [lean_out, lean_grads] = output_and_skip_gradients([&](sd::UNet& unet) { unet->set_lean_activations(all); });
  EXPECT_LE(rel_err(lean_out, plain_out), 1e-6);
  EXPECT_LE(rel_err(lean_grads, plain_grads), 1e-5);
  // With the probes at zero scale the output is the reference's.
  auto unet = tiny_unet(torch::kFloat32);
  unet->set_lean_activations(all);
  EXPECT_LE(rel_err(run_base(unet, torch::kFloat32), unet_case("output.base")), 1e-4);
}

TEST_F(Models, UNetChannelsLastMatchesPlainAndTheReference) {
  // Channels-last changes the layout only: the output and the skip gradients are the plain
  // layout's (to the convolution algorithms' float32 rounding), and the fixture parity holds.
  const auto [plain_out, plain_grads] = output_and_skip_gradients([](sd::UNet&) {});
  const auto [nhwc_out, nhwc_grads] = output_and_skip_gradients([](sd::UNet& unet) {
    unet->set_channels_last(true);
    EXPECT_TRUE(unet->conv_in->weight.is_contiguous(torch::MemoryFormat::ChannelsLast));
  });
  EXPECT_LE(rel_err(nhwc_out.contiguous(), plain_out), 1e-5);
  EXPECT_LE(rel_err(nhwc_grads, plain_grads), 1e-4);
  auto unet = tiny_unet(torch::kFloat32);
  unet->set_channels_last(true);
  EXPECT_LE(rel_err(run_base(unet, torch::kFloat32), unet_case("output.base")), 1e-4);
  unet->set_channels_last(false);
  EXPECT_TRUE(unet->conv_in->weight.is_contiguous());
}

TEST_F(Models, UNetLeanActivationsAndChannelsLastMatchPlainOnTheGpu_CUDA) {
  // The levers the GPU benchmark turns on, checked where their CUDA kernels run: float32 (TF32
  // off), the plain UNet against the reference, then every lever against the plain UNet.
  if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA device";
  at::globalContext().setAllowTF32CuBLAS(false);
  at::globalContext().setAllowTF32CuDNN(false);
  const torch::Device gpu(torch::kCUDA, 0);
  sd::LeanActivations all;
  all.group_norm_silu = all.geglu = all.norms_in_activation_dtype = all.recompute_feed_forward = true;
  const auto [plain_out, plain_grads] = output_and_skip_gradients([](sd::UNet&) {}, gpu);
  const auto [cpu_out, cpu_grads] = output_and_skip_gradients([](sd::UNet&) {});
  EXPECT_LE(rel_err(plain_out, cpu_out), 1e-4);
  EXPECT_LE(rel_err(plain_grads, cpu_grads), 1e-4);
  const auto [lean_out, lean_grads] = output_and_skip_gradients([&](sd::UNet& unet) {
    unet->set_lean_activations(all);
    unet->set_channels_last(true);
  }, gpu);
  EXPECT_LE(rel_err(lean_out.contiguous(), plain_out), 1e-5);
  EXPECT_LE(rel_err(lean_grads, plain_grads), 1e-4);
}

/// Skips a test of the fused CUDA kernels where they cannot run.
#define SKIP_WITHOUT_FUSED_KERNELS()                                                   \
  if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA device";                  \
  if (!sd::fused::available()) GTEST_SKIP() << "built without the fused CUDA kernels"

TEST_F(Models, FusedGroupNormSiLUMatchesFloat64_CUDA) {
  SKIP_WITHOUT_FUSED_KERNELS();
  const torch::Device gpu(torch::kCUDA, 0);
  struct Case {
    int64_t n, c, h, w, groups;
    bool affine;
  };
  // Rows of 64 and 256 elements take the 16-byte vector path; rows of 35 and 3 the scalar one.
  const std::vector<Case> cases{{2, 64, 8, 8, 32, true}, {3, 40, 7, 5, 8, true}, {2, 32, 16, 16, 4, false},
                                {1, 6, 3, 1, 3, true}};
  for (const auto& k : cases) {
    for (const auto dtype : {torch::kFloat32, torch::kBFloat16, torch::kFloat16}) {
      SCOPED_TRACE(::testing::Message() << k.n << "x" << k.c << "x" << k.h << "x" << k.w << " groups " << k.groups
                                        << " affine " << k.affine << " " << dtype);
      torch::nn::GroupNorm norm(torch::nn::GroupNormOptions(k.groups, k.c).eps(1e-5).affine(k.affine));
      if (k.affine) randomize_affine(*norm);
      norm->to(gpu, dtype);
      // An offset mean checks the statistics' cancellation; inputs rounded to dtype once, for both.
      const auto x = (torch::randn({k.n, k.c, k.h, k.w}) * 3 + 1.5).to(gpu, dtype);
      const auto grad_out = torch::randn({k.n, k.c, k.h, k.w}).to(gpu, dtype);

      auto x64 = float64_leaf(x), w64 = float64_leaf(norm->weight), b64 = float64_leaf(norm->bias);
      const auto expected = torch::silu(torch::group_norm(x64, k.groups, w64, b64, 1e-5));
      expected.backward(grad_out.to(torch::kFloat64));

      const auto xin = x.clone().requires_grad_(true);
      const auto got = sd::fused::group_norm_silu(xin, *norm);
      ASSERT_EQ(got.scalar_type(), dtype);
      got.backward(grad_out);
      const double tolerance = fused_tolerance(dtype);
      EXPECT_LE(rel_err(got, expected), tolerance);
      EXPECT_LE(rel_err(xin.grad(), x64.grad()), 2 * tolerance);
      if (k.affine) {
        EXPECT_LE(rel_err(norm->weight.grad(), w64.grad()), 2 * tolerance);
        EXPECT_LE(rel_err(norm->bias.grad(), b64.grad()), 2 * tolerance);
      }
    }
  }
}

TEST_F(Models, FusedGEGLUMatchesFloat64_CUDA) {
  SKIP_WITHOUT_FUSED_KERNELS();
  const torch::Device gpu(torch::kCUDA, 0);
  // A gate of 64 takes the vector path; of 5, the scalar one; a non-contiguous projection is copied.
  for (const auto& sizes : {std::vector<int64_t>{2, 10, 128}, std::vector<int64_t>{3, 7, 10}}) {
    for (const auto dtype : {torch::kFloat32, torch::kBFloat16, torch::kFloat16}) {
      SCOPED_TRACE(::testing::Message() << sizes.back() << " wide, " << dtype);
      const auto projected = (torch::randn(sizes) * 2).to(gpu, dtype);
      auto out_sizes = sizes;
      out_sizes.back() /= 2;
      const auto grad_out = torch::randn(out_sizes).to(gpu, dtype);
      auto p64 = float64_leaf(projected);
      const auto parts = p64.chunk(2, -1);
      const auto expected = parts[0] * torch::gelu(parts[1]);
      expected.backward(grad_out.to(torch::kFloat64));
      for (const bool contiguous : {true, false}) {
        auto input = contiguous ? projected.clone() : projected.transpose(0, 1).contiguous().transpose(0, 1);
        input.requires_grad_(true);
        const auto got = sd::fused::geglu(input);
        ASSERT_EQ(got.sizes(), expected.sizes());
        got.backward(grad_out);
        EXPECT_LE(rel_err(got, expected), fused_tolerance(dtype)) << "contiguous " << contiguous;
        EXPECT_LE(rel_err(input.grad(), p64.grad()), 2 * fused_tolerance(dtype)) << "contiguous " << contiguous;
      }
    }
  }
}

TEST_F(Models, FusedLayerNormMatchesFloat64_CUDA) {
  SKIP_WITHOUT_FUSED_KERNELS();
  const torch::Device gpu(torch::kCUDA, 0);
  // SD's widths (320: vector loads over two rounds of the warp), a scalar width (35), a
  // normalized shape of two dimensions; rows that leave the last block part empty.
  struct Case {
    std::vector<int64_t> sizes, normalized;
  };
  for (const auto& c : {Case{{2, 9, 320}, {320}}, Case{{3, 5, 35}, {35}}, Case{{7, 4, 16}, {4, 16}}}) {
    for (const auto dtype : {torch::kFloat32, torch::kBFloat16, torch::kFloat16}) {
      SCOPED_TRACE(::testing::Message() << c.sizes.back() << " wide, " << dtype);
      torch::nn::LayerNorm norm(torch::nn::LayerNormOptions(c.normalized).eps(1e-5));
      randomize_affine(*norm);
      norm->to(gpu, dtype);
      const auto x = (torch::randn(c.sizes) * 3 + 1.5).to(gpu, dtype);
      const auto grad_out = torch::randn(c.sizes).to(gpu, dtype);
      auto x64 = float64_leaf(x), w64 = float64_leaf(norm->weight), b64 = float64_leaf(norm->bias);
      const auto expected = torch::layer_norm(x64, c.normalized, w64, b64, 1e-5);
      expected.backward(grad_out.to(torch::kFloat64));

      const auto xin = x.clone().requires_grad_(true);
      const auto got = sd::fused::layer_norm(xin, *norm);
      ASSERT_EQ(got.scalar_type(), dtype);
      got.backward(grad_out);
      const double tolerance = fused_tolerance(dtype);
      EXPECT_LE(rel_err(got, expected), tolerance);
      EXPECT_LE(rel_err(xin.grad(), x64.grad()), 2 * tolerance);
      EXPECT_LE(rel_err(norm->weight.grad(), w64.grad()), 2 * tolerance);
      EXPECT_LE(rel_err(norm->bias.grad(), b64.grad()), 2 * tolerance);
    }
  }
}

TEST_F(Models, UNetFusedKernelsMatchPlainOnTheGpu_CUDA) {
  SKIP_WITHOUT_FUSED_KERNELS();
  at::globalContext().setAllowTF32CuBLAS(false);
  at::globalContext().setAllowTF32CuDNN(false);
  const torch::Device gpu(torch::kCUDA, 0);
  sd::LeanActivations fused;
  fused.fused_norm_silu = fused.fused_geglu = fused.fused_layer_norm = true;
  const auto [plain_out, plain_grads] = output_and_skip_gradients([](sd::UNet&) {}, gpu);
  const auto [fused_out, fused_grads] =
      output_and_skip_gradients([&](sd::UNet& unet) { unet->set_lean_activations(fused); }, gpu);
  EXPECT_LE(rel_err(fused_out, plain_out), 1e-5);
  EXPECT_LE(rel_err(fused_grads, plain_grads), 1e-4);
  // And the reference's output, from the fixtures.
  auto unet = tiny_unet(torch::kFloat32);
  unet->to(gpu);
  unet->set_lean_activations(fused);
  torch::NoGradGuard no_grad;
  const auto out = unet(unet_case("input.sample").to(gpu, torch::kFloat32), unet_case("input.timestep").to(gpu),
                        unet_case("input.encoder_hidden_states").to(gpu, torch::kFloat32));
  EXPECT_LE(rel_err(out.cpu(), unet_case("output.base")), 1e-4);
}

TEST_F(Models, FusedKernelsRefuseWhatTheyCannotRunSayingWhy) {
  // On a CPU tensor, in any build: the message names the op and the reason.
  torch::nn::GroupNorm norm(torch::nn::GroupNormOptions(2, 4));
  const std::string reason = sd::fused::available() ? "run on CUDA tensors, not on cpu" : "no fused CUDA kernels";
  expect_error([&] { sd::fused::group_norm_silu(torch::randn({1, 4, 2, 2}), *norm); },
               {"fused group_norm_silu", reason});
  expect_error([&] { sd::fused::geglu(torch::randn({3, 8})); }, {"fused geglu", reason});
  torch::nn::LayerNorm layer_norm(torch::nn::LayerNormOptions({8}));
  expect_error([&] { sd::fused::layer_norm(torch::randn({3, 8}), *layer_norm); }, {"fused layer_norm", reason});
  if (sd::fused::available() && torch::cuda::is_available()) {  // a shape not ending in the normalized one
    const auto wrong = torch::randn({3, 6}, torch::Device(torch::kCUDA, 0));
    expect_error([&] { sd::fused::layer_norm(wrong, *layer_norm); }, {"fused layer_norm", "[3, 6]", "[8]"});
  }
  sd::LeanActivations lean;
  lean.fused_norm_silu = true;
  expect_error([&] { sd::norm_silu(torch::randn({1, 4, 2, 2}), *norm, lean); }, {"fused group_norm_silu", reason});
}

TEST_F(Models, UNetLeanActivationsUnderBFloat16AutocastStayClose) {
  auto unet = tiny_unet(torch::kBFloat16);
  sd::LeanActivations all;
  all.group_norm_silu = all.geglu = all.norms_in_activation_dtype = all.recompute_feed_forward = true;
  unet->set_lean_activations(all);
  torch::Tensor out;
  {
    scedit::compat::AutocastGuard autocast(torch::kCPU, torch::kBFloat16);
    out = run_base(unet, torch::kFloat32);
  }
  EXPECT_EQ(out.scalar_type(), torch::kBFloat16);
  const double err = rel_err(out, unet_case("output.base"));
  std::printf("[ info     ] UNet bf16 autocast, lean activations, rel err %.3g\n", err);
  EXPECT_LT(err, 5e-2);
}

TEST_F(Models, UNetRejectsBadInputNamingTheShape) {
  auto unet = tiny_unet(torch::kFloat32);
  torch::NoGradGuard no_grad;
  const auto t = unet_case("input.timestep");
  const auto context = unet_case("input.encoder_hidden_states").to(torch::kFloat32);
  expect_error([&] { unet(torch::randn({2, 5, 16, 16}), t, context); },
               {"sample [B, 4, H, W]", "[2, 5, 16, 16]"});
  expect_error([&] { unet(torch::randn({2, 4, 12, 16}), t, context); },
               {"multiples of 8", "[2, 4, 12, 16]"});
  expect_error([&] { unet(torch::randn({2, 4, 16, 16}), t, torch::randn({2, 7, 33})); },
               {"encoder_hidden_states", "[2, 7, 33]"});
  expect_error([&] { unet(torch::randn({2, 4, 16, 16}), torch::zeros({3}, torch::kInt64), context); },
               {"timestep", "[3]"});
}

TEST_F(Models, UNetCloneIsDeepAndUsesItsOwnWeights) {
  auto unet = tiny_unet(torch::kFloat32);
  const auto base = run_base(unet, torch::kFloat32);
  auto copy = std::dynamic_pointer_cast<sd::UNet2DConditionModelImpl>(unet->clone());
  ASSERT_NE(copy, nullptr);
  sd::UNet cloned(copy);
  EXPECT_TRUE(torch::equal(run_base(cloned, torch::kFloat32), base));
  EXPECT_EQ(cloned->skip_sites().size(), unet->skip_sites().size());
  EXPECT_NE(cloned->skip_sites()[0].get(), unet->skip_sites()[0].get());
  {
    // A weight deep in the clone's lists: the clone's forward must see it, the original not.
    torch::NoGradGuard no_grad;
    cloned->ups.at(1)->resnet_blocks.at(0)->conv2->bias.add_(1.0);
    EXPECT_TRUE(torch::equal(
        cloned->named_parameters()["up_blocks.1.resnets.0.conv2.bias"],
        cloned->ups.at(1)->resnet_blocks.at(0)->conv2->bias));
  }
  EXPECT_TRUE(torch::equal(run_base(unet, torch::kFloat32), base));
  EXPECT_GT(rel_err(run_base(cloned, torch::kFloat32), base), 1e-4);
}

TEST_F(Models, LayersPrintTheirOptions) {
  std::ostringstream resnet, attention;
  sd::ResnetBlock2D(sd::ResnetBlock2DOptions(32, 64).temb_channels(128).groups(8).eps(1e-5))
      ->pretty_print(resnet);
  EXPECT_EQ(resnet.str(),
            "sd::ResnetBlock2D(in_channels=32, out_channels=64, temb_channels=128, groups=8, "
            "eps=1e-05)");
  sd::Attention(sd::AttentionOptions(320, 8, 40).cross_attention_dim(768))->pretty_print(attention);
  EXPECT_EQ(attention.str(), "sd::Attention(query_dim=320, heads=8, dim_head=40, cross_attention_dim=768)");
}

TEST_F(Models, UNetTinyForwardTiming) {
  // Not a check: prints the CPU forward time of the tiny UNet (batch 2, 16×16) for the report.
  auto unet = tiny_unet(torch::kFloat32);
  run_base(unet, torch::kFloat32);  // warm-up
  const int runs = 10;
  const auto start = std::chrono::steady_clock::now();
  for (int i = 0; i < runs; ++i) run_base(unet, torch::kFloat32);
  const double ms =
      std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count() /
      runs;
  std::printf("[ info     ] tiny UNet forward (float32, CPU, %d threads): %.2f ms\n",
              torch::get_num_threads(), ms);
  SUCCEED();
}

// ---- VAE ---------------------------------------------------------------------------------------

TEST_F(Models, VAETinyAndSd15KeysShapesAndParameterCount) {
  sd::VAE tiny(tiny_vae_config());
  EXPECT_EQ(shapes_of(*tiny), shapes_of(manifest().at("keys_vae_tiny")));
  sd::VAE full(sd::VAEConfig::from_json(config_json("vae_sd15")));
  EXPECT_EQ(shapes_of(*full), shapes_of(manifest().at("keys_vae_sd15")));
  EXPECT_EQ(parameter_count(*full), manifest().at("params_vae_sd15").get<int64_t>());
}

TEST_F(Models, VAEMatchesReference) {
  for (auto dtype : {torch::kFloat32, torch::kFloat64}) {
    const double tolerance = dtype == torch::kFloat32 ? 1e-4 : 1e-9;
    auto vae = tiny_vae(dtype);
    torch::NoGradGuard no_grad;
    const auto posterior = vae->encode(other_case("vae.input.image").to(dtype));
    const auto decoded = vae->decode(other_case("vae.input.latent").to(dtype));
    const double e_mean = rel_err(posterior.mean, other_case("vae.output.mean"));
    const double e_logvar = rel_err(posterior.logvar, other_case("vae.output.logvar"));
    const double e_decoded = rel_err(decoded, other_case("vae.output.decoded"));
    std::printf("[ info     ] VAE %s rel err: mean %.3g, logvar %.3g, decoded %.3g\n",
                c10::toString(dtype), e_mean, e_logvar, e_decoded);
    EXPECT_LE(e_mean, tolerance);
    EXPECT_LE(e_logvar, tolerance);
    EXPECT_LE(e_decoded, tolerance);
  }
}

TEST_F(Models, VAESamplesThePosteriorAndClampsLogvar) {
  auto vae = tiny_vae(torch::kFloat64);
  torch::NoGradGuard no_grad;
  const auto image = other_case("vae.input.image");
  const auto p = vae->encode(image);
  const auto noise = torch::randn_like(p.mean);
  EXPECT_TRUE(torch::allclose(sd::AutoencoderKLImpl::sample(p.mean, p.logvar, noise),
                              p.mean + (p.logvar / 2).exp() * noise));
  auto g1 = torch::make_generator<torch::CPUGeneratorImpl>(7);
  auto g2 = torch::make_generator<torch::CPUGeneratorImpl>(7);
  const auto a = sd::AutoencoderKLImpl::sample(p.mean, p.logvar, g1);
  EXPECT_TRUE(torch::equal(a, sd::AutoencoderKLImpl::sample(p.mean, p.logvar, g2)));
  EXPECT_FALSE(torch::equal(a, p.mean));
  // Push the logvar half of the moments far out: it is clamped to [-30, 20].
  const int64_t latent = vae->config.latent_channels;
  vae->quant_conv->bias.slice(0, latent).fill_(1e4);
  EXPECT_EQ(vae->encode(image).logvar.max().item<double>(), 20.0);
  vae->quant_conv->bias.slice(0, latent).fill_(-1e4);
  EXPECT_EQ(vae->encode(image).logvar.min().item<double>(), -30.0);
}

TEST_F(Models, VAERejectsBadInputAndClones) {
  auto vae = tiny_vae(torch::kFloat32);
  torch::NoGradGuard no_grad;
  expect_error([&] { vae->encode(torch::randn({1, 4, 32, 32})); }, {"encode", "[1, 4, 32, 32]"});
  expect_error([&] { vae->decode(torch::randn({1, 3, 4, 4})); }, {"decode", "[1, 3, 4, 4]"});
  const auto latent = other_case("vae.input.latent").to(torch::kFloat32);
  const auto decoded = vae->decode(latent);
  auto copy = std::dynamic_pointer_cast<sd::AutoencoderKLImpl>(vae->clone());
  ASSERT_NE(copy, nullptr);
  EXPECT_TRUE(torch::equal(copy->decode(latent), decoded));
  copy->decoder->ups.at(0)->resnet_blocks.at(0)->conv2->bias.add_(1.0);
  EXPECT_TRUE(torch::equal(vae->decode(latent), decoded));
  EXPECT_FALSE(torch::equal(copy->decode(latent), decoded));
}

}  // namespace
