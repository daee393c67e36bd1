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
    # cp.async: the source is read at issue, the bytes land at the issuing thread's wait.
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


# (header, the #if branch of a free function, what its host side becomes): commit / wait of
# cp.async groups, which compile to nothing on the host otherwise.
FUNCTION_PATCHES = [
    ("cute/arch/copy_sm80.hpp", 'asm volatile("cp.async.commit_group;\\n" ::);\n#endif',
     'asm volatile("cp.async.commit_group;\\n" ::);\n#else\n  ::emu::cp_async_commit();\n#endif'),
    ("cute/arch/copy_sm80.hpp",
     'asm volatile("cp.async.wait_group %0;\\n" :: "n"(N));\n  }\n#endif',
     'asm volatile("cp.async.wait_group %0;\\n" :: "n"(N));\n  }\n#else\n  ::emu::cp_async_wait(N);\n#endif'),
]


def patch_function(text: str, old: str, new: str) -> str:
    if text.count(old) != 1:
        raise SystemExit(f"patch_cute: expected exactly one {old!r}")
    return text.replace(old, new)


def main() -> int:
    src, out = Path(sys.argv[1]), Path(sys.argv[2])
    files = {}
    for header, struct, replacement in PATCHES:
        text = files.get(header) or (src / header).read_text()
        files[header] = patch(text, struct, replacement)
    for header, old, new in FUNCTION_PATCHES:
        text = files.get(header) or (src / header).read_text()
        files[header] = patch_function(text, old, new)
    written = 0
    for header, text in files.items():
        dst = out / header
        # unchanged content keeps its mtime, so ninja does not rebuild every kernel
        if dst.exists() and dst.read_text() == text:
            continue
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.write_text(text)
        written += 1
    print(f"patch_cute: {len(PATCHES) + len(FUNCTION_PATCHES)} patches in {len(files)} headers "
          f"-> {out} ({written} written)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
