"""Context parallelism on CPU: one long sequence through nn.RAttention, sharded across ranks.

    torchrun --nproc_per_node 4 examples/context_parallel.py            # T=16384, w=512
    torchrun --nproc_per_node 4 examples/context_parallel.py --seq-len 4096 --window 128

Every rank runs forward + backward of the layer on its contiguous shard (rank 0 first), with
``nn.RAttention(..., context_parallel_group=True)``. Before that, rank 0 runs the same layer
on the whole sequence in a fresh subprocess (``--single``) as the single-process baseline;
the others wait. The script then reports, per rank:

* the peak memory of forward + backward (after a short warm-up pass, so that code pages
  and one-time buffers are not counted; the layer's weights, which exist before the region,
  are added), measured two ways, each in its own pass:
  - ``rss``: growth of the process's resident-set high-water mark (``VmHWM``, reset by
    writing ``5`` to ``/proc/self/clear_refs`` at the start of the region) over the resident
    set at that moment. Counts everything: the input made inside the region, torch
    tensors, the kernels' own scratch buffers (``std::vector``), gloo's buffers, allocator
    slack.
  - ``torch``: the peak of live bytes of the torch CPU allocator, from the allocation events
    of ``torch.profiler`` (``profile_memory=True``). Only tensors.
* the bytes this rank sent (``rattention_ext.distributed.count_traffic``) against the bytes
  of its own K/V shard (what an all-gather of K/V, as for full attention, would send per
  peer);
* the output and the input / weight gradients (all-reduced) against the single-process run.

The ratio asked for is the per-rank peak divided by the single-process peak (same method,
same threads per process).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import torch
import torch.distributed as dist
from torch.profiler import ProfilerActivity, profile

import rattention_ext
from rattention_ext import distributed as cp
from rattention_ext.nn import RAttention


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


class RssPeak:
    """Growth of the resident-set high-water mark over a region (VmHWM is reset to the
    current VmRSS on entry by writing 5 to /proc/self/clear_refs)."""

    def __enter__(self):
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        self.rss0 = _status_kib("VmRSS") * 1024
        return self

    def __exit__(self, *exc):
        self.peak = _status_kib("VmHWM") * 1024 - self.rss0
        return False


class TorchAllocatorPeak:
    """Peak of live bytes of the torch CPU allocator over a region, from torch.profiler's
    allocation events (``profile_memory=True``), in time order."""

    def __enter__(self):
        self.prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
        self.prof.__enter__()
        return self

    def __exit__(self, *exc):
        self.prof.__exit__(*exc)
        events = [e for e in self.prof.profiler.kineto_results.events() if e.name() == "[memory]"]
        events.sort(key=lambda e: e.start_ns())
        live = peak = 0
        for e in events:
            live += e.nbytes()
            peak = max(peak, live)
        self.peak = peak
        return False


def make_layer(args) -> RAttention:
    torch.manual_seed(0)
    layer = RAttention(args.heads * args.head_dim, args.heads, args.kv_heads, args.window,
                       head_dim=args.head_dim, learned_init_state=True)
    with torch.no_grad():
        layer.initial_state.normal_(std=0.02)
    return layer


def make_input(args, lo: int, hi: int):
    """Rows ``[lo, hi)`` of the global input and of the output gradient (same on every rank)."""
    g = torch.Generator().manual_seed(1)
    d = args.heads * args.head_dim
    x = torch.randn(1, args.seq_len, d, generator=g)[:, lo:hi].clone()
    gy = torch.randn(1, args.seq_len, d, generator=g)[:, lo:hi].clone()
    return x.requires_grad_(), gy


def fwd_bwd(layer, args, lo, hi):
    x, gy = make_input(args, lo, hi)
    y = layer(x)
    y.backward(gy)
    return y.detach(), x.grad


def measure(layer, args, lo, hi, warmup_rows):
    """Forward + backward of the input rows [lo, hi): a short warm-up (so that code pages and
    one-time buffers are not counted), then one pass under each memory meter. Returns
    (y, dx, {"rss": bytes, "torch": bytes, "seconds": s}); both peaks include the weights,
    which exist before the region (their gradients are made inside it)."""
    fwd_bwd(layer, args, *warmup_rows)
    weights = sum(p.numel() * p.element_size() for p in layer.parameters())
    layer.zero_grad(set_to_none=True)
    with RssPeak() as rss:
        t0 = time.perf_counter()
        y, gx = fwd_bwd(layer, args, lo, hi)
        seconds = time.perf_counter() - t0
    grads = {n: p.grad for n, p in layer.named_parameters()}
    layer.zero_grad(set_to_none=True)
    with TorchAllocatorPeak() as alloc:
        fwd_bwd(layer, args, lo, hi)
    layer.zero_grad(set_to_none=True)
    return y, gx, grads, {"rss": rss.peak + weights, "torch": alloc.peak + weights,
                          "seconds": seconds}


def single(args):
    torch.set_num_threads(args.threads)
    layer = make_layer(args)
    y, gx, grads, mem = measure(layer, args, 0, args.seq_len, (0, 4 * (args.window + 1)))
    torch.save({"y": y, "gx": gx, "grads": grads}, args.out + ".pt")
    with open(args.out + ".json", "w") as f:
        json.dump(mem, f)


def rel(a, b):
    return float((a - b).norm() / b.norm())


def parallel(args):
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(args.threads)
    base = os.path.join(tempfile.gettempdir(), f"rattention_cp_single_{os.getppid()}")
    if rank == 0:  # the single-process baseline, in a fresh process
        subprocess.run([sys.executable, __file__, "--single", "--out", base] + sys.argv[1:],
                       check=True)
    dist.barrier()

    # Contiguous shards, as equal as possible.
    bounds = [args.seq_len * r // world for r in range(world + 1)]
    lo, hi = bounds[rank], bounds[rank + 1]
    layer = make_layer(args)
    layer.context_parallel_group = True  # the default group
    # Warm-up: the first 4 * (w + 1) tokens, split the same way.
    n_warm = 4 * (args.window + 1)
    warm = (n_warm * rank // world, n_warm * (rank + 1) // world)
    y, gx, grads, mem = measure(layer, args, lo, hi, warm)
    # Bytes sent by one forward + backward.
    with cp.count_traffic() as sent_once:
        fwd_bwd(layer, args, lo, hi)
    layer.zero_grad(set_to_none=True)

    # Compare with the single-process run: rows of y and dx, all-reduced weight gradients.
    ref = torch.load(base + ".pt")
    errs = {"y": rel(y, ref["y"][:, lo:hi]), "dx": rel(gx, ref["gx"][:, lo:hi])}
    for n, g in grads.items():
        g = g.clone()
        dist.all_reduce(g)
        errs["d" + n] = rel(g, ref["grads"][n])
    kv_shard = 2 * (hi - lo) * args.kv_heads * args.head_dim * 4
    row = {"rank": rank, "tokens": hi - lo, "rss": mem["rss"], "torch": mem["torch"],
           "sent": dict(sent_once), "kv_shard_bytes": kv_shard,
           "max_rel_err": max(errs.values()), "seconds": mem["seconds"]}
    rows = [None] * world
    dist.all_gather_object(rows, row)
    if rank == 0:
        with open(base + ".json") as f:
            one = json.load(f)
        mib = 2.0 ** 20
        print(f"RAttention layer, T={args.seq_len}, Hq={args.heads}, Hkv={args.kv_heads}, "
              f"D={args.head_dim}, w={args.window}, float32, CPU, {args.threads} thread(s) per "
              f"process, torch {torch.__version__}")
        print(f"single process: peak fwd+bwd  rss {one['rss'] / mib:8.1f} MiB   torch allocator "
              f"{one['torch'] / mib:8.1f} MiB   {one['seconds']:.1f} s")
        print(f"{world} ranks (gloo):")
        for r in rows:
            print(f"  rank {r['rank']}: {r['tokens']:6d} tokens  peak rss {r['rss'] / mib:7.1f} MiB "
                  f"({r['rss'] / one['rss']:.3f}x)  torch {r['torch'] / mib:7.1f} MiB "
                  f"({r['torch'] / one['torch']:.3f}x)  sent {r['sent']['total'] / 1024:7.1f} KiB "
                  f"(halo {r['sent']['halo'] / 1024:.1f} + halo grad "
                  f"{r['sent']['halo_grad'] / 1024:.1f} + states "
                  f"{(r['sent']['state'] + r['sent']['state_grad']) / 1024:.1f} + layout "
                  f"{r['sent']['layout'] / 1024:.2f}; own K/V shard "
                  f"{r['kv_shard_bytes'] / 1024:.0f} KiB)  max rel err {r['max_rel_err']:.1e}  "
                  f"{r['seconds']:.1f} s")
        worst_rss = max(r["rss"] for r in rows) / one["rss"]
        worst_torch = max(r["torch"] for r in rows) / one["torch"]
        print(f"worst rank / single process: rss {worst_rss:.3f}x, torch allocator "
              f"{worst_torch:.3f}x")
        summary = {"args": vars(args), "single": one, "ranks": rows,
                   "worst_ratio_rss": worst_rss, "worst_ratio_torch": worst_torch}
        if args.json:
            with open(args.json, "w") as f:
                json.dump(summary, f, indent=1)
        for ext in (".pt", ".json"):
            os.remove(base + ext)
    dist.barrier()
    dist.destroy_process_group()


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seq-len", type=int, default=16384)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--window", type=int, default=512)
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--json", default=None, help="write the numbers here (rank 0)")
    p.add_argument("--single", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.single:
        single(args)
    else:
        parallel(args)


if __name__ == "__main__":
    main()
