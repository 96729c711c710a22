// LoRA layers and injection: options, wrappers (activation side), injection into LibTorch-style
// models (weight side), merging, several adapters, enabling, clone and printing. The files are
// in test_lora_io.cpp.

#include <scedit/lora.hpp>

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <cmath>
#include <memory>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#include "lora_models.hpp"
#include "test_util.hpp"

using ::testing::HasSubstr;
using scedit_test::error_of;
using scedit_test::max_diff;
using scedit_test::randomize_B;
using scedit_test::registered;
using scedit_test::TinyNet;

namespace {

/// Activation-side reference for one adapted Linear, by hand: W0 x + b + Σ w·s·B(A x).
torch::Tensor linear_ref(const torch::Tensor& x, const torch::nn::Linear& layer,
                         const scedit::LoRALayers& lora, const std::string& path) {
  auto y = x.matmul(registered(*layer, "weight").t()) + registered(*layer, "bias");
  auto l = lora.find(path);
  if (l == nullptr || !l->enabled()) return y;
  for (const auto& name : l->adapter_names()) {
    const auto& info = l->adapter(name);
    if (!info.enabled) continue;
    const auto& o = info.options;
    const double s =
        o.use_rslora() ? o.alpha() / std::sqrt(double(o.r())) : o.alpha() / double(o.r());
    y = y +
        info.weight * s * x.matmul(l->lora_A_weight(name).t()).matmul(l->lora_B_weight(name).t());
  }
  return y;
}

/// Activation-side reference for the whole TinyNet.
torch::Tensor tiny_ref(TinyNet& net, const torch::Tensor& x, const scedit::LoRALayers& lora) {
  auto& c = net->conv;
  auto h = torch::nn::functional::conv2d(
      x, registered(*c, "weight"),
      torch::nn::functional::Conv2dFuncOptions().stride(2).padding(1).bias(registered(*c, "bias")));
  if (auto l = lora.find("conv")) {
    const auto& o = l->adapter("default").options;
    auto a = torch::nn::functional::conv2d(
        x, l->lora_A_weight("default"),
        torch::nn::functional::Conv2dFuncOptions().stride(2).padding(1));
    h = h + o.alpha() / o.r() * torch::nn::functional::conv2d(a, l->lora_B_weight("default"));
  }
  h = h.flatten(2).transpose(1, 2);
  auto s = linear_ref(h, net->to_q, lora, "to_q") + linear_ref(h, net->to_k, lora, "to_k") +
           linear_ref(h, net->to_q_extra, lora, "to_q_extra");
  auto g = linear_ref(s, net->ff->geglu->proj, lora, "ff.net.0.proj").chunk(2, -1);
  return linear_ref(g[0] * torch::gelu(g[1]), net->ff->out, lora, "ff.net.2");
}

/// A module holding a wrapper, for clone().
struct HostImpl : torch::nn::Cloneable<HostImpl> {
  HostImpl() { reset(); }
  void reset() override {
    q = register_module("q",
                        scedit::LoRALinear(torch::nn::LinearOptions(4, 3), scedit::LoRAOptions(2)));
  }
  torch::Tensor forward(const torch::Tensor& x) { return q(x); }
  scedit::LoRALinear q{nullptr};
};
TORCH_MODULE(Host);

}  // namespace

class LoRA : public ::testing::Test {
 protected:
  void SetUp() override {
    torch::manual_seed(0);
    x_ = torch::randn({2, 3, 6, 6});
  }
  torch::Tensor x_;  // [2, 3, 6, 6]
};

TEST_F(LoRA, ScaleIsAlphaOverRankOrRoot) {
  EXPECT_DOUBLE_EQ(scedit::LoRAOptions(4).scale(), 2.0);  // peft's default alpha 8
  EXPECT_DOUBLE_EQ(scedit::LoRAOptions(4).alpha(16).scale(), 4.0);
  EXPECT_DOUBLE_EQ(scedit::LoRAOptions(16).alpha(8).use_rslora(true).scale(), 2.0);

  // W x + b + s·B A x by hand, float64, both scale rules.
  for (bool rs : {false, true}) {
    scedit::LoRALinear lin(torch::nn::LinearOptions(6, 5),
                           scedit::LoRAOptions(4).alpha(3).use_rslora(rs));
    lin->to(torch::kFloat64);
    randomize_B(scedit::find_lora_layers(*lin));
    const auto x = torch::randn({7, 6}, torch::kFloat64);
    const double s = rs ? 3.0 / 2.0 : 3.0 / 4.0;
    const auto A = lin->lora_A_weight("default"), B = lin->lora_B_weight("default");
    const auto ref = x.matmul(lin->base_layer->weight.t()) + lin->base_layer->bias +
                     s * x.matmul(A.t()).matmul(B.t());
    EXPECT_LT(max_diff(lin(x), ref), 1e-13) << "rslora " << rs;
  }
}

