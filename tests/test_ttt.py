"""Score-first test-time training and the evaluation tools around it: per-target dumps (DUMP_NLL) of an existing
artifact (EVAL_ARTIFACT) under each TTT mode show that changing one document's tokens changes no score recorded
before the change could be seen; every target is scored exactly once; the eval clock contains the warm-up; a tiny
budget stops adaptation; two ranks score what one does."""
import re
import shutil

import numpy as np
import pytest
import torch

from conftest import make_h, run_train, tiny_run_env
import smoke_data
import train_gpt

MODES = ["off", "sgd", "lora"]
TTT_SMALL = dict(TTT_SGD_CHUNK="512", TTT_BATCH_DOCS="8", TTT_CHUNK="16", EVAL_STRIDE="32", EVAL_BATCH_SEQS="8")


@pytest.fixture(scope="module")
def random_artifact(tmp_path_factory):
    """A tiny default-stack model with every parameter randomised (so no zero-init piece can hide a leak), exported."""
    out = tmp_path_factory.mktemp("artifact")
    h = make_h(BUDGET_FILL=0)
    torch.manual_seed(0)
    model = train_gpt.build_model(h)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    blob, _, _ = train_gpt.export_artifact(model.state_dict(), h, 0, log=lambda m: None)
    (out / "model.ptz").write_bytes(blob)
    return out / "model.ptz"


