"""Out-of-window recall: does RAttention remember what sliding-window attention cannot see?

Task (multi-query associative recall, MQAR). Each sequence is

    k1 v1 k2 v2 ... kN vN | f f f ... f | q1 a1 q2 a2 ... qN aN

N key-value pairs (distinct keys, values drawn with replacement), a filler of random
filler tokens, then every key once more in random order, each followed by its value. The
model is trained (next-token cross-entropy on the answer tokens ``a_i`` only) to predict
``a_i`` at the position of ``q_i``. The filler is long enough that every answer lies more
than ``num_layers * window_size`` tokens before its query: not just outside one layer's
window, but outside the receptive field of the whole stack of sliding-window layers, so a
pure-SWA model cannot see any pair and is at chance (1 / num_values). Values are drawn with
replacement so earlier answers inside the window reveal nothing by elimination.

Models (same width, depth, heads, steps, data, seed):
* ``full``: every layer full causal softmax attention (SDPA).
* ``swa``: every layer sliding-window attention with window ``w`` (the SWA kernels).
* ``rattention``: every layer RAttention with window ``w`` (``rattention_ext.nn.RAttention``,
  i.e. ``rattention_ext.forward``: SWA + residual linear attention kernels).

Why all-local instead of the usual 3 local : 1 global pattern: one global layer alone can
solve this task, so a hybrid SWA model would match a hybrid RAttention model and the
comparison would say nothing about what the local layers remember. With all layers local,
only the RLA branch can carry information from outside the window. (Pass ``--pattern LLLG``
to run the hybrid variant anyway.)

Each model needs two layers: the first copies the key into its value's position (a
previous-token head, inside the window), the second matches the query against those
key-value pairs; for RAttention that match must go through the linear-attention state.

    python examples/long_range_recall.py --quick --out recall_quick.json     # < 10 min, 2 cores
    python examples/long_range_recall.py                                     # full run: JSON, PNG,
                                                                             # markdown in benchmarks/results/

Output JSON: ``full``, ``swa``, ``rattention`` = accuracy on the held-out queries whose
answer is outside the window (all of them, by construction), plus ``config``, ``curves``
(per-step training loss and periodic held-out accuracy), ``machine``, ``date``, ``git_commit``.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import platform
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tiny_lm import TinyLM, TinyLMConfig  # noqa: E402

import rattention_ext  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class TaskConfig:
    num_pairs: int = 8
    num_keys: int = 16
    num_values: int = 16
    num_fillers: int = 8          # filler vocabulary size
    filler_len: int = 20          # must exceed num_layers * window_size - 1 (checked)
    num_queries: int = 0          # keys queried per sequence (0: all of them)
    fused_pairs: bool = False     # one token per key-value pair (see the module docstring)

    @property
    def vocab_size(self) -> int:
        n = self.num_keys + self.num_values + self.num_fillers
        return n + self.num_keys * self.num_values if self.fused_pairs else n

    @property
    def pair_len(self) -> int:
        return 1 if self.fused_pairs else 2

    @property
    def seq_len(self) -> int:
        return self.pair_len * self.num_pairs + self.filler_len + 2 * self.queries

    @property
    def queries(self) -> int:
        return self.num_queries or self.num_pairs


def make_batch(task: TaskConfig, batch: int, gen: torch.Generator):
    """Tokens ``[B, T]``, loss/eval mask ``[B, T]`` (True where the NEXT token is an answer),
    and the distance from each masked query position back to the value token of its pair."""
    N, K, V = task.num_pairs, task.num_keys, task.num_values
    keys = torch.argsort(torch.rand(batch, K, generator=gen), dim=1)[:, :N]        # distinct
    vals = K + torch.randint(0, V, (batch, N), generator=gen)                      # with repl.
    fill = K + V + torch.randint(0, task.num_fillers, (batch, task.filler_len), generator=gen)
    order = torch.argsort(torch.rand(batch, N, generator=gen), dim=1)[:, :task.queries]
    qk = torch.gather(keys, 1, order)
    qv = torch.gather(vals, 1, order)
    if task.fused_pairs:
        pairs = K + V + task.num_fillers + keys * V + (vals - K)
    else:
        pairs = torch.stack([keys, vals], dim=2).reshape(batch, 2 * N)
    queries = torch.stack([qk, qv], dim=2).reshape(batch, 2 * task.queries)
    tokens = torch.cat([pairs, fill, queries], dim=1)
    P = task.pair_len
    q0 = P * N + task.filler_len                      # position of the first query key
    mask = torch.zeros(batch, task.seq_len, dtype=torch.bool)
    mask[:, q0::2] = True                             # query key positions predict the answer
    qpos = q0 + 2 * torch.arange(task.queries)        # [Nq]
    dist = qpos[None, :] - (P * order + P - 1)        # query position - pair's (value) position
    return tokens, mask, dist


def evaluate(model, tokens, mask, chunk=256, per_query=False):
    """Accuracy of the answers (all of them outside the window); with ``per_query`` also
    the accuracy by query index (1st, 2nd, ... query of the sequence)."""
    model.eval()
    hits = []
    with torch.no_grad():
        for i in range(0, tokens.shape[0], chunk):
            t, m = tokens[i:i + chunk], mask[i:i + chunk]
            pred = model(t[:, :-1]).argmax(-1)
            mm = m[:, :-1]
            hits.append((pred[mm] == t[:, 1:][mm]).view(t.shape[0], -1).float())
    model.train()
    hits = torch.cat(hits)                                   # [B, N] in query order
    acc = hits.mean().item()
    return (acc, [round(a, 4) for a in hits.mean(0).tolist()]) if per_query else acc


def lr_at(step, steps, lr, warmup):
    if step < warmup:
        return lr * (step + 1) / warmup
    p = (step - warmup) / max(1, steps - warmup)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p)))


def train_one(name, model_cfg, task, args, eval_set):
    torch.manual_seed(args.seed)                     # same init stream for every model
    model = TinyLM(model_cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay,
                            betas=(0.9, 0.98))
    gen = torch.Generator().manual_seed(args.seed + 1)   # same data stream for every model
    curve_loss, curve_eval = [], []
    t0 = time.time()
    ev_tok, ev_mask = eval_set
    for step in range(args.steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args.steps, args.lr, args.warmup)
        tok, mask, _ = make_batch(task, args.batch_size, gen)
        logits = model(tok[:, :-1])
        m = mask[:, :-1]
        loss = F.cross_entropy(logits[m], tok[:, 1:][m])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        curve_loss.append(round(loss.item(), 5))
        last = step == args.steps - 1
        if (step + 1) % args.eval_every == 0 or last:
            acc = evaluate(model, ev_tok, ev_mask)
            curve_eval.append([step + 1, acc])
            el = time.time() - t0
            print(f"  [{name:10s}] step {step + 1:5d}/{args.steps}  loss {loss.item():.4f}  "
                  f"held-out acc {acc:.3f}  ({el:.0f}s)", flush=True)
    _, by_query = evaluate(model, ev_tok, ev_mask, per_query=True)
    return dict(accuracy=curve_eval[-1][1], accuracy_by_query_index=by_query, train_loss=curve_loss, eval_accuracy=curve_eval,
                params=model.num_parameters(), layers=model.layer_kinds,
                seconds=round(time.time() - t0, 1))


def _git_commit():
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True, check=True).stdout.strip()
    except Exception:  # noqa: BLE001
        return None


def _machine():
    return dict(platform=platform.platform(), processor=platform.processor() or platform.machine(),
                cpu_count=os.cpu_count(), torch_threads=torch.get_num_threads(),
                torch=torch.__version__, python=platform.python_version(),
                rattention_ext=rattention_ext.__version__)


def plot(result, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for name, color in (("full", "tab:blue"), ("swa", "tab:red"), ("rattention", "tab:green")):
        xs, ys = zip(*result["curves"][name]["eval_accuracy"])
        ax.plot(xs, ys, label=f"{name} (final {result[name]:.3f})", color=color)
    ax.axhline(result["chance"], ls="--", color="gray", lw=1, label="chance")
    c = result["config"]
    ax.set_xlabel("training step")
    ax.set_ylabel("held-out accuracy, answers outside the window")
    ax.set_title(f"MQAR out-of-window recall: {c['model']['num_layers']} layers, "
                 f"w={c['model']['window_size']}, {c['task']['num_pairs']} pairs", fontsize=10)
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(loc="center right", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def markdown(result, cmd):
    c, m = result["config"], result["machine"]
    lines = [
        "# Out-of-window recall (MQAR), trained from scratch on CPU",
        "",
        f"Date {result['date']}, commit `{result['git_commit']}`, {m['platform']}, "
        f"{m['torch_threads']} torch threads, torch {m['torch']}.",
        f"Command: `{cmd}`",
        "",
        f"Task: {c['task']['num_pairs']} key-value pairs ({c['task']['num_keys']} keys, "
        f"{c['task']['num_values']} values), {c['task']['filler_len']} filler tokens, then "
        f"{c['task']['num_queries'] or c['task']['num_pairs']} of the keys queried once each "
        f"in random order; sequence length {c['task']['seq_len']}. Every answer lies "
        f"{result['min_distance']}..{result['max_distance']} tokens before its query, beyond the "
        f"{c['model']['num_layers']} x w = {c['model']['num_layers'] * c['model']['window_size']} "
        f"token receptive field of the sliding-window stack. Chance = {result['chance']:.4f}.",
        f"Model: {c['model']['num_layers']} layers, hidden {c['model']['hidden_size']}, "
        f"{c['model']['num_heads']} heads (kv {c['model']['num_kv_heads']}), window "
        f"{c['model']['window_size']}, all layers of one kind (see the script's docstring); "
        f"{c['train']['steps']} steps of batch {c['train']['batch_size']}, AdamW lr "
        f"{c['train']['lr']}, seed {c['train']['seed']}; {c['train']['eval_size']} held-out sequences.",
        "",
        "| model | attention in every layer | params | held-out accuracy (answer outside window) | by query index (1st..last) | train time (s) |",
        "|---|---|---|---|---|---|",
    ]
    desc = {"full": "full causal softmax (SDPA)", "swa": "sliding-window softmax (SWA kernel)",
            "rattention": "RAttention: SWA + residual linear attention (kernels)"}
    for name in ("full", "swa", "rattention"):
        cv = result["curves"][name]
        byq = " ".join(f"{a:.2f}" for a in cv["accuracy_by_query_index"])
        lines.append(f"| {name} | {desc[name]} | {cv['params']} | {result[name]:.4f} | {byq} | "
                     f"{cv['seconds']} |")
    lines += ["", "![accuracy vs step](recall_full.png)", ""]
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small run, < 10 min on 2 cores")
    ap.add_argument("--out", type=str, default=None, help="JSON output path")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--weight-decay", type=float, default=0.0)
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--eval-every", type=int, default=None)
    ap.add_argument("--eval-size", type=int, default=None)
    ap.add_argument("--window", type=int, default=8)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--heads", type=int, default=2)
    ap.add_argument("--kv-heads", type=int, default=None)
    ap.add_argument("--pairs", type=int, default=None)
    ap.add_argument("--pattern", type=str, default=None,
                    help="layer pattern for swa/rattention (default all local 'L')")
    ap.add_argument("--keys", type=int, default=16)
    ap.add_argument("--values", type=int, default=16)
    ap.add_argument("--queries", type=int, default=0, help="keys queried (default all)")
    ap.add_argument("--fused-pairs", action="store_true",
                    help="one token per key-value pair (a 1-layer task) instead of two tokens")
    ap.add_argument("--feature-map", type=str, default="softmax")
    ap.add_argument("--models", type=str, default="full,swa,rattention")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--results-dir", type=str, default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    q = args.quick
    args.steps = args.steps or (500 if q else 1500)
    args.batch_size = args.batch_size or 32
    args.eval_every = args.eval_every or (50 if q else 100)
    args.eval_size = args.eval_size or (512 if q else 1024)
    pairs = args.pairs or 8
    w, L = args.window, args.layers
    # Every answer must sit beyond the stack's receptive field L * w: the first query is at
    # 2N + filler and the last value at 2N - 1, so the gap 1 + filler must exceed L * w.
    task = TaskConfig(num_pairs=pairs, num_keys=args.keys, num_values=args.values,
                      filler_len=L * w + 4, fused_pairs=args.fused_pairs,
                      num_queries=args.queries)
    pattern = args.pattern or "L"
    base = dict(vocab_size=task.vocab_size, hidden_size=args.hidden, num_layers=L,
                num_heads=args.heads, num_kv_heads=args.kv_heads or args.heads,
                window_size=w, feature_map=args.feature_map, tie_embeddings=True)
    cfgs = {"full": TinyLMConfig(**base, local="swa", layer_pattern="G"),
            "swa": TinyLMConfig(**base, local="swa", layer_pattern=pattern),
            "rattention": TinyLMConfig(**base, local="rattention", layer_pattern=pattern)}
    models = [m for m in args.models.split(",") if m]

    gen = torch.Generator().manual_seed(args.seed + 12345)
    ev_tok, ev_mask, ev_dist = make_batch(task, args.eval_size, gen)
    dmin, dmax = int(ev_dist.min()), int(ev_dist.max())
    assert dmin > L * w, (dmin, L * w)
    chance = 1.0 / task.num_values
    print(f"task: T={task.seq_len} pairs={pairs} vocab={task.vocab_size} answers {dmin}..{dmax} "
          f"tokens back (receptive field of {L} local layers: {L * w}); chance {chance:.4f}")
    print(f"train: {args.steps} steps x batch {args.batch_size}, lr {args.lr}, "
          f"threads {torch.get_num_threads()}, seed {args.seed}", flush=True)

    result = {}
    curves = {}
    t_all = time.time()
    for name in models:
        print(f"== {name}: layers {cfgs[name].layer_pattern!r} x {L}", flush=True)
        r = train_one(name, cfgs[name], task, args, (ev_tok, ev_mask))
        result[name] = r["accuracy"]
        curves[name] = r
    result.update(
        chance=chance, min_distance=dmin, max_distance=dmax,
        config=dict(task=dict(asdict(task), seq_len=task.seq_len, vocab_size=task.vocab_size),
                    model={k: v for k, v in asdict(cfgs["rattention"]).items()
                           if k not in ("local", "layer_pattern")},
                    patterns={n: cfgs[n].layer_pattern for n in cfgs},
                    train=dict(steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                               weight_decay=args.weight_decay, warmup=args.warmup,
                               eval_every=args.eval_every, eval_size=args.eval_size,
                               seed=args.seed, quick=q, dtype="float32"),
                    kernels="rattention_ext.forward / rattention_ext.sliding_window_attention (CPU)"),
        curves=curves, machine=_machine(),
        date=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        git_commit=_git_commit(), total_seconds=round(time.time() - t_all, 1),
        command=" ".join(["python", "examples/long_range_recall.py"] + (argv or sys.argv[1:])),
    )
    print("\nheld-out accuracy on answers outside the window:")
    for name in models:
        print(f"  {name:10s} {result[name]:.4f}   by query index: "
              f"{' '.join(f'{a:.2f}' for a in curves[name]['accuracy_by_query_index'])}")
    print(f"  chance     {chance:.4f}   (total {result['total_seconds']:.0f}s)")

    out = args.out
    if not q:
        rd = Path(args.results_dir)
        rd.mkdir(parents=True, exist_ok=True)
        out = out or str(rd / "recall_full.json")
        if all(n in result for n in ("full", "swa", "rattention")):
            plot(result, rd / "recall_full.png")
            (rd / "recall_full.md").write_text(markdown(result, result["command"]))
            print(f"wrote {rd / 'recall_full.png'} and {rd / 'recall_full.md'}")
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(result, indent=1))
        print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
