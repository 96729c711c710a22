#pragma once
/// @file run.hpp
/// @brief A training run as every training program runs it: flags checked and the output folder
/// claimed before anything expensive, the data found (or generated), the model brought up, then
/// the loop — the sample order, micro-batches, the step (eager or as a CUDA graph), progress
/// lines, checkpoints and exact resume, validation grids — and at the end the weights,
/// `loss.csv`, `loss.png` and a last grid. What can go wrong stops the run with one line and
/// keeps the last good output: a non-finite loss or weights, a full disk, SIGINT / SIGTERM (a
/// checkpoint first), a second run into the same folder. A program says what it trains (a
/// `Trainable`) and what a sample holds (an `ImageSource`); the rest is here, once. The layers and
/// the data path: docs/ARCHITECTURE.md.
///
/// Example (examples/train_style/main.cpp reads the same):
/// @code
/// common::TrainingRun run("train_style", flags);
/// common::CaptionedImageDataset data(run.data_folder(make_demo, prompts), run.dataset_options());
/// auto pipe = run.load_model();
/// torch::manual_seed(flags.optim.seed);
/// auto tuners = common::attach_tuners(pipe.unet, method, run.device());
/// run.train(pipe, data, common::tuner_trainable(pipe.unet, tuners, method), validation);
/// @endcode

#include <common/batches.hpp>
#include <common/checkpoint.hpp>
#include <common/dataset.hpp>
#include <common/distributed.hpp>
#include <common/flags.hpp>
#include <common/gradient_reducer.hpp>
#include <common/graphed_step.hpp>
#include <common/lean.hpp>
#include <common/memory.hpp>
#include <common/model.hpp>
#include <common/output_lock.hpp>
#include <common/plot.hpp>
#include <common/program.hpp>
#include <common/sample_order.hpp>
#include <common/strings.hpp>
#include <common/train_step.hpp>

#include <sd/sampler.hpp>

#include <c10/core/impl/VirtualGuardImpl.h>
#include <nlohmann/json.hpp>
#include <torch/torch.h>

#include <algorithm>
#include <chrono>
#include <csignal>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

namespace common {

/// Shows the model being trained after `step` optimizer steps: writes a sample grid to the given
/// file, and whatever else the program measures (the UNet is in eval mode and no graph is
/// recorded meanwhile).
using Validation = std::function<void(int64_t step, const std::filesystem::path& grid)>;

/// One training run of a program (see the file comment).
class TrainingRun {
 public:
  /// Checks every flag that needs neither model nor data, so that a mistake is reported before
  /// anything expensive; resolves the device, the precision and the lean levers; fills in the
  /// defaults that depend on the model (learning rate; the resolution of the built-in tiny model,
  /// other models' when first asked: `resolution`); then claims the output folder
  /// (`claim_output`).
  TrainingRun(std::string program, RunFlags flags) : program_(std::move(program)), flags_(std::move(flags)) {
    auto& f = flags_;
    device_ = resolve_device(f.compute.device);
    precision_ = sd::parse_precision(f.compute.precision);
    lean_ = parse_lean_activations(f.compute.lean, device_);
    sd::check_precision(precision_, device_);
    const bool tiny = f.model.model.empty();
    if (f.data.resolution == 0 && tiny) f.data.resolution = 64;
    if (f.optim.optim.lr == 0) f.optim.optim.lr = tiny ? 1e-3 : 1e-4;
    TORCH_CHECK(f.data.resolution >= 0 && f.data.resolution % 8 == 0,
                "--resolution must be a positive multiple of 8, got ", f.data.resolution);
    check_optim_options(f.optim.optim);
    TORCH_CHECK(f.optim.batch_size > 0, "--batch-size must be positive, got ", f.optim.batch_size);
    TORCH_CHECK(f.optim.grad_accum > 0, "--grad-accum must be positive, got ", f.optim.grad_accum);
    TORCH_CHECK(f.optim.max_steps >= 0 && f.optim.epochs >= 0, "--max-steps and --epochs must not be negative");
    TORCH_CHECK(f.checkpoints.every >= 0 && f.checkpoints.keep_last >= 0,
                "--checkpoint-every and --keep-last must not be negative");
    TORCH_CHECK(f.data.bad_data == "skip" || f.data.bad_data == "fatal",
                "--bad-data must be skip or fatal, got '", f.data.bad_data, "'");
    for (const auto& prompt : f.output.validation_prompts) {
      const auto invalid = sd::unicode::utf8_problem(prompt);
      TORCH_CHECK(invalid.empty(), "--validation-prompt \"", sd::unicode::escape_invalid_utf8(prompt),
                  "\" is not valid UTF-8 ", invalid);
    }
    TORCH_CHECK(f.data.data.empty() || std::filesystem::exists(f.data.data), "--data: '",
                f.data.data, "' does not exist");
    check_model_flags(f.model);
    TORCH_CHECK(f.optim.max_steps > 0 || f.optim.epochs > 0 || f.model.random_weights(),
                "give --max-steps or --epochs (how long to train)");
    if (f.data.cache && (f.data.random_crop || f.data.random_flip)) {
      std::printf("--cache encodes each image once (centre crop, no flip): ignoring --random-crop "
                  "and --random-flip\n");
      f.data.random_crop = f.data.random_flip = false;
    }
    join_world();
    claim_output();
  }

