// The speed levers and what they must leave alone: where the training step is captured as a CUDA
// graph (and why not elsewhere); the sampler's noise prediction replayed from a graph
// (sd/noise_prediction.hpp) giving the eager images; generation's kernel levers (`--lean`)
// changing the images by no more than the precision's rounding; the VAE in float16, and in float32
// where it must or overflows; a run on the CPU keeping freed tensor memory for its next step and
// computing on every core it may use. The
// graphed training step's own tests are in test_train.cpp.

#include <common/cpu_threads.hpp>
#include <common/graphed_step.hpp>
#include <common/lean.hpp>
#include <common/model.hpp>
#include <sd/controlnet_weights.hpp>
#include <sd/noise_prediction.hpp>
#include <sd/sampler.hpp>
#include <sd/tiny.hpp>
#include <sd/tuner_files.hpp>

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <algorithm>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <set>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#if defined(__GLIBC__)
#include <malloc.h>
#endif
#if defined(__linux__)
#include <sched.h>
#include <unistd.h>
#endif

#include "generate_fixtures.hpp"
#include "test_util.hpp"

namespace {

using ::testing::HasSubstr;
using scedit_test::error_of;
using namespace scedit_test::generate;

}  // namespace

TEST(SpeedLevers, TrainingStepWhereverItAppliesAndWhyNotElsewhere) {
  const torch::Device cpu(torch::kCPU), cuda(torch::kCUDA, 0);
  const auto bf16 = sd::Precision::kBF16;
  // auto: captured on CUDA where the build records graphs; elsewhere eager, with the reason.
  EXPECT_EQ(common::choose_cuda_graph("auto", cuda, bf16, 1, 1).graphed, sd::CudaGraph::available(cuda));
  EXPECT_EQ(common::choose_cuda_graph("auto", cpu, bf16, 1, 1).why_not, "not a CUDA device");
  const auto fp16 = common::choose_cuda_graph("auto", cuda, sd::Precision::kFP16, 1, 1);
  EXPECT_FALSE(fp16.graphed);
  EXPECT_THAT(fp16.why_not, HasSubstr("fp16's loss scaling"));
  EXPECT_THAT(common::choose_cuda_graph("auto", cuda, bf16, 2, 1).why_not, HasSubstr("--grad-accum 2"));
  EXPECT_THAT(common::choose_cuda_graph("auto", cuda, bf16, 1, 4).why_not, HasSubstr("4 processes"));
  EXPECT_FALSE(common::choose_cuda_graph("off", cuda, bf16, 1, 1).graphed);
  // on: refused where it cannot apply, naming why; on the CPU the same step, uncaptured.
  EXPECT_TRUE(common::choose_cuda_graph("on", cpu, sd::Precision::kFP32, 1, 1).graphed);
  EXPECT_THAT(error_of([&] { common::choose_cuda_graph("on", cpu, bf16, 3, 1); }),
              HasSubstr("--cuda-graph on: a captured step holds one micro-batch, not --grad-accum 3"));
  EXPECT_THAT(error_of([&] { common::choose_cuda_graph("always", cpu, bf16, 1, 1); }),
              HasSubstr("--cuda-graph must be auto, on or off, got 'always'"));
}

TEST(SpeedLevers, NoisePredictionIsPredictNoiseStepByStepOffCuda) {
  // Off CUDA every step is predict_noise itself: across batches of two shapes, with guidance and
  // rescale, and without guidance.
  auto pipe = sd::tiny_pipeline();
  torch::NoGradGuard no_grad;
  sd::NoisePrediction guided(pipe.unet, 3.0, 0.5, {}, /*cuda_graph=*/true);
  EXPECT_FALSE(guided.captures());
  EXPECT_THAT(error_of([&] { guided(torch::zeros({1, 4, 8, 8}), 500); }), HasSubstr("no batch set"));
  auto generator = at::detail::createCPUGenerator(3);
  for (const int64_t n : {2, 1}) {
    const auto latents = torch::randn({n, 4, 8, 8}, generator);
    const auto cond = sd::encode_prompts(pipe, std::vector<std::string>(static_cast<size_t>(n), "a cat"));
    const auto uncond = sd::encode_prompts(pipe, std::vector<std::string>(static_cast<size_t>(n), ""));
    guided.set_batch(cond, uncond);
    for (const int64_t t : {901, 501}) {
      EXPECT_TRUE(torch::equal(guided(latents, t), sd::predict_noise(pipe.unet, latents, t, cond, uncond, 3.0, 0.5)))
          << "batch " << n << ", timestep " << t;
    }
    sd::NoisePrediction unguided(pipe.unet, 1.0, 0.0, {}, true);
    unguided.set_batch(cond, {});
    EXPECT_TRUE(torch::equal(unguided(latents, 700), pipe.unet(latents, torch::full({1}, 700, torch::kInt64), cond)));
  }
}

