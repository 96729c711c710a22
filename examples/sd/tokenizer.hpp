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
/// Unicode classes (`\p{L}`, `\p{N}`, `\s`) and lower-casing come from compact tables generated
/// from UnicodeData 14.0 for the scripts that prompts use: Latin, Greek, Cyrillic, Armenian,
/// Hebrew, Arabic, Devanagari, Thai, Georgian, Hangul, Hiragana / Katakana, CJK (incl. the
/// supplementary ideograph planes). Letters of other scripts are treated as symbols
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

#include <algorithm>
#include <cstdint>
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

/// An inclusive range of code points.
struct CodeRange {
  char32_t lo;  ///< First code point.
  char32_t hi;  ///< Last code point (inclusive).
};

/// Code points `lo, lo + stride, …, hi` whose lower case is the code point plus `delta`.
struct LowerRun {
  char32_t lo;     ///< First code point of the run.
  char32_t hi;     ///< Last code point of the run (inclusive).
  int32_t stride;  ///< 1 (every code point) or 2 (upper/lower pairs).
  int32_t delta;   ///< Lower case minus upper case.
};

/// A canonical composition `base + mark -> composed` (NFC).
struct Composition {
  char32_t base;      ///< Base character.
  char32_t mark;      ///< Combining mark that follows it.
  char32_t composed;  ///< Precomposed character.
};