TEST_F(LoRA, InitIsPeftsDefaultOrGaussian) {
  scedit::LoRALinear lin(torch::nn::LinearOptions(512, 16), scedit::LoRAOptions(4));
  const double bound = 1.0 / std::sqrt(512.0);  // kaiming_uniform(a=√5): U(±1/√fan_in)
  const auto A = lin->lora_A_weight("default");
  EXPECT_EQ(A.sizes(), torch::IntArrayRef({4, 512}));
  EXPECT_LE(A.abs().max().item<double>(), bound);
  EXPECT_GT(A.abs().max().item<double>(), 0.95 * bound);
  EXPECT_TRUE(torch::equal(lin->lora_B_weight("default"), torch::zeros({16, 4})));

  scedit::LoRALinear gauss(torch::nn::LinearOptions(4096, 8),
                           scedit::LoRAOptions(4).init(scedit::LoRAInit::gaussian));
  EXPECT_NEAR(gauss->lora_A_weight("default").std().item<double>(), 0.25, 0.01);
  EXPECT_TRUE(torch::equal(gauss->lora_B_weight("default"), torch::zeros({8, 4})));
}

TEST_F(LoRA, IsIdentityAtInit) {
  scedit::LoRALinear lin(torch::nn::LinearOptions(6, 5), scedit::LoRAOptions(3));
  const auto x = torch::randn({4, 6});
  EXPECT_TRUE(torch::equal(lin(x), lin->base_layer(x)));
  scedit::LoRAConv2d conv(torch::nn::Conv2dOptions(3, 4, 3).padding(1), scedit::LoRAOptions(2));
  EXPECT_TRUE(torch::equal(conv(x_), conv->base_layer(x_)));

  TinyNet net;
  const auto before = net(x_);
  auto lora = scedit::inject_lora(*net, scedit::LoRAConfig(4).target_modules({"to_q", "conv"}));
  EXPECT_TRUE(torch::equal(net(x_), before));
}

TEST_F(LoRA, WrapperForwardsMatchTheFormula) {
  // Linear wrapping an existing layer (weights kept, frozen).
  torch::nn::Linear base(torch::nn::LinearOptions(6, 5).bias(false));
  base->to(torch::kFloat64);
  scedit::LoRALinear lin(base, scedit::LoRAOptions(2).alpha(5));
  EXPECT_EQ(lin->base_layer.get(), base.get());
  EXPECT_FALSE(base->weight.requires_grad());
  EXPECT_EQ(lin->lora_A_weight("default").scalar_type(), torch::kFloat64);
  randomize_B(scedit::find_lora_layers(*lin));
  const auto x = torch::randn({3, 4, 6}, torch::kFloat64);
  const auto A = lin->lora_A_weight("default"), B = lin->lora_B_weight("default");
  EXPECT_LT(max_diff(lin(x), x.matmul(base->weight.t()) + 2.5 * x.matmul(A.t()).matmul(B.t())),
            1e-13);

  // Conv2d with stride, padding and dilation: activation side = conv with W0 + s·(B ⊗ A).
  scedit::LoRAConv2d conv(torch::nn::Conv2dOptions(3, 5, 3).stride(2).padding(2).dilation(2),
                          scedit::LoRAOptions(4).alpha(2));
  conv->to(torch::kFloat64);
  randomize_B(scedit::find_lora_layers(*conv));
  const auto xc = x_.to(torch::kFloat64);
  const auto Ac = conv->lora_A_weight("default"), Bc = conv->lora_B_weight("default");
  EXPECT_EQ(Ac.sizes(), torch::IntArrayRef({4, 3, 3, 3}));
  EXPECT_EQ(Bc.sizes(), torch::IntArrayRef({5, 4, 1, 1}));
  const auto w =
      conv->base_layer->weight + 0.5 * torch::einsum("or,rikl->oikl", {Bc.flatten(1), Ac});
  const auto ref = torch::nn::functional::conv2d(xc, w,
                                                 torch::nn::functional::Conv2dFuncOptions()
                                                     .bias(conv->base_layer->bias)
                                                     .stride(2)
                                                     .padding(2)
                                                     .dilation(2));
  EXPECT_LT(max_diff(conv(xc), ref), 1e-12);
  EXPECT_LT(max_diff(conv->effective_weight(), w), 1e-14);
}

