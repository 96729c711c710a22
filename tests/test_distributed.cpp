// Training on several processes (examples/common): the sample order of each rank, the batch
// layout a checkpoint records (and resumes on another number of processes), and the gradient
// reducer: two ranks as two threads of this process, averaging while the backward pass runs.
// The programs on several processes: tests/programs/distributed_*.cmake.

#include <common/checkpoint.hpp>
#include <common/distributed.hpp>
#include <common/gradient_reducer.hpp>
#include <common/launcher.hpp>
#include <common/sample_order.hpp>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>
#include <torch/torch.h>

#include <set>
#include <string>
#include <thread>
#include <vector>

#include "test_util.hpp"

namespace {

using scedit_test::error_of;

TEST(Distributed, SampleOrderIsAPureFunctionAndShardsEveryEpochAcrossProcesses) {
  const int64_t n = 10, batch = 2;
  common::SampleOrder a(n, batch, /*seed=*/4), b(n, batch, 4), other(n, batch, 5);
  EXPECT_EQ(a.indices(7), b.indices(7));
  EXPECT_EQ(a.indices(3), b.indices(3)) << "steps can be asked in any order after a resume";
  bool differs = false;
  for (int64_t m = 0; m < 5; ++m) differs |= a.indices(m) != other.indices(m);
  EXPECT_TRUE(differs) << "seeds 4 and 5 gave the same order";
  // One process: each epoch (5 micro-steps of 2) is a permutation.
  for (int64_t epoch = 0; epoch < 3; ++epoch) {
    std::multiset<int64_t> seen;
    common::SampleOrder order(n, batch, 4);
    for (int64_t m = 5 * epoch; m < 5 * (epoch + 1); ++m) {
      for (auto i : order.indices(m)) seen.insert(i);
    }
    EXPECT_EQ(seen, (std::multiset<int64_t>{0, 1, 2, 3, 4, 5, 6, 7, 8, 9})) << "epoch " << epoch;
  }
  // Two processes: micro-step m of both together is micro-steps 2m and 2m+1 of one process, so
  // every sample is seen once per epoch across them and no two processes see the same one.
  common::SampleOrder single(n, batch, 4), rank0(n, batch, 4, 0, 2), rank1(n, batch, 4, 1, 2);
  std::multiset<int64_t> seen;
  for (int64_t m = 0; m < 6; ++m) {
    EXPECT_EQ(rank0.indices(m), single.indices(2 * m)) << m;
    EXPECT_EQ(rank1.indices(m), single.indices(2 * m + 1)) << m;
  }
  EXPECT_NE(error_of([] { common::SampleOrder(n, batch, 4, 2, 2); }).find("rank 2 is not in a world of 2"),
            std::string::npos);
}

TEST(Distributed, BatchLayoutKeepsTheGlobalBatchAndReadsEarlierCheckpoints) {
  const common::BatchLayout two{2, 2, 1};
  EXPECT_EQ(two.images(), 4);
  EXPECT_EQ(two.describe(), "4 (2 processes × batch 2 × accumulation 1)");
  // Recorded under "layout", and taken out again: what is compared on resume is the global batch.
  auto recorded = two.put_into({{"method", "scedit"}, {"global_batch", 4}});
  const auto taken = common::BatchLayout::take_from(recorded);
  EXPECT_TRUE(taken == two);
  EXPECT_EQ(recorded, nlohmann::json({{"method", "scedit"}, {"global_batch", 4}}));
  // A checkpoint of an earlier version: batch_size and grad_accum at the top, one process.
  nlohmann::json earlier = {{"method", "lora"}, {"batch_size", 2}, {"grad_accum", 3}};
  const auto old = common::BatchLayout::take_from(earlier);
  EXPECT_TRUE(old == (common::BatchLayout{1, 2, 3}));
  EXPECT_EQ(earlier, nlohmann::json({{"method", "lora"}, {"global_batch", 6}}));
  EXPECT_FALSE(old == (common::BatchLayout{2, 1, 3})) << "the same global batch, another layout";
}

#if SCEDIT_WITH_C10D
// Runs `body(dist)` as ranks 0 and 1 of a world of two, as two threads of this process (Gloo on
// 127.0.0.1); an exception in either fails the test, naming the rank.
template <typename Body>
void on_two_ranks(Body body) {
  common::DistributedFlags flags;
  flags.world_size = 2;
  flags.master_addr = "127.0.0.1";
  flags.master_port = common::free_local_port();
  flags.timeout = 60;
  std::vector<std::string> errors(2);
  auto rank_body = [&](int64_t rank) {
    try {
      auto mine = flags;
      mine.rank = rank;
      common::Distributed dist(mine, torch::kCPU);
      body(dist);
    } catch (const std::exception& e) {
      errors[rank] = e.what();
    }
  };
  std::thread other(rank_body, 1);
  rank_body(0);
  other.join();
  EXPECT_TRUE(errors[0].empty()) << "rank 0: " << errors[0];
  EXPECT_TRUE(errors[1].empty()) << "rank 1: " << errors[1];
}

// --nproc starts the whole world itself: with --rank, another --world-size, or under a launcher
// that set RANK, the ranks would wait for others that never come. Refused before anything starts;
// the ranks --nproc starts (RANK set, and its mark) pass.
TEST(Distributed, LaunchThatContradictsItselfIsRefusedAtOnce) {
  ::unsetenv("RANK");
  ::unsetenv(common::kLaunchedByNproc);
  EXPECT_NO_THROW(common::check_launch(1, 3, 7));  // no --nproc: nothing to contradict
  EXPECT_NO_THROW(common::check_launch(2, -1, 2));
  EXPECT_NE(scedit_test::error_of([] { common::check_launch(2, 1, 0); }).find("give --nproc or --rank, not both"),
            std::string::npos);
  EXPECT_NE(scedit_test::error_of([] { common::check_launch(2, -1, 3); }).find("--nproc 2 with --world-size 3"),
            std::string::npos);
  ::setenv("RANK", "1", 1);
  EXPECT_NE(scedit_test::error_of([] { common::check_launch(2, -1, 0); }).find("as RANK 1 (torchrun?)"),
            std::string::npos);
  ::setenv(common::kLaunchedByNproc, "1", 1);
  EXPECT_NO_THROW(common::check_launch(2, -1, 0));
  ::unsetenv("RANK");
  ::unsetenv(common::kLaunchedByNproc);
}

// Two ranks as two threads of this process (Gloo on 127.0.0.1), each with a chain of four
// matrices y = x·W4·W3·W2·W1 (the parameters listed as W1, W4, W2, W3) and one parameter the loss
// never reaches, two micro-steps a step, buckets of one matrix: the gradients are the mean of the
// two ranks' accumulated ones (the unreached parameter's zeros); the first step learns the order
// in which the backward pass reaches them (W1 first, then W2, W3, W4) and the second starts its
// buckets in that order while the backward pass runs.
TEST(Distributed, ReducerAveragesWhileTheBackwardPassRuns) {
  auto inputs_of = [](int64_t rank, int64_t micro) {
    auto generator = common::step_generator(7, 2 * rank + micro);
    return torch::randn({3, 4}, generator);
  };
  auto make_params = [] {
    auto generator = common::step_generator(8, 0);
    std::vector<torch::Tensor> params;
    for (int i = 0; i < 4; ++i) params.push_back((torch::randn({4, 4}, generator) / 2).requires_grad_());
    params.push_back(torch::zeros({2}).requires_grad_());  // the loss never reaches it
    return params;
  };
  // y = x·W4·W3·W2·W1 with params {W1, W4, W2, W3, unused}: the backward reaches W1 first.
  auto loss_of = [](const std::vector<torch::Tensor>& p, const torch::Tensor& x) {
    return x.mm(p[1]).mm(p[3]).mm(p[2]).mm(p[0]).square().sum();
  };
  std::vector<std::vector<torch::Tensor>> reduced(2);
  std::vector<std::vector<std::vector<size_t>>> buckets(2);
  std::vector<common::ReducerStats> stats(2);
  on_two_ranks([&](common::Distributed& dist) {
    const auto rank = dist.rank();
    auto params = make_params();
    common::ReducerOptions options;
    options.first_bucket_bytes = options.bucket_bytes = 64;  // one matrix each
    common::GradientReducer reducer(dist, params, options);
    for (int step = 0; step < 2; ++step) {
      for (int64_t micro = 0; micro < 2; ++micro) {
        reducer.begin_backward(micro == 1);
        loss_of(params, inputs_of(rank, micro)).backward();
      }
      reducer.finish();
      if (step == 0) {
        buckets[rank] = reducer.buckets();
        for (auto& p : params) p.mutable_grad().zero_();
      }
    }
    for (const auto& p : params) reduced[rank].push_back(p.grad().clone());
    stats[rank] = reducer.stats();
  });
  ASSERT_FALSE(HasFailure());
  // What each rank's two micro-steps give without any reduction.
  std::vector<std::vector<torch::Tensor>> local(2);
  for (int64_t rank = 0; rank < 2; ++rank) {
    auto params = make_params();
    for (int64_t micro = 0; micro < 2; ++micro) loss_of(params, inputs_of(rank, micro)).backward();
    for (const auto& p : params) local[rank].push_back(p.grad().defined() ? p.grad() : torch::zeros_like(p));
  }
  const std::vector<std::vector<size_t>> arrival_order{{0}, {2}, {3}, {1}, {4}};
  for (int64_t rank = 0; rank < 2; ++rank) {
    ASSERT_EQ(reduced[rank].size(), 5u);
    // The second step's gradients only: finish overwrote the first's.
    for (size_t i = 0; i < 5; ++i) {
      EXPECT_TRUE(torch::allclose(reduced[rank][i], (local[0][i] + local[1][i]) / 2, 1e-6, 1e-6)) << i;
    }
    EXPECT_TRUE(torch::equal(reduced[rank][0], reduced[1 - rank][0])) << "ranks differ";
    EXPECT_EQ(buckets[rank], arrival_order) << "rank " << rank;
    EXPECT_EQ(stats[rank].steps, 2);
    EXPECT_EQ(stats[rank].buckets, 10);
    // Step 2 starts W1's to W4's buckets in the backward pass (the unreached one's waits for
    // finish). Step 1 lays them out in the reversed listing, the unreached one first: nothing
    // starts before finish.
    EXPECT_EQ(stats[rank].started_in_backward, 4);
  }
}

// A tensor whose gradient comes twice in one backward pass after its bucket's all-reduce started
// (here: a second backward pass marked as the same last one) is refused, naming it, rather than
// changed under the all-reduce.
TEST(Distributed, ReducerRefusesASecondGradientAfterItsBucketStarted) {
  std::vector<std::string> errors(2);
  on_two_ranks([&](common::Distributed& dist) {
    auto weight = torch::ones({4}).requires_grad_();
    common::GradientReducer reducer(dist, {weight});
    reducer.begin_backward(true);
    (weight * 2).sum().backward();  // its only bucket starts
    try {
      (weight * 3).sum().backward();
    } catch (const std::exception& e) {
      errors[dist.rank()] = e.what();
    }
    reducer.finish();
  });
  for (const auto& error : errors) {
    EXPECT_NE(error.find("trainable tensor 0 received a second gradient in one backward pass after its bucket's "
                         "all-reduce had started"), std::string::npos) << error;
  }
}
#endif

}  // namespace
