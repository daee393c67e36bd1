// NaN / Inf isolation for the MMA tiles (SPEC.md "NaN and Inf": a masked score never
// multiplies a value). An MMA that contracts over the masked dimension (P V over keys,
// dS K over keys, dS^T Q over queries) multiplies every masked zero of its A operand by a
// whole row of its B tile, so one non-finite B entry would reach rows the mask keeps it
// from (0 * NaN = NaN). The kernels therefore
//   1. check the B tile when it lands (tile_chunks_nonfinite on the thread's own 16-byte
//      cp.async chunks, folded over the CTA by the barrier that follows: __syncthreads_or);
//   2. finite tile (the normal case): the MMA as before;
//   3. flagged tile (uniform over the CTA): add_nonfinite_terms adds a(row, j) * B(j, col)
//      for the non-finite entries B(j, col) and the pairs (row, j) the mask lets in, then,
//      after a barrier, zero_nonfinite_chunks zeroes those entries, and after another the
//      unchanged MMA runs on the zeroed tile. Rows the mask keeps from them get exactly the
//      finite tile's sums; the rows that see them get their non-finite terms.
// Same scheme as the CPU kernels' masked products (csrc/cpu/masked_products.h).
#pragma once
#include <cute/tensor.hpp>
#include <cutlass/bfloat16.h>
#include <cutlass/half.h>

#include <cmath>
#include <cstdint>

namespace rattention::cuda {

// The exponent field of a 16-bit float (all ones: Inf or NaN).
template <typename Element>
struct NonFiniteExponent;
template <>
struct NonFiniteExponent<cutlass::bfloat16_t> {
  static constexpr uint32_t mask = 0x7F80u, low_bit = 0x0080u;
};
template <>
struct NonFiniteExponent<cutlass::half_t> {
  static constexpr uint32_t mask = 0x7C00u, low_bit = 0x0400u;
};

template <typename Element>
CUTE_DEVICE bool is_nonfinite(Element x) {
  return (uint32_t(x.raw()) & NonFiniteExponent<Element>::mask) == NonFiniteExponent<Element>::mask;
}

// True when a 16-byte chunk of this thread's partition of a shared-memory tile (the
// destination partition of a 16-byte cp.async tiled copy, (CPY, CPY_M, CPY_K), every chunk
// landed) holds a NaN or Inf. Per 32-bit word of two elements: (x & exp) + low_bit sets
// bit 15 of a half exactly when its exponent is all ones (no carry crosses the halves).
template <typename Element, typename Part>
CUTE_DEVICE bool tile_chunks_nonfinite(Part const& part) {
  using namespace cute;
  constexpr uint32_t kMask = NonFiniteExponent<Element>::mask * 0x10001u;
  constexpr uint32_t kLow = NonFiniteExponent<Element>::low_bit * 0x10001u;
  uint32_t acc = 0;
  CUTE_UNROLL
  for (int m = 0; m < size<1>(part); ++m) {
    CUTE_UNROLL
    for (int k = 0; k < size<2>(part); ++k) {
      const uint4 w = *reinterpret_cast<const uint4*>(&part(0, m, k));
      acc |= ((w.x & kMask) + kLow) | ((w.y & kMask) + kLow) | ((w.z & kMask) + kLow) |
             ((w.w & kMask) + kLow);
    }
  }
  return (acc & 0x80008000u) != 0;
}

// Zero the NaN / Inf entries of this thread's partition (after add_nonfinite_terms has read
// them, and a barrier).
template <typename Part>
CUTE_DEVICE void zero_nonfinite_chunks(Part& part) {
  using Element = typename Part::value_type;
  CUTE_UNROLL
  for (int i = 0; i < cute::size(part); ++i) {
    if (is_nonfinite(part(i))) part(i) = Element(0.f);
  }
}

// out(r, c) += a(r, j) * b(j, b_col0 + col(c)) over the tile rows j whose entry in that
// column is NaN or Inf and the pairs visible(row(r), j) lets in. `out`, `a`: (rows, cols)
// views of MMA accumulators over the same rows (acc_rowcol), with their coordinate views
// (row, col in the tile); a's columns index b's rows. a(r, j) lives in one lane of the quad
// that shares row r: each lane offers its value or 0 and the quad sums them (exact). Only
// flagged tiles run this; every lane of the warp must (quad shuffles).
template <int kBRows, typename Out, typename OutCoord, typename A, typename ACoord,
          typename BTile, typename Visible>
CUTE_DEVICE void add_nonfinite_terms(Out& out, OutCoord const& out_coord, A const& a,
                                     ACoord const& a_coord, BTile const& b, int b_col0,
                                     Visible const& visible) {
  using namespace cute;
  constexpr int kRows = decltype(size<0>(out))::value;
  constexpr int kOutCols = decltype(size<1>(out))::value;
  constexpr int kACols = decltype(size<1>(a))::value;
#pragma unroll 1
  for (int j = 0; j < kBRows; ++j) {
    CUTE_UNROLL
    for (int r = 0; r < kRows; ++r) {
      float mine = 0.f;
      CUTE_UNROLL
      for (int c = 0; c < kACols; ++c) {
        if (int(get<1>(a_coord(r, c))) == j) mine = a(r, c);
      }
      mine += __shfl_xor_sync(0xffffffffu, mine, 1);
      mine += __shfl_xor_sync(0xffffffffu, mine, 2);
      if (!visible(int(get<0>(a_coord(r, 0))), j)) continue;
      CUTE_UNROLL
      for (int c = 0; c < kOutCols; ++c) {
        const auto x = b(j, b_col0 + int(get<1>(out_coord(r, c))));
        if (is_nonfinite(x)) out(r, c) += mine * float(x);
      }
    }
  }
}

}  // namespace rattention::cuda
