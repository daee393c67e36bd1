"""A few small cases of every CUDA op, for compute-sanitizer (tools/gpu_session.sh).

Each case runs a public op at a small, ragged size (forward and backward where it has one) and
checks the result against the float64 reference (computed on the CPU, so the sanitizer
instruments only the op's own kernels) (relative Frobenius error under a loose bound:
the test suite holds the exact accuracy rule; here a wrong answer under the sanitizer's
scheduling must still fail), so one process covers the RLA passes (several segments, GQA,
both head dims, H0, packed documents), the SWA kernels (rotary), the fused mix and decoding.
Sizes are small because memcheck and racecheck run every access through the tool.

    python tools/gpu_sanitize_cases.py [--device cuda|cpu] [--only NAME]

`--device cpu` runs the same cases on the CPU backend (a check of this script without a GPU).
Exit status 1 when a case fails; each case prints one line.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

_PKG = Path(__file__).resolve().parent.parent / "python"
if any((_PKG / "rattention_ext").glob("_C*")):  # the in-place build (make dev, gpu_check)
    sys.path.insert(0, str(_PKG))
import rattention_ext  # noqa: E402
from rattention_ext import reference as ref  # noqa: E402
from rattention_ext.nn import rotary_tables  # noqa: E402

BOUND = {torch.bfloat16: 3e-2, torch.float16: 1e-2}


def rel_err(x, r) -> float:
    x, r = f64(x, r)
    if not torch.isfinite(x).all():
        return math.inf
    return ((x - r).norm() / r.norm().clamp_min(1e-30)).item()


def inputs(dev, dtype, seed, *shapes):
    g = torch.Generator(device="cpu").manual_seed(seed)
    return [torch.randn(*s, generator=g).to(device=dev, dtype=dtype) for s in shapes]


def f64(*ts):
    """float64 copies on the CPU: the reference runs there, out of the sanitizer's way."""
    return [t.detach().cpu().double() for t in ts]


def fwd_bwd(fn, args, grad):
    """fn(*args) and the gradients of <fn(*args), grad> with respect to args."""
    args = [a.detach().requires_grad_(True) for a in args]
    out = fn(*args)
    gs = torch.autograd.grad(out, args, grad, allow_unused=True)  # w >= T: k, v reach no output
    return [out.detach(), *(torch.zeros_like(a) if g is None else g for a, g in zip(args, gs))]


def compare(name, got, want, dtype) -> bool:
    errs = [rel_err(a, b) for a, b in zip(got, want)]
    ok = all(e <= BOUND[dtype] for e in errs)
    print(f"{'ok  ' if ok else 'FAIL'} {name}: rel err " + ", ".join(f"{e:.1e}" for e in errs),
          flush=True)
    return ok


def case_forward(dev, D, dtype):
    """rattention_ext.forward fwd+bwd: GQA 2, ragged T, H0, several checkpoint segments."""
    B, T, Hq, Hkv, w = 2, 203, 4, 2, 37
    q, k, v, go = inputs(dev, dtype, D, (B, T, Hq, D), (B, T, Hkv, D), (B, T, Hkv, D), (B, T, Hq, D))
    (h0,) = inputs(dev, torch.float32, D + 1, (1, Hq, 2 * D, D))
    h0 = 0.05 * h0
    kw = dict(window_size=w, feature_map="softmax")
    got = fwd_bwd(lambda a, b, c, s: rattention_ext.forward(a, b, c, initial_state=s,
                                                            checkpoint_every=1, **kw),
                  (q, k, v, h0), go)
    want = fwd_bwd(lambda a, b, c, s: ref.forward(a, b, c, initial_state=s, **kw),
                   f64(q, k, v, h0), *f64(go))
    return compare(f"forward D{D} {str(dtype)[6:]}", got, want, dtype)


def case_rla_relu(dev, D, dtype):
    """residual_linear_attention alone, relu, G = 4, w >= T on one sequence, w = 0 on another."""
    ok = True
    for T, w in ((90, 120), (130, 0)):
        q, k, v, go = inputs(dev, dtype, T, (1, T, 4, D), (1, T, 1, D), (1, T, 1, D), (1, T, 4, D))
        kw = dict(window_size=w, feature_map="relu")
        got = fwd_bwd(lambda a, b, c: rattention_ext.residual_linear_attention(a, b, c, **kw),
                      (q, k, v), go)
        want = fwd_bwd(lambda a, b, c: ref.residual_linear_attention(a, b, c, **kw),
                       f64(q, k, v), *f64(go))
        ok &= compare(f"rla relu D{D} T{T} w{w}", got, want, dtype)
    return ok


