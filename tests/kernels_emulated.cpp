// The fused CUDA kernels (examples/sd/kernels/fused_kernels.cuh) run on the CPU through a host
// emulation of CUDA's threads (kernel_emulation.hpp), on machines without a GPU: the launchers,
// vector and scalar paths, block reductions and backward formulas against float64; then the
// autograd functions of sd/fused_ops.hpp on CPU tensors, and a UNet with every fused lever
// against the plain one. On a GPU the same are the *_CUDA tests of test_lean_ops.cpp.

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <torch/torch.h>

// The kernels and their launchers, compiled for the host: fused_kernels.cuh includes the
// emulation that this names before any CUDA header.
#define SD_KERNELS_HOST_EMULATION "kernel_emulation.hpp"
#include <sd/kernels/fused_kernels.cuh>

// sd/fused_ops.hpp then wraps those launchers, on CPU tensors.
#define SCEDIT_FUSED_KERNELS 1
#define SCEDIT_FUSED_KERNELS_EMULATED 1
#include <sd/config.hpp>
#include <sd/unet.hpp>

#include "sd_fixtures.hpp"
#include "test_util.hpp"

#include <functional>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace {

namespace k = sd::kernels;

using ::testing::HasSubstr;
using scedit_test::error_of;
using scedit_test::float64_leaf;
using scedit_test::fused_tolerance;
using scedit_test::randomize_affine;
using scedit_test::rel_err;

k::ElementType element_type(torch::Dtype dtype) {
  return dtype == torch::kFloat32 ? k::ElementType::kFloat32
         : dtype == torch::kBFloat16 ? k::ElementType::kBFloat16
                                     : k::ElementType::kFloat16;
}

const float* data_or_null(const torch::Tensor& t) { return t.defined() ? t.data_ptr<float>() : nullptr; }

/// Runs `body` with the element-wise kernels indexing in 32 bits (what these sizes get), then in
/// 64 bits (what tensors of 2^31 elements and more get).
void for_both_index_widths(const std::function<void()>& body) {
  const int64_t narrow = k::narrow_index_limit;
  for (const int64_t limit : {narrow, int64_t{0}}) {
    SCOPED_TRACE(limit == 0 ? "64-bit indices" : "32-bit indices");
    k::narrow_index_limit = limit;
    body();
  }
  k::narrow_index_limit = narrow;
}

struct NormCase {
  int64_t n, c, spatial, groups;
  bool affine;
};

