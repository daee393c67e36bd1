"""RAttention forward + backward at a realistic size on the best backend here (`make demo`).

Picks CUDA when torch sees a GPU and this build has the CUDA kernels, else the CPU
kernels; bf16 on CUDA, float32 on CPU. Times the forward and forward+backward, checks the
output and every gradient (q, k, v, H0, both norm weights) against the float64
``rattention_ext.reference`` evaluated on a float64 copy of the same inputs, and prints a
table. Exit code 1 on FAIL.

Accuracy rule (SPEC.md): float32 relative error ``||x - ref|| / ||ref||`` under 1e-5;
bf16/fp16 within 2x the relative error of the same computation written in plain PyTorch
in that dtype (``_plain_lowp_forward`` below) plus a floor of 1e-3; NaN never passes.

If the compiled kernels are still placeholders ("... is not built yet"), the demo runs
``rattention_ext.reference`` in the same dtype instead and says so in the table.

    python examples/demo.py                 # auto device, default size
    python examples/demo.py --device cpu --T 2048
"""
from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import sys
import time

import torch

import rattention_ext
from rattention_ext import reference as ref

# Above this many (batch * tokens * query heads) on CPU, the float64 reference check runs on
# a slice (first sequence, first CHECK_TOKENS tokens): the kernel is run again on that slice.
CPU_FULL_CHECK_LIMIT = 1 << 16
CHECK_TOKENS = 4096


