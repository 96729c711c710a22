// What a training run leaves on disk (examples/common): checkpoints that are complete or absent,
// checksummed, refused by name when damaged or impossible (with `--resume latest` falling back
// to an intact one), and an output folder that one run holds at a time.

#include <common/checkpoint.hpp>
#include <common/output_lock.hpp>

#include <gtest/gtest.h>
#include <torch/torch.h>

#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <limits>
#include <memory>
#include <string>

#include "test_util.hpp"

namespace fs = std::filesystem;
using scedit_test::error_of;

class Checkpoints : public ::testing::Test {
 protected:
  void SetUp() override {
    torch::manual_seed(0);
    layer = torch::nn::Linear(3, 2);
    optimizer = std::make_unique<torch::optim::AdamW>(layer->parameters(), torch::optim::AdamWOptions(0.1));
    layer(torch::randn({4, 3})).sum().backward();
    optimizer->step();  // give AdamW some state
    tensors = {{"weight", layer->weight}, {"bias", layer->bias}};
    root = scratch.path();
  }
  common::TrainState state(int64_t step) { return {step, 7, 1.0, {{"method", "scedit"}}}; }

  torch::nn::Linear layer{nullptr};
  std::unique_ptr<torch::optim::AdamW> optimizer;
  scedit::TensorMap tensors;
  scedit_test::TempDir scratch{"checkpoints"};
  fs::path root;
};

TEST_F(Checkpoints, RoundTripRestoresWeightsOptimizerAndState) {
  const auto saved_weight = layer->weight.detach().clone();
  common::save_checkpoint(root, tensors, *optimizer, state(10), 0);
  {
    torch::NoGradGuard no_grad;
    layer->weight.zero_();
  }
  auto fresh = torch::optim::AdamW(layer->parameters(), torch::optim::AdamWOptions(0.1));
  auto loaded = common::load_checkpoint(common::resolve_checkpoint(root, "latest"), tensors, fresh);
  EXPECT_EQ(loaded.step, 10);
  EXPECT_EQ(loaded.seed, 7u);
  EXPECT_EQ(loaded.run.at("method"), "scedit");
  EXPECT_TRUE(torch::equal(layer->weight, saved_weight));
  EXPECT_EQ(fresh.state().size(), optimizer->state().size());
}

TEST_F(Checkpoints, KeepsOnlyTheNewestAndIgnoresUnfinishedSaves) {
  for (int64_t step : {10, 20, 30}) common::save_checkpoint(root, tensors, *optimizer, state(step), 2);
  auto all = common::list_checkpoints(root);
  ASSERT_EQ(all.size(), 2u);
  EXPECT_EQ(all.back().filename(), "step-00000030");
  // A save that crashed midway leaves a temporary folder: never picked, whatever it holds.
  fs::create_directories(root / "step-00000040.tmp-999");
  std::ofstream(root / "step-00000040.tmp-999" / "state.json") << "{}";
  EXPECT_EQ(common::resolve_checkpoint(root, "latest").folder.filename(), "step-00000030");
  // The next run removes it (and the atomic writer's temporaries), but no checkpoint.
  std::ofstream(root / ".tuners.safetensors.tmp.a1B2c3") << "half";
  EXPECT_EQ(common::remove_stale_temporaries(root), 2);
  EXPECT_FALSE(fs::exists(root / "step-00000040.tmp-999"));
  EXPECT_EQ(common::list_checkpoints(root), all);
}

TEST_F(Checkpoints, KeepLastLeavesLaterCheckpointsAlone) {
  // Resumed from step 10 with a step-30 checkpoint beside it: saving step 20 may remove step 10,
  // never the later one.
  for (int64_t step : {10, 30}) common::save_checkpoint(root, tensors, *optimizer, state(step), 0);
  common::save_checkpoint(root, tensors, *optimizer, state(20), 1);
  const auto all = common::list_checkpoints(root);
  ASSERT_EQ(all.size(), 2u);
  EXPECT_EQ(all[0].filename(), "step-00000020");
  EXPECT_EQ(all[1].filename(), "step-00000030");
}

