// Mixing of the two branches: o = rms(a) * g_a + rms(b) * g_b over the head dim D,
// rms(x) = x / sqrt(mean(x^2) + eps). One row (one token, one query head) at a time.
#pragma once
#include <cmath>
#include <limits>

#include "macros.h"

namespace rattention {

// The factor 1 / sqrt(mean(x^2) + eps) of a row, given it computed as `inv` from the row's
// sum of squares `ss`: NaN when ss is not finite. Each entry of rms(x) depends on every x_i
// through the mean, so a row with an Inf (or squares past the range) is non-finite as a whole,
// as a NaN row already is (SPEC.md, NaN and Inf). Plain arithmetic gives the factor 0 there
// and leaves the row's finite entries finite zeros; worse, whether a branch row holds Inf or
// NaN depends on the algorithm (RLA's state form turns 0 * Inf into NaN where its quadratic
// form gives Inf), and with this rule the mixed output does not.
template <typename acc_t>
RATT_HD bool rms_row_finite(acc_t ss) {
  return ss <= std::numeric_limits<acc_t>::max();  // false for +Inf and NaN
}
template <typename acc_t>
RATT_HD acc_t rms_factor(acc_t inv, acc_t ss) {
  return rms_row_finite(ss) ? inv : std::numeric_limits<acc_t>::quiet_NaN();
}

// 1 / sqrt(mean(x^2) + eps) (rms_factor). An all-zero row gives a finite factor and a zero
// output.
template <typename acc_t>
RATT_HD acc_t rms_inv(const acc_t* x, int D, acc_t eps) {
  acc_t ss = 0;
  for (int i = 0; i < D; ++i) ss += x[i] * x[i];
  return rms_factor(acc_t(1) / std::sqrt(ss / acc_t(D) + eps), ss);
}

// Backward of y = rms(x) * g given dy, for one row.
//   xh = x * r;  dx = r * (dy*g - xh * mean(dy * g * xh));  dg += dy * xh
template <typename acc_t>
RATT_HD void rms_scale_backward(const acc_t* x, const acc_t* g, const acc_t* dy, acc_t r, int D,
                                acc_t* dx, acc_t* dg_accum) {
  acc_t dot = 0;
  for (int i = 0; i < D; ++i) dot += dy[i] * g[i] * x[i] * r;
  const acc_t mean_dot = dot / acc_t(D);
  for (int i = 0; i < D; ++i) {
    const acc_t xh = x[i] * r;
    dx[i] = r * (dy[i] * g[i] - xh * mean_dot);
    dg_accum[i] += dy[i] * xh;
  }
}

}  // namespace rattention