void group_norm_silu_matches_float64(torch::Dtype dtype) {
  torch::manual_seed(0);
  // Rows of 16 and 600 take the 16-byte vector path (600 = 150 float4 loads over 256 threads);
  // rows of 35 and 3 the scalar one; 8 groups of one channel and one group of all.
  for (const auto& c : std::vector<NormCase>{{2, 8, 16, 4, true}, {1, 4, 600, 2, true}, {2, 6, 35, 3, false},
                                             {3, 8, 3, 8, true}, {1, 6, 16, 1, true}}) {
    SCOPED_TRACE(::testing::Message() << c.n << "x" << c.c << "x" << c.spatial << " groups " << c.groups
                                      << " affine " << c.affine << " " << dtype);
    const auto x = (torch::randn({c.n, c.c, c.spatial}) * 3 + 1.5).to(dtype);
    const auto grad_y = torch::randn({c.n, c.c, c.spatial}).to(dtype);
    torch::Tensor weight, bias;
    if (c.affine) {
      weight = torch::randn({c.c}) * 0.5 + 1;
      bias = torch::randn({c.c}) * 0.5;
    }
    auto x64 = float64_leaf(x), w64 = float64_leaf(weight), b64 = float64_leaf(bias);
    const auto expected = torch::silu(torch::group_norm(x64, c.groups, w64, b64, 1e-5));
    expected.backward(grad_y.to(torch::kFloat64));
    const auto grouped = x64.detach().reshape({c.n, c.groups, -1});
    const auto expected_mean = grouped.mean(-1);
    const auto expected_rstd = (grouped.var(-1, /*unbiased=*/false) + 1e-5).rsqrt();

    const k::GroupNormShape shape{c.n, c.c, c.spatial, c.groups};
    auto y = torch::empty_like(x), mean = torch::empty({c.n, c.groups}), rstd = torch::empty({c.n, c.groups});
    auto workspace = torch::empty({2 * c.n * c.c});
    k::group_norm_silu_forward(element_type(dtype), x.data_ptr(), data_or_null(weight), data_or_null(bias), shape,
                               1e-5f, y.data_ptr(), mean.data_ptr<float>(), rstd.data_ptr<float>(),
                               workspace.data_ptr<float>(), nullptr);
    EXPECT_LE(rel_err(mean, expected_mean), 1e-6);
    EXPECT_LE(rel_err(rstd, expected_rstd), 1e-6);
    EXPECT_LE(rel_err(y, expected), fused_tolerance(dtype));

    auto grad_x = torch::empty_like(x), row_sums = torch::empty({2, c.n, c.c});
    auto coefficients = torch::empty({2 * c.n * c.groups});
    k::group_norm_silu_backward(element_type(dtype), grad_y.data_ptr(), x.data_ptr(), data_or_null(weight),
                                data_or_null(bias), mean.data_ptr<float>(), rstd.data_ptr<float>(), shape,
                                grad_x.data_ptr(), row_sums[0].data_ptr<float>(), row_sums[1].data_ptr<float>(),
                                coefficients.data_ptr<float>(), nullptr);
    EXPECT_LE(rel_err(grad_x, x64.grad()), 2 * fused_tolerance(dtype));
    if (c.affine) {
      // The affine gradients from the row sums, as fused_kernels.h states them.
      auto per_channel = [&](const torch::Tensor& stat) { return stat.repeat_interleave(c.c / c.groups, 1); };
      const auto grad_weight = ((row_sums[1] - per_channel(mean) * row_sums[0]) * per_channel(rstd)).sum(0);
      EXPECT_LE(rel_err(grad_weight, w64.grad()), 2 * fused_tolerance(dtype));
      EXPECT_LE(rel_err(row_sums[0].sum(0), b64.grad()), 2 * fused_tolerance(dtype));
    }
  }
}

void geglu_matches_float64(torch::Dtype dtype) {
  torch::manual_seed(0);
  // A gate of 64 takes the vector path, of 5 the scalar one.
  for (const auto& [rows, dim] : std::vector<std::pair<int64_t, int64_t>>{{6, 64}, {7, 5}}) {
    SCOPED_TRACE(::testing::Message() << rows << " rows of " << dim << ", " << dtype);
    const auto projected = (torch::randn({rows, 2 * dim}) * 2).to(dtype);
    const auto grad_out = torch::randn({rows, dim}).to(dtype);
    auto p64 = float64_leaf(projected);
    const auto parts = p64.chunk(2, -1);
    const auto expected = parts[0] * torch::gelu(parts[1]);
    expected.backward(grad_out.to(torch::kFloat64));

    auto out = torch::empty({rows, dim}, projected.options());
    k::geglu_forward(element_type(dtype), projected.data_ptr(), rows, dim, out.data_ptr(), nullptr);
    EXPECT_LE(rel_err(out, expected), fused_tolerance(dtype));
    auto grad_projected = torch::empty_like(projected);
    k::geglu_backward(element_type(dtype), grad_out.data_ptr(), projected.data_ptr(), rows, dim,
                      grad_projected.data_ptr(), nullptr);
    EXPECT_LE(rel_err(grad_projected, p64.grad()), 2 * fused_tolerance(dtype));
  }
}