TEST_F(LoRA, GradientsReachOnlyAAndB) {
  scedit::LoRALinear lin(torch::nn::LinearOptions(6, 5), scedit::LoRAOptions(3));
  randomize_B(scedit::find_lora_layers(*lin));
  lin(torch::randn({4, 6})).square().sum().backward();
  EXPECT_FALSE(lin->base_layer->weight.grad().defined());
  EXPECT_FALSE(lin->base_layer->bias.grad().defined());
  const auto params = scedit::lora_parameters(*lin);
  ASSERT_EQ(params.size(), 2u);
  for (const auto& p : params) EXPECT_GT(p.grad().abs().sum().item<double>(), 0.0);

  TinyNet net;
  for (auto& p : net->parameters()) p.set_requires_grad(false);
  auto lora = scedit::inject_lora(*net, scedit::LoRAConfig(2).target_modules({"to_q", "conv"}));
  randomize_B(lora);
  EXPECT_EQ(scedit::lora_parameters(*net).size(), 4u);
  EXPECT_EQ(lora.parameters().size(), 4u);
  net(x_).square().sum().backward();
  for (const auto& p : net->named_parameters()) {
    const bool is_lora = p.key().find(".lora_") != std::string::npos;
    EXPECT_EQ(p.value().grad().defined(), is_lora) << p.key();
    if (is_lora) {
      EXPECT_GT(p.value().grad().abs().sum().item<double>(), 0.0) << p.key();
    }
  }
}

TEST_F(LoRA, MergeMatchesUnmergedAndUnmergeRestores) {
  for (auto dtype : {torch::kFloat32, torch::kFloat64}) {
    const double tol = dtype == torch::kFloat32 ? 1e-5 : 1e-12;
    const double restore_tol = dtype == torch::kFloat32 ? 1e-6 : 1e-14;
    scedit::LoRALinear lin(torch::nn::LinearOptions(16, 12), scedit::LoRAOptions(4).alpha(6));
    scedit::LoRAConv2d conv(torch::nn::Conv2dOptions(3, 6, 3).padding(1), scedit::LoRAOptions(2));
    lin->to(dtype);
    conv->to(dtype);
    const auto x = torch::randn({5, 16}, dtype);
    const auto xc = x_.to(dtype);
    for (auto* layer : std::vector<scedit::LoRALayer*>{lin.get(), conv.get()}) {
      torch::NoGradGuard no_grad;
      layer->lora_B_weight("default").normal_(0.0, 0.5);
    }
    const auto w_lin = lin->base_layer->weight.clone(), w_conv = conv->base_layer->weight.clone();
    const auto y_lin = lin(x), y_conv = conv(xc);
    lin->merge("default");
    conv->merge("default");
    EXPECT_TRUE(lin->adapter("default").merged);
    EXPECT_FALSE(torch::equal(lin->base_layer->weight, w_lin));
    EXPECT_LT(max_diff(lin(x), y_lin), tol);  // the merged adapter is skipped in forward
    EXPECT_LT(max_diff(conv(xc), y_conv), tol);
    EXPECT_LT(max_diff(lin->base_layer(x), y_lin), tol);
    lin->unmerge("default");
    conv->unmerge("default");
    EXPECT_LT(max_diff(lin->base_layer->weight, w_lin), restore_tol);
    EXPECT_LT(max_diff(conv->base_layer->weight, w_conv), restore_tol);
    EXPECT_LT(max_diff(lin(x), y_lin), tol);
  }

  // Injection: merge changes W0 in place and keeps the output.
  TinyNet net;
  net->to(torch::kFloat64);
  auto lora = scedit::inject_lora(*net, scedit::LoRAConfig(3).target_modules({"to_q", "conv"}));
  randomize_B(lora);
  const auto x = x_.to(torch::kFloat64);
  const auto y = net(x);
  const auto w0 = registered(*net->to_q, "weight").clone();
  lora.merge("default");
  EXPECT_LT(max_diff(net(x), y), 1e-12);
  EXPECT_GT(max_diff(registered(*net->to_q, "weight"), w0), 1e-3);
  EXPECT_THAT(error_of([&] { lora.set_adapter_weight("default", 2.0); }), HasSubstr("unmerge"));
  lora.unmerge("default");
  EXPECT_LT(max_diff(registered(*net->to_q, "weight"), w0), 1e-14);
  EXPECT_LT(max_diff(net(x), y), 1e-12);
}

