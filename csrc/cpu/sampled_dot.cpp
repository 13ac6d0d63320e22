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

// Sixteen floats: kLanes partial sums are four of these, held in registers (GCC's generic
// vectors: one zmm on AVX-512, two ymm on AVX2, lowered to scalars on the default clone;
// each lane's arithmetic is the same on all of them).
typedef float Vec16 __attribute__((vector_size(64)));
constexpr int kVecs = kLanes / 16;
static_assert(kVecs == 4, "the fold below is written for 64 lanes");
constexpr int kGroup = 4;  // dot products sharing one x: 16 accumulators, x loaded once

__attribute__((always_inline)) inline Vec16 load16(const float* p) {
  Vec16 v;
  __builtin_memcpy(&v, p, sizeof v);
  return v;
}

// Sixteen int32 lanes, as Vec16 has sixteen floats: a tail's lane numbers and mask.
typedef int32_t Int16 __attribute__((vector_size(64)));

// Σ x[t]·ys[g][t] for t < len and g < n (n ≤ kGroup), each in a fixed order whatever the
// ISA or the grouping: lane l sums t ≡ l (mod kLanes) in order, tail tokens included, then
// the lanes are folded in halves. The tail (len mod kLanes tokens) is added in lanes under a
// mask, not one token after another: a scalar chain of up to 63 dependent adds cost more than
// the whole vector loop (a 688-token batch ends in a 48-token tail). Its loads may read up to
// kLanes − 1 floats past len: the callers' buffers leave that slack; what lies there is masked.
// `next`: the columns the following call reads, fetched into cache meanwhile (a column is a
// few dozen lines: too short for the hardware prefetcher to warm up on).
template <int N>
__attribute__((always_inline)) inline void dots_fixed(const float* x, const float* const* ys, int64_t len,
                                                      const float* const* next, int n_next, float* res) {
  Vec16 part[N][kVecs] = {};
  const int64_t whole = len - len % kLanes;
  for (int64_t t = 0; t < whole; t += kLanes) {
    for (int g = 0; g < n_next; ++g) {
      for (int v = 0; v < kVecs; ++v) __builtin_prefetch(next[g] + t + 16 * v);
    }
    for (int v = 0; v < kVecs; ++v) {
      const Vec16 xv = load16(x + t + 16 * v);
      for (int g = 0; g < N; ++g) part[g][v] += xv * load16(ys[g] + t + 16 * v);
    }
  }
  if (whole < len) {
    const Int16 lane = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
    const int32_t rest = static_cast<int32_t>(len - whole);
    for (int v = 0; v < kVecs; ++v) {
      const Int16 in = lane + 16 * v < rest;
      const Vec16 xv = load16(x + whole + 16 * v);
      for (int g = 0; g < N; ++g) part[g][v] = in ? part[g][v] + xv * load16(ys[g] + whole + 16 * v) : part[g][v];
    }
  }
  for (int g = 0; g < N; ++g) {
    // the halves fold 32 and 16 lanes apart as whole vectors, then 8, 4, 2, 1 within one
    Vec16 v = (part[g][0] + part[g][2]) + (part[g][1] + part[g][3]);
    v += __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15, 8, 9, 10, 11, 12, 13, 14, 15);
    v += __builtin_shufflevector(v, v, 4, 5, 6, 7, 4, 5, 6, 7, 4, 5, 6, 7, 4, 5, 6, 7);
    v += __builtin_shufflevector(v, v, 2, 3, 2, 3, 2, 3, 2, 3, 2, 3, 2, 3, 2, 3, 2, 3);
    v += __builtin_shufflevector(v, v, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1);
    res[g] = v[0];
  }
}

// Rows of a transposed per tile: kTileRows rows' token blocks, read 64 bytes per token.
constexpr int64_t kTileRows = 16;

// Entries [begin, end) over one token block. a's rows come from a tile of kTileRows rows
// transposed once (entries arrive sorted by row: a tile serves many entries; any order is
// correct); b's columns from the packed block; kGroup entries of one row at a time.
TK_CPU_CLONES
void block_dots(const float* a, int64_t a_width, int64_t t0, int64_t len, const float* packed,
                int64_t block, const int64_t* rows, const int64_t* cols, int64_t begin, int64_t end,
                float* tile, float* out) {
  int64_t tile_row = -1;
  int64_t i = begin;
  while (i < end) {
    const int64_t row = rows[i];
    if (row - row % kTileRows != tile_row) {
      tile_row = row - row % kTileRows;
      const int64_t n = tile_row + kTileRows < a_width ? kTileRows : a_width - tile_row;
      for (int64_t t = 0; t < len; ++t) {
        const float* src = a + (t0 + t) * a_width + tile_row;
        for (int64_t r = 0; r < n; ++r) tile[r * block + t] = src[r];
      }
    }
    const float* x = tile + (row - tile_row) * block;
    int64_t run = i + 1;
    while (run < end && run - i < kGroup && rows[run] == row) ++run;
    const float* ys[kGroup];
    const float* next[kGroup];
    float res[kGroup];
    for (int64_t j = i; j < run; ++j) ys[j - i] = packed + cols[j] * block;
    int n_next = 0;
    for (int64_t j = run; j < end && j < run + kGroup && rows[j] == row; ++j) next[n_next++] = packed + cols[j] * block;
    switch (run - i) {
      case 4: dots_fixed<4>(x, ys, len, next, n_next, res); break;
      case 3: dots_fixed<3>(x, ys, len, next, n_next, res); break;
      case 2: dots_fixed<2>(x, ys, len, next, n_next, res); break;
      default: dots_fixed<1>(x, ys, len, next, n_next, res); break;
    }
    for (int64_t j = i; j < run; ++j) out[j] += res[j - i];
    i = run;
  }
}

}  // namespace

void sampled_dot_token_major(const float* a, int64_t a_width, const float* b, int64_t b_width,
                             int64_t length, const int64_t* rows, const int64_t* cols,
                             int64_t count, float* out, int num_threads) {
  for (int64_t i = 0; i < count; ++i) out[i] = 0.0f;
  if (count == 0 || length == 0) return;
  const int64_t block = token_block(b_width, length);
  // kLanes floats of slack after the last column and tile row: a tail's masked loads
  std::vector<float> packed(static_cast<size_t>(b_width * block + kLanes));
  int team = num_threads;
  if (count * length < (int64_t{1} << 16)) team = 1;  // waking a team costs more than the work
  auto work = [&](int64_t tid, int64_t nt) {
    std::vector<float> tile(static_cast<size_t>(kTileRows * block + kLanes));
    for (int64_t t0 = 0; t0 < length; t0 += block) {
      const int64_t len = t0 + block < length ? block : length - t0;
      pack_columns(b, b_width, t0, len, b_width * tid / nt, b_width * (tid + 1) / nt, block, packed.data());
#ifdef _OPENMP
#pragma omp barrier
#endif
      block_dots(a, a_width, t0, len, packed.data(), block, rows, cols, count * tid / nt,
                 count * (tid + 1) / nt, tile.data(), out);
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
