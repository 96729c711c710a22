#pragma once
/// @file flags.hpp
/// @brief The flags of a training run, in groups (model, data, compute, optimisation,
/// checkpoints, output), as every training program offers them; a program adds the flags of
/// what it trains (e.g. `add_method_flags`) and nothing else.

#include <common/model.hpp>
#include <common/optim.hpp>
#include <common/tuners.hpp>

#include <CLI/CLI.hpp>

#include <cstdint>
#include <string>
#include <vector>

namespace common {

/// Where the training images come from and how they are prepared.
struct DataFlags {
  std::string data;         ///< captioned image folder; empty (random-weight models): demo data
  int64_t resolution = 0;   ///< training image side; 0: the model's native size (`TrainingRun::resolution`)
  bool random_crop = false;  ///< random instead of centre crops
  bool random_flip = false;  ///< mirror at random
  double caption_dropout = 0.0;  ///< probability of the empty caption
  std::string bad_data = "skip";  ///< skip | fatal
  bool cache = false;       ///< encode every image and caption once
};

/// How the step computes: precision, device and the memory / speed levers.
struct ComputeFlags {
  std::string precision = "fp32";  ///< fp32 | bf16 | fp16
  std::string device = "auto";     ///< auto | cpu | cuda[:N]
  /// Lean levers (lean.hpp); `default` is the fastest and leanest measured (bench/RESULTS.md).
  std::string lean = "default";
  bool gradient_checkpointing = false;  ///< recompute the decoder in the backward pass
  bool channels_last = false;           ///< NHWC convolutions
  std::string cuda_graph = "auto";      ///< auto | on | off: capture the step as a CUDA graph
};

/// The optimiser, the batch and the length of the run.
struct OptimFlags {
  /// AdamW and its schedule; lr 0 means the model's default (1e-4, or 1e-3 on the tiny model).
  OptimOptions optim = [] {
    OptimOptions o;
    o.lr = 0;
    return o;
  }();
  int64_t batch_size = 4;   ///< images per micro-batch (per process)
  int64_t grad_accum = 1;   ///< micro-batches per optimizer step
  int64_t max_steps = 0;    ///< optimizer steps; 0: from epochs (300 on the tiny default)
  double epochs = 0;        ///< passes over the data when max_steps is 0
  uint64_t seed = 0;        ///< the seed of every random draw
  std::string prediction;   ///< epsilon | v_prediction; empty: what the model predicts
};

/// When checkpoints are written, how many are kept, and where to resume from.
struct CheckpointFlags {
  int64_t every = 100;   ///< steps between checkpoints; 0: only at the end
  int64_t keep_last = 2;  ///< checkpoints kept; 0: all
  std::string resume;    ///< a checkpoint folder, or `latest`
};

/// What the run writes for a person: the output folder, progress lines, validation samples.
struct OutputFlags {
  std::string output;                      ///< the output folder
  bool overwrite = false;                  ///< start afresh where an earlier run left checkpoints
  int64_t log_every = 10;                  ///< steps between progress lines
  int64_t validation_every = 0;            ///< steps between sample grids; 0: only at the end
  std::vector<std::string> validation_prompts;  ///< prompts of the sample grids
  int64_t validation_steps = 20;           ///< DDIM steps of the samples
};

/// Who this process is in a multi-process run: torchrun's environment, or flags that override it.
struct DistributedFlags {
  int64_t nproc = 1;           ///< --nproc: local processes to launch (this one is rank 0)
  int64_t rank = -1;           ///< --rank; -1: `RANK`, else 0
  int64_t world_size = 0;      ///< --world-size; 0: `WORLD_SIZE`, else 1
  std::string master_addr;     ///< --master-addr; empty: `MASTER_ADDR`, else 127.0.0.1
  int64_t master_port = 0;     ///< --master-port; 0: `MASTER_PORT`, else 29500
  double timeout = 300;        ///< --dist-timeout: seconds a collective or the rendezvous may take
  double bucket_mb = 25;       ///< --bucket-mb: MiB of gradients per all-reduce (DDP's 25)
};

/// Every flag of a training run.
struct RunFlags {
  ModelFlags model;               ///< --model, --tokenizer
  DataFlags data;                 ///< --data, --resolution, ...
  ComputeFlags compute;           ///< --precision, --device, --lean, ...
  OptimFlags optim;               ///< --lr, --batch-size, --max-steps, --seed, ...
  CheckpointFlags checkpoints;    ///< --checkpoint-every, --keep-last, --resume
  OutputFlags output;             ///< --output, --log-every, --validation-*
  DistributedFlags distributed;   ///< --nproc, --rank, --world-size, --master-*, --dist-timeout, --bucket-mb
};

/// Adds the `--method` family (which tuners train) to `app`.
inline void add_method_flags(CLI::App& app, MethodOptions& method) {
  const char* group = "Method";
  app.add_option("--method", method.method, "scedit | lora | scedit+lora")
      ->check(CLI::IsMember({"scedit", "lora", "scedit+lora"}))->group(group);
  app.add_option("--sc-down-ratio", method.sc_down_ratio, "SC-Tuner hidden width / skip channels")->group(group);
  app.add_option("--sc-skips", method.sc_pattern, "Regex over skip-site paths (lsc_identity.0 … 11, decoder order); empty = all")->group(group);
  app.add_option("--lora-rank", method.lora_rank, "LoRA rank r")->group(group);
  app.add_option("--lora-alpha", method.lora_alpha, "LoRA alpha (scale alpha / r)")->group(group);
  app.add_option("--lora-targets", method.lora_targets,
                 "Comma-separated peft-style module names (sd-scripts also adapts proj_in,proj_out)")->group(group);
  app.add_flag("--train-text-encoder", method.train_text_encoder,
               "Also train LoRA in the text encoder (with --method lora or scedit+lora)")->group(group);
  app.add_option("--text-encoder-lr", method.text_encoder_lr,
                 "Learning rate of the text encoder's LoRA; 0: --lr")->group(group);
  app.add_option("--text-encoder-lora-targets", method.text_encoder_targets,
                 "Comma-separated module names of the text encoder that LoRA adapts")->group(group);
}

/// Adds every flag of a training run to `app`, in groups. Set program-specific defaults (the
/// output folder) in `flags` first: the help shows them.
inline void add_run_flags(CLI::App& app, RunFlags& flags) {
  add_model_flags(app, flags.model);

  auto& d = flags.data;
  const char* data = "Data";
  app.add_option("--data", d.data, "Image folder with captions: CSV (Image:FILE,Text), metadata.jsonl, or .txt beside each image")->group(data);
  app.add_option("--resolution", d.resolution, "Training image side (multiple of 8; 0: the model's native size: 512 SD 1.5, 768 SD 2.1, 1024 SDXL, 64 the tiny models)")->group(data);
  app.add_flag("--random-crop", d.random_crop, "Random instead of centre crop")->group(data);
  app.add_flag("--random-flip", d.random_flip, "Mirror images left-right at random")->group(data);
  app.add_option("--caption-dropout", d.caption_dropout, "Probability of training on the empty caption")->check(CLI::Range(0.0, 1.0))->group(data);
  app.add_option("--bad-data", d.bad_data, "skip | fatal: what to do with unreadable images, empty captions, small images")->group(data);
  app.add_flag("--cache", d.cache, "Encode every image and caption once (centre crop, no flip) and train on the cache")->group(data);

  auto& c = flags.compute;
  const char* compute = "Compute";
  app.add_option("--precision", c.precision, "fp32 | bf16 | fp16 (frozen weights in half precision, trainable in fp32)")->group(compute);
  app.add_option("--device", c.device, "auto | cpu | cuda[:N]")->group(compute);
  app.add_option("--lean", c.lean, "Lean activations (less memory, same result in fp32), comma-separated: norm-silu, geglu, norm-dtype, ff-recompute, all (those four), fused-norm-silu, fused-geglu, fused-layer-norm, fused (all three; the fused CUDA kernels, CUDA builds), default (norm-dtype, plus fused where they run), none")->group(compute);
  app.add_flag("--gradient-checkpointing", c.gradient_checkpointing, "Recompute the decoder in the backward pass: less memory, more compute")->group(compute);
  app.add_flag("--channels-last", c.channels_last, "UNet convolutions in channels-last (NHWC) memory order (measured 7% slower on an H200 at SD 1.5 size: bench/RESULTS.md)")->group(compute);
  app.add_option("--cuda-graph", c.cuda_graph, "auto | on | off: capture the whole step (forward, backward, AdamW) as a CUDA graph after two eager steps and replay it. auto: wherever it applies (CUDA, bf16 or fp32, no --grad-accum, one process); on: refuse a run where it does not")->check(CLI::IsMember({"auto", "on", "off"}))->group(compute);

  auto& o = flags.optim;
  const char* optim = "Optimisation";
  app.add_option("--lr", o.optim.lr, "AdamW learning rate (0: SCEdit's 1e-4; 1e-3 on the tiny default, whose random weights learn slowly)")->group(optim);
  app.add_option("--adam-beta1", o.optim.beta1, "AdamW beta1")->group(optim);
  app.add_option("--adam-beta2", o.optim.beta2, "AdamW beta2")->group(optim);
  app.add_option("--adam-eps", o.optim.eps, "AdamW epsilon")->group(optim);
  app.add_option("--weight-decay", o.optim.weight_decay, "AdamW weight decay")->group(optim);
  app.add_option("--lr-schedule", o.optim.schedule, "constant | warmup | cosine")->group(optim);
  app.add_option("--warmup-steps", o.optim.warmup_steps, "Linear warm-up steps")->group(optim);
  app.add_option("--max-grad-norm", o.optim.max_grad_norm, "Clip the gradient norm (0: off)")->group(optim);
  app.add_option("--batch-size", o.batch_size, "Images per micro-batch")->group(optim);
  app.add_option("--grad-accum", o.grad_accum, "Micro-batches per optimizer step")->group(optim);
  app.add_option("--max-steps", o.max_steps, "Optimizer steps (0: from --epochs; 300 on the tiny default)")->group(optim);
  app.add_option("--epochs", o.epochs, "Passes over the data (when --max-steps is 0)")->group(optim);
  app.add_option("--seed", o.seed, "Seed of every random draw")->check(CLI::NonNegativeNumber)->group(optim);
  app.add_option("--prediction", o.prediction, "What the UNet learns to predict: epsilon | v_prediction (default: what the model's scheduler config says: epsilon for SD 1.5, v_prediction for the tiny model)")
      ->check(CLI::IsMember({"epsilon", "v_prediction"}))->group(optim);

  auto& k = flags.checkpoints;
  const char* checkpoints = "Checkpoints";
  app.add_option("--checkpoint-every", k.every, "Steps between checkpoints (0: only at the end)")->group(checkpoints);
  app.add_option("--keep-last", k.keep_last, "Checkpoints to keep (0: all)")->group(checkpoints);
  app.add_option("--resume", k.resume, "Checkpoint folder, or 'latest' under --output/checkpoints")->group(checkpoints);

  auto& out = flags.output;
  const char* output = "Output";
  app.add_option("--output", out.output, "Output folder: weights, loss.csv, loss.png, samples, checkpoints")->group(output);
  app.add_flag("--overwrite", out.overwrite, "Start afresh in an --output that holds an earlier run's checkpoints (removes them and its history); with --resume, remove the checkpoints after the one resumed")->group(output);
  app.add_option("--log-every", out.log_every, "Steps between progress lines")->check(CLI::PositiveNumber)->group(output);
  app.add_option("--validation-every", out.validation_every, "Steps between sample grids (0: only at the end)")->check(CLI::NonNegativeNumber)->group(output);
  app.add_option("--validation-prompt", out.validation_prompts, "Prompt for the sample grid (repeatable)")->group(output);
  app.add_option("--validation-steps", out.validation_steps, "DDIM steps of the samples")->check(CLI::PositiveNumber)->group(output);

  auto& w = flags.distributed;
  const char* distributed = "Distributed (torchrun's RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT; flags override)";
  app.add_option("--nproc", w.nproc, "Local processes to train with (this one is rank 0; --batch-size is per process)")->check(CLI::PositiveNumber)->group(distributed);
  app.add_option("--rank", w.rank, "This process's rank (default: RANK, else 0)")->check(CLI::NonNegativeNumber)->group(distributed);
  app.add_option("--world-size", w.world_size, "Processes in the run (default: WORLD_SIZE, else 1)")->check(CLI::PositiveNumber)->group(distributed);
  app.add_option("--master-addr", w.master_addr, "Address of rank 0's rendezvous (default: MASTER_ADDR, else 127.0.0.1)")->group(distributed);
  app.add_option("--master-port", w.master_port, "Port of rank 0's rendezvous (default: MASTER_PORT, else 29500)")->check(CLI::Range(1, 65535))->group(distributed);
  app.add_option("--dist-timeout", w.timeout, "Seconds the rendezvous or one collective may take before the run stops, naming the rank that is gone or hung")->check(CLI::PositiveNumber)->group(distributed);
  app.add_option("--bucket-mb", w.bucket_mb, "MiB of gradients per all-reduce bucket; each starts while the backward pass goes on (the first bucket holds 1 MiB)")->check(CLI::PositiveNumber)->group(distributed);
}

}  // namespace common
