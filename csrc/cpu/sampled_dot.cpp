#include "sampled_dot.h"

#include <vector>

#include "isa_dispatch.h"
#include "parallel.h"

namespace trace_kernels::cpu {
namespace {

// Dot products per chunk: enough to amortise scheduling, few enough to balance two threads.
constexpr int64_t kChunkItems = 1 << 10;

// Entries arrive sorted by row (a weight's flat indices), so a's vector stays in L1 across
// a row's entries and b's vectors stream from L2/L3; tiling the length was measured slower.
TK_CPU_CLONES
void dot_range(const float* a, const float* b, int64_t length, const int64_t* rows,
               const int64_t* cols, int64_t begin, int64_t end, float* out) {
  for (int64_t i = begin; i < end; ++i) {
    const float* x = a + rows[i] * length;
    const float* y = b + cols[i] * length;
    float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
    for (int64_t t = 0; t < length; ++t) acc += x[t] * y[t];
    out[i] = acc;
  }
}

}  // namespace

void sampled_dot(const float* a, const float* b, int64_t length, const int64_t* rows,
                 const int64_t* cols, int64_t count, float* out, int num_threads) {
  const std::vector<Chunk> chunks = make_chunks({count}, kChunkItems);
  parallel_chunks(static_cast<int64_t>(chunks.size()), count * length, num_threads,
                  [&](int64_t first, int64_t last) {
                    for (int64_t c = first; c < last; ++c) {
                      dot_range(a, b, length, rows, cols, chunks[c].begin, chunks[c].end, out);
                    }
                  });
}

}  // namespace trace_kernels::cpu
