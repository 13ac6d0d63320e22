// pybind11 bindings of the CPU kernels. Tensors cross as raw addresses and sizes: the
// Python side (trace_kernels/backends/cpu.py) has already checked dtype, device, shape and
// contiguity, so this module needs no torch headers and one build serves every torch.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#include "../cpu/delta_stats.h"
#include "../cpu/masked_adamw.h"

#ifndef TRACE_KERNELS_VERSION
#define TRACE_KERNELS_VERSION "unknown"
#endif

namespace py = pybind11;
namespace tkc = trace_kernels::cpu;
using trace_kernels::DType;

namespace {

// Field order of one row of the masked-AdamW table built by backends/cpu.py.
enum MaskedField {
  kParam, kGrad, kExpAvg, kExpAvgSq, kMaxExpAvgSq, kIndices, kIndicesInt64, kNumBlocks,
  kBlockSize, kDType, kStep, kFisher, kMaskedFields
};

template <typename T>
T* as_ptr(int64_t address) {
  return reinterpret_cast<T*>(static_cast<uintptr_t>(address));
}

DType parse_dtype(int64_t code) {
  if (code < 0 || code > 2) throw std::invalid_argument("unknown dtype code " + std::to_string(code));
  return static_cast<DType>(code);
}

// `steps[t]` is used as the (already incremented) step when the row's kStep address is 0;
// otherwise kStep points to the parameter's fp32 step counter, incremented here as torch does.
void masked_adamw(const std::vector<int64_t>& table, const std::vector<double>& steps, double lr,
                  double beta1, double beta2, double eps, double weight_decay, bool amsgrad,
                  bool maximize, std::optional<double> grad_scale, double fisher_scale,
                  int num_threads) {
  if (table.size() != steps.size() * kMaskedFields) {
    throw std::invalid_argument("masked_adamw: table has " + std::to_string(table.size()) +
                                " fields for " + std::to_string(steps.size()) + " tensors");
  }
  std::vector<tkc::MaskedTensor> tensors;
  tensors.reserve(steps.size());
  for (size_t t = 0; t < steps.size(); ++t) {
    const int64_t* row = table.data() + t * kMaskedFields;
    tkc::MaskedTensor m;
    m.param = as_ptr<void>(row[kParam]);
    m.grad = as_ptr<const void>(row[kGrad]);
    m.exp_avg = as_ptr<float>(row[kExpAvg]);
    m.exp_avg_sq = as_ptr<float>(row[kExpAvgSq]);
    m.max_exp_avg_sq = amsgrad ? as_ptr<float>(row[kMaxExpAvgSq]) : nullptr;
    m.indices = as_ptr<const void>(row[kIndices]);
    m.indices_int64 = row[kIndicesInt64] != 0;
    m.num_blocks = row[kNumBlocks];
    m.block_size = row[kBlockSize];
    m.dtype = parse_dtype(row[kDType]);
    m.fisher = as_ptr<float>(row[kFisher]);
    if (m.num_blocks < 0 || m.block_size < 1) {
      throw std::invalid_argument("masked_adamw: bad block layout in tensor " + std::to_string(t));
    }
    if (amsgrad && m.max_exp_avg_sq == nullptr && m.num_blocks > 0) {
      throw std::invalid_argument("masked_adamw: amsgrad needs max_exp_avg_sq");
    }
    tensors.push_back(m);
  }
  // Only now, with every row accepted, touch the step counters.
  for (size_t t = 0; t < steps.size(); ++t) {
    const int64_t* row = table.data() + t * kMaskedFields;
    double step = steps[t];
    if (row[kStep] != 0) {
      float* counter = as_ptr<float>(row[kStep]);
      *counter = *counter + 1.0f;
      step = *counter;
    }
    tensors[t].coeffs = trace_kernels::make_adamw_coeffs(lr, beta1, beta2, eps, weight_decay, step,
                                                         amsgrad);
  }
  // Tensors without selected blocks still count the step, as torch counts it for any
  // parameter with a gradient.
  std::vector<tkc::MaskedTensor> work;
  work.reserve(tensors.size());
  for (const tkc::MaskedTensor& m : tensors) {
    if (m.num_blocks > 0) work.push_back(m);
  }
  double divisor = grad_scale.value_or(1.0);
  if (maximize) divisor = -divisor;
  py::gil_scoped_release release;
  tkc::masked_adamw(work, static_cast<float>(divisor), static_cast<float>(fisher_scale),
                    num_threads);
}

// Field order of one row of the delta-stats table (backends/cpu.py), followed by R
// reference addresses and R reference dtype codes.
enum StatsField { kPost, kPre, kStatsDType, kFisherIn, kNumel, kStatsBlockSize, kFirstRow, kStatsFields };

void delta_stats(const std::vector<int64_t>& table, int num_tensors, int num_refs,
                 int64_t sum_sq, int64_t fisher_sum, int64_t dots, int64_t ref_sq,
                 int num_threads) {
  if (num_refs < 0 || num_refs > tkc::kMaxRefs) {
    throw std::invalid_argument("delta_stats: at most " + std::to_string(tkc::kMaxRefs) +
                                " references, got " + std::to_string(num_refs));
  }
  const size_t width = kStatsFields + 2 * static_cast<size_t>(num_refs);
  if (table.size() != width * num_tensors) {
    throw std::invalid_argument("delta_stats: table size does not match the tensor count");
  }
  std::vector<tkc::DeltaStatsTensor> tensors;
  for (int t = 0; t < num_tensors; ++t) {
    const int64_t* row = table.data() + t * width;
    tkc::DeltaStatsTensor d{};
    d.post = as_ptr<const void>(row[kPost]);
    d.pre = as_ptr<const void>(row[kPre]);
    d.dtype = parse_dtype(row[kStatsDType]);
    d.fisher = as_ptr<const float>(row[kFisherIn]);
    d.numel = row[kNumel];
    d.block_size = row[kStatsBlockSize];
    d.first_row = row[kFirstRow];
    if (d.numel < 0 || d.block_size < 1 || d.numel % d.block_size) {
      throw std::invalid_argument("delta_stats: bad block layout in tensor " + std::to_string(t));
    }
    for (int r = 0; r < num_refs; ++r) {
      d.refs[r] = as_ptr<const void>(row[kStatsFields + r]);
      d.ref_dtypes[r] = parse_dtype(row[kStatsFields + num_refs + r]);
    }
    if (d.numel > 0) tensors.push_back(d);
  }
  py::gil_scoped_release release;
  tkc::delta_stats(tensors, num_refs, as_ptr<float>(sum_sq), as_ptr<float>(fisher_sum),
                   as_ptr<float>(dots), as_ptr<float>(ref_sq), num_threads);
}

// Returns None when the indices are valid, else (position, reason).
std::optional<std::pair<int64_t, std::string>> check_block_indices(int64_t address, bool int64,
                                                                   int64_t count, int64_t limit,
                                                                   int num_threads) {
  tkc::IndexError e;
  {
    py::gil_scoped_release release;
    e = tkc::check_block_indices(as_ptr<const void>(address), int64, count, limit, num_threads);
  }
  if (e.position < 0) return std::nullopt;
  return std::make_pair(e.position, std::string(e.kind == 1 ? "out of range" : "not strictly increasing"));
}

bool openmp_enabled() {
#ifdef _OPENMP
  return true;
#else
  return false;
#endif
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "trace_kernels CPU kernels (C++17, OpenMP, runtime ISA dispatch)";
  m.attr("__version__") = TRACE_KERNELS_VERSION;
  m.attr("MASKED_ADAMW_FIELDS") = static_cast<int>(kMaskedFields);
  m.def("masked_adamw", &masked_adamw, py::arg("table"), py::arg("steps"), py::arg("lr"),
        py::arg("beta1"), py::arg("beta2"), py::arg("eps"), py::arg("weight_decay"),
        py::arg("amsgrad"), py::arg("maximize"), py::arg("grad_scale"), py::arg("fisher_scale"),
        py::arg("num_threads"),
        "AdamW over selected blocks; rows with a fisher address also accumulate "
        "fisher_scale * g^2 (adamw_fisher_ passes one block spanning each tensor).");
  m.attr("DELTA_STATS_FIELDS") = static_cast<int>(kStatsFields);
  m.attr("MAX_REFS") = tkc::kMaxRefs;
  m.def("delta_stats", &delta_stats, py::arg("table"), py::arg("num_tensors"),
        py::arg("num_refs"), py::arg("sum_sq"), py::arg("fisher_sum"), py::arg("dots"),
        py::arg("ref_sq"), py::arg("num_threads"),
        "Per-block sums of d^2, fisher, d*ref and ref^2 (fp64 accumulation, fp32 out).");
  m.def("check_block_indices", &check_block_indices, py::arg("address"), py::arg("int64"),
        py::arg("count"), py::arg("limit"), py::arg("num_threads"));
  m.def("openmp_enabled", &openmp_enabled);
  m.def("isa_levels", []() {
    std::vector<std::string> levels;
#if defined(__x86_64__) && defined(__GNUC__)
    __builtin_cpu_init();
    if (__builtin_cpu_supports("x86-64-v4")) levels.push_back("x86-64-v4 (AVX-512)");
    if (__builtin_cpu_supports("x86-64-v3")) levels.push_back("x86-64-v3 (AVX2)");
#endif
    levels.push_back("default");
    return levels;
  }, "ISA clones this CPU can run, best first (the loader picks the first).");
}
