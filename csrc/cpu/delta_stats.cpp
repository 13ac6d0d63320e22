#include "delta_stats.h"

#include <algorithm>
#include <cstring>

#include "isa_dispatch.h"
#include "parallel.h"


namespace trace_kernels::cpu {
namespace {

// Elements per segment: a block longer than this is split into segments whose partial sums
// are added in order afterwards; shorter blocks are grouped whole into one segment.
constexpr int64_t kSegment = 1 << 14;
// Elements converted to fp32 at a time (fits L1 with a few references).
constexpr int64_t kTile = 512;
// Independent fp64 accumulators per sum: four 8-wide vectors, enough to hide the add
// latency; the number is fixed, so the summation order (and the bits) never change.
constexpr int kLanes = 32;

struct Segment {
  int64_t tensor;
  int64_t begin;        // element range [begin, end) inside the tensor
  int64_t end;
  int64_t partial;      // -1: whole blocks, results go straight to the outputs
};

// A tile of `src` as fp32: fp32 data is used in place, 16-bit data converted into `buf`.
TK_HD const float* tile_as_float(const void* src, DType dtype, int64_t offset, int64_t n,
                                 float* buf) {
  switch (dtype) {
    case DType::kFloat32:
      return static_cast<const float*>(src) + offset;
    case DType::kBFloat16: {
      const bf16_t* s = static_cast<const bf16_t*>(src) + offset;
      for (int64_t i = 0; i < n; ++i) buf[i] = load_as_float(s + i);
      return buf;
    }
    case DType::kFloat16: {
      const fp16_t* s = static_cast<const fp16_t*>(src) + offset;
      for (int64_t i = 0; i < n; ++i) buf[i] = load_as_float(s + i);
      return buf;
    }
  }
  return buf;
}

// a + x*y in fp64. The product of two floats is exact in fp64, so a fused multiply-add
// rounds exactly like multiply-then-add: the bits are the same on every ISA clone, and
// the clones with FMA save an instruction.
TK_HD double fma_exact(float x, float y, double a) {
  return __builtin_fma(static_cast<double>(x), static_cast<double>(y), a);
}

// acc[lane] += x[i]*y[i] with lane = i % kLanes (n is a multiple of kLanes or the range
// end). The accumulators are copied to locals so they stay in registers.
TK_HD void lane_dot(double* acc, const float* __restrict x, const float* __restrict y, int64_t n) {
  double a[kLanes];
  std::memcpy(a, acc, sizeof a);
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int l = 0; l < kLanes; ++l) a[l] = fma_exact(x[i + l], y[i + l], a[l]);
  }
  for (int l = 0; i < n; ++i, ++l) a[l] = fma_exact(x[i], y[i], a[l]);
  std::memcpy(acc, a, sizeof a);
}

TK_HD void lane_sum(double* acc, const float* __restrict x, int64_t n) {
  double a[kLanes];
  std::memcpy(a, acc, sizeof a);
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int l = 0; l < kLanes; ++l) a[l] += x[i + l];
  }
  for (int l = 0; i < n; ++i, ++l) a[l] += x[i];
  std::memcpy(acc, a, sizeof a);
}

// Pairwise, in a fixed order.
TK_HD double fold_lanes(const double* acc) {
  double t[kLanes];
  std::memcpy(t, acc, sizeof t);
  for (int width = kLanes / 2; width >= 1; width /= 2) {
    for (int l = 0; l < width; ++l) t[l] = t[l] + t[l + width];
  }
  return t[0];
}

// d = post - pre (or post) for one tile, in fp32.
TK_HD void tile_delta(const StatsTensor& t, int64_t off, int64_t n, float* d, float* pre_buf) {
  const float* post = tile_as_float(t.post, t.dtype, off, n, d);
  if (t.pre == nullptr) {
    if (post != d) std::memcpy(d, post, n * sizeof(float));
    return;
  }
  const float* pre = tile_as_float(t.pre, t.dtype, off, n, pre_buf);
  for (int64_t i = 0; i < n; ++i) d[i] = post[i] - pre[i];
}

// Sums over elements [begin, end) of one tensor (all in one block) into out[0..2+2R).
// Layout of out: sum_sq, fisher, dots[R], ref_sq[R].
TK_HD void block_sums(const StatsTensor& t, int R, int64_t begin, int64_t end, double* out) {
  alignas(64) float d[kTile];
  alignas(64) float pre_buf[kTile];
  alignas(64) float buf[kTile];
  double acc[2 + 2 * kMaxRefs][kLanes];
  const int used = 2 + 2 * R;
  for (int k = 0; k < used; ++k) std::memset(acc[k], 0, sizeof acc[k]);
  for (int64_t off = begin; off < end; off += kTile) {
    // Tiles are whole multiples of kLanes, so each element's lane is (i - begin) % kLanes.
    const int64_t n = std::min(kTile, end - off);
    tile_delta(t, off, n, d, pre_buf);
    lane_dot(acc[0], d, d, n);
    if (t.fisher != nullptr) lane_sum(acc[1], t.fisher + off, n);
    for (int r = 0; r < R; ++r) {
      const float* ref = tile_as_float(t.refs[r], t.ref_dtypes[r], off, n, buf);
      lane_dot(acc[2 + r], d, ref, n);
      lane_dot(acc[2 + R + r], ref, ref, n);
    }
  }
  for (int k = 0; k < used; ++k) out[k] = fold_lanes(acc[k]);
}

