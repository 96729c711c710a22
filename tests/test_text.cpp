// Tests of examples/sd/tokenizer.hpp, examples/sd/clip.hpp and examples/sd/scheduler.hpp: the
// CLIP tokenizer against transformers' ids, the CLIP text encoder against the tiny fixtures and
// the full-size key list, and DDIM / noise schedule / guidance against diffusers' values and the
// formulas.

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <nlohmann/json.hpp>

#include <scedit/state_dict.hpp>
#include <sd/clip.hpp>
#include <sd/scheduler.hpp>
#include <sd/tokenizer.hpp>

#include "sd_fixtures.hpp"
#include "test_util.hpp"

#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;

using ::testing::HasSubstr;
using scedit_test::error_of;
using scedit_test::manifest;
using scedit_test::other_case;
using scedit_test::rel_err;
using scedit_test::shapes_of;
using scedit_test::TempDir;

json read_json(const fs::path& path) {
  std::ifstream in(path);
  EXPECT_TRUE(in.good()) << "cannot open " << path;
  return json::parse(in);
}

fs::path clip_data() { return scedit_test::data_dir() / "clip"; }

/// A tokenizer folder in `dir` with the files `vocab.json` and `merges.txt` of the texts given.
void write_tokenizer_files(const TempDir& dir, const std::string& vocab, const std::string& merges) {
  std::ofstream(dir.file("vocab.json")) << vocab;
  std::ofstream(dir.file("merges.txt")) << merges;
}

// ---- tokenizer --------------------------------------------------------------------------------

class Tokenizer : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    tokenizer_ = new sd::CLIPTokenizer(clip_data().string());
    cases_ = new json(read_json(clip_data() / "tokenizer_cases.json").at("cases"));
  }
  static void TearDownTestSuite() {
    delete tokenizer_;
    delete cases_;
  }
  static sd::CLIPTokenizer* tokenizer_;
  static json* cases_;
};
sd::CLIPTokenizer* Tokenizer::tokenizer_ = nullptr;
json* Tokenizer::cases_ = nullptr;

TEST_F(Tokenizer, ReproducesEveryReferenceCase) {
  ASSERT_GT(cases_->size(), 0u);
  for (const auto& c : *cases_) {
    const std::string prompt = c.at("prompt").get<std::string>();
    const auto unpadded = c.at("ids_unpadded").get<std::vector<int64_t>>();
    const auto padded = c.at("input_ids").get<std::vector<int64_t>>();
    EXPECT_EQ(tokenizer_->encode(prompt, /*truncate=*/false), unpadded) << "prompt: " << prompt;
    // Truncated encode = the padded ids without their padding.
    const size_t kept = std::min<size_t>(unpadded.size(), padded.size());
    EXPECT_EQ(tokenizer_->encode(prompt),
              std::vector<int64_t>(padded.begin(), padded.begin() + static_cast<long>(kept)))
        << "prompt: " << prompt;
    const torch::Tensor row = (*tokenizer_)({prompt});
    ASSERT_EQ(row.sizes(), (std::vector<int64_t>{1, static_cast<int64_t>(padded.size())}));
    EXPECT_TRUE(torch::equal(row[0], torch::tensor(padded, torch::kInt64))) << "prompt: " << prompt;
  }
}

TEST_F(Tokenizer, BatchStacksTheRows) {
  std::vector<std::string> prompts;
  std::vector<torch::Tensor> rows;
  for (const auto& c : *cases_) {
    prompts.push_back(c.at("prompt").get<std::string>());
    rows.push_back(torch::tensor(c.at("input_ids").get<std::vector<int64_t>>(), torch::kInt64));
  }
  const torch::Tensor batch = (*tokenizer_)(prompts);
  EXPECT_EQ(batch.scalar_type(), torch::kInt64);
  EXPECT_TRUE(torch::equal(batch, torch::stack(rows)));
  EXPECT_EQ((*tokenizer_)(std::vector<std::string>{}).sizes(),
            (std::vector<int64_t>{0, tokenizer_->max_length()}));
}

TEST_F(Tokenizer, SpecialIdsComeFromTheVocabulary) {
  const json vocab = read_json(clip_data() / "vocab.json");
  EXPECT_EQ(tokenizer_->bos_id(), vocab.at("<|startoftext|>").get<int64_t>());
  EXPECT_EQ(tokenizer_->eos_id(), vocab.at("<|endoftext|>").get<int64_t>());
  EXPECT_EQ(tokenizer_->pad_id(), tokenizer_->eos_id());
  EXPECT_EQ(tokenizer_->vocab_size(), static_cast<int64_t>(vocab.size()));
  EXPECT_EQ(tokenizer_->encode(""), (std::vector<int64_t>{tokenizer_->bos_id(), tokenizer_->eos_id()}));
}