  /// The flags, with the model-dependent defaults filled in (the resolution once `resolution`
  /// has been asked).
  const RunFlags& flags() const { return flags_; }
  /// The device the run trains on.
  const torch::Device& device() const { return device_; }
  /// The precision it trains in.
  sd::Precision precision() const { return precision_; }
  /// The output folder.
  std::filesystem::path output() const { return flags_.output.output; }
  /// The processes of the run (a world of one unless `RANK`/`WORLD_SIZE` or `--nproc` say otherwise).
  Distributed& distributed() { return *dist_; }
  /// The step training starts from: the resumed checkpoint's, else 0.
  int64_t start_step() const { return resumed_ ? resumed_->state.step : 0; }

  /// The model the flags name (model.hpp's `load_model`), its random weights, if any, from the
  /// run's seed: the one `resolution` loaded, if it did.
  sd::StableDiffusion load_model() {
    if (!model_) return common::load_model(flags_.model, device_, precision_, flags_.optim.seed);
    auto pipe = std::move(*model_);
    model_.reset();
    return pipe;
  }

  /// The training image side: `--resolution`, else the model's native size
  /// (`sd::default_image_size`: 512 for SD 1.5, 768 for SD 2.1-v, 1024 for SDXL, 64 for the tiny
  /// models). Finding the latter brings up the model (kept for `load_model`), so a program asks
  /// once its flags are checked.
  int64_t resolution() {
    auto& r = flags_.data.resolution;
    if (r > 0) return r;
    model_ = common::load_model(flags_.model, device_, precision_, flags_.optim.seed);
    r = sd::default_image_size(*model_);
    TORCH_CHECK(r > 0 && r % 8 == 0, "the model's native image size is ", r,
                ", not a positive multiple of 8: give --resolution");
    std::printf("--resolution %lld: the model's native size\n", static_cast<long long>(r));
    return r;
  }

  /// The folder of training data: `--data`, or, for a model with random weights and no `--data`,
  /// demo data that `make_demo(folder, resolution, seed)` writes into `output/demo_data`; then
  /// `demo_prompts` become the validation prompts unless some were given.
  std::filesystem::path data_folder(
      const std::function<std::filesystem::path(const std::filesystem::path&, int64_t, uint64_t)>& make_demo,
      const std::vector<std::string>& demo_prompts) {
    if (!flags_.data.data.empty()) return flags_.data.data;
    TORCH_CHECK(flags_.model.random_weights(), "--data is required with --model (a folder of images with captions)");
    if (flags_.output.validation_prompts.empty()) flags_.output.validation_prompts = demo_prompts;
    // Rank 0 writes it; the others read it once it is complete.
    auto folder = output() / "demo_data";
    if (dist_->is_main()) folder = make_demo(folder, resolution(), flags_.optim.seed);
    dist_->barrier();
    return folder;
  }

