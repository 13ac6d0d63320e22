// Conversions between fp32 and the 16-bit parameter types, usable on host and device.
// Both round to nearest even, as torch's .to(dtype) does, so native kernels and the
// pure-PyTorch reference write the same bits.
#pragma once

#include <cstdint>
#include <cstring>

#include "trace_kernels/macros.h"

namespace trace_kernels {

TK_HD uint32_t float_bits(float f) {
#ifdef __CUDA_ARCH__
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
#endif
}

TK_HD float bits_float(uint32_t u) {
#ifdef __CUDA_ARCH__
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
#endif
}

// bfloat16 is the top half of an fp32; rounding adds 0x7FFF plus the lowest kept bit.
TK_HD float bf16_to_float(uint16_t h) { return bits_float(static_cast<uint32_t>(h) << 16); }

TK_HD uint16_t float_to_bf16(float f) {
  const uint32_t u = float_bits(f);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return 0x7FC0;  // any NaN becomes the canonical quiet NaN
  return static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

// IEEE half precision, by exponent re-biasing with float arithmetic doing the rounding
// (the branch-free method of the FP16 library), so subnormals and overflow round exactly.
TK_HD float fp16_to_float(uint16_t h) {
  const uint32_t w = static_cast<uint32_t>(h) << 16;
  const uint32_t sign = w & 0x80000000u;
  const uint32_t two_w = w + w;
  // Normal numbers: shift the exponent and mantissa into place, then rescale.
  const float normalized = bits_float((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
  // Subnormals: place the mantissa under a magic exponent and subtract it off.
  const float denormalized = bits_float((two_w >> 17) | (126u << 23)) - 0.5f;
  const uint32_t body = two_w < (1u << 27) ? float_bits(denormalized) : float_bits(normalized);
  return bits_float(sign | body);
}

TK_HD uint16_t float_to_fp16(float f) {
  // Scaling up then down lets the FPU round the mantissa to 10 bits (and flush to inf).
  float base = (bits_float(float_bits(f) & 0x7FFFFFFFu) * 0x1.0p+112f) * 0x1.0p-110f;
  const uint32_t w = float_bits(f);
  const uint32_t shl1_w = w + w;
  const uint32_t sign = w & 0x80000000u;
  uint32_t bias = shl1_w & 0xFF000000u;
  if (bias < 0x71000000u) bias = 0x71000000u;
  base = bits_float((bias >> 1) + 0x07800000u) + base;
  const uint32_t bits = float_bits(base);
  const uint32_t exp_bits = (bits >> 13) & 0x00007C00u;
  const uint32_t mantissa_bits = bits & 0x00000FFFu;
  const uint32_t nonsign = exp_bits + mantissa_bits;
  return static_cast<uint16_t>((sign >> 16) | (shl1_w > 0xFF000000u ? 0x7E00u : nonsign));
}

// Tag types so kernels can be templated on the stored parameter type.
struct bf16_t { uint16_t x; };
struct fp16_t { uint16_t x; };

TK_HD float load_as_float(const float* p) { return *p; }
TK_HD float load_as_float(const bf16_t* p) { return bf16_to_float(p->x); }
TK_HD float load_as_float(const fp16_t* p) { return fp16_to_float(p->x); }

TK_HD void store_from_float(float* p, float v) { *p = v; }
TK_HD void store_from_float(bf16_t* p, float v) { p->x = float_to_bf16(v); }
TK_HD void store_from_float(fp16_t* p, float v) { p->x = float_to_fp16(v); }

// Codes shared with the Python side (trace_kernels/backends/cpu.py).
enum class DType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

}  // namespace trace_kernels
