"""Score-first test-time training and the evaluation tools around it: per-target dumps (DUMP_NLL) of an existing
artifact (EVAL_ARTIFACT) with and without TTT show that changing one document's tokens changes no score recorded
before the change could be seen; every target is scored exactly once; the eval clock contains the warm-up; a tiny
budget stops adaptation; two ranks score what one does. Each distinct evaluation runs once per module (`evals`) and
every test that needs it asserts on its result."""
import json
import re
import shutil

import numpy as np
import pytest
import torch

from conftest import ROOT, make_h, run_train, tiny_run_env
import smoke_data
import train_gpt

MODES = ["off", "lora"]
# 40 documents (of the smoke data's 75, about 7,500 targets) still fill five LoRA batches and the two phases.
TTT_SMALL = dict(TTT_SGD_CHUNK="512", TTT_BATCH_DOCS="8", TTT_CHUNK="16", EVAL_STRIDE="32", EVAL_BATCH_SEQS="8")
VAL_DOCS = 40


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
    """The smoke data with its validation stream cut to the first VAL_DOCS documents (A) and a copy (B) where
    tokens inside one validation document are changed; returns (A, B, first changed position)."""
    root = tmp_path_factory.mktemp("flip")
    a, b = root / "a", root / "b"
    for d in (a, b):
        shutil.copytree(smoke_dataset[0], d)
    val = train_gpt.read_shard(a / "fineweb_val_000000.bin").astype(np.int64)
    bos = np.flatnonzero(val == train_gpt.BOS_ID)
    assert len(bos) > VAL_DOCS
    val, bos = val[:bos[VAL_DOCS]], bos[:VAL_DOCS]  # whole documents only
    smoke_data.write_shard(a / "fineweb_val_000000.bin", val)
    # a short document in the second half of the stream: LoRA TTT scores it late, the others score it mid-way
    doc = min((i for i in range(len(bos) // 2, len(bos) - 1) if bos[i + 1] - bos[i] > 30), key=lambda i: bos[i + 1] - bos[i])
    p = int(bos[doc]) + 20
    changed = val.copy()
    changed[p:p + 5] = (changed[p:p + 5] + 7) % 1000 + 4  # never BOS: the document structure stays
    smoke_data.write_shard(b / "fineweb_val_000000.bin", changed)
    return (a, smoke_dataset[1]), (b, smoke_dataset[1]), p


def eval_dump(dataset, artifact, out_dir, mode, nproc=1, script=None, **extra):
    dump = out_dir / "nll.npz"
    settings = {**TTT_SMALL, "TTT_BUDGET_SECONDS": "1e6", **extra}  # no budget stop unless a test asks for one
    env = tiny_run_env(dataset, EVAL_ARTIFACT=str(artifact), DUMP_NLL=str(dump), TTT=mode, RUN_ID="eval", **settings)
    proc, log = run_train(env, out_dir, nproc=nproc, script=script)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return dict(np.load(dump)), log


@pytest.fixture(scope="module")
def evals(tmp_path_factory, two_datasets, random_artifact):
    """evals(data, mode, nproc=1, **settings) -> (dump, log, out_dir) of evaluating the random artifact on data "a"
    (the smoke data) or "b" (one document changed); each distinct evaluation runs once per module."""
    cache = {}

    def get(data, mode, nproc=1, **extra):
        key = (data, mode, nproc, tuple(sorted(extra.items())))
        if key not in cache:
            out = tmp_path_factory.mktemp(f"eval_{data}_{mode}_{nproc}")
            dataset = two_datasets[0] if data == "a" else two_datasets[1]
            cache[key] = (*eval_dump(dataset, random_artifact, out, mode, nproc, **extra), out)
        return cache[key]
    return get


@pytest.mark.parametrize("mode,extra", [(m, {}) for m in MODES] + [("lora", dict(TTT_PHASES="8,24"))],
                         ids=MODES + ["lora_phases"])
@pytest.mark.slow
def test_changing_a_document_changes_no_score_recorded_before_it(two_datasets, evals, mode, extra):
    (a, b, p) = two_datasets
    dump_a, log_a, out_a = evals("a", mode, **extra)
    dump_b, _, _ = evals("b", mode, **extra)
    if extra:
        assert "ttt: phase 1: full-model SGD on the first 8 documents scored" in log_a
    n = len(dump_a["nll"])
    touched = slice(p - 1, p + 5)  # the targets whose token or previous token changed
    assert len(dump_b["nll"]) == n and np.array_equal(np.delete(dump_a["bytes"], np.r_[touched]), np.delete(dump_b["bytes"], np.r_[touched]))
    assert f"_counts targets:{n} " in log_a and "summary: val_bpb:" in log_a.strip().splitlines()[-1]
    assert not (out_a / "submission.json").exists()  # evaluating an artifact writes no submission
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


@pytest.mark.slow
def test_tiny_budget_stops_adaptation_but_scores_everything(evals):
    full, _, _ = evals("a", "lora")
    cut, log, _ = evals("a", "lora", TTT_BUDGET_SECONDS="1")
    assert re.search(r"ttt: budget: projected eval clock .* scoring without updates while adapting does not fit", log)
    assert re.search(r"ttt: lora: rank 0 adapted 0/\d+ .*; \d+ scored without updates \(budget\)", log)
    assert len(cut["nll"]) == len(full["nll"]) and not np.array_equal(cut["nll"], full["nll"])


@pytest.mark.slow
def test_two_ranks_score_what_one_does(evals):
    """Warm-A lanes and phases included: the plan does not depend on the world size."""
    one, log1, _ = evals("a", "lora", TTT_PHASES="8,24")
    two, log2, _ = evals("a", "lora", nproc=2, TTT_PHASES="8,24")
    np.testing.assert_allclose(two["nll"], one["nll"], rtol=1e-4, atol=1e-4)
    b1, b2 = (float(re.findall(r"final_int6_ttt_\w+_exact val_loss:\S+ val_bpb:([0-9.]+)", log)[-1]) for log in (log1, log2))
    assert b2 == pytest.approx(b1, rel=1e-5)


COMPILE_COST_S = 1000.0  # what each compiled graph's first call (its compile) costs on the fake eval clock

# train_gpt.py run with COMPILE=1 where torch.compile returns the function itself, whose first call (when the real
# one compiles) moves train_gpt's clock 1000 s on; it writes how many graphs were compiled to first_calls.json.
FAKE_COMPILE = r"""
import json, sys, time, types
sys.path.insert(0, ROOT)
import torch
import train_gpt

offset = [0.0]
first_calls = []
clock = types.ModuleType("time")
clock.__dict__.update(time.__dict__)
clock.perf_counter = lambda: time.perf_counter() + offset[0]
train_gpt.time = clock


class Compiled:
    def __init__(self, fn):
        self.fn, self.called = fn, False

    def __call__(self, *args, **kwargs):
        if not self.called:
            self.called = True
            offset[0] += COST
            first_calls.append(getattr(self.fn, "__name__", type(self.fn).__name__))
        return self.fn(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.fn, name)


torch.compile = lambda fn, **kwargs: Compiled(fn)
code = train_gpt.cli()
with open("first_calls.json", "w") as f:
    json.dump(first_calls, f)
sys.exit(code)
""".replace("COST", repr(COMPILE_COST_S)).replace("ROOT", repr(str(ROOT)))


@pytest.mark.slow
def test_eval_clock_contains_the_compile_warm_up(two_datasets, random_artifact, tmp_path):
    """The eval clock (artifact open to last score) holds every compile warm-up, and the warm-ups run before the
    passes (no pass pays a compile). Each compile is simulated as 1000 s on train_gpt's clock, so a warm-up
    outside the clock leaves the clock 1000 s short, and a missing warm-up puts 1000 s into a pass."""
    (a, _, _) = two_datasets
    script = tmp_path / "fake_compile.py"
    script.write_text(FAKE_COMPILE)
    _, log = eval_dump(a, random_artifact, tmp_path, "lora", COMPILE="1", TTT_PHASES="8,24", script=script)
    first_calls = json.loads((tmp_path / "first_calls.json").read_text())
    # the evaluation graph, the adapted-logits graph and the phases' training graph, each warmed up once
    assert sorted(first_calls) == ["GPT", "forward_logits", "forward_logits"]
    passes = [float(t) for t in re.findall(r"^final_int6_\w+ val_loss:\S+ val_bpb:\S+ eval_time:(\d+)ms", log, re.M)]
    clock = float(re.search(r"eval_budget: eval_time:(\d+)ms", log).group(1))
    compile_ms = 1000 * COMPILE_COST_S * len(first_calls)
    assert len(passes) == 2 and all(t < 1000 * COMPILE_COST_S for t in passes)  # no compile inside a pass
    assert clock >= compile_ms + sum(passes) - 1  # the clock holds both warm-ups and both passes (ms rounding)
    assert not re.search(r"^ttt: compile failed", log, re.M)


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
