"""Does a TTT configuration fit in the 600 s evaluation on 8xH100? Answered before a node is rented: the run's own
plan (train_gpt.TTTPlan), budget rule (TTTBudget) and driver (drive_lora_ttt) run on simulated ranks with a fake
clock that advances by a cost model, so the numbers follow exactly what a run would decide.

    python3 tools/ttt_plan.py                          # FineWeb-shaped documents, the default (sp1024) stack, 8 ranks
    STACK=sp8192 python3 tools/ttt_plan.py --world 8   # any train_gpt.py setting applies (TTT_*, EVAL_SEQ_LEN, ...)
    python3 tools/ttt_plan.py --val ../shared/data/docs_sp1024   # the documents of real validation shards

The cost model's defaults are train_gpt.TTT_PRIOR (calibrated from the records' logs on one H100); --pre-ttt is the
eval clock spent before TTT starts (decompression, compile warm-ups: the records' first TTT batch took 90-150 s more
than their cost model, and the diagnostic pass: 50 s in the 04-27 record). It prints per-rank TTT time, the share of
targets adapted, the phases run and the projected eval clock, at TTT_BUDGET_SECONDS and without a budget.
"""
from __future__ import annotations

import argparse
import os
import sys
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

import train_gpt  # noqa: E402

FINEWEB_DOCS, FINEWEB_MEAN, FINEWEB_MAX = 50_000, 1_276, 100_000  # sp1024 validation set: 63.8 M tokens
SP8192_TOKENS_PER_SP1024 = 40_540_160 / 62_021_632  # the two tokenizations of the same validation text


def fineweb_lengths(n_docs=FINEWEB_DOCS, mean=FINEWEB_MEAN, longest=FINEWEB_MAX, sigma=1.2, seed=0):
    """Heavy-tailed document lengths (tokens) shaped like FineWeb's validation set: log-normal, clipped to
    [16, longest], scaled to the given mean."""
    raw = np.random.default_rng(seed).lognormal(0.0, sigma, n_docs)
    lengths = np.clip(raw * mean / raw.mean(), 16, longest)
    for _ in range(5):  # clipping moved the mean
        lengths = np.clip(lengths * mean / lengths.mean(), 16, longest)
    return np.round(lengths).astype(np.int64)


def fineweb_lengths_for(h):
    """FineWeb-shaped lengths in the tokens of h's vocabulary, and a description of them."""
    shrink = SP8192_TOKENS_PER_SP1024 if h.vocab_size == 8192 else 1.0
    return (fineweb_lengths(mean=FINEWEB_MEAN * shrink, longest=FINEWEB_MAX * shrink),
            f"FineWeb-shaped synthetic (log-normal, mean {FINEWEB_MEAN * shrink:.0f}, longest <= {FINEWEB_MAX * shrink:.0f})")


def shard_lengths(data_path):
    """Targets per document of the validation shards in `data_path` (as the run splits them)."""
    _, files = train_gpt.find_shards(data_path, "val")
    import torch
    tokens = torch.from_numpy(np.concatenate([train_gpt.read_shard(f) for f in files]).astype(np.int64))
    return np.array([n for _, n in train_gpt.document_spans(tokens)], dtype=np.int64)


