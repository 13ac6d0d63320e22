// CUDA kernels: masked AdamW (+ Fisher) and delta_stats, sharing the per-element math of
// the CPU kernels (trace_kernels/adamw_math.h). Built with -fmad=false and IEEE division
// and square root (nvcc's defaults), so results round exactly like the CPU kernels.
// Host builds (-DTK_CUDA_HOST, csrc/cuda/host/) run this same source on the CPU.
#include <cuda_runtime.h>

#include <array>
#include <utility>

#include "kernels.h"
#include "trace_kernels/rounding.h"

#ifdef TK_CUDA_HOST
#define TK_LAUNCH(kernel, grid, block, stream, ...) \
  ::tk_host::launch(dim3(grid), dim3(block), [&] { kernel(__VA_ARGS__); })
#else
#define TK_LAUNCH(kernel, grid, block, stream, ...) kernel<<<(grid), (block), 0, (stream)>>>(__VA_ARGS__)
#endif

namespace trace_kernels::cuda {
namespace {

template <typename P, bool kAmsgrad, bool kFisher, bool kMaster>
__device__ __forceinline__ void update_one(const MaskedTensor& t, const AdamWCoeffs& k, int64_t c,
                                           int64_t e, float divisor, float fisher_scale,
                                           bool stochastic) {
  P* param = static_cast<P*>(t.param);
  const P* grad = static_cast<const P*>(t.grad);
  float p = kMaster ? master_or_weight(param + e, t.master[c], stochastic, k.prev_round_key, t.elem_base + e)
                    : load_as_float(param + e);
  const float g = load_as_float(grad + e) / divisor;
  if (kFisher) t.fisher[c] = t.fisher[c] + (fisher_scale * g) * g;
  adamw_update_fixed<kAmsgrad>(p, g, t.exp_avg[c], t.exp_avg_sq[c], kAmsgrad ? t.max_exp_avg_sq + c : nullptr, k);
  if (kMaster) t.master[c] = p;
  store_param(param + e, p, stochastic, k.round_key, t.elem_base + e);
}

// Four consecutive elements at once: 16-byte loads and stores of the fp32 streams (moments,
// Fisher) and of fp32 parameters and gradients (8-byte for 16-bit ones). The math per
// element is update_one's, so results are bit-identical to the scalar path.
template <typename P> struct Pack4 { using type = uint2; };   // 4 x 16-bit
template <> struct Pack4<float> { using type = float4; };

template <typename P, bool kAmsgrad, bool kFisher, bool kMaster>
__device__ __forceinline__ void update_four(const MaskedTensor& t, const AdamWCoeffs& coeffs,
                                            int64_t c, int64_t e, float divisor, float fisher_scale,
                                            bool stochastic) {
  using V = typename Pack4<P>::type;
  union Params { V v; P x[4]; };
  union Floats { float4 v; float x[4]; };
  P* param = static_cast<P*>(t.param) + e;
  Params p4, g4;
  p4.v = *reinterpret_cast<const V*>(param);
  g4.v = *reinterpret_cast<const V*>(static_cast<const P*>(t.grad) + e);
  Floats m4, v4, x4, f4, w4;
  m4.v = *reinterpret_cast<const float4*>(t.exp_avg + c);
  v4.v = *reinterpret_cast<const float4*>(t.exp_avg_sq + c);
  if (kAmsgrad) x4.v = *reinterpret_cast<const float4*>(t.max_exp_avg_sq + c);
  if (kFisher) f4.v = *reinterpret_cast<const float4*>(t.fisher + c);
  if (kMaster) w4.v = *reinterpret_cast<const float4*>(t.master + c);
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    float p = kMaster ? master_or_weight(&p4.x[k], w4.x[k], stochastic, coeffs.prev_round_key,
                                         t.elem_base + e + k)
                      : load_as_float(&p4.x[k]);
    const float g = load_as_float(&g4.x[k]) / divisor;
    if (kFisher) f4.x[k] = f4.x[k] + (fisher_scale * g) * g;
    adamw_update_fixed<kAmsgrad>(p, g, m4.x[k], v4.x[k], kAmsgrad ? &x4.x[k] : nullptr, coeffs);
    if (kMaster) w4.x[k] = p;
    store_param(&p4.x[k], p, stochastic, coeffs.round_key, t.elem_base + e + k);
  }
  *reinterpret_cast<V*>(param) = p4.v;
  *reinterpret_cast<float4*>(t.exp_avg + c) = m4.v;
  *reinterpret_cast<float4*>(t.exp_avg_sq + c) = v4.v;
  if (kAmsgrad) *reinterpret_cast<float4*>(t.max_exp_avg_sq + c) = x4.v;
  if (kFisher) *reinterpret_cast<float4*>(t.fisher + c) = f4.v;
  if (kMaster) *reinterpret_cast<float4*>(t.master + c) = w4.v;
}

__device__ __forceinline__ uintptr_t address(const void* p) { return reinterpret_cast<uintptr_t>(p); }

// Whether positions [c, c+4) of every stream can be read as one aligned vector each.
template <typename P, bool kAmsgrad, bool kFisher, bool kMaster>
__device__ __forceinline__ bool vector_aligned(const MaskedTensor& t, int64_t c, int64_t e) {
  const uintptr_t elems = address(static_cast<const P*>(t.param) + e) |
                          address(static_cast<const P*>(t.grad) + e);
  uintptr_t states = address(t.exp_avg + c) | address(t.exp_avg_sq + c);
  if (kAmsgrad) states |= address(t.max_exp_avg_sq + c);
  if (kFisher) states |= address(t.fisher + c);
  if (kMaster) states |= address(t.master + c);
  return elems % (4 * sizeof(P)) == 0 && states % 16 == 0;
}

template <typename I>
__device__ __forceinline__ int64_t block_index(const MaskedTensor& t, int64_t j) {
  return static_cast<int64_t>(static_cast<const I*>(t.indices)[j]);
}

template <typename P, bool kAmsgrad, bool kFisher, bool kMaster>
__device__ void tile_update(const MaskedTensor& t, const AdamWCoeffs& k, const Tile& tile,
                            float divisor, float fisher_scale, bool stochastic) {
  const int64_t B = t.block_size;
  int64_t end = min(tile.start + static_cast<int64_t>(kTile), t.num_blocks * B);
  if (tile.contiguous) {
    // the tile lies in one block: consecutive threads touch consecutive elements
    const int64_t j = tile.start / B;
    end = min(end, (j + 1) * B);  // and never past the block's end
    const int64_t blk = t.indices_int64 ? block_index<int64_t>(t, j) : block_index<int32_t>(t, j);
    const int64_t base = blk * B - j * B;
    int64_t scalar_from = tile.start;
    if (vector_aligned<P, kAmsgrad, kFisher, kMaster>(t, tile.start, base + tile.start)) {
      scalar_from = tile.start + (end - tile.start) / 4 * 4;
      for (int64_t c = tile.start + 4 * threadIdx.x; c < scalar_from; c += 4 * blockDim.x) {
        update_four<P, kAmsgrad, kFisher, kMaster>(t, k, c, base + c, divisor, fisher_scale, stochastic);
      }
    }
    for (int64_t c = scalar_from + threadIdx.x; c < end; c += blockDim.x) {
      update_one<P, kAmsgrad, kFisher, kMaster>(t, k, c, base + c, divisor, fisher_scale, stochastic);
    }
  } else {
    for (int64_t c = tile.start + threadIdx.x; c < end; c += blockDim.x) {
      const int64_t j = B == 1 ? c : c / B;
      const int64_t blk = t.indices_int64 ? block_index<int64_t>(t, j) : block_index<int32_t>(t, j);
      update_one<P, kAmsgrad, kFisher, kMaster>(t, k, c, blk * B + (c - j * B), divisor, fisher_scale,
                                                stochastic);
    }
  }
}

// The tensor's coefficients, made by one thread and shared with the block, from lr and
// the step (+1: the caller advances the counters after the launch).
__device__ __forceinline__ AdamWCoeffs tile_coeffs(const MaskedTensor& t, int32_t tensor,
                                                   const AdamWHyper& h, AdamWCoeffs* shared) {
  if (threadIdx.x == 0) {
    const double lr = h.lr_device != nullptr ? *h.lr_device : h.lr;
    double step = h.step_values != nullptr ? h.step_values[tensor] : 0.0;
    if (t.step != nullptr) {
      step = t.step_fp64 ? *static_cast<const double*>(t.step)
                         : static_cast<double>(*static_cast<const float*>(t.step));
    }
    *shared = make_adamw_coeffs(lr, h.beta1, h.beta2, h.eps, h.weight_decay, step + 1.0,
                                h.amsgrad != 0);
    if (h.stochastic) {
      shared->round_key = round_key(h.seed, step + 1.0);
      shared->prev_round_key = round_key(h.seed, step);
    }
  }
  __syncthreads();
  return *shared;
}

template <bool kAmsgrad, bool kFisher>
__global__ void masked_adamw_kernel(const MaskedTensor* tensors, const Tile* tiles,
                                    float grad_sign, const float* grad_scale,
                                    const float* found_inf, float fisher_scale, AdamWHyper hyper) {
  if (found_inf != nullptr && *found_inf != 0.0f) return;  // read on the device: no host sync
  __shared__ AdamWCoeffs shared;
  const Tile tile = tiles[blockIdx.x];
  const MaskedTensor& t = tensors[tile.tensor];
  const AdamWCoeffs k = tile_coeffs(t, tile.tensor, hyper, &shared);
  const float divisor = grad_scale != nullptr ? grad_sign * *grad_scale : grad_sign;
  const bool stochastic = hyper.stochastic != 0;
  // 16-bit parameters may keep fp32 masters of their core (per tensor: the branch is
  // uniform within a thread block)
  switch (t.dtype) {
    case DType::kFloat32: tile_update<float, kAmsgrad, kFisher, false>(t, k, tile, divisor, fisher_scale, false); break;
    case DType::kBFloat16:
      if (t.master != nullptr) tile_update<bf16_t, kAmsgrad, kFisher, true>(t, k, tile, divisor, fisher_scale, stochastic);
      else tile_update<bf16_t, kAmsgrad, kFisher, false>(t, k, tile, divisor, fisher_scale, stochastic);
      break;
    case DType::kFloat16:
      if (t.master != nullptr) tile_update<fp16_t, kAmsgrad, kFisher, true>(t, k, tile, divisor, fisher_scale, false);
      else tile_update<fp16_t, kAmsgrad, kFisher, false>(t, k, tile, divisor, fisher_scale, false);
      break;
  }
}

__device__ __forceinline__ float load_any(const void* base, DType dtype, int64_t i) {
  switch (dtype) {
    case DType::kBFloat16: return load_as_float(static_cast<const bf16_t*>(base) + i);
    case DType::kFloat16: return load_as_float(static_cast<const fp16_t*>(base) + i);
    default: return static_cast<const float*>(base)[i];
  }
}

// Sums of one element into acc (layout: d², fisher, d·ref[R], ref²[R]). R is a template
// argument so the accumulators stay in registers (a run-time R indexes local memory).
template <int R>
__device__ __forceinline__ void accumulate(const StatsTensor& t, int64_t e, double* acc) {
  float d = load_any(t.post, t.dtype, e);
  if (t.pre != nullptr) d = d - load_any(t.pre, t.dtype, e);
  const double dd = d;
  acc[0] += dd * dd;
  if (t.fisher != nullptr) acc[1] += t.fisher[e];
#pragma unroll
  for (int r = 0; r < R; ++r) {
    const double x = load_any(t.refs[r], t.ref_dtypes[r], e);
    acc[2 + r] += dd * x;
    acc[2 + R + r] += x * x;
  }
}

template <int R>
__global__ void delta_stats_kernel(const StatsTensor* tensors, const StatsItem* items,
                                   double* partials, double* out) {
  constexpr int kWidth = 2 + 2 * R;
  const StatsItem item = items[blockIdx.x];
  const StatsTensor& t = tensors[item.tensor];
  double acc[kWidth];
#pragma unroll
  for (int k = 0; k < kWidth; ++k) acc[k] = 0.0;
  if (item.partial < 0) {
    // whole short blocks: thread i sums block (begin / B + i) in element order
    const int64_t B = t.block_size;
    const int64_t b = item.begin / B + threadIdx.x;
    if (b * B >= item.end) return;
    for (int64_t e = b * B; e < b * B + B; ++e) accumulate<R>(t, e, acc);
    double* row = out + (t.first_row + b) * kWidth;
#pragma unroll
    for (int k = 0; k < kWidth; ++k) row[k] = acc[k];
    return;
  }
  // a segment of a long block: strided per thread, then a fixed-order tree in shared memory
  for (int64_t e = item.begin + threadIdx.x; e < item.end; e += blockDim.x) accumulate<R>(t, e, acc);
  __shared__ double shared[kThreads];
#pragma unroll
  for (int k = 0; k < kWidth; ++k) {
    shared[threadIdx.x] = acc[k];
    __syncthreads();
    for (int s = blockDim.x / 2; s > 0; s /= 2) {
      if (threadIdx.x < s) shared[threadIdx.x] += shared[threadIdx.x + s];
      __syncthreads();
    }
    if (threadIdx.x == 0) partials[item.partial * kWidth + k] = shared[0];
    __syncthreads();
  }
}

using StatsKernel = void (*)(const StatsTensor*, const StatsItem*, double*, double*);

template <int... Rs>
constexpr std::array<StatsKernel, sizeof...(Rs)> stats_kernels(std::integer_sequence<int, Rs...>) {
  return {delta_stats_kernel<Rs>...};
}

// delta_stats_kernel<R> for R = 0 .. kMaxRefs
constexpr auto kStatsKernels = stats_kernels(std::make_integer_sequence<int, kMaxRefs + 1>{});

__global__ void sum_partials_kernel(const double* partials, const StatsSplit* splits,
                                    int64_t num_splits, int width, double* out) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= num_splits) return;
  const StatsSplit s = splits[i];
  for (int k = 0; k < width; ++k) {
    double acc = 0.0;
    for (int64_t p = 0; p < s.count; ++p) acc += partials[(s.first_partial + p) * width + k];
    out[s.row * width + k] = acc;
  }
}

}  // namespace