TEST_F(LoRA, InjectionTakesEffectInALibTorchModel) {
  TinyNet net;
  net->to(torch::kFloat64);
  const auto x = x_.to(torch::kFloat64);
  const auto base = net(x);
  auto lora = scedit::inject_lora(*net, scedit::LoRAConfig(scedit::LoRAOptions(3).alpha(6))
                                            .target_modules({"to_q", "ff.net.0.proj", "conv"}));
  const auto paths = lora.paths();
  EXPECT_EQ(std::set<std::string>(paths.begin(), paths.end()),
            (std::set<std::string>{"conv", "to_q", "ff.net.0.proj"}));
  EXPECT_EQ(lora.at("conv").kind(), "Conv2d");
  EXPECT_EQ(lora.at("to_q").kind(), "Linear");
  randomize_B(lora);
  const auto y = net(x);
  EXPECT_GT(max_diff(y, base), 1e-3);                     // the model's own forward sees LoRA
  EXPECT_LT(max_diff(y, tiny_ref(net, x, lora)), 1e-12);  // and it is the activation-side formula
  EXPECT_LT(max_diff(base, tiny_ref(net, x, scedit::LoRALayers())), 1e-12);
}

TEST_F(LoRA, SuffixAndRegexTargets) {
  EXPECT_TRUE(
      scedit::lora_target_matches("attn1.to_q", scedit::LoRAConfig(1).target_modules({"to_q"})));
  EXPECT_TRUE(scedit::lora_target_matches("to_q", scedit::LoRAConfig(1).target_modules({"to_q"})));
  EXPECT_FALSE(scedit::lora_target_matches("attn1.to_q_extra",
                                           scedit::LoRAConfig(1).target_modules({"to_q"})));
  EXPECT_FALSE(
      scedit::lora_target_matches("attn1.xto_q", scedit::LoRAConfig(1).target_modules({"to_q"})));
  EXPECT_TRUE(scedit::lora_target_matches("b.ff.net.0.proj",
                                          scedit::LoRAConfig(1).target_modules({"ff.net.0.proj"})));
  EXPECT_FALSE(scedit::lora_target_matches(
      "b.ff.net.0.projx", scedit::LoRAConfig(1).target_modules({"ff.net.0.proj"})));

  auto paths_of = [&](const scedit::LoRAConfig& config) {
    TinyNet net;
    auto lora = scedit::inject_lora(*net, config);
    auto p = lora.paths();
    return std::set<std::string>(p.begin(), p.end());
  };
  EXPECT_EQ(paths_of(scedit::LoRAConfig(2).target_modules({"to_q"})),
            (std::set<std::string>{"to_q"}));
  EXPECT_EQ(paths_of(scedit::LoRAConfig(2).target_modules({"ff.net.0.proj", "2"})),
            (std::set<std::string>{"ff.net.0.proj", "ff.net.2"}));
  EXPECT_EQ(paths_of(scedit::LoRAConfig(2).target_regex("to_(q|k)")),
            (std::set<std::string>{"to_q", "to_k"}));
  EXPECT_EQ(paths_of(scedit::LoRAConfig(2).target_regex(".*proj|conv")),
            (std::set<std::string>{"ff.net.0.proj", "conv"}));

  TinyNet net;
  EXPECT_THAT(error_of([&] {
                scedit::inject_lora(*net, scedit::LoRAConfig(2).target_modules({"nothing"}));
              }),
              HasSubstr("matched no module"));
  const auto bad_type = error_of(
      [&] { scedit::inject_lora(*net, scedit::LoRAConfig(2).target_modules({"ff.net.0"})); });
  EXPECT_THAT(bad_type, HasSubstr("'ff.net.0'"));
  EXPECT_THAT(bad_type, HasSubstr("torch::nn::Linear"));
  EXPECT_THAT(
      error_of([&] { scedit::inject_lora(*net, scedit::LoRAConfig(2).target_regex("to_(")); }),
      HasSubstr("bad target_regex"));
  EXPECT_TRUE(net->named_children().size() == 5 &&
              scedit::lora_parameters(*net).empty());  // untouched
}

