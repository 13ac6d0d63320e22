// Sampled products: selected entries of A·Bᵀ without the rest of the product, for weight
// gradients of element-level cores (the gradient of W[r, c] is the dot product of the
// output gradient's column r with the input's column c over all tokens).
#pragma once

#include <cstdint>

namespace trace_kernels::cpu {

// out[i] = Σ_t a[rows[i]·length + t] · b[cols[i]·length + t] for i < count: a and b hold
// their vectors as contiguous rows of `length` floats. Each dot product is summed in one
// fixed order (per ISA clone), whatever the thread count.
void sampled_dot(const float* a, const float* b, int64_t length, const int64_t* rows,
                 const int64_t* cols, int64_t count, float* out, int num_threads);

}  // namespace trace_kernels::cpu