void layer_norm_matches_float64(torch::Dtype dtype) {
  torch::manual_seed(0);
  struct Case {
    int64_t rows, dim;
    bool affine;
  };
  // Rows of 64 and 600 take the vector path (600: several rounds of the warp, the last partial);
  // of 35, the scalar one. 9 rows leave three warps of the last block idle.
  for (const auto& c : std::vector<Case>{{5, 64, true}, {2, 600, true}, {9, 35, true}, {3, 40, false}}) {
    SCOPED_TRACE(::testing::Message() << c.rows << " rows of " << c.dim << " affine " << c.affine << " " << dtype);
    const auto x = (torch::randn({c.rows, c.dim}) * 3 + 1.5).to(dtype);
    const auto grad_y = torch::randn({c.rows, c.dim}).to(dtype);
    torch::Tensor weight, bias, w64, b64;
    if (c.affine) {
      weight = torch::randn({c.dim}) * 0.5 + 1;
      bias = torch::randn({c.dim}) * 0.5;
      w64 = weight.to(torch::kFloat64);
      b64 = bias.to(torch::kFloat64);
    }
    auto x64 = float64_leaf(x);
    const auto expected = torch::layer_norm(x64, {c.dim}, w64, b64, 1e-5);
    expected.backward(grad_y.to(torch::kFloat64));
    const auto expected_rstd = (x64.detach().var(-1, /*unbiased=*/false) + 1e-5).rsqrt();

    auto y = torch::empty_like(x), mean = torch::empty({c.rows}), rstd = torch::empty({c.rows});
    k::layer_norm_forward(element_type(dtype), x.data_ptr(), data_or_null(weight), data_or_null(bias), c.rows, c.dim,
                          1e-5f, y.data_ptr(), mean.data_ptr<float>(), rstd.data_ptr<float>(), nullptr);
    EXPECT_LE(rel_err(mean, x64.detach().mean(-1)), 1e-6);
    EXPECT_LE(rel_err(rstd, expected_rstd), 1e-6);
    EXPECT_LE(rel_err(y, expected), fused_tolerance(dtype));
    auto grad_x = torch::empty_like(x);
    k::layer_norm_backward(element_type(dtype), grad_y.data_ptr(), x.data_ptr(), data_or_null(weight),
                           mean.data_ptr<float>(), rstd.data_ptr<float>(), c.rows, c.dim, grad_x.data_ptr(), nullptr);
    EXPECT_LE(rel_err(grad_x, x64.grad()), 2 * fused_tolerance(dtype));
  }
}

class EmulatedKernels : public ::testing::TestWithParam<torch::Dtype> {};

TEST_P(EmulatedKernels, GroupNormSiLUForwardAndBackwardMatchFloat64) {
  for_both_index_widths([this] { group_norm_silu_matches_float64(GetParam()); });
}

TEST_P(EmulatedKernels, GEGLUForwardAndBackwardMatchFloat64) {
  for_both_index_widths([this] { geglu_matches_float64(GetParam()); });
}

TEST_P(EmulatedKernels, LayerNormForwardAndBackwardMatchFloat64) { layer_norm_matches_float64(GetParam()); }

INSTANTIATE_TEST_SUITE_P(Kernels, EmulatedKernels,
                         ::testing::Values(torch::kFloat32, torch::kBFloat16, torch::kFloat16),
                         [](const auto& info) { return std::string(c10::toString(info.param)); });

TEST(EmulatedKernelsShapes, AreRefusedNamingTheProblem) {
  const auto uneven_groups = [] {
    k::group_norm_silu_forward(k::ElementType::kFloat32, nullptr, nullptr, nullptr, k::GroupNormShape{1, 6, 4, 4},
                               1e-5f, nullptr, nullptr, nullptr, nullptr, nullptr);
  };
  EXPECT_THROW(uneven_groups(), std::invalid_argument);
  EXPECT_THAT(error_of(uneven_groups), HasSubstr("6 channels in 4 groups"));
  const auto empty_rows = [] {
    k::layer_norm_forward(k::ElementType::kFloat32, nullptr, nullptr, nullptr, 4, 0, 1e-5f, nullptr, nullptr,
                          nullptr, nullptr);
  };
  EXPECT_THROW(empty_rows(), std::invalid_argument);
  EXPECT_THAT(error_of(empty_rows), HasSubstr("layer norm of 4 rows of 0 elements"));
  // Empty tensors launch nothing.
  EXPECT_NO_THROW(k::layer_norm_forward(k::ElementType::kFloat32, nullptr, nullptr, nullptr, 0, 8, 1e-5f, nullptr,
                                        nullptr, nullptr, nullptr));
  EXPECT_NO_THROW(k::geglu_forward(k::ElementType::kBFloat16, nullptr, 0, 8, nullptr, nullptr));
  EXPECT_NO_THROW(k::group_norm_silu_forward(k::ElementType::kFloat32, nullptr, nullptr, nullptr,
                                             k::GroupNormShape{0, 4, 4, 2}, 1e-5f, nullptr, nullptr, nullptr,
                                             nullptr, nullptr));
}