TEST(SpeedLevers, ReplayedDenoisingGivesTheEagerImages_CUDA) {
  if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA device";
  const torch::Device gpu(torch::kCUDA, 0);
  // Three prompts in batches of two (the second, of one, is another shape: recorded anew), SC-Tuners
  // in float32 under the half-precision autocast (casts a graph records rather than caches),
  // guidance with rescale. The graph replays the eager kernels: the same latents up to the
  // rounding of the precision.
  for (const auto precision : {sd::Precision::kFP32, sd::Precision::kFP16, sd::Precision::kBF16}) {
    SCOPED_TRACE(sd::to_string(precision));
    auto pipe = sd::tiny_pipeline();
    pipe.to(gpu, sd::compute_dtype(precision));
    sd::AttachedTuners tuners;
    sd::attach_tuner_file(pipe, sc_tuner_file(), 1.0, tuners);  // float32, beside the UNet
    auto options = small_options(4);
    options.steps = 6;
    options.batch_size = 2;
    options.precision = precision;
    options.cuda_graph = false;
    const auto eager = sd::sample_latents(pipe, {"a cat", "a dog", "a house"}, options).cpu();
    options.cuda_graph = true;
    const auto replayed = sd::sample_latents(pipe, {"a cat", "a dog", "a house"}, options).cpu();
    const double tolerance = precision == sd::Precision::kFP32 ? 1e-5 : 1e-2;
    EXPECT_TRUE(torch::allclose(replayed, eager, tolerance, tolerance))
        << (replayed - eager).abs().max().item<double>();
  }
  // The graph records: a NoisePrediction on CUDA captures, and its replays follow new inputs.
  auto pipe = sd::tiny_pipeline();
  pipe.to(gpu, torch::kFloat32);
  torch::NoGradGuard no_grad;
  sd::NoisePrediction predict(pipe.unet, 3.0, 0.5, {}, true);
  EXPECT_TRUE(predict.captures());
  const auto cond = sd::encode_prompts(pipe, {"a cat"}), uncond = sd::encode_prompts(pipe, {""});
  predict.set_batch(cond, uncond);
  auto generator = at::detail::createCPUGenerator(5);
  for (const int64_t t : {951, 801, 651, 501}) {  // eager, recorded, replayed, replayed
    const auto latents = torch::randn({1, 4, 8, 8}, generator).to(gpu);
    EXPECT_TRUE(torch::allclose(predict(latents, t), sd::predict_noise(pipe.unet, latents, t, cond, uncond, 3.0, 0.5),
                                1e-5, 1e-5))
        << "timestep " << t;
  }
}