  /// The optimizer steps of the run on `images` training images: `--max-steps`, else `--epochs`
  /// passes (at most 10^9 steps), else 300 on the tiny default. A program asks once it knows its
  /// data, before the model loads, so that an impossible length is refused early.
  int64_t total_steps(int64_t images) const {
    const auto& o = flags_.optim;
    const int64_t world = dist_->world_size();
    TORCH_CHECK(o.batch_size * world <= images, "--batch-size ", o.batch_size,
                world > 1 ? " on each of " + std::to_string(world) + " processes" : std::string(), " is more than the ",
                images, " training images: a batch would hold a sample twice (--grad-accum gives larger "
                "batches of distinct samples)");
    int64_t steps = 300;  // the tiny default (the constructor refuses it elsewhere)
    if (o.max_steps > 0) {
      steps = o.max_steps;
    } else if (o.epochs > 0) {
      const int64_t images_per_step = o.batch_size * o.grad_accum * world;
      const double planned = std::ceil(o.epochs * images / images_per_step);
      TORCH_CHECK(planned <= 1e9, "--epochs ", o.epochs, " of ", images, " images at ", images_per_step,
                  " per step makes ", planned, " steps: at most 10^9");
      steps = static_cast<int64_t>(planned);
    }
    TORCH_CHECK(start_step() <= steps, "--resume: the checkpoint is at step ", start_step(), ", past the ", steps,
                " steps of this run (--max-steps, --epochs)");
    TORCH_CHECK(o.optim.warmup_steps <= steps, "--warmup-steps ", o.optim.warmup_steps, " is more than the ", steps,
                " steps of this run: the learning rate would never reach --lr ", o.optim.lr);
    return steps;
  }

  /// How the dataset prepares images: resolution, crops, flips, bad-data policy.
  DatasetOptions dataset_options() {
    return DatasetOptions(resolution())
        .center_crop(!flags_.data.random_crop)
        .random_flip(flags_.data.random_flip)
        .bad_data(flags_.data.bad_data == "skip" ? BadDataPolicy::skip : BadDataPolicy::fatal);
  }

  /// Prints what a dataset holds and what it left out.
  static void describe(const CaptionedImageDataset& data, const std::string& folder) {
    std::printf("data: %lld images from %s (%s layout)", static_cast<long long>(data.size()),
                folder.c_str(), to_string(data.layout()).c_str());
    if (data.skipped() == 0) {
      std::printf("\n");
      return;
    }
    std::printf(", %lld skipped:\n", static_cast<long long>(data.skipped()));
    for (const auto& problem : data.problems()) std::printf("  %s\n", problem.c_str());
  }

  /// The settings of a validation grid: the training resolution, `--validation-steps` DDIM
  /// steps, the run's seed and precision.
  sd::GenerateOptions sample_options() const {
    TORCH_CHECK(flags_.data.resolution > 0, "TrainingRun::sample_options: the resolution is not known yet");
    sd::GenerateOptions options;
    options.width = options.height = flags_.data.resolution;
    options.steps = flags_.output.validation_steps;
    options.seed = flags_.optim.seed;
    options.device = device_;
    options.precision = precision_;
    return options;
  }

  /// Gives `model` (the UNet, or a ControlNet beside it) the run's memory and speed levers:
  /// gradient checkpointing, lean activations, channels-last.
  template <typename Model>
  void apply_levers(Model& model) const {
    model->set_gradient_checkpointing(flags_.compute.gradient_checkpointing);
    model->set_lean_activations(lean_);
    model->set_channels_last(flags_.compute.channels_last);
  }

  /// The loss the run trains `pipe` with (for measurements beside the training, as validation's):
  /// the model's noise schedule, its prediction target unless `--prediction` names another, the
  /// run's precision.
  DenoisingLoss loss(const sd::StableDiffusion& pipe) const {
    const auto target = flags_.optim.prediction.empty() ? sd::prediction_type(pipe) : flags_.optim.prediction;
    TORCH_CHECK(target == "epsilon" || target == "v_prediction", "the model's scheduler config says "
                "its UNet predicts '", target, "'; training learns epsilon or v_prediction: give --prediction");
    auto schedule = sd::noise_schedule(pipe);
    schedule.check_prediction(target, "training");  // before any step: ε on a zero-terminal-SNR schedule
    return DenoisingLoss{std::move(schedule), target, precision_};
  }

  /// The validation prompts (`--validation-prompt`, the demo data's, or one of SCEdit's).
  std::vector<std::string> validation_prompts() const {
    if (!flags_.output.validation_prompts.empty()) return flags_.output.validation_prompts;
    return {"A boy in a camouflage jacket with a scarf"};
  }

