"""Write patched copies of three CuTe headers for tools/emu (the CPU emulation of the CUDA
kernels). Only the host fallback branch of the atoms our kernels use changes: where CuTe
would report "invalid control path" when compiled without the GPU instruction, the copy
calls the warp-collective emulation in tools/emu/emu.h instead.

    python tools/emu/patch_cute.py <cutlass include dir> <output include dir>

The output directory goes before the CUTLASS include directory on the include path, so
`#include <cute/arch/mma_sm80.hpp>` finds the patched copy.
"""
import re
import sys
from pathlib import Path

# (header, struct, replacement of its CUTE_INVALID_CONTROL_PATH line)
PATCHES = [
    ("cute/arch/mma_sm80.hpp", "SM80_16x8x16_F32BF16BF16F32_TN",
     "::emu::mma_m16n8k16_bf16(d0, d1, d2, d3, a0, a1, a2, a3, b0, b1, c0, c1, c2, c3);"),
    ("cute/arch/mma_sm80.hpp", "SM80_16x8x16_F32F16F16F32_TN",
     "::emu::mma_m16n8k16_f16(d0, d1, d2, d3, a0, a1, a2, a3, b0, b1, c0, c1, c2, c3);"),
    ("cute/arch/copy_sm75.hpp", "SM75_U32x4_LDSM_N",
     "::emu::ldmatrix_x4(&smem_src, false, dst0, dst1, dst2, dst3);"),
    ("cute/arch/copy_sm75.hpp", "SM75_U16x8_LDSM_T",
     "::emu::ldmatrix_x4(&smem_src, true, dst0, dst1, dst2, dst3);"),
    # cp.async completes at once in the emulation (commit / wait are already no-ops there).
    ("cute/arch/copy_sm80.hpp", "SM80_CP_ASYNC_CACHEGLOBAL",
     "::emu::cp_async(&smem_dst, &gmem_src, sizeof(TS));"),
    ("cute/arch/copy_sm80.hpp", "SM80_CP_ASYNC_CACHEALWAYS",
     "::emu::cp_async(&smem_dst, &gmem_src, sizeof(TS));"),
]


def patch(text: str, struct: str, replacement: str) -> str:
    m = re.search(r"struct\s+%s\s*\n\{" % re.escape(struct), text)
    if not m:
        raise SystemExit(f"patch_cute: struct {struct} not found")
    i = text.index("CUTE_INVALID_CONTROL_PATH(", m.end())
    j = text.index("\n", i)
    nxt = text.find("\nstruct ", m.end())
    if nxt != -1 and i > nxt:
        raise SystemExit(f"patch_cute: no fallback branch inside {struct}")
    return text[:i] + replacement + text[j:]


def main() -> int:
    src, out = Path(sys.argv[1]), Path(sys.argv[2])
    files = {}
    for header, struct, replacement in PATCHES:
        text = files.get(header) or (src / header).read_text()
        files[header] = patch(text, struct, replacement)
    for header, text in files.items():
        dst = out / header
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.write_text(text)
    print(f"patch_cute: {len(PATCHES)} atoms in {len(files)} headers -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
