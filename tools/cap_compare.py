"""Fitting a cap: the export's allocation against scaling every clip k uniformly, on one trained model.

    OMP_NUM_THREADS=1 DATA_PATH=../shared/data/docs_sp1024_tiny TOKENIZER_PATH=../shared/data/tokenizers/docs_1024_bpe.model \
      NUM_LAYERS=4 MODEL_DIM=128 NUM_HEADS=4 NUM_KV_HEADS=2 MLP_MULT=4 VE_DIM=0 TRAIN_SEQ_LEN=256 TRAIN_BATCH_TOKENS=8192 \
      GRAD_ACCUM_STEPS=1 ITERATIONS=200 WARMUP_STEPS=0 MAX_WALLCLOCK_SECONDS=0 MUON_MOMENTUM_WARMUP_STEPS=100 \
      GPTQ_CALIB_BATCHES=8 python3 tools/cap_compare.py

Trains once with train_gpt's own phases, then exports the same weights under a cap 8 % below and 10 % above
their natural size: with the allocation (BUDGET_FILL=1) and with every *_CLIP_K scaled by the one factor whose
total fits the cap (bisection). Prints the roundtrip val_bpb and quantization gap of each (`C_RESULT` lines).
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
    base_k = {name: getattr(run.h, name.lower()) for name in ("ATTN_CLIP_K", "MLP_CLIP_K", "EMBED_CLIP_K")}

    def export(cap, fill, scale=1.0):  # the run's settings with these export ones, validated as a run's are
        run.h = train_gpt.Hyperparameters({**os.environ, "ARTIFACT_CAP_BYTES": str(cap), "BUDGET_FILL": str(int(fill)),
                                           "RUN_ID": run.h.run_id, **{n: str(k * scale) for n, k in base_k.items()}})
        artifact = train_gpt.export(run, trained, hessians)
        return artifact, artifact.stat().st_size + run.code_bytes

    def report(name, cap, fill, scale=1.0):
        artifact, total = export(cap, fill, scale)
        bpb = train_gpt.evaluate_artifact(run, data, artifact)["final_int6_zstd_roundtrip"]["val_bpb"]
        print(f"C_RESULT {name} cap:{cap} total:{total} clip_scale:{scale:.3f} roundtrip_bpb:{bpb:.6f} "
              f"gap:{bpb - pre['val_bpb']:+.6f}", flush=True)
        return total

    def uniform_scale(cap, lo, hi):
        """The finest uniform clip scale in [lo, hi] whose total fits `cap` (the total falls as the scale rises)."""
        for _ in range(10):
            mid = (lo + hi) / 2
            lo, hi = (lo, mid) if export(10**12, False, mid)[1] <= cap else (mid, hi)
        return hi

    natural = report("natural", 10**12, False)
    for label, cap, lo, hi in (("below", int(0.92 * natural), 1.0, 3.0), ("above", int(1.10 * natural), 0.3, 1.0)):
        report(f"{label}_allocation", cap, True)
        report(f"{label}_uniform_clip", 10**12, False, uniform_scale(cap, lo, hi))
    print(f"pre-quant val_bpb {pre['val_bpb']:.6f}; natural total {natural} bytes")


if __name__ == "__main__":
    main()