def case_swa_rotary(dev, D, dtype):
    """sliding_window_attention with rotary tables, GQA 2."""
    T, w = 150, 50
    q, k, v, go = inputs(dev, dtype, 7, (1, T, 4, D), (1, T, 2, D), (1, T, 2, D), (1, T, 4, D))
    cos, sin = rotary_tables(T, D, 10000.0, device=dev)
    kw = dict(window_size=w)
    got = fwd_bwd(lambda a, b, c: rattention_ext.sliding_window_attention(
        a, b, c, rotary_cos=cos, rotary_sin=sin, **kw), (q, k, v), go)
    cos64, sin64 = f64(cos, sin)
    want = fwd_bwd(lambda a, b, c: ref.sliding_window_attention(
        a, b, c, rotary_cos=cos64, rotary_sin=sin64, **kw), f64(q, k, v), *f64(go))
    return compare(f"swa rotary D{D} {str(dtype)[6:]}", got, want, dtype)


def case_packed(dev, D, dtype):
    """forward on a packed batch: documents of 70, 0 and 130 tokens."""
    lens = [70, 0, 130]
    total, w = sum(lens), 5
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device=dev)
    q, k, v, go = inputs(dev, dtype, 11, (total, 4, D), (total, 2, D), (total, 2, D), (total, 4, D))
    kw = dict(window_size=w)
    got = fwd_bwd(lambda a, b, c: rattention_ext.forward(a, b, c, cu_seqlens=cu,
                                                         max_seqlen=max(lens), **kw), (q, k, v), go)
    want = fwd_bwd(lambda a, b, c: ref.forward(a, b, c, cu_seqlens=cu.cpu(), max_seqlen=max(lens),
                                               **kw), f64(q, k, v), *f64(go))
    return compare(f"packed D{D} {str(dtype)[6:]}", got, want, dtype)


def case_decode(dev, D, dtype):
    """prefill 60 tokens, then 6 decode steps; the outputs against the forward of all 66."""
    B, T0, steps, Hq, Hkv, w = 2, 60, 6, 4, 2, 9
    T = T0 + steps
    q, k, v = inputs(dev, dtype, 13, (B, T, Hq, D), (B, T, Hkv, D), (B, T, Hkv, D))
    kw = dict(window_size=w, feature_map="softmax")
    cache = rattention_ext.RAttentionCache.empty(B, w, Hkv, D, device=dev, dtype=dtype)
    rattention_ext.prefill(q[:, :T0], k[:, :T0], v[:, :T0], cache, **kw)
    outs = [rattention_ext.decode_step(q[:, t:t + 1], k[:, t:t + 1], v[:, t:t + 1], cache, **kw)
            for t in range(T0, T)]
    want = ref.forward(*f64(q, k, v), **kw)[:, T0:]
    return compare(f"decode D{D} {str(dtype)[6:]}", [torch.cat(outs, dim=1)], [want], dtype)


CASES = {
    "forward": case_forward,
    "rla_relu": case_rla_relu,
    "swa_rotary": case_swa_rotary,
    "packed": case_packed,
    "decode": case_decode,
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    ap.add_argument("--only", choices=sorted(CASES), action="append",
                    help="run only this case (repeatable)")
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_sanitize_cases: no CUDA device visible to torch", file=sys.stderr)
        return 2
    failed = []
    t0 = time.time()
    for name in args.only or CASES:
        # the CPU backend has no float16
        half = torch.float16 if args.device == "cuda" else torch.bfloat16
        for D, dtype in ((64, torch.bfloat16), (128, half)):
            try:
                ok = CASES[name](args.device, D, dtype)
            except Exception as e:  # a launch error surfaces here; report it and go on
                print(f"FAIL {name} D{D}: {type(e).__name__}: {e}", flush=True)
                ok = False
            if not ok:
                failed.append(f"{name} D{D}")
    if args.device == "cuda":
        try:  # after a kernel fault every later call fails too (the error is sticky)
            torch.cuda.synchronize()
        except RuntimeError as e:
            failed.append(f"synchronize: {e}")
    print(f"gpu_sanitize_cases: {len(failed)} failed in {time.time() - t0:.1f} s"
          + (": " + ", ".join(failed) if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