TEST(SpeedLevers, ReplayedDenoisingWithConditionsGivesTheEagerImages_CUDA) {
  if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA device";
  const torch::Device gpu(torch::kCUDA, 0);
  // What else a recorded step holds: a CSC-Tuner's hint features and a ControlNet (SD 1.5), the
  // pooled text and size ids of SDXL with its ControlNet. Recording would fail on anything that
  // reads the device from the host.
  auto compare = [&](sd::StableDiffusion& pipe, sd::GenerateOptions options) {
    options.steps = 5;
    options.cuda_graph = false;
    const auto eager = sd::sample_latents(pipe, {"a cat", "a dog"}, options).cpu();
    options.cuda_graph = true;
    const auto replayed = sd::sample_latents(pipe, {"a cat", "a dog"}, options).cpu();
    EXPECT_TRUE(torch::allclose(replayed, eager, 1e-5, 1e-5)) << (replayed - eager).abs().max().item<double>();
  };
  auto controlnet_for = [&](sd::StableDiffusion& pipe) {
    auto controlnet = sd::controlnet_from_unet(pipe.unet);  // on the UNet's device
    torch::NoGradGuard no_grad;
    for (auto& p : controlnet->controlnet_mid_block->parameters()) p.normal_(0.0, 0.05);
    return controlnet;
  };
  {
    SCOPED_TRACE("SD 1.5 with a CSC-Tuner and a ControlNet");
    auto pipe = sd::tiny_pipeline();
    pipe.to(gpu, torch::kFloat32);
    sd::AttachedTuners tuners;
    const auto csc = sd::attach_tuner_file(pipe, csc_tuner_file(), 1.0, tuners);
    auto options = small_options(2);
    options.conditions = {{csc.name, scedit_test::random_image(64, 64, 3)}};
    options.controlnets = {{controlnet_for(pipe), scedit_test::random_image(64, 64, 4), 0.8}};
    compare(pipe, options);
  }
  {
    SCOPED_TRACE("SDXL with its size conditioning and a ControlNet");
    auto pipe = sd::tiny_sdxl_pipeline();
    pipe.to(gpu, torch::kFloat32);
    auto options = small_options(3);
    options.size_conditioning = sd::SizeConditioning{256, 128, 0, 0, 64, 64};
    options.controlnets = {{controlnet_for(pipe), scedit_test::random_image(64, 64, 5), 1.0}};
    compare(pipe, options);
  }
}

namespace {

/// The latents of three prompts (batches of two) on `pipe` with `lean` and `precision`.
torch::Tensor latents_with(sd::StableDiffusion& pipe, const std::string& lean, sd::Precision precision) {
  const auto device = sd::detail::first_parameter(*pipe.unet, "UNet").device();
  pipe.unet->set_lean_activations(common::parse_lean_activations(lean, device));
  auto options = small_options(8);
  options.batch_size = 2;
  options.precision = precision;
  return sd::sample_latents(pipe, {"a cat", "a dog", "a house"}, options).cpu();
}

}  // namespace

TEST(SpeedLevers, GenerationKernelLeversChangeTheImagesOnlyByRounding) {
  // float32: nothing to round (norm-dtype acts under autocast only): the same latents.
  auto fp32 = sd::tiny_pipeline();
  EXPECT_TRUE(torch::equal(latents_with(fp32, "default", sd::Precision::kFP32),
                           latents_with(fp32, "none", sd::Precision::kFP32)));
  // bf16: the norms in bf16 round once more than in float32, where autocast runs them in float32
  // (LibTorch 1.13's CPU autocast runs them in bf16 either way: the same latents there).
  auto bf16 = sd::tiny_pipeline(0, torch::kBFloat16);
  const auto lean = latents_with(bf16, "default", sd::Precision::kBF16);
  const auto plain = latents_with(bf16, "none", sd::Precision::kBF16);
  EXPECT_TRUE(torch::allclose(lean, plain, 5e-2, 5e-2)) << (lean - plain).abs().max().item<double>();
}

TEST(SpeedLevers, GenerationKernelLeversChangeTheImagesOnlyByRounding_CUDA) {
  if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA device";
  const torch::Device gpu(torch::kCUDA, 0);
  // The fused kernels too, where this build has them; in each half precision against the plain ops.
  for (const auto precision : {sd::Precision::kFP16, sd::Precision::kBF16}) {
    SCOPED_TRACE(sd::to_string(precision));
    auto pipe = sd::tiny_pipeline();
    pipe.to(gpu, sd::compute_dtype(precision));
    const auto lean = latents_with(pipe, "default", precision), plain = latents_with(pipe, "none", precision);
    EXPECT_FALSE(torch::equal(lean, plain)) << "the norms ran in the half-precision dtype";
    EXPECT_TRUE(torch::allclose(lean, plain, 5e-2, 5e-2)) << (lean - plain).abs().max().item<double>();
  }
}

