#include "sampled_dot.h"

#include <cstddef>
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

// A token block of b, transposed, is at most this many bytes: it stays in a core's L2 while
// every entry of the block is summed (fewer, longer blocks: fewer partial sums to fold).
constexpr int64_t kPackBytes = 1 << 20;
// Partial sums per dot product: independent chains, so the adds' latency is hidden (one
// chain was latency-bound at a quarter of the L2's pace).
constexpr int64_t kLanes = 64;

int64_t token_block(int64_t b_width, int64_t length) {
  int64_t t = kPackBytes / (4 * (b_width > 0 ? b_width : 1));
  t = t < kLanes ? kLanes : t - t % kLanes;
  return t < length ? t : length;
}

// Columns [c0, c1) of tokens [t0, t0 + len) of b, transposed into packed (column c at
// packed + c·block).
TK_CPU_CLONES
void pack_columns(const float* b, int64_t b_width, int64_t t0, int64_t len, int64_t c0, int64_t c1,
                  int64_t block, float* packed) {
  constexpr int64_t kTile = 16;
  for (int64_t cb = c0; cb < c1; cb += kTile) {
    const int64_t ce = cb + kTile < c1 ? cb + kTile : c1;
    for (int64_t t = 0; t < len; ++t) {
      const float* src = b + (t0 + t) * b_width;
      for (int64_t c = cb; c < ce; ++c) packed[c * block + t] = src[c];
    }
  }
}

// Σ x[t]·y[t] for t < len, in a fixed order whatever the ISA: lane l sums t ≡ l (mod
// kLanes) in order, the lanes are folded in halves, the tail added last in order.
inline float dot_fixed(const float* x, const float* y, int64_t len) {
  float part[kLanes] = {};
  const int64_t whole = len - len % kLanes;
  for (int64_t t = 0; t < whole; t += kLanes) {
#pragma omp simd
    for (int64_t l = 0; l < kLanes; ++l) part[l] += x[t + l] * y[t + l];
  }
  for (int64_t half = kLanes / 2; half > 0; half /= 2) {
#pragma omp simd
    for (int64_t l = 0; l < half; ++l) part[l] += part[l + half];
  }
  float acc = part[0];
  for (int64_t t = whole; t < len; ++t) acc += x[t] * y[t];
  return acc;
}

// Entries [begin, end) over one token block: a's column gathered once per row (entries
// arrive sorted by row), b's from the packed block.
TK_CPU_CLONES
void block_dots(const float* a, int64_t a_width, int64_t t0, int64_t len, const float* packed,
                int64_t block, const int64_t* rows, const int64_t* cols, int64_t begin, int64_t end,
                float* column, float* out) {
  int64_t last = -1;
  for (int64_t i = begin; i < end; ++i) {
    if (rows[i] != last) {
      last = rows[i];
      for (int64_t t = 0; t < len; ++t) column[t] = a[(t0 + t) * a_width + last];
    }
    out[i] += dot_fixed(column, packed + cols[i] * block, len);
  }
}

}  // namespace

void sampled_dot_token_major(const float* a, int64_t a_width, const float* b, int64_t b_width,
                             int64_t length, const int64_t* rows, const int64_t* cols,
                             int64_t count, float* out, int num_threads) {
  for (int64_t i = 0; i < count; ++i) out[i] = 0.0f;
  if (count == 0 || length == 0) return;
  const int64_t block = token_block(b_width, length);
  std::vector<float> packed(static_cast<size_t>(b_width * block));
  int team = num_threads;
  if (count * length < (int64_t{1} << 16)) team = 1;  // waking a team costs more than the work
  auto work = [&](int64_t tid, int64_t nt) {
    std::vector<float> column(static_cast<size_t>(block));
    for (int64_t t0 = 0; t0 < length; t0 += block) {
      const int64_t len = t0 + block < length ? block : length - t0;
      pack_columns(b, b_width, t0, len, b_width * tid / nt, b_width * (tid + 1) / nt, block, packed.data());
#ifdef _OPENMP
#pragma omp barrier
#endif
      block_dots(a, a_width, t0, len, packed.data(), block, rows, cols, count * tid / nt,
                 count * (tid + 1) / nt, column.data(), out);
#ifdef _OPENMP
#pragma omp barrier
#endif
    }
  };
#ifdef _OPENMP
  if (team > 1) {
#pragma omp parallel num_threads(team)
    work(omp_get_thread_num(), omp_get_num_threads());
    return;
  }
#endif
  work(0, 1);
}

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
