// Splitting multi-tensor work into chunks and running them in one OpenMP region.
#pragma once

#include <cstdint>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace trace_kernels::cpu {

// A contiguous range [begin, end) of one tensor's work items (compact state positions).
struct Chunk {
  int64_t tensor;
  int64_t begin;
  int64_t end;
};

// Cut every tensor's `sizes[t]` items into chunks of at most `chunk` items, in tensor order,
// so a static split over threads gives each thread one contiguous stretch of memory.
inline std::vector<Chunk> make_chunks(const std::vector<int64_t>& sizes, int64_t chunk) {
  std::vector<Chunk> out;
  for (int64_t t = 0; t < static_cast<int64_t>(sizes.size()); ++t) {
    for (int64_t b = 0; b < sizes[t]; b += chunk) {
      out.push_back({t, b, b + chunk < sizes[t] ? b + chunk : sizes[t]});
    }
  }
  return out;
}

// Run fn(first_chunk, last_chunk) over an even static split of `num_chunks` among up to
// `num_threads` threads; small jobs stay on the calling thread (waking a team costs ~10 us).
template <typename Fn>
void parallel_chunks(int64_t num_chunks, int64_t total_items, int num_threads, Fn&& fn) {
  constexpr int64_t kSerialBelow = 1 << 16;
  if (num_chunks == 0) return;
  if (num_threads <= 1 || num_chunks == 1 || total_items < kSerialBelow) {
    fn(int64_t{0}, num_chunks);
    return;
  }
#ifdef _OPENMP
  const int team = static_cast<int>(num_chunks < num_threads ? num_chunks : num_threads);
#pragma omp parallel num_threads(team)
  {
    const int64_t tid = omp_get_thread_num();
    const int64_t nt = omp_get_num_threads();
    const int64_t lo = num_chunks * tid / nt;
    const int64_t hi = num_chunks * (tid + 1) / nt;
    if (lo < hi) fn(lo, hi);
  }
#else
  fn(int64_t{0}, num_chunks);
#endif
}

}  // namespace trace_kernels::cpu