def log(msg: str) -> None:
    print(f"[demo {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def pick_device(requested: str) -> str:
    has_cuda = torch.cuda.is_available() and bool(rattention_ext.build_info()["cuda"])
    if requested == "cuda" and not has_cuda:
        sys.exit("--device cuda: torch sees no GPU or this build has no CUDA kernels "
                 f"(build_info: cuda={rattention_ext.build_info()['cuda']})")
    if requested == "auto":
        return "cuda" if has_cuda else "cpu"
    return requested


def make_inputs(B, T, Hq, Hkv, D, dtype, device, seed=0):
    """Random inputs like a trained layer's: rotary tables, learned H0 and norm scales."""
    g = torch.Generator().manual_seed(seed)

    def rn(*shape, s=1.0):
        return (s * torch.randn(*shape, generator=g, dtype=torch.float64)).to(device)

    inv = 10000.0 ** (-torch.arange(0, D // 2, dtype=torch.float64) * 2.0 / D)
    ang = torch.arange(T, dtype=torch.float64)[:, None] * inv[None, :]
    acc = torch.float32 if dtype != torch.float64 else torch.float64
    x = dict(
        q=rn(B, T, Hq, D).to(dtype),
        k=rn(B, T, Hkv, D).to(dtype),
        v=rn(B, T, Hkv, D).to(dtype),
        initial_state=rn(1, Hq, 2 * D, D, s=0.5).to(acc),
        swa_norm_weight=(1 + rn(Hq, D, s=0.2)).to(acc),
        rla_norm_weight=(1 + rn(Hq, D, s=0.2)).to(acc),
    )
    tables = dict(rotary_cos=torch.cos(ang).to(device, acc), rotary_sin=torch.sin(ang).to(device, acc))
    grad_out = rn(B, T, Hq, D).to(dtype)
    return x, tables, grad_out


LEAVES = ("q", "k", "v", "initial_state", "swa_norm_weight", "rla_norm_weight")


def run(fn, x, tables, grad_out, w):
    """One forward + backward; returns the output and the gradients (detached)."""
    leaves = {n: t.detach().clone().requires_grad_(True) for n, t in x.items()}
    o = fn(**leaves, **tables, window_size=w)
    o.backward(grad_out)
    return {"out": o.detach(), **{"d" + n: leaves[n].grad for n in LEAVES}}


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def time_ms(step, device, reps):
    step()  # warm-up
    sync(device)
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        step()
        sync(device)
        ts.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(ts)


def probe_kernels(device, dtype, D):
    """Returns None when the compiled forward+backward run, else the reason they do not."""
    x, tables, g = make_inputs(1, 5, 2, 1, D, dtype, device, seed=1)
    try:
        run(rattention_ext.forward, x, tables, g, 2)
    except (RuntimeError, NotImplementedError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if "not built yet" in msg or isinstance(e, NotImplementedError):
            return msg
        raise
    return None


def _plain_lowp_forward(q, k, v, *, window_size, initial_state, swa_norm_weight, rla_norm_weight,
                        rotary_cos, rotary_sin, norm_eps=1e-8, block=256):
    """The same function in plain PyTorch, every tensor in q's (low) dtype: the bf16 baseline."""
    dt = q.dtype
    B, T, Hq, D = q.shape
    G = Hq // k.shape[2]
    w, shift = window_size, window_size + 1

    def rope(x):
        c, s = rotary_cos[:T].to(dt)[None, :, None], rotary_sin[:T].to(dt)[None, :, None]
        x1, x2 = x[..., : D // 2], x[..., D // 2:]
        return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], -1)

    def heads(x):  # [B, T, H, *] -> [B, Hq, T, *]
        return x.repeat_interleave(G, 2).transpose(1, 2) if x.shape[2] != Hq else x.transpose(1, 2)

    qr, kr, vh = rope(q).transpose(1, 2), heads(rope(k)), heads(v)
    phi = lambda x: torch.cat([torch.softmax(x, -1), torch.softmax(-x, -1)], -1)  # noqa: E731
    pq, pk = phi(q).transpose(1, 2), heads(phi(k))
    h0 = initial_state.to(dt)
    state = q.new_zeros(B, Hq, 2 * D, D)
    o_swa, o_rla = [], []
    for t0 in range(0, T, block):
        t1 = min(T, t0 + block)
        tq = torch.arange(t0, t1, device=q.device)[:, None]
        s0 = max(0, t0 - w)
        sk = torch.arange(s0, t1, device=q.device)[None, :]
        sc = (qr[:, :, t0:t1] @ kr[:, :, s0:t1].transpose(-1, -2)) / math.sqrt(D)
        sc = sc.masked_fill(~((tq >= sk) & (tq - sk <= w)), float("-inf"))
        o_swa.append(torch.softmax(sc, -1) @ vh[:, :, s0:t1])
        ob = pq[:, :, t0:t1] @ (state + h0)
        r0, r1 = max(0, t0 - shift), max(0, t1 - shift)
        if r1 > r0:
            a = pq[:, :, t0:t1] @ pk[:, :, r0:r1].transpose(-1, -2)
            sk = torch.arange(r0, r1, device=q.device)[None, :]
            ob = ob + (a * (tq - sk >= shift).to(dt)) @ vh[:, :, r0:r1]
            state = state + pk[:, :, r0:r1].transpose(-1, -2) @ vh[:, :, r0:r1]
        o_rla.append(ob)
    rms = lambda x: x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm_eps)  # noqa: E731
    o = (rms(torch.cat(o_swa, 2)) * swa_norm_weight.to(dt)[:, None]
         + rms(torch.cat(o_rla, 2)) * rla_norm_weight.to(dt)[:, None])
    return o.transpose(1, 2)


def errors(got, want):
    """max abs error, relative error ||got - want|| / ||want||, and whether got is finite."""
    got, want = got.double(), want.double()
    finite = bool(torch.isfinite(got).all())
    diff = got - want
    return float(diff.abs().max()), float(diff.norm() / want.norm().clamp_min(1e-300)), finite


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    for name in ("B", "T", "Hq", "Hkv", "D", "window"):
        p.add_argument(f"--{name}", type=int, default=None)
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto",
                   help="auto: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--reps", type=int, default=None, help="timed repetitions (median)")
    args = p.parse_args(argv)

    device = pick_device(args.device)
    if device == "cuda":
        dtype, dev_name = torch.bfloat16, torch.cuda.get_device_name()
        size = dict(B=2, T=8192, Hq=16, Hkv=4, D=128, window=512)
        reps = args.reps or 10
    else:
        dtype, dev_name = torch.float32, f"{cpu_name()} ({torch.get_num_threads()} threads)"
        size = dict(B=1, T=4096, Hq=8, Hkv=2, D=64, window=512)
        reps = args.reps or 2
    if args.dtype != "auto":
        dtype = getattr(torch, args.dtype)
    size.update({n: getattr(args, n) for n in size if getattr(args, n) is not None})
    B, T, Hq, Hkv, D, w = (size[n] for n in ("B", "T", "Hq", "Hkv", "D", "window"))
    log(f"device {device} ({dev_name}), dtype {str(dtype).replace('torch.', '')}, "
        f"B={B} T={T} Hq={Hq} Hkv={Hkv} D={D} window={w}")

    log("probing the compiled kernels on a tiny input ...")
    pending = probe_kernels(device, dtype, D)
    if pending is None:
        backend = f"rattention_ext {device.upper()} kernels"
        fn = rattention_ext.forward
    else:
        backend = f"FALLBACK: rattention_ext.reference (kernels: {pending})"
        fn = ref.forward
        log(f"compiled kernels unavailable ({pending}); running the PyTorch reference instead")

    x, tables, grad_out = make_inputs(B, T, Hq, Hkv, D, dtype, device)
    leaves = {n: t.detach().clone().requires_grad_(True) for n, t in x.items()}

    def fwd():
        return fn(**leaves, **tables, window_size=w)

    last = {}

    def fwd_bwd():
        for t in leaves.values():
            t.grad = None
        o = fwd()
        o.backward(grad_out)
        last["out"] = o.detach()

    log(f"timing forward (warm-up + median of {reps}) ...")
    fwd_ms = time_ms(fwd, device, reps)
    log(f"forward {fwd_ms:.1f} ms; timing forward+backward ...")
    fb_ms = time_ms(fwd_bwd, device, reps)
    log(f"forward+backward {fb_ms:.1f} ms")

    # Accuracy check: full size, or a slice of it on CPU when the float64 reference would be slow.
    check_note = "full size"
    cx, ctables, cg = x, tables, grad_out
    if device == "cpu" and B * T * Hq > CPU_FULL_CHECK_LIMIT:
        Tc = min(T, CHECK_TOKENS)
        check_note = f"slice B=1 T={Tc} (float64 reference too slow at full size on CPU)"
        cx = {n: (t[:1, :Tc] if n in ("q", "k", "v") else t) for n, t in x.items()}
        ctables = {n: t[:Tc] for n, t in tables.items()}
        cg = grad_out[:1, :Tc]
    if cx is x:  # the last timed forward+backward already ran on exactly these inputs
        got = {"out": last["out"], **{"d" + n: leaves[n].grad for n in LEAVES}}
    else:
        log(f"running {backend.split(' (')[0]} on the check slice ...")
        got = run(fn, cx, ctables, cg, w)
    log("float64 reference forward+backward on a float64 copy ...")
    want = run(ref.forward, {n: t.double() for n, t in cx.items()},
               {n: t.double() for n, t in ctables.items()}, cg.double(), w)
    base = None
    if dtype in (torch.bfloat16, torch.float16):
        log(f"plain-PyTorch {str(dtype).replace('torch.', '')} baseline for the error budget ...")
        base = run(_plain_lowp_forward, cx, ctables, cg, w)

    rows, ok, worst_abs, worst_rel = [], True, 0.0, 0.0
    for name in want:
        a, r, finite = errors(got[name], want[name])
        if base is None:
            limit = 1e-5
        else:
            limit = 2 * errors(base[name], want[name])[1] + 1e-3
        passed = finite and r <= limit
        ok &= passed
        worst_abs, worst_rel = max(worst_abs, a), max(worst_rel, r)
        rows.append((name, a, r, limit, "ok" if passed else ("NaN/inf" if not finite else "FAIL")))

    print()
    print(f"{'tensor':<18}{'max abs err':>12}{'rel err':>12}{'rel limit':>12}  status")
    for name, a, r, lim, st in rows:
        print(f"{name:<18}{a:>12.2e}{r:>12.2e}{lim:>12.2e}  {st}")
    print()
    table = [
        ("backend", backend),
        ("device", dev_name),
        ("dtype", str(dtype).replace("torch.", "")),
        ("shape", f"q [B={B}, T={T}, Hq={Hq}, D={D}], k/v Hkv={Hkv}"),
        ("window", str(w)),
        ("forward", f"{fwd_ms:.1f} ms"),
        ("forward+backward", f"{fb_ms:.1f} ms"),
        ("check", f"vs float64 reference, {check_note}; out + grads of {', '.join(LEAVES)}"),
        ("max abs error", f"{worst_abs:.2e}"),
        ("relative error", f"{worst_rel:.2e} (worst tensor)"),
        ("result", "PASS" if ok else "FAIL"),
    ]
    width = max(len(k) for k, _ in table)
    print("\n".join(f"{k:<{width}}  {v}" for k, v in table), flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