def simulate(lengths, h, world_size, pre_ttt_seconds, prior=None, true_costs=None):
    """Run drive_lora_ttt on `world_size` threads, one per rank, each with a fake clock that advances by the true
    costs (default: the prior) of what it runs; the phases' collectives wait for the slowest rank. Returns the end of
    the eval clock, per-rank TTT seconds and what was adapted."""
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    plan = train_gpt.TTTPlan(list(zip(starts.tolist(), [int(n) for n in lengths])), h, world_size)
    true = train_gpt.CostModel(true_costs or prior)
    clocks, votes, stats = [float(pre_ttt_seconds)] * world_size, [True] * world_size, [None] * world_size
    barrier = threading.Barrier(world_size)

    def agree(rank, ok):  # an all-reduce: every rank waits for the last to arrive
        votes[rank] = ok
        barrier.wait()
        verdict, latest = all(votes), max(clocks)
        barrier.wait()
        clocks[rank] = latest
        return verdict

    def rank_main(rank):
        def advance(work):
            clocks[rank] += true.seconds(work)

        def score_batch(batch, adapt, keep_adapting):
            """As score_documents spends time: chunk by chunk while adapting (asking keep_adapting once a fake
            second has passed), the rest at once."""
            shape = train_gpt.BatchShape([n for _, n in batch], h)
            chunk = true.seconds(train_gpt.Work(token_pass=1)) * shape.passes + true.seconds(train_gpt.Work(chunk_step=1))
            advance(train_gpt.Work(batch=1))
            c, asked = 0, clocks[rank]
            while adapt and c < shape.chunks:
                if c and clocks[rank] - asked >= train_gpt.TTT_CHECK_SECONDS:
                    asked = clocks[rank]
                    if not keep_adapting(c):
                        break
                clocks[rank] += chunk[c]
                c += 1
            advance(shape.work(False, c) + train_gpt.Work(batch=-int(c == 0)))
            return c

        budget = train_gpt.TTTBudget(h.ttt_budget_seconds, 0.0, clock=lambda: clocks[rank], prior=prior)
        stats[rank] = train_gpt.drive_lora_ttt(
            plan, rank, h, budget, score_batch, lambda k, lane: None,
            lambda k: advance(train_gpt.Work(sgd_token=sum(n for _, n in plan.phase_docs[k]) / world_size)),
            lambda ok: agree(rank, ok))

    threads = [threading.Thread(target=rank_main, args=(r,)) for r in range(world_size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {"eval_clock": max(clocks), "rank_seconds": [c - pre_ttt_seconds for c in clocks], "ranks": stats,
            "adapted": sum(s["adapted_targets"] for s in stats) / max(sum(s["targets"] for s in stats), 1),
            "phases": stats[0]["phases"], "phases_planned": len(plan.phase_docs), "batches": sum(s["batches"] for s in stats)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--val", help="a data folder with fineweb_val_*.bin (default: FineWeb-shaped synthetic documents)")
    parser.add_argument("--world", type=int, default=8, help="ranks (GPUs)")
    parser.add_argument("--pre-ttt", type=float, default=180.0, help="eval clock seconds before TTT starts")
    for name, value in train_gpt.TTT_PRIOR.items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=float, default=value, help=f"seconds per {name} (prior)")
    args = parser.parse_args(argv)
    prior = {name: getattr(args, name) for name in train_gpt.TTT_PRIOR}
    h = train_gpt.Hyperparameters({**os.environ, "TTT": "lora"})
    lengths, source = (shard_lengths(args.val), args.val) if args.val else fineweb_lengths_for(h)
    print(f"ttt_plan: {len(lengths):,} documents, {int(lengths.sum()):,} targets, longest {int(lengths.max()):,}: {source}")
    print(f"settings: TTT_BATCH_DOCS={h.ttt_batch_docs} TTT_CHUNK={h.ttt_chunk} EVAL_SEQ_LEN={h.eval_seq_len} "
          f"TTT_PHASES={h.ttt_phases or '(none)'}; {args.world} ranks; eval clock before TTT {args.pre_ttt:.0f}s")
    print("cost model: " + ", ".join(f"{k} {v:.3g}s" for k, v in prior.items()))
    print(f"{'budget':>10} | {'TTT s per rank (min-max)':>24} | {'targets adapted':>15} | {'phases':>6} | eval clock")
    for budget in (h.ttt_budget_seconds, 1e9):
        r = simulate(lengths, train_gpt.Hyperparameters({**os.environ, "TTT": "lora", "TTT_BUDGET_SECONDS": str(budget)}),
                     args.world, args.pre_ttt, prior)
        label = f"{budget:.0f}s" if budget < 1e9 else "unbounded"
        print(f"{label:>10} | {min(r['rank_seconds']):>10.0f} - {max(r['rank_seconds']):<11.0f} | {100 * r['adapted']:>14.1f}% | "
              f"{r['phases']}/{r['phases_planned']:<4} | {r['eval_clock']:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
