// CPU masked AdamW: the step over selected blocks only, with compact state.
#pragma once

#include <cstdint>
#include <vector>

#include "trace_kernels/adamw_math.h"
#include "trace_kernels/float_convert.h"

namespace trace_kernels::cpu {

// One parameter's view for the step. State arrays hold num_blocks * block_size fp32 values
// in mask order; indices are the selected block numbers, sorted and unique.
struct MaskedTensor {
  void* param;
  const void* grad;
  float* exp_avg;
  float* exp_avg_sq;
  float* max_exp_avg_sq;  // null unless amsgrad
  const void* indices;
  bool indices_int64;
  int64_t num_blocks;     // selected blocks
  int64_t block_size;
  DType dtype;            // of param and grad
  AdamWCoeffs coeffs;
  float* fisher;          // null, or fp32 accumulators in state order: fisher += scale * g^2
};

// `grad_divisor` folds grad_scale and maximize: g / grad_divisor (±1 when unscaled).
// With `fisher` set on a tensor, the same pass also accumulates fisher_scale * g^2 there
// (the probe's fused step, `adamw_fisher_`: one block covering the whole tensor).
void masked_adamw(const std::vector<MaskedTensor>& tensors, float grad_divisor, float fisher_scale,
                  int num_threads);

// Checks that indices are strictly increasing and below `limit`.
// Returns -1 when valid, else the first offending position.
struct IndexError {
  int64_t position;  // -1: none
  int kind;          // 0 none, 1 negative or out of range, 2 not strictly increasing
};
IndexError check_block_indices(const void* indices, bool int64, int64_t count, int64_t limit,
                               int num_threads);

}  // namespace trace_kernels::cpu
