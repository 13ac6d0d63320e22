// The AdamW update of one element: the single source of the formula for every native kernel.
//
// It follows torch.optim.AdamW (decoupled weight decay) operation by operation, in fp32,
// with scalars derived in double exactly as torch's Python code derives them and then
// rounded to float, as ATen does when a Python scalar meets an fp32 tensor:
//   p = p * (1 - lr*wd)
//   m = lerp(m, g, 1 - beta1)
//   v = v * beta2 + ((1 - beta2) * g) * g              (addcmul)
//   vmax = max(vmax, v)                                 (amsgrad only)
//   p = p + ((-lr / (1 - beta1^t)) * m) / (sqrt(v) / sqrt(1 - beta2^t) + eps)   (addcdiv)
// Kernels are compiled with -ffp-contract=off so every ISA gives the same bits.
#pragma once

#include <cmath>
#include <cstdint>

#include "trace_kernels/macros.h"

namespace trace_kernels {

struct AdamWCoeffs {
  float decay;            // 1 - lr * weight_decay
  float lerp_weight;      // 1 - beta1
  float lerp_weight_c;    // 1 - lerp_weight, for ATen's lerp branch at weight >= 0.5
  float beta2;
  float grad_sq_weight;   // 1 - beta2
  float bias_correction2_sqrt;
  float eps;
  float neg_step_size;    // -lr / (1 - beta1^step)
  bool has_decay;
  bool lerp_low;          // |lerp_weight| < 0.5
  bool amsgrad;
  uint32_t round_key;     // stochastic rounding's key of this step (rounding.h), else 0
  uint32_t prev_round_key;  // the key of the step before (what fp32 masters were last written with)
};

// Scalars of one step for one tensor, `step` already incremented (torch increments first).
// Host code calls it per tensor; the CUDA kernel calls it on the device when lr or the
// steps live in device memory.
TK_HD AdamWCoeffs make_adamw_coeffs(double lr, double beta1, double beta2, double eps,
                                     double weight_decay, double step, bool amsgrad) {
  AdamWCoeffs c;
  c.decay = static_cast<float>(1.0 - lr * weight_decay);
  c.has_decay = weight_decay != 0.0;
  c.lerp_weight = static_cast<float>(1.0 - beta1);
  c.lerp_weight_c = 1.0f - c.lerp_weight;
  c.lerp_low = std::fabs(c.lerp_weight) < 0.5f;
  c.beta2 = static_cast<float>(beta2);
  c.grad_sq_weight = static_cast<float>(1.0 - beta2);
  const double bias_correction1 = 1.0 - std::pow(beta1, step);
  const double bias_correction2 = 1.0 - std::pow(beta2, step);
  c.bias_correction2_sqrt = static_cast<float>(std::pow(bias_correction2, 0.5));
  c.eps = static_cast<float>(eps);
  c.neg_step_size = static_cast<float>(-(lr / bias_correction1));
  c.amsgrad = amsgrad;
  c.round_key = 0;
  c.prev_round_key = 0;
  return c;
}

// g is the gradient already unscaled and negated for maximize. kAmsgrad fixed at compile
// time (callers that know it): the loop then has no store behind a run-time branch, which
// the vectoriser could only remove by unswitching the whole loop body (and stops doing once
// the body grows, e.g. with the Fisher stream).
template <bool kAmsgrad>
TK_HD void adamw_update_fixed(float& p, float g, float& m, float& v, float* vmax,
                              const AdamWCoeffs& c) {
  if (c.has_decay) p = p * c.decay;
  m = c.lerp_low ? m + c.lerp_weight * (g - m) : g - (g - m) * c.lerp_weight_c;
  v = v * c.beta2 + (c.grad_sq_weight * g) * g;
  float second = v;
  if (kAmsgrad) {
    // torch.maximum propagates NaN
    const float prev = *vmax;
    second = (v > prev || v != v) ? v : prev;
    *vmax = second;
  }
  const float denom = std::sqrt(second) / c.bias_correction2_sqrt + c.eps;
  p = p + (c.neg_step_size * m) / denom;
}

TK_HD void adamw_update(float& p, float g, float& m, float& v, float* vmax,
                        const AdamWCoeffs& c) {
  if (c.amsgrad) {
    adamw_update_fixed<true>(p, g, m, v, vmax, c);
  } else {
    adamw_update_fixed<false>(p, g, m, v, vmax, c);
  }
}

}  // namespace trace_kernels