TEST_F(Tokenizer, DecodeInvertsEncodeOnNormalisedText) {
  const std::string text = "a photo of an astronaut riding a horse on mars";
  EXPECT_EQ(tokenizer_->decode(tokenizer_->encode(text)), text);
  EXPECT_EQ(tokenizer_->decode(tokenizer_->encode("Café NAÏVE, 東京の夜景!")), "café naïve , 東京の夜景 !");
  EXPECT_THROW(tokenizer_->decode({tokenizer_->vocab_size()}), c10::Error);
}

TEST_F(Tokenizer, ComposesDecomposedLettersLikeNFC) {
  // "e" + U+0301 COMBINING ACUTE is "é" after NFC; "И" + U+0306 is "Й" (lower-cased to "й").
  EXPECT_EQ(tokenizer_->encode("cafe\xCC\x81"), tokenizer_->encode("caf\xC3\xA9"));
  EXPECT_EQ(tokenizer_->encode("\xD0\x98\xCC\x86"), tokenizer_->encode("\xD0\xB9"));
}

TEST_F(Tokenizer, LowerCasesGreekAndCyrillic) {
  EXPECT_EQ(tokenizer_->encode("ΑΘΗΝΑ МОСКВА"), tokenizer_->encode("αθηνα москва"));
}

TEST_F(Tokenizer, TruncatesToMaxLengthKeepingEos) {
  const sd::CLIPTokenizer shorter(clip_data().string(), sd::CLIPTokenizerOptions().max_length(8));
  const auto full = shorter.encode("one two three four five six seven eight nine", false);
  const auto cut = shorter.encode("one two three four five six seven eight nine");
  ASSERT_EQ(cut.size(), 8u);
  EXPECT_EQ(std::vector<int64_t>(cut.begin(), cut.end() - 1),
            std::vector<int64_t>(full.begin(), full.begin() + 7));
  EXPECT_EQ(cut.back(), shorter.eos_id());
  EXPECT_EQ(shorter({"x"}).sizes(), (std::vector<int64_t>{1, 8}));
}

TEST_F(Tokenizer, CopiesShareResults) {
  const sd::CLIPTokenizer copy = *tokenizer_;
  const std::string text = "masterpiece, best quality, dramatic lighting";
  EXPECT_EQ(copy.encode(text), tokenizer_->encode(text));
  EXPECT_EQ(copy.encode(text), copy.encode(text));
}

TEST(TokenizerErrors, NamesTheMissingOrMalformedFile) {
  const std::string missing = (fs::temp_directory_path() / "scedit_no_such_tokenizer").string();
  EXPECT_THAT(error_of([&] { sd::CLIPTokenizer t(missing); }), HasSubstr(missing));

  const std::string merges = "#version: 0.2\ni n\nt h\n";
  {
    TempDir dir("tokenizer");
    write_tokenizer_files(dir, "{\"a\": 0, ", merges);  // truncated JSON
    EXPECT_THAT(error_of([&] { sd::CLIPTokenizer t(dir.path().string()); }), HasSubstr(dir.file("vocab.json")));
  }
  {
    TempDir dir("tokenizer");
    write_tokenizer_files(dir, "{\"a\": 0, \"b\": 1}", merges);  // lacks the special tokens
    EXPECT_THAT(error_of([&] { sd::CLIPTokenizer t(dir.path().string()); }), HasSubstr("<|startoftext|>"));
  }
  {
    TempDir dir("tokenizer");
    write_tokenizer_files(dir, "{\"a\": \"zero\"}", merges);
    EXPECT_THAT(error_of([&] { sd::CLIPTokenizer t(dir.path().string()); }), HasSubstr("'a'"));
  }
  {
    TempDir dir("tokenizer");
    write_tokenizer_files(dir, "{\"<|startoftext|>\": 0, \"<|endoftext|>\": 1}",
                          "#version: 0.2\ni n\nthree parts here\n");
    const std::string message = error_of([&] { sd::CLIPTokenizer t(dir.path().string()); });
    EXPECT_THAT(message, HasSubstr(dir.file("merges.txt")));
    EXPECT_THAT(message, HasSubstr("line 3"));
  }
  EXPECT_THROW(sd::CLIPTokenizer(clip_data().string(), sd::CLIPTokenizerOptions().max_length(1)),
               c10::Error);
  EXPECT_THROW(sd::CLIPTokenizer(clip_data().string(), sd::CLIPTokenizerOptions().pad_token("<nope>")),
               c10::Error);
}

