// train_control: train Stable Diffusion (1.5, 2.1 or SDXL) for controllable generation — a CSC-Tuner (SCEdit's
// controllable skip tuner, optionally with SC-Tuners) that makes the image follow a condition
// map: edges, depth, segmentation, pose, colours, an inpainting mask, or anything else; or, as
// the baseline to beat, a ControlNet.
//
// The recipe: frozen SD; a CSC-Tuner whose hint encoder turns each sample's condition image
// into features that edit the skip connections (12 for SD 1.x/2.x, 9 for SDXL, whose hint
// encoder is wider: r = 2, P = 320, as SCEDIT.md says); AdamW; MSE on the noise. A held-out slice of
// the data measures whether the tuner uses its condition: its loss with each sample's own
// condition against the loss with another sample's (validation.json). Everything else — flags,
// model, loop, checkpoints, samples — is the shared training run (examples/common/run.hpp).
//
// With no --model it trains the built-in tiny model on generated shapes whose condition is
// their layout, in under a minute on two CPU cores. See README.md beside this file.

#include <common/batches.hpp>
#include <common/conditioned_dataset.hpp>
#include <common/conditions.hpp>
#include <common/control.hpp>
#include <common/demo_data.hpp>
#include <common/flags.hpp>
#include <common/launcher.hpp>
#include <common/program.hpp>
#include <common/run.hpp>
#include <common/validation.hpp>

#include <sd/controlnet.hpp>

#include <CLI/CLI.hpp>
#include <torch/torch.h>

#include <cstdio>
#include <filesystem>
#include <optional>
#include <string>
#include <vector>

namespace fs = std::filesystem;