  /// Trains `trainable` on `data` with `pipe`'s frozen encoders: resumes if asked, runs the loop
  /// to the last step with progress lines, checkpoints and validation grids, then writes the
  /// final checkpoint, the weights (`Trainable::save`), `loss.csv`, `loss.png` and
  /// `samples.png`. The UNet is put in train mode with the run's levers.
  void train(sd::StableDiffusion& pipe, const ImageSource& data, const Trainable& trainable,
             const Validation& validation) {
    const auto& f = flags_;
    auto& unet = pipe.unet;
    unet->train();
    apply_levers(unet);
    BatchSource batches(pipe, data,
                        BatchOptions().cache(f.data.cache).caption_dropout(f.data.caption_dropout)
                            .tokens(trainable.text_as_tokens),
                        device_);
    const auto objective = loss(pipe);
    TrainStep step(trainable.denoiser, trainable.tensors(), objective.schedule, f.optim.optim,
                   precision_, device_, objective.prediction_type, trainable.groups);
    auto& dist = *dist_;
    if (dist.active()) {
      ReducerOptions reducer;
      reducer.bucket_bytes = static_cast<int64_t>(f.distributed.bucket_mb * (1 << 20));
      step.set_gradient_reduction(std::make_shared<GradientReducer>(dist, trainable.tensors(), reducer));
    }

    // The global batch: every rank's micro-batches of every accumulation step.
    const int64_t images_per_step = f.optim.batch_size * f.optim.grad_accum * dist.world_size();
    const int64_t total = total_steps(data.size());

    // Checkpoints hold the trainable tensors by name; the run's settings must match on resume.
    const auto tensors = trainable.by_name();
    // The model's scheduler too: resuming under another prediction or beta schedule (e.g.
    // without zero terminal SNR) would train towards another target.
    const auto& scheduler = pipe.scheduler_config;
    // The global batch must stay the same on resume; how it is split (processes × per-process
    // batch × accumulation) may change: a checkpoint written by N processes resumes on M.
    nlohmann::json settings = {{"precision", f.compute.precision}, {"global_batch", images_per_step},
                               {"model", f.model.model},
                               {"prediction", objective.prediction_type},
                               {"scheduler_prediction", sd::prediction_type(pipe)},
                               {"zero_terminal_snr", scheduler.is_object() &&
                                                         scheduler.value("rescale_betas_zero_snr", false)}};
    const BatchLayout layout{dist.world_size(), f.optim.batch_size, f.optim.grad_accum};
    settings.update(trainable.settings);
    // What a resume may change, said when it does (a lower learning rate to continue, more data).
    const nlohmann::json adjustable = {
        {"--lr", f.optim.optim.lr}, {"--lr-schedule", f.optim.optim.schedule},
        {"--warmup-steps", f.optim.optim.warmup_steps}, {"--max-grad-norm", f.optim.optim.max_grad_norm},
        {"--weight-decay", f.optim.optim.weight_decay}, {"--resolution", f.data.resolution},
        {"--random-crop", f.data.random_crop}, {"--random-flip", f.data.random_flip},
        {"--caption-dropout", f.data.caption_dropout}, {"data", describe_samples(data)}};
    const auto checkpoints = output() / "checkpoints";
    const int64_t start = start_step();
    if (dist.active()) {  // every rank trains the same tensors the same way on the same samples from the same step
      dist.check_same("the data (samples and captions)", adjustable["data"].dump());
      dist.check_same("the flags", settings.dump() + adjustable.dump() + " seed " + std::to_string(f.optim.seed) +
                                       " steps " + std::to_string(start) + "-" + std::to_string(total) +
                                       " bucket-mb " + std::to_string(f.distributed.bucket_mb));
      std::string shapes;
      for (const auto& [name, tensor] : tensors) shapes += " " + name + c10::str(tensor.sizes());
      dist.check_same("the trainable tensors", shapes);
    }
    auto saved_settings = layout.put_into(settings);
    saved_settings["adjustable"] = adjustable;
    std::filesystem::path last_checkpoint;  // the newest good one, named when the run stops early
    if (resumed_) {
      const auto& folder = resumed_->folder;
      // Checkpoints of earlier versions lack the scheduler's keys: they trained on the model's own
      // scheduler, never with zero terminal SNR (it was refused).
      nlohmann::json earlier = resumed_->state.run;
      const auto before = BatchLayout::take_from(earlier);
      nlohmann::json adjusted_then;  // none in checkpoints of earlier versions
      if (earlier.is_object() && earlier.contains("adjustable")) {
        adjusted_then = earlier["adjustable"];
        earlier.erase("adjustable");
      }
      if (earlier.is_object() && !earlier.contains("zero_terminal_snr")) earlier["zero_terminal_snr"] = false;
      if (earlier.is_object() && !earlier.contains("scheduler_prediction")) {
        earlier["scheduler_prediction"] = settings["scheduler_prediction"];
      }
      TORCH_CHECK(before.images() == layout.images(), "checkpoint '", folder.string(), "' trained with a "
                  "global batch of ", before.describe(), "; this run's is ", layout.describe(),
                  ": processes × --batch-size × --grad-accum must stay the same");
      if (earlier != settings) {
        const auto changed = differences(earlier, settings);
        TORCH_CHECK(false, "checkpoint '", folder.string(), "' comes from another run: ",
                    changed.empty() ? resumed_->state.run.dump() : changed);
      }
      const auto adjusted = differences(adjusted_then, adjustable);
      if (adjusted_then.is_object() && !adjusted.empty()) std::printf("resuming with other settings: %s\n", adjusted.c_str());
      if (!(before == layout)) {
        std::printf("resuming a global batch of %s as %s%s\n", before.describe().c_str(), layout.describe().c_str(),
                    before.batch_size == layout.batch_size ? "" : " (another per-process batch: the noise "
                    "of a micro-batch is drawn anew, so the run differs from an uninterrupted one)");
      }
      step.set_loss_scale(load_checkpoint(*resumed_, tensors, step.optimizer()).loss_scale);
      last_checkpoint = folder;
      std::printf("resumed from %s at step %lld\n", folder.string().c_str(), static_cast<long long>(start));
    }
    // Where it applies (`choose_cuda_graph`) the whole step is captured after two eager ones and
    // replayed, on the same draws as the eager step.
    std::optional<GraphedTrainStep> graphed;
    if (cuda_graph_.graphed) {
      graphed.emplace(step);
      std::printf("step: %s\n", graphed->captures() ? "a CUDA graph, captured after two eager steps"
                                                      : "the graphed step, uncaptured (no CUDA device)");
    } else if (device_.is_cuda()) {
      std::printf("step: eager, no CUDA graph (%s)\n", cuda_graph_.why_not.c_str());
    }
    // The loss history: loss.csv and loss.png, rewritten with each checkpoint so that a resumed
    // run continues them.
    std::vector<LossRecord> records = start > 0 && dist.is_main() ? losses_until(start) : std::vector<LossRecord>{};
    const double earlier_seconds = records.empty() ? 0.0 : records.back().seconds;
    auto write_losses = [&] {
      if (records.empty()) return;
      write_loss_csv((output() / "loss.csv").string(), records);
      std::vector<int64_t> steps;
      std::vector<double> losses;
      for (const auto& r : records) {
        steps.push_back(r.step);
        losses.push_back(r.loss);
      }
      write_loss_plot((output() / "loss.png").string(), steps, losses, program_ + " " + title(trainable));
    };
    // Stops the run at step `at` for `why`, naming what is left to resume from.
    auto stop = [&](int64_t at, const std::string& why) {
      TORCH_CHECK(false, "step ", at, ": ", why, ": training stopped without saving; ",
                  last_checkpoint.empty() ? std::string("no checkpoint was saved before")
                                          : "the last good checkpoint is '" + last_checkpoint.string() + "'",
                  " (a lower --lr, or --max-grad-norm, may help)");
    };
    // Only finite weights are saved: a checkpoint or weights file never replaces good ones with
    // the aftermath of a non-finite gradient.
    auto save_checkpoint_at = [&](int64_t at) {
      if (graphed) graphed->sync_optimizer_state();
      if (!all_finite(tensors)) stop(at, "the trained weights are no longer finite (a non-finite gradient)");
      if (!dist.is_main()) return last_checkpoint = checkpoints / checkpoint_name(at);  // rank 0 writes it
      write_losses();
      last_checkpoint = save_checkpoint(checkpoints, tensors, step.optimizer(),
                                        TrainState{at, f.optim.seed, step.loss_scale(), saved_settings},
                                        f.checkpoints.keep_last);
      return last_checkpoint;
    };
    // A grid is a look at the model, not what the run makes: one that cannot be made (latents
    // that overflow, say) is reported, and the run goes on.
    auto validate = [&](int64_t at, const std::filesystem::path& grid) {
      if (!dist.is_main()) return;
      unet->eval();
      try {
        torch::NoGradGuard no_grad;
        validation(at, grid);
      } catch (const c10::Error& e) {
        std::printf("validation at step %lld: nothing written: %s\n", static_cast<long long>(at),
                    e.what_without_backtrace());
      }
      unet->train();
    };

    // The loop. SIGINT and SIGTERM end it after the current step, with a checkpoint.
    std::optional<StopSignals> signals;
    signals.emplace();
    // Ends the run on `signal` with `done` steps complete, saved unless none is.
    auto interrupt = [&](int signal, int64_t done) {
      std::string saved = "no step was complete, nothing saved";
      if (done > start) {
        const bool written = last_checkpoint.filename() == checkpoint_name(done);
        saved = "checkpoint '" + (written ? last_checkpoint : save_checkpoint_at(done)).string() +
                "' (continue with --resume latest)";
      } else if (!last_checkpoint.empty()) {
        saved = "no step was complete; checkpoint '" + last_checkpoint.string() + "' is where it resumed";
      }
      // Every rank stops; rank 0 says so, once.
      throw Interrupted(signal, !dist.is_main() ? std::string()
                                                : std::string("stopped by ") + StopSignals::name(signal) + " " +
                                                      (done > start ? "after step " + std::to_string(done)
                                                                    : "during step " + std::to_string(done + 1)) +
                                                      " of " + std::to_string(total) + ": " + saved);
    };
    SampleOrder order(data.size(), f.optim.batch_size, f.optim.seed, dist.rank(), dist.world_size());
    const auto began = std::chrono::steady_clock::now();
    double smoothed = 0;
    int64_t overflows = 0;  // consecutive fp16 steps skipped by the loss scaler
    for (int64_t s = start; s < total; ++s) {
      const double lr = learning_rate(f.optim.optim, s, total);
      dist.set_step(s);
      torch::Tensor loss_sum;  // on the device: read once the whole step is queued
      for (int64_t a = 0; a < f.optim.grad_accum; ++a) {
        // One process also stops between micro-batches: a long accumulation ends with the last
        // whole step saved, within the grace a job scheduler gives (ranks agree once a step).
        if (a > 0 && !dist.active() && signals->pending() != 0) interrupt(signals->pending(), s);
        const int64_t m = s * f.optim.grad_accum + a;
        // The randomness of global micro-batch m · world + rank: a world of W processes draws what
        // one process accumulating W micro-batches per step would.
        auto generator = step_generator(f.optim.seed, m * dist.world_size() + dist.rank());
        const auto batch = batches.get(order.indices(m), generator);
        if (graphed) {  // the whole step, optimizer included (--grad-accum is 1)
          loss_sum = graphed->run(batch, lr, generator);
        } else {
          auto micro = step.forward_backward(batch, generator, f.optim.grad_accum);
          loss_sum = a == 0 ? micro : loss_sum + micro;
        }
      }
      const bool applied = graphed || step.optimizer_step(lr);
      // The mean loss over the ranks, and whether any of them was asked to stop: all stop together.
      const int pending = signals->pending();
      const auto agreed = dist.sum({loss_sum.item<double>() / f.optim.grad_accum, static_cast<double>(pending)});
      const double loss = agreed[0] / dist.world_size();
      const int signal = pending != 0 ? pending : agreed[1] > 0 ? SIGTERM : 0;
      // fp16's loss scaler skips a step whose gradients overflowed; anywhere else, and when that
      // goes on, a non-finite loss means training has diverged.
      overflows = applied ? 0 : overflows + 1;
      if (!std::isfinite(loss) && (precision_ != sd::Precision::kFP16 || overflows >= kMaxOverflows)) {
        stop(s + 1, "the loss is " + std::to_string(loss) +
                        (overflows > 0 ? " for " + std::to_string(overflows) + " steps in a row" : ""));
      }
      const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - began).count();
      records.push_back({s + 1, loss, lr, earlier_seconds + seconds});
      smoothed = s == start ? loss : 0.9 * smoothed + 0.1 * loss;
      if ((s + 1) % f.output.log_every == 0 || s + 1 == total) {
        const double rate = (s + 1 - start) * images_per_step / std::max(seconds, 1e-9);
        const double eta = (total - s - 1) * images_per_step / std::max(rate, 1e-9);
        std::printf("step %lld/%lld  loss %.4f (avg %.4f)  lr %.2e  %.1f img/s  ETA %s  peak %s\n",
                    static_cast<long long>(s + 1), static_cast<long long>(total), loss, smoothed, lr,
                    rate, format_duration(eta).c_str(), peak_memory_string(device_).c_str());
        std::fflush(stdout);
      }
      if (f.checkpoints.every > 0 && (s + 1) % f.checkpoints.every == 0 && s + 1 < total) {
        std::printf("checkpoint: %s\n", save_checkpoint_at(s + 1).string().c_str());
      }
      if (f.output.validation_every > 0 && (s + 1) % f.output.validation_every == 0 && s + 1 < total) {
        validate(s + 1, output() / "samples" / ("step-" + std::to_string(s + 1) + ".png"));
      }
      if (signal != 0 && s + 1 < total) interrupt(signal, s + 1);
    }

