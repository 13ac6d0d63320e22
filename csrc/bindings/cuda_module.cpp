// pybind11 bindings of the CUDA kernels (trace_kernels._cuda). Like _C, no torch headers:
// tensors cross as device addresses, checked on the Python side (backends/cuda.py); only
// the CUDA runtime is linked (statically), so one build serves every torch version.
#include <cuda_runtime.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#include "../cuda/kernels.h"
#include "table_layout.h"

#ifndef TRACE_KERNELS_CUDA_ARCHS
#define TRACE_KERNELS_CUDA_ARCHS "unknown"
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

// Copies a host vector to a stream-ordered device buffer freed after the stream's work.
template <typename T>
class DeviceCopy {
 public:
  DeviceCopy(const std::vector<T>& host, cudaStream_t stream) : stream_(stream) {
    if (host.empty()) return;
    check(cudaMallocAsync(reinterpret_cast<void**>(&ptr_), host.size() * sizeof(T), stream), "cudaMallocAsync");
    check(cudaMemcpyAsync(ptr_, host.data(), host.size() * sizeof(T), cudaMemcpyHostToDevice, stream),
          "cudaMemcpyAsync");
  }
  ~DeviceCopy() { if (ptr_ != nullptr) cudaFreeAsync(ptr_, stream_); }
  DeviceCopy(const DeviceCopy&) = delete;
  DeviceCopy& operator=(const DeviceCopy&) = delete;
  T* get() const { return ptr_; }

 private:
  T* ptr_ = nullptr;
  cudaStream_t stream_;
};

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

// The row layout and checks are table_layout.h's. A row's `step` is the device address of
// the parameter's already incremented step (fp32, or fp64 with step_fp64), or 0: `steps[t]`
// holds it. lr_device: the address of one fp64 lr in device memory, or 0 (use `lr`). When
// it or any step address is set, the kernel makes the coefficients itself: no host sync.
void masked_adamw(const std::vector<int64_t>& table, const std::vector<double>& steps,
                  const std::vector<int64_t>& tiles, double lr, int64_t lr_device, double beta1,
                  double beta2, double eps, double weight_decay, bool amsgrad, bool maximize,
                  int64_t grad_scale, int64_t found_inf, double fisher_scale, bool fisher,
                  int64_t stream, int device) {
  if (tiles.size() % 3) layout::fail("masked_adamw: malformed tile list");
  std::vector<tkc::MaskedTensor> tensors = layout::parse_masked(table, steps, amsgrad);
  bool on_device = lr_device != 0;
  for (tkc::MaskedTensor& m : tensors) {
    m.coeffs = trace_kernels::make_adamw_coeffs(lr, beta1, beta2, eps, weight_decay, m.step_value, amsgrad);
    on_device = on_device || m.step != nullptr;
  }
  const tkc::AdamWHyper hyper{lr, beta1, beta2, eps, weight_decay, layout::as_ptr<const double>(lr_device),
                              on_device ? 1 : 0, amsgrad ? 1 : 0};
  std::vector<tkc::Tile> tile_list(tiles.size() / 3);
  for (size_t i = 0; i < tile_list.size(); ++i) {
    tile_list[i] = {static_cast<int32_t>(tiles[3 * i]), static_cast<int32_t>(tiles[3 * i + 1]),
                    tiles[3 * i + 2]};
  }
  DeviceGuard guard(device);
  const auto s = layout::as_ptr<CUstream_st>(stream);
  DeviceCopy<tkc::MaskedTensor> d_tensors(tensors, s);
  DeviceCopy<tkc::Tile> d_tiles(tile_list, s);
  check(static_cast<cudaError_t>(tkc::launch_masked_adamw(
            d_tensors.get(), d_tiles.get(), static_cast<int64_t>(tile_list.size()),
            maximize ? -1.0f : 1.0f, layout::as_ptr<const float>(grad_scale),
            layout::as_ptr<const float>(found_inf), static_cast<float>(fisher_scale), amsgrad,
            fisher, hyper, s)),
        "masked_adamw launch");
}

// Items: (tensor, begin, end, partial) quadruples. Splits: (row, first_partial, count) triples.
void delta_stats(const std::vector<int64_t>& table, int num_tensors, int num_refs,
                 const std::vector<int64_t>& items, const std::vector<int64_t>& splits,
                 int64_t partials, int64_t out, int64_t stream, int device) {
  if (items.size() % 4 || splits.size() % 3) layout::fail("delta_stats: malformed work lists");
  std::vector<tkc::StatsTensor> tensors = layout::parse_stats(table, num_tensors, num_refs);
  std::vector<tkc::StatsItem> item_list(items.size() / 4);
  for (size_t i = 0; i < item_list.size(); ++i) {
    item_list[i] = {static_cast<int32_t>(items[4 * i]), items[4 * i + 1], items[4 * i + 2], items[4 * i + 3]};
  }
  std::vector<tkc::StatsSplit> split_list(splits.size() / 3);
  for (size_t i = 0; i < split_list.size(); ++i) {
    split_list[i] = {splits[3 * i], splits[3 * i + 1], splits[3 * i + 2]};
  }
  DeviceGuard guard(device);
  const auto s = layout::as_ptr<CUstream_st>(stream);
  DeviceCopy<tkc::StatsTensor> d_tensors(tensors, s);
  DeviceCopy<tkc::StatsItem> d_items(item_list, s);
  DeviceCopy<tkc::StatsSplit> d_splits(split_list, s);
  check(static_cast<cudaError_t>(tkc::launch_delta_stats(
            d_tensors.get(), d_items.get(), static_cast<int64_t>(item_list.size()), num_refs,
            layout::as_ptr<double>(partials), d_splits.get(), static_cast<int64_t>(split_list.size()),
            layout::as_ptr<double>(out), s)),
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

PYBIND11_MODULE(_cuda, m) {
  m.doc() = "trace_kernels CUDA kernels (CUDA runtime only, no libtorch)";
  m.attr("ARCHS") = TRACE_KERNELS_CUDA_ARCHS;
  m.attr("CUDA_VERSION") = CUDART_VERSION;
  m.attr("MASKED_FIELDS") = py::tuple(py::cast(layout::masked_field_names()));
  m.attr("STATS_FIELDS") = py::tuple(py::cast(layout::stats_field_names()));
  m.attr("MAX_REFS") = trace_kernels::kMaxRefs;
  m.attr("TILE") = tkc::kTile;
  m.def("masked_adamw", &masked_adamw, py::arg("table"), py::arg("steps"), py::arg("tiles"),
        py::arg("lr"), py::arg("lr_device"), py::arg("beta1"), py::arg("beta2"), py::arg("eps"),
        py::arg("weight_decay"), py::arg("amsgrad"), py::arg("maximize"), py::arg("grad_scale"),
        py::arg("found_inf"), py::arg("fisher_scale"), py::arg("fisher"), py::arg("stream"),
        py::arg("device"));
  m.def("delta_stats", &delta_stats, py::arg("table"), py::arg("num_tensors"), py::arg("num_refs"),
        py::arg("items"), py::arg("splits"), py::arg("partials"), py::arg("out"),
        py::arg("stream"), py::arg("device"));
  m.def("device_count", &device_count, "CUDA devices visible to this runtime (0 without a GPU).");
}