@pytest.fixture(scope="module")
def two_datasets(tmp_path_factory, smoke_dataset):
    """The smoke data (A) and a copy (B) where tokens inside one validation document are changed; returns
    (A, B, first changed position)."""
    root = tmp_path_factory.mktemp("flip")
    a, b = root / "a", root / "b"
    for d in (a, b):
        shutil.copytree(smoke_dataset[0], d)
    val = train_gpt.read_shard(a / "fineweb_val_000000.bin").astype(np.int64)
    bos = np.flatnonzero(val == train_gpt.BOS_ID)
    # a short document in the second half of the stream: LoRA TTT scores it late, the others score it mid-way
    doc = min((i for i in range(len(bos) // 2, len(bos) - 1) if bos[i + 1] - bos[i] > 30), key=lambda i: bos[i + 1] - bos[i])
    p = int(bos[doc]) + 20
    changed = val.copy()
    changed[p:p + 5] = (changed[p:p + 5] + 7) % 1000 + 4  # never BOS: the document structure stays
    smoke_data.write_shard(b / "fineweb_val_000000.bin", changed)
    return (a, smoke_dataset[1]), (b, smoke_dataset[1]), p


def eval_dump(dataset, artifact, out_dir, mode, nproc=1, **extra):
    dump = out_dir / "nll.npz"
    settings = {**TTT_SMALL, "TTT_BUDGET_SECONDS": "1e6", **extra}  # no budget stop unless a test asks for one
    env = tiny_run_env(dataset, EVAL_ARTIFACT=str(artifact), DUMP_NLL=str(dump), TTT=mode, RUN_ID="eval", **settings)
    proc, log = run_train(env, out_dir, nproc=nproc)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return dict(np.load(dump)), log


@pytest.mark.parametrize("mode,extra", [(m, {}) for m in MODES] + [("lora", dict(TTT_PHASES="8,24"))],
                         ids=MODES + ["lora_phases"])
def test_changing_a_document_changes_no_score_recorded_before_it(two_datasets, random_artifact, tmp_path, mode, extra):
    (a, b, p) = two_datasets
    dump_a, log_a = eval_dump(a, random_artifact, tmp_path / "a", mode, **extra)
    dump_b, _ = eval_dump(b, random_artifact, tmp_path / "b", mode, **extra)
    if extra:
        assert "ttt: phase 1: full-model SGD on the first 8 documents scored" in log_a
    n = len(dump_a["nll"])
    touched = slice(p - 1, p + 5)  # the targets whose token or previous token changed
    assert len(dump_b["nll"]) == n and np.array_equal(np.delete(dump_a["bytes"], np.r_[touched]), np.delete(dump_b["bytes"], np.r_[touched]))
    assert f"_counts targets:{n} " in log_a and "summary: val_bpb:" in log_a.strip().splitlines()[-1]
    assert not (tmp_path / "a" / "submission.json").exists()  # evaluating an artifact writes no submission
    # Target p-1 predicts the changed token: the first scoring batch that read it is the one of the earliest of
    # the changed document's targets from p-1 on. Nothing recorded in an earlier batch may move.
    bos = np.flatnonzero(train_gpt.read_shard(a[0] / "fineweb_val_000000.bin") == train_gpt.BOS_ID)
    end = bos[bos > p].min()  # the changed document's targets end where the next document starts
    first_seeing = dump_a["order"][p - 1:end].min()
    same = dump_a["nll"] == dump_b["nll"]
    before = dump_a["order"] < first_seeing
    assert same[before].all(), f"{(~same[before]).sum()} targets scored before the change moved"
    assert before.sum() > n // 10 and not same[p - 1:end].all()  # neither check is vacuous
    if mode != "lora":  # these score in stream order, so everything before the change stays too
        assert same[:p - 1].all()
    # the dump is what the final line reports
    loss = float(re.findall(r"_exact val_loss:([0-9.]+) val_bpb:([0-9.]+)", log_a)[-1][0])
    assert loss == pytest.approx(dump_a["nll"].mean(), rel=1e-9)


@pytest.mark.parametrize("mode", ["sgd", "lora"])
def test_tiny_budget_stops_adaptation_but_scores_everything(two_datasets, random_artifact, tmp_path, mode):
    (a, _, _) = two_datasets
    full, _ = eval_dump(a, random_artifact, tmp_path / "full", mode)
    cut, log = eval_dump(a, random_artifact, tmp_path / "cut", mode, TTT_BUDGET_SECONDS="1")
    assert re.search(r"ttt: budget: projected eval clock .* scoring without updates while adapting does not fit", log)
    assert re.search(r"ttt: \w+: rank 0 adapted 0/\d+ .*; \d+ scored without updates \(budget\)", log)
    assert len(cut["nll"]) == len(full["nll"]) and not np.array_equal(cut["nll"], full["nll"])


@pytest.mark.parametrize("mode,extra", [("sgd", {}), ("lora", dict(TTT_PHASES="8,24"))], ids=["sgd", "lora_phases"])
def test_two_ranks_score_what_one_does(two_datasets, random_artifact, tmp_path, mode, extra):
    """Warm-A lanes and phases included: the plan does not depend on the world size."""
    (a, _, _) = two_datasets
    one, log1 = eval_dump(a, random_artifact, tmp_path / "one", mode, **extra)
    two, log2 = eval_dump(a, random_artifact, tmp_path / "two", mode, nproc=2, **extra)
    np.testing.assert_allclose(two["nll"], one["nll"], rtol=1e-4, atol=1e-4)
    b1, b2 = (float(re.findall(r"final_int6_ttt_\w+_exact val_loss:\S+ val_bpb:([0-9.]+)", log)[-1]) for log in (log1, log2))
    assert b2 == pytest.approx(b1, rel=1e-5)


def test_eval_clock_contains_the_compile_warm_up(two_datasets, random_artifact, tmp_path):
    import shutil as sh
    if not any(sh.which(c) for c in ("g++", "c++", "clang++")):
        pytest.skip("inductor needs a C++ compiler")
    (a, _, _) = two_datasets
    _, log = eval_dump(a, random_artifact, tmp_path, "sgd", COMPILE="1")
    passes = [float(t) for t in re.findall(r"^final_int6_\w+ val_loss:\S+ val_bpb:\S+ eval_time:(\d+)ms", log, re.M)]
    clock = float(re.search(r"eval_budget: eval_time:(\d+)ms", log).group(1))
    assert len(passes) == 2 and clock > sum(passes)  # the clock also holds decompression, build and the compile


def test_lora_adapters_of_one_document_see_only_it():
    """In-process: within one batch, a document's scores do not depend on another document's tokens."""
    h = make_h(TTT="lora", TTT_CHUNK=8, TTT_BATCH_DOCS=4, EVAL_SEQ_LEN=32, EVAL_STRIDE=16, TTT_SGD_CHUNK=64)
    torch.manual_seed(0)
    model = train_gpt.build_model(h)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)

    class Run:  # the parts of train_gpt.Run that score_documents reads
        autocast = torch.autocast("cpu", enabled=False)
        device = torch.device("cpu")

    Run.h = h
    luts = (torch.ones(1024, dtype=torch.int64), torch.zeros(1024, dtype=torch.bool), torch.zeros(1024, dtype=torch.bool))
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(4, 1000, (101,), generator=g)
    tokens[[0, 40, 70]] = train_gpt.BOS_ID
    batch = sorted(train_gpt.document_spans(tokens), key=lambda d: -d[1])
    results = []
    for variant in range(2):
        t = tokens.clone()
        if variant:
            t[75:80] = 5  # inside the last (shortest) document
        scorer = train_gpt.Scorer(t, luts, record=True)
        lora = train_gpt.LoRA(model, h)
        lora.start_lane(0)
        train_gpt.score_documents(Run, model.forward_logits, lora, scorer, batch, adapt=True)
        results.append(scorer.nll.clone())
    same = results[0] == results[1]
    assert same[:70].all() and not same[74:].all()
