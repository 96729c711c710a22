/// @file test_sdxl.cpp
/// @brief Stable Diffusion 2.1 and SDXL: configurations, UNet parity (linear projections,
/// per-level heads and transformer depths, 3 levels, SDXL's "text_time" added conditioning),
/// text encoders (hidden-state selections, the pooled projection), v-prediction DDIM, and the
/// full-size models' keys and parameter counts, against tests/data/fixtures/{sd21,sdxl}.
///
/// Every size comes from the fixtures' manifests and cases ($SCEDIT_FIXTURES/{sd21,sdxl}).

#include "sd_fixtures.hpp"
#include "shape_only.hpp"

#include <sd/clip.hpp>
#include <sd/clip_projection.hpp>
#include <sd/controlnet_config.hpp>
#include <sd/scheduler.hpp>
#include <sd/stable_diffusion.hpp>
#include <sd/tiny.hpp>
#include <sd/unet.hpp>

#include <gmock/gmock.h>

#include <cstdio>
#include <fstream>
#include <map>
#include <string>
#include <vector>

namespace {

using scedit_test::error_of;
using scedit_test::parameter_count;
using scedit_test::rel_err;
using scedit_test::ShapeOnlyAllocation;
using scedit_test::Shapes;
using scedit_test::shapes_of;
using ::testing::AllOf;
using ::testing::HasSubstr;

// ---- the fixtures of a model family (sd21/ or sdxl/) ---------------------------------------

const nlohmann::json& family_manifest(const std::string& family) {
  static std::map<std::string, nlohmann::json> cache;
  auto it = cache.find(family);
  if (it == cache.end()) {
    std::ifstream in(scedit_test::fixtures_dir() / family / "manifest.json");
    EXPECT_TRUE(in.good()) << "cannot open " << family << "/manifest.json";
    it = cache.emplace(family, nlohmann::json::parse(in)).first;
  }
  return it->second;
}

const nlohmann::json& config_of(const std::string& family, const std::string& name) {
  return family_manifest(family).at("configs").at(name);
}

torch::Tensor case_of(const std::string& family, const std::string& key) {
  return scedit_test::fixture_tensor(family + "/cases.safetensors", key);
}

std::string weights_path(const std::string& family, const std::string& file) {
  return scedit_test::fixture_path(family + "/" + file);
}

/// Prints a parity number, so that a run shows how close it came.
double report(const std::string& what, double err) {
  std::printf("[ parity   ] %-48s rel %.3g\n", what.c_str(), err);
  return err;
}

sd::UNetConfig unet_config(const std::string& family, bool upcast_attention = false) {
  auto json = config_of(family, "unet_tiny");
  if (upcast_attention) json["upcast_attention"] = true;
  return sd::UNetConfig::from_json(json);
}

sd::UNet family_unet(const std::string& family, torch::ScalarType dtype, bool upcast = false) {
  sd::UNet unet(unet_config(family, upcast));
  unet->to(dtype);
  scedit::load_state_dict(*unet, scedit_test::fixture(family + "/unet_tiny.safetensors"));
  unet->eval();
  return unet;
}

/// One UNet case of the fixtures: its output and the inputs it was computed from (text_embeds
/// and time_ids only for SDXL).
struct UNetCase {
  std::string output, context, text_embeds, time_ids;
};

torch::Tensor run_case(sd::UNet& unet, const std::string& family, const UNetCase& c,
                       torch::ScalarType dtype) {
  torch::NoGradGuard no_grad;
  sd::UNetAddedConditions added;
  if (!c.text_embeds.empty()) {
    added = {case_of(family, c.text_embeds).to(dtype), case_of(family, c.time_ids)};
  }
  return unet->forward(case_of(family, "input.sample").to(dtype), case_of(family, "input.timestep"),
                       case_of(family, c.context).to(dtype), added);
}

const std::vector<UNetCase> kSd21Cases = {
    {"output.base", "input.encoder_hidden_states", "", ""},
    {"output.random_context", "input.encoder_hidden_states_random", "", ""}};
const std::vector<UNetCase> kSdxlCases = {
    {"output.base", "input.encoder_hidden_states", "input.text_embeds", "input.time_ids"},
    {"output.random_context", "input.encoder_hidden_states_random", "input.text_embeds_random",
     "input.time_ids_1024"},
    {"output.time_ids_swapped_hw", "input.encoder_hidden_states", "input.text_embeds",
     "input.time_ids_swapped_hw"}};

std::vector<int64_t> ints(const nlohmann::json& j) { return j.get<std::vector<int64_t>>(); }
std::vector<bool> bools(const nlohmann::json& j) { return j.get<std::vector<bool>>(); }

/// The shapes of `module` with `prefix` before every key (transformers' `text_model.`).
Shapes prefixed(const torch::nn::Module& module, const std::string& prefix) {
  Shapes out;
  for (const auto& [key, shape] : shapes_of(module)) out.emplace(prefix + key, shape);
  return out;
}

// ---- configurations ----------------------------------------------------------------------------

TEST(Sd21Sdxl, BuiltInConfigurationsAreTheManifests) {
  EXPECT_EQ(sd::UNetConfig::from_json(config_of("sd21", "unet_sd21")).to_json(),
            sd::UNetConfig::sd21().to_json());
  EXPECT_EQ(sd::UNetConfig::from_json(config_of("sdxl", "unet_sdxl")).to_json(),
            sd::UNetConfig::sdxl().to_json());
  // diffusers' fully resolved configurations (every default written out, nulls included) read
  // as the short ones.
  for (const std::string family : {"sd21", "sdxl"}) {
    const auto& full = family_manifest(family).at("configs_full").at("unet_tiny");
    EXPECT_EQ(sd::UNetConfig::from_json(full).to_json(), unet_config(family).to_json()) << family;
    // A configuration survives its own JSON.
    EXPECT_EQ(sd::UNetConfig::from_json(unet_config(family).to_json()).to_json(),
              unet_config(family).to_json());
  }
  const auto xl = sd::UNetConfig::sdxl();
  EXPECT_TRUE(xl.has_text_time());
  EXPECT_EQ(xl.text_embeds_dim(), 1280);
  EXPECT_FALSE(sd::UNetConfig::sd21().has_text_time());
  // The text encoders' layouts (the manifests leave the special token ids out).
  auto same_layout = [](const sd::CLIPTextConfig& a, const nlohmann::json& json) {
    const auto b = sd::CLIPTextConfig::from_json(json);
    return a.vocab_size == b.vocab_size && a.hidden_size == b.hidden_size &&
           a.intermediate_size == b.intermediate_size && a.num_hidden_layers == b.num_hidden_layers &&
           a.num_attention_heads == b.num_attention_heads && a.hidden_act == b.hidden_act &&
           a.projection_dim == b.projection_dim &&
           a.max_position_embeddings == b.max_position_embeddings;
  };
  EXPECT_TRUE(same_layout(sd::CLIPTextConfig::sd21(), config_of("sd21", "text_encoder_sd21")));
  EXPECT_TRUE(same_layout(sd::CLIPTextConfig::sd15(), config_of("sdxl", "text_encoder_sdxl")));
  EXPECT_TRUE(same_layout(sd::CLIPTextConfig::sdxl_2(), config_of("sdxl", "text_encoder_2_sdxl")));
  EXPECT_EQ(sd::VAEConfig::sdxl().scaling_factor, 0.13025);
  EXPECT_TRUE(sd::VAEConfig::sdxl().force_upcast);
}

TEST(Sd21Sdxl, RefusesAddedConditioningItCannotBuildAndControlNetsKeepIt) {
  auto with = [](const char* key, const nlohmann::json& value) {
    auto json = config_of("sdxl", "unet_tiny");
    json[key] = value;
    return json;
  };
  EXPECT_THAT(error_of([&] { sd::UNetConfig::from_json(with("addition_embed_type", "text")); }),
              AllOf(HasSubstr("addition_embed_type"), HasSubstr("'text'")));
  EXPECT_THAT(error_of([&] { sd::UNetConfig::from_json(with("addition_time_embed_dim", nullptr)); }),
              HasSubstr("addition_time_embed_dim"));
  EXPECT_THAT(error_of([&] { sd::UNetConfig::from_json(with("addition_embed_type", nullptr)); }),
              HasSubstr("only supported with addition_embed_type text_time"));
  // A ControlNet made from an SDXL UNet keeps its added conditioning (controlnet.hpp builds it).
  EXPECT_TRUE(sd::ControlNetConfig::from_unet(unet_config("sdxl")).unet.has_text_time());
}

// ---- UNet structure ----------------------------------------------------------------------------

TEST(Sd21Sdxl, TinyUNetKeysSkipsAndPrint) {
  for (const std::string family : {"sd21", "sdxl"}) {
    SCOPED_TRACE(family);
    const auto& m = family_manifest(family);
    sd::UNet unet(unet_config(family));
    EXPECT_EQ(shapes_of(*unet), shapes_of(m.at("keys_unet_tiny")));
    EXPECT_EQ(parameter_count(*unet), m.at("params_unet_tiny").get<int64_t>());
    EXPECT_EQ(unet->skip_channels(), ints(m.at("tiny_skip_dims_encoder_order")));
    EXPECT_EQ(unet->skip_down_flags(), bools(m.at("tiny_input_down_flag")));
    const auto sites = unet->skip_sites();
    const auto dims = ints(m.at("tiny_skip_dims_encoder_order"));
    ASSERT_EQ(sites.size(), dims.size());
    for (size_t i = 0; i < sites.size(); ++i) {  // decoder order: the reverse
      EXPECT_EQ(sites[i]->options.channels(), dims[dims.size() - 1 - i]);
    }
    std::ostringstream printed;
    unet->pretty_print(printed);
    EXPECT_EQ(printed.str().find("addition_embed_type=text_time") != std::string::npos, family == "sdxl");
  }
}

TEST(Sd21Sdxl, CloneKeepsTheAddedEmbedding) {
  auto unet = family_unet("sdxl", torch::kFloat32);
  auto copy = std::dynamic_pointer_cast<sd::UNet2DConditionModelImpl>(unet->clone());
  ASSERT_TRUE(copy);
  ASSERT_FALSE(copy->add_embedding.is_empty());
  EXPECT_NE(copy->add_embedding->linear_1->weight.data_ptr(),
            unet->add_embedding->linear_1->weight.data_ptr());
  sd::UNet cloned(copy);
  EXPECT_TRUE(torch::equal(run_case(cloned, "sdxl", kSdxlCases[0], torch::kFloat32),
                           run_case(unet, "sdxl", kSdxlCases[0], torch::kFloat32)));
}

TEST(Sd21Sdxl, UNetRefusesMissingOrMisshapenAddedConditions) {
  auto xl = family_unet("sdxl", torch::kFloat32);
  const auto sample = case_of("sdxl", "input.sample").to(torch::kFloat32);
  const auto t = case_of("sdxl", "input.timestep");
  const auto context = case_of("sdxl", "input.encoder_hidden_states").to(torch::kFloat32);
  const auto embeds = case_of("sdxl", "input.text_embeds").to(torch::kFloat32);
  const auto ids = case_of("sdxl", "input.time_ids");
  EXPECT_THAT(error_of([&] { xl(sample, t, context); }),
              AllOf(HasSubstr("text_time"), HasSubstr("text_embeds"), HasSubstr("time_ids")));
  const auto narrow_embeds = embeds.narrow(1, 0, 1), narrow_ids = ids.narrow(1, 0, 4);
  EXPECT_THAT(error_of([&] { xl->encode(sample, t, context, {narrow_embeds, ids}); }),
              AllOf(HasSubstr("text_embeds"), HasSubstr(scedit_test::shape_string(narrow_embeds.sizes()))));
  EXPECT_THAT(error_of([&] { xl(sample, t, context, sd::UNetAddedConditions{embeds, narrow_ids}); }),
              AllOf(HasSubstr("time_ids"), HasSubstr(scedit_test::shape_string(narrow_ids.sizes()))));
  auto sd21 = family_unet("sd21", torch::kFloat32);
  const auto sample21 = case_of("sd21", "input.sample").to(torch::kFloat32);
  const auto context21 = case_of("sd21", "input.encoder_hidden_states").to(torch::kFloat32);
  const auto t21 = case_of("sd21", "input.timestep");
  EXPECT_THAT(error_of([&] { sd21(sample21, t21, context21, sd::UNetAddedConditions{embeds, ids}); }),
              HasSubstr("no addition_embed_type"));
}

// ---- UNet parity -------------------------------------------------------------------------------

TEST(Sd21Sdxl, UNetMatchesReferenceFloat32) {
  for (const std::string family : {"sd21", "sdxl"}) {
    auto unet = family_unet(family, torch::kFloat32);
    for (const auto& c : family == "sd21" ? kSd21Cases : kSdxlCases) {
      const auto out = run_case(unet, family, c, torch::kFloat32);
      EXPECT_EQ(out.scalar_type(), torch::kFloat32);
      EXPECT_LE(report(family + " " + c.output + " (float32)", rel_err(out, case_of(family, c.output))),
                1e-4);
    }
  }
  // SD 2.1 with upcast_attention (a precision flag: the same function).
  auto upcast = family_unet("sd21", torch::kFloat32, /*upcast=*/true);
  EXPECT_TRUE(upcast->config.upcast_attention);
  const auto out = run_case(upcast, "sd21", kSd21Cases[0], torch::kFloat32);
  EXPECT_LE(report("sd21 output.upcast_attention (float32)",
                   rel_err(out, case_of("sd21", "output.upcast_attention"))),
            1e-4);
}

TEST(Sd21Sdxl, UNetMatchesReferenceFloat64) {
  // With this build's own float32 sinusoidal features (the READMEs: ~1e-8 to 1e-7).
  for (const std::string family : {"sd21", "sdxl"}) {
    auto unet = family_unet(family, torch::kFloat64);
    const auto& c = (family == "sd21" ? kSd21Cases : kSdxlCases)[0];
    EXPECT_LE(report(family + " " + c.output + " (float64)",
                     rel_err(run_case(unet, family, c, torch::kFloat64), case_of(family, c.output))),
              1e-6);
  }
}

TEST(Sd21Sdxl, UNetIntermediatesMatchReference) {
  torch::NoGradGuard no_grad;
  for (const std::string family : {"sd21", "sdxl"}) {
    SCOPED_TRACE(family);
    auto unet = family_unet(family, torch::kFloat32);
    const auto sample = case_of(family, "input.sample").to(torch::kFloat32);
    const auto t = case_of(family, "input.timestep");
    const auto t_features = sd::detail::timestep_features(unet->config, t, sample);
    // float32 features from another libm: arguments up to ~1000 radians, an ulp of difference.
    EXPECT_LE((t_features - case_of(family, "debug.timestep_features")).abs().max().item<double>(), 1e-5);
    sd::UNetAddedConditions added;
    const auto t_emb = unet->time_embedding(t_features);
    EXPECT_LE(
        report(family + " debug.time_embedding", rel_err(t_emb, case_of(family, "debug.time_embedding"))),
        1e-4);
    if (family == "sdxl") {
      added = {case_of(family, "input.text_embeds").to(torch::kFloat32), case_of(family, "input.time_ids")};
      const auto& c = unet->config;
      const auto id_features = sd::functional::time_ids_embedding(
          added.time_ids, c.addition_time_embed_dim, c.flip_sin_to_cos, static_cast<double>(c.freq_shift));
      EXPECT_LE((id_features - case_of(family, "debug.time_ids_features")).abs().max().item<double>(), 1e-5);
      const auto aug = unet->add_embedding(sd::detail::text_time_input(c, added, torch::kFloat32));
      EXPECT_LE(report("sdxl debug.add_embedding", rel_err(aug, case_of(family, "debug.add_embedding"))),
                1e-4);
    }
    auto features =
        unet->encode(sample, t, case_of(family, "input.encoder_hidden_states").to(torch::kFloat32), added);
    const size_t skips = family_manifest(family).at("tiny_skip_dims_encoder_order").size();
    ASSERT_EQ(features.skips.size(), skips);
    double worst = 0;
    for (size_t i = 0; i < skips; ++i) {
      worst = std::max(worst, rel_err(features.skips[i], case_of(family, "debug.skip." + std::to_string(i))));
    }
    EXPECT_LE(report(family + " debug.skip.* (worst)", worst), 1e-4);
    EXPECT_LE(
        report(family + " debug.mid_block", rel_err(features.mid_output, case_of(family, "debug.mid_block"))),
        1e-4);
    // The decoder needs nothing but the features: the added conditioning is in their embedding.
    EXPECT_LE(rel_err(unet->decode(features), case_of(family, "output.base")), 1e-4);
  }
}

// ---- text encoders -----------------------------------------------------------------------------

/// Compares every hidden state `prefix`.hidden_states.{i} (and their count) with `out`.
void expect_hidden_states(const std::string& family, const std::string& prefix,
                          const std::vector<torch::Tensor>& out, int64_t layers) {
  ASSERT_EQ(static_cast<int64_t>(out.size()), layers + 1);
  double worst = 0;
  for (int64_t i = 0; i <= layers; ++i) {
    worst = std::max(worst,
                     rel_err(out[i], case_of(family, prefix + ".output.hidden_states." + std::to_string(i))));
  }
  EXPECT_LE(report(family + " " + prefix + ".output.hidden_states.* (worst)", worst), 1e-4);
}

TEST(Sd21Sdxl, Sd21TextEncoderMatchesReference) {
  torch::NoGradGuard no_grad;
  const auto config = sd::CLIPTextConfig::from_json(config_of("sd21", "text_encoder_tiny"));
  EXPECT_EQ(config.hidden_act, "gelu");
  sd::CLIPTextModel model(config);
  EXPECT_EQ(prefixed(*model, "text_model."), shapes_of(family_manifest("sd21").at("keys_text_encoder_tiny")));
  sd::load_clip_text_weights(*model, weights_path("sd21", "text_encoder_tiny.safetensors"));
  const auto out = model->forward(case_of("sd21", "text.input.ids"), 0, /*output_hidden_states=*/true);
  EXPECT_LE(report("sd21 text.output.last_hidden_state",
                   rel_err(out.last_hidden_state, case_of("sd21", "text.output.last_hidden_state"))),
            1e-4);
  EXPECT_LE(report("sd21 text.output.pooler_output",
                   rel_err(out.pooled, case_of("sd21", "text.output.pooler_output"))),
            1e-4);
  expect_hidden_states("sd21", "text", out.hidden_states, config.num_hidden_layers);
  // The chain: the pipeline's context is last_hidden_state.
  EXPECT_LE(rel_err(out.last_hidden_state, case_of("sd21", "input.encoder_hidden_states")), 1e-4);
  // Without output_hidden_states there are none.
  EXPECT_TRUE(model->forward(case_of("sd21", "text.input.ids")).hidden_states.empty());
}

TEST(Sd21Sdxl, SdxlTextEncodersMatchReference) {
  torch::NoGradGuard no_grad;
  const auto& m = family_manifest("sdxl");
  const auto config_1 = sd::CLIPTextConfig::from_json(config_of("sdxl", "text_encoder_tiny"));
  const auto config_2 = sd::CLIPTextConfig::from_json(config_of("sdxl", "text_encoder_2_tiny"));
  EXPECT_EQ(config_1.hidden_act, "quick_gelu");
  EXPECT_EQ(config_2.hidden_act, "gelu");
  sd::CLIPTextModel text_1(config_1);
  sd::CLIPTextModelWithProjection text_2(config_2);
  EXPECT_EQ(prefixed(*text_1, "text_model."), shapes_of(m.at("keys_text_encoder_tiny")));
  EXPECT_EQ(shapes_of(*text_2), shapes_of(m.at("keys_text_encoder_2_tiny")));
  sd::load_clip_text_weights(*text_1, weights_path("sdxl", "text_encoder_tiny.safetensors"));
  sd::load_clip_text_with_projection_weights(*text_2,
                                             weights_path("sdxl", "text_encoder_2_tiny.safetensors"));

  const auto ids_1 = case_of("sdxl", "text1.input.ids"), ids_2 = case_of("sdxl", "text2.input.ids");
  const auto out_1 = text_1->forward(ids_1, 0, /*output_hidden_states=*/true);
  const auto out_2 = text_2->forward(ids_2, /*output_hidden_states=*/true);
  EXPECT_LE(report("sdxl text1.output.last_hidden_state",
                   rel_err(out_1.last_hidden_state, case_of("sdxl", "text1.output.last_hidden_state"))),
            1e-4);
  EXPECT_LE(report("sdxl text1.output.pooler_output",
                   rel_err(out_1.pooled, case_of("sdxl", "text1.output.pooler_output"))),
            1e-4);
  EXPECT_LE(report("sdxl text2.output.last_hidden_state",
                   rel_err(out_2.last_hidden_state, case_of("sdxl", "text2.output.last_hidden_state"))),
            1e-4);
  EXPECT_LE(report("sdxl text2.output.text_embeds",
                   rel_err(out_2.text_embeds, case_of("sdxl", "text2.output.text_embeds"))),
            1e-4);
  expect_hidden_states("sdxl", "text1", out_1.hidden_states, config_1.num_hidden_layers);
  expect_hidden_states("sdxl", "text2", out_2.hidden_states, config_2.num_hidden_layers);
  EXPECT_LE(rel_err(out_1.hidden_states.at(config_1.num_hidden_layers - 1),
                    case_of("sdxl", "text1.output.penultimate")),
            1e-4);
  EXPECT_LE(rel_err(out_2.hidden_states.at(config_2.num_hidden_layers - 1),
                    case_of("sdxl", "text2.output.penultimate")),
            1e-4);

  // encode_prompt: the UNet's context and text_embeds, then the UNet on them.
  const auto text = sd::sdxl_text_conditioning(*text_1, *text_2, ids_1, ids_2);
  EXPECT_LE(report("sdxl input.encoder_hidden_states (encode_prompt)",
                   rel_err(text.context, case_of("sdxl", "input.encoder_hidden_states"))),
            1e-4);
  EXPECT_LE(report("sdxl input.text_embeds (encode_prompt)",
                   rel_err(text.text_embeds, case_of("sdxl", "input.text_embeds"))),
            1e-4);
  auto unet = family_unet("sdxl", torch::kFloat32);
  const auto out =
      unet(case_of("sdxl", "input.sample").to(torch::kFloat32), case_of("sdxl", "input.timestep"),
           text.context, sd::UNetAddedConditions{text.text_embeds, case_of("sdxl", "input.time_ids")});
  EXPECT_LE(report("sdxl ids -> encoders -> UNet output.base", rel_err(out, case_of("sdxl", "output.base"))),
            1e-4);
  EXPECT_THAT(error_of([&] { sd::sdxl_text_conditioning(*text_1, *text_2, ids_1, ids_2.narrow(0, 0, 1)); }),
              HasSubstr("[B, L]"));
}

// ---- v-prediction DDIM -------------------------------------------------------------------------

/// The DDIM steps' bound: this build computes diffusers' float32 ᾱ as PyTorch 2.x does; the
/// sd21 reference ran torch 1.13, whose float32 linspace / cumprod differ from it in the last
/// bits of some ᾱ (relative ~2e-7 here), which reaches the step's float32 coefficients and is
/// amplified where √ᾱ_t is small (ε-prediction's x̂₀ divides by it).
constexpr double kDdimTolerance = 1e-6;

TEST(Sd21Sdxl, DdimVPredictionStepMatchesReference) {
  const auto options = sd::DDIMSchedulerOptions::from_json(config_of("sd21", "scheduler_sd21"));
  EXPECT_EQ(options.prediction_type(), "v_prediction");
  sd::DDIMScheduler scheduler(options);
  const auto alphas = case_of("sd21", "ddim.alphas_cumprod");
  EXPECT_LE(report("sd21 ddim.alphas_cumprod (max relative)",
                   ((scheduler.schedule().alphas_cumprod64() - alphas).abs() / alphas).max().item<double>()),
            1e-6);
  const auto leading = case_of("sd21", "ddim.timesteps_50_leading");
  scheduler.set_timesteps(leading.size(0));
  EXPECT_TRUE(torch::equal(scheduler.timesteps(), leading));
  auto trailing_options = options;
  sd::DDIMScheduler trailing(trailing_options.timestep_spacing("trailing"));
  trailing.set_timesteps(case_of("sd21", "ddim.timesteps_50_trailing").size(0));
  EXPECT_TRUE(torch::equal(trailing.timesteps(), case_of("sd21", "ddim.timesteps_50_trailing")));

  const auto x = case_of("sd21", "ddim.input.sample"), v = case_of("sd21", "ddim.input.model_output");
  const int64_t t = case_of("sd21", "ddim.input.t").item<int64_t>();
  const auto step = scheduler.step_output(v, t, x);
  EXPECT_LE(report("sd21 ddim_v.output.prev_sample",
                   rel_err(step.prev_sample, case_of("sd21", "ddim_v.output.prev_sample"))),
            kDdimTolerance);
  EXPECT_LE(report("sd21 ddim_v.output.pred_original_sample",
                   rel_err(step.pred_original_sample, case_of("sd21", "ddim_v.output.pred_original_sample"))),
            kDdimTolerance);
  EXPECT_TRUE(torch::equal(scheduler.step(v, t, x), step.prev_sample));
  auto eps_options = options;
  sd::DDIMScheduler eps_scheduler(eps_options.prediction_type("epsilon"));
  eps_scheduler.set_timesteps(leading.size(0));
  const auto eps = eps_scheduler.step_output(v, t, x);
  EXPECT_LE(report("sd21 ddim_eps.output.prev_sample",
                   rel_err(eps.prev_sample, case_of("sd21", "ddim_eps.output.prev_sample"))),
            kDdimTolerance);
  EXPECT_LE(
      report("sd21 ddim_eps.output.pred_original_sample",
             rel_err(eps.pred_original_sample, case_of("sd21", "ddim_eps.output.pred_original_sample"))),
      kDdimTolerance);
}

TEST(Sd21Sdxl, UNetThenDdimStepChainMatchesReference) {
  torch::NoGradGuard no_grad;
  sd::DDIMScheduler scheduler(sd::DDIMSchedulerOptions::from_json(config_of("sd21", "scheduler_sd21")));
  scheduler.set_timesteps(case_of("sd21", "ddim.timesteps_50_leading").size(0));
  auto unet = family_unet("sd21", torch::kFloat32);
  const auto sample = case_of("sd21", "input.sample");
  const auto t = case_of("sd21", "chain.input.t");
  const auto v =
      unet(sample.to(torch::kFloat32), t, case_of("sd21", "input.encoder_hidden_states").to(torch::kFloat32));
  EXPECT_LE(report("sd21 chain.output.unet", rel_err(v, case_of("sd21", "chain.output.unet"))), 1e-4);
  const int64_t step_t = t.item<int64_t>();
  EXPECT_LE(rel_err(scheduler.step(case_of("sd21", "chain.output.unet"), step_t, sample),
                    case_of("sd21", "chain.output.prev_sample")),
            kDdimTolerance);
  EXPECT_LE(
      report("sd21 chain.output.prev_sample", rel_err(scheduler.step(v.to(torch::kFloat64), step_t, sample),
                                                      case_of("sd21", "chain.output.prev_sample"))),
      1e-4);
}

// ---- VAE ---------------------------------------------------------------------------------------

TEST(Sd21Sdxl, Float16SdxlVaeWithForceUpcastDecodesInFloat32) {
  auto pipe = sd::tiny_sdxl_pipeline(/*seed=*/0);
  ASSERT_TRUE(pipe.vae_config.force_upcast);
  const auto latents = torch::randn({1, pipe.vae_config.latent_channels, 4, 4}, torch::kFloat32);
  pipe.vae->to(torch::kHalf);
  const auto images = sd::decode_latents(pipe, latents);  // a float16 convolution: not on the CPU
  EXPECT_EQ(pipe.vae->parameters().front().scalar_type(), torch::kHalf);  // put back
  pipe.vae->to(torch::kFloat32);  // the same float16-rounded weights, widened
  EXPECT_TRUE(torch::equal(images, sd::decode_latents(pipe, latents)));
}

// ---- full-size models: keys and parameter counts ------------------------------------------------

TEST(Sd21SdxlFullSize, UNetKeysShapesParameterCountsAndSkips) {
  for (const std::string family : {"sd21", "sdxl"}) {
    SCOPED_TRACE(family);
    const auto& m = family_manifest(family);
    ShapeOnlyAllocation shape_only;
    scedit_test::DefaultDtypeGuard bf16(caffe2::TypeMeta::Make<at::BFloat16>());  // half the bytes
    sd::UNet unet(sd::UNetConfig::from_json(config_of(family, family == "sd21" ? "unet_sd21" : "unet_sdxl")));
    EXPECT_EQ(shapes_of(*unet), shapes_of(m.at("keys_unet_full")));
    EXPECT_EQ(parameter_count(*unet), m.at("params_unet_full").get<int64_t>());
    std::printf("[ count    ] %s UNet: %lld parameters\n", family.c_str(),
                static_cast<long long>(parameter_count(*unet)));
    EXPECT_EQ(unet->skip_channels(), ints(m.at("full_skip_dims_encoder_order")));
    EXPECT_EQ(unet->skip_down_flags(), bools(m.at("full_input_down_flag")));
    EXPECT_EQ(unet->skip_sites().size(), m.at("full_skip_dims_encoder_order").size());
  }
}

TEST(Sd21SdxlFullSize, TextEncoderKeysAndParameterCounts) {
  ShapeOnlyAllocation shape_only;
  scedit_test::DefaultDtypeGuard bf16(caffe2::TypeMeta::Make<at::BFloat16>());
  {
    const auto& m = family_manifest("sd21");
    sd::CLIPTextModel model(sd::CLIPTextConfig::from_json(config_of("sd21", "text_encoder_sd21")));
    EXPECT_EQ(prefixed(*model, "text_model."), shapes_of(m.at("keys_text_encoder_sd21")));
    EXPECT_EQ(parameter_count(*model), m.at("params_text_encoder_sd21").get<int64_t>());
  }
  const auto& m = family_manifest("sdxl");
  sd::CLIPTextModel text_1(sd::CLIPTextConfig::from_json(config_of("sdxl", "text_encoder_sdxl")));
  EXPECT_EQ(prefixed(*text_1, "text_model."), shapes_of(m.at("keys_text_encoder_sdxl")));
  EXPECT_EQ(parameter_count(*text_1), m.at("params_text_encoder_sdxl").get<int64_t>());
  sd::CLIPTextModelWithProjection text_2(
      sd::CLIPTextConfig::from_json(config_of("sdxl", "text_encoder_2_sdxl")));
  EXPECT_EQ(shapes_of(*text_2), shapes_of(m.at("keys_text_encoder_2_sdxl")));
  EXPECT_EQ(parameter_count(*text_2), m.at("params_text_encoder_2_sdxl").get<int64_t>());
}

TEST(Sd21SdxlFullSize, RandomSd21PipelineIsTheFullArchitecture) {
  ShapeOnlyAllocation shape_only;
  scedit_test::DefaultDtypeGuard bf16(caffe2::TypeMeta::Make<at::BFloat16>());
  const auto& m = family_manifest("sd21");
  auto pipe = sd::random_sd21_pipeline(/*seed=*/0, torch::kBFloat16);
  EXPECT_EQ(shapes_of(*pipe.unet), shapes_of(m.at("keys_unet_full")));
  EXPECT_EQ(prefixed(*pipe.text_encoder, "text_model."), shapes_of(m.at("keys_text_encoder_sd21")));
  EXPECT_EQ(sd::DDIMSchedulerOptions::from_json(pipe.scheduler_config).prediction_type(),
            config_of("sd21", "scheduler_sd21").at("prediction_type").get<std::string>());
}

}  // namespace
