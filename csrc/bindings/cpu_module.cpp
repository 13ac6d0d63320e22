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
#include "../cpu/element_cosine.h"
#include "../cpu/masked_adamw.h"
#include "../cpu/rank_scores.h"
#include "../cpu/sampled_dot.h"
#include "trace_kernels/rounding.h"
#include "table_layout.h"

#ifndef TRACE_KERNELS_VERSION
#define TRACE_KERNELS_VERSION "unknown"
#endif

namespace py = pybind11;
namespace tkc = trace_kernels::cpu;
namespace layout = trace_kernels::layout;

namespace {

// The row layout and checks are table_layout.h's. A row's `step` is the address of the
// parameter's fp32 step counter, incremented here as torch does before the update, or 0:
// `steps[t]` is the (already incremented) step.
// `stochastic`: bf16 parameters are rounded stochastically, keyed by `seed` and each
// tensor's step (rounding.h).

// Rows accepted: fp32 step counters only, selected blocks inside the storage given
// (indices are sorted and unique, as ops and MaskedAdamW check, so the first and the last
// decide).
std::vector<tkc::MaskedTensor> checked_rows(const std::vector<int64_t>& table,
                                            const std::vector<double>& steps, bool amsgrad) {
  std::vector<tkc::MaskedTensor> tensors = layout::parse_masked(table, steps, amsgrad);
  for (const tkc::MaskedTensor& m : tensors) {
    if (m.step != nullptr && m.step_fp64) layout::fail("masked_adamw: the cpu backend counts fp32 steps");
    if (m.num_blocks == 0) continue;
    const int64_t first = m.indices_int64 ? static_cast<const int64_t*>(m.indices)[0]
                                          : static_cast<const int32_t*>(m.indices)[0];
    const int64_t last = m.indices_int64 ? static_cast<const int64_t*>(m.indices)[m.num_blocks - 1]
                                         : static_cast<const int32_t*>(m.indices)[m.num_blocks - 1];
    if (first < 0 || last >= m.numel / m.block_size) {
      layout::fail("masked_adamw: block index " + std::to_string(first < 0 ? first : last) +
                   " outside a storage of " + std::to_string(m.numel / m.block_size) + " blocks");
    }
  }
  return tensors;
}

struct Hyper {
  double lr, beta1, beta2, eps, weight_decay;
  bool amsgrad, maximize;
  std::optional<double> grad_scale;
  double fisher_scale;
  bool stochastic;
  uint64_t seed;
};

// One step over accepted rows: advance the step counters, make each tensor's coefficients,
// run the kernel (tensors without selected blocks still count the step, as torch counts it
// for any parameter with a gradient).
void run_step(std::vector<tkc::MaskedTensor>& tensors, const Hyper& h, int num_threads) {
  std::vector<tkc::MaskedTensor> work;
  work.reserve(tensors.size());
  for (tkc::MaskedTensor& m : tensors) {
    double step = m.step_value;
    if (m.step != nullptr) {
      float* counter = const_cast<float*>(static_cast<const float*>(m.step));
      *counter = *counter + 1.0f;
      step = *counter;
    }
    m.coeffs = trace_kernels::make_adamw_coeffs(h.lr, h.beta1, h.beta2, h.eps, h.weight_decay, step,
                                                h.amsgrad);
    if (h.stochastic) {
      m.coeffs.round_key = trace_kernels::round_key(h.seed, step);
      m.coeffs.prev_round_key = trace_kernels::round_key(h.seed, step - 1.0);
    }
    if (m.num_blocks > 0) work.push_back(m);
  }
  double divisor = h.grad_scale.value_or(1.0);
  if (h.maximize) divisor = -divisor;
  py::gil_scoped_release release;
  tkc::masked_adamw(work, static_cast<float>(divisor), static_cast<float>(h.fisher_scale), h.stochastic,
                    num_threads);
}

void masked_adamw(const std::vector<int64_t>& table, const std::vector<double>& steps, double lr,
                  double beta1, double beta2, double eps, double weight_decay, bool amsgrad,
                  bool maximize, std::optional<double> grad_scale, double fisher_scale,
                  bool stochastic, uint64_t seed, int num_threads) {
  std::vector<tkc::MaskedTensor> tensors = checked_rows(table, steps, amsgrad);
  run_step(tensors, {lr, beta1, beta2, eps, weight_decay, amsgrad, maximize, grad_scale, fisher_scale,
                     stochastic, seed}, num_threads);
}

// A masked AdamW step planned once: the rows parsed and checked at construction (their
// grad fields are the parameters' addresses until a step gives the gradients), so a
// step converts only the gradients' addresses. For MaskedAdamW, which keeps the plan
// while its parameters, state and masks stay the same.
class AdamWPlan {
 public:
  AdamWPlan(const std::vector<int64_t>& table, int num_tensors, bool amsgrad)
      : tensors_(checked_rows(table, std::vector<double>(num_tensors, 0.0), amsgrad)), amsgrad_(amsgrad) {
    for (const tkc::MaskedTensor& m : tensors_) {
      if (m.step == nullptr) layout::fail("AdamWPlan: every row needs its step counter");
    }
  }

