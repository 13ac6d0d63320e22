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

#ifndef TRACE_KERNELS_CUDA_ARCHS
#define TRACE_KERNELS_CUDA_ARCHS "unknown"
#endif

namespace py = pybind11;
namespace tkc = trace_kernels::cuda;

namespace {

void check(cudaError_t e, const char* what) {
  if (e != cudaSuccess) {
    throw std::runtime_error(std::string("trace_kernels._cuda: ") + what + ": " +
                             cudaGetErrorString(e));
  }
}

template <typename T>
T* as_ptr(int64_t address) {
  return reinterpret_cast<T*>(static_cast<uintptr_t>(address));
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

// Row layout of the masked table (backends/cuda.py): param, grad, exp_avg, exp_avg_sq,
// max_exp_avg_sq, fisher, indices, indices_int64, num_blocks, block_size, dtype, step
// (device address of the incremented step, or 0: `steps` holds it), step_fp64.
constexpr size_t kMaskedFields = 13;

// lr_device: the address of one fp64 lr in device memory, or 0 (use `lr`). When it or any
// step address is set, the kernel makes the coefficients itself: no host synchronisation.
void masked_adamw(const std::vector<int64_t>& table, const std::vector<double>& steps,
                  const std::vector<int64_t>& tiles, double lr, int64_t lr_device, double beta1,
                  double beta2, double eps, double weight_decay, bool amsgrad, bool maximize,
                  int64_t grad_scale, int64_t found_inf, double fisher_scale, bool fisher,
                  int64_t stream, int device) {
  if (table.size() != steps.size() * kMaskedFields || tiles.size() % 3) {
    throw std::invalid_argument("masked_adamw: malformed tables");
  }
  std::vector<tkc::MaskedTensor> tensors(steps.size());
  bool on_device = lr_device != 0;
  for (size_t t = 0; t < steps.size(); ++t) {
    const int64_t* r = table.data() + t * kMaskedFields;
    tkc::MaskedTensor& m = tensors[t];
    m.param = as_ptr<void>(r[0]);
    m.grad = as_ptr<const void>(r[1]);
    m.exp_avg = as_ptr<float>(r[2]);
    m.exp_avg_sq = as_ptr<float>(r[3]);
    m.max_exp_avg_sq = as_ptr<float>(r[4]);
    m.fisher = as_ptr<float>(r[5]);
    m.indices = as_ptr<const void>(r[6]);
    m.indices_int64 = static_cast<int32_t>(r[7]);
    m.block_size = r[9];
    m.num_selected = r[8] * r[9];
    m.dtype = static_cast<int32_t>(r[10]);
    if (m.block_size < 1 || r[8] < 0 || m.dtype < 0 || m.dtype > 2) {
      throw std::invalid_argument("masked_adamw: bad row " + std::to_string(t));
    }
    m.step = as_ptr<const void>(r[11]);
    m.step_fp64 = static_cast<int32_t>(r[12]);
    m.step_value = steps[t];
    m.coeffs = trace_kernels::make_adamw_coeffs(lr, beta1, beta2, eps, weight_decay, steps[t], amsgrad);
    on_device = on_device || m.step != nullptr;
  }
  const tkc::AdamWHyper hyper{lr, beta1, beta2, eps, weight_decay, as_ptr<const double>(lr_device),
                              on_device ? 1 : 0, amsgrad ? 1 : 0};
  std::vector<tkc::Tile> tile_list(tiles.size() / 3);
  for (size_t i = 0; i < tile_list.size(); ++i) {
    tile_list[i] = {static_cast<int32_t>(tiles[3 * i]), static_cast<int32_t>(tiles[3 * i + 1]),
                    tiles[3 * i + 2]};
  }
  DeviceGuard guard(device);
  const auto s = as_ptr<CUstream_st>(stream);
  DeviceCopy<tkc::MaskedTensor> d_tensors(tensors, s);
  DeviceCopy<tkc::Tile> d_tiles(tile_list, s);
  check(static_cast<cudaError_t>(tkc::launch_masked_adamw(
            d_tensors.get(), d_tiles.get(), static_cast<int64_t>(tile_list.size()),
            maximize ? -1.0f : 1.0f, as_ptr<const float>(grad_scale), as_ptr<const float>(found_inf),
            static_cast<float>(fisher_scale), amsgrad, fisher, hyper, s)),
        "masked_adamw launch");
}

// Stats table rows: post, pre, fisher, dtype, numel, block_size, first_row, then R ref
// addresses and R ref dtypes. Items: (tensor, begin, end, partial) quadruples. Splits:
// (row, first_partial, count) triples.
constexpr size_t kStatsFields = 7;

void delta_stats(const std::vector<int64_t>& table, int num_tensors, int num_refs,
                 const std::vector<int64_t>& items, const std::vector<int64_t>& splits,
                 int64_t partials, int64_t out, int64_t stream, int device) {
  if (num_refs < 0 || num_refs > 16) throw std::invalid_argument("delta_stats: 0 to 16 references");
  const size_t width = kStatsFields + 2 * static_cast<size_t>(num_refs);
  if (table.size() != width * num_tensors || items.size() % 4 || splits.size() % 3) {
    throw std::invalid_argument("delta_stats: malformed tables");
  }
  std::vector<tkc::StatsTensor> tensors(num_tensors);
  for (int t = 0; t < num_tensors; ++t) {
    const int64_t* r = table.data() + t * width;
    tkc::StatsTensor& s = tensors[t];
    s = tkc::StatsTensor{};
    s.post = as_ptr<const void>(r[0]);
    s.pre = as_ptr<const void>(r[1]);
    s.fisher = as_ptr<const float>(r[2]);
    s.dtype = static_cast<int32_t>(r[3]);
    s.numel = r[4];
    s.block_size = r[5];
    s.first_row = r[6];
    for (int k = 0; k < num_refs; ++k) {
      s.refs[k] = as_ptr<const void>(r[kStatsFields + k]);
      s.ref_dtypes[k] = static_cast<int32_t>(r[kStatsFields + num_refs + k]);
    }
  }
  std::vector<tkc::StatsItem> item_list(items.size() / 4);
  for (size_t i = 0; i < item_list.size(); ++i) {
    item_list[i] = {static_cast<int32_t>(items[4 * i]), items[4 * i + 1], items[4 * i + 2], items[4 * i + 3]};
  }
  std::vector<tkc::StatsSplit> split_list(splits.size() / 3);
  for (size_t i = 0; i < split_list.size(); ++i) {
    split_list[i] = {splits[3 * i], splits[3 * i + 1], splits[3 * i + 2]};
  }
  DeviceGuard guard(device);
  const auto s = as_ptr<CUstream_st>(stream);
  DeviceCopy<tkc::StatsTensor> d_tensors(tensors, s);
  DeviceCopy<tkc::StatsItem> d_items(item_list, s);
  DeviceCopy<tkc::StatsSplit> d_splits(split_list, s);
  check(static_cast<cudaError_t>(tkc::launch_delta_stats(
            d_tensors.get(), d_items.get(), static_cast<int64_t>(item_list.size()), num_refs,
            as_ptr<double>(partials), d_splits.get(), static_cast<int64_t>(split_list.size()),
            as_ptr<double>(out), s)),
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
  m.attr("MASKED_FIELDS") = static_cast<int>(kMaskedFields);
  m.attr("STATS_FIELDS") = static_cast<int>(kStatsFields);
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