namespace {

/// What the program takes beside the run's flags.
struct ControlFlags {
  common::ControlOptions tuner;
  std::string condition;         // canny | colour | inpaint: computed from plain captioned images
  std::string condition_folder;  // a folder of condition images named as the images
  int64_t validation_samples = 8;  // held out of training, for validation.json and the grids
};

/// The demo data: shapes of the style demo, each with its layout (a segmentation map) as the
/// condition; 400 of them, so that what the tuner learns holds for the held-out ones too.
fs::path make_demo(const fs::path& folder, int64_t resolution, uint64_t seed) {
  return common::make_demo_control_dataset(folder, /*n=*/400, resolution, seed);
}

/// Where each sample's condition comes from: computed, a parallel folder, or the listing.
common::ConditionSource condition_source(const ControlFlags& flags) {
  TORCH_CHECK(flags.condition.empty() || flags.condition_folder.empty(),
              "give either --condition or --condition-folder, not both");
  if (!flags.condition.empty()) return common::ConditionSource::computed(common::parse_condition_kind(flags.condition));
  if (!flags.condition_folder.empty()) return common::ConditionSource::parallel_folder(flags.condition_folder);
  return common::ConditionSource::listed();
}

int train(const common::RunFlags& run_flags, const ControlFlags& flags) {
  TORCH_CHECK(flags.validation_samples == 0 || flags.validation_samples >= 2,
              "--validation-samples must be 0 or at least 2 (their conditions are shuffled among "
              "them), got ", flags.validation_samples);
  common::check_control_options(flags.tuner);
  const auto source = condition_source(flags);
  // Every flag, then the data, checked before any weights load.
  common::TrainingRun run("train_control", run_flags);
  const auto folder = run.data_folder(make_demo, {});
  common::ConditionedImageDataset data(folder, source, run.dataset_options());
  common::TrainingRun::describe(data.images(), folder.string());
  // The last samples are held out: the tuner never trains on them, nor on other entries of their
  // images (a listing may name an image twice).
  const int64_t held = flags.validation_samples;
  TORCH_CHECK(data.size() > held, "the data holds ", data.size(), " samples: too few to hold out ",
              held, " for validation (--validation-samples)");
  const auto split = common::split_held_out(data, data.items(), held);
  const auto& training = split.training;
  const auto& held_out = split.held_out;
  if (split.left_out > 0) {
    std::printf("validation: %lld entries name a held-out image: left out of training\n",
                static_cast<long long>(split.left_out));
  }
  std::printf("%lld steps\n", static_cast<long long>(run.total_steps(training.size())));

  auto pipe = run.load_model();
  common::report_cut_captions(data.items(), pipe.tokenizer.value());

  // What trains. Its initial values come from the global generator: seed it.
  torch::manual_seed(run_flags.optim.seed);
  common::ControlTuners tuners;
  sd::ControlNetModel controlnet{nullptr};
  common::Trainable trainable;
  if (flags.tuner.method == "controlnet") {
    controlnet = common::make_controlnet(pipe.unet, run.device());
    run.apply_levers(controlnet);
    trainable = common::controlnet_trainable(pipe.unet, controlnet);
  } else {
    tuners = common::attach_control_tuners(pipe.unet, flags.tuner, run.device());
    trainable = common::control_trainable(pipe.unet, tuners, flags.tuner);
  }
  int64_t trained = 0;
  for (const auto& p : trainable.parameters) trained += p.second.numel();
  int64_t unet_own = scedit::count_parameters(*pipe.unet).total();  // less the tuners attached to it
  for (const auto& p : scedit::tuner_parameters(*pipe.unet)) unet_own -= p.numel();
  std::printf("method %s: %lld trainable parameters (%.3f%% of the UNet's %lld)\n",
              flags.tuner.method.c_str(), static_cast<long long>(trained), 100.0 * trained / unet_own,
              static_cast<long long>(unet_own));

  // Validation: each held-out condition beside what it makes from its caption, and the losses
  // with own and shuffled conditions.
  std::vector<std::pair<torch::Tensor, std::string>> shown;
  for (int64_t i = 0; i < held_out.size(); ++i) {
    auto generator = common::step_generator(run_flags.optim.seed, i, /*stream=*/3);
    auto sample = held_out.get(i, generator);
    shown.emplace_back(sd::condition_to_uint8(sample.conditions.front()), sample.caption);
  }
  std::optional<common::ConditionProbe> probe;
  if (held >= 2) {
    probe.emplace(pipe, held_out, run.loss(pipe), run.device(), run_flags.optim.seed);
    if (run.start_step() > 0) probe->continue_history(run.output() / "validation.json", run.start_step());
  }
  auto validation = [&](int64_t step, const fs::path& grid) {
    if (probe) probe->record(step, probe->measure(trainable.denoiser), run.output() / "validation.json");
    if (shown.empty()) return;
    common::write_condition_grid(shown, [&](const torch::Tensor& condition, const std::string& prompt) {
      auto options = run.sample_options();
      if (controlnet.is_empty()) {
        options.conditions = {{"csc", condition}};
      } else {
        options.controlnets = {{controlnet, condition, 1.0}};
      }
      return sd::generate(pipe, {prompt}, options).front();
    }, grid);
  };
  run.train(pipe, training, trainable, validation);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  common::RunFlags run_flags;
  run_flags.output.output = "out/train_control";
  ControlFlags flags;
  CLI::App app{"train_control: train Stable Diffusion (1.5, 2.1 or SDXL) to follow a condition map with SCEdit's "
               "CSC-Tuner. With no --model: the built-in tiny model on generated shapes and their layouts."};
  app.option_defaults()->always_capture_default();
  common::add_run_flags(app, run_flags);
  const char* group = "Control";
  auto& t = flags.tuner;
  app.add_option("--method", t.method, "csc | csc+sc (the CSC-Tuner, with SC-Tuners on the skips too) | controlnet (diffusers' ControlNet, made from the UNet: the baseline)")
      ->check(CLI::IsMember({"csc", "csc+sc", "controlnet"}))->group(group);
  app.add_option("--condition", flags.condition, "Compute each sample's condition from its image: canny | colour | inpaint (else the data's own condition images)")->group(group);
  app.add_option("--condition-folder", flags.condition_folder, "Folder of condition images named as the images (else metadata.jsonl's conditioning_image)")->group(group);
  app.add_option("--hint-kernel", t.kernel_size, "Kernel of the dense hint convs: 3 (SCEdit's released configurations) or 1 (the paper's parameter count)")
      ->check(CLI::IsMember({1, 3}))->group(group);
  app.add_option("--hint-ratio", t.hint_ratio, "Width multiplier of the pre-hint convs (0: the model's: 2 for SDXL, else 1)")->group(group);
  app.add_option("--hint-channels", t.hint_channels, "Output channels of the pre-hint encoder (0: the model's: 320 for SDXL, else 256)")->group(group);
  app.add_option("--csc-down-ratio", t.down_ratio, "Hidden width of the per-skip MLPs / skip channels")->group(group);
  app.add_option("--csc-skips", t.skips, "Regex over the skip sites the CSC-Tuner edits (lsc_identity.0 … 11, decoder order); empty = all")->group(group);
  app.add_option("--validation-samples", flags.validation_samples, "Samples held out of training for validation.json and the condition grids (0: none)")->group(group);
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  }
  return common::run_program("train_control", [&] {
    common::check_launch(run_flags.distributed.nproc, run_flags.distributed.rank, run_flags.distributed.world_size);
    return common::launch_local(run_flags.distributed.nproc, argv, [&] { return train(run_flags, flags); });
  });
}