  void step(const std::vector<int64_t>& grads, double lr, double beta1, double beta2, double eps,
            double weight_decay, bool maximize, std::optional<double> grad_scale, bool stochastic,
            uint64_t seed, int num_threads) {
    if (grads.size() != tensors_.size()) {
      layout::fail("AdamWPlan.step: " + std::to_string(grads.size()) + " gradients for " +
                   std::to_string(tensors_.size()) + " tensors");
    }
    for (size_t t = 0; t < grads.size(); ++t) {
      if (grads[t] == 0 && tensors_[t].num_blocks > 0) layout::fail("AdamWPlan.step: a null gradient");
      tensors_[t].grad = layout::as_ptr<const void>(grads[t]);
    }
    run_step(tensors_, {lr, beta1, beta2, eps, weight_decay, amsgrad_, maximize, grad_scale, 0.0,
                        stochastic, seed}, num_threads);
  }

  size_t size() const { return tensors_.size(); }

 private:
  std::vector<tkc::MaskedTensor> tensors_;
  bool amsgrad_;
};

void delta_stats(const std::vector<int64_t>& table, int num_tensors, int num_refs,
                 int64_t sum_sq, int64_t fisher_sum, int64_t dots, int64_t ref_sq,
                 int num_threads) {
  std::vector<tkc::StatsTensor> tensors;
  for (const tkc::StatsTensor& t : layout::parse_stats(table, num_tensors, num_refs)) {
    if (t.numel > 0) tensors.push_back(t);
  }
  py::gil_scoped_release release;
  tkc::delta_stats(tensors, num_refs, layout::as_ptr<float>(sum_sq), layout::as_ptr<float>(fisher_sum),
                   layout::as_ptr<float>(dots), layout::as_ptr<float>(ref_sq), num_threads);
}

// Returns None when the indices are valid, else (position, reason).
std::optional<std::pair<int64_t, std::string>> check_block_indices(int64_t address, bool int64,
                                                                   int64_t count, int64_t limit,
                                                                   int num_threads) {
  tkc::IndexError e;
  {
    py::gil_scoped_release release;
    e = tkc::check_block_indices(layout::as_ptr<const void>(address), int64, count, limit, num_threads);
  }
  if (e.position < 0) return std::nullopt;
  return std::make_pair(e.position, std::string(e.kind == 1 ? "out of range" : "not strictly increasing"));
}

// Bounds are the caller's: trace_kernels/ops/sampled_dot.py checks rows and cols against
// a's and b's vectors before the call.
void sampled_dot(int64_t a, int64_t b, int64_t length, int64_t rows, int64_t cols, int64_t count,
                 int64_t out, int num_threads) {
  py::gil_scoped_release release;
  tkc::sampled_dot(layout::as_ptr<const float>(a), layout::as_ptr<const float>(b), length,
                   layout::as_ptr<const int64_t>(rows), layout::as_ptr<const int64_t>(cols), count,
                   layout::as_ptr<float>(out), num_threads);
}

void sampled_dot_token_major(int64_t a, int64_t a_width, int64_t b, int64_t b_width, int64_t length,
                             int64_t rows, int64_t cols, int64_t count, int64_t out, int num_threads) {
  py::gil_scoped_release release;
  tkc::sampled_dot_token_major(layout::as_ptr<const float>(a), a_width, layout::as_ptr<const float>(b),
                               b_width, length, layout::as_ptr<const int64_t>(rows),
                               layout::as_ptr<const int64_t>(cols), count, layout::as_ptr<float>(out),
                               num_threads);
}

// Checked by the caller (trace_kernels/ops/rank_scores.py): dtypes, lengths, table sizes;
// index and value have room for n entries. Returns (finite scores, candidates written).
std::pair<int64_t, int64_t> rank_scores(int64_t x, int64_t y, int64_t x_ranks, int64_t y_ranks, int bits,
                                        int64_t factor0, int64_t factor1, int64_t excluded, int64_t n,
                                        double floor, int64_t index, int64_t value, int num_threads) {
  if (bits < 1 || bits > 31) layout::fail("rank_scores: bits must be in [1, 31]");
  tkc::RankScoresArgs a{layout::as_ptr<const float>(x), layout::as_ptr<const float>(y),
                        layout::as_ptr<const double>(x_ranks), layout::as_ptr<const double>(y_ranks), bits,
                        {layout::as_ptr<const double>(factor0), layout::as_ptr<const double>(factor1)},
                        layout::as_ptr<const uint8_t>(excluded), n, floor};
  int64_t kept = 0;
  py::gil_scoped_release release;
  const int64_t finite = tkc::rank_scores(a, layout::as_ptr<int64_t>(index), layout::as_ptr<double>(value),
                                          &kept, num_threads);
  return {finite, kept};
}

// Checked by the caller: x fp32, counts int64 of 2^bits entries.
void rank_counts(int64_t x, int64_t n, int bits, int64_t counts) {
  if (bits < 1 || bits > 31) layout::fail("rank_counts: bits must be in [1, 31]");
  py::gil_scoped_release release;
  tkc::rank_counts(layout::as_ptr<const float>(x), n, bits, layout::as_ptr<int64_t>(counts));
}

// Checked by the caller: d and each ref fp32 of n elements, out fp64 of n.
void element_max_cosine(int64_t d, const std::vector<int64_t>& refs, int64_t n, int64_t out, int num_threads) {
  if (refs.empty()) layout::fail("element_max_cosine: no reference");
  std::vector<const float*> ptrs;
  for (int64_t r : refs) ptrs.push_back(layout::as_ptr<const float>(r));
  py::gil_scoped_release release;
  tkc::element_max_cosine(layout::as_ptr<const float>(d), ptrs.data(), static_cast<int>(ptrs.size()), n,
                          layout::as_ptr<double>(out), num_threads);
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
  m.attr("MASKED_FIELDS") = py::tuple(py::cast(layout::masked_field_names()));
  m.attr("STATS_FIELDS") = py::tuple(py::cast(layout::stats_field_names()));
  m.attr("MAX_REFS") = trace_kernels::kMaxRefs;
  py::class_<AdamWPlan>(m, "AdamWPlan")
      .def(py::init<const std::vector<int64_t>&, int, bool>(), py::arg("table"), py::arg("num_tensors"),
           py::arg("amsgrad"))
      .def("step", &AdamWPlan::step, py::arg("grads"), py::arg("lr"), py::arg("beta1"), py::arg("beta2"),
           py::arg("eps"), py::arg("weight_decay"), py::arg("maximize"), py::arg("grad_scale"),
           py::arg("stochastic"), py::arg("seed"), py::arg("num_threads"))
      .def("__len__", &AdamWPlan::size);
  m.def("masked_adamw", &masked_adamw, py::arg("table"), py::arg("steps"), py::arg("lr"),
        py::arg("beta1"), py::arg("beta2"), py::arg("eps"), py::arg("weight_decay"),
        py::arg("amsgrad"), py::arg("maximize"), py::arg("grad_scale"), py::arg("fisher_scale"),
        py::arg("stochastic"), py::arg("seed"), py::arg("num_threads"),
        "AdamW over selected blocks; rows with a fisher address also accumulate "
        "fisher_scale * g^2 (adamw_fisher_ passes one block spanning each tensor).");
  m.def("delta_stats", &delta_stats, py::arg("table"), py::arg("num_tensors"),
        py::arg("num_refs"), py::arg("sum_sq"), py::arg("fisher_sum"), py::arg("dots"),
        py::arg("ref_sq"), py::arg("num_threads"),
        "Per-block sums of d^2, fisher, d*ref and ref^2 (fp64 accumulation, fp32 out).");
  m.def("check_block_indices", &check_block_indices, py::arg("address"), py::arg("int64"),
        py::arg("count"), py::arg("limit"), py::arg("num_threads"));
  m.def("sampled_dot", &sampled_dot, py::arg("a"), py::arg("b"), py::arg("length"), py::arg("rows"),
        py::arg("cols"), py::arg("count"), py::arg("out"), py::arg("num_threads"),
        "out[i] = dot(a[rows[i]], b[cols[i]]): selected entries of a b^T (fp32, checked by the caller).");
  m.def("sampled_dot_token_major", &sampled_dot_token_major, py::arg("a"), py::arg("a_width"), py::arg("b"),
        py::arg("b_width"), py::arg("length"), py::arg("rows"), py::arg("cols"), py::arg("count"),
        py::arg("out"), py::arg("num_threads"),
        "out[i] = sum_t a[t, rows[i]] b[t, cols[i]] for token-major (length x width) a and b.");
  m.def("rank_scores", &rank_scores, py::arg("x"), py::arg("y"), py::arg("x_ranks"), py::arg("y_ranks"),
        py::arg("bits"), py::arg("factor0"), py::arg("factor1"), py::arg("excluded"), py::arg("n"),
        py::arg("floor"), py::arg("index"), py::arg("value"), py::arg("num_threads"),
        "Binned-rank scores (x_ranks[bin x] + y_ranks[bin y]) / 2, scaled, masked; the finite ones "
        ">= floor written with their positions. Returns (finite, written).");
  m.def("rank_counts", &rank_counts, py::arg("x"), py::arg("n"), py::arg("bits"), py::arg("counts"),
        "counts[bin(x[i])] += 1: the histogram behind binned percentile ranks.");
  m.def("element_max_cosine", &element_max_cosine, py::arg("d"), py::arg("refs"), py::arg("n"), py::arg("out"),
        py::arg("num_threads"), "out[i] = max_r cos(d[i], refs[r][i]) of one-element blocks (fp64).");
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
