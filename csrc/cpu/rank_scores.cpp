#include "rank_scores.h"

#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "isa_dispatch.h"
#include "parallel.h"

namespace trace_kernels::cpu {
namespace {

// Elements per chunk: each chunk keeps its own candidates, joined in order afterwards.
constexpr int64_t kChunk = 1 << 16;
// Elements scored at a time into a stack buffer before the candidates are picked out.
constexpr int64_t kTile = 1024;

// The bin of v: the top `bits` bits of its order key (as ops.rank_bin gives it).
inline int64_t bin_of(float v, int shift, int64_t half) {
  v = v + 0.0f;  // -0 → +0 (not folded away: -ffp-contract=off and no fast-math)
  int32_t key;
  std::memcpy(&key, &v, sizeof key);
  if (key < 0) key ^= std::numeric_limits<int32_t>::max();
  return static_cast<int64_t>(key >> shift) + half;
}

struct Found {
  int64_t finite = 0;
  std::vector<int64_t> index;
  std::vector<double> value;
};

TK_CPU_CLONES
void score_range(const RankScoresArgs& a, int64_t begin, int64_t end, Found& out) {
  const int shift = 32 - a.bits;
  const int64_t half = int64_t{1} << (a.bits - 1);
  const double inf = std::numeric_limits<double>::infinity();
  double s[kTile];
  for (int64_t off = begin; off < end; off += kTile) {
    const int64_t n = end - off < kTile ? end - off : kTile;
    for (int64_t i = 0; i < n; ++i) {
      s[i] = a.x_ranks[bin_of(a.x[off + i], shift, half)];
      s[i] += a.y_ranks[bin_of(a.y[off + i], shift, half)];
      s[i] *= 0.5;
    }
    for (const double* f : a.factors) {
      if (f == nullptr) continue;
      for (int64_t i = 0; i < n; ++i) s[i] *= f[off + i];
    }
    if (a.excluded != nullptr) {
      for (int64_t i = 0; i < n; ++i) {
        if (a.excluded[off + i]) s[i] = -inf;
      }
    }
    for (int64_t i = 0; i < n; ++i) {
      if (!std::isfinite(s[i])) continue;
      ++out.finite;
      if (s[i] >= a.floor) {
        out.index.push_back(off + i);
        out.value.push_back(s[i]);
      }
    }
  }
}

}  // namespace

// One thread: the table is MBs, too large to keep a copy per thread and merge per tensor,
// and the scan is a fraction of the scoring pass.
TK_CPU_CLONES
void rank_counts(const float* x, int64_t n, int bits, int64_t* counts) {
  const int shift = 32 - bits;
  const int64_t half = int64_t{1} << (bits - 1);
  for (int64_t i = 0; i < n; ++i) ++counts[bin_of(x[i], shift, half)];
}

int64_t rank_scores(const RankScoresArgs& args, int64_t* index, double* value, int64_t* kept,
                    int num_threads) {
  const int64_t chunks = (args.n + kChunk - 1) / kChunk;
  std::vector<Found> found(static_cast<size_t>(chunks));
  parallel_chunks(chunks, args.n, num_threads, [&](int64_t first, int64_t last) {
    for (int64_t c = first; c < last; ++c) {
      const int64_t b = c * kChunk;
      score_range(args, b, b + kChunk < args.n ? b + kChunk : args.n, found[c]);
    }
  });
  int64_t finite = 0;
  int64_t at = 0;
  for (const Found& f : found) {
    finite += f.finite;
    const int64_t m = static_cast<int64_t>(f.index.size());
    if (m) {
      std::memcpy(index + at, f.index.data(), m * sizeof(int64_t));
      std::memcpy(value + at, f.value.data(), m * sizeof(double));
    }
    at += m;
  }
  *kept = at;
  return finite;
}

}  // namespace trace_kernels::cpu