TEST_F(Checkpoints, DamagedBytesAreFoundAndLatestFallsBackToAnIntactOne) {
  common::save_checkpoint(root, tensors, *optimizer, state(10), 0);
  const auto newest = common::save_checkpoint(root, tensors, *optimizer, state(20), 0);
  // Flip one byte of the last tensor's data: the file still parses as safetensors.
  const auto weights = newest / "tuners.safetensors";
  {
    std::fstream file(weights, std::ios::in | std::ios::out | std::ios::binary);
    file.seekg(-1, std::ios::end);
    const char byte = static_cast<char>(file.get() ^ 0x10);
    file.seekp(-1, std::ios::end);
    file.put(byte);
  }
  EXPECT_NO_THROW(scedit::safetensors::load(weights.string()));
  const auto message = error_of([&] { common::verify_checkpoint(newest); });
  EXPECT_NE(message.find(weights.string()), std::string::npos) << message;
  EXPECT_NE(message.find("damaged"), std::string::npos) << message;
  EXPECT_NE(error_of([&] { common::resolve_checkpoint(root, newest.string()); }).find("damaged"), std::string::npos);
  testing::internal::CaptureStdout();
  const auto chosen = common::resolve_checkpoint(root, "latest");
  const auto said = testing::internal::GetCapturedStdout();
  EXPECT_EQ(chosen.folder.filename(), "step-00000010");
  EXPECT_EQ(chosen.state.step, 10);
  EXPECT_NE(said.find("passing over " + newest.string()), std::string::npos) << said;
  // Both damaged: nothing to resume from.
  std::ofstream(root / "step-00000010" / "optimizer.pt", std::ios::app) << "x";
  EXPECT_NE(error_of([&] { common::resolve_checkpoint(root, "latest"); }).find("none of the 2 checkpoints"),
            std::string::npos);
}

TEST_F(Checkpoints, ImpossibleStatesAreRefused) {
  auto folder = common::save_checkpoint(root, tensors, *optimizer, state(10), 0);
  auto json = nlohmann::json::parse(std::ifstream(folder / "state.json"));
  json["step"] = 999999;
  std::ofstream(folder / "state.json") << json.dump();
  auto message = error_of([&] { common::verify_checkpoint(folder); });
  EXPECT_NE(message.find("says step 999999, its folder's name step 10"), std::string::npos) << message;
  json["step"] = 10;
  json["loss_scale"] = -1.0;
  std::ofstream(folder / "state.json") << json.dump();
  message = error_of([&] { common::verify_checkpoint(folder); });
  EXPECT_NE(message.find("loss scale of -1"), std::string::npos) << message;
  // Non-finite weights whose checksum matches (saved so): refused at load.
  {
    torch::NoGradGuard no_grad;
    layer->bias.fill_(std::numeric_limits<float>::quiet_NaN());
  }
  folder = common::save_checkpoint(root, tensors, *optimizer, state(20), 0);
  message = error_of([&] { common::load_checkpoint(common::verify_checkpoint(folder), tensors, *optimizer); });
  EXPECT_NE(message.find("tensor 'bias' [2] holds 2 NaN"), std::string::npos) << message;
}

TEST_F(Checkpoints, CorruptCheckpointsAreRefusedByName) {
  auto folder = common::save_checkpoint(root, tensors, *optimizer, state(10), 0);
  // Truncated weights.
  fs::resize_file(folder / "tuners.safetensors", fs::file_size(folder / "tuners.safetensors") - 5);
  auto message = error_of([&] { common::load_checkpoint(common::verify_checkpoint(folder), tensors, *optimizer); });
  EXPECT_NE(message.find("tuners.safetensors"), std::string::npos) << message;
  // Broken state.json.
  folder = common::save_checkpoint(root, tensors, *optimizer, state(20), 0);
  std::ofstream(folder / "state.json") << "{\"step\": ";
  message = error_of([&] { common::load_checkpoint(common::verify_checkpoint(folder), tensors, *optimizer); });
  EXPECT_NE(message.find("state.json"), std::string::npos) << message;
  // Garbage optimizer state.
  folder = common::save_checkpoint(root, tensors, *optimizer, state(30), 0);
  std::ofstream(folder / "optimizer.pt") << "not a torch archive";
  message = error_of([&] { common::load_checkpoint(common::verify_checkpoint(folder), tensors, *optimizer); });
  EXPECT_NE(message.find("optimizer.pt"), std::string::npos) << message;
  // Another run's tensors.
  folder = common::save_checkpoint(root, tensors, *optimizer, state(40), 0);
  scedit::TensorMap other = {{"weight", layer->weight}};
  message = error_of([&] { common::load_checkpoint(common::verify_checkpoint(folder), other, *optimizer); });
  EXPECT_NE(message.find("another method or model"), std::string::npos) << message;
  EXPECT_NE(error_of([&] { common::resolve_checkpoint(root / "none", "latest"); }).find("no complete checkpoint"),
            std::string::npos);
}

TEST(OutputLock, RefusesASecondHolderNamingTheFirst) {
  scedit_test::TempDir dir("lock");
  const auto folder = dir.path() / "out";
  {
    common::OutputLock held(folder);
    const auto message = error_of([&] { common::OutputLock second(folder); });
    EXPECT_NE(message.find("is in use by another run (pid " + std::to_string(::getpid()) + " on "),
              std::string::npos) << message;
  }
  EXPECT_NO_THROW(common::OutputLock again(folder));  // released with its holder
}
