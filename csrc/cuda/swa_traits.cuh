// Kernel traits of the SWA kernels: tile sizes, swizzled smem layouts, tiled MMA, copies.
// One instantiation per (Element, kHeadDim); window, T, GQA, scale, rotary are runtime.
#pragma once
#include <cute/tensor.hpp>
#include <cutlass/numeric_types.h>

namespace rattention {
namespace cuda {

// Dynamic shared memory of a kernel as a template argument, so the demangled kernel name
// tells tools/cuda_check.py how much the launcher requests (ptxas only sees static smem).
template <int N>
struct DynSmem {
  static constexpr int value = N;
};

template <typename Element_, int kHeadDim_, int kBlockM_, int kBlockN_, int kNWarps_>
struct SwaFwdTraits {
  using Element = Element_;
  using ElementAccum = float;
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kBlockM = kBlockM_;  // query rows per CTA
  static constexpr int kBlockN = kBlockN_;  // key rows per tile
  static constexpr int kNWarps = kNWarps_;
  static constexpr int kNThreads = kNWarps * 32;
  static_assert(kHeadDim == 64 || kHeadDim == 128, "head dim 64 or 128");
  static_assert(kBlockM == 16 * kNWarps, "each warp owns 16 query rows (one MMA M tile)");
  static_assert(kBlockN % 16 == 0, "key tile must be a multiple of the MMA K (16)");

  static constexpr bool kIsBf16 = cute::is_same_v<Element, cutlass::bfloat16_t>;
  using MmaAtom = cute::conditional_t<kIsBf16, cute::SM80_16x8x16_F32BF16BF16F32_TN,
                                      cute::SM80_16x8x16_F32F16F16F32_TN>;
  // Warps tile M; the N permutation of 16 makes each warp's B fragment one ldmatrix.x4.
  using TiledMma = cute::TiledMMA<cute::MMA_Atom<MmaAtom>,
                                  cute::Layout<cute::Shape<cute::Int<kNWarps>, cute::_1, cute::_1>>,
                                  cute::Tile<cute::Int<16 * kNWarps>, cute::_16, cute::_16>>;

  // Smem rows of 64 elements (128 B) with Swizzle<3,3,3>: ldmatrix of 8 rows hits 8
  // different bank groups, and cp.async writes 16 B chunks without conflicts.
  static constexpr int kBlockKSmem = 64;
  using SmemLayoutAtom = decltype(cute::composition(
      cute::Swizzle<3, 3, 3>{},
      cute::Layout<cute::Shape<cute::_8, cute::Int<kBlockKSmem>>,
                   cute::Stride<cute::Int<kBlockKSmem>, cute::_1>>{}));
  using SmemLayoutQ = decltype(cute::tile_to_shape(
      SmemLayoutAtom{}, cute::Shape<cute::Int<kBlockM>, cute::Int<kHeadDim>>{}));
  using SmemLayoutKV = decltype(cute::tile_to_shape(
      SmemLayoutAtom{}, cute::Shape<cute::Int<kBlockN>, cute::Int<kHeadDim>>{}));
  // V seen as [D, kBlockN] (the B operand of O = P V), read with ldmatrix.trans.
  using SmemLayoutVt = decltype(cute::composition(
      SmemLayoutKV{}, cute::make_layout(cute::Shape<cute::Int<kHeadDim>, cute::Int<kBlockN>>{},
                                        cute::GenRowMajor{})));
  using SmemLayoutVtNoSwizzle = decltype(cute::get_nonswizzle_portion(SmemLayoutVt{}));

  using SmemCopyAtom = cute::Copy_Atom<cute::SM75_U32x4_LDSM_N, Element>;
  using SmemCopyAtomTransposed = cute::Copy_Atom<cute::SM75_U16x8_LDSM_T, Element>;

  // gmem -> smem: 16 B cp.async per thread, 8 threads per 64-element row segment.
  static constexpr int kGmemElemsPerLoad = sizeof(cute::uint128_t) / sizeof(Element);
  static constexpr int kGmemThreadsPerRow = kBlockKSmem / kGmemElemsPerLoad;
  static_assert(kNThreads % kGmemThreadsPerRow == 0);
  using GmemLayoutAtom =
      cute::Layout<cute::Shape<cute::Int<kNThreads / kGmemThreadsPerRow>,
                               cute::Int<kGmemThreadsPerRow>>,
                   cute::Stride<cute::Int<kGmemThreadsPerRow>, cute::_1>>;
  using GmemTiledCopyQKV = decltype(cute::make_tiled_copy(
      cute::Copy_Atom<cute::SM80_CP_ASYNC_CACHEGLOBAL<cute::uint128_t>, Element>{},
      GmemLayoutAtom{}, cute::Layout<cute::Shape<cute::_1, cute::Int<kGmemElemsPerLoad>>>{}));

  static constexpr int kSmemQSize = cute::cosize_v<SmemLayoutQ> * sizeof(Element);
  static constexpr int kSmemKVSize = cute::cosize_v<SmemLayoutKV> * sizeof(Element);
  static constexpr int kSmemSize = kSmemQSize + 2 * kSmemKVSize;
  static_assert(kSmemSize <= 227 * 1024, "fits the sm_80/sm_90 smem carve-out");
};

// Forward: 128 x 64 tiles, 8 warps for D=128 (acc_o 64 floats/thread); 4 warps, 64 rows
// for D=64 keeps enough CTAs per SM with a small register file footprint.
template <typename Element, int kHeadDim>
using SwaFwdTraitsFor =
    cute::conditional_t<kHeadDim == 128, SwaFwdTraits<Element, 128, 128, 64, 8>,
                        SwaFwdTraits<Element, 64, 64, 64, 4>>;

}  // namespace cuda
}  // namespace rattention
