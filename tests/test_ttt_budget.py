"""The TTT budget and plan on FineWeb-shaped documents (50,000, heavy-tailed, FineWeb's mean) over 8 simulated ranks
with a fake clock (tools/ttt_plan.py drives the run's own plan, budget rule and driver): an ample budget adapts
everything with balanced ranks; a budget that allows X % adapts at least X - 5 % and ends within it, even when the
machine's costs differ from the prior; the cost model learns them; the compiled TTT graphs compile once."""
import numpy as np
import pytest
import torch

from conftest import make_h
import train_gpt
import ttt_plan


@pytest.fixture(scope="module")
def lengths():
    return ttt_plan.fineweb_lengths()


def lora_h(**extra):
    return train_gpt.Hyperparameters({"TTT": "lora", **{k: str(v) for k, v in extra.items()}})


# A machine unlike the prior: token passes 3x dearer, steps half price, scoring a third of adapting.
SKEWED = {**train_gpt.TTT_PRIOR, "token_pass": 3 * 1.33e-6, "chunk_step": 0.5 * 15.7e-3, "score_pass": 1.33e-6,
          "score_step": 0.5 * 15.7e-3 / 3, "sgd_token": 2 * 29e-6}


def test_fineweb_shape(lengths):
    assert len(lengths) == 50_000 and abs(lengths.mean() - 1276) < 2 and lengths.max() > 50_000
    assert np.median(lengths) < 0.6 * lengths.mean()  # heavy-tailed


def test_plan_schedules_every_document_once_in_balanced_lanes(lengths):
    h = lora_h(TTT_PHASES="833,1666,2500")
    docs = list(zip(np.concatenate([[0], np.cumsum(lengths)[:-1]]).tolist(), lengths.tolist()))
    for world in (1, 2, 8):
        plan = train_gpt.TTTPlan(docs, h, world)
        assert plan.lanes == 8 and len(plan.segments) == 4
        planned = [d for r in range(world) for b in plan.rank_batches(r) for d in b]
        assert sorted(planned) == sorted(docs)
        queue = sorted(docs, key=lambda d: (-d[1], d[0]))
        assert [len(p) for p in plan.phase_docs] == [833, 1666, 2500] and plan.phase_docs[2] == queue[:2500]
        for k, segment in enumerate(plan.segments[:3]):  # a phase's documents are all in the segments before it
            assert {d for s in plan.segments[:k + 1] for lane in s for b in lane for d in b} >= set(plan.phase_docs[k])
    same = [train_gpt.TTTPlan(docs, h, w) for w in (1, 2, 4, 8)]
    assert all(p.segments == same[0].segments for p in same)  # lanes do not depend on the world size


def test_ample_budget_adapts_everything_on_balanced_ranks(lengths):
    h = lora_h(TTT_PHASES="833,1666,2500", TTT_BUDGET_SECONDS=1e6)
    r = ttt_plan.simulate(lengths, h, 8, 150.0, true_costs=SKEWED)
    assert r["adapted"] == 1.0 and r["phases"] == 3 and all(s["stops"] == 0 for s in r["ranks"])
    seconds = np.array(r["rank_seconds"])
    assert seconds.max() / seconds.mean() < 1.02, seconds  # the phases wait for the slowest rank: balance matters
    assert r["eval_clock"] == pytest.approx(150.0 + seconds.max())


def budget_allowing(lengths, h, world, pre, share, costs):
    """The eval clock of adapting, on every rank, its first batches holding `share` of its targets (in the order it
    runs them) and scoring the rest: the budget that allows that share."""
    docs = list(zip(np.concatenate([[0], np.cumsum(lengths)[:-1]]).tolist(), lengths.tolist()))
    plan, model, worst = train_gpt.TTTPlan(docs, h, world), train_gpt.CostModel(costs), 0.0
    for rank in range(world):
        batches = [[n for _, n in b] for b in plan.rank_batches(rank)]
        total, done, seconds = sum(map(sum, batches)), 0, 0.0
        for b in batches:
            adapt = done < share * total
            done += sum(b) if adapt else 0
            seconds += model.seconds(train_gpt.BatchShape(b, h).work(adapt))
        worst = max(worst, seconds)
    return pre + worst