TEST_F(Tokenizer, RefusesTextThatIsNotUtf8QuotingItAndNamingTheByte) {
  // Each kind of invalid UTF-8, after a valid two-byte letter so that bytes are not characters.
  const std::string before = "caf\xC3\xA9 ";
  for (const std::string bad : {"\xFF", "\x80", "\xE2\x82", "\xC0\xAF", "\xED\xA0\x80", "\xF4\x90\x80\x80"}) {
    const std::string prompt = before + bad + " end";
    const std::string message = error_of([&] { (*tokenizer_)({prompt}); });
    EXPECT_THAT(message, HasSubstr("is not valid UTF-8 at byte " + std::to_string(before.size() + 1)));
    char hex[8];
    std::snprintf(hex, sizeof(hex), "\\x%02X", static_cast<unsigned char>(bad[0]));
    EXPECT_THAT(message, HasSubstr(before + hex)) << "the prompt, its bad bytes escaped";
    EXPECT_FALSE(sd::unicode::utf8_problem(prompt).empty());
  }
  for (const std::string good : {"", "plain", "caf\xC3\xA9", "\xE2\x82\xAC", "\xF0\x9F\x98\x80", "\xF4\x8F\xBF\xBF"}) {
    EXPECT_EQ(sd::unicode::utf8_problem(good), "") << good;
    EXPECT_EQ(sd::unicode::escape_invalid_utf8(good), good);
  }
}

TEST_F(Tokenizer, CutsExactlyTheTextsItTruncates) {
  const sd::CLIPTokenizer shorter(clip_data().string(), sd::CLIPTokenizerOptions().max_length(8));
  std::string text;
  int64_t cut = 0;
  for (const std::string word : {"one", "two", "three", "four", "five", "six", "seven", "eight", "nine"}) {
    text += word + " ";
    const bool truncated = shorter.encode(text) != shorter.encode(text, /*truncate=*/false);
    EXPECT_EQ(shorter.cuts(text), truncated) << text;
    cut += shorter.cuts(text);
  }
  EXPECT_GT(cut, 0);
  EXPECT_FALSE(shorter.cuts(""));
}

// ---- CLIP text encoder ------------------------------------------------------------------------

sd::CLIPTextConfig tiny_config() {
  return sd::CLIPTextConfig::from_json(manifest().at("configs").at("clip_text_tiny"));
}

sd::CLIPTextModel tiny_model(torch::ScalarType dtype) {
  sd::CLIPTextModel model(tiny_config());
  model->to(dtype);
  const auto path = (scedit_test::fixtures_dir() / "clip_text_tiny.safetensors").string();
  sd::load_clip_text_weights(*model, path);
  model->eval();
  return model;
}

TEST(CLIPText, TinyKeysMatchTheManifest) {
  sd::CLIPTextModel model(tiny_config());
  EXPECT_EQ(shapes_of(*model), shapes_of(manifest().at("keys_clip_text_tiny")));
}

TEST(CLIPText, MatchesReferenceFloat32) {
  torch::NoGradGuard no_grad;
  auto model = tiny_model(torch::kFloat32);
  const auto out = model->forward(other_case("clip.input.ids"));
  EXPECT_EQ(out.last_hidden_state.scalar_type(), torch::kFloat32);
  EXPECT_LE(rel_err(out.last_hidden_state, other_case("clip.output.last_hidden_state")), 1e-4);
  EXPECT_LE(rel_err(out.pooled, other_case("clip.output.pooler_output")), 1e-4);
}

TEST(CLIPText, MatchesReferenceFloat64) {
  torch::NoGradGuard no_grad;
  auto model = tiny_model(torch::kFloat64);
  const auto out = model->forward(other_case("clip.input.ids"));
  EXPECT_LE(rel_err(out.last_hidden_state, other_case("clip.output.last_hidden_state")), 1e-9);
  EXPECT_LE(rel_err(out.pooled, other_case("clip.output.pooler_output")), 1e-9);
}

