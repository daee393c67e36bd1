// Online softmax (flash-attention's running max / running sum), one query row at a time.
//
// For a row, after seeing score blocks S_1..S_j:  m = max score, l = sum exp(s - m),
// acc = sum exp(s - m) v. A new block with max m_blk rescales the old terms by
// exp(m_old - m_new). Rows that have seen no key keep m = -inf; the rescale is then 0
// and the -inf - -inf NaN is avoided.
//
// NaN (SPEC.md): a row with a NaN score has a NaN softmax. With a finite running max,
// exp(NaN - m) already makes l NaN; a block seen while m is still -inf (no finite score yet)
// is checked with online_softmax_mark_nan. l = NaN then stays NaN through every rescale and
// sum, and the row's output and lse come out NaN (never zeros).
#pragma once
#include <cmath>
#include <cstdint>
#include <limits>

#include "macros.h"

namespace rattention {

template <typename acc_t>
struct OnlineSoftmaxRow {
  acc_t m;  // running max of scaled scores (-inf before any key)
  acc_t l;  // running sum of exp(score - m)
};

template <typename acc_t>
RATT_HD acc_t neg_inf() {
  return -std::numeric_limits<acc_t>::infinity();
}

// Update the running max with a block max. Returns the factor the old accumulator and
// sum must be multiplied by.
template <typename acc_t>
RATT_HD acc_t online_softmax_rescale(OnlineSoftmaxRow<acc_t>& r, acc_t block_max) {
  const acc_t m_new = block_max > r.m ? block_max : r.m;
  const acc_t factor = (r.m == neg_inf<acc_t>()) ? acc_t(0) : std::exp(r.m - m_new);
  r.m = m_new;
  r.l *= factor;
  return factor;
}

// exp(score - m) for a score of the current block; masked scores are -inf and give 0.
template <typename acc_t>
RATT_HD acc_t online_softmax_prob(const OnlineSoftmaxRow<acc_t>& r, acc_t score) {
  return (r.m == neg_inf<acc_t>()) ? acc_t(0) : std::exp(score - r.m);
}

// A block seen while the row max is still -inf: set l = NaN if it holds a NaN score.
template <typename acc_t>
RATT_HD void online_softmax_mark_nan(OnlineSoftmaxRow<acc_t>& r, const acc_t* s, int64_t n) {
  for (int64_t j = 0; j < n; ++j) {
    if (s[j] != s[j]) {
      r.l = std::numeric_limits<acc_t>::quiet_NaN();
      return;
    }
  }
}

// 1 / l for the output, NaN for a row without a positive sum (every SWA row sees at least
// itself, so l = 0 means every visible score was -inf or NaN: 0/0).
template <typename acc_t>
RATT_HD acc_t online_softmax_inv_sum(const OnlineSoftmaxRow<acc_t>& r) {
  return (r.l > acc_t(0)) ? acc_t(1) / r.l : std::numeric_limits<acc_t>::quiet_NaN();
}

// log-sum-exp of the row once every block is seen (-inf for an empty row, which the
// window never produces: every query sees at least itself).
template <typename acc_t>
RATT_HD acc_t online_softmax_lse(const OnlineSoftmaxRow<acc_t>& r) {
  return (r.l > acc_t(0)) ? r.m + std::log(r.l) : neg_inf<acc_t>();
}

}  // namespace rattention
