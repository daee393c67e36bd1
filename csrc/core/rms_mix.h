// Mixing of the two branches: o = rms(a) * g_a + rms(b) * g_b over the head dim D,
// rms(x) = x / sqrt(mean(x^2) + eps). One row (one token, one query head) at a time.
#pragma once
#include <cmath>

#include "macros.h"

namespace rattention {

// 1 / sqrt(mean(x^2) + eps). An all-zero row gives a finite factor and a zero output.
template <typename acc_t>
RATT_HD acc_t rms_inv(const acc_t* x, int D, acc_t eps) {
  acc_t ss = 0;
  for (int i = 0; i < D; ++i) ss += x[i] * x[i];
  return acc_t(1) / std::sqrt(ss / acc_t(D) + eps);
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
