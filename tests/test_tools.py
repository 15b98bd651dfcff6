"""Tests of the helper tools: compare_nll (paired loss-dump comparison and the Student-t CDF), merge_seeds
(records-layout multi-seed submission.json) and pack_code (self-extracting lzma wrapper of train_gpt.py)."""
import importlib.util
import json
import math
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

import compare_nll
import export_size
import merge_seeds
import pack_code
import train_gpt
from conftest import ROOT, TINY


def exit_code(main, argv):
    with pytest.raises(SystemExit) as info:
        main(argv)
    return info.value.code


# ---------------------------------------------------------------------------------------------------- compare_nll

def t2_cdf(t):
    """Closed form of Student's t CDF with 2 degrees of freedom."""
    return 0.5 + t / (2 * math.sqrt(2 + t * t))


def test_betainc_closed_forms():
    for x in (1e-6, 0.1, 0.5, 0.9, 1 - 1e-6):
        assert compare_nll.betainc(1, 1, x) == pytest.approx(x, rel=1e-12)
        assert compare_nll.betainc(3.5, 1, x) == pytest.approx(x ** 3.5, rel=1e-12)
        assert compare_nll.betainc(1, 2.5, x) == pytest.approx(1 - (1 - x) ** 2.5, rel=1e-12)


def test_student_t_known_values():
    assert compare_nll.two_sided_p(2.0, 10) == pytest.approx(0.0733880, abs=1e-7)
    assert compare_nll.two_sided_p(2.0, 1e6) == pytest.approx(0.0455005, abs=1e-7)
    assert compare_nll.two_sided_p(2.0, 1) == pytest.approx(1 - 2 / math.pi * math.atan(2.0), rel=1e-12)
    for t in (-30.0, -2.6, -0.3, 0.0, 0.7, 4.0):
        assert compare_nll.student_t_cdf(t, 2) == pytest.approx(t2_cdf(t), rel=1e-10, abs=1e-15)
        assert compare_nll.student_t_cdf(t, 7) + compare_nll.student_t_cdf(-t, 7) == pytest.approx(1.0, abs=1e-14)
    assert compare_nll.two_sided_p(0.0, 5) == 1.0
    assert compare_nll.student_t_cdf(-math.inf, 5) == 0.0 and compare_nll.two_sided_p(math.inf, 5) == 0.0


def dump(nll, nbytes):
    return {"nll": np.asarray(nll, np.float64), "bytes": np.asarray(nbytes, np.int64), "order": np.zeros(len(nll), np.int64)}


def test_identical_dumps_give_zero_difference():
    rng = np.random.default_rng(0)
    a = dump(rng.exponential(2.0, 5000), rng.integers(0, 6, 5000))
    r = compare_nll.compare(a, a, block=512)
    assert r["delta_bpb"] == 0 and r["delta_nats"] == 0 and r["se_bpb"] == 0
    assert (r["t_bpb"], r["p_bpb"], r["t_nats"], r["p_nats"]) == (0, 1, 0, 1)
    assert r["n_blocks"] == 10 and r["bpb_a"] == r["bpb_b"]
    assert r["bpb_a"] == pytest.approx(a["nll"].sum() / (math.log(2) * a["bytes"].sum()), rel=1e-12)
    assert r["loss_a"] == pytest.approx(a["nll"].mean(), rel=1e-12)


def test_constant_shift():
    rng = np.random.default_rng(1)
    n, c = 3000, 0.125
    # Multiples of 1/1024 make every sum and difference exact, so the nats difference is c to the last bit.
    b = dump(rng.integers(0, 8192, n) / 1024, rng.integers(0, 6, n))
    a = dump(b["nll"] + c, b["bytes"])
    r = compare_nll.compare(a, b, block=256)
    assert r["delta_nats"] == c and r["se_nats"] == 0 and r["p_nats"] == 0
    assert r["delta_bpb"] == pytest.approx(c * n / (math.log(2) * b["bytes"].sum()), rel=1e-12)
    assert r["t_bpb"] > 10


