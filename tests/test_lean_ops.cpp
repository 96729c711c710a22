// Tests of the training levers of examples/sd/{lean_ops,fused_ops,layers,transformer,unet}.hpp:
// the lean activations (GroupNorm + SiLU, GEGLU, the folded Linear, attention's backward) against
// the plain ops in float64, the memory their graphs keep, the UNet with every lever and with
// channels-last against the plain UNet and the fixtures, and the fused CUDA kernels (the *_CUDA
// tests, skipped without a GPU; kernels_emulated.cpp runs the kernels on the CPU).

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <common/counting_allocator.hpp>
#include <scedit/compat.hpp>
#include <sd/unet.hpp>

#include "sd_fixtures.hpp"
#include "test_util.hpp"

#include <cmath>
#include <cstdio>
#include <functional>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

namespace {

using ::testing::AllOf;
using ::testing::HasSubstr;
using scedit_test::error_of;
using scedit_test::float64_leaf;
using scedit_test::fused_tolerance;
using scedit_test::Models;
using scedit_test::randomize_affine;
using scedit_test::rel_err;
using scedit_test::run_base;
using scedit_test::tiny_unet;
using scedit_test::unet_case;

/// Runs `fn` (which builds a graph) and returns the CPU bytes it leaves held: the tensors its
/// autograd graph saved for backward, plus its output.
int64_t bytes_held_after(const std::function<torch::Tensor()>& fn, torch::Tensor& keep) {
  auto& counter = common::CountingCPUAllocator::install();
  const int64_t before = counter.current();
  keep = fn();
  return counter.current() - before;
}

// ---- lean activations (training-memory levers) --------------------------------------------------

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
  EXPECT_THAT(error_of([&] { sd::group_norm_silu(torch::randn({2, 8, 4}), *norm); }),
              AllOf(HasSubstr("[2, 8, 4]"), HasSubstr("12 channels")));
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
  EXPECT_THAT(error_of([] { sd::geglu(torch::randn({2, 5})); }), AllOf(HasSubstr("[2, 5]"), HasSubstr("even")));
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

// ---- the UNet with the levers ------------------------------------------------------------------

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

// ---- fused CUDA kernels ------------------------------------------------------------------------

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
  EXPECT_THAT(error_of([&] { sd::fused::group_norm_silu(torch::randn({1, 4, 2, 2}), *norm); }),
              AllOf(HasSubstr("fused group_norm_silu"), HasSubstr(reason)));
  EXPECT_THAT(error_of([&] { sd::fused::geglu(torch::randn({3, 8})); }),
              AllOf(HasSubstr("fused geglu"), HasSubstr(reason)));
  torch::nn::LayerNorm layer_norm(torch::nn::LayerNormOptions({8}));
  EXPECT_THAT(error_of([&] { sd::fused::layer_norm(torch::randn({3, 8}), *layer_norm); }),
              AllOf(HasSubstr("fused layer_norm"), HasSubstr(reason)));
  if (sd::fused::available() && torch::cuda::is_available()) {  // a shape not ending in the normalized one
    const auto wrong = torch::randn({3, 6}, torch::Device(torch::kCUDA, 0));
    EXPECT_THAT(error_of([&] { sd::fused::layer_norm(wrong, *layer_norm); }),
                AllOf(HasSubstr("fused layer_norm"), HasSubstr("[3, 6]"), HasSubstr("[8]")));
  }
  sd::LeanActivations lean;
  lean.fused_norm_silu = true;
  EXPECT_THAT(error_of([&] { sd::norm_silu(torch::randn({1, 4, 2, 2}), *norm, lean); }),
              AllOf(HasSubstr("fused group_norm_silu"), HasSubstr(reason)));
}

}  // namespace
