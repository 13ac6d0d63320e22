// CUDA kernels of trace_kernels: the launchers and the plans they run, callable from host
// code without CUDA headers leaking beyond the types below. Every launcher returns the CUDA
// error of its launch. The same source runs on the CPU under csrc/cuda/host/ (the tests'
// stand-in for the runtime), so plans and indexing are tested without a GPU.
#pragma once

#include <cstdint>
#include <vector>

#include "trace_kernels/tables.h"

namespace trace_kernels::cuda {

using trace_kernels::MaskedTensor;
using trace_kernels::StatsTensor;

// What the kernel needs to make each tensor's AdamW coefficients itself (one thread per
// thread block, the shared make_adamw_coeffs): the hyperparameters, lr here or (when
// lr_device is not null) as one fp64 value in device memory, and each tensor's step. A
// tensor's step is its `step` pointer (fp32, or fp64 with step_fp64) if set, else
// step_values[tensor]; either way the value before this step: the kernel adds 1, and the
// caller advances the counters only once the launch succeeded.
struct AdamWHyper {
  double lr;
  const double* lr_device;
  double beta1;
  double beta2;
  double eps;
  double weight_decay;
  const double* step_values;  // device array, one per tensor (tensors without a step pointer)
  int32_t amsgrad;
  int32_t stochastic;         // bf16 parameters rounded stochastically, keyed by seed and step
  uint64_t seed;
};

// A tile of up to kTile compact positions of one tensor. `contiguous`: it lies inside one
// block (blocks of kTile elements or more), so its elements are consecutive in the parameter.
struct Tile {
  int32_t tensor;
  int32_t contiguous;
  int64_t start;
};

constexpr int kThreads = 256;
constexpr int kItemsPerThread = 4;
constexpr int kTile = kThreads * kItemsPerThread;

// Tiles over the selected elements of tensors whose blocks have `block_sizes` elements and
// `num_blocks` selected blocks. A block of kTile elements or more is cut into tiles that
// never cross its end.
std::vector<Tile> plan_tiles(const std::vector<int64_t>& block_sizes,
                             const std::vector<int64_t>& num_blocks);

// grad_scale / found_inf: device pointers to one fp32 value, or null. The divisor of the
// gradient is grad_sign * (*grad_scale) (or grad_sign when null). A non-zero *found_inf
// (any value: GradScaler passes the sum over devices) skips the whole step.
int launch_masked_adamw(const MaskedTensor* tensors, const Tile* tiles, int64_t num_tiles,
                        float grad_sign, const float* grad_scale, const float* found_inf,
                        float fisher_scale, bool amsgrad, bool fisher, const AdamWHyper& hyper,
                        void* stream);

// delta_stats: work items over (tensor, element range). Items with partial >= 0 write a
// partial row for stage two; others hold whole blocks and write output rows directly.
struct StatsItem {
  int32_t tensor;
  int64_t begin;          // first element
  int64_t end;            // one past the last element
  int64_t partial;        // -1: whole blocks [begin, end) written to their rows
};

struct StatsSplit {
  int64_t row;            // output row
  int64_t first_partial;
  int64_t count;
};

// Blocks up to this size: one thread sums a whole block (256 blocks per item). Longer
// blocks: one item per segment of kStatsSegment elements, then stage two adds the partials.
constexpr int64_t kStatsShortBlock = 32;
constexpr int64_t kStatsSegment = int64_t{1} << 14;

struct StatsPlan {
  std::vector<StatsItem> items;
  std::vector<StatsSplit> splits;
  int64_t num_partials = 0;
  int64_t num_rows = 0;
};

StatsPlan plan_stats(const std::vector<int64_t>& numels, const std::vector<int64_t>& block_sizes);

int launch_delta_stats(const StatsTensor* tensors, const StatsItem* items, int64_t num_items,
                       int num_refs, double* partials, const StatsSplit* splits,
                       int64_t num_splits, double* out, void* stream);

}  // namespace trace_kernels::cuda
