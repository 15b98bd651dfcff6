"""Whole-pipeline tests: the README's CPU smoke run, reproducibility, 2-process torchrun (gloo) against 1 process,
the exact final lines against an independent byte count, interruption (SIGINT/SIGTERM), outputs and logs."""
import json
import math
import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from conftest import DOCS_TINY, DOCS_TOKENIZER, ROOT, run_train, tiny_run_env
import train_gpt

FLOAT = r"([0-9.]+)"


def final_exact(log, tag):
    m = re.findall(rf"^{tag}_exact val_loss:{FLOAT} val_bpb:{FLOAT}$", log, re.M)
    assert m, f"no {tag}_exact line in log"
    return float(m[-1][0]), float(m[-1][1])


@pytest.mark.slow
def test_smoke_run_end_to_end(tmp_path):
    """The README's smoke command runs train -> average -> GPTQ -> zstd -> roundtrip -> the default final pass
    (score-first LoRA TTT); the console names the log first and ends with the summary; submission.json describes
    the artifact beside it."""
    env = dict(os.environ, SMOKE_DIR=str(tmp_path / "smoke"))
    env.pop("OMP_NUM_THREADS", None)  # the script chooses its own thread count
    proc = subprocess.run(["bash", str(ROOT / "tools" / "smoke_run.sh")], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    expected_order = ["log: ", "val_bpb:enabled tokenizer_kind=sentencepiece", "train_loader:dataset:", "val_loader:shards pattern=",
                      "model_params:", "world_size:1 grad_accum_steps:1", "warmup_step:1/", "step:1/", "pre_quant val_loss:",
                      "Serialized model int6+zstd:", "Code size:", "Total submission size int6+zstd:",
                      "final_int6_zstd_roundtrip val_loss:", "final_int6_ttt_lora_exact", "final_int8_zlib_roundtrip_exact",
                      "submission: wrote", "summary: val_bpb:"]
    positions = [out.find(s) for s in expected_order]
    assert all(p >= 0 for p in positions), [s for s, p in zip(expected_order, positions) if p < 0]
    assert positions == sorted(positions) and positions[0] == 0
    lines = out.strip().splitlines()
    assert lines[-1].startswith("summary: val_bpb:") and "Traceback" not in proc.stderr
    assert final_exact(out, "final_int8_zlib_roundtrip") == final_exact(out, "final_int6_ttt_lora")
    assert f"summary: val_bpb:{final_exact(out, 'final_int6_ttt_lora')[1]:.8f} " in lines[-1]
    losses = [float(x) for x in re.findall(r"train_loss:([0-9.]+)", out)]
    assert losses[-1] < losses[0] - 1.0, "training did not reduce the loss"
    assert max(losses[2:]) < math.log(1024), "the loss rose above uniform after the first steps"
    smoke = tmp_path / "smoke"
    sub = json.loads((smoke / "out" / "submission.json").read_text())
    assert sub["val_bpb"] == pytest.approx(final_exact(out, "final_int6_ttt_lora")[1], abs=1e-8)
    assert sub["ttt"] == "lora"
    assert sub["bytes_model"] == (smoke / "out" / "final_model.int6.ptz").stat().st_size
    assert sub["bytes_total"] == sub["bytes_model"] + (ROOT / "train_gpt.py").stat().st_size
    log_text = Path(lines[0].removeprefix("log: ")).read_text()
    assert "=" * 100 + "\n" + (ROOT / "train_gpt.py").read_text() in log_text  # the log holds the code that ran
    assert log_text.strip().splitlines()[-1] == lines[-1]


@pytest.fixture(scope="module")
def smoke_pair(smoke_dataset, tmp_path_factory):
    """(env, [(proc, log)] * 2): two runs with one seed and the settings of the byte-count check, shared by the
    reproducibility and final-lines tests (one run serves both)."""
    env = tiny_run_env(smoke_dataset, ITERATIONS="8", EVAL_STRIDE="16", RUN_ID="repro")
    return env, [run_train(env, tmp_path_factory.mktemp(f"repro_{name}")) for name in ("a", "b")]


@pytest.mark.slow
def test_same_seed_same_numbers(smoke_pair):
    """Step-based runs are reproducible: two runs with one seed print the same losses and scores to the last digit."""
    _, runs = smoke_pair
    for proc, _ in runs:
        assert proc.returncode == 0, proc.stderr[-3000:]
    numbers = [re.findall(r"(?:train_loss|val_loss|val_bpb):[0-9.]+", log) for _, log in runs]
    assert numbers[0] == numbers[1] and len(numbers[0]) > 20


@pytest.mark.slow
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


def check_final_lines_against_decoded_text(dataset, tmp_path, **overrides):
    env = tiny_run_env(dataset, ITERATIONS="8", EVAL_STRIDE="16", RUN_ID="bytes", **overrides)
    proc, log = run_train(env, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_final_lines_match_decoded_text(dataset, env, log)


def assert_final_lines_match_decoded_text(dataset, env, log):
    loss, bpb = final_exact(log, "final_int6_sliding_window")
    _, val = train_gpt.load_validation_tokens(str(dataset[0]), int(env["TRAIN_SEQ_LEN"]))
    n_targets, n_bytes = independent_scored_bytes(val.numpy(), train_gpt.load_tokenizer(str(dataset[1])))
    assert f"final_int6_sliding_window_counts targets:{n_targets} bytes:{n_bytes} " in log
    assert f"{loss / bpb:.6g}" == f"{math.log(2) * n_bytes / n_targets:.6g}"


@pytest.mark.slow
def test_final_lines_match_independent_byte_count(smoke_dataset, smoke_pair):
    """val_loss/val_bpb of the final sliding-window line = ln2 * bytes/targets, with the bytes counted from the
    decoded text of the scored targets (on data the suite builds itself, so every checkout runs it)."""
    env, [(proc, log), _] = smoke_pair
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_final_lines_match_decoded_text(smoke_dataset, env, log)


@pytest.mark.slow
@pytest.mark.skipif(not (DOCS_TINY.exists() and DOCS_TOKENIZER.exists()), reason="../shared/data/docs_sp1024_tiny is absent")
def test_docs_tiny_final_lines_match_independent_byte_count(tmp_path):
    check_final_lines_against_decoded_text((DOCS_TINY, DOCS_TOKENIZER), tmp_path)


# ----------------------------------------------------------------------------------------------------
# Interruption, outputs and logs.

def start_train(env, out_dir):
    """train_gpt.py as a child process whose console we read line by line."""
    out_dir.mkdir(parents=True, exist_ok=True)
    full = dict(os.environ, **{k: str(v) for k, v in env.items()})
    full.update(LOG_DIR=str(out_dir / "logs"), OUTPUT_DIR=str(out_dir), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, str(ROOT / "train_gpt.py")], env=full, cwd=str(out_dir),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def interrupt_when(proc, marker, signum):
    """Send `signum` once a console line contains `marker`; return (console lines, stderr, exit code)."""
    err = []
    reader = threading.Thread(target=lambda: err.append(proc.stderr.read()), daemon=True)
    reader.start()
    lines = []
    for line in proc.stdout:
        lines.append(line.rstrip("\n"))
        if marker in line:
            proc.send_signal(signum)
            break
    rest = proc.stdout.read()  # the same reader: communicate() would skip what it has buffered already
    proc.wait(timeout=300)
    reader.join()
    return lines + rest.splitlines(), err[0], proc.returncode


def plant_previous_outputs(out_dir):
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "submission.json").write_text('{"val_bpb": 0.5}')
    (out_dir / "final_model.int6.ptz").write_bytes(b"an older run's model")


@pytest.mark.parametrize("signum,marker,phase", [
    (signal.SIGINT, "step:3/", "training (step"),
    (signal.SIGTERM, "step:3/", "training (step"),
    (signal.SIGINT, "final_int6_zstd_roundtrip val_loss", "evaluation of the artifact"),
])
@pytest.mark.slow
def test_interrupt_ends_with_one_line_and_no_mismatched_outputs(smoke_dataset, tmp_path, signum, marker, phase):
    out = tmp_path / "run"
    plant_previous_outputs(out)
    slow_eval = dict(EVAL_STRIDE="1") if "final" in marker else dict(ITERATIONS="100000")
    proc = start_train(tiny_run_env(smoke_dataset, RUN_ID="stop", **slow_eval), out)
    lines, err, code = interrupt_when(proc, marker, signum)
    assert code == 128 + signum, (code, err[-2000:])
    assert "Traceback" not in err and err.strip() == "", err[-2000:]
    stops = [line for line in lines if line.startswith("interrupted at ")]
    assert len(stops) == 1 and phase in stops[0] and signal.Signals(signum).name in stops[0], lines[-5:]
    assert lines[-1] == stops[0]
    assert stops[0] in (out / "logs" / "stop.txt").read_text()
    assert not (out / "submission.json").exists(), "an older submission.json was left beside this run's outputs"
    assert (out / "submission.json.previous").read_text() == '{"val_bpb": 0.5}'
    model = out / "final_model.int6.ptz"
    assert not model.exists() or model.read_bytes()[:4] == train_gpt.ARTIFACT_MAGIC
    assert not [p.name for p in out.iterdir() if ".tmp-" in p.name]


def test_a_signal_while_logging_lets_the_line_finish_then_stops(tmp_path, capsys):
    class SignalsWhilePrinted(str):
        def __str__(self):
            os.kill(os.getpid(), signal.SIGINT)
            return str.__str__(self)

    previous = signal.signal(signal.SIGINT, train_gpt.raise_interrupt)
    try:
        log = train_gpt.Logger(tmp_path / "log.txt")
        with pytest.raises(train_gpt.RunInterrupted):
            log(SignalsWhilePrinted("one whole line"))
    finally:
        signal.signal(signal.SIGINT, previous)
        train_gpt.PENDING_SIGNALS.clear()
    assert capsys.readouterr().out == "one whole line\n"
    assert (tmp_path / "log.txt").read_text() == "one whole line\n"


def test_write_atomic_leaves_nothing_half_written(tmp_path, monkeypatch):
    target = tmp_path / "final_model.int6.ptz"
    target.write_bytes(b"complete old file")
    original = Path.write_bytes

    def interrupted_write(self, data):
        original(self, data[:3])  # part of the data reaches the disk, then the signal arrives
        raise train_gpt.RunInterrupted(signal.SIGINT)

    monkeypatch.setattr(Path, "write_bytes", interrupted_write)
    with pytest.raises(train_gpt.RunInterrupted):
        train_gpt.write_atomic(target, b"new complete file")
    monkeypatch.undo()
    assert target.read_bytes() == b"complete old file" and [p.name for p in tmp_path.iterdir()] == [target.name]
    train_gpt.write_atomic(target, b"new complete file")
    assert target.read_bytes() == b"new complete file" and [p.name for p in tmp_path.iterdir()] == [target.name]


@pytest.fixture(scope="module")
def plain_run(smoke_dataset, tmp_path_factory):
    """(env, folder, proc, log) of one short run, shared by the reused-RUN_ID and packed-copy tests."""
    env = tiny_run_env(smoke_dataset, ITERATIONS="4", RUN_ID="same")
    folder = tmp_path_factory.mktemp("plain")
    return (env, folder, *run_train(env, folder))


@pytest.mark.slow
def test_reused_run_id_starts_a_new_log_and_errors_reach_the_log(plain_run):
    env, tmp_path, first, log1 = plain_run
    assert first.returncode == 0, first.stderr[-3000:]
    second, _ = run_train(dict(env, DATA_PATH=str(tmp_path / "missing")), tmp_path)
    assert second.returncode == 2 and second.stderr.startswith("error: DATA_PATH")
    assert second.stdout.splitlines()[0] == f"log: {tmp_path / 'logs' / 'same-2.txt'}"
    assert (tmp_path / "logs" / "same.txt").read_text() == log1  # the first run's log is untouched
    failed = (tmp_path / "logs" / "same-2.txt").read_text()
    assert failed.strip().splitlines()[-1] == second.stderr.strip()
    assert failed.count("=" * 100 + "\n") == 2  # one code dump: one run per file


# ----------------------------------------------------------------------------------------------------
# The packed (self-extracting) copy of the script, and the SP8192 stack.

def key_lines(console):
    """The lines a packed run must print identically: everything but timings, log paths and code-byte counts."""
    drop = ("log:", "Code size", "Total submission size", "artifact_estimate", "artifact:", "time:", "summary:", "export:",
            "warmup", "submission: wrote", "artifact_fit")
    lines = [re.sub(r"(train_time|step_avg|eval_time|train_ms|hessian_ms|total):[0-9.]+(ms)?", r"\1:_", line)
             for line in console.splitlines()]
    return [line for line in lines if not line.startswith(drop) and "bytes_total" not in line]


@pytest.mark.slow
def test_packed_copy_runs_identically_and_counts_its_own_bytes(plain_run, tmp_path):
    import pack_code

    packed = tmp_path / "packed" / "train_gpt.py"
    pack_code.main([str(ROOT / "train_gpt.py"), "-o", str(packed)])
    env, _, plain, _ = plain_run
    full = dict(os.environ, **{k: str(v) for k, v in env.items()}, LOG_DIR=str(tmp_path / "p" / "logs"),
                OUTPUT_DIR=str(tmp_path / "p"), OMP_NUM_THREADS="1")
    run = subprocess.run([sys.executable, str(packed)], env=full, capture_output=True, text=True, timeout=600)
    assert plain.returncode == 0 and run.returncode == 0, run.stderr[-3000:]
    assert key_lines(run.stdout) == key_lines(plain.stdout) and len(key_lines(run.stdout)) > 20
    assert f"Code size: {packed.stat().st_size} bytes" in run.stdout  # the bytes of the file that ran
    sub = json.loads((tmp_path / "p" / "submission.json").read_text())
    assert sub["bytes_code"] == packed.stat().st_size < (ROOT / "train_gpt.py").stat().st_size
    log = (tmp_path / "p" / "logs" / "same.txt").read_text()
    assert (ROOT / "train_gpt.py").read_text() in log  # the log holds the source that ran, not the wrapper


DOCS8192_TINY = DOCS_TINY.parent / "docs_sp8192_tiny"
DOCS8192_TOKENIZER = DOCS_TOKENIZER.parent / "docs_8192_bpe.model"


@pytest.mark.slow
@pytest.mark.skipif(not (DOCS8192_TINY.exists() and DOCS8192_TOKENIZER.exists()), reason="../shared/data/docs_sp8192_tiny is absent")
def test_sp8192_stack_end_to_end(tmp_path):
    """One run of the stack (it was two: the byte-count check now reads this run's final lines)."""
    dataset = (DOCS8192_TINY, DOCS8192_TOKENIZER)
    env = tiny_run_env(dataset, STACK="sp8192", VOCAB_SIZE="8192", ITERATIONS="4", RUN_ID="sp8192", EVAL_STRIDE="16")
    env.pop("BIGRAM_BUCKETS")  # the stack's own default (off)
    proc, log = run_train(env, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "STACK=sp8192" in log and "BIGRAM_BUCKETS=0" in log and "EMBED_BITS=7" in log
    sub = json.loads((tmp_path / "submission.json").read_text())
    assert math.isfinite(sub["val_bpb"]) and sub["val_targets"] == int(re.search(r"tokens:(\d+)", log).group(1))
    assert_final_lines_match_decoded_text(dataset, env, log)