TEST(CLIPText, PoolsAtTheFirstEosWhenEosIsNotTwo) {
  torch::NoGradGuard no_grad;
  sd::CLIPTextConfig config = tiny_config();
  const torch::Tensor ids = other_case("clip.input.ids");
  config.eos_token_id = ids[0][3].item<int64_t>();  // an id of the first row, not 2
  ASSERT_NE(config.eos_token_id, 2);
  sd::CLIPTextModel model(config);
  model->to(torch::kFloat64);
  sd::load_clip_text_weights(*model, (scedit_test::fixtures_dir() / "clip_text_tiny.safetensors").string());
  const auto out = model->forward(ids);
  for (int64_t b = 0; b < ids.size(0); ++b) {
    int64_t at = 0;  // first position holding eos_token_id (0 when none, as argmax of zeros)
    for (int64_t i = ids.size(1) - 1; i >= 0; --i) {
      if (ids[b][i].item<int64_t>() == config.eos_token_id) at = i;
    }
    EXPECT_TRUE(torch::equal(out.pooled[b], out.last_hidden_state[b][at])) << "row " << b;
  }
}

TEST(CLIPText, ClipSkipEqualsAShorterStack) {
  torch::NoGradGuard no_grad;
  auto model = tiny_model(torch::kFloat64);
  sd::CLIPTextConfig config = tiny_config();
  ASSERT_GE(config.num_hidden_layers, 2);
  config.num_hidden_layers -= 1;
  sd::CLIPTextModel shorter(config);
  shorter->to(torch::kFloat64);
  const auto params = model->named_parameters();
  for (auto& item : shorter->named_parameters()) item.value().copy_(params[item.key()]);
  const torch::Tensor ids = other_case("clip.input.ids");
  EXPECT_TRUE(torch::allclose(model->forward(ids, 1).last_hidden_state,
                              shorter->forward(ids).last_hidden_state, 1e-12, 1e-12));
  EXPECT_TRUE(torch::equal(model->forward(ids, 1).pooled, model->forward(ids).pooled));
}

TEST(CLIPText, CloneIsDeepAndEqual) {
  torch::NoGradGuard no_grad;
  auto model = tiny_model(torch::kFloat64);
  auto copy = std::dynamic_pointer_cast<sd::CLIPTextModelImpl>(model->clone());
  ASSERT_TRUE(copy);
  const torch::Tensor ids = other_case("clip.input.ids");
  EXPECT_TRUE(torch::equal(copy->forward(ids).last_hidden_state, model->forward(ids).last_hidden_state));
  copy->final_layer_norm->weight.add_(1.0);
  EXPECT_FALSE(torch::equal(copy->final_layer_norm->weight, model->final_layer_norm->weight));
}

TEST(CLIPText, StateDictRoundTrip) {
  torch::NoGradGuard no_grad;
  auto model = tiny_model(torch::kFloat32);
  sd::CLIPTextModel fresh(tiny_config());
  scedit::load_state_dict(*fresh, scedit::state_dict(*model));
  const torch::Tensor ids = other_case("clip.input.ids");
  EXPECT_TRUE(torch::equal(fresh->forward(ids).last_hidden_state, model->forward(ids).last_hidden_state));
}

TEST(CLIPText, PrettyPrint) {
  sd::CLIPTextConfig config = tiny_config();
  std::ostringstream expected, printed;
  expected << "sd::CLIPTextModel(layers=" << config.num_hidden_layers
           << ", hidden_size=" << config.hidden_size << ", heads=" << config.num_attention_heads
           << ", intermediate_size=" << config.intermediate_size << ", vocab_size=" << config.vocab_size
           << ", max_position_embeddings=" << config.max_position_embeddings
           << ", act=" << config.hidden_act << ")";
  sd::CLIPTextModel(config)->pretty_print(printed);
  EXPECT_EQ(printed.str(), expected.str());
}

TEST(CLIPText, FullSizeL14HasTheReferenceKeysAndParameterCount) {
  const sd::CLIPTextConfig config =
      sd::CLIPTextConfig::from_json(manifest().at("configs").at("clip_text_l14"));
  sd::CLIPTextModel model(config);
  EXPECT_EQ(shapes_of(*model), shapes_of(manifest().at("keys_clip_text_l14")));
  int64_t count = 0;
  for (const auto& p : model->parameters()) count += p.numel();
  EXPECT_EQ(count, manifest().at("params_clip_text_l14").get<int64_t>());
  // The built-in SD 1.5 configuration has the same layout.
  const sd::CLIPTextConfig sd15 = sd::CLIPTextConfig::sd15();
  EXPECT_EQ(sd15.hidden_size, config.hidden_size);
  EXPECT_EQ(sd15.intermediate_size, config.intermediate_size);
  EXPECT_EQ(sd15.num_hidden_layers, config.num_hidden_layers);
  EXPECT_EQ(sd15.num_attention_heads, config.num_attention_heads);
  EXPECT_EQ(sd15.vocab_size, config.vocab_size);
  EXPECT_EQ(sd15.hidden_act, config.hidden_act);
}

