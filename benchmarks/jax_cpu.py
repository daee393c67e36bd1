"""The JAX binding on CPU: ``rattention_ext.jax`` against the pure-JAX reference and JAX's
own attention, all jitted, timed in alternating rounds in one process (ratios from one run).

Rows (default: B=1, T=2048, Hq=8, Hkv=2, D=64, w=512, float32, the CPU table's shape):

- ``fwd_bwd``: RAttention forward + backward into q, k, v (``jax.value_and_grad``):
  ``rattention_ext.jax.forward`` vs ``rattention_ext.jax_reference.forward`` (dense masked
  SWA + token-by-token ``lax.scan`` RLA: what a JAX model without kernels runs on CPU) and
  vs ``rattention_ext.forward`` (torch, the same kernels: the binding's overhead);
- ``swa_fwd_bwd`` / ``swa_fwd``: the SWA branch alone vs ``jax.nn.dot_product_attention``
  with a ``[T, T]`` band mask (XLA's attention; it computes all ``T^2`` scores) and vs the
  reference's SWA.

Each row also checks the binding's output against the reference (relative error), so a
fast wrong answer cannot pass. Writes ``benchmarks/results/jax_cpu_<date>.{json,md}`` with
machine, date, commit, jax and torch versions.

    PYTHONPATH=python python -m benchmarks.jax_cpu                # T=2048 (a few minutes)
    PYTHONPATH=python python -m benchmarks.jax_cpu --T 1024 4096 --budget 5
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def _cases(args, T):
    import jax
    import jax.numpy as jnp
    import torch

    import rattention_ext
    import rattention_ext.jax as rjax
    from rattention_ext import jax_reference as jref

    B, Hq, Hkv, D, w = args.B, args.Hq, args.Hkv, args.D, args.w
    rng = np.random.default_rng(T)
    q, k, v = (jnp.asarray(rng.standard_normal((B, T, H, D)), jnp.float32)
               for H in (Hq, Hkv, Hkv))
    cot = jnp.asarray(rng.standard_normal((B, T, Hq, D)), jnp.float32)
    band = jnp.tril(jnp.ones((T, T), bool)) & ~jnp.tril(jnp.ones((T, T), bool), -w - 1)

    def xla_swa(q, k, v):
        # XLA's attention with the band mask: query t sees keys t - w .. t
        return jax.nn.dot_product_attention(q, k, v, mask=band[None, None], implementation="xla")

    def vjp_of(f):
        def loss(q, k, v):
            o = f(q, k, v)
            return jnp.sum(o * cot), o
        g = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))
        return lambda: jax.block_until_ready(g(q, k, v)), lambda: g(q, k, v)[0][1]

    def fwd_of(f):
        g = jax.jit(f)
        return lambda: jax.block_until_ready(g(q, k, v)), lambda: g(q, k, v)

    ours_full = lambda q, k, v: rjax.forward(q, k, v, window_size=w)  # noqa: E731
    ref_full = lambda q, k, v: jref.forward(q, k, v, window_size=w)  # noqa: E731
    ours_swa = lambda q, k, v: rjax.sliding_window_attention(q, k, v, window_size=w)  # noqa: E731
    ref_swa = lambda q, k, v: jref.sliding_window_attention(q, k, v, window_size=w)  # noqa: E731

    tq, tk, tv = (torch.from_numpy(np.array(x)).requires_grad_(True) for x in (q, k, v))
    tcot = torch.from_numpy(np.array(cot))

    def torch_fwd_bwd():
        o = rattention_ext.forward(tq, tk, tv, window_size=w)
        torch.autograd.grad(o, (tq, tk, tv), tcot)

    return {
        "fwd_bwd": {"ours": vjp_of(ours_full), "jax_reference": vjp_of(ref_full),
                    "torch_same_kernels": (torch_fwd_bwd, None)},
        "swa_fwd_bwd": {"ours": vjp_of(ours_swa), "jax_nn_dpa_band": vjp_of(xla_swa),
                        "jax_reference": vjp_of(ref_swa)},
        "swa_fwd": {"ours": fwd_of(ours_swa), "jax_nn_dpa_band": fwd_of(xla_swa),
                    "jax_reference": fwd_of(ref_swa)},
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.jax_cpu", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--T", nargs="+", type=int, default=[2048])
    p.add_argument("--B", type=int, default=1)
    p.add_argument("--Hq", type=int, default=8)
    p.add_argument("--Hkv", type=int, default=2)
    p.add_argument("--D", type=int, default=64)
    p.add_argument("--w", type=int, default=512)
    p.add_argument("--budget", type=float, default=8.0, help="seconds of timed rounds per row")
    p.add_argument("--max-reps", type=int, default=15)
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--no-save", action="store_true")
    args = p.parse_args(argv)

    import jax
    import torch

    from . import report
    from .timing import time_cpu_interleaved

    meta = report.metadata()
    meta["jax"] = jax.__version__
    meta["jax_devices"] = [str(d) for d in jax.devices()]
    rows = []
    for T in args.T:
        for op, impls in _cases(args, T).items():
            # Warm-up = compile; then the reference's output for the check.
            outs = {}
            for name, (run, value) in impls.items():
                run()
                if value is not None:
                    outs[name] = np.asarray(value())
            err = {n: _rel(outs["ours"], o) for n, o in outs.items() if n != "ours"}
            stats = time_cpu_interleaved({n: (lambda i, r=r: r()) for n, (r, _) in impls.items()},
                                         min_reps=3, max_reps=args.max_reps, budget_s=args.budget)
            ours = stats["ours"]["median_s"]
            for name, s in stats.items():
                rows.append(dict(op=op, B=args.B, T=T, Hq=args.Hq, Hkv=args.Hkv, D=args.D,
                                 w=args.w, dtype="float32", impl=name,
                                 ms=1e3 * s["median_s"], reps=s["reps"], min_ms=1e3 * s["min_s"],
                                 time_over_ours=s["median_s"] / ours,
                                 rel_err_ours_vs_this=err.get(name)))
                print(f"{op:12s} T={T:6d} {name:20s} {1e3 * s['median_s']:9.1f} ms  "
                      f"{s['median_s'] / ours:6.2f}x ours"
                      + (f"  (ours vs this: rel err {err[name]:.1e})" if name in err else ""),
                      file=sys.stderr, flush=True)

    md = [f"JAX binding (`rattention_ext.jax`) on CPU, B={args.B}, Hq={args.Hq}, "
          f"Hkv={args.Hkv}, D={args.D}, w={args.w}, float32, every implementation jitted.  ",
          f"Machine: {report.stamp(meta)}, jax {meta['jax']}.  ",
          "Wall-clock medians, timed in alternating rounds in one process: compare the ratios "
          "(`x ours` = that implementation's time over the binding's). `ours vs this` is the "
          "relative error of the binding's output against that implementation's.", "",
          "| op | T | implementation | ms | x ours | ours vs this |", "|---|---|---|---|---|---|"]
    for r in rows:
        e = r["rel_err_ours_vs_this"]
        md.append(f"| {r['op']} | {r['T']} | {r['impl']} | {r['ms']:.1f} | "
                  f"{r['time_over_ours']:.2f} | {'-' if e is None else f'{e:.1e}'} |")
    text = "\n".join(md) + "\n"
    print(text)
    if not args.no_save:
        args.out.mkdir(parents=True, exist_ok=True)
        stem = args.out / f"jax_cpu_{meta['date_utc'][:10]}"
        stem.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
        stem.with_suffix(".md").write_text(text)
        print(f"wrote {stem}.json, {stem}.md", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