// ---- tables generated with Python's unicodedata (Unicode 14.0) ------------------------------
// \p{L} (categories Lu Ll Lt Lm Lo) within the blocks named in the file comment.
/// `\p{L}` ranges, sorted.
inline constexpr CodeRange kLetterRanges[] = {
    {0x41, 0x5A}, {0x61, 0x7A}, {0xAA, 0xAA}, {0xB5, 0xB5}, {0xBA, 0xBA}, {0xC0, 0xD6},
    {0xD8, 0xF6}, {0xF8, 0x2C1}, {0x2C6, 0x2D1}, {0x2E0, 0x2E4}, {0x2EC, 0x2EC}, {0x2EE, 0x2EE},
    {0x370, 0x374}, {0x376, 0x377}, {0x37A, 0x37D}, {0x37F, 0x37F}, {0x386, 0x386}, {0x388, 0x38A},
    {0x38C, 0x38C}, {0x38E, 0x3A1}, {0x3A3, 0x3F5}, {0x3F7, 0x481}, {0x48A, 0x52F}, {0x531, 0x556},
    {0x559, 0x559}, {0x560, 0x588}, {0x5D0, 0x5EA}, {0x5EF, 0x5F2}, {0x620, 0x64A}, {0x66E, 0x66F},
    {0x671, 0x6D3}, {0x6D5, 0x6D5}, {0x6E5, 0x6E6}, {0x6EE, 0x6EF}, {0x6FA, 0x6FC}, {0x6FF, 0x6FF},
    {0x904, 0x939}, {0x93D, 0x93D}, {0x950, 0x950}, {0x958, 0x961}, {0x971, 0x97F}, {0xE01, 0xE30},
    {0xE32, 0xE33}, {0xE40, 0xE46}, {0x10A0, 0x10C5}, {0x10C7, 0x10C7}, {0x10CD, 0x10CD},
    {0x10D0, 0x10FA}, {0x10FC, 0x11FF}, {0x1E00, 0x1F15}, {0x1F18, 0x1F1D}, {0x1F20, 0x1F45},
    {0x1F48, 0x1F4D}, {0x1F50, 0x1F57}, {0x1F59, 0x1F59}, {0x1F5B, 0x1F5B}, {0x1F5D, 0x1F5D},
    {0x1F5F, 0x1F7D}, {0x1F80, 0x1FB4}, {0x1FB6, 0x1FBC}, {0x1FBE, 0x1FBE}, {0x1FC2, 0x1FC4},
    {0x1FC6, 0x1FCC}, {0x1FD0, 0x1FD3}, {0x1FD6, 0x1FDB}, {0x1FE0, 0x1FEC}, {0x1FF2, 0x1FF4},
    {0x1FF6, 0x1FFC}, {0x2071, 0x2071}, {0x207F, 0x207F}, {0x2090, 0x209C}, {0x2102, 0x2102},
    {0x2107, 0x2107}, {0x210A, 0x2113}, {0x2115, 0x2115}, {0x2119, 0x211D}, {0x2124, 0x2124},
    {0x2126, 0x2126}, {0x2128, 0x2128}, {0x212A, 0x212D}, {0x212F, 0x2139}, {0x213C, 0x213F},
    {0x2145, 0x2149}, {0x214E, 0x214E}, {0x2183, 0x2184}, {0x3005, 0x3006}, {0x3031, 0x3035},
    {0x303B, 0x303C}, {0x3041, 0x3096}, {0x309D, 0x309F}, {0x30A1, 0x30FA}, {0x30FC, 0x30FF},
    {0x3105, 0x312F}, {0x3131, 0x318E}, {0x31A0, 0x31BF}, {0x31F0, 0x31FF}, {0x3400, 0x4DBF},
    {0x4E00, 0xA48C}, {0xAC00, 0xD7A3}, {0xF900, 0xFA6D}, {0xFA70, 0xFAD9}, {0xFB00, 0xFB06},
    {0xFB13, 0xFB17}, {0xFB1D, 0xFB1D}, {0xFB1F, 0xFB28}, {0xFB2A, 0xFB36}, {0xFB38, 0xFB3C},
    {0xFB3E, 0xFB3E}, {0xFB40, 0xFB41}, {0xFB43, 0xFB44}, {0xFB46, 0xFBB1}, {0xFBD3, 0xFD3D},
    {0xFD50, 0xFD8F}, {0xFD92, 0xFDC7}, {0xFDF0, 0xFDFB}, {0xFE70, 0xFE74}, {0xFE76, 0xFEFC},
    {0xFF21, 0xFF3A}, {0xFF41, 0xFF5A}, {0xFF66, 0xFFBE}, {0xFFC2, 0xFFC7}, {0xFFCA, 0xFFCF},
    {0xFFD2, 0xFFD7}, {0xFFDA, 0xFFDC}, {0x20000, 0x2A6DF}, {0x2A700, 0x2B738}, {0x2B740, 0x2B81D},
    {0x2B820, 0x2CEA1}, {0x2CEB0, 0x2EBE0}, {0x2F800, 0x2FA1D}, {0x30000, 0x3134A},
};
// \p{N} (Nd Nl No): ASCII to Arabic, Devanagari, Thai, super/subscripts, Roman numerals,
// circled and dingbat numbers, CJK numerals, fullwidth digits.
/// `\p{N}` ranges, sorted.
inline constexpr CodeRange kNumberRanges[] = {
    {0x30, 0x39}, {0xB2, 0xB3}, {0xB9, 0xB9}, {0xBC, 0xBE}, {0x660, 0x669}, {0x6F0, 0x6F9},
    {0x966, 0x96F}, {0xE50, 0xE59}, {0x2070, 0x2070}, {0x2074, 0x2079}, {0x2080, 0x2089},
    {0x2150, 0x2182}, {0x2185, 0x2189}, {0x2460, 0x249B}, {0x24EA, 0x24FF}, {0x2776, 0x2793},
    {0x3007, 0x3007}, {0x3021, 0x3029}, {0x3038, 0x303A}, {0x3192, 0x3195}, {0x3220, 0x3229},
    {0x3248, 0x324F}, {0x3251, 0x325F}, {0x3280, 0x3289}, {0x32B1, 0x32BF}, {0xFF10, 0xFF19},
};
// Single-code-point lower cases (Python str.lower == Rust char::to_lowercase here) of Latin
// (incl. Extended-A/B/Additional), Greek (incl. Extended), Cyrillic, Armenian, Georgian, letterlike
// symbols, Roman numerals, circled letters, Glagolitic, Latin Extended-C and fullwidth Latin.
/// Lower-case runs, sorted by `lo`.
inline constexpr LowerRun kLowerRuns[] = {
    {0x41, 0x5A, 1, 32}, {0xC0, 0xD6, 1, 32}, {0xD8, 0xDE, 1, 32}, {0x100, 0x12E, 2, 1},
    {0x132, 0x136, 2, 1}, {0x139, 0x147, 2, 1}, {0x14A, 0x176, 2, 1}, {0x178, 0x178, 1, -121},
    {0x179, 0x17D, 2, 1}, {0x181, 0x181, 1, 210}, {0x182, 0x184, 2, 1}, {0x186, 0x186, 1, 206},
    {0x187, 0x187, 1, 1}, {0x189, 0x18A, 1, 205}, {0x18B, 0x18B, 1, 1}, {0x18E, 0x18E, 1, 79},
    {0x18F, 0x18F, 1, 202}, {0x190, 0x190, 1, 203}, {0x191, 0x191, 1, 1}, {0x193, 0x193, 1, 205},
    {0x194, 0x194, 1, 207}, {0x196, 0x196, 1, 211}, {0x197, 0x197, 1, 209}, {0x198, 0x198, 1, 1},
    {0x19C, 0x19C, 1, 211}, {0x19D, 0x19D, 1, 213}, {0x19F, 0x19F, 1, 214}, {0x1A0, 0x1A4, 2, 1},
    {0x1A6, 0x1A6, 1, 218}, {0x1A7, 0x1A7, 1, 1}, {0x1A9, 0x1A9, 1, 218}, {0x1AC, 0x1AC, 1, 1},
    {0x1AE, 0x1AE, 1, 218}, {0x1AF, 0x1AF, 1, 1}, {0x1B1, 0x1B2, 1, 217}, {0x1B3, 0x1B5, 2, 1},
    {0x1B7, 0x1B7, 1, 219}, {0x1B8, 0x1B8, 1, 1}, {0x1BC, 0x1BC, 1, 1}, {0x1C4, 0x1C4, 1, 2},
    {0x1C5, 0x1C5, 1, 1}, {0x1C7, 0x1C7, 1, 2}, {0x1C8, 0x1C8, 1, 1}, {0x1CA, 0x1CA, 1, 2},
    {0x1CB, 0x1DB, 2, 1}, {0x1DE, 0x1EE, 2, 1}, {0x1F1, 0x1F1, 1, 2}, {0x1F2, 0x1F4, 2, 1},
    {0x1F6, 0x1F6, 1, -97}, {0x1F7, 0x1F7, 1, -56}, {0x1F8, 0x21E, 2, 1}, {0x220, 0x220, 1, -130},
    {0x222, 0x232, 2, 1}, {0x23A, 0x23A, 1, 10795}, {0x23B, 0x23B, 1, 1}, {0x23D, 0x23D, 1, -163},
    {0x23E, 0x23E, 1, 10792}, {0x241, 0x241, 1, 1}, {0x243, 0x243, 1, -195}, {0x244, 0x244, 1, 69},
    {0x245, 0x245, 1, 71}, {0x246, 0x24E, 2, 1}, {0x370, 0x372, 2, 1}, {0x376, 0x376, 1, 1},
    {0x37F, 0x37F, 1, 116}, {0x386, 0x386, 1, 38}, {0x388, 0x38A, 1, 37}, {0x38C, 0x38C, 1, 64},
    {0x38E, 0x38F, 1, 63}, {0x391, 0x3A1, 1, 32}, {0x3A3, 0x3AB, 1, 32}, {0x3CF, 0x3CF, 1, 8},
    {0x3D8, 0x3EE, 2, 1}, {0x3F4, 0x3F4, 1, -60}, {0x3F7, 0x3F7, 1, 1}, {0x3F9, 0x3F9, 1, -7},
    {0x3FA, 0x3FA, 1, 1}, {0x3FD, 0x3FF, 1, -130}, {0x400, 0x40F, 1, 80}, {0x410, 0x42F, 1, 32},
    {0x460, 0x480, 2, 1}, {0x48A, 0x4BE, 2, 1}, {0x4C0, 0x4C0, 1, 15}, {0x4C1, 0x4CD, 2, 1},
    {0x4D0, 0x52E, 2, 1}, {0x531, 0x556, 1, 48}, {0x10A0, 0x10C5, 1, 7264},
    {0x10C7, 0x10C7, 1, 7264}, {0x10CD, 0x10CD, 1, 7264}, {0x1E00, 0x1E94, 2, 1},
    {0x1E9E, 0x1E9E, 1, -7615}, {0x1EA0, 0x1EFE, 2, 1}, {0x1F08, 0x1F0F, 1, -8},
    {0x1F18, 0x1F1D, 1, -8}, {0x1F28, 0x1F2F, 1, -8}, {0x1F38, 0x1F3F, 1, -8},
    {0x1F48, 0x1F4D, 1, -8}, {0x1F59, 0x1F5F, 2, -8}, {0x1F68, 0x1F6F, 1, -8},
    {0x1F88, 0x1F8F, 1, -8}, {0x1F98, 0x1F9F, 1, -8}, {0x1FA8, 0x1FAF, 1, -8},
    {0x1FB8, 0x1FB9, 1, -8}, {0x1FBA, 0x1FBB, 1, -74}, {0x1FBC, 0x1FBC, 1, -9},
    {0x1FC8, 0x1FCB, 1, -86}, {0x1FCC, 0x1FCC, 1, -9}, {0x1FD8, 0x1FD9, 1, -8},
    {0x1FDA, 0x1FDB, 1, -100}, {0x1FE8, 0x1FE9, 1, -8}, {0x1FEA, 0x1FEB, 1, -112},
    {0x1FEC, 0x1FEC, 1, -7}, {0x1FF8, 0x1FF9, 1, -128}, {0x1FFA, 0x1FFB, 1, -126},
    {0x1FFC, 0x1FFC, 1, -9}, {0x2126, 0x2126, 1, -7517}, {0x212A, 0x212A, 1, -8383},
    {0x212B, 0x212B, 1, -8262}, {0x2132, 0x2132, 1, 28}, {0x2160, 0x216F, 1, 16},
    {0x2183, 0x2183, 1, 1}, {0x24B6, 0x24CF, 1, 26}, {0x2C00, 0x2C2F, 1, 48},
    {0x2C60, 0x2C60, 1, 1}, {0x2C62, 0x2C62, 1, -10743}, {0x2C63, 0x2C63, 1, -3814},
    {0x2C64, 0x2C64, 1, -10727}, {0x2C67, 0x2C6B, 2, 1}, {0x2C6D, 0x2C6D, 1, -10780},
    {0x2C6E, 0x2C6E, 1, -10749}, {0x2C6F, 0x2C6F, 1, -10783}, {0x2C70, 0x2C70, 1, -10782},
    {0x2C72, 0x2C72, 1, 1}, {0x2C75, 0x2C75, 1, 1}, {0x2C7E, 0x2C7F, 1, -10815},
    {0xFF21, 0xFF3A, 1, 32},
};
// Canonical pairs of the precomposed letters U+00C0-U+017F, U+0370-U+04FF that NFC recomposes.
/// NFC compositions, sorted by (base, mark).
inline constexpr Composition kCompositions[] = {
    {0x41, 0x300, 0xC0}, {0x41, 0x301, 0xC1}, {0x41, 0x302, 0xC2}, {0x41, 0x303, 0xC3},
    {0x41, 0x304, 0x100}, {0x41, 0x306, 0x102}, {0x41, 0x308, 0xC4}, {0x41, 0x30A, 0xC5},
    {0x41, 0x328, 0x104}, {0x43, 0x301, 0x106}, {0x43, 0x302, 0x108}, {0x43, 0x307, 0x10A},
    {0x43, 0x30C, 0x10C}, {0x43, 0x327, 0xC7}, {0x44, 0x30C, 0x10E}, {0x45, 0x300, 0xC8},
    {0x45, 0x301, 0xC9}, {0x45, 0x302, 0xCA}, {0x45, 0x304, 0x112}, {0x45, 0x306, 0x114},
    {0x45, 0x307, 0x116}, {0x45, 0x308, 0xCB}, {0x45, 0x30C, 0x11A}, {0x45, 0x328, 0x118},
    {0x47, 0x302, 0x11C}, {0x47, 0x306, 0x11E}, {0x47, 0x307, 0x120}, {0x47, 0x327, 0x122},
    {0x48, 0x302, 0x124}, {0x49, 0x300, 0xCC}, {0x49, 0x301, 0xCD}, {0x49, 0x302, 0xCE},
    {0x49, 0x303, 0x128}, {0x49, 0x304, 0x12A}, {0x49, 0x306, 0x12C}, {0x49, 0x307, 0x130},
    {0x49, 0x308, 0xCF}, {0x49, 0x328, 0x12E}, {0x4A, 0x302, 0x134}, {0x4B, 0x327, 0x136},
    {0x4C, 0x301, 0x139}, {0x4C, 0x30C, 0x13D}, {0x4C, 0x327, 0x13B}, {0x4E, 0x301, 0x143},
    {0x4E, 0x303, 0xD1}, {0x4E, 0x30C, 0x147}, {0x4E, 0x327, 0x145}, {0x4F, 0x300, 0xD2},
    {0x4F, 0x301, 0xD3}, {0x4F, 0x302, 0xD4}, {0x4F, 0x303, 0xD5}, {0x4F, 0x304, 0x14C},
    {0x4F, 0x306, 0x14E}, {0x4F, 0x308, 0xD6}, {0x4F, 0x30B, 0x150}, {0x52, 0x301, 0x154},
    {0x52, 0x30C, 0x158}, {0x52, 0x327, 0x156}, {0x53, 0x301, 0x15A}, {0x53, 0x302, 0x15C},
    {0x53, 0x30C, 0x160}, {0x53, 0x327, 0x15E}, {0x54, 0x30C, 0x164}, {0x54, 0x327, 0x162},
    {0x55, 0x300, 0xD9}, {0x55, 0x301, 0xDA}, {0x55, 0x302, 0xDB}, {0x55, 0x303, 0x168},
    {0x55, 0x304, 0x16A}, {0x55, 0x306, 0x16C}, {0x55, 0x308, 0xDC}, {0x55, 0x30A, 0x16E},
    {0x55, 0x30B, 0x170}, {0x55, 0x328, 0x172}, {0x57, 0x302, 0x174}, {0x59, 0x301, 0xDD},
    {0x59, 0x302, 0x176}, {0x59, 0x308, 0x178}, {0x5A, 0x301, 0x179}, {0x5A, 0x307, 0x17B},
    {0x5A, 0x30C, 0x17D}, {0x61, 0x300, 0xE0}, {0x61, 0x301, 0xE1}, {0x61, 0x302, 0xE2},
    {0x61, 0x303, 0xE3}, {0x61, 0x304, 0x101}, {0x61, 0x306, 0x103}, {0x61, 0x308, 0xE4},
    {0x61, 0x30A, 0xE5}, {0x61, 0x328, 0x105}, {0x63, 0x301, 0x107}, {0x63, 0x302, 0x109},
    {0x63, 0x307, 0x10B}, {0x63, 0x30C, 0x10D}, {0x63, 0x327, 0xE7}, {0x64, 0x30C, 0x10F},
    {0x65, 0x300, 0xE8}, {0x65, 0x301, 0xE9}, {0x65, 0x302, 0xEA}, {0x65, 0x304, 0x113},
    {0x65, 0x306, 0x115}, {0x65, 0x307, 0x117}, {0x65, 0x308, 0xEB}, {0x65, 0x30C, 0x11B},
    {0x65, 0x328, 0x119}, {0x67, 0x302, 0x11D}, {0x67, 0x306, 0x11F}, {0x67, 0x307, 0x121},
    {0x67, 0x327, 0x123}, {0x68, 0x302, 0x125}, {0x69, 0x300, 0xEC}, {0x69, 0x301, 0xED},
    {0x69, 0x302, 0xEE}, {0x69, 0x303, 0x129}, {0x69, 0x304, 0x12B}, {0x69, 0x306, 0x12D},
    {0x69, 0x308, 0xEF}, {0x69, 0x328, 0x12F}, {0x6A, 0x302, 0x135}, {0x6B, 0x327, 0x137},
    {0x6C, 0x301, 0x13A}, {0x6C, 0x30C, 0x13E}, {0x6C, 0x327, 0x13C}, {0x6E, 0x301, 0x144},
    {0x6E, 0x303, 0xF1}, {0x6E, 0x30C, 0x148}, {0x6E, 0x327, 0x146}, {0x6F, 0x300, 0xF2},
    {0x6F, 0x301, 0xF3}, {0x6F, 0x302, 0xF4}, {0x6F, 0x303, 0xF5}, {0x6F, 0x304, 0x14D},
    {0x6F, 0x306, 0x14F}, {0x6F, 0x308, 0xF6}, {0x6F, 0x30B, 0x151}, {0x72, 0x301, 0x155},
    {0x72, 0x30C, 0x159}, {0x72, 0x327, 0x157}, {0x73, 0x301, 0x15B}, {0x73, 0x302, 0x15D},
    {0x73, 0x30C, 0x161}, {0x73, 0x327, 0x15F}, {0x74, 0x30C, 0x165}, {0x74, 0x327, 0x163},
    {0x75, 0x300, 0xF9}, {0x75, 0x301, 0xFA}, {0x75, 0x302, 0xFB}, {0x75, 0x303, 0x169},
    {0x75, 0x304, 0x16B}, {0x75, 0x306, 0x16D}, {0x75, 0x308, 0xFC}, {0x75, 0x30A, 0x16F},
    {0x75, 0x30B, 0x171}, {0x75, 0x328, 0x173}, {0x77, 0x302, 0x175}, {0x79, 0x301, 0xFD},
    {0x79, 0x302, 0x177}, {0x79, 0x308, 0xFF}, {0x7A, 0x301, 0x17A}, {0x7A, 0x307, 0x17C},
    {0x7A, 0x30C, 0x17E}, {0xA8, 0x301, 0x385}, {0x391, 0x301, 0x386}, {0x395, 0x301, 0x388},
    {0x397, 0x301, 0x389}, {0x399, 0x301, 0x38A}, {0x399, 0x308, 0x3AA}, {0x39F, 0x301, 0x38C},
    {0x3A5, 0x301, 0x38E}, {0x3A5, 0x308, 0x3AB}, {0x3A9, 0x301, 0x38F}, {0x3B1, 0x301, 0x3AC},
    {0x3B5, 0x301, 0x3AD}, {0x3B7, 0x301, 0x3AE}, {0x3B9, 0x301, 0x3AF}, {0x3B9, 0x308, 0x3CA},
    {0x3BF, 0x301, 0x3CC}, {0x3C5, 0x301, 0x3CD}, {0x3C5, 0x308, 0x3CB}, {0x3C9, 0x301, 0x3CE},
    {0x3CA, 0x301, 0x390}, {0x3CB, 0x301, 0x3B0}, {0x3D2, 0x301, 0x3D3}, {0x3D2, 0x308, 0x3D4},
    {0x406, 0x308, 0x407}, {0x410, 0x306, 0x4D0}, {0x410, 0x308, 0x4D2}, {0x413, 0x301, 0x403},
    {0x415, 0x300, 0x400}, {0x415, 0x306, 0x4D6}, {0x415, 0x308, 0x401}, {0x416, 0x306, 0x4C1},
    {0x416, 0x308, 0x4DC}, {0x417, 0x308, 0x4DE}, {0x418, 0x300, 0x40D}, {0x418, 0x304, 0x4E2},
    {0x418, 0x306, 0x419}, {0x418, 0x308, 0x4E4}, {0x41A, 0x301, 0x40C}, {0x41E, 0x308, 0x4E6},
    {0x423, 0x304, 0x4EE}, {0x423, 0x306, 0x40E}, {0x423, 0x308, 0x4F0}, {0x423, 0x30B, 0x4F2},
    {0x427, 0x308, 0x4F4}, {0x42B, 0x308, 0x4F8}, {0x42D, 0x308, 0x4EC}, {0x430, 0x306, 0x4D1},
    {0x430, 0x308, 0x4D3}, {0x433, 0x301, 0x453}, {0x435, 0x300, 0x450}, {0x435, 0x306, 0x4D7},
    {0x435, 0x308, 0x451}, {0x436, 0x306, 0x4C2}, {0x436, 0x308, 0x4DD}, {0x437, 0x308, 0x4DF},
    {0x438, 0x300, 0x45D}, {0x438, 0x304, 0x4E3}, {0x438, 0x306, 0x439}, {0x438, 0x308, 0x4E5},
    {0x43A, 0x301, 0x45C}, {0x43E, 0x308, 0x4E7}, {0x443, 0x304, 0x4EF}, {0x443, 0x306, 0x45E},
    {0x443, 0x308, 0x4F1}, {0x443, 0x30B, 0x4F3}, {0x447, 0x308, 0x4F5}, {0x44B, 0x308, 0x4F9},
    {0x44D, 0x308, 0x4ED}, {0x456, 0x308, 0x457}, {0x474, 0x30F, 0x476}, {0x475, 0x30F, 0x477},
    {0x4D8, 0x308, 0x4DA}, {0x4D9, 0x308, 0x4DB}, {0x4E8, 0x308, 0x4EA}, {0x4E9, 0x308, 0x4EB},
};
// ---------------------------------------------------------------------------------------------

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