// ---- the VAE in float16 ------------------------------------------------------------------------

TEST(SpeedLevers, Float16VaeRunsInFloat32OnlyWhereItMustOrOverflows) {
  // Which dtype each VAE pass runs in; the pass stands in for the VAE's (LibTorch's CPU kernels
  // lack float16 convolutions) and checks the VAE is in the dtype it is given.
  std::vector<torch::Dtype> passes;
  auto pass_giving = [&](sd::StableDiffusion& pipe, double half_value) {
    return [&passes, &pipe, half_value](torch::Dtype dtype) {
      passes.push_back(dtype);
      EXPECT_EQ(pipe.vae->parameters().front().scalar_type(), dtype);
      return torch::full({2}, dtype == torch::kHalf ? half_value : 1.0, dtype);
    };
  };
  const std::vector<torch::Dtype> half_only{torch::kHalf}, half_then_float{torch::kHalf, torch::kFloat32},
      float_only{torch::kFloat32};
  auto sd15 = sd::tiny_pipeline();
  EXPECT_FALSE(sd::upcasts_float16_vae(sd15));
  sd15.vae->to(torch::kHalf);
  // SD: float16, kept where finite; run again in float32 where it overflows (inf, or NaN after it).
  EXPECT_TRUE(torch::equal(sd::detail::run_vae(sd15, pass_giving(sd15, 0.5)), torch::full({2}, 0.5, torch::kHalf)));
  EXPECT_EQ(passes, half_only);
  for (const double overflow : {INFINITY, NAN}) {
    passes.clear();
    EXPECT_TRUE(torch::equal(sd::detail::run_vae(sd15, pass_giving(sd15, overflow)), torch::full({2}, 1.0)));
    EXPECT_EQ(passes, half_then_float);
    EXPECT_EQ(sd15.vae->parameters().front().scalar_type(), torch::kHalf) << "put back";
  }
  // SDXL, whose configuration says force_upcast: float32 from the start, as diffusers' SDXL pipelines.
  auto sdxl = sd::tiny_sdxl_pipeline();
  ASSERT_TRUE(sdxl.vae_config.force_upcast);
  EXPECT_TRUE(sd::upcasts_float16_vae(sdxl));
  sdxl.vae->to(torch::kHalf);
  passes.clear();
  sd::detail::run_vae(sdxl, pass_giving(sdxl, 0.5));
  EXPECT_EQ(passes, float_only);
  EXPECT_EQ(sdxl.vae->parameters().front().scalar_type(), torch::kHalf);
  // A float32 pass that throws (out of memory, say) leaves the VAE in float16 all the same.
  EXPECT_THROW(sd::detail::run_vae(sdxl, [](torch::Dtype) -> torch::Tensor { throw std::runtime_error("no memory"); }),
               std::runtime_error);
  EXPECT_EQ(sdxl.vae->parameters().front().scalar_type(), torch::kHalf);
  sdxl.vae_config.force_upcast = false;  // e.g. a VAE fine-tuned to stay in float16's range
  EXPECT_FALSE(sd::upcasts_float16_vae(sdxl));
  // bf16 and float32 VAEs: their own dtype, whatever comes out (bf16 has float32's range).
  for (const auto dtype : {torch::kBFloat16, torch::kFloat32}) {
    sd15.vae->to(dtype);
    passes.clear();
    sd::detail::run_vae(sd15, pass_giving(sd15, INFINITY));
    EXPECT_EQ(passes, std::vector<torch::Dtype>{dtype});
  }
}

