// CUDA kernels of trace_kernels: launchers callable from host code without CUDA headers
// leaking beyond the types below. Every launcher returns the CUDA error of its launch.
#pragma once

#include <cstdint>

#include "trace_kernels/tables.h"

namespace trace_kernels::cuda {

using trace_kernels::MaskedTensor;
using trace_kernels::StatsTensor;

// What the kernel needs to make a tensor's coefficients itself: the hyperparameters, and
// lr either here or (when lr_device is not null) as one fp64 value in device memory.
struct AdamWHyper {
  double lr;
  double beta1;
  double beta2;
  double eps;
  double weight_decay;
  const double* lr_device;
  int32_t on_device;      // 0: every tensor's coeffs were made on the host
  int32_t amsgrad;
};

// A tile of kTile compact positions of one tensor. `contiguous`: it lies inside one block.
struct Tile {
  int32_t tensor;
  int32_t contiguous;
  int64_t start;
};

constexpr int kThreads = 256;
constexpr int kItemsPerThread = 4;
constexpr int kTile = kThreads * kItemsPerThread;

// grad_scale / found_inf: device pointers to one fp32 value, or null. The divisor of the
// gradient is grad_sign * (*grad_scale) (or grad_sign when null), as in the CPU kernel.
// hyper.on_device: lr and/or the steps are read on the device (no host synchronisation).
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

int launch_delta_stats(const StatsTensor* tensors, const StatsItem* items, int64_t num_items,
                       int num_refs, double* partials, const StatsSplit* splits,
                       int64_t num_splits, double* out, void* stream);

}  // namespace trace_kernels::cuda
