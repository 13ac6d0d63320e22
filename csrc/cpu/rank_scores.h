// CPU scoring pass of a binned-rank importance: each element's score from two rank tables
// looked up by the top bits of two float values, scaled, masked, and only the scores that
// can still matter (at or above a floor) kept with their positions. One read of each input,
// no element-sized temporary.
#pragma once

#include <cstdint>

namespace trace_kernels::cpu {

struct RankScoresArgs {
  const float* x;            // n values and their table (2^bits fp64 entries)
  const float* y;
  const double* x_ranks;
  const double* y_ranks;
  int bits;                  // the tables' index width: the values' top `bits` bits
  const double* factors[2];  // up to two per-element factors (nullptr: none), in this order
  const uint8_t* excluded;   // per element, nonzero: the score is -inf (nullptr: none)
  int64_t n;
  double floor;              // scores below it are not kept
};

// s[i] = (x_ranks[bin(x[i])] + y_ranks[bin(y[i])]) * 0.5, times each factor in order, -inf
// where excluded; bin(v) is the top `bits` bits of v's order key (the float's bits, negative
// values mirrored, -0 as +0), offset to start at 0. Writes i and s[i] for every finite
// s[i] >= floor to `index` and `value` (room for n each) in increasing i, their number in
// `*kept`; returns the number of finite s[i]. Elementwise, in the order torch's ops take:
// the bits do not depend on the thread count.
int64_t rank_scores(const RankScoresArgs& args, int64_t* index, double* value, int64_t* kept,
                    int num_threads);

// counts[bin(x[i])] += 1 for i < n (counts: 2^bits entries), bin as above.
void rank_counts(const float* x, int64_t n, int bits, int64_t* counts);

}  // namespace trace_kernels::cpu
