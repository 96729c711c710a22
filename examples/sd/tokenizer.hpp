#pragma once
/// @file tokenizer.hpp
/// @brief The CLIP byte-level BPE tokenizer of Stable Diffusion 1.x (`tokenizer/vocab.json` +
/// `tokenizer/merges.txt` of a diffusers model folder).
///
/// Reproduces transformers' `CLIPTokenizer` as the reference fixtures were made with
/// (transformers 5.x, whose CLIPTokenizer is the `tokenizers` pipeline), SD 1.5 settings:
///  1. added-token split: the literal special tokens `<|startoftext|>` / `<|endoftext|>` in the
///     raw text become their ids (as HF does before normalisation);
///  2. normaliser (`tokenizers`: NFC, `Replace(\s+, " ")`, `Lowercase`): canonical composition
///     of the common precomposed Latin / Greek / Cyrillic letters, whitespace collapsed,
///     per-code-point lower-casing (Rust `char::to_lowercase`: no final-sigma rule);
///  3. pre-tokeniser: the pieces of
///     `<|startoftext|>|<|endoftext|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+`
///     (what matches nothing, i.e. whitespace, is dropped);
///  4. each piece's UTF-8 bytes mapped to OpenAI's byte symbols (`bytes_to_unicode`), `</w>`
///     appended to its last symbol, then BPE by merge rank (OpenAI `simple_tokenizer.py`);
///  5. `bos … eos`, truncated to `max_length` (keeping bos, the first max_length − 2 tokens and
///     eos), padded with `pad_token`.
///
/// Unlike OpenAI's original `simple_tokenizer.py` (ftfy + `html.unescape`), the transformers
/// reference does NOT unescape HTML entities: `&amp;` stays `& amp ;` (a case in
/// tokenizer_cases.json pins this).
///
/// Unicode classes (`\p{L}`, `\p{N}`, `\s`) and lower-casing come from compact tables
/// (tokenizer_tables.hpp) generated from UnicodeData 14.0 for the scripts that prompts use:
/// Latin, Greek, Cyrillic, Armenian, Hebrew, Arabic, Devanagari, Thai, Georgian, Hangul,
/// Hiragana / Katakana, CJK (incl. the supplementary ideograph planes). Letters of other scripts are treated as symbols
/// (`[^\s\p{L}\p{N}]`), which only moves word boundaries there; emoji are symbols, as in Unicode.
///
/// Example:
/// @code
/// sd::CLIPTokenizer tokenizer("stable-diffusion-v1-5/tokenizer");
/// std::vector<int64_t> ids = tokenizer.encode("a photo of an astronaut");  // bos … eos
/// torch::Tensor batch = tokenizer({"a photo of a cat", ""});               // int64 [2, 77]
/// @endcode

#include <torch/torch.h>

#include <nlohmann/json.hpp>

#include <sd/tokenizer_tables.hpp>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <limits>
#include <memory>
#include <mutex>
#include <sstream>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