    signals.reset();  // from here on a signal ends the program at once: nothing is left to save

    // What a person wants to look at: the weights, the loss curve, samples.
    if (start < total) save_checkpoint_at(total);
    if (dist.active()) {
      dist.check_same("the trained weights", trainable.tensors());
      std::printf("all %lld processes end with the same weights\n", static_cast<long long>(dist.world_size()));
    }
    if (!dist.is_main()) return;
    for (const auto& path : trainable.save(output())) std::printf("weights: %s\n", path.c_str());
    if (!records.empty()) {
      write_losses();
      std::printf("loss: %s, %s\n", (output() / "loss.csv").string().c_str(),
                  (output() / "loss.png").string().c_str());
    }
    validate(total, output() / "samples.png");
  }

 private:
  // The samples of `data` as a resume and the processes compare them: how many, and a hash of
  // their keys in order (`ImageSource::sample_key`).
  static std::string describe_samples(const ImageSource& data) {
    uint64_t hash = 0xcbf29ce484222325ULL;
    for (int64_t i = 0; i < data.size(); ++i) {
      const auto key = data.sample_key(i) + "\n";
      hash = fnv1a(key.data(), key.size(), hash);
    }
    char hex[17];
    std::snprintf(hex, sizeof(hex), "%016llx", static_cast<unsigned long long>(hash));
    return std::to_string(data.size()) + " samples (" + hex + ")";
  }

