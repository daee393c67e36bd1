// Sliding-window attention on tensor cores (flash-attention-2 structure): tile sizes,
// swizzled shared-memory layouts, the tiled MMA, copy atoms and the small register-level
// helpers (layout conversions, warp-quad reductions, smem->reg GEMMs) shared by the SWA
// forward and backward kernels.
#pragma once
#include <cute/tensor.hpp>
#include <cutlass/bfloat16.h>
#include <cutlass/half.h>
#include <cutlass/numeric_conversion.h>

#include "cuda/launch.cuh"

namespace rattention::cuda {

template <typename Element>
struct SwaMmaAtom;
template <>
struct SwaMmaAtom<cutlass::bfloat16_t> {
  using type = cute::SM80_16x8x16_F32BF16BF16F32_TN;
};
template <>
struct SwaMmaAtom<cutlass::half_t> {
  using type = cute::SM80_16x8x16_F32F16F16F32_TN;
};

// The tiles, layouts and copies of both passes; kBlockM_ query rows per tile, a multiple of the
// 16 * kNWarps_ rows one MMA tile of the warps stacked along M covers.
template <typename Element_, int kHeadDim_, int kBlockM_, int kNWarps_ = 4>
struct SwaTiles {
  using Element = Element_;
  static constexpr int kHeadDim = kHeadDim_;  // D (compile time; everything else is runtime)
  static constexpr int kBlockM = kBlockM_;    // query rows per tile: kNWarps x 16 rows x MMA tiles
  static constexpr int kBlockN = 64;          // key rows per tile
  static constexpr int kNWarps = kNWarps_;
  static constexpr int kNThreads = kNWarps * 32;
  static_assert(kBlockM % (16 * kNWarps) == 0, "query tiles are whole MMA tiles along M");

  // Warps stacked along M: warp w owns rows [16w, 16w + 16) of each (16 kNWarps)-row MMA tile,
  // so the softmax row statistics never cross warps (only the 4 lanes of a quad share a row).
  using TiledMma = cute::TiledMMA<cute::MMA_Atom<typename SwaMmaAtom<Element>::type>,
                                  cute::Layout<cute::Shape<cute::Int<kNWarps>, cute::_1, cute::_1>>,
                                  cute::Tile<cute::Int<16 * kNWarps>, cute::_16, cute::_16>>;

  // Swizzled 8 x 64 atom (128-byte rows): ldmatrix of 8 rows at the same column hits 8
  // different bank groups, and 16-byte cp.async stores stay vectorised.
  static constexpr int kBlockKSmem = 64;
  using SmemLayoutAtom = decltype(cute::composition(
      cute::Swizzle<3, 3, 3>{},
      cute::Layout<cute::Shape<cute::_8, cute::Int<kBlockKSmem>>,
                   cute::Stride<cute::Int<kBlockKSmem>, cute::_1>>{}));
  using SmemLayoutQ = decltype(cute::tile_to_shape(
      SmemLayoutAtom{}, cute::Shape<cute::Int<kBlockM>, cute::Int<kHeadDim>>{}));
  using SmemLayoutKV = decltype(cute::tile_to_shape(
      SmemLayoutAtom{}, cute::Shape<cute::Int<kBlockN>, cute::Int<kHeadDim>>{}));
  // V^T (D x kBlockN) as a view on the same storage, for the P V product (B operand).
  using SmemLayoutVt = decltype(cute::composition(
      SmemLayoutKV{},
      cute::make_layout(cute::Shape<cute::Int<kHeadDim>, cute::Int<kBlockN>>{}, cute::GenRowMajor{})));
  using SmemLayoutVtNoSwizzle = decltype(cute::get_nonswizzle_portion(SmemLayoutVt{}));