TEST(CLIPText, RejectsBadInputAndConfig) {
  auto model = tiny_model(torch::kFloat32);
  const int64_t length = tiny_config().max_position_embeddings;
  EXPECT_THROW(model->forward(torch::zeros({length}, torch::kInt64)), c10::Error);
  EXPECT_THROW(model->forward(torch::zeros({1, length + 1}, torch::kInt64)), c10::Error);
  EXPECT_THROW(model->forward(torch::zeros({1, length})), c10::Error);  // float ids
  EXPECT_THROW(model->forward(torch::zeros({1, length}, torch::kInt64), tiny_config().num_hidden_layers),
               c10::Error);
  json bad = manifest().at("configs").at("clip_text_tiny");
  bad["num_attention_heads"] = bad["hidden_size"].get<int64_t>() + 1;
  EXPECT_THAT(error_of([&] { sd::CLIPTextConfig::from_json(bad); }), HasSubstr("num_attention_heads"));
  bad = manifest().at("configs").at("clip_text_tiny");
  bad["hidden_act"] = "relu";
  EXPECT_THROW(sd::CLIPTextConfig::from_json(bad), c10::Error);
  bad["hidden_act"] = 3;
  EXPECT_THAT(error_of([&] { sd::CLIPTextConfig::from_json(bad); }), HasSubstr("hidden_act"));
  // Weights of another shape are refused, naming the file.
  sd::CLIPTextConfig wider = tiny_config();
  wider.hidden_size *= 2;
  sd::CLIPTextModel other(wider);
  const auto path = (scedit_test::fixtures_dir() / "clip_text_tiny.safetensors").string();
  EXPECT_THAT(error_of([&] { sd::load_clip_text_weights(*other, path); }), HasSubstr(path));
}

// ---- schedules --------------------------------------------------------------------------------

TEST(NoiseSchedule, AlphasCumprodMatchesDiffusers) {
  const sd::NoiseSchedule schedule;  // SD: scaled_linear 0.00085 -> 0.012 over 1000 steps
  const torch::Tensor& ref = other_case("ddim.alphas_cumprod");
  ASSERT_EQ(schedule.alphas_cumprod64().sizes(), ref.sizes());
  EXPECT_EQ(schedule.alphas_cumprod().scalar_type(), torch::kFloat32);
  EXPECT_LE((schedule.alphas_cumprod64() - ref).abs().max().item<double>(), 1e-12);
  // β endpoints (float32 linspace hits its ends exactly) and ᾱ = Π(1 − β) in float64.
  EXPECT_NEAR(schedule.betas()[0].item<double>(), 0.00085, 1e-9);
  EXPECT_NEAR(schedule.betas()[-1].item<double>(), 0.012, 1e-9);
  const torch::Tensor product = torch::cumprod(1.0 - schedule.betas().to(torch::kFloat64), 0);
  EXPECT_LE((product - ref).abs().max().item<double>(), 1e-5);
  const sd::NoiseSchedule linear(sd::NoiseScheduleOptions().beta_schedule("linear"));
  EXPECT_NEAR(linear.betas()[1].item<double>() - linear.betas()[0].item<double>(),
              (0.012 - 0.00085) / 999, 1e-9);
}