def test_standard_error_matches_spread_over_draws():
    """Differences with per-document shared noise: the block SE must match the actual spread of the estimate."""
    rng = np.random.default_rng(2)
    n, doc_len, block, draws = 20_000, 40, 200, 300
    nbytes = rng.integers(0, 8, n)
    b = dump(rng.exponential(2.0, n), nbytes)
    deltas, ses = {"bpb": [], "nats": []}, {"bpb": [], "nats": []}
    for _ in range(draws):
        noise = rng.normal(0, 0.1, n // doc_len).repeat(doc_len) + rng.normal(0, 0.2, n)
        r = compare_nll.compare(dump(b["nll"] + 0.01 + noise, nbytes), b, block)
        for unit in deltas:
            deltas[unit].append(r["delta_" + unit])
            ses[unit].append(r["se_" + unit])
    for unit in deltas:
        assert np.mean(ses[unit]) / np.std(deltas[unit], ddof=1) == pytest.approx(1.0, abs=0.12)
    # A per-target SE, blind to the shared document noise, would be ~3x too small.
    assert np.mean(ses["nats"]) > 2 * math.sqrt((0.2 ** 2 + 0.1 ** 2) / n)


def save(path, **arrays):
    np.savez(path, **arrays)
    return str(path)


def test_main_report(tmp_path, capsys):
    rng = np.random.default_rng(3)
    nll, nbytes = rng.exponential(2.0, 4096), rng.integers(0, 6, 4096)
    a = save(tmp_path / "a.npz", nll=nll - 0.01, bytes=nbytes, order=np.zeros(4096, np.int64))
    b = save(tmp_path / "b.npz", nll=nll, bytes=nbytes, order=np.zeros(4096, np.int64))
    compare_nll.main([a, b, "--block", "1024"])
    out = capsys.readouterr().out
    assert f"val_bpb {nll.sum() / (math.log(2) * nbytes.sum()):.8f}" in out
    assert "4 blocks" in out and "-0.01000000" in out and "0.005 nats/token" in out


@pytest.mark.parametrize("change", ["length", "bytes", "missing", "too_few_blocks"])
def test_main_refuses_incomparable_dumps(tmp_path, capsys, change):
    nll, nbytes = np.full(4096, 2.0), np.full(4096, 3)
    b = save(tmp_path / "b.npz", nll=nll, bytes=nbytes)
    block = "8192" if change == "too_few_blocks" else "512"
    if change == "length":
        a = save(tmp_path / "a.npz", nll=nll[:-1], bytes=nbytes[:-1])
    elif change == "bytes":
        a = save(tmp_path / "a.npz", nll=nll, bytes=np.where(np.arange(4096) == 7, 4, nbytes))
    elif change == "missing":
        a = save(tmp_path / "a.npz", nll=nll)
    else:
        a = b
    assert exit_code(compare_nll.main, [a, b, "--block", block]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ")


# ---------------------------------------------------------------------------------------------------- merge_seeds

def write_run(tmp_path, seed, val_loss, val_bpb, bytes_total, **overrides):
    run = dict(author="A. Golfer", github_id="golfer", name="11L int6", blurb="tiny", date="2026-03-20",
               track="10min_16mb", val_loss=val_loss, val_bpb=val_bpb, bytes_total=bytes_total, bytes_code=60000,
               bytes_model=bytes_total - 60000, seed=seed, step_stop=7000 + seed, step_avg_ms=85.5,
               train_time_ms=599000, eval_time_seconds=120.25, hardware="8x H100", pytorch_version="2.9.1",
               log=f"/runs/s{seed}/logs/train_seed{seed}.log", ttt="off",
               compliance=dict(train_under_600s=True, artifact_under_16mb=True, eval_under_600s=True,
                               score_first_ttt="no TTT", three_seeds=False))
    run.update(overrides)
    path = tmp_path / f"run{seed}" / "submission.json"
    path.parent.mkdir()
    path.write_text(json.dumps(run))
    return str(path)


def test_merge_three_seeds(tmp_path, capsys):
    paths = [write_run(tmp_path, 42, 1.90, 1.125, 15_900_000, date="2026-03-21"),
             write_run(tmp_path, 7, 1.92, 1.135, 15_950_123),
             write_run(tmp_path, 1337, 1.91, 1.130, 15_800_000,
                       compliance=dict(train_under_600s=False, artifact_under_16mb=True, eval_under_600s=True,
                                       score_first_ttt="no TTT", three_seeds=False))]
    out = tmp_path / "merged" / "submission.json"
    merge_seeds.main(paths + ["-o", str(out)])
    m = json.loads(out.read_text())
    assert m["val_loss"] == pytest.approx(1.91, abs=1e-12) and m["val_loss_std"] == pytest.approx(0.01, abs=1e-12)
    assert m["val_bpb"] == pytest.approx(1.13, abs=1e-12) and m["val_bpb_std"] == pytest.approx(0.005, abs=1e-12)
    assert m["bytes_total"] == 15_950_123 and m["bytes_code"] == 60000
    assert m["seeds"] == [7, 42, 1337] and list(m["seed_results"]) == ["7", "42", "1337"]
    assert m["seed_results"]["42"] == dict(val_loss=1.90, val_bpb=1.125, artifact_bytes=15_900_000, steps=7042,
                                           step_avg_ms=85.5, eval_time_s=120.25)
    assert m["logs"] == ["train_seed7.log", "train_seed42.log", "train_seed1337.log"]
    assert m["compliance"] == dict(train_under_600s=False, artifact_under_16mb=True, eval_under_600s=True,
                                   score_first_ttt="no TTT", three_seeds=True)
    assert m["date"] == "2026-03-21" and m["name"] == "11L int6" and m["ttt"] == "off"
    assert "mean of 3 seeds: val_loss 1.91000000 ± 0.01000000" in capsys.readouterr().out


def test_merge_tolerates_missing_optional_fields():
    runs = [dict(seed=1, val_loss=2.0, val_bpb=1.2, bytes_total=100, compliance=dict(score_first_ttt="sgd")),
            dict(seed=2, val_loss=2.2, val_bpb=1.4, bytes_total=90, name="x", compliance=dict(score_first_ttt="lora"))]
    m = merge_seeds.merge(runs)
    assert m["name"] == "x" and "bytes_code" not in m and m["logs"] == []
    assert m["seed_results"]["2"] == dict(val_loss=2.2, val_bpb=1.4, artifact_bytes=90)
    assert m["compliance"] == dict(score_first_ttt=["sgd", "lora"], three_seeds=False)


@pytest.mark.parametrize("problem", ["name", "duplicate_seed", "one_file", "bytes_code", "overwrite"])
def test_merge_refuses(tmp_path, capsys, problem):
    first = write_run(tmp_path, 1, 1.9, 1.1, 15_000_000)
    before = (tmp_path / "run1" / "submission.json").read_text()
    out = ["-o", str(tmp_path / "out.json")]
    if problem == "name":
        argv = [first, write_run(tmp_path, 2, 1.9, 1.1, 15_000_000, name="other")] + out
    elif problem == "bytes_code":
        argv = [first, write_run(tmp_path, 2, 1.9, 1.1, 15_000_000, bytes_code=60001)] + out
    elif problem == "duplicate_seed":
        (tmp_path / "copy").mkdir()
        (tmp_path / "copy" / "submission.json").write_text(before)
        argv = [first, str(tmp_path / "copy" / "submission.json")] + out
    elif problem == "overwrite":
        argv = [first, write_run(tmp_path, 2, 1.9, 1.1, 15_000_000), "-o", first]
    else:
        argv = [first] + out
    assert exit_code(merge_seeds.main, argv) == 2
    assert capsys.readouterr().err.startswith("error: ")
    assert not (tmp_path / "out.json").exists() and (tmp_path / "run1" / "submission.json").read_text() == before


def test_sota_test_arithmetic(tmp_path, capsys):
    # mean 1.91, std 0.01, n 3: t = (1.91 - (1.93 - 0.005)) / (0.01 / sqrt 3) = -1.5 sqrt 3.
    t, p = merge_seeds.sota_test([1.90, 1.91, 1.92], 1.93)
    assert t == pytest.approx(-1.5 * math.sqrt(3), rel=1e-12)
    assert p == pytest.approx(t2_cdf(-1.5 * math.sqrt(3)), rel=1e-10)  # 0.0608
    # mean 1.901, std 0.001: t = (1.901 - 1.945) / (0.001 / sqrt 3) = -44 sqrt 3, p ~ 1e-4.
    paths = [write_run(tmp_path, s, loss, 1.1, 15_000_000) for s, loss in ((1, 1.900), (2, 1.901), (3, 1.902))]
    merge_seeds.main(paths + ["-o", str(tmp_path / "m.json"), "--sota-loss", "1.95"])
    t, p = merge_seeds.sota_test([1.900, 1.901, 1.902], 1.95)
    assert t == pytest.approx(-44 * math.sqrt(3), rel=1e-9) and p == pytest.approx(t2_cdf(t), rel=1e-6) and p < 0.01
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("record test"))
    assert f"t = {t:.4f}" in line and line.endswith("p < 0.01: yes")


# ---------------------------------------------------------------------------------------------------- pack_code

SCRIPT = '''"""A script with a docstring, a future import and a non-ASCII string (é)."""
from __future__ import annotations
import os


def total(n: int) -> int:
    return sum(i * i for i in range(n))


print(__name__, os.path.basename(__file__), total(100), "é")
if __name__ == "__main__":
    print("main ran", "PACKED_SOURCE" in globals())
'''


def run_python(path):
    return subprocess.run([sys.executable, str(path)], capture_output=True, text=True, timeout=60, check=True).stdout


def test_pack_round_trip(tmp_path):
    src = tmp_path / "script.py"
    src.write_text(SCRIPT, encoding="utf-8")
    out = tmp_path / "packed" / "script.py"
    pack_code.main([str(src), "-o", str(out)])
    text = out.read_text()
    assert text.startswith("import lzma,base64;PACKED_SOURCE=lzma.decompress(base64.b85decode(b\"")
    assert text.count("\n") == 1
    packed_output = run_python(out)
    assert packed_output == run_python(src).replace("main ran False", "main ran True")
    assert packed_output == "__main__ script.py 328350 é\nmain ran True\n"
    namespace = {"__file__": str(out), "__name__": "not_main"}
    exec(compile(text, str(out), "exec"), namespace)
    assert namespace["PACKED_SOURCE"] == SCRIPT and namespace["total"](4) == 14


def test_pack_train_gpt(tmp_path, capsys, monkeypatch):
    out = tmp_path / "train_gpt.py"
    pack_code.main([str(ROOT / "train_gpt.py"), "-o", str(out)])
    source = (ROOT / "train_gpt.py").read_bytes()
    assert out.stat().st_size < len(source) and f"-> {out}: {out.stat().st_size} bytes" in capsys.readouterr().out
    spec = importlib.util.spec_from_file_location("packed_train_gpt", out)
    packed = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "packed_train_gpt", packed)
    spec.loader.exec_module(packed)  # must not start training
    assert packed.PACKED_SOURCE == source.decode("utf-8") and packed.__file__ == str(out)
    fresh_spec = importlib.util.spec_from_file_location("fresh_train_gpt", ROOT / "train_gpt.py")
    fresh = importlib.util.module_from_spec(fresh_spec)  # a clean import: other tests may have patched train_gpt
    monkeypatch.setitem(sys.modules, "fresh_train_gpt", fresh)
    fresh_spec.loader.exec_module(fresh)
    assert set(dir(fresh)) <= set(dir(packed))
    assert set(dir(packed)) - set(dir(fresh)) <= {"PACKED_SOURCE", "lzma", "base64"}
    # Same code: the same seed builds the same model.
    torch.manual_seed(0)
    reference = train_gpt.build_model(train_gpt.Hyperparameters(TINY)).state_dict()
    torch.manual_seed(0)
    rebuilt = packed.build_model(packed.Hyperparameters(TINY)).state_dict()
    assert rebuilt.keys() == reference.keys() and all(torch.equal(rebuilt[k], reference[k]) for k in reference)


