"""LQER on and off on one trained model: the quantization gap of each export, measured non-overlapping.

    source logs/caseops/proxy_env.sh; env $CASEOPS BUDGET_FILL=0 SEED=1 RUN_ID=lqer_compare python3 tools/lqer_compare.py

Trains once with train_gpt's own phases, then exports the same weights with LQER_TOP_K=0 and with the given
LQER_TOP_K (3 when unset), and evaluates each artifact. Prints `L_RESULT` lines (bytes, roundtrip val_bpb, gap).
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import train_gpt  # noqa: E402


def main():
    run = train_gpt.start_run()
    data = train_gpt.Data(run)
    trained, hessians, pre = train_gpt.train_to_export(run, data)
    h, top_k = run.h, run.h.lqer_top_k or 3
    for k in (0, top_k):
        h.lqer_top_k = k
        artifact = train_gpt.export(run, trained, hessians)
        bpb = train_gpt.evaluate_artifact(run, data, artifact)["final_int6_zstd_roundtrip"]["val_bpb"]
        print(f"L_RESULT lqer_top_k:{k} total:{artifact.stat().st_size + run.code_bytes} roundtrip_bpb:{bpb:.6f} "
              f"gap:{bpb - pre['val_bpb']:+.6f}", flush=True)
    print(f"pre-quant val_bpb {pre['val_bpb']:.6f}")


if __name__ == "__main__":
    main()
