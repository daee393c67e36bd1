// The RAttention mixing, finished in the SWA forward's epilogue (op swa_mix_fwd).
//
// In the SM80 MMA's accumulator layout the 4 lanes of a quad together own every column of
// an output row (tOcO_rc gives each value's (row, col)), so a row's rms is one quad
// reduction, as the softmax's row sums are. The quad reads the same columns of o_rla
// (float32, written by rla_fwd) and writes
//   out[t] = o_swa * rsqrt(mean(o_swa^2) + eps) * g_swa + o_rla * rsqrt(mean(o_rla^2) + eps) * g_rla
// in float32 math, stored as out_dtype (f32 / bf16 / fp16). Same arithmetic as mix_fwd_kernel.
#pragma once
#include <cute/tensor.hpp>
#include <cutlass/bfloat16.h>
#include <cutlass/half.h>

#include <type_traits>

#include "core/params.h"
#include "core/rms_mix.h"
#include "cuda/swa_traits.cuh"

namespace rattention::cuda {

// `o`: the normalised O tile as (rows, cols) registers; `coord`: matching (row, col) in the
// tile; `t`: the row in the o_rla / out tensors (packed: the document's first row + the
// token). Every lane of the warp must call this (quad shuffles); rows past the sequence pass
// row_valid false and write nothing.
template <int kHeadDim, typename RowColO, typename RowColCoord>
CUTE_DEVICE void mix_epilogue_row(const MixEpilogueParams& e, RowColO const& o, int r,
                                  RowColCoord const& coord, int64_t b, int64_t h, int64_t t,
                                  bool row_valid) {
  using namespace cute;
  constexpr int kCols = decltype(size<1>(o))::value;
  const int64_t t_safe = row_valid ? t : 0;
  const float* rla_row = static_cast<const float*>(e.o_rla) + b * e.o_rla_stride.b +
                         t_safe * e.o_rla_stride.t + h * e.o_rla_stride.h;
  float x_rla[kCols];
  float ss_swa = 0.f, ss_rla = 0.f;
  CUTE_UNROLL
  for (int c = 0; c < kCols; ++c) {
    const int64_t d = get<1>(coord(r, c));
    x_rla[c] = row_valid ? rla_row[d * e.o_rla_stride.d] : 0.f;
    ss_swa += o(r, c) * o(r, c);
    ss_rla += x_rla[c] * x_rla[c];
  }
  ss_swa = quad_allreduce(ss_swa, SumOp{});
  ss_rla = quad_allreduce(ss_rla, SumOp{});
  if (!row_valid) return;
  const float eps = float(e.eps);
  // An all-zero row (o_rla for t <= w without H0) gives a finite factor and zeros; a row
  // with an Inf a NaN factor (rms_factor).
  const float r_swa = rms_factor(rsqrtf(ss_swa / kHeadDim + eps), ss_swa);
  const float r_rla = rms_factor(rsqrtf(ss_rla / kHeadDim + eps), ss_rla);
  const float* g_swa = static_cast<const float*>(e.swa_weight) + h * kHeadDim;
  const float* g_rla = static_cast<const float*>(e.rla_weight) + h * kHeadDim;
  const int64_t row_off = b * e.out_stride.b + t * e.out_stride.t + h * e.out_stride.h;
  auto store_row = [&](auto* dst) {
    using OutT = std::remove_pointer_t<decltype(dst)>;
    CUTE_UNROLL
    for (int c = 0; c < kCols; ++c) {
      const int64_t d = get<1>(coord(r, c));
      const float y = o(r, c) * r_swa * g_swa[d] + x_rla[c] * r_rla * g_rla[d];
      dst[row_off + d * e.out_stride.d] = OutT(y);
    }
  };
  if (e.out_dtype == DType::kBFloat16) {
    RATT_COVER("out_bf16");
    store_row(static_cast<cutlass::bfloat16_t*>(e.out));
  } else if (e.out_dtype == DType::kFloat16) {
    RATT_COVER("out_fp16");
    store_row(static_cast<cutlass::half_t*>(e.out));
  } else {
    RATT_COVER("out_f32");
    store_row(static_cast<float*>(e.out));
  }
}

}  // namespace rattention::cuda
