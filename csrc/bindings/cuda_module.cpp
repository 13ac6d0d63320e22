// pybind11 bindings of the CUDA kernels (trace_kernels._cuda). Like _C, no torch headers:
// tensors cross as device addresses, checked on the Python side (backends/cuda.py) and
// again here (table_layout.h); only the CUDA runtime is linked (statically), so one build
// serves every torch version.
//
// Tables cross in two steps: `pack_*` and `plan_*` turn rows and sizes into the bytes of
// the structs the kernels read (checked here, once per plan); the Python side keeps them as
// device tensors from torch's allocator, and the launchers take their addresses. A step
// copies no table.
//
// Built a second time for the tests with csrc/cuda/host/ in place of the CUDA runtime
// (-DTK_CUDA_HOST, module trace_kernels._cuda_host): the same code on CPU tensors.
#include <cuda_runtime.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <stdexcept>
#include <string>
#include <vector>

#include "../cuda/kernels.h"
#include "table_layout.h"

#ifndef TRACE_KERNELS_CUDA_ARCHS
#define TRACE_KERNELS_CUDA_ARCHS "unknown"
#endif
#ifndef TK_CUDA_MODULE
#define TK_CUDA_MODULE _cuda
#endif

namespace py = pybind11;
namespace tkc = trace_kernels::cuda;
namespace layout = trace_kernels::layout;

namespace {

void check(cudaError_t e, const char* what) {
  if (e != cudaSuccess) {
    throw std::runtime_error(std::string("trace_kernels._cuda: ") + what + ": " +
                             cudaGetErrorString(e));
  }
}

class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    check(cudaGetDevice(&previous_), "cudaGetDevice");
    if (device != previous_) check(cudaSetDevice(device), "cudaSetDevice");
  }
  ~DeviceGuard() { cudaSetDevice(previous_); }

 private:
  int previous_ = 0;
};

template <typename T>
py::bytes as_bytes(const std::vector<T>& v) {
  return py::bytes(reinterpret_cast<const char*>(v.data()), v.size() * sizeof(T));
}

// The AdamW table's rows (table_layout.h), checked, as the bytes of MaskedTensor structs.
py::bytes pack_masked(const std::vector<int64_t>& table, int num_tensors, bool amsgrad) {
  if (num_tensors < 0) layout::fail("pack_masked: negative tensor count");
  return as_bytes(layout::parse_masked(table, std::vector<double>(num_tensors, 0.0), amsgrad));
}

py::bytes plan_tiles(const std::vector<int64_t>& block_sizes, const std::vector<int64_t>& num_blocks) {
  if (block_sizes.size() != num_blocks.size()) layout::fail("plan_tiles: one count per tensor");
  for (size_t t = 0; t < block_sizes.size(); ++t) {
    if (block_sizes[t] < 1 || num_blocks[t] < 0) layout::fail("plan_tiles: bad block layout");
  }
  return as_bytes(tkc::plan_tiles(block_sizes, num_blocks));
}

// step_values: a device array of one fp64 per tensor (the step before this one), or 0 when
// every tensor's step pointer is set. lr_device: one fp64 lr in device memory, or 0.
void masked_adamw(int64_t tensors, int64_t num_tensors, int64_t tiles, int64_t num_tiles,
                  int64_t step_values, double lr, int64_t lr_device, double beta1, double beta2,
                  double eps, double weight_decay, bool amsgrad, bool maximize, int64_t grad_scale,
                  int64_t found_inf, double fisher_scale, bool fisher, bool stochastic,
                  uint64_t seed, int64_t stream, int device) {
  if (num_tiles < 0 || num_tensors < 0 || (num_tiles > 0 && (tensors == 0 || tiles == 0))) {
    layout::fail("masked_adamw: bad launch tables");
  }
  const tkc::AdamWHyper hyper{lr, layout::as_ptr<const double>(lr_device), beta1, beta2, eps,
                              weight_decay, layout::as_ptr<const double>(step_values),
                              amsgrad ? 1 : 0, stochastic ? 1 : 0, seed};
  DeviceGuard guard(device);
  check(static_cast<cudaError_t>(tkc::launch_masked_adamw(
            layout::as_ptr<const tkc::MaskedTensor>(tensors), layout::as_ptr<const tkc::Tile>(tiles),
            num_tiles, maximize ? -1.0f : 1.0f, layout::as_ptr<const float>(grad_scale),
            layout::as_ptr<const float>(found_inf), static_cast<float>(fisher_scale), amsgrad,
            fisher, hyper, layout::as_ptr<CUstream_st>(stream))),
        "masked_adamw launch");
}