TEST(NoiseSchedule, AddNoiseAndVelocityFollowTheirFormulas) {
  torch::manual_seed(0);
  const sd::NoiseSchedule schedule;
  const torch::Tensor x0 = torch::randn({3, 4, 5, 5}, torch::kFloat64);
  const torch::Tensor noise = torch::randn({3, 4, 5, 5}, torch::kFloat64);
  const torch::Tensor t = torch::tensor({0, 500, 999}, torch::kInt64);
  const torch::Tensor xt = schedule.add_noise(x0, noise, t);
  const torch::Tensor v = schedule.velocity(x0, noise, t);
  for (int64_t b = 0; b < 3; ++b) {
    const double a = schedule.alphas_cumprod64()[t[b].item<int64_t>()].item<double>();
    EXPECT_TRUE(torch::allclose(xt[b], std::sqrt(a) * x0[b] + std::sqrt(1 - a) * noise[b], 1e-12, 1e-12));
    EXPECT_TRUE(torch::allclose(v[b], std::sqrt(a) * noise[b] - std::sqrt(1 - a) * x0[b], 1e-12, 1e-12));
  }
  // v-parameterisation identities: x0 = √ᾱ·x_t − √(1−ᾱ)·v and ε = √(1−ᾱ)·x_t + √ᾱ·v.
  const torch::Tensor a = schedule.alphas_cumprod64().index_select(0, t).view({3, 1, 1, 1});
  EXPECT_TRUE(torch::allclose(a.sqrt() * xt - (1 - a).sqrt() * v, x0, 1e-10, 1e-10));
  EXPECT_TRUE(torch::allclose((1 - a).sqrt() * xt + a.sqrt() * v, noise, 1e-10, 1e-10));
  // One timestep for the batch; targets by kind; float32 stays float32.
  EXPECT_TRUE(torch::equal(schedule.add_noise(x0, noise, torch::tensor({500}, torch::kInt64))[1], xt[1]));
  EXPECT_TRUE(torch::equal(schedule.prediction_target("epsilon", x0, noise, t), noise));
  EXPECT_TRUE(torch::equal(schedule.prediction_target("v_prediction", x0, noise, t), v));
  EXPECT_TRUE(torch::equal(schedule.prediction_target("sample", x0, noise, t), x0));
  EXPECT_EQ(schedule.add_noise(x0.to(torch::kFloat32), noise.to(torch::kFloat32), t).scalar_type(),
            torch::kFloat32);
}

TEST(NoiseSchedule, RejectsBadInput) {
  const sd::NoiseSchedule schedule;
  const torch::Tensor x = torch::randn({2, 4, 3, 3});
  EXPECT_THROW(sd::NoiseSchedule(sd::NoiseScheduleOptions().beta_schedule("cosine")), c10::Error);
  EXPECT_THROW(sd::NoiseSchedule(sd::NoiseScheduleOptions().beta_start(0.5).beta_end(0.1)), c10::Error);
  EXPECT_THROW(schedule.add_noise(x, x, torch::tensor({0, 1000}, torch::kInt64)), c10::Error);
  EXPECT_THROW(schedule.add_noise(x, x, torch::tensor({0, 1, 2}, torch::kInt64)), c10::Error);
  EXPECT_THROW(schedule.add_noise(x, x[0], torch::tensor({0, 1}, torch::kInt64)), c10::Error);
  EXPECT_THROW(schedule.velocity(x, x, torch::tensor({0.5, 1.0})), c10::Error);
  EXPECT_THAT(error_of([&] { schedule.prediction_target("flow", x, x, torch::tensor({0, 1})); }), HasSubstr("flow"));
}

sd::DDIMScheduler trailing_ddim() {
  return sd::DDIMScheduler(
      sd::DDIMSchedulerOptions().timestep_spacing("trailing").set_alpha_to_one(false));
}

TEST(DDIM, TimestepsMatchDiffusers) {
  const torch::Tensor& trailing_ref = other_case("ddim.timesteps_50_trailing");
  auto trailing = trailing_ddim();
  trailing.set_timesteps(trailing_ref.size(0));
  EXPECT_TRUE(torch::equal(trailing.timesteps(), trailing_ref)) << trailing.timesteps();

  const torch::Tensor& leading_ref = other_case("ddim.timesteps_50_leading");
  sd::DDIMScheduler leading(sd::DDIMSchedulerOptions().timestep_spacing("leading").steps_offset(1));
  leading.set_timesteps(leading_ref.size(0));
  EXPECT_TRUE(torch::equal(leading.timesteps(), leading_ref)) << leading.timesteps();

  sd::DDIMScheduler linspace(sd::DDIMSchedulerOptions().timestep_spacing("linspace"));
  linspace.set_timesteps(1000);
  EXPECT_TRUE(torch::equal(linspace.timesteps(), torch::arange(999, -1, -1, torch::kInt64)));
  linspace.set_timesteps(7);
  EXPECT_EQ(linspace.timesteps().size(0), 7);
  EXPECT_EQ(linspace.timesteps()[0].item<int64_t>(), 999);
  EXPECT_EQ(linspace.timesteps()[-1].item<int64_t>(), 0);
  trailing.set_timesteps(1);
  EXPECT_TRUE(torch::equal(trailing.timesteps(), torch::tensor({999}, torch::kInt64)));
}

