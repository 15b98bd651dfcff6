"""Issue 9 item 6: why does the EMA export trail the live weights at the end of a 200-step run? One training
run (side-by-side config, AVERAGING=none) keeps the weights of its last 48 steps; each candidate average is
then scored on the same non-overlapping windows as the pre-quantization evaluation."""
import sys, math
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[2]))  # the repository root
import torch
import train_gpt as tg

KEEP = 48
snaps = {}
real_update = tg.WeightAverager.update


def spy(self, step):
    if step >= 200 - KEEP:
        snaps[step] = ([p.detach().float().clone() for p in self.params], None)
    return real_update(self, step)


tg.WeightAverager.update = spy
run = tg.start_run()
data = tg.Data(run)
trained, _, _ = tg.train_to_export(run, data)  # the run's own phases (the Hessians and pre-quant pass are not used here)
params = list(trained.model.parameters())
steps = sorted(snaps)
print("SNAP steps", steps[0], "..", steps[-1], flush=True)


def score(name, weights):
    with torch.no_grad():
        for p, w in zip(params, weights):
            p.copy_(w)
    res = tg.evaluate_trained(run, data, trained)
    print(f"AVG {name:32s} val_bpb {res['val_bpb']:.6f}", flush=True)


def ema(k, decay_cap=0.9965):
    avg = [w.clone() for w in snaps[steps[0]][0]]
    for s in steps[1:]:
        d = min(decay_cap, (1 + s) / (k + s))
        torch._foreach_lerp_(avg, snaps[s][0], 1 - d)
    return avg


score("live (last step)", snaps[steps[-1]][0])
for back in (1, 2, 4, 8):
    score(f"live {back} steps earlier", snaps[steps[-1 - back]][0])
for n in (2, 4, 8, 16, 32):
    ws = [snaps[s][0] for s in steps[-n:]]
    score(f"uniform mean of last {n}", [sum(t) / n for t in zip(*ws)])
for k in (10, 40, 100):
    score(f"EMA (1+t)/({k}+t) from step {steps[0]}", ema(k))