TEST_F(LoRA, SeveralAdaptersWithWeights) {
  scedit::LoRALinear lin(torch::nn::LinearOptions(6, 5), scedit::LoRAOptions(3).alpha(6), "a");
  lin->to(torch::kFloat64);
  lin->add_adapter("b", scedit::LoRAOptions(2).alpha(1));
  EXPECT_EQ(lin->adapter_names(), (std::vector<std::string>{"a", "b"}));
  EXPECT_EQ(lin->lora_A_weight("b").scalar_type(), torch::kFloat64);
  randomize_B(scedit::find_lora_layers(*lin), "a");
  randomize_B(scedit::find_lora_layers(*lin), "b");
  lin->set_adapter_weight("a", 0.5);
  lin->set_adapter_weight("b", -1.5);
  const auto x = torch::randn({4, 6}, torch::kFloat64);
  const auto base = lin->base_layer(x);
  auto term = [&](const std::string& n, double s) {
    return s * x.matmul(lin->lora_A_weight(n).t()).matmul(lin->lora_B_weight(n).t());
  };
  EXPECT_LT(max_diff(lin(x), base + 0.5 * term("a", 2.0) - 1.5 * term("b", 0.5)), 1e-13);
  lin->delete_adapter("b");
  EXPECT_FALSE(lin->named_parameters().contains("lora_A.b.weight"));
  EXPECT_TRUE(lin->named_parameters().contains("lora_A.a.weight"));
  EXPECT_LT(max_diff(lin(x), base + 0.5 * term("a", 2.0)), 1e-13);

  // The same through injection: the layer's weight member is W0 + Σ w·s·B·A.
  TinyNet net;
  net->to(torch::kFloat64);
  auto lora =
      scedit::inject_lora(*net, scedit::LoRAConfig(3).target_modules({"to_q"}).adapter_name("a"));
  lora.inject(*net, scedit::LoRAConfig(scedit::LoRAOptions(2).alpha(4))
                        .target_modules({"to_q", "to_k"})
                        .adapter_name("b"));
  EXPECT_EQ(lora.adapter_names(), (std::vector<std::string>{"a", "b"}));
  randomize_B(lora, "a");
  randomize_B(lora, "b");
  lora.set_adapter_weight("a", 0.25);
  lora.set_adapter_weight("b", 2.0);
  auto& q = lora.at("to_q");
  const auto expected = registered(*net->to_q, "weight") +
                        0.25 * (8.0 / 3.0) * q.lora_B_weight("a").matmul(q.lora_A_weight("a")) +
                        2.0 * 2.0 * q.lora_B_weight("b").matmul(q.lora_A_weight("b"));
  EXPECT_LT(max_diff(net->to_q->weight, expected), 1e-13);
  EXPECT_LT(max_diff(net(x_.to(torch::kFloat64)), tiny_ref(net, x_.to(torch::kFloat64), lora)),
            1e-12);
  EXPECT_THAT(error_of([&] { lora.set_adapter_weight("c", 1.0); }),
              HasSubstr("no layer has adapter 'c'"));
  lora.delete_adapter("b");
  EXPECT_TRUE(torch::equal(net->to_k->weight, registered(*net->to_k, "weight")));
  EXPECT_FALSE(net->named_parameters().contains("to_k.lora_B.b.weight"));
}

