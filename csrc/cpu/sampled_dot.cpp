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

// One stage of a 16 × 16 transpose: the off-diagonal B × B blocks of rows i and i + B swap
// (stages B = 8, 4, 2, 1 make the whole transpose). The lanes of the new rows i and i + B,
// taken from row i (0–15) or row i + B (16–31):
constexpr int lo_lane(int j, int B) { return (j & B) ? 16 + j - B : j; }
constexpr int hi_lane(int j, int B) { return (j & B) ? 16 + j : j + B; }
#define TK_LANES(f, B)                                                                                   \
  f(0, B), f(1, B), f(2, B), f(3, B), f(4, B), f(5, B), f(6, B), f(7, B), f(8, B), f(9, B), f(10, B), \
      f(11, B), f(12, B), f(13, B), f(14, B), f(15, B)
template <int B>
__attribute__((always_inline)) inline void transpose_stage(Vec16* v) {
  for (int i = 0; i < 16; ++i) {
    if (i & B) continue;
    const Vec16 x = v[i], y = v[i + B];
    v[i] = __builtin_shufflevector(x, y, TK_LANES(lo_lane, B));
    v[i + B] = __builtin_shufflevector(x, y, TK_LANES(hi_lane, B));
  }
}
#undef TK_LANES

// dst[c·dst_stride + t] = src[t·src_stride + c] for t < len, c < width (≤ 16). Whole 16 × 16
// blocks go through registers: sixteen lines loaded at once (rows of a token-major matrix lie
// a few KiB apart, so one line after another was bound by each miss's latency: over half the
// element path's time at low densities) and stored as sixteen whole vectors. Only data moves.
__attribute__((always_inline)) inline void transpose_strip(const float* src, int64_t src_stride, int64_t len,
                                                           int64_t width, float* dst, int64_t dst_stride) {
  int64_t t = 0;
  if (width == 16) {
    for (; t + 16 <= len; t += 16) {
      Vec16 v[16];
      for (int k = 0; k < 16; ++k) v[k] = load16(src + (t + k) * src_stride);
      transpose_stage<8>(v);
      transpose_stage<4>(v);
      transpose_stage<2>(v);
      transpose_stage<1>(v);
      for (int c = 0; c < 16; ++c) __builtin_memcpy(dst + c * dst_stride + t, &v[c], sizeof(Vec16));
    }
  }
  for (; t < len; ++t) {
    const float* row = src + t * src_stride;
    for (int64_t c = 0; c < width; ++c) dst[c * dst_stride + t] = row[c];
  }
}

// Columns [c0, c1) of tokens [t0, t0 + len) of b, transposed into packed (column c at
// packed + c·block), sixteen columns at a time.
TK_CPU_CLONES
void pack_columns(const float* b, int64_t b_width, int64_t t0, int64_t len, int64_t c0, int64_t c1,
                  int64_t block, float* packed) {
  for (int64_t cb = c0; cb < c1; cb += 16) {
    const int64_t width = cb + 16 < c1 ? 16 : c1 - cb;
    transpose_strip(b + t0 * b_width + cb, b_width, len, width, packed + cb * block, block);
  }
}

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
static_assert(kTileRows == 16, "a tile is filled by transpose_strip, at most 16 rows");

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
      transpose_strip(a + t0 * a_width + tile_row, a_width, len, n, tile, block);
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