/// Decodes UTF-8; throws naming the byte offset of an invalid sequence.
inline std::u32string decode_utf8(const std::string& text) {
  std::u32string out;
  out.reserve(text.size());
  const auto* s = reinterpret_cast<const unsigned char*>(text.data());
  const size_t n = text.size();
  for (size_t i = 0; i < n;) {
    const unsigned char b = s[i];
    int extra = 0;
    char32_t c = 0;
    if (b < 0x80) {
      c = b;
    } else if ((b & 0xE0) == 0xC0) {
      c = b & 0x1F, extra = 1;
    } else if ((b & 0xF0) == 0xE0) {
      c = b & 0x0F, extra = 2;
    } else if ((b & 0xF8) == 0xF0) {
      c = b & 0x07, extra = 3;
    } else {
      TORCH_CHECK(false, "CLIPTokenizer: invalid UTF-8 lead byte ", static_cast<int>(b),
                  " at byte ", i, " of the text");
    }
    TORCH_CHECK(i + extra < n, "CLIPTokenizer: truncated UTF-8 sequence at byte ", i,
                " of the text");
    for (int k = 1; k <= extra; ++k) {
      TORCH_CHECK((s[i + k] & 0xC0) == 0x80, "CLIPTokenizer: invalid UTF-8 continuation byte at ",
                  i + k, " of the text");
      c = (c << 6) | (s[i + k] & 0x3F);
    }
    static constexpr char32_t kMin[] = {0, 0x80, 0x800, 0x10000};
    TORCH_CHECK(c >= kMin[extra] && c <= 0x10FFFF && !(c >= 0xD800 && c <= 0xDFFF),
                "CLIPTokenizer: invalid (overlong or surrogate) UTF-8 sequence at byte ", i,
                " of the text");
    out.push_back(c);
    i += extra + 1;
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
  std::vector<int64_t> encode(const std::string& text, bool truncate = true) const {
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