  // "key then-value then, now-value now" for each key of `now` whose value differs in `then`.
  static std::string differences(const nlohmann::json& then, const nlohmann::json& now) {
    std::string said;
    for (const auto& [key, value] : now.items()) {
      const auto before = then.is_object() && then.contains(key) ? then[key].dump() : "nothing";
      if (before != value.dump()) said += (said.empty() ? "" : ", ") + key + " " + before + " then, " + value.dump() + " now";
    }
    return said;
  }

  // The records of the output's loss.csv up to `step`, the history a resumed run continues; none,
  // saying why, when the file is missing or unreadable (a log: the run goes on without it).
  std::vector<LossRecord> losses_until(int64_t step) const {
    const auto path = output() / "loss.csv";
    std::vector<LossRecord> kept;
    try {
      if (std::filesystem::exists(path)) {
        for (const auto& r : read_loss_csv(path.string())) {
          if (r.step <= step) kept.push_back(r);
        }
      }
    } catch (const c10::Error& e) {
      std::printf("loss.csv: not continued: %s\n", e.what_without_backtrace());
      return {};
    }
    if (static_cast<int64_t>(kept.size()) != step) {
      std::printf("loss.csv: %zu of the %lld steps before the resume are in it; it goes on from there\n",
                  kept.size(), static_cast<long long>(step));
    }
    return kept;
  }

