// Host replay of the RLA kernels' shared-memory -> register copies (runs on the CPU, no GPU).
//
// The RLA GEMMs (csrc/cuda/rla_traits.cuh: gemm_ss, gemm_s_state_split) load their MMA
// fragments with ldmatrix through CuTe tiled copies (rla_smem_copy_A / _B). A wrong atom
// (.trans or not), a layout the atom cannot read, or a misaligned row would give wrong
// fragments silently on a GPU. This program builds the very same tiled copies for every
// operand view the kernels use, replays each ldmatrix with its PTX ISA semantics, and
// checks that every lane ends up with exactly the elements the MMA's element-wise partition
// (partition_A / partition_B) assigns to it, for every K-slice, and that every row address
// is 16-byte aligned.
//
// PTX ISA, ldmatrix.sync.aligned.m8n8.x4[.trans].shared.b16: lane l supplies the address
// of row (l % 8) of matrix (l / 8) (8 consecutive b16 values). Destination register j of
// lane l receives two b16 values of matrix j, low half first:
//   without .trans: (row l / 4, cols 2 (l % 4) + {0, 1})
//   with .trans:    (rows 2 (l % 4) + {0, 1}, col l / 4)
// where (row, col) index the matrix as stored (row = the address a lane supplied).
//
// Shared memory holds element ids (value = offset in elements from the buffer start), so
// "which element did this lane get" is read off directly. Build + run:
//   nvcc -std=c++17 --expt-relaxed-constexpr -I csrc -I <cutlass>/include tools/ldsm_check.cu -o ldsm_check && ./ldsm_check
// (tools/cuda_check.py does this as part of `make cuda-check`).
#include <cute/tensor.hpp>

#include <algorithm>
#include <cstdio>
#include <string>
#include <vector>

#include "cuda/rla_plan.h"  // the RLA configurations (RlaTraits)
#include "cuda/swa_traits.cuh"

