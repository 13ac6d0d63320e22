#include "element_cosine.h"

#include <cmath>

#include "isa_dispatch.h"
#include "parallel.h"

namespace trace_kernels::cpu {
namespace {

constexpr int64_t kChunk = 1 << 16;

TK_CPU_CLONES
void cosine_range(const float* d, const float* const* refs, int R, int64_t begin, int64_t end, double* out) {
  for (int64_t i = begin; i < end; ++i) {
    const float ss = d[i] * d[i];
    double best = 0.0;
    for (int r = 0; r < R; ++r) {
      const float ref = refs[r][i];
      const float dot = d[i] * ref;
      const float rs = ref * ref;
      const double den = std::sqrt(static_cast<double>(ss) * static_cast<double>(rs));
      const double c = den > 0 ? static_cast<double>(dot) / (den > 1e-300 ? den : 1e-300) : 0.0;
      if (r == 0 || std::isnan(c) || (!std::isnan(best) && c > best)) best = c;
    }
    out[i] = best;
  }
}

}  // namespace

void element_max_cosine(const float* d, const float* const* refs, int num_refs, int64_t n, double* out,
                        int num_threads) {
  const int64_t chunks = (n + kChunk - 1) / kChunk;
  parallel_chunks(chunks, n, num_threads, [&](int64_t first, int64_t last) {
    const int64_t end = last * kChunk < n ? last * kChunk : n;
    cosine_range(d, refs, num_refs, first * kChunk, end, out);
  });
}

}  // namespace trace_kernels::cpu