namespace sd {
namespace unicode {

/// True when `c` lies in one of the sorted, disjoint `ranges`.
template <size_t N>
inline bool in_ranges(const CodeRange (&ranges)[N], char32_t c) {
  const auto* it = std::upper_bound(std::begin(ranges), std::end(ranges), c,
                                    [](char32_t v, const CodeRange& r) { return v < r.lo; });
  return it != std::begin(ranges) && c <= std::prev(it)->hi;
}

/// `\p{L}`: a letter.
inline bool is_letter(char32_t c) { return in_ranges(kLetterRanges, c); }

/// `\p{N}`: a number (decimal digits, letter-like and other numerals).
inline bool is_number(char32_t c) { return in_ranges(kNumberRanges, c); }

/// `\s` of the reference's regex engine (Unicode White_Space).
inline bool is_space(char32_t c) {
  return (c >= 0x09 && c <= 0x0D) || c == 0x20 || c == 0x85 || c == 0xA0 || c == 0x1680 ||
         (c >= 0x2000 && c <= 0x200A) || c == 0x2028 || c == 0x2029 || c == 0x202F ||
         c == 0x205F || c == 0x3000;
}

/// Appends the lower case of `c` (one code point, except U+0130 İ -> "i̇" as in Unicode).
inline void append_lower(char32_t c, std::u32string& out) {
  if (c < 0x80) {
    out.push_back(c >= U'A' && c <= U'Z' ? c + 32 : c);
    return;
  }
  if (c == 0x130) {  // the one multi-code-point lower case in these blocks
    out.push_back(U'i');
    out.push_back(0x307);
    return;
  }
  const auto* it = std::upper_bound(std::begin(kLowerRuns), std::end(kLowerRuns), c,
                                    [](char32_t v, const LowerRun& r) { return v < r.lo; });
  if (it != std::begin(kLowerRuns)) {
    const LowerRun& run = *std::prev(it);
    if (c <= run.hi && (c - run.lo) % static_cast<char32_t>(run.stride) == 0) {
      out.push_back(static_cast<char32_t>(static_cast<int64_t>(c) + run.delta));
      return;
    }
  }
  out.push_back(c);
}

/// The precomposed character of `base + mark`, or 0 when there is none in the table.
inline char32_t compose(char32_t base, char32_t mark) {
  const auto* it = std::lower_bound(
      std::begin(kCompositions), std::end(kCompositions), std::make_pair(base, mark),
      [](const Composition& e, const std::pair<char32_t, char32_t>& key) {
        return std::make_pair(e.base, e.mark) < key;
      });
  return (it != std::end(kCompositions) && it->base == base && it->mark == mark) ? it->composed
                                                                                 : 0;
}

/// Reads the code point that starts at byte `at` of `text` (at < text.size()) into `c`: returns
/// the number of bytes it takes, or 0 when the bytes there are no valid UTF-8 (a stray
/// continuation or invalid lead byte, a sequence cut short, an overlong form, a surrogate, or a
/// value beyond U+10FFFF), then `problem` says which.
inline size_t read_code_point(const std::string& text, size_t at, char32_t& c, std::string& problem) {
  const auto byte = [&](size_t i) { return static_cast<unsigned char>(text[i]); };
  const unsigned char lead = byte(at);
  size_t extra = 0;
  if (lead < 0x80) {
    c = lead;
    return 1;
  } else if ((lead & 0xE0) == 0xC0) {
    c = lead & 0x1F, extra = 1;
  } else if ((lead & 0xF0) == 0xE0) {
    c = lead & 0x0F, extra = 2;
  } else if ((lead & 0xF8) == 0xF0) {
    c = lead & 0x07, extra = 3;
  } else {
    problem = (lead & 0xC0) == 0x80 ? "a continuation byte with no lead byte" : "not a UTF-8 byte";
    return 0;
  }
  for (size_t k = 1; k <= extra; ++k) {
    if (at + k >= text.size() || (byte(at + k) & 0xC0) != 0x80) {
      problem = "a sequence cut short";
      return 0;
    }
    c = (c << 6) | (byte(at + k) & 0x3F);
  }
  static constexpr char32_t kMin[] = {0, 0x80, 0x800, 0x10000};  // shortest form of each length
  if (c < kMin[extra]) {
    problem = "an overlong sequence";
    return 0;
  }
  if (c > 0x10FFFF || (c >= 0xD800 && c <= 0xDFFF)) {
    problem = "a surrogate or a value beyond U+10FFFF";
    return 0;
  }
  return extra + 1;
}

/// "" when `text` is valid UTF-8; otherwise where its first invalid byte is and what is wrong
/// there, to follow "… is not valid UTF-8": "at byte 5 (0xFF: not a UTF-8 byte)" (bytes counted
/// from 1). The one UTF-8 check of the programs: captions at the dataset scan, prompts at the
/// tokenizer.
inline std::string utf8_problem(const std::string& text) {
  char32_t c = 0;
  std::string problem;
  for (size_t at = 0; at < text.size();) {
    const size_t length = read_code_point(text, at, c, problem);
    if (length == 0) {
      char hex[8];
      std::snprintf(hex, sizeof(hex), "0x%02X", static_cast<unsigned>(static_cast<unsigned char>(text[at])));
      return "at byte " + std::to_string(at + 1) + " (" + hex + ": " + problem + ")";
    }
    at += length;
  }
  return "";
}

/// `text` fit to print inside a message: each byte that is not part of valid UTF-8 written as
/// `\xFF`, the rest as it is (so that a message about bad bytes is not itself bad UTF-8).
inline std::string escape_invalid_utf8(const std::string& text) {
  std::string out;
  char32_t c = 0;
  std::string problem;
  for (size_t at = 0; at < text.size();) {
    const size_t length = read_code_point(text, at, c, problem);
    if (length > 0) {
      out.append(text, at, length);
      at += length;
      continue;
    }
    char hex[8];
    std::snprintf(hex, sizeof(hex), "\\x%02X", static_cast<unsigned>(static_cast<unsigned char>(text[at])));
    out += hex;
    ++at;
  }
  return out;
}

/// Decodes UTF-8; throws where `text` is not valid UTF-8 (`utf8_problem`).
inline std::u32string decode_utf8(const std::string& text) {
  std::u32string out;
  out.reserve(text.size());
  char32_t c = 0;
  std::string problem;
  for (size_t at = 0; at < text.size();) {
    const size_t length = read_code_point(text, at, c, problem);
    TORCH_CHECK(length > 0, "CLIPTokenizer: \"", escape_invalid_utf8(text), "\" is not valid UTF-8 ",
                utf8_problem(text));
    out.push_back(c);
    at += length;
  }
  return out;
}

/// Appends the UTF-8 encoding of `c`.
inline void append_utf8(char32_t c, std::string& out) {
  if (c < 0x80) {
    out.push_back(static_cast<char>(c));
  } else if (c < 0x800) {
    out.push_back(static_cast<char>(0xC0 | (c >> 6)));
    out.push_back(static_cast<char>(0x80 | (c & 0x3F)));
  } else if (c < 0x10000) {
    out.push_back(static_cast<char>(0xE0 | (c >> 12)));
    out.push_back(static_cast<char>(0x80 | ((c >> 6) & 0x3F)));
    out.push_back(static_cast<char>(0x80 | (c & 0x3F)));
  } else {
    out.push_back(static_cast<char>(0xF0 | (c >> 18)));
    out.push_back(static_cast<char>(0x80 | ((c >> 12) & 0x3F)));
    out.push_back(static_cast<char>(0x80 | ((c >> 6) & 0x3F)));
    out.push_back(static_cast<char>(0x80 | (c & 0x3F)));
  }
}

/// The reference normaliser: NFC composition (table above), every run of whitespace -> one
/// space, lower case per code point (tokenizers' `NFC`, `Replace(\s+, " ")`, `Lowercase`).
inline std::u32string normalize(const std::u32string& text) {
  std::u32string composed;
  composed.reserve(text.size());
  for (char32_t c : text) {
    if (!composed.empty() && c >= 0x300 && c <= 0x36F) {
      if (const char32_t merged = compose(composed.back(), c)) {
        composed.back() = merged;
        continue;
      }
    }
    composed.push_back(c);
  }
  std::u32string out;
  out.reserve(composed.size());
  for (char32_t c : composed) {
    if (is_space(c)) {
      if (out.empty() || out.back() != U' ') out.push_back(U' ');
    } else {
      append_lower(c, out);
    }
  }
  return out;
}

}  // namespace unicode

/// Options of a CLIPTokenizer beyond its files.
struct CLIPTokenizerOptions {
  /// Sequence length of `operator()`'s output, bos and eos included (77 for CLIP).
  TORCH_ARG(int64_t, max_length) = 77;
  /// Token that pads short prompts: `<|endoftext|>` for SD 1.x, `!` for SD 2.x.
  TORCH_ARG(std::string, pad_token) = "<|endoftext|>";
};

/// CLIP's byte-level BPE tokenizer (see the file comment for the exact pipeline).
///
/// Thread-safe for concurrent `encode` calls; copies share one BPE cache.
class CLIPTokenizer {
 public:
  /// Literal text of the beginning-of-sequence token.
  static constexpr const char* kBosToken = "<|startoftext|>";
  /// Literal text of the end-of-sequence token.
  static constexpr const char* kEosToken = "<|endoftext|>";

