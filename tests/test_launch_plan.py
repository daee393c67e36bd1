"""Launch plans (csrc/cuda/*_plan.h): every launch the CUDA launchers make is the planned one,
and build/cuda-check/launch.json (tools/launch_plan.py) is written from those same plans.

1. In the host emulator (tools/emu): each op runs through its real launcher, which records
   the grid, block and dynamic shared memory it passes to every launch; the records must
   equal the op's plan rows (the plan functions compiled into the same module), in order.
   A launcher that computed a launch on its own, or a kernel launch missing from the plan,
   fails here.
2. The dump program behind launch.json (the plan headers compiled for the host by nvcc)
   gives the same rows as the emulator's build of the plans, for every reference shape;
   the launch.json schema is checked on a report fixture. Skipped without nvcc.
"""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import launch_plan  # noqa: E402


@pytest.fixture(scope="module")
def emu():
    sys.path.insert(0, str(ROOT / "tools" / "emu"))
    import build
    try:
        return build.load()
    except build.EmulatorUnavailable as e:  # a compile error is not a skip: it fails
        pytest.skip(f"CUDA emulator not buildable here: {e}")


def rnd(*shape, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(dtype)


def planned(emu, op, B, T, Hq, Hkv, D, w, dtype, every):
    name = "bf16" if dtype == torch.bfloat16 else "fp16"
    return [(tuple(r["grid"]), r["threads"], r["smem_bytes"])
            for r in emu.plan_rows(op, B, T, Hq, Hkv, D, w, name, every,
                                   max_smem_per_block=emu.max_smem_per_block())]


def launched(emu):
    return [(tuple(r["grid"]), r["threads"], r["smem_bytes"]) for r in emu.take_launch_records()]


# Small and ragged: partial tiles, GQA, a window that is neither 0 nor >= T, several
# checkpoint segments, both head dims and dtypes.
CASES = [
    (1, 97, 4, 1, 64, 40, torch.bfloat16, 2),
    (2, 65, 2, 2, 128, 0, torch.float16, 1),
]


@pytest.mark.parametrize("B,T,Hq,Hkv,D,w,dtype,every", CASES)
def test_emulated_launches_are_the_plans(emu, B, T, Hq, Hkv, D, w, dtype, every):
    q, k, v = (rnd(B, T, H, D, dtype=dtype, seed=i) for i, H in enumerate((Hq, Hkv, Hkv)))
    go = rnd(B, T, Hq, D, seed=5)
    scale = D ** -0.5
    ga, gb = rnd(Hq, D, seed=6), rnd(Hq, D, seed=7)
    emu.take_launch_records()  # drop what earlier tests left
    plan = lambda op, batch=B, seqlen=T: planned(emu, op, batch, seqlen, Hq, Hkv, D, w, dtype, every)

    o_rla, _, ckpt = emu.rla_fwd(q, k, v, w, "softmax", None, every)
    assert launched(emu) == plan("rla_fwd")
    emu.rla_bwd(go, None, q, k, v, None, ckpt, w, "softmax", every)
    assert launched(emu) == plan("rla_bwd")
    # the dk/dv segments follow the SM count the backward is planned for
    emu.rla_bwd(go, None, q, k, v, None, ckpt, w, "softmax", every, num_sms=1)
    name = "bf16" if dtype == torch.bfloat16 else "fp16"
    few = [(tuple(r["grid"]), r["threads"], r["smem_bytes"])
           for r in emu.plan_rows("rla_bwd", B, T, Hq, Hkv, D, w, name, every, num_sms=1,
                                  max_smem_per_block=emu.max_smem_per_block())]
    assert launched(emu) == few and few != plan("rla_bwd")

    o, lse = emu.swa_fwd(q, k, v, w, scale, None, None)
    assert launched(emu) == plan("swa_fwd")
    emu.swa_mix_fwd(q, k, v, w, scale, None, None, o_rla, ga, gb, 1e-6, dtype, True)
    assert launched(emu) == plan("swa_mix_fwd")
    emu.swa_bwd(go, None, q, k, v, o, lse, w, scale, None, None)
    assert launched(emu) == plan("swa_bwd")

    emu.mix_fwd(o, o_rla, ga, gb, 1e-6, dtype)
    assert launched(emu) == plan("mix_fwd")
    emu.mix_bwd(go.to(dtype), o, o_rla, ga, gb, 1e-6)
    assert launched(emu) == plan("mix_bwd")

    # one decode step for a batch of B sequences with a full ring (positions past w)
    W1 = w + 1
    kc, vc = rnd(B, W1, Hkv, D, dtype=dtype, seed=8), rnd(B, W1, Hkv, D, dtype=dtype, seed=9)
    state = torch.zeros(B, Hkv, 2 * D, D)
    pos = torch.full((B,), W1 + 3, dtype=torch.int64)
    emu.decode_step(q[:, :1], k[:, :1], v[:, :1], kc, vc, state, pos, "softmax", scale, None, None,
                    None, ga, gb, 1e-6)
    assert launched(emu) == plan("decode_step", seqlen=W1)


def test_emulated_sub_batch_launches_are_the_plans(emu):
    """The RLA backward in sub-batches: each runs the five planned launches (one row per
    launch, rows sub_batch 0..n-1 of n, identical otherwise), all with one sub-batch's
    workspace; a packed batch stays one launch whatever the cap."""
    B, T, Hq, Hkv, D, w, every = 3, 97, 4, 2, 64, 9, 1
    q, k, v = (rnd(B, T, H, D, dtype=torch.bfloat16, seed=i) for i, H in enumerate((Hq, Hkv, Hkv)))
    go = rnd(B, T, Hq, D, seed=5)
    rows = lambda batch, **kw: emu.plan_rows("rla_bwd", batch, T, Hq, Hkv, D, w, "bf16",  # noqa: E731
                                             every, **kw)
    _, _, ckpt = emu.rla_fwd(q, k, v, w, "softmax", None, every)
    emu.take_launch_records()
    emu.rla_bwd(go, None, q, k, v, None, ckpt, w, "softmax", every, temporaries_cap_bytes=1)
    split = rows(B, temporaries_cap_bytes=1)
    assert launched(emu) == [(tuple(r["grid"]), r["threads"], r["smem_bytes"]) for r in split]
    one = rows(1)  # a sub-batch is planned as a batch of its size
    assert [r["sub_batch"] for r in split] == [i for i in range(B) for _ in one]
    strip = lambda r: {x: y for x, y in r.items() if x not in ("sub_batch", "sub_batches",  # noqa: E731
                                                                "saved_state_bytes")}
    assert all(strip(r) == strip(one[i % len(one)]) and r["sub_batches"] == B
               for i, r in enumerate(split))
    assert {r["saved_state_bytes"] for r in split} == {rows(B)[0]["saved_state_bytes"]} != {0}
    assert {r["sub_batches"] for r in rows(B)} == {1}  # the default cap: one launch here
    packed = emu.plan_rows("rla_bwd", 1, 200, Hq, Hkv, D, w, "bf16", every, packed_seqs=3,
                           temporaries_cap_bytes=1)
    assert {r["sub_batches"] for r in packed} == {1}


def test_s2_rla_temporaries_fit_the_cap_and_fill_the_gpu(emu):
    """At S2 the backward's sub-batches keep its workspace + the forward's checkpoints and
    final state within the 1 GiB cap, and every tensor-core launch of a sub-batch still has
    at least 132 CTAs (132 SMs)."""
    s = launch_plan.SHAPES["S2"]
    for op in ("rla_fwd", "rla_bwd"):
        rows = emu.plan_rows(op, s["B"], s["T"], s["Hq"], s["Hkv"], s["D"], s["w"], "bf16", 4)
        assert max(r["workspace_bytes"] + r["saved_state_bytes"] for r in rows) <= 2**30, op
        for r in rows:
            if r["kernel"] in ("rla_bwd_dq_kernel", "rla_bwd_state_kernel", "rla_bwd_dkv_kernel",
                               "rla_fwd_state_kernel", "rla_fwd_kernel"):
                assert r["grid"][0] * r["grid"][1] * r["grid"][2] >= 132, (op, r)


def test_emulated_packed_launches_are_the_plans(emu):
    """Packed batches (cu_seqlens): the grids over the documents' tile slots are the plans'
    (which see only the total rows and the document count)."""
    lens, Hq, Hkv, D, w, dtype = [5, 0, 70, 1], 4, 2, 64, 9, torch.bfloat16
    total, N = sum(lens), len(lens)
    cu = torch.tensor([0, 5, 5, 75, 76], dtype=torch.int32)
    q, k, v = (rnd(total, H, D, dtype=dtype, seed=i) for i, H in enumerate((Hq, Hkv, Hkv)))
    go = rnd(total, Hq, D, seed=5)
    ga, gb = rnd(Hq, D, seed=6), rnd(Hq, D, seed=7)
    o_rla = rnd(total, Hq, D, seed=8)
    emu.take_launch_records()
    name = "bf16"
    plan = lambda op: [(tuple(r["grid"]), r["threads"], r["smem_bytes"])  # noqa: E731
                       for r in emu.plan_rows(op, 1, total, Hq, Hkv, D, w, name, 4,
                                              packed_seqs=N)]
    o_rla, _, ckpt = emu.rla_fwd(q, k, v, w, "softmax", None, 1, cu_seqlens=cu)
    plan1 = lambda op: [(tuple(r["grid"]), r["threads"], r["smem_bytes"])  # noqa: E731
                        for r in emu.plan_rows(op, 1, total, Hq, Hkv, D, w, name, 1,
                                               packed_seqs=N)]
    assert launched(emu) == plan1("rla_fwd")
    emu.rla_bwd(go, None, q, k, v, None, ckpt, w, "softmax", 1, cu_seqlens=cu)
    assert launched(emu) == plan1("rla_bwd")
    o, lse = emu.swa_fwd(q, k, v, w, D ** -0.5, None, None, cu_seqlens=cu)
    assert launched(emu) == plan("swa_fwd")
    emu.swa_mix_fwd(q, k, v, w, D ** -0.5, None, None, o_rla, ga, gb, 1e-6, dtype, True,
                    cu_seqlens=cu)
    assert launched(emu) == plan("swa_mix_fwd")
    emu.swa_bwd(go, None, q, k, v, o, lse, w, D ** -0.5, None, None, cu_seqlens=cu)
    assert launched(emu) == plan("swa_bwd")
    emu.mix_fwd(o, o_rla, ga, gb, 1e-6, dtype)
    assert launched(emu) == plan("mix_fwd")
    emu.mix_bwd(go.to(dtype), o, o_rla, ga, gb, 1e-6)
    assert launched(emu) == plan("mix_bwd")
    # the forward grid (128-row query tiles at D = 64): total // 128 + N tile slots, not N x
    # the longest document's tiles
    assert plan("swa_fwd")[0][0] == (total // 128 + N, 1, Hq)


def test_composite_ops_are_their_calls(emu):
    """forward / backward are the op calls python/rattention_ext makes, in that order."""
    args = (1, 300, 8, 2, 128, 64, "bf16", 4)
    rows = lambda op: emu.plan_rows(op, *args)
    assert rows("forward") == rows("rla_fwd") + rows("swa_mix_fwd")
    assert rows("backward") == rows("mix_bwd") + rows("swa_bwd") + rows("rla_bwd")
    assert {r["call"] for r in rows("backward")} == {"mix_bwd", "swa_bwd", "rla_bwd"}
    assert emu.plan_rows("no_such_op", *args) == []


def _nvcc_dump(tmp_path_factory):
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc not on PATH: the launch-plan dump program (tools/launch_plan_dump.cu) "
                    "is built with it")
    sys.path.insert(0, str(ROOT / "tools" / "emu"))
    import build
    try:
        cutlass = build.cutlass_include()
    except build.EmulatorUnavailable as e:
        pytest.skip(str(e))
    exe, log = launch_plan.build_dump(nvcc, cutlass, tmp_path_factory.mktemp("plan"))
    assert exe is not None, log
    return exe


@pytest.fixture(scope="module")
def dump_rows(tmp_path_factory):
    return launch_plan.run_dump(_nvcc_dump(tmp_path_factory), launch_plan.spec_args())


@pytest.mark.slow
def test_dump_program_matches_the_emulated_plans(emu, dump_rows):
    """nvcc's host build of the plan headers (launch.json) == g++'s (the emulator)."""
    by_spec = {}
    for r in dump_rows:
        by_spec.setdefault((r["shape"], r["op"]), []).append(r)
    assert set(by_spec) == {(s, op) for s, ops in launch_plan.SHAPE_OPS.items() for op in ops}
    for (shape, op), rows in by_spec.items():
        s = launch_plan.SHAPES[shape]
        want = emu.plan_rows(op, s["B"], s["T"], s["Hq"], s["Hkv"], s["D"], s["w"], "bf16", 4)
        got = [{k: (tuple(r[k]) if k == "grid" else r[k]) for k in want[0]} for r in rows]
        assert got == want, (shape, op)


@pytest.mark.slow
def test_launch_json_schema(dump_rows, tmp_path):
    """launch.json from the dump rows and a report with every planned kernel: the schema,
    ctas = the grid's product, waves from ctas_per_sm, and a clear problem for a kernel the
    report lacks."""
    names = {"swa_fwd_kernel": "swa_fwd_kernel<SwaFwdTraits<bf16,128>>",
             "decode_split_kernel": "decode_impl::decode_split_kernel<bf16,128>"}
    # one bf16 and one fp16 instantiation per kernel (a name twice would be ambiguous)
    report, seen = [], set()
    for r in dump_rows:
        name = names.get(r["kernel"], f"{r['kernel']}<bf16,{r['head_dim']}>")
        if name in seen:
            continue
        seen.add(name)
        report += [{"kernel": name, "arch": "sm_90a", "registers": 128, "static_smem_bytes": 0},
                   {"kernel": name.replace("bf16", "fp16"), "arch": "sm_90a", "registers": 64,
                    "static_smem_bytes": 0}]
    rows, problems = launch_plan.enrich(dump_rows, report)
    assert problems == [] and len(rows) == len(dump_rows)
    for r in rows:
        assert set(launch_plan.ROW_KEYS) <= set(r)
        assert r["op"] in ("forward", "backward", "decode_step")
        assert r["ctas"] == r["grid"][0] * r["grid"][1] * r["grid"][2]
        assert 1 <= r["ctas_per_sm"] <= 32 and r["registers"] == 128  # the bf16 row
        assert r["waves"] == pytest.approx(r["ctas"] / (r["ctas_per_sm"] * 132), abs=1e-3)
    json.dumps(rows)  # serialisable as written
    _, problems = launch_plan.enrich(dump_rows, [x for x in report
                                         if launch_plan.base_name(x["kernel"]) != "mix_bwd_kernel"])
    assert any("mix_bwd_kernel" in p for p in problems)


def test_occupancy_model():
    """H200 limits: 4-warp CTAs at 128 registers fit 4 per SM by registers; 164 KB of
    shared memory fits one; 1024-thread CTAs two by warps."""
    assert launch_plan.occupancy(128, 0, 0, 128) == (4, "registers")
    assert launch_plan.occupancy(128, 164864, 0, 32) == (1, "smem")
    assert launch_plan.occupancy(1024, 0, 0, 32) == (2, "warps")
    assert launch_plan.occupancy(32, 0, 0, 16) == (32, "ctas")


def test_structural_targets_read_the_rows():
    """The issue goals cuda-check reports: selected by shape, kernel family and tensor-core
    use; a bound on the worst row; a shape without rows is reported, never met."""
    def row(shape, op, kernel, ctas=200, warps=8, serial=4, ws=0, saved=0, mma=64):
        return {"shape": shape, "op": op, "kernel": kernel, "ctas": ctas, "warps_per_sm": warps,
                "serial_steps": serial, "workspace_bytes": ws, "saved_state_bytes": saved,
                "mma": mma}
    rows = [row("S1", "backward", "rla_bwd_dkv_kernel<RlaTraits<bf16,128,64>>", ctas=8),
            row("S1", "forward", "rla_fwd_prefix_reduce_kernel", ctas=1, mma=0),  # no MMA: out
            row("S1", "forward", "swa_fwd_kernel<SwaFwdTraits<bf16,128>>"),
            row("S2", "backward", "rla_bwd_dq_kernel<RlaTraits<bf16,128,64>>", ws=2**31,
                saved=2**28),
            row("S2", "forward", "rla_fwd_kernel<RlaTraits<bf16,128,64>>", saved=2**28),
            row("D1", "decode_step", "decode_impl::decode_split_kernel<bf16,128>", ctas=64)]
    got = {(what, shape): (v, met) for what, shape, v, _, _, met in launch_plan.targets(rows)}
    assert got[("RLA tensor-core launches: CTAs", "S1")] == (8, False)
    assert got[("RLA tensor-core launches: serial chunk steps", "S1")] == (4, True)
    # the workspace and the saved checkpoints + final state, of the worst RLA launch
    assert got[("RLA temporaries MiB (workspace + checkpoints + final state)", "S2")] == \
        (2304.0, False)
    assert got[("SWA tensor-core launches: resident warps per SM", "S1")] == (8, True)
    assert got[("SWA tensor-core launches: resident warps per SM", "S2")] == (None, False)
    assert got[("decode step: CTAs of its largest launch", "D1")] == (64, True)
    assert "MISSED  S2  SWA" in launch_plan.format_targets(rows)
