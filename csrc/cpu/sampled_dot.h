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

// The same products with both operands token-major, as a linear layer's backward holds them:
// out[i] = Σ_t a[t·a_width + rows[i]] · b[t·b_width + cols[i]] for t < length (a: length ×
// a_width, b: length × b_width, row-major). Sums over token blocks of a size fixed by
// b_width, each block's sum in one order: the result does not depend on the thread count.
void sampled_dot_token_major(const float* a, int64_t a_width, const float* b, int64_t b_width,
                             int64_t length, const int64_t* rows, const int64_t* cols,
                             int64_t count, float* out, int num_threads);

}  // namespace trace_kernels::cpu