TEST(SpeedLevers, Float16VaeDecodesAsFloat32WithinRoundingAndOverflowsIntoFloat32_CUDA) {
  if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA device";
  const torch::Device gpu(torch::kCUDA, 0);
  auto pipe = sd::tiny_pipeline();
  pipe.to(gpu, torch::kHalf);
  const auto latents = torch::randn({2, pipe.vae_config.latent_channels, 8, 8},
                                    at::detail::createCPUGenerator(3)).to(gpu);
  const auto in_float32 = [&] {  // the same float16-rounded weights, widened
    pipe.vae->to(torch::kFloat32);
    auto images = sd::decode_latents(pipe, latents);
    pipe.vae->to(torch::kHalf);
    return images;
  };
  // In range: a float16 decode, within float16's rounding of the float32 one (uint8 levels).
  const auto half = sd::decode_latents(pipe, latents);
  EXPECT_EQ(pipe.vae->parameters().front().scalar_type(), torch::kHalf);
  EXPECT_LE(max_pixel_difference(half, in_float32()), 3);
  // Past float16's range: the decoder's first convolution scaled up until float16 overflows; the
  // decode is then the float32 one.
  {
    torch::NoGradGuard no_grad;
    pipe.vae->decoder->conv_in->weight.mul_(3e4);
    ASSERT_FALSE(torch::isfinite(pipe.vae->decode(latents.to(torch::kHalf) / pipe.vae_config.scaling_factor))
                     .all().item<bool>())
        << "float16 did not overflow: the test would not reach the float32 pass";
  }
  EXPECT_LE(max_pixel_difference(sd::decode_latents(pipe, latents), in_float32()), 1);
  EXPECT_EQ(pipe.vae->parameters().front().scalar_type(), torch::kHalf);
}

#if defined(__GLIBC__)
namespace {
// Whether a 64 MiB tensor, allocated and freed twice, was mapped afresh by malloc (glibc's default
// for blocks over 32 MiB) rather than served from, and returned to, the process's heap.
bool large_tensor_mapped_afresh() {
  const auto mapped_before = mallinfo2().hblkhd;
  for (int i = 0; i < 2; ++i) {
    auto tensor = torch::ones({64 << 20}, torch::kUInt8);
    if (mallinfo2().hblkhd > mapped_before) return true;
  }
  return mallinfo2().fordblks < (64u << 20);  // freed but handed back to the kernel
}
}  // namespace
#endif

TEST(SpeedLevers, CpuRunsKeepFreedTensorMemoryUnlessTheUserTunedMalloc) {
#if defined(__GLIBC__)
  // In a fresh process each (death tests re-run the binary), as a program starts: thresholds the
  // user set are left alone; otherwise resolving the CPU as the device keeps large tensors' memory.
  if (common::malloc_thresholds_set_by_user()) GTEST_SKIP() << "this environment tunes malloc already";
  ::testing::FLAGS_gtest_death_test_style = "threadsafe";
  EXPECT_EXIT(
      {
        setenv("GLIBC_TUNABLES", "glibc.malloc.trim_threshold=131072", 1);
        common::resolve_device("cpu");
        std::exit(large_tensor_mapped_afresh() ? 0 : 1);
      },
      ::testing::ExitedWithCode(0), "");
  EXPECT_EXIT(
      {
        const bool unchanged = large_tensor_mapped_afresh();
        common::resolve_device("cpu");
        std::exit(unchanged && !large_tensor_mapped_afresh() ? 0 : 1);
      },
      ::testing::ExitedWithCode(0), "");
#else
  GTEST_SKIP() << "malloc is not glibc's";
#endif
}

#if defined(__linux__)
namespace {
// A sysfs of its own under `root`: each CPU of this process's affinity mask a thread of core
// cpu / 2 (two SMT threads per core), and the cgroup's `cpu.max` line. Returns the physical cores
// it describes.
int64_t write_fake_sysfs(const std::filesystem::path& root, const std::string& cpu_max) {
  cpu_set_t mask;
  CPU_ZERO(&mask);
  EXPECT_EQ(sched_getaffinity(0, sizeof(mask), &mask), 0);
  std::set<int> cores;
  for (int cpu = 0; cpu < CPU_SETSIZE; ++cpu) {
    if (!CPU_ISSET(cpu, &mask)) continue;
    const auto topology = root / "devices/system/cpu" / ("cpu" + std::to_string(cpu)) / "topology";
    std::filesystem::create_directories(topology);
    std::ofstream(topology / "physical_package_id") << "0\n";
    std::ofstream(topology / "core_id") << cpu / 2 << "\n";
    cores.insert(cpu / 2);
  }
  std::filesystem::create_directories(root / "fs/cgroup");
  std::ofstream(root / "fs/cgroup/cpu.max") << cpu_max << "\n";
  return static_cast<int64_t>(cores.size());
}
}  // namespace
#endif

