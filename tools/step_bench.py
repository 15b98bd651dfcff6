"""Training ms/step of several settings side by side, as ratios to the first: the cost of a switch without a
training run. Variants are timed in interleaved rounds (A B C A B C ...), so a machine that slows down part-way
slows all of them alike; the figure per variant is the median over rounds.

    DATA_PATH=../shared/data/docs_sp1024 TOKENIZER_PATH=../shared/data/tokenizers/docs_1024_bpe.model \
      NUM_LAYERS=8 MODEL_DIM=128 NUM_HEADS=4 NUM_KV_HEADS=2 TRAIN_SEQ_LEN=256 TRAIN_BATCH_TOKENS=8192 \
      python3 tools/step_bench.py "DOC_ISOLATION=0 LOOP_LAYERS=off PARALLEL_START=off" "DOC_ISOLATION=1" ...

Each argument is one variant: space-separated VAR=VALUE pairs over the environment (an empty string: the
environment as it is). The run's own training step and loader (shuffled windows, documents and all), one process,
no compile on CPU; a looping variant is timed with its loop on. ROUNDS (default 5) and STEPS per round (default 3) set the length.
"""
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import train_gpt  # noqa: E402


class Variant:
    """One setting's model, optimizers, loader and training step: the run's own (train_gpt.make_train_step)."""

    def __init__(self, spec):
        self.name = spec or "(environment)"
        overrides = dict(pair.split("=", 1) for pair in spec.split())
        h = train_gpt.Hyperparameters({**os.environ, **overrides})
        torch.manual_seed(h.seed)
        run = train_gpt.Run(h)
        self.model = train_gpt.build_model(h)
        accum, local_tokens = h.batch_layout(1)
        self.train_step = train_gpt.make_train_step(run, self.model, train_gpt.Optimizers(self.model, h), accum)
        _, files = train_gpt.find_shards(h.data_path, "train")
        self.loader = train_gpt.DistributedTokenLoader(files, 0, 1, run.device, local_tokens, h.train_seq_len, h.seed,
                                                       starts=self.model.varlen)
        self.times = []

    def step(self):
        self.train_step(self.loader, 0, 1.0, 1.0)  # at the end of training: a looping variant runs its loop

    def time_round(self, steps):
        t = time.perf_counter()
        for _ in range(steps):
            self.step()
        self.times.append(1000 * (time.perf_counter() - t) / steps)


def main(specs):
    rounds, steps = int(os.environ.get("ROUNDS", 5)), int(os.environ.get("STEPS", 3))
    variants = [Variant(spec) for spec in specs or [""]]
    for v in variants:
        v.step()  # first-step allocations and lazy initialisation stay out of the figures
    for _ in range(rounds):
        for v in variants:
            v.time_round(steps)
    base = statistics.median(variants[0].times)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {rounds} rounds x {steps} steps")
    for v in variants:
        ms = statistics.median(v.times)
        print(f"{ms:9.1f} ms/step  x{ms / base:.3f}  (rounds {min(v.times):.0f}-{max(v.times):.0f})  {v.name}")


if __name__ == "__main__":
    main(sys.argv[1:])