TEST_F(LoRA, EnableAndDisable) {
  scedit::LoRALinear lin(torch::nn::LinearOptions(6, 5), scedit::LoRAOptions(3), "a");
  lin->add_adapter("b", scedit::LoRAOptions(2));
  randomize_B(scedit::find_lora_layers(*lin), "a");
  randomize_B(scedit::find_lora_layers(*lin), "b");
  const auto x = torch::randn({4, 6});
  const auto base = lin->base_layer(x);
  const auto both = lin(x);
  lin->set_adapter_enabled("a", false);
  const auto only_b = lin(x);
  lin->set_adapter_enabled("a", true);
  lin->set_adapter_enabled("b", false);
  const auto only_a = lin(x);
  EXPECT_LT(max_diff((only_a - base) + (only_b - base), both - base), 1e-5);
  EXPECT_GT(max_diff(only_a, base), 1e-3);
  lin->set_adapter_enabled("b", true);
  lin->set_enabled(false);
  EXPECT_TRUE(torch::equal(lin(x), base));
  lin->set_enabled(true);
  EXPECT_TRUE(torch::allclose(lin(x), both));

  TinyNet net;
  const auto y0 = net(x_);
  auto lora = scedit::inject_lora(*net, scedit::LoRAConfig(2).target_modules({"to_q", "conv"}));
  randomize_B(lora);
  const auto y1 = net(x_);
  lora.set_enabled(false);
  EXPECT_TRUE(torch::equal(net(x_), y0));
  EXPECT_EQ(net->to_q->weight.unsafeGetTensorImpl(),
            registered(*net->to_q, "weight").unsafeGetTensorImpl());
  lora.set_enabled(true);
  EXPECT_TRUE(torch::allclose(net(x_), y1));
  lora.set_adapter_enabled("default", false);
  EXPECT_TRUE(torch::equal(net(x_), y0));
}

TEST_F(LoRA, ForgettingRefreshThrows) {
  TinyNet net;
  for (auto& p : net->parameters()) p.set_requires_grad(false);
  auto lora = scedit::inject_lora(*net, scedit::LoRAConfig(2).target_modules({"to_q", "conv"}));
  randomize_B(lora);
  torch::optim::SGD optimizer(lora.parameters(), torch::optim::SGDOptions(0.1));
  lora.refresh();
  net(x_).square().mean().backward();
  optimizer.step();
  optimizer.zero_grad();
  // No refresh: the stale effective weight's graph is gone, so training cannot go on silently.
  EXPECT_THROW(net(x_).square().mean().backward(), c10::Error);
  optimizer.zero_grad();
  lora.refresh();
  EXPECT_NO_THROW(net(x_).square().mean().backward());
  auto& q = lora.at("to_q");  // and the refreshed weight holds the stepped A and B
  EXPECT_LT(max_diff(net->to_q->weight,
                     registered(*net->to_q, "weight") +
                         4.0 * q.lora_B_weight("default").matmul(q.lora_A_weight("default"))),
            1e-6);
}

TEST_F(LoRA, StateDictKeepsTheBaseWeight) {
  TinyNet net;
  const auto* impl = net->to_q->weight.unsafeGetTensorImpl();
  const auto w0 = net->to_q->weight.clone();
  auto lora = scedit::inject_lora(*net, scedit::LoRAConfig(2).target_modules({"to_q"}));
  randomize_B(lora);
  lora.refresh();
  const auto params = net->named_parameters();
  ASSERT_TRUE(params.contains("to_q.weight"));
  EXPECT_EQ(params["to_q.weight"].unsafeGetTensorImpl(), impl);
  EXPECT_TRUE(torch::equal(params["to_q.weight"], w0));
  EXPECT_FALSE(params["to_q.weight"].requires_grad());
  EXPECT_TRUE(params.contains("to_q.lora_A.default.weight"));
  EXPECT_TRUE(params.contains("to_q.lora_B.default.weight"));
  EXPECT_FALSE(torch::equal(net->to_q->weight, w0));  // the member is the effective weight
  EXPECT_EQ(params.size(), 14u);                      // 12 base + A + B

  lora.unload();
  EXPECT_EQ(net->to_q->weight.unsafeGetTensorImpl(), impl);
  EXPECT_TRUE(torch::equal(net->to_q->weight, w0));
  EXPECT_TRUE(net->to_q->weight.requires_grad());
  EXPECT_EQ(net->named_parameters().size(), 12u);
  EXPECT_TRUE(lora.empty());

  // merge_and_unload keeps the update in W0.
  auto again = scedit::inject_lora(*net, scedit::LoRAConfig(2).target_modules({"to_q"}));
  randomize_B(again);
  const auto y = net(x_);
  again.merge_and_unload();
  EXPECT_LT(max_diff(net(x_), y), 1e-5);
  EXPECT_EQ(net->named_parameters().size(), 12u);
  EXPECT_FALSE(torch::equal(net->to_q->weight, w0));
}