namespace {

using namespace cute;
using rattention::cuda::row_major_padded;
using rattention::cuda::row_major_padded_t;

int g_failures = 0;
int g_checked = 0;
bool g_flip_semantics = false;  // negative control: replay with the other ldmatrix variant

void fail(const char* name, const char* what, int thread, int k, int i, int got, int want) {
  if (g_failures < 20 && !g_flip_semantics) {
    std::printf("  MISMATCH %s: %s (thread %d, k-slice %d, value %d): got element %d, want %d\n",
                name, what, thread, k, i, got, want);
  }
  ++g_failures;
}

// One operand copy as a kernel does it. `src` is the view the kernel partitions for the
// copy (partition_S), `want` the logical operand (rows, K) by its definition, `frag` the
// view the kernel's register fragment is shaped from (partition_fragment_A/B): the whole
// operand (per_slice false, the SWA kernels) or one 16-wide K-slice reused per slice
// (per_slice true, the RLA kernels). All views index element ids (offsets from a 16-byte
// aligned buffer start). kIsA: the MMA's A operand (rows = M), else B (rows = N).
template <bool kIsA, class Mma, class Copy, class SrcT, class WantT, class FragT>
void check_copy(const char* name, Mma const& mma, Copy const& tiled_copy, bool trans,
                SrcT const& src, WantT const& want, FragT const& frag_view, bool per_slice) {
  constexpr int kThreads = decltype(size(Mma{}))::value;
  trans = trans != g_flip_semantics;
  auto src_of = [&](int t) { return tiled_copy.get_thread_slice(t).partition_S(src); };
  auto want_of = [&](int t) {
    auto thr = mma.get_thread_slice(t);
    if constexpr (kIsA) return thr.partition_A(want);  // (MMA, MMA_ROWS, MMA_K)
    else return thr.partition_B(want);
  };
  auto frag_layout = [&] {
    auto thr = mma.get_thread_slice(0);
    if constexpr (kIsA) return thr.partition_fragment_A(frag_view).layout();
    else return thr.partition_fragment_B(frag_view).layout();
  }();
  using Src = decltype(src_of(0));
  static_assert(decltype(size<0>(Src{}.layout()))::value == 8,
                "one ldmatrix.x4 per copy: 8 b16 values per lane");
  constexpr int kInstr = decltype(size<1>(Src{}.layout()))::value;  // ldmatrix per K-slice
  constexpr int kK = decltype(size<2>(Src{}.layout()))::value;
  const int failures_before = g_failures;

  for (int k = 0; k < kK; ++k) {
    for (int w = 0; w < kThreads / 32; ++w) {
      // Row addresses (element ids) each lane supplies, per instruction.
      int addr[kInstr][32];
      for (int l = 0; l < 32; ++l) {
        auto s = src_of(32 * w + l);
        for (int r = 0; r < kInstr; ++r) {
          addr[r][l] = s(0, r, k);
          for (int i = 1; i < 8; ++i) {
            if (s(i, r, k) != addr[r][l] + i) {
              fail(name, "row segment not contiguous", 32 * w + l, k, i, s(i, r, k), addr[r][l] + i);
            }
          }
          if ((addr[r][l] * 2) % 16 != 0) {
            fail(name, "row address not 16-byte aligned", 32 * w + l, k, 0, addr[r][l], -1);
          }
        }
      }
      // Every lane's fragment after the ldmatrix replay, against the MMA partition.
      for (int l = 0; l < 32; ++l) {
        const int t = 32 * w + l;
        const int slot = per_slice ? 0 : k;
        Tensor frag = make_tensor<int>(frag_layout);
        Tensor frag_v = tiled_copy.get_thread_slice(t).retile_D(frag);  // (CPY, CPY_ROWS, slots)
        for (int r = 0; r < kInstr; ++r) {
          for (int j = 0; j < 4; ++j) {
            for (int e = 0; e < 2; ++e) {
              frag_v(2 * j + e, r, slot) = trans ? addr[r][8 * j + 2 * (l % 4) + e] + l / 4
                                                 : addr[r][8 * j + l / 4] + 2 * (l % 4) + e;
            }
          }
        }
        auto want_t = want_of(t);
        Tensor want_k = want_t(_, _, k);
        Tensor got_k = frag(_, _, slot);
        static_assert(decltype(size(want_k))::value == decltype(size(got_k))::value);
        for (int i = 0; i < size(got_k); ++i) {
          ++g_checked;
          if (got_k(i) != want_k(i)) fail(name, "fragment element", t, k, i, got_k(i), want_k(i));
        }
      }
    }
  }
  if (!g_flip_semantics) {
    std::printf("  %-40s %s %-5s %2d K-slices x %d ldmatrix/warp  %s\n", name,
                kIsA ? "A" : "B", trans ? "trans" : "", kK, kInstr,
                g_failures == failures_before ? "ok" : "MISMATCH");
  }
}

// The logical transpose of a (rows, cols) tensor of ids, materialised element by element
// (independent of how the kernels compose their transposed layouts).
template <int kRows, int kCols>
struct Transposed {
  std::vector<int> buf = std::vector<int>(kRows * kCols);
  template <class T>
  explicit Transposed(T const& t) {
    for (int r = 0; r < kRows; ++r)
      for (int c = 0; c < kCols; ++c) buf[c * kRows + r] = t(r, c);
  }
  auto tensor() {
    return make_tensor(buf.data(), make_layout(Shape<Int<kCols>, Int<kRows>>{}, GenRowMajor{}));
  }
};

// An RLA operand: the copy rla_smem_copy_A/B builds, fragments one K-slice at a time.
template <bool kIsA, class Mma, class STensor>
void check_rla_operand(const char* name, Mma const& mma, STensor const& s) {
  constexpr int kRows = decltype(size<0>(s))::value;
  using Atom = rattention::cuda::RlaLdsmAtom<typename Mma::ValTypeA, typename STensor::layout_type>;
  auto slice = local_tile(s, Shape<Int<kRows>, _16>{}, make_coord(0, 0));
  if constexpr (kIsA) {
    check_copy<true>(name, mma, rattention::cuda::rla_smem_copy_A(mma, s), !Atom::kKUnitStride, s,
                     s, slice, true);
  } else {
    check_copy<false>(name, mma, rattention::cuda::rla_smem_copy_B(mma, s), !Atom::kKUnitStride,
                      s, s, slice, true);
  }
}

// Every operand view the RLA kernels hand to gemm_ss / gemm_s_state_split.
// Tr: a configuration of rla_plan.h (the default one, or the one for 99 KB per block: 32
// value columns, phi(q) in 64-feature parts).
template <class Tr>
void check_traits() {
  constexpr int C = Tr::kChunk, F = Tr::kFeat, BV = Tr::kBlockV, QF = Tr::kQFeat;
  typename Tr::TiledMma mma;
  std::printf("RlaTraits<D=%d, BV=%d, %d phi(q) parts>: phi stride %d, v stride %d, p stride %d\n",
              Tr::kHeadDim, BV, Tr::kQParts, Tr::kPhiStride, Tr::kVStride, Tr::kPStride);
  std::vector<int> ids(std::max(C * Tr::kPhiStride, F * Tr::kHalfStride));
  for (size_t i = 0; i < ids.size(); ++i) ids[i] = int(i);
  int* buf = ids.data();
  auto sPhi = make_tensor(buf, row_major_padded<C, F, Tr::kPhiStride>());     // (C, 2D)
  auto sPhiT = make_tensor(buf, row_major_padded_t<C, F, Tr::kPhiStride>());  // (2D, C)
  auto sV = make_tensor(buf, row_major_padded<C, BV, Tr::kVStride>());        // (C, BV)
  auto sVt = make_tensor(buf, row_major_padded_t<C, BV, Tr::kVStride>());     // (BV, C)
  auto sP = make_tensor(buf, row_major_padded<C, C, Tr::kPStride>());         // (C, C)
  auto sPt = make_tensor(buf, row_major_padded_t<C, C, Tr::kPStride>());      // (C, C)^T
  check_rla_operand<true>("phi(q) / phi(k) / dO-free A (C, 2D)", mma, sPhi);
  check_rla_operand<false>("phi(k) as B (C keys, 2D)", mma, sPhi);
  for (int m = 0; m < F / C; ++m) {
    auto tile = local_tile(sPhiT, Shape<Int<C>, Int<C>>{}, make_coord(m, 0));  // (64 feat, C)
    check_rla_operand<true>("phi^T feature tile as A (64 feat, C)", mma, tile);
    check_rla_operand<false>("phi^T feature tile as B (64 feat, C)", mma, tile);
  }
  check_rla_operand<true>("v / dO as A (C, BV)", mma, sV);
  check_rla_operand<false>("v as B (C keys, BV)", mma, sV);
  check_rla_operand<false>("v^T / dO^T as B (BV, C)", mma, sVt);
  check_rla_operand<true>("P as A (C, C)", mma, sP);
  check_rla_operand<true>("P^T as A (C, C)", mma, sPt);
  // a part of phi(q) (its own buffer and stride) and the matching columns of phi(k)
  auto sPhiQ = make_tensor(buf, row_major_padded<C, QF, Tr::kQPhiStride>());     // (C, QF)
  auto sPhiQt = make_tensor(buf, row_major_padded_t<C, QF, Tr::kQPhiStride>());  // (QF, C)
  check_rla_operand<true>("phi(q) part as A (C, QF)", mma, sPhiQ);
  for (int m = 0; m < QF / C; ++m) {
    auto tile = local_tile(sPhiQt, Shape<Int<C>, Int<C>>{}, make_coord(m, 0));  // (64 feat, C)
    check_rla_operand<true>("phi(q) part^T feature tile as A (64 feat, C)", mma, tile);
    check_rla_operand<false>("phi(q) part^T feature tile as B (64 feat, C)", mma, tile);
  }
  // the state's halves (rla_fwd_kernel<Tr, true>: whole and per phi(q) part;
  // rla_bwd_dq_kernel<Tr, true>: 64-feature tiles, K = the value columns)
  auto sHalfT = make_tensor(buf, row_major_padded_t<F, BV, Tr::kHalfStride>());  // (BV, 2D)
  auto sHalf = make_tensor(buf, row_major_padded<F, BV, Tr::kHalfStride>());     // (2D, BV)
  check_rla_operand<false>("state half as B (BV, 2D)", mma, sHalfT);
  for (int m = 0; m < F / C; ++m) {
    auto tile = local_tile(sHalf, Shape<Int<C>, Int<BV>>{}, make_coord(m, 0));  // (64 feat, BV)
    check_rla_operand<false>("state half feature tile as B (64 feat, BV)", mma, tile);
  }
  for (int qp = 0; qp < Tr::kQParts; ++qp) {
    auto part = local_tile(sPhi, Shape<Int<C>, Int<QF>>{}, make_coord(0, qp));  // (C keys, QF)
    check_rla_operand<false>("phi(k) feature part as B (C keys, QF)", mma, part);
    auto half = local_tile(sHalfT, Shape<Int<BV>, Int<QF>>{}, make_coord(0, qp));  // (BV, QF)
    check_rla_operand<false>("state half part as B (BV, QF)", mma, half);
  }
}

// The SWA kernels' operands (swa_fwd_kernel.cuh, swa_bwd_kernel.cuh): swizzled layouts,
// LDSM_N for K-major operands and LDSM_T for the transposed views, whole-K fragments shaped
// from the non-swizzled views. `want` is each operand's logical definition.
// Tr: SwaTraits (64-row query tiles, the backward's dK/dV slices too) or SwaFwdTraits
// (128-row query tiles: at D = 64 two MMA tiles per warp along M, at D = 128 8 warps).
template <class Tr>
void check_swa_traits(const char* name) {
  constexpr int D = Tr::kHeadDim;
  constexpr bool kBackward = Tr::kBlockM == 64;  // the dK/dV kernel's tile
  typename Tr::TiledMma mma;
  std::printf("%s<D=%d> (%d-row query tiles)\n", name, D, Tr::kBlockM);
  std::vector<int> ids(Tr::kBlockM * D + Tr::kBlockN * D);
  for (size_t i = 0; i < ids.size(); ++i) ids[i] = int(i);
  auto sQ = make_tensor(ids.data(), typename Tr::SmemLayoutQ{});                // (M, D)
  auto sK = make_tensor(ids.data() + Tr::kBlockM * D, typename Tr::SmemLayoutKV{});  // (N, D)
  auto cpA = make_tiled_copy_A(typename Tr::SmemCopyAtom{}, mma);
  auto cpB = make_tiled_copy_B(typename Tr::SmemCopyAtom{}, mma);
  auto cpBt = make_tiled_copy_B(typename Tr::SmemCopyAtomTransposed{}, mma);
  check_copy<true>("Q / K / V / dO as A (M, D)", mma, cpA, false, sQ, sQ, sQ, false);
  check_copy<false>("K / Q / V / dO as B (64, D)", mma, cpB, false, sK, sK, sK, false);
  // V^T (and K^T) for O += P V, dQ += dS K: the composed transposed view.
  auto sVt = make_tensor(sK.data(), typename Tr::SmemLayoutVt{});
  auto sVtNoSw = make_tensor(sK.data(), typename Tr::SmemLayoutVtNoSwizzle{});
  Transposed<Tr::kBlockN, D> sK_T(sK);
  check_copy<false>("V^T / K^T as B (D, 64)", mma, cpBt, true, sVt, sK_T.tensor(), sVtNoSw,
                    false);
  // dK/dV kernel: 64-column slices of Q / dO, transposed, as the 64x64 layout at an offset.
  if constexpr (kBackward) for (int slice = 0; slice < D / 64; ++slice) {
    auto sQt = make_tensor(sQ.data() + slice * Tr::kBlockM * 64, typename Tr::SmemLayoutPt{});
    auto sQtNoSw = make_tensor(sQt.data(), typename Tr::SmemLayoutPtNoSwizzle{});
    Transposed<Tr::kBlockM, 64> logical(
        local_tile(sQ, Shape<Int<Tr::kBlockM>, _64>{}, make_coord(0, slice)));
    check_copy<false>("Q / dO column slice ^T as B (64, 64)", mma, cpBt, true, sQt,
                      logical.tensor(), sQtNoSw, false);
  }
}

// Register re-layouts of the SWA kernels (no copy involved):
//  * acc_as_a: an fp32 accumulator tile (M, N) reused as the A operand (M, K = N) of the
//    next MMA (P in O += P V, dS in dQ += dS K): every value must sit where partition_A
//    expects that (row, col);
//  * acc_rowcol + quad shuffles (softmax row statistics, the fused mixing epilogue): the
//    lanes that hold a given row are exactly one quad (4 consecutive lanes of a warp), and
//    together they hold every column of it.
template <class Tr>
void check_swa_registers() {
  constexpr int D = Tr::kHeadDim;
  typename Tr::TiledMma mma;
  constexpr int M = Tr::kBlockM, N = Tr::kBlockN;
  const int failures_before = g_failures;
  std::vector<std::vector<int>> owners(M * D);  // lanes holding (row, col) of an (M, D) acc
  for (int t = 0; t < Tr::kNThreads; ++t) {
    auto thr = mma.get_thread_slice(t);
    auto cS = thr.partition_C(make_identity_tensor(Shape<Int<M>, Int<N>>{}));  // (4, MMA_M, MMA_N)
    auto as_a = make_tensor(cS.data(), rattention::cuda::acc_as_a(cS.layout()));
    auto want = thr.partition_A(make_identity_tensor(Shape<Int<M>, Int<N>>{}));  // (MMA, MMA_M, MMA_K)
    static_assert(decltype(size(as_a))::value == decltype(size(want))::value);
    for (int i = 0; i < size(want); ++i) {
      ++g_checked;
      const auto a = as_a(i);
      const auto b = want(i);
      if (get<0>(a) != get<0>(b) || get<1>(a) != get<1>(b)) {
        fail("acc_as_a", "P / dS register as A operand", t, 0, i, get<0>(a) * 1000 + get<1>(a),
             get<0>(b) * 1000 + get<1>(b));
      }
    }
    auto cO = thr.partition_C(make_identity_tensor(Shape<Int<M>, Int<D>>{}));
    auto rc = make_tensor(cO.data(), rattention::cuda::acc_rowcol(cO.layout()));  // (rows, cols)
    for (int r = 0; r < size<0>(rc); ++r) {
      for (int c = 0; c < size<1>(rc); ++c) {
        const auto x = rc(r, c);
        owners[get<0>(x) * D + get<1>(x)].push_back(t);
        if (get<0>(rc(r, 0)) != get<0>(x)) {
          fail("acc_rowcol", "row index varies along a register row", t, 0, c, get<0>(x),
               get<0>(rc(r, 0)));
        }
      }
    }
  }
  for (int row = 0; row < M; ++row) {
    const int quad = owners[row * D][0] / 4;
    for (int col = 0; col < D; ++col) {
      ++g_checked;
      const auto& o = owners[row * D + col];
      if (o.size() != 1 || o[0] / 4 != quad) {
        fail("acc_rowcol", "row not owned by one quad", o.empty() ? -1 : o[0], 0, col,
             o.empty() ? -1 : o[0] / 4, quad);
      }
    }
  }
  std::printf("  acc_as_a (P/dS as A) and quad-owned rows (softmax, fused mixing), %dx%d  %s\n", M,
              D, g_failures == failures_before ? "ok" : "MISMATCH");
}

}  // namespace