TEST(SpeedLevers, CpuCoresAreCountedOncePerCoreWithinTheAffinityMaskAndTheCgroupQuota) {
#if defined(__linux__)
  const auto root = std::filesystem::temp_directory_path() / ("scedit_sysfs_" + std::to_string(::getpid()));
  const int64_t fake_cores = write_fake_sysfs(root, "max 100000");
  EXPECT_EQ(common::cpu_cores_available(root.string()), fake_cores);  // SMT threads counted once
  write_fake_sysfs(root, "50000 100000");
  EXPECT_EQ(common::cpu_cores_available(root.string()), 1);  // half a CPU's quota: one thread
  if (fake_cores >= 2) {
    write_fake_sysfs(root, "150000 100000");
    EXPECT_EQ(common::cpu_cores_available(root.string()), 2);  // 1.5 CPUs' quota, rounded up
  }
  std::filesystem::remove_all(root / "devices/system/cpu");
  EXPECT_EQ(common::cpu_cores_available(root.string()), 0);  // no topology: unknown
  std::filesystem::remove_all(root);

  const int64_t cores = common::cpu_cores_available();
  if (cores == 0) GTEST_SKIP() << "this machine's CPU topology cannot be read";
  EXPECT_LE(cores, static_cast<int64_t>(std::thread::hardware_concurrency()));
  ::testing::FLAGS_gtest_death_test_style = "threadsafe";
  EXPECT_EXIT(  // a process allowed one CPU has one core
      {
        cpu_set_t mask;
        CPU_ZERO(&mask);
        sched_getaffinity(0, sizeof(mask), &mask);
        int first = 0;
        while (!CPU_ISSET(first, &mask)) ++first;
        CPU_ZERO(&mask);
        CPU_SET(first, &mask);
        std::exit(sched_setaffinity(0, sizeof(mask), &mask) == 0 && common::cpu_cores_available() == 1 ? 0 : 1);
      },
      ::testing::ExitedWithCode(0), "");
#else
  GTEST_SKIP() << "the CPU topology is read from Linux's sysfs";
#endif
}

TEST(SpeedLevers, CpuRunsComputeOnEveryCoreUnlessTheUserChoseThreads) {
  // In a fresh process each (death tests re-run the binary), as a program starts.
  const int64_t cores = common::cpu_cores_available();
  if (cores == 0) GTEST_SKIP() << "this machine's CPU topology cannot be read";
  ::testing::FLAGS_gtest_death_test_style = "threadsafe";
  const auto forget_threads = [] {
    for (const char* name : {"OMP_NUM_THREADS", "MKL_NUM_THREADS", "LOCAL_WORLD_SIZE"}) unsetenv(name);
    at::set_num_threads(1);
  };
  EXPECT_EXIT(  // one thread per core
      {
        forget_threads();
        common::resolve_device("cpu");
        std::exit(at::get_num_threads() == cores ? 0 : 1);
      },
      ::testing::ExitedWithCode(0), "");
  EXPECT_EXIT(  // two processes of one run on this machine share its cores
      {
        forget_threads();
        setenv("LOCAL_WORLD_SIZE", "2", 1);
        common::resolve_device("cpu");
        std::exit(at::get_num_threads() == std::max<int64_t>(1, cores / 2) ? 0 : 1);
      },
      ::testing::ExitedWithCode(0), "");
  EXPECT_EXIT(  // the user's OMP_NUM_THREADS is LibTorch's business
      {
        forget_threads();
        setenv("OMP_NUM_THREADS", std::to_string(cores + 1).c_str(), 1);
        at::set_num_threads(static_cast<int>(cores + 1));
        common::resolve_device("cpu");
        std::exit(at::get_num_threads() == cores + 1 ? 0 : 1);
      },
      ::testing::ExitedWithCode(0), "");
}
