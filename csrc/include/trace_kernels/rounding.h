// Writing an fp32 result into a 16-bit parameter: to nearest even (float_convert.h), or
// stochastically for bf16 — rounded up with probability (dropped bits) / 2^16, so the
// rounding is unbiased and small updates survive in expectation.
//
// The random bits are a hash of (seed, step, element): the same on every backend, every
// thread count and every sharding (the element is its index in the whole parameter), so a
// seeded run is repeatable bit for bit. trace_kernels/backends/reference.py computes them
// with the same integer steps.
#pragma once

#include <cstdint>

#include "trace_kernels/float_convert.h"

namespace trace_kernels {

// Wellons' "lowbias32" integer hash.
TK_HD uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7feb352du;
  x ^= x >> 15;
  x *= 0x846ca68bu;
  x ^= x >> 16;
  return x;
}

// One tensor's key for one step (`step` already incremented, a whole number).
TK_HD uint32_t round_key(uint64_t seed, double step) {
  const uint32_t s = static_cast<uint32_t>(static_cast<uint64_t>(step));
  return mix32(static_cast<uint32_t>(seed) ^ mix32(static_cast<uint32_t>(seed >> 32) ^ mix32(s)));
}

// The 16 random bits of element `e` of the parameter.
TK_HD uint32_t round_bits(uint32_t key, int64_t e) {
  const uint64_t u = static_cast<uint64_t>(e);
  return mix32(key ^ static_cast<uint32_t>(u) ^ mix32(static_cast<uint32_t>(u >> 32) + 0x9e3779b9u)) & 0xFFFFu;
}

TK_HD uint16_t float_to_bf16_stochastic(float f, uint32_t bits16) {
  const uint32_t u = float_bits(f);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return 0x7FC0;          // NaN: the canonical quiet NaN
  if ((u & 0x7FFFFFFFu) == 0x7F800000u) return static_cast<uint16_t>(u >> 16);  // ±inf stays
  return static_cast<uint16_t>((u + bits16) >> 16);            // the magnitude, rounded up or down
}

// Store `v` to parameter element `e`: nearest even, or stochastic when `stochastic` (bf16).
TK_HD void store_param(float* p, float v, bool, uint32_t, int64_t) { *p = v; }
TK_HD void store_param(fp16_t* p, float v, bool, uint32_t, int64_t) { p->x = float_to_fp16(v); }
TK_HD void store_param(bf16_t* p, float v, bool stochastic, uint32_t key, int64_t e) {
  p->x = stochastic ? float_to_bf16_stochastic(v, round_bits(key, e)) : float_to_bf16(v);
}

// Where an element's update starts when its tensor keeps fp32 masters: the master while the
// weight still holds exactly what the last step wrote from it (rounded to nearest even, or
// stochastically with that step's key `prev_key`); otherwise the weight, which something
// other than the optimizer wrote since (a `.data` copy, a loaded checkpoint, an EMA swap).
// The weight is the source of truth, so no write to it can be undone by a stale master,
// whichever way it was made. fp32 parameters keep no masters.
TK_HD float master_or_weight(const float*, float master, bool, uint32_t, int64_t) { return master; }
TK_HD float master_or_weight(const fp16_t* p, float master, bool, uint32_t, int64_t) {
  return float_to_fp16(master) == p->x ? master : fp16_to_float(p->x);
}
TK_HD float master_or_weight(const bf16_t* p, float master, bool stochastic, uint32_t prev_key, int64_t e) {
  const uint16_t wrote = stochastic ? float_to_bf16_stochastic(master, round_bits(prev_key, e))
                                    : float_to_bf16(master);
  return wrote == p->x ? master : bf16_to_float(p->x);
}

}  // namespace trace_kernels