std::vector<Tile> plan_tiles(const std::vector<int64_t>& block_sizes,
                             const std::vector<int64_t>& num_blocks) {
  std::vector<Tile> out;
  for (size_t t = 0; t < block_sizes.size(); ++t) {
    const int64_t B = block_sizes[t];
    const int32_t tensor = static_cast<int32_t>(t);
    if (B >= kTile) {  // tiles inside each block
      for (int64_t j = 0; j < num_blocks[t]; ++j) {
        for (int64_t w = 0; w < B; w += kTile) out.push_back({tensor, 1, j * B + w});
      }
    } else {  // tiles over the compact positions
      for (int64_t c = 0; c < num_blocks[t] * B; c += kTile) out.push_back({tensor, 0, c});
    }
  }
  return out;
}

int launch_masked_adamw(const MaskedTensor* tensors, const Tile* tiles, int64_t num_tiles,
                        float grad_sign, const float* grad_scale, const float* found_inf,
                        float fisher_scale, bool amsgrad, bool fisher, const AdamWHyper& hyper,
                        void* stream) {
  if (num_tiles == 0) return 0;
  using Kernel = void (*)(const MaskedTensor*, const Tile*, float, const float*, const float*,
                          float, AdamWHyper);
  const Kernel kernel = amsgrad ? (fisher ? masked_adamw_kernel<true, true> : masked_adamw_kernel<true, false>)
                                : (fisher ? masked_adamw_kernel<false, true> : masked_adamw_kernel<false, false>);
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  TK_LAUNCH(kernel, static_cast<unsigned>(num_tiles), kThreads, s, tensors, tiles, grad_sign,
            grad_scale, found_inf, fisher_scale, hyper);
  return static_cast<int>(cudaGetLastError());
}