TEST(EmulatedFusedOps, GroupNormSiLUAutogradMatchesFloat64) {
  torch::manual_seed(0);
  for (const auto dtype : {torch::kFloat32, torch::kBFloat16}) {
    SCOPED_TRACE(::testing::Message() << dtype);
    torch::nn::GroupNorm norm(torch::nn::GroupNormOptions(4, 8).eps(1e-5));
    randomize_affine(*norm);
    norm->to(dtype);
    // A non-contiguous input (copied by the function) with two spatial dimensions.
    const auto x = (torch::randn({2, 8, 4, 6}) * 2 + 1).to(dtype).transpose(2, 3);
    const auto grad_y = torch::randn({2, 8, 6, 4}).to(dtype);
    auto x64 = float64_leaf(x), w64 = float64_leaf(norm->weight), b64 = float64_leaf(norm->bias);
    torch::silu(torch::group_norm(x64, 4, w64, b64, 1e-5)).backward(grad_y.to(torch::kFloat64));
    const auto expected = torch::silu(torch::group_norm(x64.detach(), 4, w64.detach(), b64.detach(), 1e-5));

    const auto xin = x.detach().requires_grad_(true);
    const auto got = sd::fused::group_norm_silu(xin, *norm);
    ASSERT_EQ(got.scalar_type(), dtype);
    got.backward(grad_y);
    EXPECT_LE(rel_err(got, expected), fused_tolerance(dtype));
    EXPECT_LE(rel_err(xin.grad(), x64.grad()), 2 * fused_tolerance(dtype));
    ASSERT_EQ(norm->weight.grad().scalar_type(), dtype);
    EXPECT_LE(rel_err(norm->weight.grad(), w64.grad()), 2 * fused_tolerance(dtype));
    EXPECT_LE(rel_err(norm->bias.grad(), b64.grad()), 2 * fused_tolerance(dtype));
  }
}

TEST(EmulatedFusedOps, GEGLUAutogradMatchesFloat64) {
  torch::manual_seed(0);
  for (const auto dtype : {torch::kFloat32, torch::kBFloat16}) {
    SCOPED_TRACE(::testing::Message() << dtype);
    const auto projected = (torch::randn({5, 3, 32}) * 2).to(dtype).transpose(0, 1);  // [3, 5, 32], strided
    const auto grad_out = torch::randn({3, 5, 16}).to(dtype);
    auto p64 = float64_leaf(projected);
    const auto parts = p64.chunk(2, -1);
    (parts[0] * torch::gelu(parts[1])).backward(grad_out.to(torch::kFloat64));
    const auto input = projected.detach().requires_grad_(true);
    const auto got = sd::fused::geglu(input);
    ASSERT_EQ(got.sizes(), grad_out.sizes());
    got.backward(grad_out);
    const auto expected = parts[0].detach() * torch::gelu(parts[1].detach());
    EXPECT_LE(rel_err(got, expected), fused_tolerance(dtype));
    EXPECT_LE(rel_err(input.grad(), p64.grad()), 2 * fused_tolerance(dtype));
  }
}

