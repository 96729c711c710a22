#pragma once
/// @file batches.hpp
/// @brief Training micro-batches from a dataset: images through the frozen VAE (a draw from its
/// posterior), captions through the frozen text encoder(s) (or as token ids, for a text encoder
/// that trains), SDXL's added conditioning (the pooled caption and each sample's size
/// conditioning), condition images as they come — the
/// frozen half of a training step's data path, done without a graph and, with `cache`, once —
/// and the subsets of a dataset that train and that are held out.

#include <common/dataset.hpp>
#include <common/train_step.hpp>

#include <sd/stable_diffusion.hpp>

#include <torch/torch.h>

#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <map>
#include <set>
#include <string>
#include <utility>
#include <vector>

namespace common {

/// The samples of another source at the given indices, as a source of their own: a held-out
/// validation slice, or the training samples without it.
class SubsetSource : public ImageSource {
 public:
  /// The samples of `data` (which must outlive this) at `indices`.
  SubsetSource(const ImageSource& data, std::vector<int64_t> indices)
      : data_(data), indices_(std::move(indices)) {
    for (int64_t i : indices_) {
      TORCH_CHECK(i >= 0 && i < data_.size(), "SubsetSource: index ", i, " out of range for ",
                  data_.size(), " samples");
    }
  }
  /// Number of samples in the subset.
  int64_t size() const override { return static_cast<int64_t>(indices_.size()); }
  /// Sample `index` of the subset: sample `indices[index]` of the source.
  CaptionedImage get(int64_t index, torch::Generator& generator) const override {
    TORCH_CHECK(index >= 0 && index < size(), "SubsetSource::get: index ", index,
                " out of range for ", size(), " samples");
    return data_.get(indices_[static_cast<size_t>(index)], generator);
  }
  /// The source's key of sample `indices[index]`.
  std::string sample_key(int64_t index) const override {
    return data_.sample_key(indices_.at(static_cast<size_t>(index)));
  }