StatsPlan plan_stats(const std::vector<int64_t>& numels, const std::vector<int64_t>& block_sizes) {
  StatsPlan plan;
  for (size_t i = 0; i < numels.size(); ++i) {
    const int64_t b = block_sizes[i];
    const int64_t nb = numels[i] / b;
    const int32_t tensor = static_cast<int32_t>(i);
    if (b <= kStatsShortBlock) {
      const int64_t span = kThreads * b;  // one thread per block, kThreads threads per item
      for (int64_t e = 0; e < numels[i]; e += span) {
        plan.items.push_back({tensor, e, min(e + span, numels[i]), -1});
      }
    } else {
      const int64_t pieces = (b + kStatsSegment - 1) / kStatsSegment;
      for (int64_t j = 0; j < nb; ++j) {
        plan.splits.push_back({plan.num_rows + j, plan.num_partials, pieces});
        for (int64_t s = 0; s < pieces; ++s) {
          const int64_t start = j * b + s * kStatsSegment;
          plan.items.push_back({tensor, start, min(start + kStatsSegment, (j + 1) * b), plan.num_partials++});
        }
      }
    }
    plan.num_rows += nb;
  }
  return plan;
}

int launch_delta_stats(const StatsTensor* tensors, const StatsItem* items, int64_t num_items,
                       int num_refs, double* partials, const StatsSplit* splits,
                       int64_t num_splits, double* out, void* stream) {
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  if (num_items > 0) {
    const StatsKernel kernel = kStatsKernels[num_refs];
    TK_LAUNCH(kernel, static_cast<unsigned>(num_items), kThreads, s, tensors, items, partials, out);
    if (cudaError_t e = cudaGetLastError(); e != cudaSuccess) return static_cast<int>(e);
  }
  if (num_splits > 0) {
    const unsigned blocks = static_cast<unsigned>((num_splits + kThreads - 1) / kThreads);
    TK_LAUNCH(sum_partials_kernel, blocks, kThreads, s, partials, splits, num_splits,
              2 + 2 * num_refs, out);
  }
  return static_cast<int>(cudaGetLastError());
}

}  // namespace trace_kernels::cuda
