"""LQER inside the budget allocation, on one trained model: the quantization gap of each export, measured
non-overlapping.

    source logs/caseops/proxy_env.sh; env $CASEOPS SEED=1 RUN_ID=lqer_alloc_s1 python3 tools/lqer_compare.py

Trains once with train_gpt's own phases, exports the weights at their natural size (default grids, no LQER), then
under a cap at that size (the allocation redistributing the same bytes) and one 5 % above it, each with
BUDGET_FILL=1 and LQER_TOP_K=0 or the given LQER_TOP_K (3 when unset), and evaluates each artifact. Prints `L_RESULT` lines (cap, bytes, LQER tensors, roundtrip val_bpb, gap).
"""
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import train_gpt  # noqa: E402


def main():
    run = train_gpt.start_run()
    data = train_gpt.Data(run)
    trained, hessians, pre = train_gpt.train_to_export(run, data)
    top_k = run.h.lqer_top_k or 3

    def report(cap, fill, k):
        run.h = train_gpt.Hyperparameters({**os.environ, "ARTIFACT_CAP_BYTES": str(cap), "BUDGET_FILL": str(int(fill)),
                                           "LQER_TOP_K": str(k), "RUN_ID": run.h.run_id})
        artifact = train_gpt.export(run, trained, hessians)
        total = artifact.stat().st_size + run.code_bytes
        lqer = sorted(e[0] for e in train_gpt.deserialize_quantized(artifact.read_bytes()).items() if "lqer_a" in e[1])
        bpb = train_gpt.evaluate_artifact(run, data, artifact)["final_int6_zstd_roundtrip"]["val_bpb"]
        print(f"L_RESULT cap:{cap} budget_fill:{int(fill)} lqer_top_k:{k} total:{total} lqer:{','.join(lqer) or '-'} "
              f"roundtrip_bpb:{bpb:.6f} gap:{bpb - pre['val_bpb']:+.6f}", flush=True)
        return total

    natural = report(10**12, False, 0)
    for cap in (natural + train_gpt.TARGET_SLACK + 1, int(1.05 * natural)):  # +1: the allocation runs without LQER too
        for k in (0, top_k):
            report(cap, True, k)
    print(f"pre-quant val_bpb {pre['val_bpb']:.6f}; natural total {natural} bytes")


if __name__ == "__main__":
    main()
