// train_style: fine-tune Stable Diffusion (1.5, 2.1 or SDXL) for a style with SCEdit's SC-Tuners,
// LoRA, or both.
//
// The recipe: frozen SD; SC-Tuners on the 12 skip connections (and/or LoRA in the attention
// and feed-forward layers); AdamW; MSE on the noise. Everything else — flags, the model, the
// data, the loop, checkpoints, samples — is the shared training run (examples/common/run.hpp).
//
// With no --model it runs on a built-in tiny model with the SD 1.5 layout and a generated demo
// dataset, so the whole path runs in under a minute on two CPU cores. See README.md beside this
// file.

#include <common/dataset.hpp>
#include <common/demo_data.hpp>
#include <common/flags.hpp>
#include <common/launcher.hpp>
#include <common/program.hpp>
#include <common/run.hpp>
#include <common/tuners.hpp>
#include <common/validation.hpp>

#include <CLI/CLI.hpp>
#include <torch/torch.h>

#include <cstdio>
#include <filesystem>
#include <string>
#include <vector>

namespace {

/// The demo data: flat-coloured shapes, captioned "a red circle on a blue background, flat style".
std::filesystem::path make_demo(const std::filesystem::path& folder, int64_t resolution, uint64_t seed) {
  return common::make_demo_dataset(folder, /*n=*/16, resolution, seed);
}
const std::vector<std::string> kDemoPrompts = {"a red circle on a blue background, flat style",
                                               "a yellow star on a green background, flat style"};

int train(const common::RunFlags& flags, const common::MethodOptions& method) {
  // Every flag, then the data, checked before any weights load.
  common::check_method_options(method);
  common::TrainingRun run("train_style", flags);
  const auto folder = run.data_folder(make_demo, kDemoPrompts);
  common::CaptionedImageDataset data(folder, run.dataset_options());
  common::TrainingRun::describe(data, folder.string());
  std::printf("%lld steps\n", static_cast<long long>(run.total_steps(data.size())));

  auto pipe = run.load_model();
  common::report_cut_captions(data.items(), pipe.tokenizer.value());

  // The tuners. Their initial values (ln1, LoRA's A) come from the global generator: seed it,
  // so that a run is a pure function of its flags.
  torch::manual_seed(flags.optim.seed);
  auto tuners = common::attach_tuners(pipe.unet, method, run.device());
  common::attach_text_encoder_lora(tuners, pipe, method, run.device());
  const auto count = scedit::count_parameters(*pipe.unet);
  std::printf("method %s: %lld trainable parameters (%.3f%% of the UNet)\n", method.method.c_str(),
              static_cast<long long>(count.trainable), 100.0 * count.trainable / count.total());
  if (tuners.text_lora) {
    const auto text = scedit::count_parameters(*pipe.text_encoder);
    std::printf("text encoder LoRA: %lld trainable parameters (%.3f%% of the text encoder)\n",
                static_cast<long long>(text.trainable), 100.0 * text.trainable / text.total());
  }
  if (tuners.text_lora_2) {
    const auto text = scedit::count_parameters(*pipe.text_encoder_2);
    std::printf("text encoder 2 LoRA: %lld trainable parameters (%.3f%% of the second text encoder)\n",
                static_cast<long long>(text.trainable), 100.0 * text.trainable / text.total());
  }

  auto validation = [&](int64_t /*step*/, const std::filesystem::path& grid) {
    tuners.refresh();  // LoRA's effective weights, as trained
    common::write_sample_grid(pipe, run.validation_prompts(), run.sample_options(), grid);
  };
  run.train(pipe, data, common::tuner_trainable(pipe.unet, tuners, method, &pipe, run.flags().optim.optim.lr), validation);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  common::RunFlags flags;
  flags.output.output = "out/train_style";
  common::MethodOptions method;
  CLI::App app{"train_style: fine-tune Stable Diffusion (1.5, 2.1 or SDXL) for a style with SCEdit (SC-Tuners), "
               "LoRA, or both. With no --model: the built-in tiny model on generated demo data."};
  app.option_defaults()->always_capture_default();
  common::add_run_flags(app, flags);
  common::add_method_flags(app, method);
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  }
  return common::run_program("train_style", [&] {
    common::check_launch(flags.distributed.nproc, flags.distributed.rank, flags.distributed.world_size);
    return common::launch_local(flags.distributed.nproc, argv, [&] { return train(flags, method); });
  });
}
