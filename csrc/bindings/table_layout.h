// The rows the Python side builds (trace_kernels/backends/_layout.py) and both bindings
// read: field order, address and dtype parsing, and the checks every entry point makes
// before a kernel runs (bad input raises std::invalid_argument, which pybind11 turns into
// ValueError; nothing has been modified by then).
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "trace_kernels/tables.h"

namespace trace_kernels::layout {

// One row per tensor of an AdamW launch.
enum MaskedField : int {
  kParam, kGrad, kExpAvg, kExpAvgSq, kMaxExpAvgSq, kFisher, kMaster, kIndices, kIndicesInt64,
  kNumBlocks, kBlockSize, kNumel, kElemBase, kDType, kStep, kStepFp64, kMaskedFields
};
constexpr const char* kMaskedFieldNames[kMaskedFields] = {
    "param", "grad", "exp_avg", "exp_avg_sq", "max_exp_avg_sq", "fisher", "master", "indices",
    "indices_int64", "num_blocks", "block_size", "numel", "elem_base", "dtype", "step", "step_fp64"};

// One row per tensor of a delta_stats launch, followed by R reference addresses and R
// reference dtype codes.
enum StatsField : int { kPost, kPre, kStatsFisher, kStatsDType, kStatsNumel, kStatsBlockSize, kFirstRow, kStatsFields };
constexpr const char* kStatsFieldNames[kStatsFields] = {
    "post", "pre", "fisher", "dtype", "numel", "block_size", "first_row"};

template <typename T>
T* as_ptr(int64_t address) {
  return reinterpret_cast<T*>(static_cast<uintptr_t>(address));
}

inline void fail(const std::string& what) { throw std::invalid_argument(what); }

inline DType parse_dtype(int64_t code, const std::string& where) {
  if (code < 0 || code > 2) fail(where + ": unknown dtype code " + std::to_string(code));
  return static_cast<DType>(code);
}

// The AdamW table, every row checked. `steps[t]` is the step value of row t.
inline std::vector<MaskedTensor> parse_masked(const std::vector<int64_t>& table,
                                              const std::vector<double>& steps, bool amsgrad) {
  if (table.size() != steps.size() * kMaskedFields) {
    fail("masked_adamw: table has " + std::to_string(table.size()) + " fields for " +
         std::to_string(steps.size()) + " tensors of " + std::to_string(kMaskedFields));
  }
  std::vector<MaskedTensor> out(steps.size());
  for (size_t t = 0; t < steps.size(); ++t) {
    const int64_t* r = table.data() + t * kMaskedFields;
    const std::string where = "masked_adamw: tensor " + std::to_string(t);
    MaskedTensor& m = out[t];
    m.param = as_ptr<void>(r[kParam]);
    m.grad = as_ptr<const void>(r[kGrad]);
    m.exp_avg = as_ptr<float>(r[kExpAvg]);
    m.exp_avg_sq = as_ptr<float>(r[kExpAvgSq]);
    m.max_exp_avg_sq = amsgrad ? as_ptr<float>(r[kMaxExpAvgSq]) : nullptr;
    m.fisher = as_ptr<float>(r[kFisher]);
    m.master = as_ptr<float>(r[kMaster]);
    m.indices = as_ptr<const void>(r[kIndices]);
    m.indices_int64 = r[kIndicesInt64] != 0;
    m.num_blocks = r[kNumBlocks];
    m.block_size = r[kBlockSize];
    m.numel = r[kNumel];
    m.elem_base = r[kElemBase];
    m.dtype = parse_dtype(r[kDType], where);
    m.step = as_ptr<const void>(r[kStep]);
    m.step_fp64 = r[kStepFp64] != 0;
    m.step_value = steps[t];
    if (m.block_size < 1 || m.numel < 0 || m.numel % m.block_size) {
      fail(where + ": block size " + std::to_string(m.block_size) + " does not divide " +
           std::to_string(m.numel) + " elements");
    }
    if (m.num_blocks < 0 || m.num_blocks > m.numel / m.block_size) {
      fail(where + ": " + std::to_string(m.num_blocks) + " selected blocks of " +
           std::to_string(m.block_size) + " in " + std::to_string(m.numel) + " elements");
    }
    if (m.num_blocks > 0 && (m.param == nullptr || m.grad == nullptr || m.exp_avg == nullptr ||
                             m.exp_avg_sq == nullptr || m.indices == nullptr)) {
      fail(where + ": a null address");
    }
    if (amsgrad && m.num_blocks > 0 && m.max_exp_avg_sq == nullptr) {
      fail(where + ": amsgrad needs max_exp_avg_sq");
    }
    if (m.elem_base < 0) fail(where + ": negative element base");
    m.coeffs = AdamWCoeffs{};
  }
  return out;
}

// The delta_stats table, every row checked.
inline std::vector<StatsTensor> parse_stats(const std::vector<int64_t>& table, int num_tensors,
                                            int num_refs) {
  if (num_refs < 0 || num_refs > kMaxRefs) {
    fail("delta_stats: 0 to " + std::to_string(kMaxRefs) + " references, got " +
         std::to_string(num_refs));
  }
  const size_t width = kStatsFields + 2 * static_cast<size_t>(num_refs);
  if (num_tensors < 0 || table.size() != width * static_cast<size_t>(num_tensors)) {
    fail("delta_stats: table size does not match the tensor count");
  }
  std::vector<StatsTensor> out(num_tensors);
  for (int t = 0; t < num_tensors; ++t) {
    const int64_t* r = table.data() + t * width;
    const std::string where = "delta_stats: tensor " + std::to_string(t);
    StatsTensor& s = out[t];
    s = StatsTensor{};
    s.post = as_ptr<const void>(r[kPost]);
    s.pre = as_ptr<const void>(r[kPre]);
    s.fisher = as_ptr<const float>(r[kStatsFisher]);
    s.dtype = parse_dtype(r[kStatsDType], where);
    s.numel = r[kStatsNumel];
    s.block_size = r[kStatsBlockSize];
    s.first_row = r[kFirstRow];
    if (s.numel < 0 || s.block_size < 1 || s.numel % s.block_size || s.first_row < 0) {
      fail(where + ": bad block layout");
    }
    if (s.numel > 0 && s.post == nullptr) fail(where + ": a null address");
    for (int k = 0; k < num_refs; ++k) {
      s.refs[k] = as_ptr<const void>(r[kStatsFields + k]);
      s.ref_dtypes[k] = parse_dtype(r[kStatsFields + num_refs + k], where);
      if (s.numel > 0 && s.refs[k] == nullptr) fail(where + ": a null reference address");
    }
  }
  return out;
}

// The field names, in row order, for the extensions to export (a test holds them equal to
// the Python side's).
inline std::vector<std::string> masked_field_names() {
  return {kMaskedFieldNames, kMaskedFieldNames + kMaskedFields};
}
inline std::vector<std::string> stats_field_names() {
  return {kStatsFieldNames, kStatsFieldNames + kStatsFields};
}

}  // namespace trace_kernels::layout
