// Residual linear attention (RLA) on tensor cores: tile sizes, shared-memory layouts, the
// tiled MMA and the small device helpers shared by the forward and backward kernels.
//
// One CTA owns one (batch, kv head) and a slice of kBlockV value columns. Columns of v (and
// of the state S = sum phi(k) v^T and of the output) are independent, so slicing them is
// free parallelism at small B * Hkv; the price is that phi(q), phi(k) and the masked
// score block phi(q) phi(k)^T are recomputed by each column slice (cheap next to the state).
//
// Precision (SPEC.md: bf16/fp16 paths within 2x the error of plain PyTorch in that dtype):
//   * phi(q), phi(k) are computed in fp32 from the raw tile, rounded to the input dtype for
//     the MMA (exactly what a bf16 PyTorch implementation does);
//   * the state S stays fp32 in shared memory; every MMA accumulates in fp32;
//   * the inter-chunk product phi(q) S uses S split into hi + lo halves in the input dtype
//     (S = hi + lo to ~16 mantissa bits), so the fp32 state is not rounded to bf16 there.
//     Where shared memory allows (kSmemFwdHalves), the forward keeps both halves in shared
//     memory beside the fp32 state, written with every state update, and feeds them to the
//     MMA by ldmatrix like any other operand; else it splits each element on the way
//     (gemm_s_state_split).
#pragma once
#include <cute/tensor.hpp>
#include <cutlass/bfloat16.h>
#include <cutlass/half.h>

#include <type_traits>

#include "core/feature_map.h"
#include "cuda/launch.cuh"
#include "dyn_smem.cuh"  // DynSmem<N>: dynamic smem in the kernel name for tools/cuda_check.py
#include "core/params.h"
#include "nan_tiles.cuh"  // is_nonfinite: phi_tile_to_smem reports the NaN / Inf it wrote

namespace rattention::cuda {

template <typename Element>
struct RlaMmaAtom;
template <>
struct RlaMmaAtom<cutlass::bfloat16_t> {
  using type = cute::SM80_16x8x16_F32BF16BF16F32_TN;
};
template <>
struct RlaMmaAtom<cutlass::half_t> {
  using type = cute::SM80_16x8x16_F32F16F16F32_TN;
};

// kQParts_: phi(q) of a chunk is held kFeat / kQParts_ features at a time (the forward and the
// dk/dv kernel loop over the parts; each contraction over the features accumulates over them
// in the same order as in one piece, so the result does not depend on it). 1 keeps it whole;
// the configuration for GPUs with 99 KB of shared memory per block holds a 64-feature part
// (rla_config.h says which configuration runs where).
template <typename Element_, int kHeadDim_, int kBlockV_, int kQParts_ = 1>
struct RlaTraits {
  using Element = Element_;
  static constexpr int kHeadDim = kHeadDim_;     // D
  static constexpr int kFeat = 2 * kHeadDim_;    // 2D, width of phi
  static constexpr int kChunk = 64;              // C: rows per chunk (the op requires 64)
  static constexpr int kBlockV = kBlockV_;       // value columns per CTA
  // 8 warps: 4 along M (16 rows each) x 2 along N, so an SM holds 8 resident warps even
  // when the shared memory of a CTA (up to 161 KB at D = 128) allows only one CTA.
  static constexpr int kNWarps = 8;
  static constexpr int kNThreads = kNWarps * 32;
  static constexpr int kNVBlocks = kHeadDim / kBlockV;
  static constexpr int kQParts = kQParts_;          // phi(q) passes per (chunk, head)
  static constexpr int kQFeat = kFeat / kQParts_;   // features of phi(q) per pass
  static_assert(kHeadDim % kBlockV == 0, "value slices must tile D");
  static_assert(kBlockV % 32 == 0, "the MMA tile is 32 columns wide");
  static_assert(kFeat % kQParts_ == 0 && kQFeat % kChunk == 0,
                "a phi(q) part is whole 64-feature tiles");
  static_assert(kHeadDim % 32 == 0, "phi rows: each lane owns D/32 entries");
  static_assert(kFeat % kChunk == 0, "state update walks 2D in kChunk-row tiles");

  // Warps 4 (M) x 2 (N): warp (m, n) owns rows 16m..16m+15 of a 64-row tile and, of every
  // 32 columns, the 16 at 16n..16n+15 (the N permutation (8,2,2):(1,16,8) puts the warp's two
  // 8-column atoms side by side, so one ldmatrix.x4 loads its B fragment of a 16-wide K
  // slice); Tile<64,32,16>. Two warps share every row of an accumulator, so a tile written
  // through the accumulator partition (sP, the state) needs a CTA barrier before another GEMM
  // reads it as an operand.
  using TiledMma = cute::TiledMMA<cute::MMA_Atom<typename RlaMmaAtom<Element>::type>,
                                  cute::Layout<cute::Shape<cute::_4, cute::_2, cute::_1>>,
                                  cute::Tile<cute::Int<64>,
                                             cute::Layout<cute::Shape<cute::_8, cute::_2, cute::_2>,
                                                          cute::Stride<cute::_1, cute::_16, cute::_8>>,
                                             cute::_16>>;

  // Padded row strides (elements): keeps the transposed operand reads off one bank.
  static constexpr int kPhiStride = kFeat + 8;    // sPhiK [C, 2D] (and sPhiQ of the dq pass)
  static constexpr int kQPhiStride = kQFeat + 8;  // sPhiQ part [C, kQFeat]
  static constexpr int kVStride = kBlockV + 8;    // sV [C, kBlockV]
  static constexpr int kPStride = kChunk + 8;     // sP [C, C]
  static constexpr int kSStride = kBlockV + 4;    // sS fp32 [2D, kBlockV]
  static constexpr int kHalfStride = kBlockV + 8;  // sShi, sSlo [2D, kBlockV]: S's halves