  /// Reads `folder/vocab.json` and `folder/merges.txt` (a diffusers model's `tokenizer/`).
  explicit CLIPTokenizer(const std::string& folder, CLIPTokenizerOptions options = {})
      : CLIPTokenizer((std::filesystem::path(folder) / "vocab.json").string(),
                      (std::filesystem::path(folder) / "merges.txt").string(), std::move(options)) {
  }

  /// Reads a vocabulary (JSON object token -> id) and a merges file ("a b" per line, rank =
  /// line order, after an optional `#version` line). Throws naming the file on any problem.
  CLIPTokenizer(const std::string& vocab_path, const std::string& merges_path,
                CLIPTokenizerOptions options = {})
      : options_(std::move(options)), cache_(std::make_shared<Cache>()) {
    TORCH_CHECK(options_.max_length() >= 2, "CLIPTokenizer: max_length must be >= 2 (bos + eos), got ",
                options_.max_length());
    read_vocab(vocab_path);
    read_merges(merges_path);
    bos_id_ = special_id(kBosToken, vocab_path);
    eos_id_ = special_id(kEosToken, vocab_path);
    pad_id_ = special_id(options_.pad_token(), vocab_path);
    build_byte_symbols();
  }

  /// Token ids of `text`: bos, the BPE tokens, eos. With `truncate` (default) at most
  /// `max_length` ids (bos, the first max_length − 2 tokens, eos); not padded.
  /// Throws for text that is not valid UTF-8, quoting it and naming the byte at fault.
  std::vector<int64_t> encode(const std::string& text, bool truncate = true) const {
    const auto invalid = unicode::utf8_problem(text);
    TORCH_CHECK(invalid.empty(), "CLIPTokenizer: the prompt \"", unicode::escape_invalid_utf8(text),
                "\" is not valid UTF-8 ", invalid);
    std::vector<int64_t> ids{bos_id_};
    // 1. Added-token split: literal special tokens in the raw text are their ids.
    size_t begin = 0;
    while (begin <= text.size()) {
      size_t found = std::string::npos, length = 0;
      int64_t special = 0;
      for (const auto& [token, id] : {std::make_pair(std::string(kBosToken), bos_id_),
                                      std::make_pair(std::string(kEosToken), eos_id_)}) {
        const size_t at = text.find(token, begin);
        if (at < found) found = at, length = token.size(), special = id;
      }
      encode_segment(text.substr(begin, found == std::string::npos ? std::string::npos
                                                                    : found - begin),
                     ids);
      if (found == std::string::npos) break;
      ids.push_back(special);
      begin = found + length;
    }
    if (truncate && static_cast<int64_t>(ids.size()) + 1 > options_.max_length()) {
      ids.resize(static_cast<size_t>(options_.max_length() - 1));
    }
    ids.push_back(eos_id_);
    return ids;
  }