  // A (kBlockM x kBlockN) tile of P or dS in the input dtype, used by the backward pass.
  using SmemLayoutAtomP = decltype(cute::composition(
      cute::Swizzle<3, 3, 3>{},
      cute::Layout<cute::Shape<cute::_8, cute::_64>, cute::Stride<cute::_64, cute::_1>>{}));
  using SmemLayoutP = decltype(cute::tile_to_shape(
      SmemLayoutAtomP{}, cute::Shape<cute::Int<kBlockM>, cute::Int<kBlockN>>{}));
  using SmemLayoutPt = decltype(cute::composition(
      SmemLayoutP{},
      cute::make_layout(cute::Shape<cute::Int<kBlockN>, cute::Int<kBlockM>>{}, cute::GenRowMajor{})));
  using SmemLayoutPtNoSwizzle = decltype(cute::get_nonswizzle_portion(SmemLayoutPt{}));
  // Q^T / K^T views (D x rows) for dK += dS^T Q (B operand Q^T) and dQ += dS K (B operand K^T).
  using SmemLayoutQt = decltype(cute::composition(
      SmemLayoutQ{},
      cute::make_layout(cute::Shape<cute::Int<kHeadDim>, cute::Int<kBlockM>>{}, cute::GenRowMajor{})));
  using SmemLayoutQtNoSwizzle = decltype(cute::get_nonswizzle_portion(SmemLayoutQt{}));
  using SmemLayoutKt = SmemLayoutVt;
  using SmemLayoutKtNoSwizzle = SmemLayoutVtNoSwizzle;

  using SmemCopyAtom = cute::Copy_Atom<cute::SM75_U32x4_LDSM_N, Element>;
  using SmemCopyAtomTransposed = cute::Copy_Atom<cute::SM75_U16x8_LDSM_T, Element>;

  // gmem -> smem: 16-byte cp.async per thread, 8 threads per 64-element row segment.
  static constexpr int kGmemElemsPerLoad = 16 / int(sizeof(Element));
  static constexpr int kGmemThreadsPerRow = kBlockKSmem / kGmemElemsPerLoad;
  using GmemLayoutAtom = cute::Layout<
      cute::Shape<cute::Int<kNThreads / kGmemThreadsPerRow>, cute::Int<kGmemThreadsPerRow>>,
      cute::Stride<cute::Int<kGmemThreadsPerRow>, cute::_1>>;
  using GmemTiledCopy = decltype(cute::make_tiled_copy(
      cute::Copy_Atom<cute::SM80_CP_ASYNC_CACHEGLOBAL<cute::uint128_t>, Element>{},
      GmemLayoutAtom{}, cute::Layout<cute::Shape<cute::_1, cute::Int<kGmemElemsPerLoad>>>{}));