py::bytes pack_stats(const std::vector<int64_t>& table, int num_tensors, int num_refs) {
  return as_bytes(layout::parse_stats(table, num_tensors, num_refs));
}

// (items, splits, partial rows, output rows) of a delta_stats pass over these tensors.
py::tuple plan_stats(const std::vector<int64_t>& numels, const std::vector<int64_t>& block_sizes) {
  if (numels.size() != block_sizes.size()) layout::fail("plan_stats: one block size per tensor");
  for (size_t t = 0; t < numels.size(); ++t) {
    if (numels[t] < 0 || block_sizes[t] < 1 || numels[t] % block_sizes[t]) {
      layout::fail("plan_stats: bad block layout in tensor " + std::to_string(t));
    }
  }
  const tkc::StatsPlan plan = tkc::plan_stats(numels, block_sizes);
  return py::make_tuple(as_bytes(plan.items), as_bytes(plan.splits), plan.num_partials, plan.num_rows);
}

void delta_stats(int64_t tensors, int64_t items, int64_t num_items, int num_refs, int64_t partials,
                 int64_t splits, int64_t num_splits, int64_t out, int64_t stream, int device) {
  if (num_refs < 0 || num_refs > trace_kernels::kMaxRefs || num_items < 0 || num_splits < 0) {
    layout::fail("delta_stats: bad launch tables");
  }
  DeviceGuard guard(device);
  check(static_cast<cudaError_t>(tkc::launch_delta_stats(
            layout::as_ptr<const tkc::StatsTensor>(tensors), layout::as_ptr<const tkc::StatsItem>(items),
            num_items, num_refs, layout::as_ptr<double>(partials),
            layout::as_ptr<const tkc::StatsSplit>(splits), num_splits, layout::as_ptr<double>(out),
            layout::as_ptr<CUstream_st>(stream))),
        "delta_stats launch");
}

int device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky "no device" error
    return 0;
  }
  return n;
}

}  // namespace

PYBIND11_MODULE(TK_CUDA_MODULE, m) {
  m.doc() = "trace_kernels CUDA kernels (CUDA runtime only, no libtorch)";
  m.attr("ARCHS") = TRACE_KERNELS_CUDA_ARCHS;
  m.attr("CUDA_VERSION") = CUDART_VERSION;
  m.attr("MASKED_FIELDS") = py::tuple(py::cast(layout::masked_field_names()));
  m.attr("STATS_FIELDS") = py::tuple(py::cast(layout::stats_field_names()));
  m.attr("MAX_REFS") = trace_kernels::kMaxRefs;
  m.attr("TILE") = tkc::kTile;
  m.attr("MASKED_TENSOR_BYTES") = sizeof(tkc::MaskedTensor);
  m.attr("TILE_BYTES") = sizeof(tkc::Tile);
  m.attr("STATS_TENSOR_BYTES") = sizeof(tkc::StatsTensor);
  m.attr("STATS_ITEM_BYTES") = sizeof(tkc::StatsItem);
  m.attr("STATS_SPLIT_BYTES") = sizeof(tkc::StatsSplit);
  m.def("pack_masked", &pack_masked, py::arg("table"), py::arg("num_tensors"), py::arg("amsgrad"));
  m.def("plan_tiles", &plan_tiles, py::arg("block_sizes"), py::arg("num_blocks"));
  m.def("masked_adamw", &masked_adamw, py::arg("tensors"), py::arg("num_tensors"), py::arg("tiles"),
        py::arg("num_tiles"), py::arg("step_values"), py::arg("lr"), py::arg("lr_device"),
        py::arg("beta1"), py::arg("beta2"), py::arg("eps"), py::arg("weight_decay"),
        py::arg("amsgrad"), py::arg("maximize"), py::arg("grad_scale"), py::arg("found_inf"),
        py::arg("fisher_scale"), py::arg("fisher"), py::arg("stochastic"),
        py::arg("seed"), py::arg("stream"), py::arg("device"));
  m.def("pack_stats", &pack_stats, py::arg("table"), py::arg("num_tensors"), py::arg("num_refs"));
  m.def("plan_stats", &plan_stats, py::arg("numels"), py::arg("block_sizes"));
  m.def("delta_stats", &delta_stats, py::arg("tensors"), py::arg("items"), py::arg("num_items"),
        py::arg("num_refs"), py::arg("partials"), py::arg("splits"), py::arg("num_splits"),
        py::arg("out"), py::arg("stream"), py::arg("device"));
  m.def("device_count", &device_count, "CUDA devices visible to this runtime (0 without a GPU).");
}