@pytest.mark.parametrize("share", [0.3, pytest.param(0.6, marks=pytest.mark.slow), 0.9])  # 0.6: between the two
@pytest.mark.parametrize("costs", [None, SKEWED], ids=["prior", "skewed"])
def test_a_budget_that_allows_x_percent_adapts_at_least_x_minus_5_and_ends_within_it(lengths, share, costs):
    h = lora_h()
    budget = budget_allowing(lengths, h, 8, 150.0, share, costs)
    h.ttt_budget_seconds = budget
    r = ttt_plan.simulate(lengths, h, 8, 150.0, true_costs=costs)
    assert r["adapted"] >= share - 0.05, (r["adapted"], share)
    assert r["eval_clock"] <= budget + 1e-6 and r["adapted"] < 1.0
    assert any(s["stops"] for s in r["ranks"])


def test_a_tiny_budget_adapts_nothing_and_phases_are_dropped_first(lengths):
    h = lora_h(TTT_PHASES="833,1666,2500", TTT_BUDGET_SECONDS=1)
    r = ttt_plan.simulate(lengths, h, 8, 150.0)
    assert r["adapted"] == 0.0 and r["phases"] == 0
    full = ttt_plan.simulate(lengths, lora_h(TTT_PHASES="833,1666,2500", TTT_BUDGET_SECONDS=1e6), 8, 150.0)
    h.ttt_budget_seconds = full["eval_clock"] - 1  # almost everything fits: a phase goes before any LoRA batch does
    r = ttt_plan.simulate(lengths, h, 8, 150.0)
    assert r["phases"] < 3 and r["adapted"] == 1.0


def test_cost_model_learns_the_machine():
    """A machine 2.5x slower than the prior at adapting and 1.2x at scoring: after a mix of batches the model predicts
    batches of any shape within 2 %; before any measurement it is the prior, and one measurement scales every kind."""
    machine = {k: v * (2.5 if k in ("token_pass", "chunk_step", "batch") else 1.2) for k, v in train_gpt.TTT_PRIOR.items()}
    model, true, h = train_gpt.CostModel(), train_gpt.CostModel(machine), lora_h()
    rng = np.random.default_rng(0)
    for _ in range(40):
        lengths = sorted(np.exp(rng.uniform(np.log(20), np.log(5000), int(rng.integers(1, 64)))).astype(int).tolist(), reverse=True)
        for adapt in (True, False):
            work = train_gpt.BatchShape(lengths, h).work(adapt)
            model.observe(work, true.seconds(work) * rng.uniform(0.97, 1.03))  # timing noise
    for lengths in ([4000, 30], [100] * 64, [60_000, 2000, 50], [3] * 5):
        for adapt in (True, False):
            work = train_gpt.BatchShape(lengths, h).work(adapt)
            assert model.seconds(work) == pytest.approx(true.seconds(work), rel=0.02)
    fresh = train_gpt.CostModel()
    work = train_gpt.BatchShape([500, 400], h).work(True)
    fresh.observe(work, 10 * train_gpt.CostModel().seconds(work))
    other = train_gpt.Work(sgd_token=1000)
    assert fresh.seconds(other) == pytest.approx(10 * train_gpt.CostModel().seconds(other), rel=0.01)


def test_one_odd_measurement_does_not_swing_the_projection():
    """A batch's first piece that took 5x its share (a cold cache, another process): the projection of the rest
    moves by no more than that piece's own excess, never by orders of magnitude."""
    h, model = lora_h(), train_gpt.CostModel()
    shape = train_gpt.BatchShape([3000, 2500, 900], h)
    model.observe(shape.work(True, 0, 5), 5 * train_gpt.CostModel().seconds(shape.work(True, 0, 5)))
    model.observe(shape.work(True, 5, 20), train_gpt.CostModel().seconds(shape.work(True, 5, 20)))
    rest = train_gpt.BatchShape([400] * 64, h).work(False)
    assert model.seconds(rest) < 5 * train_gpt.CostModel().seconds(rest)


