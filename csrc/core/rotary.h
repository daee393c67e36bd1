// Half-split (GPT-NeoX) rotary embedding applied on the fly to one row of D values:
//   rope([x1, x2]) = [x1*cos - x2*sin, x2*cos + x1*sin], cos/sin rows of D/2 values.
// The backward is the inverse rotation (sin -> -sin).
#pragma once
#include "macros.h"

namespace rattention {

template <typename acc_t>
RATT_HD void rotary_apply(acc_t* x, const acc_t* cos_row, const acc_t* sin_row, int D,
                          bool inverse) {
  const int d2 = D / 2;
  for (int i = 0; i < d2; ++i) {
    const acc_t c = cos_row[i];
    const acc_t s = inverse ? -sin_row[i] : sin_row[i];
    const acc_t x1 = x[i], x2 = x[d2 + i];
    x[i] = x1 * c - x2 * s;
    x[d2 + i] = x2 * c + x1 * s;
  }
}

}  // namespace rattention