int main() {
  // Negative control: the same replay with the other ldmatrix variant must disagree, or the
  // comparison below would prove nothing.
  {
    using Tr = rattention::cuda::RlaTraits<cutlass::bfloat16_t, 64, 64>;
    std::vector<int> ids(Tr::kChunk * Tr::kPhiStride);
    for (size_t i = 0; i < ids.size(); ++i) ids[i] = int(i);
    auto sPhi = make_tensor(ids.data(), row_major_padded<Tr::kChunk, Tr::kFeat, Tr::kPhiStride>());
    auto sVt = make_tensor(ids.data(), row_major_padded_t<Tr::kChunk, Tr::kBlockV, Tr::kVStride>());
    typename Tr::TiledMma mma;
    g_flip_semantics = true;
    check_rla_operand<true>("control", mma, sPhi);
    const int a = g_failures;
    check_rla_operand<false>("control", mma, sVt);
    const int b = g_failures - a;
    g_flip_semantics = false;
    if (a == 0 || b == 0) {
      std::printf("ldsm_check FAILED: the negative control matched (%d, %d mismatches)\n", a, b);
      return 1;
    }
    std::printf("negative control: wrong ldmatrix variant -> %d and %d mismatches (as it must)\n",
                a, b);
    g_failures = 0;
    g_checked = 0;
  }
  using rattention::cuda::RlaDefaultTraits;
  using rattention::cuda::RlaSmallSmemTraits;
  check_traits<RlaDefaultTraits<cutlass::bfloat16_t, 64>>();
  check_traits<RlaDefaultTraits<cutlass::bfloat16_t, 128>>();
  check_traits<RlaDefaultTraits<cutlass::half_t, 128>>();
  check_traits<RlaSmallSmemTraits<cutlass::bfloat16_t, 128>>();
  check_traits<RlaSmallSmemTraits<cutlass::half_t, 128>>();
  using rattention::cuda::SwaFwdTraits;
  using rattention::cuda::SwaTraits;
  check_swa_traits<SwaTraits<cutlass::bfloat16_t, 64>>("SwaTraits");
  check_swa_traits<SwaTraits<cutlass::bfloat16_t, 128>>("SwaTraits");
  check_swa_traits<SwaFwdTraits<cutlass::bfloat16_t, 64>>("SwaFwdTraits");
  check_swa_traits<SwaFwdTraits<cutlass::bfloat16_t, 128>>("SwaFwdTraits");
  check_swa_registers<SwaTraits<cutlass::bfloat16_t, 64>>();
  check_swa_registers<SwaTraits<cutlass::bfloat16_t, 128>>();
  check_swa_registers<SwaFwdTraits<cutlass::bfloat16_t, 64>>();
  check_swa_registers<SwaFwdTraits<cutlass::bfloat16_t, 128>>();
  if (g_failures) {
    std::printf("ldsm_check FAILED: %d of %d fragment elements / addresses wrong\n", g_failures,
                g_checked);
    return 1;
  }
  std::printf("ldsm_check OK: %d fragment elements match the MMA partition\n", g_checked);
  return 0;
}