def test_lanes_keep_a_warm_and_draw_it_once_per_lane():
    lengths = ttt_plan.fineweb_lengths(n_docs=2000)
    h = lora_h(TTT_PHASES="300")
    starts = []
    docs = list(zip(np.concatenate([[0], np.cumsum(lengths)[:-1]]).tolist(), lengths.tolist()))
    plan = train_gpt.TTTPlan(docs, h, 1)
    budget = train_gpt.TTTBudget(1e9, 0.0, clock=lambda: 0.0)
    train_gpt.drive_lora_ttt(plan, 0, h, budget, lambda b, a, keep: 0, lambda k, lane: starts.append((k, lane)),
                             lambda k: None, lambda ok: ok)
    assert starts == [(k, lane) for k in range(2) for lane in range(8)]  # not once per batch


def tiny_tokens(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(4, 1000, (sum(lengths) + 1,), generator=g)
    tokens[np.concatenate([[0], np.cumsum(lengths)[:-1]]).tolist()] = train_gpt.BOS_ID
    tokens[-1] = train_gpt.BOS_ID
    return tokens


class AlternatingBudget(train_gpt.TTTBudget):
    """Adapts every other batch: adaptation stops and resumes, as a tight budget makes it."""

    calls = 0

    def fits(self, *works):
        self.calls += 1
        return self.calls % 2 == 1 if len(works) == 2 and "token_pass" in works[0] else True


def compiled_names(monkeypatch, **settings):
    """The functions compile_ttt hands to torch.compile (recorded, not compiled) for these settings."""
    names = []
    monkeypatch.setattr(train_gpt.torch, "compile", lambda fn, **kw: names.append(getattr(fn, "__name__", type(fn).__name__)) or fn)
    h = make_h(COMPILE=1, TTT_BATCH_DOCS=4, TTT_LORA_RANK=4, **settings)  # small adapters: only the names matter
    model = train_gpt.build_model(h)
    fns = train_gpt.compile_ttt(train_gpt.Run(h, 0, 1, torch.device("cpu"), lambda *a, **k: None), model)
    return names, fns


def test_only_the_graphs_a_configuration_needs(monkeypatch):
    assert compiled_names(monkeypatch, TTT="lora")[0] == ["forward_logits"]  # no training graph without phases
    names, (train_fn, lora_fn, lora) = compiled_names(monkeypatch, TTT="lora", TTT_PHASES="5")
    assert names == ["GPT", "forward_logits"] and train_fn is not None and lora is not None


@pytest.mark.slow
def test_compiled_ttt_compiles_each_graph_once():
    """Rows shrink to one, widths vary down to one token, adaptation stops and resumes, a phase trains the model:
    after the eval-clock warm-up nothing recompiles and no new graph is built."""
    import shutil
    import torch._dynamo
    from torch._dynamo.utils import counters

    if not any(shutil.which(c) for c in ("g++", "c++", "clang++")):
        pytest.skip("inductor needs a C++ compiler")
    h = make_h(TTT="lora", TTT_BATCH_DOCS=4, TTT_CHUNK=8, EVAL_SEQ_LEN=32, EVAL_STRIDE=16, TTT_SGD_CHUNK=64,
               TTT_LORA_RANK=4, TTT_PHASES="5", COMPILE=1, NUM_LAYERS=2, XSA_LAST_N=-1)  # 2 layers: half the graph to compile
    torch.manual_seed(0)
    model = train_gpt.build_model(h)
    run = train_gpt.Run(h, 0, 1, torch.device("cpu"), lambda *a, **k: None)
    lengths = [70, 41, 33, 20, 17, 9, 5, 3, 1]
    tokens = tiny_tokens(lengths)
    luts = (torch.ones(1024, dtype=torch.int64), torch.zeros(1024, dtype=torch.bool), torch.zeros(1024, dtype=torch.bool))
    torch._dynamo.reset()
    counters.clear()
    try:
        train_fn, lora_fn, lora = train_gpt.compile_ttt(run, model)
        warm = counters["stats"]["unique_graphs"]
        with torch._dynamo.config.patch(error_on_recompile=True):
            scorer = train_gpt.Scorer(tokens, luts, record=True)
            stats = train_gpt.ttt_lora(run, model, lora_fn, train_fn, lora, scorer, AlternatingBudget(1e9, 0.0))
            assert scorer.result()["tokens"] == sum(lengths)
        assert counters["stats"]["unique_graphs"] == warm  # nothing compiled after the warm-up
        assert 0 < stats["adapted_batches"] < stats["batches"] and stats["phases"] == 1
    finally:
        torch._dynamo.reset()
