#pragma once
/// @file csv.hpp
/// @brief CSV files as RFC 4180 has them: parsing the captions tables of image datasets (the
/// Style Transfer Dataset's `Image:FILE,Text`), and writing the programs' numeric tables.

#include <common/files.hpp>

#include <torch/torch.h>

#include <cstdint>
#include <cstdio>
#include <string>
#include <vector>

namespace common {

/// One record of a CSV file: its fields and the line on which it starts (1-based).
struct CsvRow {
  std::vector<std::string> fields;  ///< the unquoted field values
  int64_t line = 0;                 ///< line of the file where the record starts
};

/// Parses CSV text per RFC 4180: comma-separated fields, `"quoted"` fields that may contain
/// commas, line breaks and doubled quotes (`""` -> `"`), LF or CRLF record ends. A leading UTF-8
/// byte-order mark and blank lines are skipped. Lenient like Python's csv module: a quote inside
/// an unquoted field is kept literally. Throws naming `name` and the line of an unterminated
/// quoted field.
inline std::vector<CsvRow> parse_csv(const std::string& text, const std::string& name = "CSV") {
  std::vector<CsvRow> rows;
  CsvRow row;
  std::string field;
  bool quoted = false, in_quotes = false;
  int64_t line = 1, quote_line = 1;
  row.line = 1;
  size_t i = utf8_bom_size(text);
  auto end_field = [&] {
    row.fields.push_back(field);
    field.clear();
    quoted = false;
  };
  auto end_row = [&] {
    end_field();
    const bool blank = row.fields.size() == 1 && row.fields[0].empty();
    if (!blank) rows.push_back(row);
    row = CsvRow{};
    row.line = line;
  };
  for (; i < text.size(); ++i) {
    const char c = text[i];
    if (in_quotes) {
      if (c == '"') {
        if (i + 1 < text.size() && text[i + 1] == '"') {
          field.push_back('"');
          ++i;
        } else {
          in_quotes = false;
        }
      } else {
        if (c == '\n') ++line;
        field.push_back(c);
      }
    } else if (c == '"' && field.empty() && !quoted) {
      in_quotes = quoted = true;
      quote_line = line;
    } else if (c == ',') {
      end_field();
    } else if (c == '\n' || c == '\r') {
      if (c == '\r' && i + 1 < text.size() && text[i + 1] == '\n') ++i;
      ++line;
      end_row();
    } else {
      field.push_back(c);
    }
  }
  TORCH_CHECK(!in_quotes, name, ": unterminated quoted field starting on line ", quote_line);
  if (!field.empty() || quoted || !row.fields.empty()) end_row();
  return rows;
}

/// A CSV field, quoted per RFC 4180 when it holds a comma, a quote or a line break.
inline std::string csv_escape(const std::string& field) {
  if (field.find_first_of(",\"\r\n") == std::string::npos) return field;
  std::string out = "\"";
  for (char c : field) {
    if (c == '"') out += '"';
    out += c;
  }
  return out + "\"";
}

/// Writes a numeric table as CSV (a header row, then one row per record; numbers with up to 10
/// significant digits, so integer steps print as integers), atomically. Throws naming the file
/// when a row's width differs from the header's.
inline void write_csv(const std::string& path, const std::vector<std::string>& header,
                      const std::vector<std::vector<double>>& rows) {
  std::string text;
  for (size_t j = 0; j < header.size(); ++j) text += (j ? "," : "") + csv_escape(header[j]);
  text += "\n";
  char number[64];
  for (size_t i = 0; i < rows.size(); ++i) {
    TORCH_CHECK(rows[i].size() == header.size(), "write_csv '", path, "': row ", i, " has ",
                rows[i].size(), " values for ", header.size(), " columns");
    for (size_t j = 0; j < rows[i].size(); ++j) {
      std::snprintf(number, sizeof(number), "%.10g", rows[i][j]);
      text += (j ? "," : "") + std::string(number);
    }
    text += "\n";
  }
  write_file_atomic(path, text);
}

}  // namespace common