TEST(DDIM, StepMatchesDiffusersFloat64) {
  auto ddim = trailing_ddim();
  ddim.set_timesteps(other_case("ddim.timesteps_50_trailing").size(0));
  const int64_t t = other_case("ddim.input.t").item<int64_t>();
  const torch::Tensor prev =
      ddim.step(other_case("ddim.input.eps"), t, other_case("ddim.input.sample"));
  EXPECT_EQ(prev.scalar_type(), torch::kFloat64);
  EXPECT_LE(rel_err(prev, other_case("ddim.output.prev_sample")), 1e-9);
  const torch::Tensor prev32 = ddim.step(other_case("ddim.input.eps").to(torch::kFloat32), t,
                                         other_case("ddim.input.sample").to(torch::kFloat32));
  EXPECT_EQ(prev32.scalar_type(), torch::kFloat32);
  EXPECT_LE(rel_err(prev32, other_case("ddim.output.prev_sample")), 1e-5);
}

TEST(DDIM, StepFollowsTheDDIMFormula) {
  torch::manual_seed(1);
  auto ddim = trailing_ddim();
  ddim.set_timesteps(20);
  const torch::Tensor x = torch::randn({2, 4, 6, 6}, torch::kFloat64);
  const torch::Tensor eps = torch::randn({2, 4, 6, 6}, torch::kFloat64);
  const torch::Tensor z = torch::randn({2, 4, 6, 6}, torch::kFloat64);
  const torch::Tensor& ac = ddim.schedule().alphas_cumprod64();
  const int64_t t = ddim.timesteps()[3].item<int64_t>(), prev_t = ddim.previous_timestep(t);
  ASSERT_EQ(prev_t, t - 1000 / 20);
  const double a = ac[t].item<double>(), ap = ac[prev_t].item<double>(), eta = 0.7;
  const torch::Tensor x0 = (x - std::sqrt(1 - a) * eps) / std::sqrt(a);
  const double sigma = eta * std::sqrt((1 - ap) / (1 - a)) * std::sqrt(1 - a / ap);
  const torch::Tensor expected = std::sqrt(ap) * x0 + std::sqrt(1 - ap - sigma * sigma) * eps + sigma * z;
  // float32 scalars as diffusers: agreement to float32 precision, not better.
  EXPECT_LE(rel_err(ddim.step(eps, t, x, eta, z), expected), 1e-6);
  // Last step with set_alpha_to_one: x_prev = x̂₀.
  sd::DDIMScheduler to_one(sd::DDIMSchedulerOptions().timestep_spacing("trailing").set_alpha_to_one(true));
  to_one.set_timesteps(20);
  const int64_t last = to_one.timesteps()[-1].item<int64_t>();
  const double al = ac[last].item<double>();
  EXPECT_LE(rel_err(to_one.step(eps, last, x), (x - std::sqrt(1 - al) * eps) / std::sqrt(al)), 1e-6);
  // v-prediction: with v = √ᾱ·ε − √(1−ᾱ)·x̂₀ built from the same x̂₀, the step is the ε step.
  sd::DDIMScheduler vpred(sd::DDIMSchedulerOptions().timestep_spacing("trailing").prediction_type("v_prediction"));
  vpred.set_timesteps(20);
  const torch::Tensor v = std::sqrt(a) * eps - std::sqrt(1 - a) * x0;
  EXPECT_LE(rel_err(vpred.step(v, t, x), ddim.step(eps, t, x)), 1e-6);
  // η > 0 without given noise draws it: seeded generators repeat, and the step differs from η = 0.
  auto g1 = at::detail::createCPUGenerator(7), g2 = at::detail::createCPUGenerator(7);
  EXPECT_TRUE(torch::equal(ddim.step(eps, t, x, 0.5, g1), ddim.step(eps, t, x, 0.5, g2)));
  EXPECT_FALSE(torch::allclose(ddim.step(eps, t, x, 0.5), ddim.step(eps, t, x)));
  EXPECT_TRUE(torch::equal(ddim.scale_model_input(x, t), x));
}

TEST(DDIM, RejectsBadInput) {
  auto ddim = trailing_ddim();
  const torch::Tensor x = torch::randn({1, 4, 2, 2});
  EXPECT_THROW(ddim.step(x, 999, x), c10::Error);  // before set_timesteps
  EXPECT_THAT(error_of([&] { ddim.set_timesteps(1001); }), HasSubstr("1001"));
  EXPECT_THROW(ddim.set_timesteps(0), c10::Error);
  ddim.set_timesteps(10);
  EXPECT_THROW(ddim.step(x, 1000, x), c10::Error);
  EXPECT_THROW(ddim.step(x, 999, x[0]), c10::Error);
  EXPECT_THROW(ddim.step(x, 999, x, 1.0, x[0]), c10::Error);
  EXPECT_THAT(error_of([] { sd::DDIMScheduler(sd::DDIMSchedulerOptions().timestep_spacing("karras")); }),
              HasSubstr("karras"));
  EXPECT_THROW(sd::DDIMScheduler(sd::DDIMSchedulerOptions().prediction_type("flow")), c10::Error);
}