def test_pack_refuses(tmp_path, capsys):
    src = tmp_path / "script.py"
    src.write_text(SCRIPT)
    assert exit_code(pack_code.main, [str(src), "-o", str(tmp_path / "." / "script.py")]) == 2
    assert exit_code(pack_code.main, [str(tmp_path / "missing.py"), "-o", str(tmp_path / "out.py")]) == 2
    assert src.read_text() == SCRIPT and not (tmp_path / "out.py").exists()
    assert capsys.readouterr().err.count("error: ") == 2


@pytest.mark.slow
def test_export_size_fills_the_window_and_measures_both_compressors(monkeypatch, capsys):
    """tools/export_size.py on a small model: without filling the default grids; with it, the total lands in
    [cap - 50,000, cap]; and the bits per int6 code of zstd and lzma are reported."""
    for name, value in {**TINY, "CODE_BYTES": "1000", "ARTIFACT_CAP_BYTES": "200000"}.items():
        monkeypatch.setenv(name, value)
    export_size.main()
    out = capsys.readouterr().out
    totals = {int(f): int(t.replace(",", "")) for f, t in re.findall(r"^BUDGET_FILL=(\d): total ([\d,]+) bytes", out, re.M)}
    assert totals[0] < 150_000 and 150_000 <= totals[1] <= 200_000, out
    assert re.search(r"zstd-22 [\d.]+ bits/code, lzma-9e [\d.]+ bits/code", out), out
