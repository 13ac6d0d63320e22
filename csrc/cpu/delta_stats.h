// CPU scoring pass: per-block sums of an update, its Fisher mass and its agreement with
// reference updates, in one read of each input and no parameter-sized temporary.
#pragma once

#include <cstdint>
#include <vector>

#include "trace_kernels/tables.h"

namespace trace_kernels::cpu {

using trace_kernels::StatsTensor;

// For every block b of every tensor (rows first_row + b), with d = post - pre:
//   sum_sq[row] = Σ d²,  fisher_sum[row] = Σ fisher,
//   dots[row*R + r] = Σ d·ref_r,  ref_sq[row*R + r] = Σ ref_r²
// accumulated in fp64 and rounded once to fp32. Work is cut into fixed segments and
// partial sums are combined in a fixed order, so the bits do not depend on the thread count.
void delta_stats(const std::vector<StatsTensor>& tensors, int num_refs, float* sum_sq,
                 float* fisher_sum, float* dots, float* ref_sq, int num_threads);

}  // namespace trace_kernels::cpu