TEST(DDIM, FromJsonReadsDiffusersConfigs) {
  // SD 1.5's scheduler_config.json (a PNDMScheduler config; DDIM ignores its PNDM keys).
  const json sd15 = json::parse(R"({"_class_name": "PNDMScheduler", "beta_end": 0.012,
      "beta_schedule": "scaled_linear", "beta_start": 0.00085, "num_train_timesteps": 1000,
      "set_alpha_to_one": false, "skip_prk_steps": true, "steps_offset": 1,
      "trained_betas": null, "clip_sample": false})");
  const auto o = sd::DDIMSchedulerOptions::from_json(sd15);
  EXPECT_EQ(o.schedule().beta_schedule(), "scaled_linear");
  EXPECT_EQ(o.schedule().beta_start(), 0.00085);
  EXPECT_EQ(o.steps_offset(), 1);
  EXPECT_FALSE(o.set_alpha_to_one());
  EXPECT_FALSE(o.clip_sample());
  EXPECT_EQ(o.timestep_spacing(), "leading");
  EXPECT_TRUE(torch::equal(sd::DDIMScheduler(o).schedule().alphas_cumprod(),
                           sd::NoiseSchedule().alphas_cumprod()));
  // Missing keys take diffusers' DDIMScheduler defaults.
  const auto d = sd::DDIMSchedulerOptions::from_json(json::object());
  EXPECT_EQ(d.schedule().beta_schedule(), "linear");
  EXPECT_EQ(d.schedule().beta_end(), 0.02);
  EXPECT_EQ(d.steps_offset(), 0);
  EXPECT_TRUE(d.set_alpha_to_one());
  EXPECT_TRUE(d.clip_sample());
  EXPECT_THROW(sd::DDIMSchedulerOptions::from_json(json::parse(R"({"trained_betas": [0.1]})")), c10::Error);
  EXPECT_THROW(sd::DDIMSchedulerOptions::from_json(json::parse(R"({"thresholding": true})")), c10::Error);
  EXPECT_THAT(error_of([] { sd::DDIMSchedulerOptions::from_json(json::parse(R"({"steps_offset": "1"})")); }),
              HasSubstr("steps_offset"));
}

TEST(Guidance, PlainAndRescaledCFG) {
  torch::manual_seed(2);
  const torch::Tensor uncond = torch::randn({2, 4, 8, 8}, torch::kFloat64);
  const torch::Tensor cond = torch::randn({2, 4, 8, 8}, torch::kFloat64) * 1.5;
  const double scale = 7.5;
  const torch::Tensor plain = uncond + scale * (cond - uncond);
  EXPECT_TRUE(torch::equal(sd::classifier_free_guidance(uncond, cond, scale), plain));
  EXPECT_TRUE(torch::equal(sd::classifier_free_guidance(uncond, cond, scale, 0.0), plain));
  // φ = 1: each row's (unbiased) std over C, H, W becomes the conditional row's.
  const torch::Tensor full = sd::classifier_free_guidance(uncond, cond, scale, 1.0);
  for (int64_t b = 0; b < 2; ++b) {
    EXPECT_NEAR(full[b].std().item<double>(), cond[b].std().item<double>(), 1e-12);
    EXPECT_TRUE(torch::allclose(full[b], plain[b] * (cond[b].std() / plain[b].std()), 1e-12, 1e-12));
  }
  // φ = 0.5 blends the two.
  EXPECT_TRUE(torch::allclose(sd::classifier_free_guidance(uncond, cond, scale, 0.5),
                              0.5 * full + 0.5 * plain, 1e-12, 1e-12));
  EXPECT_THROW(sd::classifier_free_guidance(uncond, cond, scale, 1.5), c10::Error);
  EXPECT_THROW(sd::classifier_free_guidance(uncond, cond[0], scale), c10::Error);
  EXPECT_THROW(sd::rescale_noise_cfg(uncond[0][0][0], cond[0][0][0], 0.5), c10::Error);
}

}  // namespace