// Element-level blocks (B = 1): every sum is a single product, computed in fp32 directly.
TK_HD void element_sums(const StatsTensor& t, int R, int64_t begin, int64_t end,
                        float* sum_sq, float* fisher_sum, float* dots, float* ref_sq) {
  alignas(64) float d[kTile];
  alignas(64) float pre_buf[kTile];
  alignas(64) float buf[kTile];
  for (int64_t off = begin; off < end; off += kTile) {
    const int64_t n = std::min(kTile, end - off);
    const int64_t row = t.first_row + off;
    tile_delta(t, off, n, d, pre_buf);
    for (int64_t i = 0; i < n; ++i) sum_sq[row + i] = d[i] * d[i];
    for (int64_t i = 0; i < n; ++i) fisher_sum[row + i] = t.fisher ? t.fisher[off + i] : 0.0f;
    for (int r = 0; r < R; ++r) {
      const float* ref = tile_as_float(t.refs[r], t.ref_dtypes[r], off, n, buf);
      for (int64_t i = 0; i < n; ++i) dots[(row + i) * R + r] = d[i] * ref[i];
      for (int64_t i = 0; i < n; ++i) ref_sq[(row + i) * R + r] = ref[i] * ref[i];
    }
  }
}

struct Outputs {
  float* sum_sq;
  float* fisher_sum;
  float* dots;
  float* ref_sq;
  double* partials;
};

TK_HD void store_row(const Outputs& o, int R, int64_t row, const double* s) {
  o.sum_sq[row] = static_cast<float>(s[0]);
  o.fisher_sum[row] = static_cast<float>(s[1]);
  for (int r = 0; r < R; ++r) {
    o.dots[row * R + r] = static_cast<float>(s[2 + r]);
    o.ref_sq[row * R + r] = static_cast<float>(s[2 + R + r]);
  }
}

TK_CPU_CLONES
void run_segments(const StatsTensor* tensors, const Segment* segs, int64_t first,
                  int64_t last, int R, const Outputs& o) {
  double sums[2 + 2 * kMaxRefs];
  for (int64_t i = first; i < last; ++i) {
    const Segment& s = segs[i];
    const StatsTensor& t = tensors[s.tensor];
    const int64_t B = t.block_size;
    if (s.partial >= 0) {
      block_sums(t, R, s.begin, s.end, o.partials + s.partial * (2 + 2 * R));
    } else if (B == 1) {
      element_sums(t, R, s.begin, s.end, o.sum_sq, o.fisher_sum, o.dots, o.ref_sq);
    } else {
      for (int64_t b0 = s.begin; b0 < s.end; b0 += B) {
        block_sums(t, R, b0, b0 + B, sums);
        store_row(o, R, t.first_row + b0 / B, sums);
      }
    }
  }
}

}  // namespace

void delta_stats(const std::vector<StatsTensor>& tensors, int R, float* sum_sq,
                 float* fisher_sum, float* dots, float* ref_sq, int num_threads) {
  // Fixed segmentation (independent of threads): whole blocks grouped up to kSegment
  // elements, or a long block cut into kSegment pieces with partial sums.
  std::vector<Segment> segs;
  struct Split { int64_t row; int64_t first_partial; int64_t count; };
  std::vector<Split> splits;
  int64_t num_partials = 0;
  int64_t total = 0;
  for (int64_t ti = 0; ti < static_cast<int64_t>(tensors.size()); ++ti) {
    const StatsTensor& t = tensors[ti];
    const int64_t B = t.block_size;
    total += t.numel;
    if (B <= kSegment) {
      const int64_t step = (kSegment / B) * B;
      for (int64_t b = 0; b < t.numel; b += step) segs.push_back({ti, b, std::min(b + step, t.numel), -1});
    } else {
      const int64_t pieces = (B + kSegment - 1) / kSegment;
      for (int64_t b = 0; b < t.numel; b += B) {
        splits.push_back({t.first_row + b / B, num_partials, pieces});
        for (int64_t p = 0; p < pieces; ++p) {
          segs.push_back({ti, b + p * kSegment, std::min(b + (p + 1) * kSegment, b + B), num_partials++});
        }
      }
    }
  }
  std::vector<double> partials(static_cast<size_t>(num_partials) * (2 + 2 * R));
  const Outputs out{sum_sq, fisher_sum, dots, ref_sq, partials.data()};
  parallel_chunks(static_cast<int64_t>(segs.size()), total, num_threads,
                  [&](int64_t first, int64_t last) {
                    run_segments(tensors.data(), segs.data(), first, last, R, out);
                  });
  // Stage two: each split block adds its pieces in order.
  const int width = 2 + 2 * R;
  for (const Split& s : splits) {
    double sums[2 + 2 * kMaxRefs] = {};
    for (int64_t p = 0; p < s.count; ++p) {
      const double* part = partials.data() + (s.first_partial + p) * width;
      for (int k = 0; k < width; ++k) sums[k] += part[k];
    }
    store_row(out, R, s.row, sums);
  }
}

}  // namespace trace_kernels::cpu