  // Takes the output folder for this run: its lock (a second writer is refused), the stale
  // temporaries of an interrupted save removed, and its checkpoints: a fresh run refuses an
  // earlier run's unless --overwrite removes them; a resumed one checks its checkpoint now, and
  // refuses checkpoints past it unless --overwrite removes them.
  void claim_output() {
    if (dist_->is_main()) claim_output_as_writer();
    dist_->barrier();  // the others read the output folder as rank 0 leaves it
    const auto& resume = flags_.checkpoints.resume;
    if (!dist_->is_main() && !resume.empty()) resumed_ = resolve_checkpoint(output() / "checkpoints", resume);
  }

  // Joins the run's processes (distributed.hpp); on CUDA each uses the GPU of its `LOCAL_RANK`
  // unless --device names one. Only rank 0 prints: the others' progress is the same.
  void join_world() {
    auto& f = flags_;
    const int64_t world = Distributed::world_size_of(f.distributed);
    cuda_graph_ = choose_cuda_graph(f.compute.cuda_graph, device_, precision_, f.optim.grad_accum, world);
    dist_ = std::make_unique<Distributed>(f.distributed, device_);
    if (!dist_->active()) return;
    if (device_.is_cuda() && f.compute.device.find(':') == std::string::npos) {
      device_ = torch::Device(torch::kCUDA, static_cast<c10::DeviceIndex>(dist_->local_rank()));
    }
    // The rank's GPU is its current device too: what LibTorch or NCCL allocates without naming a
    // device goes there, not to GPU 0 of every rank.
    if (device_.is_cuda()) c10::impl::VirtualGuardImpl(c10::DeviceType::CUDA).setDevice(device_);
    // What decides the collectives before `train` compares the full settings: demo data, which
    // rank 0 writes while the others wait, or --data; the model, whose size may be looked up.
    dist_->check_same("the data and model flags", std::string(f.data.data.empty() ? "demo data" : "--data") +
                                                      " --model " + f.model.model + " --resolution " +
                                                      std::to_string(f.data.resolution));
    if (!dist_->is_main()) TORCH_CHECK(std::freopen("/dev/null", "w", stdout) != nullptr, "cannot silence rank ", dist_->rank());
  }