  static constexpr int kSmemQ = kBlockM * kHeadDim * int(sizeof(Element));
  static constexpr int kSmemKV = kBlockN * kHeadDim * int(sizeof(Element));
  // Backward dQ (swa_bwd_kernel.cuh): sQ, sdO, sV and two stages of sK: 80 KB at D = 128,
  // so two CTAs per SM fit an A100's 164 KB as well as an H100's 228 KB.
  static constexpr int kSmemBwdDq = 3 * kSmemKV + 2 * kSmemQ;
};

// Backward dQ: 64-row query tiles, 4 warps along M.
template <typename Element, int kHeadDim>
struct SwaTraits : SwaTiles<Element, kHeadDim, 64> {};

// Backward dK/dV: 64-key x 64-query tiles, 8 warps as 4 (M) x 2 (N), so one CTA owns all D
// columns of dK and dV: each warp holds 16 keys x D/2 columns of each (64 fp32 accumulators
// per thread at D = 128), and S^T, dP^T are computed once per tile pair, not once per
// 64-column slice. P^T and dS^T go through shared memory (the 2-warp N split leaves each
// warp only half of the queries the next MMA contracts over).
template <typename Element, int kHeadDim>
struct SwaDkdvTraits : SwaTiles<Element, kHeadDim, 64> {
  using Base = SwaTiles<Element, kHeadDim, 64>;
  static constexpr int kNWarps = 8;
  static constexpr int kNThreads = kNWarps * 32;
  // Tile<64, 32, 16>: warp (m, n) owns rows 16m..16m+15 and, of every 32 columns, the two
  // 8-column atoms at 8n and 16 + 8n (flash-attention-2's backward tiling).
  using TiledMma = cute::TiledMMA<cute::MMA_Atom<typename SwaMmaAtom<Element>::type>,
                                  cute::Layout<cute::Shape<cute::_4, cute::_2, cute::_1>>,
                                  cute::Tile<cute::_64, cute::_32, cute::_16>>;
  using GmemLayoutAtom = cute::Layout<
      cute::Shape<cute::Int<kNThreads / Base::kGmemThreadsPerRow>, cute::Int<Base::kGmemThreadsPerRow>>,
      cute::Stride<cute::Int<Base::kGmemThreadsPerRow>, cute::_1>>;
  using GmemTiledCopy = decltype(cute::make_tiled_copy(
      cute::Copy_Atom<cute::SM80_CP_ASYNC_CACHEGLOBAL<cute::uint128_t>, Element>{},
      GmemLayoutAtom{}, cute::Layout<cute::Shape<cute::_1, cute::Int<Base::kGmemElemsPerLoad>>>{}));
  static constexpr int kSmemP = 64 * 64 * int(sizeof(Element));  // sPt, sdSt
  // sK, sV, sdO, two stages of sQ, sPt, sdSt, the lse and Di rows: 96.5 KB at D = 128.
  static constexpr int kSmemBwdDkdv =
      2 * Base::kSmemKV + 3 * Base::kSmemQ + 2 * kSmemP + 2 * Base::kBlockM * 4;
};

// Forward shared memory (a storage struct, not offset arithmetic): the Q tile and two stages
// each of K and V, so tile n + 1 loads during all of tile n.
template <typename Element, typename LayoutQ, typename LayoutKV>
struct SwaFwdSmem {
  cute::array_aligned<Element, cute::cosize_v<LayoutQ>, 128> q;
  cute::array_aligned<Element, cute::cosize_v<LayoutKV>, 128> k[2];
  cute::array_aligned<Element, cute::cosize_v<LayoutKV>, 128> v[2];
};

// Forward: 128-row query tiles, so each K/V tile brought into shared memory serves 128 queries.
// At D = 64, 4 warps with two 16-row MMA tiles each: every K and V fragment a warp loads with
// ldmatrix feeds two MMAs (half the shared-memory reads per MMA). At D = 128 two MMA tiles'
// O accumulators (128 fp32 per thread) plus the score tile do not fit in 255 registers
// (ptxas: 796 bytes of spills with 64-key tiles, 12 with 32-key tiles), so D = 128 stacks
// 8 warps of one 16-row MMA tile each (the registers of a 64-row tile, 256 threads).
// Shared memory: 48 KB at D = 64, 96 KB at D = 128. Registers (240 at D = 128, 253-254 at
// D = 64; tools/cuda_check.py) allow 8 resident warps per SM either way.
template <typename Element, int kHeadDim>
struct SwaFwdTraits : SwaTiles<Element, kHeadDim, 128, (kHeadDim <= 64 ? 4 : 8)> {
  using Base = SwaTiles<Element, kHeadDim, 128, (kHeadDim <= 64 ? 4 : 8)>;
  using Smem = SwaFwdSmem<Element, typename Base::SmemLayoutQ, typename Base::SmemLayoutKV>;
  static constexpr int kSmemFwd = int(sizeof(Smem));
  static_assert(kSmemFwd == Base::kSmemQ + 4 * Base::kSmemKV, "no padding between the tiles");
};

// ---- register-level helpers (after flash-attention-2's utils.h) ----------------------------
// MMA accumulator (MMA=4, MMA_M, MMA_N) -> (rows=(2, MMA_M), cols=(2, MMA_N)).
template <typename Layout>
CUTE_HOST_DEVICE auto acc_rowcol(Layout acc) {
  using namespace cute;
  static_assert(decltype(size<0>(acc))::value == 4);
  static_assert(decltype(rank(acc))::value == 3);
  auto l = logical_divide(acc, Shape<_2>{});  // ((2, 2), MMA_M, MMA_N)
  return make_layout(make_layout(get<0, 1>(l), get<1>(l)), make_layout(get<0, 0>(l), get<2>(l)));
}

// Accumulator of a 16x8 MMA (4, MMA_M, MMA_N) reused as the A operand of a 16x8x16 MMA:
// (4, MMA_M, MMA_N) -> ((4, 2), MMA_M, MMA_N / 2).
template <typename Layout>
CUTE_HOST_DEVICE auto acc_as_a(Layout acc) {
  using namespace cute;
  auto l = logical_divide(acc, Shape<Underscore, Underscore, _2>{});  // (4, MMA_M, (2, MMA_N/2))
  return make_layout(make_layout(get<0>(l), get<2, 0>(l)), get<1>(l), get<2, 1>(l));
}

// Element-wise float -> To conversion of a register fragment (same layout), into an owning
// register tensor (packed cvt through cutlass::NumericArrayConverter).
template <typename To, typename Engine, typename Layout>
CUTE_DEVICE auto convert_frag(cute::Tensor<Engine, Layout> const& t) {
  using From = typename Engine::value_type;
  constexpr int N = decltype(cute::size(t))::value;
  cutlass::NumericArrayConverter<To, From, N> conv;
  auto out = cute::make_tensor<To>(t.layout());
  *reinterpret_cast<cutlass::Array<To, N>*>(out.data()) =
      conv(*reinterpret_cast<const cutlass::Array<From, N>*>(t.data()));
  return out;
}

// Reductions over the 4 lanes of a quad (the lanes sharing an accumulator row).
template <typename Op>
CUTE_DEVICE float quad_allreduce(float x, Op op) {
  x = op(x, __shfl_xor_sync(0xffffffffu, x, 2));
  x = op(x, __shfl_xor_sync(0xffffffffu, x, 1));
  return x;
}
struct MaxOp {
  CUTE_DEVICE float operator()(float a, float b) const { return fmaxf(a, b); }
};
struct SumOp {
  CUTE_DEVICE float operator()(float a, float b) const { return a + b; }
};

// acc += A B^T with both operands in shared memory, ldmatrix-ed one k-slice ahead.
template <typename Acc, typename TA, typename TB, typename SA, typename SB, typename Mma,
          typename CopyA, typename CopyB, typename ThrCopyA, typename ThrCopyB>
CUTE_DEVICE void gemm_ss(Acc& acc, TA& tCrA, TB& tCrB, SA const& tCsA, SB const& tCsB,
                         Mma& mma, CopyA const& copy_a, CopyB const& copy_b,
                         ThrCopyA const& thr_a, ThrCopyB const& thr_b) {
  using namespace cute;
  auto tCrA_view = thr_a.retile_D(tCrA);
  auto tCrB_view = thr_b.retile_D(tCrB);
  copy(copy_a, tCsA(_, _, _0{}), tCrA_view(_, _, _0{}));
  copy(copy_b, tCsB(_, _, _0{}), tCrB_view(_, _, _0{}));
  CUTE_UNROLL
  for (int i = 0; i < size<2>(tCrA); ++i) {
    if (i < size<2>(tCrA) - 1) {
      copy(copy_a, tCsA(_, _, i + 1), tCrA_view(_, _, i + 1));
      copy(copy_b, tCsB(_, _, i + 1), tCrB_view(_, _, i + 1));
    }
    gemm(mma, tCrA(_, _, i), tCrB(_, _, i), acc);
  }
}

// acc += A B^T with A already in registers (P or dS) and B in shared memory.
template <typename Acc, typename TA, typename TB, typename SB, typename Mma, typename CopyB,
          typename ThrCopyB>
CUTE_DEVICE void gemm_rs(Acc& acc, TA const& tCrA, TB& tCrB, SB const& tCsB, Mma& mma,
                         CopyB const& copy_b, ThrCopyB const& thr_b) {
  using namespace cute;
  auto tCrB_view = thr_b.retile_D(tCrB);
  copy(copy_b, tCsB(_, _, _0{}), tCrB_view(_, _, _0{}));
  CUTE_UNROLL
  for (int i = 0; i < size<2>(tCrA); ++i) {
    if (i < size<2>(tCrA) - 1) copy(copy_b, tCsB(_, _, i + 1), tCrB_view(_, _, i + 1));
    gemm(mma, tCrA(_, _, i), tCrB(_, _, i), acc);
  }
}

// Predicated tile copy gmem -> smem with cp.async: rows at or past `rows_left` are zero-filled
// in shared memory (ragged T without padded copies; zero V rows keep 0 * garbage out of O).
template <typename TiledCopy, typename S, typename D, typename C>
CUTE_DEVICE void copy_rows_pred(TiledCopy const& tiled_copy, S const& src, D& dst, C const& coord,
                                int rows_left) {
  using namespace cute;
  CUTE_UNROLL
  for (int m = 0; m < size<1>(src); ++m) {
    if (get<0>(coord(0, m, 0)) < rows_left) {
      copy(tiled_copy, src(_, m, _), dst(_, m, _));
    } else {
      clear(dst(_, m, _));
    }
  }
}

// Half-split rotary on a (rows x D) shared-memory tile whose first row is token `t0`:
//   [x1, x2] -> [x1 c - x2 s, x2 c + x1 s] (inverse: s -> -s). Rows >= rows_left are skipped.
// Each thread owns whole (row, i) pairs, so no two threads touch the same element. Vectorised:
// a thread takes 8 consecutive pairs, i.e. one 16-byte chunk of x1 and one of x2 (the swizzle
// permutes whole 16-byte chunks, so 8 elements from a multiple of 8 stay contiguous) and two
// float4 of each table; tables whose rows are not 16-byte aligned take the scalar loop.
template <int kRows, int kHeadDim, int kNThreads, typename STensor>
CUTE_DEVICE void rotate_tile_smem(STensor& s, const float* cos, const float* sin, int64_t t0,
                                  int rows_left, bool inverse) {
  using E = typename STensor::value_type;
  constexpr int kHalf = kHeadDim / 2;
  constexpr int kVec = 16 / int(sizeof(E));  // elements of one 16-byte chunk
  static_assert(kHalf % kVec == 0 && kVec == 8, "whole 16-byte chunks of 2-byte elements");
  const bool aligned = ((reinterpret_cast<uintptr_t>(cos) | reinterpret_cast<uintptr_t>(sin)) & 15) == 0;
  if (aligned) {
    RATT_COVER_ANY("rotary_vectorised");
    constexpr int kChunks = kHalf / kVec;  // per row
    for (int idx = threadIdx.x; idx < kRows * kChunks; idx += kNThreads) {
      const int r = idx / kChunks, i0 = (idx % kChunks) * kVec;
      if (r >= rows_left) continue;
      const float4* c4 = reinterpret_cast<const float4*>(cos + (t0 + r) * kHalf + i0);
      const float4* s4 = reinterpret_cast<const float4*>(sin + (t0 + r) * kHalf + i0);
      const float4 ca = c4[0], cb = c4[1], sa = s4[0], sb = s4[1];
      const float c[kVec] = {ca.x, ca.y, ca.z, ca.w, cb.x, cb.y, cb.z, cb.w};
      const float sg = inverse ? -1.f : 1.f;
      const float sn[kVec] = {sg * sa.x, sg * sa.y, sg * sa.z, sg * sa.w,
                              sg * sb.x, sg * sb.y, sg * sb.z, sg * sb.w};
      uint4* p1 = reinterpret_cast<uint4*>(&s(r, i0));
      uint4* p2 = reinterpret_cast<uint4*>(&s(r, i0 + kHalf));
      uint4 u1 = *p1, u2 = *p2;
      E* x1 = reinterpret_cast<E*>(&u1);
      E* x2 = reinterpret_cast<E*>(&u2);
      CUTE_UNROLL
      for (int e = 0; e < kVec; ++e) {
        const float a = static_cast<float>(x1[e]), b = static_cast<float>(x2[e]);
        x1[e] = static_cast<E>(a * c[e] - b * sn[e]);
        x2[e] = static_cast<E>(b * c[e] + a * sn[e]);
      }
      *p1 = u1;
      *p2 = u2;
    }
    return;
  }
  RATT_COVER_ANY("rotary_scalar");
  for (int idx = threadIdx.x; idx < kRows * kHalf; idx += kNThreads) {
    const int r = idx / kHalf, i = idx % kHalf;
    if (r >= rows_left) continue;
    const float c = cos[(t0 + r) * kHalf + i];
    const float sn = inverse ? -sin[(t0 + r) * kHalf + i] : sin[(t0 + r) * kHalf + i];
    const float x1 = static_cast<float>(s(r, i));
    const float x2 = static_cast<float>(s(r, i + kHalf));
    s(r, i) = static_cast<E>(x1 * c - x2 * sn);
    s(r, i + kHalf) = static_cast<E>(x2 * c + x1 * sn);
  }
}

}  // namespace rattention::cuda
