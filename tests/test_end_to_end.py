"""Whole-pipeline tests: the README's CPU smoke run, 2-process torchrun (gloo) against 1 process with the same
global batch, and the exact final lines on the shared docs_sp1024_tiny data."""
import json
import math
import os
import re
import subprocess
import time

import numpy as np
import pytest

from conftest import DOCS_TINY, DOCS_TOKENIZER, ROOT, run_train, tiny_run_env
import train_gpt

FLOAT = r"([0-9.]+)"


def final_exact(log, tag):
    m = re.findall(rf"^{tag}_exact val_loss:{FLOAT} val_bpb:{FLOAT}$", log, re.M)
    assert m, f"no {tag}_exact line in log"
    return float(m[-1][0]), float(m[-1][1])


def test_smoke_run_end_to_end(tmp_path):
    """The README's smoke command runs train -> average -> GPTQ -> zstd -> roundtrip -> sliding eval in < 3 min."""
    env = dict(os.environ, SMOKE_DIR=str(tmp_path / "smoke"))
    t = time.time()
    proc = subprocess.run(["bash", str(ROOT / "tools" / "smoke_run.sh")], env=env, capture_output=True, text=True, timeout=600)
    elapsed = time.time() - t
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    expected_order = ["val_bpb:enabled tokenizer_kind=sentencepiece", "train_loader:dataset:", "val_loader:shards pattern=",
                      "model_params:", "world_size:1 grad_accum_steps:1", "warmup_step:1/", "step:1/", "pre_quant val_loss:",
                      "Serialized model int6+zstd:", "Code size:", "Total submission size int6+zstd:",
                      "final_int6_zstd_roundtrip val_loss:", "final_int6_sliding_window_exact", "final_int8_zlib_roundtrip_exact"]
    positions = [out.find(s) for s in expected_order]
    assert all(p >= 0 for p in positions), [s for s, p in zip(expected_order, positions) if p < 0]
    assert positions == sorted(positions)
    assert out.strip().splitlines()[-2].startswith("final_int8_zlib_roundtrip_exact")
    assert final_exact(out, "final_int8_zlib_roundtrip") == final_exact(out, "final_int6_sliding_window")
    losses = [float(x) for x in re.findall(r"train_loss:([0-9.]+)", out)]
    assert losses[-1] < losses[0] - 1.0, "training did not reduce the loss"
    sub = json.loads((tmp_path / "smoke" / "out" / "submission.json").read_text())
    assert sub["val_bpb"] == pytest.approx(final_exact(out, "final_int6_sliding_window")[1], abs=1e-8)
    log_file = tmp_path / "smoke" / "logs" / "smoke.txt"
    assert log_file.read_text().startswith("=" * 100)  # the log file opens with the code
    assert elapsed < 180, f"smoke run took {elapsed:.0f}s (promised < 3 min)"


def test_two_process_gloo_matches_one_process(smoke_dataset, tmp_path):
    """torchrun with 2 ranks x 1 micro-step equals 1 rank x 2 micro-steps: same data, same updates, same score."""
    common = dict(ITERATIONS="6", TRAIN_LOG_EVERY="1", AVERAGING="ema", GPTQ="1", RUN_ID="dist")
    one, log1 = run_train(tiny_run_env(smoke_dataset, GRAD_ACCUM_STEPS="2", **common), tmp_path / "one", nproc=1)
    assert one.returncode == 0, one.stderr[-3000:]
    two, log2 = run_train(tiny_run_env(smoke_dataset, GRAD_ACCUM_STEPS="1", **common), tmp_path / "two", nproc=2)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "world_size:2 grad_accum_steps:1" in log2 and "world_size:1 grad_accum_steps:2" in log1
    loss1 = [float(x) for x in re.findall(r"train_loss:([0-9.]+)", log1)]
    loss2 = [float(x) for x in re.findall(r"train_loss:([0-9.]+)", log2)]
    assert len(loss1) == len(loss2) == 6
    np.testing.assert_allclose(loss1, loss2, atol=2e-3)
    v1, v2 = final_exact(log1, "final_int6_sliding_window"), final_exact(log2, "final_int6_sliding_window")
    np.testing.assert_allclose(v1, v2, rtol=1e-3)
    assert re.search(r"final_int6_sliding_window_counts targets:(\d+)", log1).group(1) == \
        re.search(r"final_int6_sliding_window_counts targets:(\d+)", log2).group(1)


def independent_scored_bytes(tokens, sp):
    """UTF-8 bytes of the decoded text of every target token, document by document."""
    targets = tokens[1:]
    bos = np.flatnonzero(tokens == train_gpt.BOS_ID)
    total = 0
    for i, start in enumerate(bos):
        end = bos[i + 1] if i + 1 < len(bos) else len(tokens)
        total += len(sp.decode(tokens[start + 1:end].tolist()).encode("utf-8"))
    return targets.size, total


@pytest.mark.skipif(not (DOCS_TINY.exists() and DOCS_TOKENIZER.exists()), reason="../shared/data/docs_sp1024_tiny is absent")
def test_docs_tiny_final_lines_match_independent_byte_count(tmp_path):
    """The final sliding-window exact line satisfies val_loss/val_bpb = ln2 * bytes/tokens, with bytes counted
    from the decoded text of the scored targets, to 6 significant digits."""
    env = tiny_run_env((DOCS_TINY, DOCS_TOKENIZER), ITERATIONS="8", EVAL_STRIDE="16", RUN_ID="docs")
    proc, log = run_train(env, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    loss, bpb = final_exact(log, "final_int6_sliding_window")
    _, val = train_gpt.load_validation_tokens(str(DOCS_TINY), int(env["TRAIN_SEQ_LEN"]))
    n_targets, n_bytes = independent_scored_bytes(val.numpy(), train_gpt.load_tokenizer(str(DOCS_TOKENIZER)))
    assert f"final_int6_sliding_window_counts targets:{n_targets} bytes:{n_bytes} " in log
    assert f"{loss / bpb:.6g}" == f"{math.log(2) * n_bytes / n_targets:.6g}"
