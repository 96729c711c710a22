// Tests of writing files atomically (scedit/atomic_file.hpp, and safetensors::save on top of it)
// and of scedit/state_dict.hpp (state_dict / load_state_dict).

#include <scedit/atomic_file.hpp>
#include <scedit/safetensors.hpp>
#include <scedit/state_dict.hpp>

#include <gtest/gtest.h>
#include <torch/torch.h>

#include <cstdint>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <map>
#include <string>
#include <vector>

#include "test_util.hpp"

namespace {

namespace fs = std::filesystem;
namespace st = scedit::safetensors;
using scedit_test::error_of;
using scedit_test::TempDir;
using scedit_test::expect_identical;
using scedit_test::random_tensor;
using scedit_test::tensor_bytes;

// ---- helpers -----------------------------------------------------------------------------------

bool contains(const std::string& text, const std::string& part) {
  return text.find(part) != std::string::npos;
}

class Safetensors : public ::testing::Test {
 protected:
  void SetUp() override { torch::manual_seed(0); }
  TempDir dir_{"safetensors"};
};

// ---- atomic writes -------------------------------------------------------------------------------

TEST(AtomicFile, WritesThePiecesInOrderAndKeepsTheModeOfTheFileItReplaces) {
  TempDir dir("atomic_file");
  const std::string path = dir.file("notes.txt");
  scedit::write_text_file(path, "first\n");
  EXPECT_EQ(scedit_test::read_file(path), "first\n");
  EXPECT_EQ(fs::status(path).permissions(), fs::perms(0644));  // fchmod: no umask

  fs::permissions(path, fs::perms(0600));
  const std::string a = "abc", empty, b = "defg";
  scedit::write_file_atomically(
      path, {{a.data(), a.size()}, {empty.data(), empty.size()}, {b.data(), b.size()}}, "notes: ");
  EXPECT_EQ(scedit_test::read_file(path), "abcdefg");
  EXPECT_EQ(fs::status(path).permissions(), fs::perms(0600));
  EXPECT_EQ(dir.entries(), std::vector<std::string>{"notes.txt"});
}

TEST(AtomicFile, FailedWriteKeepsWhatWasThereAndLeavesNoTemporary) {
  TempDir dir("atomic_file");
  // The destination is a folder: the temporary is written, then rename() fails.
  const std::string taken = dir.file("taken");
  fs::create_directory(taken);
  std::string message = error_of([&] { scedit::write_text_file(taken, "text"); });
  EXPECT_EQ(message.rfind("writing '" + taken + "': cannot rename", 0), 0u) << message;
  EXPECT_TRUE(fs::is_directory(taken));
  EXPECT_EQ(dir.entries(), std::vector<std::string>{"taken"});

  const std::string lost = dir.file("no_such_folder") + "/notes.txt";
  message = error_of([&] { scedit::write_file_atomically(lost, {}, "notes: "); });
  EXPECT_EQ(message.rfind("notes: cannot create a temporary file beside it", 0), 0u) << message;
  EXPECT_EQ(dir.entries(), std::vector<std::string>{"taken"});
}

// A file that is there already (another program's, written a moment ago) is never replaced: the
// write says so and leaves no temporary, and a free name is written as write_file_atomically does.
TEST(AtomicFile, WriteOfANewFileNeverReplacesOne) {
  TempDir dir("atomic_file");
  const std::string taken = dir.file("00000-0.png"), free = dir.file("00001-0.png");
  scedit::write_text_file(taken, "theirs");
  const std::string ours = "ours";
  EXPECT_FALSE(scedit::write_new_file_atomically(taken, {{ours.data(), ours.size()}}, "png: "));
  EXPECT_EQ(scedit_test::read_file(taken), "theirs");
  EXPECT_EQ(dir.entries(), std::vector<std::string>{"00000-0.png"});

  EXPECT_TRUE(scedit::write_new_file_atomically(free, {{ours.data(), ours.size()}}, "png: "));
  EXPECT_EQ(scedit_test::read_file(free), "ours");
  EXPECT_EQ(fs::status(free).permissions(), fs::perms(0644));
  EXPECT_EQ(dir.entries(), (std::vector<std::string>{"00000-0.png", "00001-0.png"}));

  const std::string lost = dir.file("no_such_folder") + "/notes.txt";
  const auto message = error_of([&] { scedit::write_new_file_atomically(lost, {}, "notes: "); });
  EXPECT_EQ(message.rfind("notes: cannot create a temporary file beside it", 0), 0u) << message;
}

TEST_F(Safetensors, FailedSaveLeavesThePreviousFileAndNoTemporary) {
  const std::string path = dir_.file("model.safetensors");
  st::save(path, {{"w", torch::randn({3})}});
  const std::string before = scedit_test::read_file(path);

  const std::string message = error_of([&] {
    st::save(path, {{"a", torch::randn({2})}, {"z", torch::randn({2}, torch::kComplexFloat)}});
  });
  EXPECT_TRUE(contains(message, path)) << message;
  EXPECT_TRUE(contains(message, "'z'")) << message;
  EXPECT_EQ(scedit_test::read_file(path), before);
  EXPECT_EQ(dir_.entries(), std::vector<std::string>{"model.safetensors"});
}

TEST_F(Safetensors, SaveThatCannotRenameRemovesItsTemporary) {
  // The destination is a folder: the temporary is written, then rename() fails.
  const std::string path = dir_.file("taken");
  fs::create_directory(path);
  const std::string message = error_of([&] { st::save(path, {{"w", torch::randn({64})}}); });
  EXPECT_TRUE(contains(message, "cannot rename")) << message;
  EXPECT_TRUE(contains(message, path)) << message;
  EXPECT_TRUE(fs::is_directory(path));
  EXPECT_EQ(dir_.entries(), std::vector<std::string>{"taken"});
}

TEST_F(Safetensors, SaveIntoAMissingFolderFailsNamingThePath) {
  const std::string path = dir_.file("no_such_folder") + "/w.safetensors";
  const std::string message = error_of([&] { st::save(path, {{"w", torch::zeros({1})}}); });
  EXPECT_TRUE(contains(message, "cannot create a temporary file")) << message;
  EXPECT_TRUE(contains(message, path)) << message;
  EXPECT_TRUE(dir_.entries().empty());
}

TEST_F(Safetensors, SaveReplacesAnExistingFile) {
  const std::string path = dir_.file("model.safetensors");
  st::save(path, {{"old", torch::zeros({100})}});
  const torch::Tensor fresh = torch::randn({2, 3});
  st::save(path, {{"new", fresh}});
  const scedit::TensorMap loaded = st::load(path);
  ASSERT_EQ(loaded.size(), 1u);
  expect_identical(loaded.at("new"), fresh, "new");
  EXPECT_EQ(dir_.entries(), std::vector<std::string>{"model.safetensors"});
}

// ---- state_dict / load_state_dict ----------------------------------------------------------------

struct NetImpl : torch::nn::Module {
  NetImpl() {
    fc = register_module("fc", torch::nn::Linear(4, 3));
    norm = register_module("norm", torch::nn::BatchNorm1d(3));
    scale = register_buffer("scale", torch::ones({2}));
  }
  torch::nn::Linear fc{nullptr};
  torch::nn::BatchNorm1d norm{nullptr};
  torch::Tensor scale;
};
TORCH_MODULE(Net);

/// A Net whose every parameter and buffer holds seeded random values.
Net random_net(uint64_t seed) {
  torch::manual_seed(seed);
  Net net;
  torch::NoGradGuard no_grad;
  for (auto& [key, tensor] : scedit::state_dict(*net)) {
    tensor.copy_(random_tensor(tensor.scalar_type(), tensor.sizes()).abs());
  }
  return net;
}

/// Independent copies of a module's tensors.
scedit::TensorMap snapshot(const torch::nn::Module& module) {
  scedit::TensorMap copies;
  for (const auto& [key, tensor] : scedit::state_dict(module)) copies[key] = tensor.clone();
  return copies;
}

TEST(StateDict, ListsEveryParameterAndBufferByPath) {
  Net net;
  const scedit::TensorMap tensors = scedit::state_dict(*net);
  std::vector<std::string> keys;
  for (const auto& item : tensors) keys.push_back(item.first);
  const std::vector<std::string> expected = {
      "fc.bias",           "fc.weight",        "norm.bias", "norm.num_batches_tracked",
      "norm.running_mean", "norm.running_var", "norm.weight", "scale"};
  EXPECT_EQ(keys, expected);
  EXPECT_EQ(tensors.at("fc.weight").data_ptr(), net->fc->weight.data_ptr());  // shared storage
}

TEST(StateDict, StrictLoadCopiesEveryTensorInPlace) {
  TempDir dir("state_dict");
  const Net source = random_net(1);
  Net target = random_net(2);
  const std::string path = dir.file("net.safetensors");
  scedit::safetensors::save(path, scedit::state_dict(*source));
  void* weight_storage = target->fc->weight.data_ptr();

  scedit::LoadOptions options;
  options.source = path;
  const scedit::LoadReport report =
      scedit::load_state_dict(*target, scedit::safetensors::load(path), options);
  EXPECT_TRUE(report.ok());
  EXPECT_EQ(report.str(), "all keys matched");
  for (const auto& [key, tensor] : scedit::state_dict(*source)) {
    expect_identical(scedit::state_dict(*target).at(key), tensor, key);
  }
  EXPECT_EQ(target->fc->weight.data_ptr(), weight_storage);
  EXPECT_TRUE(target->fc->weight.requires_grad());
}

/// The source's tensors with fc.bias missing, an extra key, and fc.weight of the wrong shape.
scedit::TensorMap flawed_tensors(const Net& source) {
  scedit::TensorMap tensors = snapshot(*source);
  tensors.erase("fc.bias");
  tensors["extra.weight"] = torch::zeros({2});
  tensors["fc.weight"] = torch::zeros({3, 5});
  return tensors;
}

TEST(StateDict, StrictFailureListsEveryProblemByKeyAndCopiesNothing) {
  const Net source = random_net(1);
  Net target = random_net(2);
  const scedit::TensorMap before = snapshot(*target);
  scedit::LoadOptions options;
  options.source = "flawed.safetensors";
  const std::string message =
      error_of([&] { scedit::load_state_dict(*target, flawed_tensors(source), options); });
  EXPECT_TRUE(contains(message, "flawed.safetensors")) << message;
  EXPECT_TRUE(contains(message, "fc.bias")) << message;
  EXPECT_TRUE(contains(message, "extra.weight")) << message;
  EXPECT_TRUE(contains(message, "fc.weight: module [3, 4] vs file [3, 5]")) << message;
  for (const auto& [key, tensor] : before) {
    expect_identical(scedit::state_dict(*target).at(key), tensor, key);
  }
}

TEST(StateDict, NonStrictLoadsWhatMatchesAndReportsTheRest) {
  const Net source = random_net(1);
  Net target = random_net(2);
  const scedit::TensorMap before = snapshot(*target);
  scedit::LoadOptions options;
  options.strict = false;
  const scedit::LoadReport report =
      scedit::load_state_dict(*target, flawed_tensors(source), options);
  EXPECT_FALSE(report.ok());
  EXPECT_EQ(report.missing, std::vector<std::string>{"fc.bias"});
  EXPECT_EQ(report.unexpected, std::vector<std::string>{"extra.weight"});
  EXPECT_EQ(report.mismatched, std::vector<std::string>{"fc.weight: module [3, 4] vs file [3, 5]"});
  EXPECT_TRUE(contains(report.str(), "fc.bias")) << report.str();
  const scedit::TensorMap after = scedit::state_dict(*target);
  for (const auto& [key, tensor] : scedit::state_dict(*source)) {
    const bool loaded = key != "fc.bias" && key != "fc.weight";
    expect_identical(after.at(key), loaded ? tensor : before.at(key), key);
  }
}

TEST(StateDict, RenameHookMapsAndDropsKeys) {
  const Net source = random_net(1);
  Net target = random_net(2);
  scedit::TensorMap tensors;
  for (const auto& [key, tensor] : snapshot(*source)) tensors["model." + key] = tensor;
  tensors["ema.fc.weight"] = torch::zeros({7});  // dropped by the hook
  tensors["model.ema_decay"] = torch::zeros({});  // renamed, but matches nothing

  scedit::LoadOptions options;
  options.strict = false;
  options.rename = [](const std::string& key) -> std::string {
    if (key.rfind("ema.", 0) == 0) return "";
    return key.rfind("model.", 0) == 0 ? key.substr(6) : key;
  };
  const scedit::LoadReport report = scedit::load_state_dict(*target, tensors, options);
  EXPECT_TRUE(report.missing.empty());
  EXPECT_TRUE(report.mismatched.empty());
  EXPECT_EQ(report.unexpected, std::vector<std::string>{"model.ema_decay"});
  for (const auto& [key, tensor] : scedit::state_dict(*source)) {
    expect_identical(scedit::state_dict(*target).at(key), tensor, key);
  }

  tensors["model.fc.weight"] = torch::zeros({3, 5});
  const scedit::LoadReport renamed = scedit::load_state_dict(*target, tensors, options);
  EXPECT_EQ(renamed.mismatched,
            std::vector<std::string>{
                "fc.weight (file key 'model.fc.weight'): module [3, 4] vs file [3, 5]"});
}

TEST(StateDict, TwoKeysRenamedToOneModuleKeyIsAnError) {
  Net target;
  scedit::LoadOptions options;
  options.strict = false;
  options.rename = [](const std::string& key) { return key.substr(key.find('/') + 1); };
  const std::string message = error_of([&] {
    scedit::load_state_dict(*target, {{"a/scale", torch::ones({2})}, {"b/scale", torch::ones({2})}},
                            options);
  });
  EXPECT_TRUE(contains(message, "'a/scale' and 'b/scale' both map to module key 'scale'"))
      << message;
}

TEST(StateDict, SkipModuleKeyLeavesTunerParametersAlone) {
  const Net source = random_net(1);
  Net target = random_net(2);
  target->register_parameter("tuner_weight", torch::full({2}, 5.0f));
  const scedit::TensorMap tensors = snapshot(*source);

  const std::string message = error_of([&] { scedit::load_state_dict(*target, tensors); });
  EXPECT_TRUE(contains(message, "tuner_weight")) << "reported missing without the hook: "
                                                 << message;

  scedit::LoadOptions options;
  options.skip_module_key = [](const std::string& key) { return key.rfind("tuner_", 0) == 0; };
  const scedit::LoadReport report = scedit::load_state_dict(*target, tensors, options);
  EXPECT_TRUE(report.ok()) << report.str();
  EXPECT_TRUE(torch::equal(target->named_parameters()["tuner_weight"], torch::full({2}, 5.0f)));
  expect_identical(target->fc->weight, source->fc->weight, "fc.weight");
}

TEST(StateDict, ConvertsAFloat16FileIntoAFloat32Module) {
  TempDir dir("state_dict");
  const Net source = random_net(1);
  Net target = random_net(2);
  scedit::TensorMap half;
  for (const auto& [key, tensor] : snapshot(*source)) {
    half[key] = tensor.is_floating_point() ? tensor.to(torch::kFloat16) : tensor;
  }
  const std::string path = dir.file("half.safetensors");
  scedit::safetensors::save(path, half);
  ASSERT_EQ(scedit::safetensors::File(path).info("fc.weight").dtype, torch::kFloat16);

  const scedit::LoadReport report =
      scedit::load_state_dict(*target, scedit::safetensors::load(path));
  EXPECT_TRUE(report.ok());
  const scedit::TensorMap after = scedit::state_dict(*target);
  for (const auto& [key, tensor] : half) {
    EXPECT_EQ(after.at(key).scalar_type(), key == "norm.num_batches_tracked" ? torch::kInt64
                                                                               : torch::kFloat32)
        << key;
    expect_identical(after.at(key), tensor.to(after.at(key).scalar_type()), key);
  }
}

TEST(StateDict, LoadsIntoACudaModule_CUDA) {
  if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA device";
  const Net source = random_net(1);
  Net target = random_net(2);
  target->to(torch::kCUDA);
  EXPECT_TRUE(scedit::load_state_dict(*target, snapshot(*source)).ok());
  EXPECT_TRUE(target->fc->weight.is_cuda());
  expect_identical(target->fc->weight.cpu(), source->fc->weight, "fc.weight");
}

}  // namespace