  /// True when `operator()` cuts `text`: its ids, bos and eos included, are more than
  /// `max_length()` (the text encoder never sees the rest).
  bool cuts(const std::string& text) const {
    return static_cast<int64_t>(encode(text, /*truncate=*/false).size()) > options_.max_length();
  }

  /// The BPE token strings of `text` (byte symbols, `</w>` marking word ends), no bos/eos.
  std::vector<std::string> tokenize(const std::string& text) const {
    std::vector<int64_t> ids = encode(text, /*truncate=*/false);
    std::vector<std::string> tokens;
    for (size_t i = 1; i + 1 < ids.size(); ++i) tokens.push_back(id_to_token_[ids[i]]);
    return tokens;
  }

  /// A batch of prompts as int64 ids [N, max_length]: encoded, truncated, padded with pad_id().
  torch::Tensor operator()(const std::vector<std::string>& prompts) const {
    const int64_t length = options_.max_length();
    torch::Tensor out =
        torch::full({static_cast<int64_t>(prompts.size()), length}, pad_id_, torch::kInt64);
    auto rows = out.accessor<int64_t, 2>();
    for (size_t n = 0; n < prompts.size(); ++n) {
      const std::vector<int64_t> ids = encode(prompts[n]);
      for (size_t i = 0; i < ids.size(); ++i) rows[static_cast<int64_t>(n)][static_cast<int64_t>(i)] = ids[i];
    }
    return out;  // [N, max_length]
  }

