// Specificity at element level: each element's cosine with earlier updates, where a block
// is one element (the cosine of two numbers: their signs' agreement, or 0 where a square
// underflows), the largest over the references, with no per-reference temporary.
#pragma once

#include <cstdint>

namespace trace_kernels::cpu {

// out[i] = max over r < num_refs of c_r, c_r = dot / max(den, 1e-300) where den > 0 else 0,
// with dot = d·ref_r, den = sqrt(d² · ref_r²): the products in fp32 (as delta_stats' element
// sums), the rest in fp64. NaN if any c_r is NaN. Elementwise: the bits do not depend on the
// thread count.
void element_max_cosine(const float* d, const float* const* refs, int num_refs, int64_t n, double* out,
                        int num_threads);

}  // namespace trace_kernels::cpu
