// Qualifiers for the per-element math that the CPU and CUDA kernels share.
#pragma once

#if defined(__CUDACC__)
#define TK_HD __host__ __device__ __forceinline__
#else
#define TK_HD inline __attribute__((always_inline))
#endif