TEST_F(LoRA, CloneKeepsAdaptersAndIsDeep) {
  scedit::LoRALinear lin(torch::nn::LinearOptions(6, 5), scedit::LoRAOptions(3));
  lin->add_adapter("b", scedit::LoRAOptions(2).alpha(3));
  lin->set_adapter_weight("b", 0.5);
  randomize_B(scedit::find_lora_layers(*lin));
  const auto x = torch::randn({4, 6});
  auto copy = std::dynamic_pointer_cast<scedit::LoRALinearImpl>(lin->clone());
  ASSERT_NE(copy, nullptr);
  EXPECT_TRUE(torch::equal(copy->forward(x), lin(x)));
  EXPECT_EQ(copy->adapter_names(), lin->adapter_names());
  EXPECT_EQ(copy->adapter("b").weight, 0.5);
  EXPECT_FALSE(copy->base_layer->weight.requires_grad());
  EXPECT_TRUE(copy->lora_A_weight("default").requires_grad());
  {
    torch::NoGradGuard no_grad;
    copy->named_parameters()["lora_B.default.weight"].add_(1.0);  // through the registry
  }
  EXPECT_FALSE(torch::equal(copy->forward(x), lin(x)));  // the copy's forward uses its own modules
  EXPECT_NE(copy->lora_B_weight("default").data_ptr(), lin->lora_B_weight("default").data_ptr());

  Host host;
  randomize_B(scedit::find_lora_layers(*host));
  auto host_copy = std::dynamic_pointer_cast<HostImpl>(host->clone());
  const auto y = host(torch::ones({2, 4}));
  EXPECT_TRUE(torch::equal(host_copy->forward(torch::ones({2, 4})), y));
  {
    torch::NoGradGuard no_grad;
    host_copy->named_parameters()["q.lora_B.default.weight"].add_(1.0);
  }
  EXPECT_FALSE(torch::equal(host_copy->forward(torch::ones({2, 4})), y));
  EXPECT_TRUE(torch::equal(host(torch::ones({2, 4})), y));
}

TEST_F(LoRA, PrettyPrint) {
  scedit::LoRALinear lin(torch::nn::LinearOptions(6, 5), scedit::LoRAOptions(3));
  lin->add_adapter("style", scedit::LoRAOptions(2).alpha(4).use_rslora(true));
  lin->set_adapter_weight("style", 0.5);
  std::ostringstream s;
  lin->pretty_print(s);
  EXPECT_EQ(s.str(),
            "scedit::LoRALinear(torch::nn::Linear(in_features=6, out_features=5, bias=true), "
            "default(r=3), "
            "style(r=2, alpha=4, use_rslora=true, weight=0.5))");
}

TEST_F(LoRA, ClearErrorsOnBadOptionsAndTargets) {
  TinyNet net;
  EXPECT_THAT(
      error_of([&] {
        scedit::inject_lora(
            *net, scedit::LoRAConfig(scedit::LoRAOptions(2).dropout(0.1)).target_modules({"to_q"}));
      }),
      HasSubstr("scedit::LoRALinear"));
  EXPECT_THAT(
      error_of([&] { scedit::LoRALinear(torch::nn::LinearOptions(2, 2), scedit::LoRAOptions(0)); }),
      HasSubstr("r > 0"));
  EXPECT_THAT(error_of([&] {
                scedit::LoRAConv2d(torch::nn::Conv2dOptions(4, 4, 3).groups(2),
                                   scedit::LoRAOptions(2));
              }),
              HasSubstr("groups"));
  auto layers = scedit::inject_lora(*net, scedit::LoRAConfig(2).target_modules({"to_q"}));
  EXPECT_THAT(
      error_of([&] { scedit::inject_lora(*net, scedit::LoRAConfig(2).target_modules({"to_q"})); }),
      HasSubstr("another injection"));
  EXPECT_THAT(
      error_of([&] { layers.inject(*net, scedit::LoRAConfig(2).target_modules({"to_q"})); }),
      HasSubstr("already has adapter 'default'"));
}
