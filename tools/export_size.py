"""How the export spends the 16 MB on a full-size model, without training it: bytes with and without budget
filling, export time, and the bits per int6 code of zstd and of lzma.

    python3 tools/export_size.py                 # the default (SP1024) stack
    STACK=sp8192 python3 tools/export_size.py    # any setting of train_gpt.py applies

The model is built from the settings at init, with its zero-initialised projections given an orthogonal init too
(a trained model's are not zero, and zeros would compress to nothing); no data, so rounding instead of GPTQ and
unit Hessian diagonals. Code bytes are those of train_gpt.py, or CODE_BYTES.
"""
import os
import sys
import time
import zstandard  # noqa: F401  (train_gpt needs it; fail here with a clear message if it is missing)
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import train_gpt  # noqa: E402


def bits_per_code(qstate, names, h):
    """(zstd, lzma) bits per int6 code over the matrices at 6 bits, each tensor its own frame as in the artifact."""
    codes = [qstate[n]["codes"].numpy().tobytes() for n in names if qstate[n]["bits"] == 6]
    total = sum(len(c) for c in codes)
    z = sum(len(train_gpt.zstd_compress(c, h.zstd_level, 6)) for c in codes)
    x = sum(len(train_gpt.lzma.compress(c, preset=train_gpt.LZMA_PRESET)) for c in codes)
    return 8 * z / total, 8 * x / total, total


def main():
    torch.manual_seed(0)
    code_bytes = int(os.environ.get("CODE_BYTES", (ROOT / "train_gpt.py").stat().st_size))
    results = {}
    for fill in (0, 1):
        h = train_gpt.Hyperparameters({**os.environ, "BUDGET_FILL": str(fill), "GPTQ": "0"})
        if fill == 0:
            model = train_gpt.build_model(h)
            for m in model.modules():
                if isinstance(m, train_gpt.CastedLinear) and m.zero_init and min(m.weight.shape) >= 64:
                    torch.nn.init.orthogonal_(m.weight)
            state = model.state_dict()
            params = sum(t.numel() for t in state.values())
            print(f"STACK={h.stack}: {params:,} parameters; estimate before training {train_gpt.estimate_model_bytes(state, h):,} bytes + code {code_bytes:,}")
        t = time.perf_counter()
        blob, qstate, report = train_gpt.export_artifact(state, h, code_bytes, log=lambda m, **_: print("  " + m))
        results[fill] = (len(blob) + code_bytes, time.perf_counter() - t, report)
        print(f"BUDGET_FILL={fill}: total {len(blob) + code_bytes:,} bytes (model {len(blob):,}; cap {h.artifact_cap_bytes:,}, "
              f"{h.artifact_cap_bytes - len(blob) - code_bytes:,} left) in {results[fill][1]:.1f}s; grids {report['grids']}; "
              f"frames {report['methods']}")
        if fill == 0 and any(e.get("bits") == 6 for e in qstate.values()):
            z, x, n = bits_per_code(qstate, [k for k, e in qstate.items() if "codes" in e], h)
            print(f"int6 codes ({n:,}): zstd-{h.zstd_level} {z:.3f} bits/code, lzma-9e {x:.3f} bits/code")


if __name__ == "__main__":
    main()