TEST(EmulatedFusedOps, LayerNormAutogradMatchesFloat64) {
  torch::manual_seed(0);
  for (const auto dtype : {torch::kFloat32, torch::kBFloat16}) {
    SCOPED_TRACE(::testing::Message() << dtype);
    torch::nn::LayerNorm norm(torch::nn::LayerNormOptions({4, 8}).eps(1e-5));  // two normalized dimensions
    randomize_affine(*norm);
    norm->to(dtype);
    const auto x = (torch::randn({3, 4, 5, 8}) * 2 + 1).to(dtype).transpose(1, 2);  // [3, 5, 4, 8], strided
    const auto grad_y = torch::randn({3, 5, 4, 8}).to(dtype);
    auto x64 = float64_leaf(x), w64 = float64_leaf(norm->weight), b64 = float64_leaf(norm->bias);
    const auto expected = torch::layer_norm(x64, {4, 8}, w64, b64, 1e-5);
    expected.backward(grad_y.to(torch::kFloat64));

    const auto xin = x.detach().requires_grad_(true);
    const auto got = sd::fused::layer_norm(xin, *norm);
    ASSERT_EQ(got.scalar_type(), dtype);
    got.backward(grad_y);
    EXPECT_LE(rel_err(got, expected.detach()), fused_tolerance(dtype));
    EXPECT_LE(rel_err(xin.grad(), x64.grad()), 2 * fused_tolerance(dtype));
    ASSERT_EQ(norm->weight.grad().scalar_type(), dtype);
    EXPECT_LE(rel_err(norm->weight.grad(), w64.grad()), 2 * fused_tolerance(dtype));
    EXPECT_LE(rel_err(norm->bias.grad(), b64.grad()), 2 * fused_tolerance(dtype));
  }
  // A tensor that does not end in the normalized shape is refused, naming both.
  torch::nn::LayerNorm norm(torch::nn::LayerNormOptions({8}));
  EXPECT_THAT(error_of([&] { sd::fused::layer_norm(torch::randn({3, 6}), *norm); }),
              HasSubstr("fused layer_norm: input [3, 6] does not end in the normalized shape [8]"));
}

TEST(EmulatedFusedOps, UNetWithEveryFusedLeverMatchesThePlainUNet) {
  // The tiny UNet of the fixtures' manifest, random weights: output and input gradient with every
  // GroupNorm + SiLU, GEGLU and LayerNorm on the fused kernels against the plain ops, in float32.
  // One sample of the smallest latent the UNet takes and a short context: the emulation is slow.
  const auto config = scedit_test::tiny_unet_config();
  torch::manual_seed(0);
  sd::UNet unet(config);
  for (auto& p : unet->parameters()) p.requires_grad_(false);
  const int64_t side = unet->downsampling_factor();
  const auto sample = torch::randn({1, config.in_channels, side, side});
  const auto timestep = torch::full({1}, 500, torch::kInt64);
  const auto context = torch::randn({1, 3, config.cross_attention_dim});
  auto run = [&](const sd::LeanActivations& lean) {
    unet->set_lean_activations(lean);
    const auto x = sample.clone().requires_grad_(true);
    const auto out = unet(x, timestep, context);
    out.square().mean().backward();
    return std::make_pair(out.detach(), x.grad());
  };
  const int64_t before = sd_kernels_emulation::launches;
  const auto [plain_out, plain_grad] = run(sd::LeanActivations{});
  EXPECT_EQ(sd_kernels_emulation::launches, before);
  sd::LeanActivations fused;
  fused.fused_norm_silu = fused.fused_geglu = fused.fused_layer_norm = true;
  const auto [fused_out, fused_grad] = run(fused);
  // Every GroupNorm + SiLU (two per resnet, the output norm) ran three kernels each way, every
  // GEGLU and LayerNorm one: the fused path ran everywhere.
  int64_t resnets = 0, gates = 0, layer_norms = 0;
  for (const auto& module : unet->modules()) {
    resnets += dynamic_cast<const sd::ResnetBlock2DImpl*>(module.get()) != nullptr;
    gates += dynamic_cast<const sd::GEGLUImpl*>(module.get()) != nullptr;
    layer_norms += dynamic_cast<const torch::nn::LayerNormImpl*>(module.get()) != nullptr;
  }
  EXPECT_GT(layer_norms, 0);
  EXPECT_EQ(sd_kernels_emulation::launches - before, 2 * 3 * (2 * resnets + 1) + 2 * gates + 2 * layer_norms);
  EXPECT_LE(rel_err(fused_out, plain_out), 1e-5);
  EXPECT_LE(rel_err(fused_grad, plain_grad), 1e-4);
}

}  // namespace
