// RLA feature maps phi: R^D -> R^2D and their backward, on one row, in the accumulation
// type. Shared by the CPU kernels and (per thread row) by the CUDA kernels.
//   softmax: phi(x) = [softmax(x), softmax(-x)]
//   relu:    phi(x) = [relu(x),   relu(-x)]
#pragma once
#include <cmath>
#include <cstdint>

#include "macros.h"

namespace rattention {

enum class FeatureMap : int32_t { kSoftmax = 0, kRelu = 1 };

// phi of one row. x: D values (any stride 1 array of acc_t), y: 2D outputs.
template <typename acc_t>
RATT_HD void feature_map_forward(FeatureMap fm, const acc_t* x, acc_t* y, int D) {
  if (fm == FeatureMap::kRelu) {
    // Written so that NaN maps to NaN in both halves (as torch.relu does).
    for (int i = 0; i < D; ++i) {
      y[i] = x[i] <= acc_t(0) ? acc_t(0) : x[i];
      y[D + i] = x[i] >= acc_t(0) ? acc_t(0) : -x[i];
    }
    return;
  }
  // softmax(x) and softmax(-x) share one pass for max and min.
  acc_t mx = x[0], mn = x[0];
  for (int i = 1; i < D; ++i) {
    mx = x[i] > mx ? x[i] : mx;
    mn = x[i] < mn ? x[i] : mn;
  }
  acc_t sp = 0, sn = 0;
  for (int i = 0; i < D; ++i) {
    y[i] = std::exp(x[i] - mx);
    y[D + i] = std::exp(mn - x[i]);
    sp += y[i];
    sn += y[D + i];
  }
  const acc_t ip = acc_t(1) / sp, in = acc_t(1) / sn;
  for (int i = 0; i < D; ++i) {
    y[i] *= ip;
    y[D + i] *= in;
  }
}

// Backward of one row: given x (D), y = phi(x) (2D) and dy (2D), write dx (D).
// softmax: dx = y1 * (dy1 - <dy1, y1>) - y2 * (dy2 - <dy2, y2>)
// relu:    dx = dy1 * [x > 0] - dy2 * [x < 0]
template <typename acc_t>
RATT_HD void feature_map_backward(FeatureMap fm, const acc_t* x, const acc_t* y, const acc_t* dy,
                                  acc_t* dx, int D) {
  if (fm == FeatureMap::kRelu) {
    for (int i = 0; i < D; ++i) {
      dx[i] = (x[i] > acc_t(0) ? dy[i] : acc_t(0)) - (x[i] < acc_t(0) ? dy[D + i] : acc_t(0));
    }
    return;
  }
  acc_t dp = 0, dn = 0;
  for (int i = 0; i < D; ++i) {
    dp += dy[i] * y[i];
    dn += dy[D + i] * y[D + i];
  }
  for (int i = 0; i < D; ++i) {
    dx[i] = y[i] * (dy[i] - dp) - y[D + i] * (dy[D + i] - dn);
  }
}

}  // namespace rattention
