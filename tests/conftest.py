"""Shared fixtures: a small real-English dataset in the official shard format (stdlib docstrings, a
1024-piece SentencePiece BPE model trained with the official settings), tiny-model settings, and a runner
for train_gpt.py as a subprocess (1 process or torchrun with gloo)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

import smoke_data  # noqa: E402
import train_gpt  # noqa: E402

SHARED = ROOT.parent / "shared" / "data"
DOCS_TOKENIZER = SHARED / "tokenizers" / "docs_1024_bpe.model"
DOCS_TINY = SHARED / "docs_sp1024_tiny"

# A small model with every default switch on; tests override what they need.
TINY = dict(NUM_LAYERS="4", MODEL_DIM="64", NUM_HEADS="4", NUM_KV_HEADS="2", MLP_MULT="2", ROPE_DIMS="8",
            XSA_LAST_N="4", BIGRAM_BUCKETS="64", BIGRAM_DIM="16", VE_DIM="16", TRAIN_SEQ_LEN="64", VOCAB_SIZE="1024",
            TTT="off")  # sliding-window scoring: tests/test_ttt.py and the smoke run cover the default TTT


def make_h(**overrides):
    """Hyperparameters for the tiny model, with overrides given as NAME=value (strings or numbers)."""
    env = dict(TINY)
    env.update({k: str(v) for k, v in overrides.items()})
    return train_gpt.Hyperparameters(env)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """In-process models are tiny: with 2 intra-op threads on a busy 2-core machine each matmul waits on the other
    thread (a forward took ~0.6 s instead of ~6 ms), so tests run single-threaded (subprocess runs set their own)."""
    import torch
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def smoke_dataset(tmp_path_factory):
    """(data_path, tokenizer_path) of a ~1/3 MB-token docstring dataset built once per session."""
    out = tmp_path_factory.mktemp("smoke_data")
    return smoke_data.build_dataset(out, max_docs=1500)


@pytest.fixture(scope="session")
def smoke_tokenizer(smoke_dataset):
    return train_gpt.load_tokenizer(str(smoke_dataset[1]))


def run_train(env, out_dir, nproc=1, timeout=600, script=None):
    """Run train_gpt.py (python, or torchrun --nproc_per_node=nproc) with `env` on top of the current
    environment; returns (completed process, log text). Logs and artifacts go to out_dir. `script`: a python
    file to run instead of train_gpt.py (one process), e.g. one that patches train_gpt before its cli()."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    full = dict(os.environ)
    full.update({k: str(v) for k, v in env.items()})
    full.setdefault("RUN_ID", "test")
    full.update(LOG_DIR=str(out_dir / "logs"), OUTPUT_DIR=str(out_dir), OMP_NUM_THREADS="1")
    if script is not None:
        assert nproc == 1
        cmd = [sys.executable, str(script)]
    elif nproc == 1:
        cmd = [sys.executable, str(ROOT / "train_gpt.py")]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", str(ROOT / "train_gpt.py")]
    proc = subprocess.run(cmd, env=full, cwd=str(out_dir), capture_output=True, text=True, timeout=timeout)
    log_path = out_dir / "logs" / f"{full['RUN_ID']}.txt"
    return proc, (log_path.read_text() if log_path.exists() else "")


def randomized(h, seed=0):
    """The model for settings h with every parameter moved off its init (no zero-init piece can hide a path)."""
    import torch
    torch.manual_seed(seed)
    model = train_gpt.build_model(h)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def tiny_run_env(dataset, **overrides):
    """Settings for a short CPU training run of the tiny model on `dataset` (data_path, tokenizer_path)."""
    env = dict(TINY, DATA_PATH=str(dataset[0]), TOKENIZER_PATH=str(dataset[1]), TRAIN_BATCH_TOKENS="2048",
               GRAD_ACCUM_STEPS="1", ITERATIONS="12", WARMUP_STEPS="2", MAX_WALLCLOCK_SECONDS="0",
               TRAIN_LOG_EVERY="4", EVAL_STRIDE="32", GPTQ_CALIB_BATCHES="2", COMPILE="0")
    env.update({k: str(v) for k, v in overrides.items()})
    return env