 private:
  const ImageSource& data_;
  std::vector<int64_t> indices_;
};

/// A dataset split into the samples to train on and those held out (`split_held_out`).
struct HeldOutSplit {
  SubsetSource training;  ///< the samples to train on
  SubsetSource held_out;  ///< the last samples, held out
  int64_t left_out = 0;   ///< entries left out of training because their image is held out
};

/// Holds out the last `held` samples of `data`, whose entries `items` are (one per sample, in
/// order): the others train, less every entry whose image file is a held-out one's (a listing
/// may name an image twice, with another caption). Refuses when nothing is left to train on.
inline HeldOutSplit split_held_out(const ImageSource& data, const std::vector<CaptionedItem>& items, int64_t held) {
  TORCH_CHECK(static_cast<int64_t>(items.size()) == data.size(), "split_held_out: ", items.size(),
              " items for ", data.size(), " samples");
  TORCH_CHECK(held >= 0 && held < data.size(), "the data holds ", data.size(), " samples: too few to hold out ",
              held, " for validation");
  const int64_t first_held = data.size() - held;
  auto image_of = [&](int64_t i) { return std::filesystem::weakly_canonical(items[static_cast<size_t>(i)].file); };
  std::set<std::filesystem::path> held_images;
  std::vector<int64_t> training, held_out;
  for (int64_t i = first_held; i < data.size(); ++i) {
    held_out.push_back(i);
    held_images.insert(image_of(i));
  }
  for (int64_t i = 0; i < first_held; ++i) {
    if (held_images.count(image_of(i)) == 0) training.push_back(i);
  }
  TORCH_CHECK(!training.empty(), "every entry of the data names an image of the ", held,
              " held-out entries: nothing is left to train on");
  const int64_t left_out = first_held - static_cast<int64_t>(training.size());
  return {SubsetSource(data, std::move(training)), SubsetSource(data, std::move(held_out)), left_out};
}

/// Options of a `BatchSource`.
struct BatchOptions {
  /// Encode every sample once, up front (with the dataset's centre crop and no flip: the cache
  /// holds one view of each image), then train on the cache.
  TORCH_ARG(bool, cache) = false;
  /// Probability of training a sample on the empty caption (for classifier-free guidance).
  TORCH_ARG(double, caption_dropout) = 0.0;
  /// Give the captions as token ids (`sd::tokenize_prompts`: [B, 77], SDXL [B, 2, 77]) instead
  /// of text embeddings, for a `Trainable` that runs (and trains) the text encoder itself; the
  /// pooled embedding of SDXL's added conditioning is then the `Trainable`'s to compute.
  TORCH_ARG(bool, tokens) = false;
};

/// Micro-batches of a dataset as `TrainBatch`es on the device.
///
/// All randomness of a batch comes from the caller's CPU generator, in this order: each sample's
/// own draws (crop, flip; `ImageSource::get`), the posterior noise, the caption dropout. For an
/// SDXL (a UNet with added conditioning) a batch also carries `added`: the captions' pooled
/// embeddings (the empty caption's where it is dropped, as diffusers' SDXL script encodes "")
/// and each sample's `CaptionedImage::size` as time ids.
class BatchSource {
 public:
  /// Batches of `data` through `pipe`'s VAE and text encoder (frozen, on `device`; the VAE
  /// encodes in the precision `sd::encode_posterior` chooses). With `options.cache` this encodes
  /// the whole dataset.
  BatchSource(sd::StableDiffusion& pipe, const ImageSource& data, BatchOptions options, torch::Device device)
      : pipe_(pipe), data_(data), options_(options), device_(device) {
    TORCH_CHECK(options_.caption_dropout() >= 0 && options_.caption_dropout() <= 1,
                "--caption-dropout must be in [0, 1], got ", options_.caption_dropout());
    TORCH_CHECK(!options_.tokens() || pipe_.tokenizer.has_value(), "BatchSource: the pipeline has no tokenizer");
    torch::NoGradGuard no_grad;
    empty_text_ = encode({""});
    if (!options_.cache()) return;
    std::map<std::string, sd::TextConditioning> by_caption;
    for (int64_t i = 0; i < data_.size(); ++i) {
      auto generator = make_cpu_generator(0);  // one view of each sample
      auto sample = data_.get(i, generator);
      auto posterior = sd::encode_posterior(pipe_, sample.image.unsqueeze(0));
      means_.push_back(posterior.mean);
      logvars_.push_back(posterior.logvar);
      auto it = by_caption.find(sample.caption);
      if (it == by_caption.end()) it = by_caption.emplace(sample.caption, encode({sample.caption})).first;
      texts_.push_back(it->second);
      sizes_.push_back(sample.size);
      conditions_.push_back(sample.conditions);
    }
    std::printf("cached %lld latents and %zu caption embeddings\n",
                static_cast<long long>(data_.size()), by_caption.size());
  }

