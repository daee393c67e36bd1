// NaN / Inf isolation for the MMA tiles (SPEC.md "NaN and Inf": a masked score never
// multiplies a value). An MMA that contracts over the masked dimension (P V over keys,
// dS K over keys, dS^T Q over queries) multiplies every masked zero of its A operand by a
// whole row of its B tile, so one non-finite B entry would reach rows the mask keeps it
// from (0 * NaN = NaN). The kernels therefore
//   1. check the B tile when it lands (tile_chunks_nonfinite on the thread's own 16-byte
//      cp.async chunks, or the loads themselves), folded over the CTA by the barrier that
//      follows: __syncthreads_or;
//   2. finite tile (the normal case): the MMA as before;
//   3. flagged tile (uniform over the CTA): the MMA on the tile with those entries zeroed
//      (zero_nonfinite_chunks), then add_nonfinite_entries adds their contribution only to
//      the rows whose mask lets them in. Rows the mask keeps from them get exactly the
//      finite tile's sums (a zero entry adds nothing, as 0 * finite did); the rows that see
//      them become non-finite.
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

// acc(i) += what the tile's NaN / Inf entries contribute, for each accumulator entry i =
// (row, col) of `coord` and tile row j < n_rows with visible(row, j): the entry itself
// (kValue: P V, where P >= 0 and every visible P is > 0 in exact arithmetic, so the product's
// non-finite value is the entry's) or a NaN (the gradients' dS K and dS^T Q, whose factor
// has either sign). The tile is read from global memory, row j at g + j * ld, column
// col0 + col: its original values (the shared copy the MMA used was zeroed). rotary_half > 0:
// the MMA saw the tile rotated, where column d is not finite when d or its rotary partner
// d +- rotary_half is not. Runs after the MMA (its A fragment dead: few extra registers)
// and only for flagged tiles.
template <bool kValue, class Acc, class Coord, class Element, class Visible>
CUTE_DEVICE void add_nonfinite_entries(Acc& acc, Coord const& coord, const Element* g, int64_t ld,
                                       int n_rows, int col0, int rotary_half,
                                       Visible const& visible) {
  using namespace cute;
  // One accumulator entry at a time, the tile rows in an inner loop that is not unrolled:
  // few values live besides the accumulator (this code shares the kernel's register budget).
  CUTE_UNROLL
  for (int i = 0; i < size(acc); ++i) {
    const int row = int(get<0>(coord(i))), d = col0 + int(get<1>(coord(i)));
    const int partner = rotary_half == 0 ? d : (d < rotary_half ? d + rotary_half : d - rotary_half);
    float add = 0.f;
    bool hit = false;
#pragma unroll 1
    for (int j = 0; j < n_rows; ++j) {
      if (!visible(row, j)) continue;  // rows it rejects may lie outside the tensor
      const Element x = g[j * ld + d];
      if (is_nonfinite(x) || is_nonfinite(g[j * ld + partner])) {
        add += kValue ? float(x) : NAN;
        hit = true;
      }
    }
    if (hit) acc(i) += add;
  }
}

// The products whose contracted operand is a feature tile computed on chip (the RLA
// backward's P phi(k) over keys and P^T phi(q) over queries): the same three steps, with the
// tile's own shared copy as the record of its non-finite entries (there is no global copy
// of phi to re-read), so they are read before the tile is zeroed:
//   hits = nonfinite_hits(...)       (flagged tiles only; a bit per accumulator entry)
//   barrier, zero_nonfinite_tile, barrier, the MMA on the zeroed tile, add_nan_hits,
//   and the tile recomputed before anything else reads it.
// Bit m * size(coord) + i: accumulator entry i = (row, col) of column tile m (kTileCols
// columns) of a product contracting the tile's rows, where some tile row j < n_rows with
// visible(row, j) holds a NaN / Inf at column m * kTileCols + col. Those terms of the
// gradients have a factor of either sign (or zero), so their sum is NaN or +-Inf: NaN stands
// for it, as in add_nonfinite_entries.
template <int kTiles, int kTileCols, class Coord, class Element, class Visible>
CUTE_DEVICE uint64_t nonfinite_hits(Coord const& coord, const Element* s, int stride, int n_rows,
                                    Visible const& visible) {
  using namespace cute;
  constexpr int kN = decltype(size(coord))::value;
  static_assert(kTiles * kN <= 64, "one 64-bit mask holds every tile's accumulator entries");
  uint64_t hits = 0;
#pragma unroll 1
  for (int m = 0; m < kTiles; ++m) {
    CUTE_UNROLL
    for (int i = 0; i < kN; ++i) {
      const int row = int(get<0>(coord(i))), col = m * kTileCols + int(get<1>(coord(i)));
      bool hit = false;
#pragma unroll 1
      for (int j = 0; j < n_rows; ++j) hit |= visible(row, j) && is_nonfinite(s[j * stride + col]);
      if (hit) hits |= uint64_t(1) << (m * kN + i);
    }
  }
  return hits;
}

// Zero the NaN / Inf entries of a (kRows, kCols) shared tile of row stride `stride`, strided
// over the CTA (after a barrier that orders every read of them).
template <int kRows, int kCols, class Element>
CUTE_DEVICE void zero_nonfinite_tile(Element* s, int stride) {
  for (int idx = threadIdx.x; idx < kRows * kCols; idx += blockDim.x) {
    Element& x = s[(idx / kCols) * stride + idx % kCols];
    if (is_nonfinite(x)) x = Element(0.f);
  }
}

// acc(i) += NaN where bit `first + i` of `hits` is set (see nonfinite_hits).
template <class Acc>
CUTE_DEVICE void add_nan_hits(Acc& acc, uint64_t hits, int first) {
  CUTE_UNROLL
  for (int i = 0; i < cute::size(acc); ++i) {
    if ((hits >> (first + i)) & 1) acc(i) += NAN;
  }
}

}  // namespace rattention::cuda