  /// Text of `ids`: byte symbols back to bytes, `</w>` to spaces; bos / eos dropped unless
  /// `keep_special`. Throws for an id outside the vocabulary.
  std::string decode(const std::vector<int64_t>& ids, bool keep_special = false) const {
    std::string text;
    for (int64_t id : ids) {
      TORCH_CHECK(id >= 0 && id < static_cast<int64_t>(id_to_token_.size()) &&
                      !id_to_token_[static_cast<size_t>(id)].empty(),
                  "CLIPTokenizer::decode: id ", id, " is not in the vocabulary");
      const bool special = id == bos_id_ || id == eos_id_;
      if (special && !keep_special) continue;
      std::string token = id_to_token_[static_cast<size_t>(id)];
      if (special) {
        text += token;
        continue;
      }
      bool word_end = false;
      if (token.size() >= 4 && token.compare(token.size() - 4, 4, "</w>") == 0) {
        token.resize(token.size() - 4);
        word_end = true;
      }
      for (char32_t symbol : unicode::decode_utf8(token)) {
        const auto byte = symbol_to_byte_.find(symbol);
        TORCH_CHECK(byte != symbol_to_byte_.end(), "CLIPTokenizer::decode: token '", token,
                    "' holds a character that is no byte symbol");
        text.push_back(static_cast<char>(byte->second));
      }
      if (word_end) text.push_back(' ');
    }
    while (!text.empty() && text.back() == ' ') text.pop_back();
    return text;
  }

  /// Id of `<|startoftext|>` (49406 in CLIP's vocabulary).
  int64_t bos_id() const { return bos_id_; }
  /// Id of `<|endoftext|>` (49407).
  int64_t eos_id() const { return eos_id_; }
  /// Id of the padding token (= eos for SD 1.x).
  int64_t pad_id() const { return pad_id_; }
  /// Output length of `operator()`.
  int64_t max_length() const { return options_.max_length(); }
  /// Number of vocabulary entries.
  int64_t vocab_size() const { return static_cast<int64_t>(vocab_.size()); }
  /// Number of merge rules.
  int64_t num_merges() const { return static_cast<int64_t>(ranks_.size()); }
  /// The options this tokenizer was built with.
  const CLIPTokenizerOptions& options() const { return options_; }

 private:
  /// BPE results per piece; shared by copies, guarded by its mutex.
  struct Cache {
    std::mutex mutex;
    std::unordered_map<std::string, std::vector<int64_t>> ids;
  };
  static constexpr size_t kMaxCacheEntries = 1 << 18;  // cleared when full (bounded memory)