  static constexpr int kSmemS = kFeat * kSStride * 4;
  static constexpr int kSmemPhi = kChunk * kPhiStride * 2;
  static constexpr int kSmemV = kChunk * kVStride * 2;
  static constexpr int kSmemP = kChunk * kPStride * 2;
  static constexpr int kSmemPhiQ = kChunk * kQPhiStride * 2;
  // The forward's P tile reuses the phi(q) buffer (written once the head's phi(q) is read).
  static constexpr int kSmemPhiQP = kSmemPhiQ > kSmemP ? kSmemPhiQ : kSmemP;
  static constexpr int kSmemFwd = kSmemS + kSmemPhi + kSmemPhiQP + kSmemV;
  static constexpr int kSmemState = kSmemS + kSmemPhi + kSmemV;  // pass 1: S, phi(k), v
  // The forward with the state's hi and lo halves behind its other buffers (rla_fwd_kernel's
  // kHalves; rla_plan.h chooses it where the device allows this much).
  static constexpr int kSmemHalf = kFeat * kHalfStride * 2;
  static constexpr int kSmemFwdHalves = kSmemFwd + 2 * kSmemHalf;
  static_assert(kSmemFwd <= 227 * 1024, "forward shared memory");
  // ldmatrix reads 16-byte rows: every buffer offset and row stride must keep them aligned.
  static_assert(kPhiStride % 8 == 0 && kQPhiStride % 8 == 0 && kVStride % 8 == 0 &&
                    kPStride % 8 == 0 && kHalfStride % 8 == 0,
                "padded strides must be multiples of 8 elements (16 bytes)");
  static_assert(kSmemS % 16 == 0 && kSmemPhi % 16 == 0 && kSmemPhiQ % 16 == 0 &&
                    kSmemV % 16 == 0 && kSmemP % 16 == 0 && kSmemHalf % 16 == 0,
                "shared-memory buffers must start 16-byte aligned");
};

// Dynamic shared memory of the backward kernels (rla_bwd_dq_kernel, rla_bwd_state_kernel,
// rla_bwd_dkv_kernel).
template <class Tr>
struct RlaBwdSmem {
  static constexpr int kS = Tr::kSmemS;      // sS / sdS fp32 [2D, BV]
  static constexpr int kPhi = Tr::kSmemPhi;  // sPhiK, sPhiQ
  static constexpr int kV = Tr::kSmemV;      // sV, sdO (same shape [C, BV])
  static constexpr int kP = Tr::kSmemP;
  static constexpr int kDq = kS + kPhi + 2 * kV + kP;
  static constexpr int kDqHalves = kDq + 2 * Tr::kSmemHalf;  // rla_bwd_dq_kernel<Tr, true>
  static constexpr int kState = kS + kPhi + kV;  // rla_bwd_state_kernel: dS, phi(q), dO
  static constexpr int kPhiQ = Tr::kSmemPhiQ;  // sPhiQ part of the dk/dv kernel
  static constexpr int kDkv = kS + kPhi + kPhiQ + 2 * kV + kP;
  static_assert(kDkv <= 163 * 1024, "dkv kernel must fit sm_80 shared memory");
};

// ---- layouts (CuTe views on shared memory) ----------------------------------------------
// (rows, cols) row-major with a padded row stride.
template <int R, int Cc, int Ld>
CUTE_HOST_DEVICE constexpr auto row_major_padded() {
  return cute::make_layout(cute::make_shape(cute::Int<R>{}, cute::Int<Cc>{}),
                           cute::make_stride(cute::Int<Ld>{}, cute::_1{}));
}
// The transpose view of the same storage: (cols, rows) of a row-major (rows, cols) buffer.
template <int R, int Cc, int Ld>
CUTE_HOST_DEVICE constexpr auto row_major_padded_t() {
  return cute::make_layout(cute::make_shape(cute::Int<Cc>{}, cute::Int<R>{}),
                           cute::make_stride(cute::_1{}, cute::Int<Ld>{}));
}

// ---- GEMM from shared memory --------------------------------------------------------------
// Shared memory -> registers with ldmatrix. An operand view (rows, K) is either K-major
// (row_major_padded: 8 consecutive K values per row address -> LDSM_N) or rows-major (the
// transposed views row_major_padded_t -> LDSM_T, which transposes each 8x8 matrix on the
// way). Every padded stride is a multiple of 8 elements, so each row address is 16-byte
// aligned as ldmatrix requires. tools/ldsm_check.cu replays these copies on the host with
// the PTX semantics of ldmatrix and compares against the MMA's element-wise partition.
template <class Element, class Layout>
struct RlaLdsmAtom {
  static constexpr bool kKUnitStride =
      cute::is_constant<1, decltype(cute::stride<1>(Layout{}))>::value;
  static_assert(kKUnitStride || cute::is_constant<1, decltype(cute::stride<0>(Layout{}))>::value,
                "ldmatrix needs a unit stride along K or along the rows");
  using type = std::conditional_t<kKUnitStride, cute::Copy_Atom<cute::SM75_U32x4_LDSM_N, Element>,
                                  cute::Copy_Atom<cute::SM75_U16x8_LDSM_T, Element>>;
};

template <class TiledMma, class TA>
CUTE_HOST_DEVICE auto rla_smem_copy_A(TiledMma const& mma, TA const&) {
  using Layout = typename std::decay_t<TA>::layout_type;
  return cute::make_tiled_copy_A(typename RlaLdsmAtom<typename TiledMma::ValTypeA, Layout>::type{},
                                 mma);
}
template <class TiledMma, class TB>
CUTE_HOST_DEVICE auto rla_smem_copy_B(TiledMma const& mma, TB const&) {
  using Layout = typename std::decay_t<TB>::layout_type;
  return cute::make_tiled_copy_B(typename RlaLdsmAtom<typename TiledMma::ValTypeB, Layout>::type{},
                                 mma);
}

// acc(M, N) += A(M, K) * B(N, K)^T (+ A(M, K) * B2(N, K)^T when kTwoB), with sA, sB, sB2
// shared-memory views in the MMA's element type. Register fragments hold two 16-wide
// K-slices (ping-pong): slice k + 1 is ldmatrix-ed while slice k multiplies; with two B
// operands each K-slice of A multiplies B then B2 (the order gemm_s_state_split adds a
// state's hi and lo halves in). The loop over K is not unrolled (2D = 256 would unroll 16x),
// so the slot indices inside its body are compile-time constants.
template <bool kTwoB, class TiledMma, class Acc, class TA, class TB, class TB2>
__device__ __forceinline__ void gemm_ss_impl(TiledMma& mma, Acc& acc, TA const& sA, TB const& sB,
                                             TB2 const& sB2) {
  using namespace cute;
  const int tid = threadIdx.x;
  auto thr = mma.get_thread_slice(tid);
  auto copy_a = rla_smem_copy_A(mma, sA);
  auto copy_b = rla_smem_copy_B(mma, sB);
  auto copy_b2 = rla_smem_copy_B(mma, sB2);
  auto thr_a = copy_a.get_thread_slice(tid);
  auto thr_b = copy_b.get_thread_slice(tid);
  auto thr_b2 = copy_b2.get_thread_slice(tid);
  Tensor tAsA = thr_a.partition_S(sA);     // (CPY, CPY_M, CPY_K)
  Tensor tBsB = thr_b.partition_S(sB);     // (CPY, CPY_N, CPY_K)
  Tensor tBsB2 = thr_b2.partition_S(sB2);  // (CPY, CPY_N, CPY_K)
  constexpr int kM = decltype(size<0>(sA))::value;
  constexpr int kN = decltype(size<0>(sB))::value;
  Tensor tCrA = thr.partition_fragment_A(
      local_tile(sA, Shape<Int<kM>, _32>{}, make_coord(0, 0)));  // (MMA, MMA_M, 2)
  Tensor tCrB = thr.partition_fragment_B(
      local_tile(sB, Shape<Int<kN>, _32>{}, make_coord(0, 0)));  // (MMA, MMA_N, 2)
  // unused (no registers) with one B operand
  Tensor tCrB2 = thr.partition_fragment_B(
      local_tile(sB2, Shape<Int<kN>, _32>{}, make_coord(0, 0)));  // (MMA, MMA_N, 2)
  Tensor tCrA_v = thr_a.retile_D(tCrA);     // (CPY, CPY_M, 2)
  Tensor tCrB_v = thr_b.retile_D(tCrB);     // (CPY, CPY_N, 2)
  Tensor tCrB2_v = thr_b2.retile_D(tCrB2);  // (CPY, CPY_N, 2)
  constexpr int kK = decltype(size<2>(tAsA))::value;
  static_assert(kK % 2 == 0, "K must be a multiple of 32");
  copy(copy_a, tAsA(_, _, 0), tCrA_v(_, _, _0{}));
  copy(copy_b, tBsB(_, _, 0), tCrB_v(_, _, _0{}));
  if constexpr (kTwoB) copy(copy_b2, tBsB2(_, _, 0), tCrB2_v(_, _, _0{}));
#pragma unroll 1
  for (int k = 0; k < kK; k += 2) {
    copy(copy_a, tAsA(_, _, k + 1), tCrA_v(_, _, _1{}));
    copy(copy_b, tBsB(_, _, k + 1), tCrB_v(_, _, _1{}));
    if constexpr (kTwoB) copy(copy_b2, tBsB2(_, _, k + 1), tCrB2_v(_, _, _1{}));
    cute::gemm(mma, acc, tCrA(_, _, _0{}), tCrB(_, _, _0{}), acc);
    if constexpr (kTwoB) cute::gemm(mma, acc, tCrA(_, _, _0{}), tCrB2(_, _, _0{}), acc);
    if (k + 2 < kK) {
      copy(copy_a, tAsA(_, _, k + 2), tCrA_v(_, _, _0{}));
      copy(copy_b, tBsB(_, _, k + 2), tCrB_v(_, _, _0{}));
      if constexpr (kTwoB) copy(copy_b2, tBsB2(_, _, k + 2), tCrB2_v(_, _, _0{}));
    }
    cute::gemm(mma, acc, tCrA(_, _, _1{}), tCrB(_, _, _1{}), acc);
    if constexpr (kTwoB) cute::gemm(mma, acc, tCrA(_, _, _1{}), tCrB2(_, _, _1{}), acc);
  }
}
template <class TiledMma, class Acc, class TA, class TB>
__device__ __forceinline__ void gemm_ss(TiledMma& mma, Acc& acc, TA const& sA, TB const& sB) {
  gemm_ss_impl<false>(mma, acc, sA, sB, sB);
}
// acc += A (hi + lo)^T for a state held as its two halves in shared memory (sHi, sLo:
// split_hi_lo of the fp32 state), the same MMAs in the same order as gemm_s_state_split.
template <class TiledMma, class Acc, class TA, class TB>
__device__ __forceinline__ void gemm_ss_halves(TiledMma& mma, Acc& acc, TA const& sA,
                                               TB const& sHi, TB const& sLo) {
  gemm_ss_impl<true>(mma, acc, sA, sHi, sLo);
}

// x = hi + lo to ~16 mantissa bits (bf16) / ~22 (fp16): hi = x rounded to EB, lo = the rest.
template <class EB>
__device__ __forceinline__ void split_hi_lo(float x, EB& hi, EB& lo) {
  hi = EB(x);
  lo = EB(x - float(hi));
}

// acc(M, N) += A(M, K) * X(N, K)^T where X = S (+ H) is fp32: X is split per element into
// hi + lo in the MMA type and both halves are multiplied (two MMAs per K-slice), so the
// product sees ~16 mantissa bits of the fp32 state instead of 8.
template <class TiledMma, class Acc, class TA, class TS, class TH>
__device__ __forceinline__ void gemm_s_state_split(TiledMma& mma, Acc& acc, TA const& sA,
                                                   TS const& sX, TH const& gH, bool has_h) {
  using namespace cute;
  const int tid = threadIdx.x;
  auto thr = mma.get_thread_slice(tid);
  auto copy_a = rla_smem_copy_A(mma, sA);
  auto thr_a = copy_a.get_thread_slice(tid);
  Tensor tAsA = thr_a.partition_S(sA);  // (CPY, CPY_M, CPY_K)
  Tensor tCsX = thr.partition_B(sX);    // (MMA, MMA_N, MMA_K) fp32 smem
  Tensor tCgH = thr.partition_B(gH);    // (MMA, MMA_N, MMA_K) fp32 gmem (H0 slice)
  constexpr int kM = decltype(size<0>(sA))::value;
  Tensor tCrA = thr.partition_fragment_A(
      local_tile(sA, Shape<Int<kM>, _16>{}, make_coord(0, 0)));  // (MMA, MMA_M, 1)
  Tensor tCrA_v = thr_a.retile_D(tCrA);
  using EB = typename TiledMma::ValTypeB;
  // Not unrolled over K: one K-slice of fragments live at a time (no spills at 2D = 256);
  // each slice still issues MMA_M x MMA_N independent MMAs. A comes by ldmatrix; the fp32
  // state is read element-wise because it is split into hi + lo on the way.
#pragma unroll 1
  for (int k = 0; k < size<2>(tCsX); ++k) {
    copy(copy_a, tAsA(_, _, k), tCrA_v(_, _, _0{}));
    Tensor tCrHi = make_tensor<EB>(shape(tCsX(_, _, k)));
    Tensor tCrLo = make_tensor<EB>(shape(tCsX(_, _, k)));
    CUTE_UNROLL
    for (int i = 0; i < size(tCrHi); ++i) {
      float x = tCsX(_, _, k)(i);
      if (has_h) x += tCgH(_, _, k)(i);
      split_hi_lo(x, tCrHi(i), tCrLo(i));
    }
    cute::gemm(mma, acc, tCrA(_, _, _0{}), tCrHi, acc);
    cute::gemm(mma, acc, tCrA(_, _, _0{}), tCrLo, acc);
  }
}

// The causal chunk mask on a (C, C) score accumulator, stored to its shared tile in the MMA
// type: entry (row i, key j) kept iff j <= i, else zero. tSsP, tScS: the tile's and the
// coordinates' accumulator partitions. The two warps of a row block write half of its
// columns each, so a CTA barrier comes before the tile is read.
template <class TP, class TC, class Acc>
__device__ __forceinline__ void store_causal_mask(TP& tSsP, TC const& tScS, Acc const& acc) {
  using Element = typename TP::value_type;
  CUTE_UNROLL
  for (int i = 0; i < cute::size(acc); ++i)
    tSsP(i) = Element(cute::get<1>(tScS(i)) <= cute::get<0>(tScS(i)) ? acc(i) : 0.f);
}

// S += phi(k)^T v for the key rows of a chunk (sPhiK, sV loaded), the fp32 state slice
// sS [2D, BV] updated in place in 64-row tiles: the forward's passes 1 and 3 and the
// backward's dq pass. `also(m, acc)` sees each updated (C, BV) tile m in its accumulator.
template <class Tr, class TiledMma, class TS, class TK, class TV, class Also>
__device__ __forceinline__ void rla_state_update(TiledMma& mma, TS& sS, TK const& sPhiKt,
                                                 TV const& sVt, Also&& also) {
  using namespace cute;
  constexpr int C = Tr::kChunk, F = Tr::kFeat, BV = Tr::kBlockV;
  auto thr = mma.get_thread_slice(threadIdx.x);
  CUTE_UNROLL
  for (int m = 0; m < F / C; ++m) {
    Tensor sS_m = local_tile(sS, Shape<Int<C>, Int<BV>>{}, make_coord(m, 0));         // (C, BV)
    Tensor sPhiKt_m = local_tile(sPhiKt, Shape<Int<C>, Int<C>>{}, make_coord(m, 0));  // (C feat, C keys)
    Tensor tUsS = thr.partition_C(sS_m);
    Tensor acc_u = partition_fragment_C(mma, Shape<Int<C>, Int<BV>>{});
    CUTE_UNROLL
    for (int i = 0; i < size(acc_u); ++i) acc_u(i) = tUsS(i);
    gemm_ss(mma, acc_u, sPhiKt_m, sVt);
    CUTE_UNROLL
    for (int i = 0; i < size(acc_u); ++i) tUsS(i) = acc_u(i);
    also(m, acc_u);
  }
}
template <class Tr, class TiledMma, class TS, class TK, class TV>
__device__ __forceinline__ void rla_state_update(TiledMma& mma, TS& sS, TK const& sPhiKt,
                                                 TV const& sVt) {
  rla_state_update<Tr>(mma, sS, sPhiKt, sVt, [](int, auto const&) {});
}
// rla_state_update, with kHalves also writing the updated state's halves to sHi, sLo
// [2D, BV] (split_hi_lo) for gemm_ss_halves. Each thread writes the entries it updated, so the
// barrier that makes sS complete makes the halves complete too. Accumulator entries i, i + 1
// (i even) are a column pair of one row (the MMA's C fragment; asserted on the partition's
// layout), so each half of a pair goes out as one 4-byte store.
template <class Tr, bool kHalves, class TiledMma, class TS, class TH, class TK, class TV>
__device__ __forceinline__ void rla_state_update_halves_if(TiledMma& mma, TS& sS, TH& sHi, TH& sLo,
                                                           TK const& sPhiKt, TV const& sVt) {
  using namespace cute;
  if constexpr (!kHalves) {
    rla_state_update<Tr>(mma, sS, sPhiKt, sVt);
  } else {
    constexpr int C = Tr::kChunk, BV = Tr::kBlockV;
    auto thr = mma.get_thread_slice(threadIdx.x);
    rla_state_update<Tr>(mma, sS, sPhiKt, sVt, [&](int m, auto const& acc_u) {
      Tensor tUsHi = thr.partition_C(local_tile(sHi, Shape<Int<C>, Int<BV>>{}, make_coord(m, 0)));
      Tensor tUsLo = thr.partition_C(local_tile(sLo, Shape<Int<C>, Int<BV>>{}, make_coord(m, 0)));
      static_assert(decltype(size<0, 0>(tUsHi))::value == 2 &&
                        is_constant<1, decltype(stride<0, 0>(tUsHi))>::value,
                    "entries 2j, 2j + 1 of the partition are adjacent columns");
      using EB = typename std::decay_t<TH>::value_type;
      CUTE_UNROLL
      for (int i = 0; i < size(acc_u); i += 2) {
        EB hi[2], lo[2];
        split_hi_lo(acc_u(i), hi[0], lo[0]);
        split_hi_lo(acc_u(i + 1), hi[1], lo[1]);
        uint32_t hi2, lo2;
        memcpy(&hi2, hi, 4);
        memcpy(&lo2, lo, 4);
        *reinterpret_cast<uint32_t*>(RATT_VECTOR_ACCESS(&tUsHi(i), 4)) = hi2;
        *reinterpret_cast<uint32_t*>(RATT_VECTOR_ACCESS(&tUsLo(i), 4)) = lo2;
      }
    });
  }
}

// The state slice [2D, BV] at a segment start into sS: the checkpoint gCkpt (row stride D,
// at the slice's first column), plus gH0 (the same layout) unless it is null; with kHalves
// also its halves into sHi, sLo (the forward's and the dq pass's kHalves kernels).
template <class Tr, bool kHalves, class TS, class TH>
__device__ __forceinline__ void load_state_start(const float* gCkpt, const float* gH0, TS& sS,
                                                 TH& sHi, TH& sLo) {
  constexpr int F = Tr::kFeat, D = Tr::kHeadDim, BV = Tr::kBlockV;
  for (int i = threadIdx.x; i < F * BV; i += Tr::kNThreads) {
    const int r = i / BV, c = i % BV;
    float x = gCkpt[r * D + c];
    if (gH0 != nullptr) x += gH0[r * D + c];
    sS(r, c) = x;
    if constexpr (kHalves) split_hi_lo(x, sHi(r, c), sLo(r, c));
  }
}

// ---- feature map of one row, a group of lanes ---------------------------------------------
// kLanes consecutive lanes (a power of two, at most 32) share a row; lane l of the group owns
// entries [l*E, l*E + E) of it and x holds them in fp32. Row reductions are xor shuffles
// inside the group (every lane of the warp takes part); the map is the one of
// core/feature_map.h.
template <int kLanes = 32>
__device__ __forceinline__ float lanes_sum(float x) {
#pragma unroll
  for (int o = kLanes / 2; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}
template <int kLanes = 32>
__device__ __forceinline__ float lanes_max(float x) {
#pragma unroll
  for (int o = kLanes / 2; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
  return x;
}
template <int kLanes = 32>
__device__ __forceinline__ float lanes_min(float x) {
#pragma unroll
  for (int o = kLanes / 2; o > 0; o >>= 1) x = fminf(x, __shfl_xor_sync(0xffffffffu, x, o));
  return x;
}

// The softmax feature map of the lane's E entries: pos = softmax(x), neg = softmax(-x) over
// the row (the group's kLanes lanes).
template <int E, int kLanes = 32>
__device__ __forceinline__ void softmax_phi_lane(const float (&x)[E], float (&pos)[E],
                                                 float (&neg)[E]) {
  float mx = x[0], mn = x[0];
#pragma unroll
  for (int e = 1; e < E; ++e) {
    mx = fmaxf(mx, x[e]);
    mn = fminf(mn, x[e]);
  }
  mx = lanes_max<kLanes>(mx);
  mn = lanes_min<kLanes>(mn);
  float sp = 0.f, sn = 0.f;
#pragma unroll
  for (int e = 0; e < E; ++e) {
    pos[e] = __expf(x[e] - mx);
    neg[e] = __expf(mn - x[e]);
    sp += pos[e];
    sn += neg[e];
  }
  const float ip = 1.f / lanes_sum<kLanes>(sp), in = 1.f / lanes_sum<kLanes>(sn);
#pragma unroll
  for (int e = 0; e < E; ++e) {
    pos[e] *= ip;
    neg[e] *= in;
  }
}

// phi of the lane's E entries: pos[e] = f(x)[l*E+e], neg[e] = f(-x)[l*E+e].
template <int E, int kLanes = 32>
__device__ __forceinline__ void phi_lane(FeatureMap fm, const float (&x)[E], float (&pos)[E],
                                         float (&neg)[E]) {
  if (fm == FeatureMap::kRelu) {
    RATT_COVER("relu");
#pragma unroll
    for (int e = 0; e < E; ++e) {
      pos[e] = x[e] <= 0.f ? 0.f : x[e];  // by select: NaN maps to NaN (fmaxf would give 0)
      neg[e] = x[e] >= 0.f ? 0.f : -x[e];
    }
    return;
  }
  RATT_COVER("softmax");
  softmax_phi_lane<E, kLanes>(x, pos, neg);
}

// ---- 16-byte global loads and shared stores ---------------------------------------------
// The CUDA ops hand the kernels q, k, v (and the backward's fp32 grad_out) with rows
// contiguous along D, 16-byte aligned, every other stride whole 16-byte pieces (op_common.cpp
// rows_16byte_aligned copies any other view; the JAX FFI's buffers are dense and aligned), so
// the loaders below move 8 two-byte (4 fp32) elements from a multiple of 8 (4) as one 16-byte
// access (RATT_VECTOR_ACCESS: the emulator reports a misaligned one, as the GPU faults on it).
constexpr int kVec16 = 8;  // two-byte elements per 16-byte piece

// N two-byte elements of a row (N a multiple of 8) as 16-byte pieces, to fp32.
template <class Element, int N>
__device__ __forceinline__ void pieces_to_float(const uint4 (&u)[N / kVec16], float (&out)[N]) {
  static_assert(sizeof(Element) == 2 && N % kVec16 == 0, "whole 16-byte pieces");
#pragma unroll
  for (int c = 0; c < N / kVec16; ++c) {
    const Element* h = reinterpret_cast<const Element*>(&u[c]);
#pragma unroll
    for (int e = 0; e < kVec16; ++e) out[c * kVec16 + e] = float(h[e]);
  }
}

// N fp32 values (N a multiple of 8) rounded to Element into y, 16-byte aligned; zeros when
// !keep. Returns whether a stored value is NaN / Inf (a finite value may round to Inf).
template <int N, class Element>
__device__ __forceinline__ bool store_row_chunk(Element* y, const float (&v)[N], bool keep) {
  static_assert(sizeof(Element) == 2 && N % kVec16 == 0, "whole 16-byte pieces");
  bool nonfinite = false;
#pragma unroll
  for (int c = 0; c < N / kVec16; ++c) {
    uint4 u;
    Element* h = reinterpret_cast<Element*>(&u);
#pragma unroll
    for (int e = 0; e < kVec16; ++e) {
      h[e] = Element(keep ? v[c * kVec16 + e] : 0.f);
      nonfinite |= is_nonfinite(h[e]);
    }
    *reinterpret_cast<uint4*>(RATT_VECTOR_ACCESS(y + c * kVec16, 16)) = u;
  }
  return nonfinite;
}

// phi of `kChunk` rows into sPhi [kChunk, kCols] (row stride kStride): features
// [f0, f0 + kCols) of phi (f0 = 0, kCols = 2D: the whole row; the dk/dv kernel and the forward
// hold phi(q) in parts, RlaTraits::kQParts, each computed from the whole raw row). Row r
// reads gX + r * row_stride when valid(r), else writes zeros (masked keys/queries must be
// exact zeros: they enter the K dimension of the state update). The rows are spread over all
// threads: kPhiLanes lanes per row, each loading its D / kPhiLanes entries in 16-byte pieces
// and storing its f(x) and f(-x) entries the same way, so a warp maps 32 / kPhiLanes rows at
// once with 3-step shuffle reductions (a warp per row took 5 steps and 2-byte loads).
// Two steps: load_phi_rows issues every load of the thread's rows into registers (PhiRows),
// store_phi_rows maps them into sPhi, so a tile costs one global round trip, and a kernel can
// load the next tile's rows ahead, behind other work (the forward's heads).
constexpr int kPhiLanes = 8;
template <class Tr>
struct PhiRows {
  static constexpr int kEntries = Tr::kHeadDim / kPhiLanes;       // E: per lane and row
  static constexpr int kRowsPerPass = Tr::kNThreads / kPhiLanes;
  static constexpr int kPasses = Tr::kChunk / kRowsPerPass;       // rows per thread
  static_assert(kEntries % kVec16 == 0, "a lane's entries are whole 16-byte pieces");
  // every thread runs the same passes, so the group shuffles see all 32 lanes
  static_assert(Tr::kChunk % kRowsPerPass == 0, "whole passes over the chunk");
  uint4 raw[kPasses][kEntries / kVec16];  // row threadIdx.x / kPhiLanes + pass * kRowsPerPass
  // the row of a pass, the lane's first entry in it
  static __device__ __forceinline__ int row(int pass) {
    return int(threadIdx.x) / kPhiLanes + pass * kRowsPerPass;
  }
  static __device__ __forceinline__ int entry0() { return (int(threadIdx.x) % kPhiLanes) * kEntries; }
};

// The thread's entries of rows r with valid(r) (pointers of the others are never formed into
// loads; their entries are zero), all passes' 16-byte loads issued before any is used.
template <class Tr, class Valid>
__device__ __forceinline__ void load_phi_rows(PhiRows<Tr>& rows, const typename Tr::Element* gX,
                                              int64_t row_stride, Valid valid) {
  using R = PhiRows<Tr>;
#pragma unroll
  for (int ps = 0; ps < R::kPasses; ++ps) {
    const int r = R::row(ps);
    const bool ok = valid(r);
#pragma unroll
    for (int c = 0; c < R::kEntries / kVec16; ++c) {
      rows.raw[ps][c] = make_uint4(0u, 0u, 0u, 0u);
      if (ok) {
        rows.raw[ps][c] = *reinterpret_cast<const uint4*>(
            RATT_VECTOR_ACCESS(gX + r * row_stride + R::entry0() + c * kVec16, 16));
      }
    }
  }
}

// phi of the loaded rows into sPhi (valid as at the load: invalid rows get zeros, their lanes
// still join the shuffles). Returns whether this thread wrote a NaN / Inf (the CTA's OR comes
// from the barrier that completes the tile; nan_tiles.cuh).
template <class Tr, int kCols = Tr::kFeat, int kStride = Tr::kPhiStride, class Valid>
__device__ __forceinline__ bool store_phi_rows(FeatureMap fm, const PhiRows<Tr>& rows, Valid valid,
                                               typename Tr::Element* sPhi, int f0 = 0) {
  using R = PhiRows<Tr>;
  using Element = typename Tr::Element;
  constexpr int D = Tr::kHeadDim, E = R::kEntries;
  static_assert(kCols == Tr::kFeat || kCols % E == 0, "a lane's entries lie in one part");
  static_assert(kStride % kVec16 == 0, "rows of sPhi start 16-byte aligned");
  const int e0 = R::entry0();
  // its f(x) entries are features e0.., its f(-x) entries D + e0..: stored when in the part
  const bool pos_in = kCols == Tr::kFeat || (e0 >= f0 && e0 < f0 + kCols);
  const bool neg_in = kCols == Tr::kFeat || (D + e0 >= f0 && D + e0 < f0 + kCols);
  bool nonfinite = false;
#pragma unroll
  for (int ps = 0; ps < R::kPasses; ++ps) {
    const int r = R::row(ps);
    const bool ok = valid(r);
    float x[E], pos[E], neg[E];
    pieces_to_float<Element, E>(rows.raw[ps], x);
    phi_lane<E, kPhiLanes>(fm, x, pos, neg);
    Element* y = sPhi + r * kStride;
    if (pos_in) nonfinite |= store_row_chunk<E>(y + e0 - f0, pos, ok);
    if (neg_in) nonfinite |= store_row_chunk<E>(y + D + e0 - f0, neg, ok);
  }
  return nonfinite;
}

// Both steps at once.
template <class Tr, int kCols = Tr::kFeat, int kStride = Tr::kPhiStride, class Valid>
__device__ __forceinline__ bool phi_tile_to_smem(FeatureMap fm, const typename Tr::Element* gX,
                                                 int64_t row_stride, Valid valid,
                                                 typename Tr::Element* sPhi, int f0 = 0) {
  PhiRows<Tr> rows;
  load_phi_rows<Tr>(rows, gX, row_stride, valid);
  return store_phi_rows<Tr, kCols, kStride>(fm, rows, valid, sPhi, f0);
}
// Part `part` of phi(q) (RlaTraits::kQParts) into a [kChunk, kQFeat] buffer, from rows loaded
// ahead (load_phi_rows).
template <class Tr, class Valid>
__device__ __forceinline__ bool store_phi_q_part(FeatureMap fm, const PhiRows<Tr>& rows,
                                                 Valid valid, typename Tr::Element* sPhiQ,
                                                 int part) {
  if (part > 0) RATT_COVER_ANY("phi_q_part");
  return store_phi_rows<Tr, Tr::kQFeat, Tr::kQPhiStride>(fm, rows, valid, sPhiQ,
                                                         part * Tr::kQFeat);
}
// The same with the rows' loads (both steps at once).
template <class Tr, class Valid>
__device__ __forceinline__ bool phi_q_part_to_smem(FeatureMap fm, const typename Tr::Element* gX,
                                                   int64_t row_stride, Valid valid,
                                                   typename Tr::Element* sPhiQ, int part) {
  PhiRows<Tr> rows;
  load_phi_rows<Tr>(rows, gX, row_stride, valid);
  return store_phi_q_part<Tr>(fm, rows, valid, sPhiQ, part);
}

// A [kChunk, kBlockV] slice of value rows into sV (stride kVStride); invalid rows are zero.
// 16-byte pieces, piece idx = threadIdx.x + i * kNThreads of the tile (row idx / kPieces);
// as the phi rows, in two steps (load_v_rows into registers, store_v_rows) so that a kernel
// can load the next chunk's values ahead.
// A [kChunk, kBlockV] tile as 16-byte pieces of kPerPiece elements, spread over the CTA:
// the thread's i-th piece is piece(i) of the tile, at (row(i), col(i)).
template <class Tr, int kPerPiece>
struct TilePieces {
  static constexpr int kPieces = Tr::kBlockV / kPerPiece;  // per row
  static constexpr int kPerThread = Tr::kChunk * kPieces / Tr::kNThreads;
  static_assert(Tr::kBlockV % kPerPiece == 0, "whole pieces per row");
  static_assert(Tr::kChunk * kPieces % Tr::kNThreads == 0, "whole pieces per thread");
  static __device__ __forceinline__ int piece(int i) { return int(threadIdx.x) + i * Tr::kNThreads; }
  static __device__ __forceinline__ int row(int i) { return piece(i) / kPieces; }
  static __device__ __forceinline__ int col(int i) { return (piece(i) % kPieces) * kPerPiece; }
};
template <class Tr>
struct VRows : TilePieces<Tr, kVec16> {
  static_assert(Tr::kVStride % kVec16 == 0, "rows of sV start 16-byte aligned");
  uint4 raw[TilePieces<Tr, kVec16>::kPerThread];
};
template <class Tr, class Valid>
__device__ __forceinline__ void load_v_rows(VRows<Tr>& rows, const typename Tr::Element* gV,
                                            int64_t row_stride, Valid valid) {
  using R = VRows<Tr>;
#pragma unroll
  for (int i = 0; i < R::kPerThread; ++i) {
    rows.raw[i] = make_uint4(0u, 0u, 0u, 0u);  // zero bits: +0 in bf16 and fp16
    if (valid(R::row(i))) {
      rows.raw[i] = *reinterpret_cast<const uint4*>(
          RATT_VECTOR_ACCESS(gV + R::row(i) * row_stride + R::col(i), 16));
    }
  }
}
// `zero_nonfinite`: NaN / Inf entries are stored as zeros too (nan_tiles.cuh: the forward
// adds them back only where the mask lets them in), and the result says whether this thread
// saw one.
template <class Tr, bool zero_nonfinite = false>
__device__ __forceinline__ bool store_v_rows(const VRows<Tr>& rows, typename Tr::Element* sV) {
  using R = VRows<Tr>;
  using Element = typename Tr::Element;
  bool any = false;
#pragma unroll
  for (int i = 0; i < R::kPerThread; ++i) {
    uint4 u = rows.raw[i];
    if constexpr (zero_nonfinite) {
      Element* h = reinterpret_cast<Element*>(&u);
#pragma unroll
      for (int e = 0; e < kVec16; ++e) {
        const bool bad = is_nonfinite(h[e]);
        any |= bad;
        if (bad) h[e] = Element(0.f);
      }
    }
    *reinterpret_cast<uint4*>(RATT_VECTOR_ACCESS(sV + R::row(i) * Tr::kVStride + R::col(i), 16)) = u;
  }
  return any;
}
// Both steps at once.
template <class Tr, bool zero_nonfinite = false, class Valid>
__device__ __forceinline__ bool load_v_tile(const typename Tr::Element* gV, int64_t row_stride,
                                            Valid valid, typename Tr::Element* sV) {
  VRows<Tr> rows;
  load_v_rows<Tr>(rows, gV, row_stride, valid);
  return store_v_rows<Tr, zero_nonfinite>(rows, sV);
}

// dO rows [C, BV] (fp32 global, 16-byte pieces) -> sdO in the MMA type; rows >= `rows` zero.
// Piece idx = threadIdx.x + i * kNThreads (row idx / kPieces); in two steps as the value rows.
template <class Tr>
struct DoRows : TilePieces<Tr, 4> {  // float4 pieces
  float4 raw[TilePieces<Tr, 4>::kPerThread];
};
template <class Tr>
__device__ __forceinline__ void load_do_rows(DoRows<Tr>& rows, const float* gdO, int64_t row_stride,
                                             int valid_rows) {
  using R = DoRows<Tr>;
#pragma unroll
  for (int i = 0; i < R::kPerThread; ++i) {
    rows.raw[i] = make_float4(0.f, 0.f, 0.f, 0.f);
    if (R::row(i) < valid_rows) {
      rows.raw[i] = *reinterpret_cast<const float4*>(
          RATT_VECTOR_ACCESS(gdO + R::row(i) * row_stride + R::col(i), 16));
    }
  }
}
template <class Tr>
__device__ __forceinline__ void store_do_rows(const DoRows<Tr>& rows, typename Tr::Element* sdO) {
  using R = DoRows<Tr>;
  using Element = typename Tr::Element;
#pragma unroll
  for (int i = 0; i < R::kPerThread; ++i) {
    const float4 x = rows.raw[i];
    Element* y = sdO + R::row(i) * Tr::kVStride + R::col(i);  // 8-byte aligned: col % 4 == 0
    y[0] = Element(x.x);
    y[1] = Element(x.y);
    y[2] = Element(x.z);
    y[3] = Element(x.w);
  }
}
// Both steps at once.
template <class Tr>
__device__ __forceinline__ void load_do_tile(const float* gdO, int64_t row_stride, int rows,
                                             typename Tr::Element* sdO) {
  DoRows<Tr> r;
  load_do_rows<Tr>(r, gdO, row_stride, rows);
  store_do_rows<Tr>(r, sdO);
}

// The (sequence, kv head, segment) of a CTA of the segment grids, segments of `seg_chunks`
// chunks: the checkpoint segments (rla_fwd_state_kernel, rla_fwd_kernel, rla_bwd_dq_kernel)
// or the backward's dk/dv segments (RlaBwdSegments). Dense: grid y = b * Hkv + kv head,
// z = segment * parts + part. Packed: y = kv head, z = a slot of the O(1) tile-slot rule
// (QkvParams::packed_tile_slots with kChunk * seg_chunks rows; for the checkpoints that is
// RlaCommonParams::ckpt_slot0); a slot past the document's last segment has no work (!valid).
// `parts` CTAs share a dense checkpoint segment when the segments alone do not fill the GPU
// (rla_segment_parts; packed: 1): part k owns ceil(len / parts) of the segment's len chunks,
// [part_begin, part_end), possibly none; the kernels that need the state at part_begin
// advance it from the checkpoint at seg_begin.
struct RlaSegmentCta {
  int64_t b, hk, z;  // sequence, kv head, segment inside the sequence
  int64_t T;         // rows of the sequence
  int64_t n_chunks, n_seg;
  int64_t seg_begin, seg_end;    // the segment's chunks
  int64_t part, part_begin, part_end;  // this CTA's part and its chunks
  bool valid;
};
template <int kChunk>
__device__ __forceinline__ RlaSegmentCta rla_segment_cta(const RlaCommonParams& p, int64_t seg_chunks,
                                                         int64_t parts = 1) {
  const int64_t Hkv = p.dims.heads_kv;
  RlaSegmentCta s;
  if (p.packed()) {
    s.b = p.seq_of_tile_slot(blockIdx.z, kChunk * seg_chunks);
    s.hk = blockIdx.y;
    s.z = blockIdx.z - p.tile_slot0(s.b, kChunk * seg_chunks);
    s.part = 0;
  } else {
    s.b = blockIdx.y / Hkv;
    s.hk = blockIdx.y % Hkv;
    s.z = blockIdx.z / parts;
    s.part = blockIdx.z % parts;
  }
  s.T = p.seqlen_q(s.b);
  s.n_chunks = ceil_div(s.T, kChunk);
  s.n_seg = ceil_div(s.n_chunks, seg_chunks);
  s.valid = s.z < s.n_seg;
  s.seg_begin = s.z * seg_chunks;
  s.seg_end = imin(s.n_chunks, s.seg_begin + seg_chunks);
  const int64_t part_chunks = ceil_div(imax(0, s.seg_end - s.seg_begin), parts);
  s.part_begin = s.seg_begin + s.part * part_chunks;
  s.part_end = imin(s.seg_end, s.part_begin + part_chunks);
  return s;
}
// The backward's dk/dv segments, `chunks` chunks each (rla_bwd_plan chooses it from the SM
// count, not from checkpoint_every: the dk/dv pass needs only the suffix state, which the
// per-segment sums and their scan give at every segment start). The per-segment buffers (the
// suffix states dS, the dH0 partials) hold one [2D, D] state per (sequence, head, segment):
// dense [B, H, slots], packed [H, slots] with document b's segments from
// tile_slot0(b, C * chunks), as the checkpoints are laid out.
struct RlaBwdSegments {
  int64_t chunks;  // chunks per segment
  int64_t slots;   // grid z: segments per sequence (dense), slots of all documents (packed)
  RATT_HD int64_t index(const RlaCommonParams& p, int64_t b, int64_t head, int64_t heads,
                        int64_t z) const {
    return p.packed() ? head * slots + p.tile_slot0(b, p.chunk_size * chunks) + z
                      : (b * heads + head) * slots + z;
  }
};

}  // namespace rattention::cuda
