// CPU scoring pass: per-block sums of an update, its Fisher mass and its agreement with
// reference updates, in one read of each input and no parameter-sized temporary.
#pragma once

#include <cstdint>
#include <vector>

#include "trace_kernels/float_convert.h"

namespace trace_kernels::cpu {

constexpr int kMaxRefs = 16;

struct DeltaStatsTensor {
  const void* post;          // probed weights, or the update itself when pre is null
  const void* pre;           // weights before the probe (same dtype as post), or null
  DType dtype;               // of post and pre
  const float* fisher;       // fp32 Fisher diagonal, or null (sums are then 0)
  const void* refs[kMaxRefs];
  DType ref_dtypes[kMaxRefs];
  int64_t numel;
  int64_t block_size;
  int64_t first_row;         // row of this tensor's first block in the outputs
};

// For every block b of every tensor (rows first_row + b), with d = post - pre:
//   sum_sq[row] = Σ d²,  fisher_sum[row] = Σ fisher,
//   dots[row*R + r] = Σ d·ref_r,  ref_sq[row*R + r] = Σ ref_r²
// accumulated in fp64 and rounded once to fp32. Work is cut into fixed segments and
// partial sums are combined in a fixed order, so the bits do not depend on the thread count.
void delta_stats(const std::vector<DeltaStatsTensor>& tensors, int num_refs, float* sum_sq,
                 float* fisher_sum, float* dots, float* ref_sq, int num_threads);

}  // namespace trace_kernels::cpu