  void read_vocab(const std::string& path) {
    std::ifstream in(path);
    TORCH_CHECK(in.good(), "CLIPTokenizer: cannot open vocabulary file '", path, "'");
    nlohmann::json json;
    try {
      in >> json;
    } catch (const nlohmann::json::exception& e) {
      TORCH_CHECK(false, "CLIPTokenizer: vocabulary file '", path, "' is not valid JSON: ", e.what());
    }
    TORCH_CHECK(json.is_object() && !json.empty(), "CLIPTokenizer: vocabulary file '", path,
                "' must hold a non-empty JSON object token -> id");
    for (const auto& [token, id] : json.items()) {
      TORCH_CHECK(id.is_number_integer() && id.get<int64_t>() >= 0 &&
                      id.get<int64_t>() < (int64_t{1} << 31),
                  "CLIPTokenizer: vocabulary file '", path, "': id of token '", token,
                  "' must be a non-negative integer, got ", id.dump());
      const auto value = id.get<int64_t>();
      vocab_.emplace(token, value);
      if (static_cast<size_t>(value) >= id_to_token_.size()) id_to_token_.resize(value + 1);
      TORCH_CHECK(id_to_token_[static_cast<size_t>(value)].empty(), "CLIPTokenizer: vocabulary file '",
                  path, "': id ", value, " is given to both '", id_to_token_[value], "' and '",
                  token, "'");
      id_to_token_[static_cast<size_t>(value)] = token;
    }
  }

  void read_merges(const std::string& path) {
    std::ifstream in(path);
    TORCH_CHECK(in.good(), "CLIPTokenizer: cannot open merges file '", path, "'");
    std::string line;
    for (int64_t number = 1; std::getline(in, line); ++number) {
      if (!line.empty() && line.back() == '\r') line.pop_back();
      if (line.empty() || (number == 1 && line.rfind("#version", 0) == 0)) continue;
      const size_t space = line.find(' ');
      TORCH_CHECK(space != std::string::npos && space > 0 && space + 1 < line.size() &&
                      line.find(' ', space + 1) == std::string::npos,
                  "CLIPTokenizer: merges file '", path, "' line ", number,
                  ": expected two symbols separated by one space, got '", line, "'");
      ranks_.emplace(line, static_cast<int64_t>(ranks_.size()));  // key "first second"
    }
    TORCH_CHECK(!ranks_.empty(), "CLIPTokenizer: merges file '", path, "' holds no merges");
  }

  int64_t special_id(const std::string& token, const std::string& vocab_path) const {
    const auto it = vocab_.find(token);
    TORCH_CHECK(it != vocab_.end(), "CLIPTokenizer: vocabulary file '", vocab_path,
                "' lacks the token '", token, "'");
    return it->second;
  }

  /// OpenAI `bytes_to_unicode()`: printable bytes map to themselves, the other 68 bytes to
  /// U+0100 onwards in byte order, so that every byte is a visible, non-space character.
  void build_byte_symbols() {
    char32_t next = 256;
    for (int b = 0; b < 256; ++b) {
      const bool printable = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE);
      const char32_t symbol = printable ? static_cast<char32_t>(b) : next++;
      byte_symbols_[b].clear();
      unicode::append_utf8(symbol, byte_symbols_[b]);
      symbol_to_byte_[symbol] = static_cast<uint8_t>(b);
    }
  }

