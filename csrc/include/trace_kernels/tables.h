// What a multi-tensor launch knows about each tensor: one struct per op, shared by the CPU
// and the CUDA kernels (plain data, usable in device code). The bindings fill them from the
// rows the Python side builds (csrc/bindings/table_layout.h, trace_kernels/backends/_layout.py).
#pragma once

#include <cstdint>

#include "trace_kernels/adamw_math.h"
#include "trace_kernels/float_convert.h"

namespace trace_kernels {

// Most reference updates one delta_stats call compares against (ops.MAX_REFS).
constexpr int kMaxRefs = 16;

// One parameter of a masked (or, with fisher, dense probe) AdamW step. State arrays hold
// num_blocks * block_size fp32 values in mask order; indices are the selected block
// numbers, sorted and unique.
struct MaskedTensor {
  void* param;
  const void* grad;
  float* exp_avg;
  float* exp_avg_sq;
  float* max_exp_avg_sq;  // null unless amsgrad
  float* fisher;          // null, or fp32 accumulators in state order: fisher += scale * g^2
  float* master;          // null, or fp32 master values of the core in state order
  const void* indices;
  int64_t num_blocks;     // selected blocks
  int64_t block_size;
  int64_t numel;          // elements of the parameter's storage (indices are checked against it)
  int64_t elem_base;      // index in the whole parameter of the storage's first element
  int32_t indices_int64;
  DType dtype;            // of param and grad
  const void* step;       // the parameter's step counter, or null (step_value holds the step);
  int32_t step_fp64;      //   what the backend does with it is the backend's (see the bindings)
  double step_value;
  AdamWCoeffs coeffs;     // made on the host for step_value
};

// One tensor of a delta_stats pass: d = post - pre (or post), its Fisher diagonal and R
// reference updates, blocks of block_size elements written from row first_row.
struct StatsTensor {
  const void* post;
  const void* pre;        // same dtype as post, or null
  const float* fisher;    // or null (sums are then 0)
  const void* refs[kMaxRefs];
  DType ref_dtypes[kMaxRefs];
  DType dtype;            // of post and pre
  int64_t numel;
  int64_t block_size;
  int64_t first_row;
};

}  // namespace trace_kernels
