// CPU masked AdamW: the step over selected blocks only, with compact state.
#pragma once

#include <cstdint>
#include <vector>

#include "trace_kernels/tables.h"

namespace trace_kernels::cpu {

using trace_kernels::MaskedTensor;

// `grad_divisor` folds grad_scale and maximize: g / grad_divisor (±1 when unscaled).
// With `fisher` set on a tensor, the same pass also accumulates fisher_scale * g^2 there
// (the probe's fused step, `adamw_fisher_`: one block covering the whole tensor); with
// `master` set, the update is applied to those fp32 values and the parameter gets them
// rounded. `stochastic`: bf16 parameters are rounded stochastically with each tensor's
// coeffs.round_key (rounding.h).
void masked_adamw(const std::vector<MaskedTensor>& tensors, float grad_divisor, float fisher_scale,
                  bool stochastic, int num_threads);

// Checks that indices are strictly increasing and below `limit`.
// Returns -1 when valid, else the first offending position.
struct IndexError {
  int64_t position;  // -1: none
  int kind;          // 0 none, 1 negative or out of range, 2 not strictly increasing
};
IndexError check_block_indices(const void* indices, bool int64, int64_t count, int64_t limit,
                               int num_threads);

}  // namespace trace_kernels::cpu