  /// The micro-batch of the samples at `indices`, drawing from `generator`.
  TrainBatch get(const std::vector<int64_t>& indices, torch::Generator& generator) {
    torch::NoGradGuard no_grad;
    sd::LatentDistribution posterior;
    TrainBatch batch;
    std::vector<std::vector<torch::Tensor>> conditions;  // per sample
    std::vector<sd::SizeConditioning> sizes;             // per sample
    sd::TextConditioning text;
    if (options_.cache()) {
      std::vector<torch::Tensor> means, logvars, contexts, pooled;
      for (int64_t i : indices) {
        means.push_back(means_[i]);
        logvars.push_back(logvars_[i]);
        contexts.push_back(texts_[i].context);
        if (texts_[i].pooled.defined()) pooled.push_back(texts_[i].pooled);
        sizes.push_back(sizes_[i]);
        conditions.push_back(conditions_[i]);
      }
      posterior = {torch::cat(means), torch::cat(logvars)};
      text = {torch::cat(contexts), pooled.empty() ? torch::Tensor() : torch::cat(pooled)};
    } else {
      // One VAE and one text-encoder call for the whole batch.
      std::vector<torch::Tensor> images;
      std::vector<std::string> captions;
      for (int64_t i : indices) {
        auto sample = data_.get(i, generator);
        images.push_back(sample.image);
        captions.push_back(sample.caption);
        sizes.push_back(sample.size);
        conditions.push_back(sample.conditions);
      }
      posterior = sd::encode_posterior(pipe_, torch::stack(images));  // [B, 3, R, R]
      text = encode(captions);
    }
    // z ~ N(mean, exp(logvar)), noise drawn on the CPU (diffusers train_text_to_image.py).
    const auto noise = torch::randn(posterior.mean.sizes(), generator, torch::kFloat32);
    batch.latents = sd::posterior_latents(pipe_, posterior, noise.to(device_));
    if (options_.caption_dropout() > 0) {
      auto drop = torch::rand({static_cast<int64_t>(indices.size())}, generator) < options_.caption_dropout();
      for (int64_t b = 0; b < drop.size(0); ++b) {
        if (!drop[b].item<bool>()) continue;
        text.context[b].copy_(empty_text_.context[0]);
        if (text.pooled.defined()) text.pooled[b].copy_(empty_text_.pooled[0]);
      }
    }
    batch.text = text.context;
    batch.added = added_conditions(text.pooled, sizes);
    batch.conditions = stack_conditions(conditions);
    return batch;
  }

 private:
  // The captions' embeddings (context and, for SDXL, pooled) on the device, or with
  // `options_.tokens` their token ids as the context (copies: a caption dropout writes into them).
  sd::TextConditioning encode(const std::vector<std::string>& captions) {
    if (options_.tokens()) return {sd::tokenize_prompts(pipe_, captions).to(device_), {}};
    auto text = sd::encode_text(pipe_, captions);
    return {text.context.to(device_), text.pooled.defined() ? text.pooled.to(device_) : text.pooled};
  }

  // SDXL's added conditioning of a batch (empty for SD 1.x and 2.x): the pooled embeddings and
  // the samples' time ids; with token ids the time ids alone, the denoiser pooling the captions.
  sd::UNetAddedConditions added_conditions(const torch::Tensor& pooled,
                                           const std::vector<sd::SizeConditioning>& sizes) const {
    if (!pipe_.unet_config.has_text_time()) return {};
    if (pooled.defined()) return sd::added_conditions(pipe_, pooled, sizes);
    return {{}, sd::size_time_ids(sizes, static_cast<int64_t>(sizes.size())).to(device_)};  // [B, 6]
  }

  // Per-sample lists of conditions -> one [B, 3, R, R] tensor per condition, on the device.
  std::vector<torch::Tensor> stack_conditions(const std::vector<std::vector<torch::Tensor>>& samples) const {
    std::vector<torch::Tensor> out;
    const size_t count = samples.front().size();
    for (size_t k = 0; k < count; ++k) {
      std::vector<torch::Tensor> column;
      for (const auto& sample : samples) {
        TORCH_CHECK(sample.size() == count, "BatchSource: the samples of a batch carry ",
                    count, " and ", sample.size(), " condition images");
        column.push_back(sample[k]);
      }
      out.push_back(torch::stack(column).to(device_));  // B x [3, R, R] -> [B, 3, R, R]
    }
    return out;
  }

  sd::StableDiffusion& pipe_;
  const ImageSource& data_;
  BatchOptions options_;
  torch::Device device_;
  sd::TextConditioning empty_text_;
  std::vector<torch::Tensor> means_, logvars_;              // the cache
  std::vector<sd::TextConditioning> texts_;                 // the cache's captions, as encode gives them
  std::vector<sd::SizeConditioning> sizes_;                 // the cache's size conditioning
  std::vector<std::vector<torch::Tensor>> conditions_;      // the cache's condition images
};

}  // namespace common