  // claim_output on the process that writes the run's files.
  void claim_output_as_writer() {
    namespace fs = std::filesystem;
    const auto& f = flags_;
    lock_ = std::make_unique<OutputLock>(output());
    const auto checkpoints = output() / "checkpoints";
    const int64_t stale = remove_stale_temporaries(output()) + remove_stale_temporaries(checkpoints);
    if (stale > 0) std::printf("removed %lld unfinished file(s) of an interrupted save\n", static_cast<long long>(stale));
    const auto existing = list_checkpoints(checkpoints);
    std::vector<fs::path> doomed;
    if (!f.checkpoints.resume.empty()) {
      resumed_ = resolve_checkpoint(checkpoints, f.checkpoints.resume);
      TORCH_CHECK(resumed_->state.seed == f.optim.seed, "checkpoint '", resumed_->folder.string(),
                  "' was trained with --seed ", resumed_->state.seed, ", this run has ", f.optim.seed);
      for (const auto& folder : existing) {
        if (checkpoint_step(folder).value_or(0) > resumed_->state.step) doomed.push_back(folder);
      }
      if (f.checkpoints.resume == "latest") {  // later ones are damaged (resolve_checkpoint said so): set aside
        for (const auto& folder : doomed) {
          fs::rename(folder, folder.string() + ".damaged");
          std::printf("set aside %s.damaged\n", folder.string().c_str());
        }
        doomed.clear();
      }
      TORCH_CHECK(doomed.empty() || f.output.overwrite, "--resume from step ", resumed_->state.step, ": '",
                  checkpoints.string(), "' holds later checkpoints (", doomed.back().filename().string(),
                  "), which --resume latest would pick up again: give --overwrite to remove them");
    } else {
      TORCH_CHECK(existing.empty() || f.output.overwrite, "--output '", output().string(),
                  "' holds the checkpoints of an earlier run (newest: ", existing.empty() ? "" : existing.back().filename().string(),
                  "): give --resume latest to continue it, --overwrite to start afresh (removes them and its "
                  "loss.csv), or another --output");
      doomed = existing;
      if (f.output.overwrite) {
        for (const char* history : {"loss.csv", "loss.png", "validation.json"}) doomed.push_back(output() / history);
      }
    }
    int64_t removed = 0;
    for (const auto& path : doomed) removed += fs::remove_all(path) > 0;
    if (removed > 0) std::printf("--overwrite: removed %lld earlier file(s) and checkpoint(s) from %s\n",
                                 static_cast<long long>(removed), output().string().c_str());
  }

  // Whether every trainable tensor is finite (one read of the device).
  static bool all_finite(const scedit::TensorMap& tensors) {
    std::vector<torch::Tensor> finite;
    for (const auto& named : tensors) finite.push_back(torch::isfinite(named.second).all());
    return finite.empty() || torch::stack(finite).all().item<bool>();
  }

  // fp16 steps in a row whose loss may be non-finite (the loss scaler skipping them) before the
  // run counts as diverged.
  static constexpr int64_t kMaxOverflows = 20;

  // The plot's title: what is trained ("scedit", "lora", ...).
  static std::string title(const Trainable& trainable) {
    const auto method = trainable.settings.find("method");
    return method != trainable.settings.end() && method->is_string() ? method->get<std::string>() : "";
  }

  std::string program_;
  RunFlags flags_;
  torch::Device device_ = torch::kCPU;
  sd::Precision precision_ = sd::Precision::kFP32;
  sd::LeanActivations lean_;
  CudaGraphChoice cuda_graph_;  // whether steps go through GraphedTrainStep (join_world decides)
  std::unique_ptr<OutputLock> lock_;
  std::unique_ptr<Distributed> dist_;
  std::optional<VerifiedCheckpoint> resumed_;
  std::optional<sd::StableDiffusion> model_;  // loaded by `resolution`, until `load_model` takes it
};

}  // namespace common