  /// Normalises and pre-tokenises one segment free of special tokens; appends its ids.
  void encode_segment(const std::string& segment, std::vector<int64_t>& ids) const {
    if (segment.empty()) return;
    const std::u32string text = unicode::normalize(unicode::decode_utf8(segment));
    static const std::u32string kSpecials[] = {U"<|startoftext|>", U"<|endoftext|>"};
    static const std::u32string kContractions[] = {U"s", U"t", U"re", U"ve", U"m", U"ll", U"d"};
    const size_t n = text.size();
    for (size_t i = 0; i < n;) {
      const char32_t c = text[i];
      if (unicode::is_space(c)) {  // matched by no alternative: dropped
        ++i;
        continue;
      }
      size_t end = i;  // the first alternative of the pattern that matches at i wins
      for (const auto& special : kSpecials) {
        if (text.compare(i, special.size(), special) == 0) {
          end = i + special.size();
          break;
        }
      }
      if (end == i && c == U'\'') {
        for (const auto& suffix : kContractions) {
          if (text.compare(i + 1, suffix.size(), suffix) == 0) {
            end = i + 1 + suffix.size();
            break;
          }
        }
      }
      if (end == i && unicode::is_letter(c)) {  // [\p{L}]+
        while (end < n && unicode::is_letter(text[end])) ++end;
      } else if (end == i && unicode::is_number(c)) {  // [\p{N}]
        end = i + 1;
      } else if (end == i) {  // [^\s\p{L}\p{N}]+
        while (end < n && !unicode::is_space(text[end]) && !unicode::is_letter(text[end]) &&
               !unicode::is_number(text[end])) {
          ++end;
        }
      }
      std::string piece;
      for (size_t k = i; k < end; ++k) unicode::append_utf8(text[k], piece);
      bpe(piece, ids);
      i = end;
    }
  }

  /// Appends the ids of one piece: byte symbols, `</w>` on the last, merges by rank
  /// (OpenAI simple_tokenizer.py `bpe`: merge every occurrence of the lowest-ranked pair, left to
  /// right, until no pair has a rank). Unknown results map to eos (CLIP's unk token).
  void bpe(const std::string& piece, std::vector<int64_t>& ids) const {
    {
      std::lock_guard<std::mutex> lock(cache_->mutex);
      const auto hit = cache_->ids.find(piece);
      if (hit != cache_->ids.end()) {
        ids.insert(ids.end(), hit->second.begin(), hit->second.end());
        return;
      }
    }
    std::vector<std::string> word;
    for (unsigned char b : piece) word.push_back(byte_symbols_[b]);
    word.back() += "</w>";
    while (word.size() > 1) {
      int64_t best = std::numeric_limits<int64_t>::max();
      size_t best_at = 0;
      for (size_t k = 0; k + 1 < word.size(); ++k) {
        const auto rank = ranks_.find(word[k] + ' ' + word[k + 1]);
        if (rank != ranks_.end() && rank->second < best) best = rank->second, best_at = k;
      }
      if (best == std::numeric_limits<int64_t>::max()) break;
      const std::string first = word[best_at], second = word[best_at + 1];
      std::vector<std::string> merged;
      merged.reserve(word.size());
      for (size_t k = 0; k < word.size();) {
        if (k + 1 < word.size() && word[k] == first && word[k + 1] == second) {
          merged.push_back(first + second);
          k += 2;
        } else {
          merged.push_back(word[k]);
          k += 1;
        }
      }
      word = std::move(merged);
    }
    std::vector<int64_t> result;
    result.reserve(word.size());
    for (const auto& token : word) {
      const auto it = vocab_.find(token);
      result.push_back(it != vocab_.end() ? it->second : eos_id_);
    }
    ids.insert(ids.end(), result.begin(), result.end());
    std::lock_guard<std::mutex> lock(cache_->mutex);
    if (cache_->ids.size() >= kMaxCacheEntries) cache_->ids.clear();
    cache_->ids.emplace(piece, std::move(result));
  }

  CLIPTokenizerOptions options_;
  std::unordered_map<std::string, int64_t> vocab_;
  std::vector<std::string> id_to_token_;
  std::unordered_map<std::string, int64_t> ranks_;
  std::string byte_symbols_[256];
  std::unordered_map<char32_t, uint8_t> symbol_to_byte_;
  int64_t bos_id_ = 0, eos_id_ = 0, pad_id_ = 0;
  std::shared_ptr<Cache> cache_;
};

}  // namespace sd
