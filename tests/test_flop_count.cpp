// bench/flop_count.hpp: the FLOPs the benches set against the device's matmul throughput, counted
// from the operators' shapes — each kind against a count by hand, forward and backward, and no
// product counted twice when one operator runs another (matmul → mm).

#include "../bench/flop_count.hpp"

#include <gtest/gtest.h>
#include <torch/torch.h>

#include <vector>

namespace {

// The FLOPs counted while `body` runs.
template <typename Body>
double counted(Body body) {
  bench::FlopCount count;
  body();
  EXPECT_EQ(count.unreadable_operators(), 0);
  return count.flops();
}

TEST(FlopCount, MatrixProductsForwardAndBackward) {
  EXPECT_EQ(counted([] { torch::randn({3, 4}).mm(torch::randn({4, 5})); }), 2 * 3 * 4 * 5);
  EXPECT_EQ(counted([] { torch::addmm(torch::randn({5}), torch::randn({3, 4}), torch::randn({4, 5})); }), 2 * 3 * 4 * 5);
  EXPECT_EQ(counted([] { torch::randn({2, 3, 4}).bmm(torch::randn({2, 4, 5})); }), 2 * 2 * 3 * 4 * 5);
  EXPECT_EQ(counted([] { torch::baddbmm(torch::randn({2, 3, 5}), torch::randn({2, 3, 4}), torch::randn({2, 4, 5})); }),
            2 * 2 * 3 * 4 * 5);
  // matmul of [2, 3, 4] by [4, 5] runs one mm of [6, 4] by [4, 5]: counted once.
  EXPECT_EQ(counted([] { torch::randn({2, 3, 4}).matmul(torch::randn({4, 5})); }), 2 * 6 * 4 * 5);
  // A linear layer: the forward product, then the input's and the weight's gradients, one each.
  torch::nn::Linear linear(4, 5);
  const auto x = torch::randn({3, 4}, torch::requires_grad());
  EXPECT_EQ(counted([&] { linear(x).sum().backward(); }), 3 * (2 * 3 * 4 * 5));
}

TEST(FlopCount, ConvolutionsForwardAndBackward) {
  // 2 × output elements × input channels per group × kernel positions.
  const auto weight = torch::randn({3, 2, 3, 3}, torch::requires_grad());
  const double same = 2.0 * (3 * 8 * 8) * (2 * 9);
  EXPECT_EQ(counted([&] { torch::conv2d(torch::randn({1, 2, 8, 8}), weight, {}, 1, 1); }), same);
  EXPECT_EQ(counted([&] { torch::conv2d(torch::randn({1, 2, 9, 9}), weight, {}, 2, 1); }), 2.0 * (3 * 5 * 5) * (2 * 9));
  const auto grouped = torch::randn({4, 1, 3, 3});
  EXPECT_EQ(counted([&] { torch::conv2d(torch::randn({2, 2, 6, 6}), grouped, {}, 1, 1, 1, 2); }),
            2.0 * (2 * 4 * 6 * 6) * (1 * 9));
  // Transposed: each input element meets the whole kernel of every output channel.
  EXPECT_EQ(counted([] { torch::conv_transpose2d(torch::randn({1, 2, 4, 4}), torch::randn({2, 3, 3, 3})); }),
            2.0 * (2 * 4 * 4) * (3 * 9));
  // Backward: the input's gradient and the weight's, each as much as the forward; without the
  // input's gradient, the weight's alone.
  const auto x = torch::randn({1, 2, 8, 8}, torch::requires_grad());
  EXPECT_EQ(counted([&] { torch::conv2d(x, weight, {}, 1, 1).sum().backward(); }), 3 * same);
  EXPECT_EQ(counted([&] { torch::conv2d(torch::randn({1, 2, 8, 8}), weight, {}, 1, 1).sum().backward(); }), 2 * same);
}

TEST(FlopCount, FusedAttentionFromItsShapes) {
  // LibTorch 2.x's kernels (not run by this LibTorch): query [1, 2, 3, 4], key [1, 2, 5, 4],
  // value [1, 2, 5, 6]: Q·Kᵀ 2·1·2·3·5·4 and P·V 2·1·2·3·5·6; a backward (its first input the
  // output's gradient) twice that.
  const std::vector<c10::IValue> forward{torch::zeros({1, 2, 3, 4}), torch::zeros({1, 2, 5, 4}), torch::zeros({1, 2, 5, 6})};
  const std::vector<c10::IValue> backward{torch::zeros({1, 2, 3, 6}), torch::zeros({1, 2, 3, 4}),
                                          torch::zeros({1, 2, 5, 4}), torch::zeros({1, 2, 5, 6})};
  const double products = 2.0 * 1 * 2 * 3 * 5 * (4 + 6);
  const c10::ArrayRef<const c10::IValue> forward_inputs(forward.data(), forward.size()),
      backward_inputs(backward.data(), backward.size());
  for (const char* name : {"aten::_scaled_dot_product_flash_attention", "aten::_scaled_dot_product_efficient_attention",
                           "aten::_scaled_dot_product_cudnn_attention"}) {
    EXPECT_EQ(bench::FlopCount::of(name, forward_inputs), products) << name;
    EXPECT_EQ(bench::FlopCount::of(std::string(name) + "_backward", backward_inputs), 2 * products) << name;
  }
  EXPECT_EQ(bench::FlopCount::of("aten::softmax", forward_inputs), 0) << "not a product";
}

TEST(FlopCount, OneCountAtATime) {
  bench::FlopCount first;
  EXPECT_THROW(bench::FlopCount second, c10::Error);
}

}  // namespace
