"""Optimizer (Muon, AdamW routing, LR / momentum schedules), weight averaging (EMA), quantization (SDClip, RTN,
search clip, GPTQ), serialization, fitting under the artifact cap, GPTQ calibration
data and the byte accounting of a real run."""
import contextlib
import copy
import datetime
import json
import math
import os
import re
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import zstandard

# smoke_dataset is used as a fixture by name: importing it here would register a second session fixture and
# build the dataset twice in a full-suite run.
from conftest import make_h, run_train, tiny_run_env
import smoke_data
import train_gpt

ROOT = Path(train_gpt.__file__).resolve().parent

# Every control tensor the model can have (name fragments), which must go to the scalar AdamW group and pass
# through the exporter unquantized.
CONTROL_FRAGMENTS = ("q_gain", "attn_scale", "mlp_scale", "resid_mix", "skip_weights", "skip_gates", "smear_w",
                     "smear_lambda", "attn_gate", "ve_lambda", "bigram.scale", "ve.scale", "lane_resid", "lane_post")
FULL = dict(VE_DIM=16, VE_LAYERS="2,3")  # the default tiny stack plus value embeddings: every parameter kind


def rtn_qstate(state, h):
    """Every tensor on its default grid, by rounding: what export_artifact starts from without Hessians."""
    return {n: (train_gpt.quantize_tensor(t, *plan, h)[0] if (plan := train_gpt.export_plan(n, t, h))
                else {"raw": t.detach().half()}) for n, t in state.items()}


def _randomize(model, seed=0, std=0.05):
    """Give the zero-initialised matrices (attention/MLP out-projections, bigram/VE projections) real values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2 and not p.any():
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


def _conditioned(m, n, cond, seed):
    """An m x n matrix with singular values log-spaced from 1 down to 1/cond, and its polar factor U V^T."""
    g = torch.Generator().manual_seed(seed)
    k = min(m, n)
    u, _ = torch.linalg.qr(torch.randn(m, k, generator=g))
    v, _ = torch.linalg.qr(torch.randn(n, k, generator=g))
    s = torch.logspace(0, -math.log10(cond), k)
    return u @ torch.diag(s) @ v.T, u @ v.T


# ----------------------------------------------------------------------------------------------------
# 1. Muon

def _cases():
    g = torch.Generator().manual_seed(7)
    for shape in ((64, 256), (256, 64), (128, 128)):
        yield f"cond100-{shape[0]}x{shape[1]}", _conditioned(*shape, 100, seed=shape[0])
        if shape[0] != shape[1]:  # a random square Gaussian has singular values down to ~0; only tall/wide ones are tame
            x = torch.randn(shape, generator=g)
            u, _, vh = torch.linalg.svd(x, full_matrices=False)
            yield f"gauss-{shape[0]}x{shape[1]}", (x, u @ vh)


CASES = list(_cases())


@pytest.mark.parametrize("name,case", CASES, ids=[c[0] for c in CASES])
def test_orthogonalize_polar_express_and_quintic(name, case):
    g, polar_factor = case
    o = train_gpt.orthogonalize(g, polar=True)
    assert o.shape == g.shape and o.dtype == torch.float32
    s = torch.linalg.svdvals(o)
    assert s.min() >= 0.7 and s.max() <= 1.3, (s.min().item(), s.max().item())
    assert abs(s.mean().item() - 1) <= 0.1
    cos = (o * polar_factor).sum() / (o.norm() * polar_factor.norm())
    assert cos > 0.98, "the result must point along the polar factor U V^T, not just be any orthogonal matrix"

    q = train_gpt.orthogonalize(g, polar=False)
    sq = torch.linalg.svdvals(q)
    assert sq.min() >= 0.5 and sq.max() <= 1.5, (sq.min().item(), sq.max().item())  # measured: [0.68, 1.21]
    assert 0.7 <= sq.mean().item() <= 1.1
    assert (s - 1).abs().mean() < (sq - 1).abs().mean(), "Polar Express should land closer to 1 than the quintic"


def test_decoupled_weight_decay_with_zero_gradient_every_group():
    h = make_h(**FULL, MATRIX_LR=0.05, MUON_WD=0.3, EMBED_LR=0.02, EMBED_WD=0.5, TABLE_LR=0.04, TABLE_WD=0.25,
               SCALAR_LR=0.01, SCALAR_WD=0.7)
    model = _randomize(train_gpt.build_model(h))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizers = train_gpt.Optimizers(model, h)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizers.step(1.0, h.muon_momentum, h.muon_wd)
    names = {id(p): n for n, p in model.named_parameters()}
    checked = 0
    for opt in (optimizers.adam, optimizers.muon):
        for group in opt.param_groups:
            factor = 1 - group["lr"] * group["weight_decay"]
            assert factor < 1
            for p in group["params"]:
                assert torch.equal(p.detach(), before[names[id(p)]] * factor), names[id(p)]
                checked += 1
    assert checked == len(before)


def test_optimizers_state_dict_rolls_back_a_step():
    """The warm-up restores both optimizers' states: after load_state_dict the same step gives the same weights."""
    h = make_h(**FULL)
    model = _randomize(train_gpt.build_model(h))
    optimizers = train_gpt.Optimizers(model, h)
    grads = {n: torch.randn_like(p) for n, p in model.named_parameters()}

    def step():
        for n, p in model.named_parameters():
            p.grad = grads[n].clone()
        optimizers.step(0.5, 0.9, 0.1)

    step()
    weights, states = copy.deepcopy(model.state_dict()), copy.deepcopy(optimizers.state_dict())
    step()
    after = copy.deepcopy(model.state_dict())
    model.load_state_dict(weights)
    optimizers.load_state_dict(states)
    step()
    assert all(torch.equal(after[n], t) for n, t in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())


def test_muon_zero_gradient_step_only_decays():
    p = nn.Parameter(torch.randn(48, 32))
    w0 = p.detach().clone()
    opt = train_gpt.Muon([p], lr=0.1, momentum=0.95, weight_decay=0.2)
    p.grad = torch.zeros_like(p)
    opt.step()
    assert torch.equal(p.detach(), w0 * (1 - 0.1 * 0.2))


def _muon_update(w_shape, grad, lr=1.0, **kw):
    p = nn.Parameter(torch.zeros(w_shape))
    opt = train_gpt.Muon([p], lr=lr, momentum=kw.pop("momentum", 0.0), weight_decay=0.0, **kw)
    p.grad = grad.clone()
    opt.step()
    return -p.detach() / lr


def test_muon_update_rms_scales_with_sqrt_out_over_in():
    g = torch.Generator().manual_seed(3)
    grad = torch.randn(256, 64, generator=g)
    tall = _muon_update((256, 64), grad, row_norm=False)
    wide = _muon_update((64, 256), grad.T.contiguous(), row_norm=False)
    rms = lambda t: t.square().mean().sqrt().item()  # noqa: E731
    assert rms(tall) / rms(wide) == pytest.approx(math.sqrt(256 / 64), rel=1e-3)
    # and the wide update is the plain orthogonalisation (factor max(1, out/in) = 1)
    assert torch.allclose(wide, train_gpt.orthogonalize(grad.T.contiguous()), atol=1e-6)
    assert torch.allclose(tall, 2.0 * train_gpt.orthogonalize(grad), atol=1e-6)


def test_muon_row_norm_changes_the_update():
    g = torch.Generator().manual_seed(4)
    grad = torch.randn(64, 96, generator=g) * torch.logspace(-2, 1, 64)[:, None]  # very unequal row norms
    on = _muon_update((64, 96), grad, row_norm=True)
    off = _muon_update((64, 96), grad, row_norm=False)
    assert not torch.allclose(on, off, atol=1e-3)
    # with MuonEq-R, what reaches Newton-Schulz has unit rows
    p = nn.Parameter(torch.zeros(64, 96))
    opt = train_gpt.Muon([p], lr=0.1, momentum=0.0, weight_decay=0.0, row_norm=True)
    seen = []
    opt.orthogonalize = lambda u, polar: seen.append(u.clone()) or train_gpt.orthogonalize(u, polar)
    p.grad = grad.clone()
    opt.step()
    assert torch.allclose(seen[0].norm(dim=1), torch.ones(64), atol=1e-5)


def test_muon_nesterov_momentum_buffer_and_update_input():
    mu = 0.8
    g = torch.Generator().manual_seed(5)
    g1, g2 = torch.randn(32, 48, generator=g), torch.randn(32, 48, generator=g)
    p = nn.Parameter(torch.zeros(32, 48))
    opt = train_gpt.Muon([p], lr=0.01, momentum=mu, weight_decay=0.0, row_norm=False)
    seen = []
    opt.orthogonalize = lambda u, polar: seen.append(u.clone()) or train_gpt.orthogonalize(u, polar)
    p.grad = g1.clone()
    opt.step()
    assert torch.equal(opt.state[p]["momentum_buffer"], g1)
    p.grad = g2.clone()
    opt.step()
    buf = opt.state[p]["momentum_buffer"]
    assert torch.allclose(buf, mu * g1 + g2, rtol=0, atol=1e-6)
    # Nesterov: Newton-Schulz sees g + mu*buf, not the buffer itself
    assert torch.allclose(seen[1], g2 + mu * (mu * g1 + g2), rtol=0, atol=1e-6)
    assert torch.allclose(seen[0], g1 * (1 + mu), rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------------------------------
# 2. Distributed Muon: rank r orthogonalises matrices i = r (mod world) and one all-reduce shares them

MUON_SHAPES = [(64, 32), (32, 64), (48, 48), (16, 80), (80, 16)]
MUON_STEPS = 3


def _muon_problem():
    g = torch.Generator().manual_seed(11)
    params = [nn.Parameter(torch.randn(s, generator=g) * 0.1) for s in MUON_SHAPES]
    grads = [[torch.randn(s, generator=g) for s in MUON_SHAPES] for _ in range(MUON_STEPS)]
    return params, grads


def _run_muon(params, grads, rank, world_size):
    opt = train_gpt.Muon(params, lr=0.05, momentum=0.9, weight_decay=0.1, rank=rank, world_size=world_size)
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = g.clone()
        opt.step()
    return opt


def _muon_worker(rank, world_size, init_file, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=120))
    try:
        params, grads = _muon_problem()
        opt = _run_muon(params, grads, rank, world_size)
        owned = [i for i, p in enumerate(params) if p in opt.state]
        torch.save({"params": [p.detach().clone() for p in params], "owned": owned}, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()  # gloo aborts a rank whose peer tears the group down first
    finally:
        dist.destroy_process_group()


def run_two_workers(worker, tmp_path, timeout=240):
    """worker(rank, 2, rendezvous file, tmp_path) in two spawned processes; fails the test if they hang."""
    ctx = mp.start_processes(worker, args=(2, str(tmp_path / "rendezvous"), str(tmp_path)), nprocs=2, join=False,
                             start_method="spawn")
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=5):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"{worker.__name__} did not finish in {timeout} s")


@pytest.mark.slow
def test_distributed_muon_matches_single_process(tmp_path):
    run_two_workers(_muon_worker, tmp_path)

    n = torch.get_num_threads()
    torch.set_num_threads(1)  # same arithmetic as the workers
    try:
        params, grads = _muon_problem()
        ref = _run_muon(params, grads, 0, 1)
    finally:
        torch.set_num_threads(n)
    assert all(p in ref.state for p in params)
    for rank in range(2):
        out = torch.load(tmp_path / f"rank{rank}.pt")
        assert out["owned"] == [i for i in range(len(MUON_SHAPES)) if i % 2 == rank], "work is not split by i % world"
        for i, (got, want) in enumerate(zip(out["params"], params)):
            assert torch.equal(got, want.detach()), f"rank {rank} param {i} differs from the single-process result"


# ----------------------------------------------------------------------------------------------------
# 3. Optimizer routing and schedules

def test_optimizers_routing():
    h = make_h(**FULL, EMBED_LR=0.011, TABLE_LR=0.022, SCALAR_LR=0.033, MATRIX_LR=0.044, EMBED_WD=0.1, TABLE_WD=0.2,
               SCALAR_WD=0.3, MUON_WD=0.4, MUON_NS="quintic", MUON_ROW_NORM=0)
    model = train_gpt.build_model(h)
    named = dict(model.named_parameters())
    optimizers = train_gpt.Optimizers(model, h)
    adam, muon = optimizers.adam, optimizers.muon
    assert isinstance(adam, torch.optim.AdamW) and isinstance(muon, train_gpt.Muon)
    by_lr = {round(g["lr"], 6): g for g in adam.param_groups}
    assert set(by_lr) == {0.011, 0.022, 0.033}
    names = {id(p): n for n, p in named.items()}
    group_names = {key: sorted(names[id(p)] for p in by_lr[lr]["params"])
                   for key, lr in (("embed", 0.011), ("table", 0.022), ("scalar", 0.033))}
    group_names["muon"] = sorted(names[id(p)] for g in muon.param_groups for p in g["params"])

    assert group_names["embed"] == ["tok_emb.weight"]
    assert group_names["table"] == ["bigram.table.weight", "ve.table.weight"]
    expected_muon = sorted([f"blocks.{i}.{m}.weight" for i in range(h.num_layers)
                            for m in ("attn.c_q", "attn.c_k", "attn.c_v", "attn.proj", "mlp.fc", "mlp.proj")]
                           + ["bigram.proj.weight", "ve.proj.weight"])
    assert group_names["muon"] == expected_muon
    assert all(named[n].ndim == 2 for n in expected_muon)
    scalar = group_names["scalar"]
    assert all(any(f in n for f in CONTROL_FRAGMENTS) for n in scalar), [n for n in scalar if not any(f in n for f in CONTROL_FRAGMENTS)]
    for fragment in CONTROL_FRAGMENTS:  # every control kind exists in this model and lands in the scalar group
        assert any(fragment in n for n in scalar), fragment
    assert any(named[n].ndim == 2 for n in scalar), "2-D control tensors (resid_mix, attn_gate, skips) must not go to Muon"
    # each parameter in exactly one group
    everything = [n for v in group_names.values() for n in v]
    assert sorted(everything) == sorted(named) and len(everything) == len(set(everything))

    wd = {round(g["lr"], 6): g["weight_decay"] for g in adam.param_groups}
    assert wd == {0.011: 0.1, 0.022: 0.2, 0.033: 0.3}
    assert all(g["base_lr"] == g["lr"] for g in adam.param_groups)
    (mg,) = muon.param_groups
    assert (mg["lr"], mg["base_lr"], mg["weight_decay"], mg["momentum"]) == (0.044, 0.044, 0.4, h.muon_momentum)
    assert (mg["polar"], mg["row_norm"]) == (False, False)
    assert adam.defaults["betas"] == (h.beta1, h.beta2) and adam.defaults["eps"] == 1e-8


def test_lr_multiplier_schedule():
    h = make_h(ITERATIONS=100, WARMDOWN_FRAC=0.5, MIN_LR=0.1)
    m = train_gpt.lr_multiplier
    for step in (0, 10, 49):
        assert m(h, step, 0.0, 0.0) == 1.0
    assert m(h, 50, 0.0, 0.0) == pytest.approx(1.0)
    assert m(h, 60, 0.0, 0.0) == pytest.approx(0.8)
    assert m(h, 75, 0.0, 0.0) == pytest.approx(0.5)
    assert m(h, 90, 0.0, 0.0) == pytest.approx(0.2)
    assert m(h, 96, 0.0, 0.0) == pytest.approx(0.1)  # floored at MIN_LR
    assert m(h, 100, 0.0, 0.0) == pytest.approx(0.1)
    # time further along than steps: time drives it
    assert m(h, 10, 750.0, 1000.0) == pytest.approx(0.5)
    assert m(h, 10, 400.0, 1000.0) == 1.0
    assert m(h, 10, 990.0, 1000.0) == pytest.approx(0.1)
    # steps further along than time: steps drive it
    assert m(h, 75, 100.0, 1000.0) == pytest.approx(0.5)
    # cap 0 ignores the clock
    assert m(h, 10, 1e9, 0.0) == 1.0
    # monotone non-increasing over a whole run
    values = [m(h, s, 0.0, 0.0) for s in range(101)]
    assert all(a >= b for a, b in zip(values, values[1:]))
    h0 = make_h(ITERATIONS=100, WARMDOWN_FRAC=0.0, MIN_LR=0.1)
    for step, ms in ((0, 0.0), (99, 0.0), (100, 2000.0), (50, 999.0)):
        assert m(h0, step, ms, 1000.0) == 1.0


def test_muon_momentum_warmup():
    h = make_h(MUON_MOMENTUM=0.97, MUON_MOMENTUM_WARMUP_START=0.92, MUON_MOMENTUM_WARMUP_STEPS=100)
    assert train_gpt.muon_momentum(h, 0) == pytest.approx(0.92)
    assert train_gpt.muon_momentum(h, 50) == pytest.approx(0.945)
    assert train_gpt.muon_momentum(h, 100) == pytest.approx(0.97)
    assert train_gpt.muon_momentum(h, 10_000) == pytest.approx(0.97)
    h0 = make_h(MUON_MOMENTUM=0.97, MUON_MOMENTUM_WARMUP_START=0.92, MUON_MOMENTUM_WARMUP_STEPS=0)
    assert train_gpt.muon_momentum(h0, 0) == pytest.approx(0.97)


# ----------------------------------------------------------------------------------------------------
# 4. Weight averaging

class _Two(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Parameter(torch.zeros(3, 4)), nn.Parameter(torch.zeros(5))


def _set(model, values):
    with torch.no_grad():
        for p, v in zip(model.parameters(), values):
            p.copy_(v)


def test_ema_arithmetic_and_apply():
    d = 0.9  # the average starts at step 2 / (1 - d) = 20 and follows the live weights before it
    h = make_h(AVERAGING="ema", EMA_DECAY=d)
    model = _Two()
    g = torch.Generator().manual_seed(0)
    seq = [[torch.randn(p.shape, generator=g, dtype=torch.float64) for p in model.parameters()] for _ in range(31)]
    _set(model, seq[0])
    avg = train_gpt.WeightAverager(model, h)
    expected = [t.clone() for t in seq[0]]
    for k in range(1, 31):
        _set(model, seq[k])
        avg.update(k)
        # e_k = w_k before step 20, then d_k e_{k-1} + (1 - d_k) w_k, the decay warming up d_k = min(d, (1+s)/(10+s))
        dk = 0.0 if k < 20 else min(d, (1 + k - 20) / (10 + k - 20))
        expected = [dk * e + (1 - dk) * w for e, w in zip(expected, seq[k])]
        for a, e in zip(avg.avg, expected):
            assert torch.allclose(a.double(), e, rtol=0, atol=1e-6), k
        if k < 20:
            assert all(torch.allclose(a.double(), w, atol=1e-6) for a, w in zip(avg.avg, seq[k]))
    live = [p.detach().clone() for p in model.parameters()]
    assert "EMA" in avg.apply_to(model)
    for p, a, w in zip(model.parameters(), avg.avg, live):
        assert torch.equal(p.detach(), a) and not torch.equal(p.detach(), w)


def test_default_ema_exports_the_live_weights_of_a_short_run():
    """At the default decay 0.9965 the average starts at step 571: a 200-step run (issue 9's side-by-side, where
    every average of its last steps scored worse than its last weights) exports its live weights; a 1,000-step
    run an average."""
    h = make_h(AVERAGING="ema")
    assert h.ema_decay == 0.9965
    model = _Two()
    g = torch.Generator().manual_seed(1)
    avg = train_gpt.WeightAverager(model, h)
    for k in range(1, 1001):
        _set(model, [torch.randn(p.shape, generator=g) for p in model.parameters()])
        avg.update(k)
        live_now = all(torch.allclose(a, p.detach()) for a, p in zip(avg.avg, model.parameters()))
        assert live_now == (k < 571), k


def test_averaging_none_keeps_live_weights():
    model = _Two()
    avg = train_gpt.WeightAverager(model, make_h(AVERAGING="none"))
    for step in range(1, 6):
        _set(model, [torch.full(p.shape, float(step)) for p in model.parameters()])
        avg.update(step)
    live = [p.detach().clone() for p in model.parameters()]
    assert avg.apply_to(model) == "live weights"
    assert all(torch.equal(p.detach(), w) for p, w in zip(model.parameters(), live))


# ----------------------------------------------------------------------------------------------------
# 5. Quantization

def _heavy_tailed(rows=32, cols=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * 0.02
    w[:, :3] *= 40  # outliers that the SDClip k*std clip cuts
    return w


@pytest.mark.parametrize("bits,k", [(5, 12.0), (6, 13.0), (8, 20.0), (6, 2.0)])
def test_quantize_rows_codes_scales_and_error(bits, k):
    w = _heavy_tailed()
    qmax = 2 ** (bits - 1) - 1
    scale = train_gpt.sdclip_scales(w, bits, k)
    assert torch.equal(scale.half().float(), scale), "scales must be exactly representable in fp16"
    assert torch.allclose(scale, k * w.std(dim=1, correction=0) / qmax, rtol=1e-3)
    codes = train_gpt.quantize_rows(w, scale, bits)
    assert torch.equal(codes, codes.round()) and codes.abs().max() <= qmax
    ratio = w / scale[:, None]
    unclipped = ratio.abs() <= qmax
    err = (w - codes * scale[:, None]).abs()
    assert torch.all(err[unclipped] <= (scale[:, None] / 2 * (1 + 1e-5)).expand_as(w)[unclipped])
    clipped = ratio.abs() > qmax + 0.5
    if k == 2.0:
        assert clipped.any()
    assert torch.equal(codes[clipped], qmax * ratio[clipped].sign())
    # a zero row gets the smallest fp16 scale, not 0 (no division by zero)
    z = train_gpt.sdclip_scales(torch.zeros(2, 8), bits, k)
    assert torch.all(z > 0) and torch.equal(train_gpt.quantize_rows(torch.zeros(2, 8), z, bits), torch.zeros(2, 8))


def test_export_plan():
    h = make_h(**FULL, ATTN_BITS=6, MLP_BITS=5, ATTN_CLIP_K=13.0, MLP_CLIP_K=12.0, EMBED_BITS=7, EMBED_CLIP_K=15.0)
    model = train_gpt.build_model(h)
    seen = set()
    for name, p in model.state_dict().items():
        plan = train_gpt.export_plan(name, p, h)
        if name in ("tok_emb.weight", "bigram.table.weight", "ve.table.weight"):
            assert plan == (7, 15.0), name
        elif name.startswith("blocks.") and any(f".{m}.weight" in name for m in ("c_q", "c_k", "c_v", "attn.proj")):
            assert plan == (6, 13.0), name
        elif name.startswith("blocks.") and ".mlp." in name:
            assert plan == (5, 12.0), name
        else:  # control tensors (also the 2-D ones) and non-block matrices pass through
            assert plan is None, name
            seen.add(name)
    assert {"bigram.proj.weight", "ve.proj.weight", "skip_weights", "blocks.0.resid_mix", "blocks.0.attn.attn_gate",
            "smear.smear_w", "blocks.2.attn.ve_lambda", "bigram.scale"} <= seen
    h16 = make_h(**FULL, EMBED_BITS=16)
    for name in ("tok_emb.weight", "bigram.table.weight", "ve.table.weight"):
        assert train_gpt.export_plan(name, model.state_dict()[name], h16) is None


# ----------------------------------------------------------------------------------------------------
# 6. GPTQ

def test_gptq_beats_rtn_on_real_model_inputs():
    h = make_h()
    torch.manual_seed(0)
    model = _randomize(train_gpt.build_model(h), std=0.05)
    g = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, h.vocab_size, (4, 64), generator=g) for _ in range(3)]
    names = ["blocks.0.attn.c_q.weight", "blocks.1.mlp.fc.weight", "blocks.2.mlp.proj.weight", "blocks.3.attn.proj.weight"]
    modules = dict(model.named_modules())
    inputs = {n: [] for n in names}
    hooks = [modules[n[:-len(".weight")]].register_forward_hook(
        lambda mod, inp, out, n=n: inputs[n].append(inp[0].detach().reshape(-1, inp[0].size(-1)))) for n in names]
    hessians = train_gpt.collect_hessians(model, batches, h, contextlib.nullcontext())
    for hook in hooks:
        hook.remove()
    expected_keys = {f"blocks.{i}.{m}.weight" for i in range(h.num_layers)
                     for m in ("attn.c_q", "attn.c_k", "attn.c_v", "attn.proj", "mlp.fc", "mlp.proj")} | {"tok_emb.weight"}
    assert set(hessians) == expected_keys
    params = dict(model.named_parameters())
    assert model.looping and model.looped.count(1) == 3  # layers 1-2 of this tiny model run three times
    for name in names:
        xs, passes = inputs[name], model.looped.count(int(name.split(".")[1]))
        assert len(xs) == passes * len(batches)
        H = hessians[name]  # every pass of a shared layer adds to its Hessian
        assert torch.allclose(H, sum(x.T @ x / x.size(0) for x in xs) / len(batches), atol=1e-5)
        X, W = torch.cat(xs), params[name].detach()
        bits, k = train_gpt.export_plan(name, W, h)
        for b, kk in ((bits, k), (4, 4.0)):
            scale = train_gpt.sdclip_scales(W, b, kk)
            codes = train_gpt.gptq_quantize(W, H, scale, b)
            assert torch.equal(codes, codes.round()) and codes.abs().max() <= 2 ** (b - 1) - 1
            err_gptq = (X @ (W - codes * scale[:, None]).T).norm()
            err_rtn = (X @ (W - train_gpt.quantize_rows(W, scale, b) * scale[:, None]).T).norm()
            assert err_gptq < err_rtn, (name, b, err_gptq.item(), err_rtn.item())


def _correlated_problem(seed, n_in=64, n_out=32, n=2048, dead=()):
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(n_in, n_in, generator=g))
    v, _ = torch.linalg.qr(torch.randn(n_in, n_in, generator=g))
    a = u @ torch.diag(torch.logspace(0, -2, n_in)) @ v.T  # condition number 100
    x = torch.randn(n, n_in, generator=g) @ a
    x[:, list(dead)] = 0
    w = torch.randn(n_out, n_in, generator=g) * 0.05
    return x, w, x.T @ x / n


@pytest.mark.parametrize("bits,k,block", [(4, 4.0, 128), (6, 13.0, 128), (3, 3.0, 16)])
def test_gptq_wins_clearly_on_correlated_inputs(bits, k, block):
    for seed in range(2):
        x, w, H = _correlated_problem(seed)
        scale = train_gpt.sdclip_scales(w, bits, k)
        codes = train_gpt.gptq_quantize(w, H, scale, bits, block=block)
        err_gptq = (x @ (w - codes * scale[:, None]).T).norm()
        err_rtn = (x @ (w - train_gpt.quantize_rows(w, scale, bits) * scale[:, None]).T).norm()
        assert err_gptq <= 0.8 * err_rtn, (seed, err_gptq.item(), err_rtn.item())


def test_gptq_dead_columns():
    dead = [3, 10, 40]
    x, w, H = _correlated_problem(5, dead=dead)
    assert torch.all(torch.diag(H)[dead] == 0)
    scale = train_gpt.sdclip_scales(w, 4, 4.0)
    codes = train_gpt.gptq_quantize(w, H, scale, 4)
    assert torch.isfinite(codes).all()
    assert torch.all(codes[:, dead] == 0)
    err_gptq = (x @ (w - codes * scale[:, None]).T).norm()
    err_rtn = (x @ (w - train_gpt.quantize_rows(w, scale, 4) * scale[:, None]).T).norm()
    assert torch.isfinite(err_gptq) and err_gptq < err_rtn
    # an all-zero Hessian (a layer that never saw input) still quantizes without NaN
    codes0 = train_gpt.gptq_quantize(w, torch.zeros(64, 64), scale, 4)
    assert torch.isfinite(codes0).all()


# ----------------------------------------------------------------------------------------------------
# 7. Serialization

def _qstate(h=None, seed=0):
    h = h or make_h(**FULL)
    model = _randomize(train_gpt.build_model(h), seed=seed)
    return h, model, rtn_qstate(model.state_dict(), h)


def _serialize(q, h):
    frames = {k: f for n, e in q.items() if "codes" in e for k, f in train_gpt.code_frames(n, e, h).items()}
    return train_gpt.serialize_quantized(q, frames, train_gpt.sixteen_bit_frame(q, h)), frames


def test_serialize_round_trip_and_frame_choice():
    h, model, q = _qstate(make_h(**FULL, ZSTD_LEVEL=9))
    blob, frames = _serialize(q, h)
    head = int.from_bytes(blob[4:8], "little")
    meta = json.loads(blob[8:8 + head])
    assert blob[:4] == train_gpt.ARTIFACT_MAGIC
    assert len(meta["frames"]) == 1 + sum("codes" in e for e in q.values())
    assert 8 + head + sum(n for _, n in meta["frames"]) == len(blob)  # the file is exactly header + frames
    halves = b"".join(t.numpy().tobytes() for e in q.values() for t in ([e["scale"]] if "codes" in e else [e["raw"]]))
    compressors = (lambda b: train_gpt.zstd_compress(b, 9), lambda b: train_gpt.lzma.compress(b, preset=train_gpt.LZMA_PRESET))
    # the 16-bit frame is the smallest of zstd and lzma, on the values as they are or byte-shuffled
    assert meta["frames"][0][1] == min(len(f(d)) for d in (halves, train_gpt.byte_shuffle(halves)) for f in compressors)
    for name, (method, frame) in frames.items():  # each code frame is the smaller of zstd and lzma
        raw = q[name]["codes"].numpy().tobytes()
        sizes = {"zstd": len(train_gpt.zstd_compress(raw, 9, 6)), "lzma": len(train_gpt.lzma.compress(raw, preset=train_gpt.LZMA_PRESET))}
        assert len(frame) == min(sizes.values()) and sizes[method] == len(frame)
    back = train_gpt.deserialize_quantized(blob)
    assert list(back) == list(q)
    for name, e in q.items():
        assert set(back[name]) == set(e), name
        if "codes" in e:
            assert torch.equal(back[name]["codes"], e["codes"]) and back[name]["codes"].dtype == torch.int8
            assert torch.equal(back[name]["scale"], e["scale"]) and back[name]["scale"].dtype == torch.float16
            assert back[name]["bits"] == e["bits"]
        else:
            assert torch.equal(back[name]["raw"], e["raw"]) and back[name]["raw"].dtype == torch.float16


def test_deserialize_rejects_wrong_magic():
    h, _, q = _qstate()
    blob, _ = _serialize(q, h)
    with pytest.raises(train_gpt.DataError):
        train_gpt.deserialize_quantized(b"PGQ2" + blob[4:])


def test_byte_shuffle_inverse():
    rng = np.random.default_rng(0)
    for n in (0, 2, 10, 4096):
        data = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
        shuffled = train_gpt.byte_shuffle(data)
        assert len(shuffled) == n and train_gpt.byte_unshuffle(shuffled) == data
        assert shuffled[:n // 2] == data[0::2]
    halves = torch.randn(100).half().numpy().tobytes()
    assert train_gpt.byte_unshuffle(train_gpt.byte_shuffle(halves)) == halves


def test_dequantize_state_loads_strictly_into_fresh_model():
    h, model, q = _qstate()
    deq = train_gpt.dequantize_state(train_gpt.deserialize_quantized(_serialize(q, h)[0]))
    ref = model.state_dict()
    assert list(deq) == list(ref)
    for name, t in ref.items():
        assert deq[name].shape == t.shape and deq[name].dtype == t.dtype, name
    fresh = train_gpt.build_model(h)
    fresh.load_state_dict(deq, strict=True)
    ids = torch.randint(0, h.vocab_size, (2, 64))
    with torch.no_grad():
        a, b = fresh.forward_logits(ids), model.forward_logits(ids)
    assert torch.isfinite(a).all() and (a - b).abs().max() < 0.5
    # passthrough tensors survive at fp16 precision
    assert torch.equal(deq["blocks.0.resid_mix"], ref["blocks.0.resid_mix"].half().float())


# ----------------------------------------------------------------------------------------------------
# 8. Fitting under the cap and filling it; the ladder of grids; the size estimate

def _export(state, code_bytes=5000, **overrides):
    lines = []
    h = make_h(**{"ZSTD_LEVEL": 9, **overrides})
    blob, qstate, report = train_gpt.export_artifact(state, h, code_bytes, log=lines.append)
    return blob, qstate, report, [line for line in lines if line.startswith("artifact_fit")]


def _roundtrip_error(state, qstate):
    deq = train_gpt.dequantize_state(qstate)
    return sum(float((state[n].float() - deq[n]).square().sum()) for n, e in qstate.items() if "codes" in e)


@pytest.fixture(scope="module")
def export_state():
    torch.manual_seed(0)
    return _randomize(train_gpt.build_model(make_h(MODEL_DIM=128, MLP_MULT=3, NUM_LAYERS=3, XSA_LAST_N=3)), std=0.05).state_dict()


@pytest.fixture(scope="module")
def natural_export(export_state):
    """_export(export_state, BUDGET_FILL=0): the default grids, no cap pressure; computed once for the tests below."""
    return _export(export_state, BUDGET_FILL=0)


def test_grid_ladder_steps_by_quarter_bits():
    for bits, k in ((6, 13.0), (5, 12.0), (8, 20.0)):
        ladder = train_gpt.grid_ladder(bits, k)
        assert ladder[train_gpt.LADDER_STEPS.index(0)] == (bits, pytest.approx(k), 0)
        steps = [kk / (2 ** (b - 1) - 1) for b, kk, _ in ladder]
        for j, (coarse, fine) in enumerate(zip(steps, steps[1:])):
            assert coarse / fine == pytest.approx(2 ** 0.25), j
        for b, kk, _ in ladder:  # every rung keeps at least the default clip range, or is int8
            assert 2 <= b <= 8 and (kk >= k - 1e-6 or b == 8)


def test_error_weights_put_a_lookup_table_in_the_unit_of_a_linear_layer():
    """The allocation's error of a table perturbation = the mean squared change it makes per token after the scaled
    projection (rows read equally often); a linear layer's is its input Hessian's diagonal."""
    torch.manual_seed(0)
    rows, dim, width = 512, 32, 96
    proj = torch.linalg.qr(torch.randn(width, dim))[0] * 0.7  # orthogonal columns: the gain is exact
    state = {"bigram.table.weight": torch.randn(rows, dim), "bigram.proj.weight": proj, "bigram.scale": torch.tensor(0.05)}
    delta = 0.01 * torch.randn(rows, dim)
    per_token = (0.05 * delta @ proj.T).square().sum(1).mean()
    weighted = (delta.square() * train_gpt.error_weights("bigram.table.weight", state, None)).sum()
    assert float(weighted) == pytest.approx(float(per_token), rel=1e-4)
    hessian = torch.diag(torch.arange(1.0, dim + 1))
    assert torch.equal(train_gpt.error_weights("blocks.0.mlp.fc.weight", {"blocks.0.mlp.fc.weight": delta},
                                               {"blocks.0.mlp.fc.weight": hessian}), torch.arange(1.0, dim + 1))


def test_export_without_budget_fill_keeps_the_default_grids(export_state, natural_export):
    blob, qstate, report, fits = natural_export
    assert not fits and report["regridded"] == 0
    q = rtn_qstate(export_state, make_h())
    for name, e in q.items():
        assert set(qstate[name]) == set(e) and all(torch.equal(qstate[name][k], e[k]) for k in e if k != "bits"), name
    assert train_gpt.deserialize_quantized(blob).keys() == q.keys()


def test_export_fits_a_small_cap_by_coarsening(export_state, natural_export):
    natural = len(natural_export[0]) + 5000
    cap = int(0.8 * natural)
    blob, qstate, report, fits = _export(export_state, ARTIFACT_CAP_BYTES=cap)
    assert len(blob) + 5000 <= cap and fits and report["regridded"] > 0
    back = train_gpt.deserialize_quantized(blob)
    for name, e in qstate.items():
        if "codes" in e:
            assert torch.equal(back[name]["codes"], e["codes"]) and torch.equal(back[name]["scale"], e["scale"])
    assert _roundtrip_error(export_state, qstate) > _roundtrip_error(export_state, rtn_qstate(export_state, make_h()))


@pytest.mark.parametrize("fill", [1, 0])
def test_export_below_cap_fills_the_window_or_stays(export_state, natural_export, fill):
    natural_blob, natural_q, _, _ = natural_export
    cap = len(natural_blob) + 5000 + 120_000
    blob, qstate, report, fits = _export(export_state, ARTIFACT_CAP_BYTES=cap, BUDGET_FILL=fill)
    total = len(blob) + 5000
    if fill:
        assert cap - 50_000 <= total <= cap, (total, cap)
        assert _roundtrip_error(export_state, qstate) < 0.8 * _roundtrip_error(export_state, natural_q)
    else:
        assert blob == natural_blob and not fits


def test_export_impossible_cap_raises(export_state):
    with pytest.raises(RuntimeError, match="could not fit"):
        _export(export_state, ARTIFACT_CAP_BYTES=6000)


def test_cholesky_failure_falls_back_to_more_damping_then_rounding():
    h = make_h()
    g = torch.Generator().manual_seed(0)
    w = torch.randn(16, 32, generator=g)
    q, note = train_gpt.quantize_tensor(w, 6, 13.0, h, -torch.eye(32))  # negative definite even when damped
    assert "rounded" in note and torch.equal(q["codes"], train_gpt.quantize_rows(w, train_gpt.sdclip_scales(w, 6, 13.0), 6).to(torch.int8))
    a = torch.randn(32, 32, generator=g)
    H = a @ a.T - 0.05 * torch.eye(32) * torch.diag(a @ a.T).mean()  # indefinite; 10x damping makes it definite
    q, note = train_gpt.quantize_tensor(w, 6, 13.0, h, H)
    assert note and "damping" in note
    q, note = train_gpt.quantize_tensor(w, 6, 13.0, h, a @ a.T)
    assert note is None


def _export_worker(rank, world_size, init_file, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=120))
    try:
        torch.manual_seed(0)
        h = make_h(ZSTD_LEVEL=9)
        state = _randomize(train_gpt.build_model(h), std=0.05).state_dict()
        hessians = {n: torch.eye(t.size(1)) * (1 + i) for i, (n, t) in enumerate(state.items()) if train_gpt.export_plan(n, t, h)}
        hc = make_h(ZSTD_LEVEL=9, ARTIFACT_CAP_BYTES=100_000)
        blob, _, report = train_gpt.export_artifact(state, hc, 1000, hessians, log=lambda m: None, rank=rank, world_size=world_size)
        Path(out_dir, f"rank{rank}.bin").write_bytes(blob)
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_distributed_export_equals_single_process(tmp_path):
    """Two ranks each quantize and compress their share; both end with the artifact one process makes alone."""
    run_two_workers(_export_worker, tmp_path)
    torch.manual_seed(0)
    h = make_h(ZSTD_LEVEL=9)
    state = _randomize(train_gpt.build_model(h), std=0.05).state_dict()
    hessians = {n: torch.eye(t.size(1)) * (1 + i) for i, (n, t) in enumerate(state.items()) if train_gpt.export_plan(n, t, h)}
    blob, _, report = train_gpt.export_artifact(state, make_h(ZSTD_LEVEL=9, ARTIFACT_CAP_BYTES=100_000), 1000, hessians,
                                                log=lambda m: None)
    assert report["regridded"] > 0  # the cap made it move grids, so the ranks had to agree on that too
    assert (tmp_path / "rank0.bin").read_bytes() == blob == (tmp_path / "rank1.bin").read_bytes()


def test_estimate_model_bytes_within_factor_two():
    h = make_h()
    torch.manual_seed(0)
    state = train_gpt.build_model(h).state_dict()
    real = len(_export(state, 0, BUDGET_FILL=0)[0])
    est = train_gpt.estimate_model_bytes(state, h)
    assert real / 2 <= est <= 2 * real, (est, real)


# ----------------------------------------------------------------------------------------------------
# 10 / 11. Real runs: GPTQ calibration never reads validation tokens; the byte accounting on disk

TRAIN_IDS, VAL_IDS = (4, 500), (500, 1000)


def _documents(rng, n_tokens, lo, hi):
    out = []
    while len(out) < n_tokens:
        out.append(train_gpt.BOS_ID)
        out.extend(rng.integers(lo, hi, int(rng.integers(20, 200))).tolist())
    return np.array(out[:n_tokens])


@pytest.fixture(scope="module")
def disjoint_dataset(tmp_path_factory, smoke_dataset):
    """Train tokens in [4, 500), val tokens in [500, 1000), BOS at document starts; the smoke tokenizer."""
    out = tmp_path_factory.mktemp("disjoint")
    rng = np.random.default_rng(0)
    smoke_data.write_shard(out / "fineweb_train_000000.bin", _documents(rng, 24_000, *TRAIN_IDS))
    smoke_data.write_shard(out / "fineweb_val_000000.bin", _documents(rng, 2_200, *VAL_IDS))
    return out, smoke_dataset[1]


@pytest.mark.slow
def test_gptq_calibration_reads_training_tokens_only(disjoint_dataset, tmp_path, monkeypatch):
    env = tiny_run_env(disjoint_dataset, GPTQ="1", ITERATIONS="3", WARMUP_STEPS="0", MAX_WALLCLOCK_SECONDS="0",
                       COMPILE="0", GPTQ_CALIB_BATCHES="3", RUN_ID="calib", OUTPUT_DIR=str(tmp_path),
                       LOG_DIR=str(tmp_path / "logs"))
    for name, *_ in train_gpt.HYPERPARAMETERS:
        monkeypatch.delenv(name, raising=False)
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, str(value))

    seen = []
    original = train_gpt.collect_hessians

    def spy(model, batches, h, autocast):
        def record():
            for x in batches:
                seen.append((int(x.min()), int(x.max()), x.numel()))
                yield x
        return original(model, record(), h, autocast)

    monkeypatch.setattr(train_gpt, "collect_hessians", spy)
    train_gpt.main(train_gpt.start_run())
    log = (tmp_path / "logs" / "calib.txt").read_text()
    assert len(seen) == 3 and all(n == 2048 for *_, n in seen), seen
    assert all(hi < VAL_IDS[0] for _, hi, _ in seen), f"GPTQ calibration read validation tokens: {seen}"
    assert "gptq_hessians:" in log and "gptq:True" in log
    assert (tmp_path / "final_model.int6.ptz").exists() and (tmp_path / "submission.json").exists()


def _last(pattern, text):
    found = re.findall(pattern, text)
    assert found, pattern
    return found[-1]


@pytest.mark.slow
def test_run_byte_accounting_and_submission(disjoint_dataset, tmp_path):
    code = ROOT / "train_gpt.py"
    size_before = os.path.getsize(code)
    env = tiny_run_env(disjoint_dataset, ITERATIONS="4", WARMUP_STEPS="1", AUTHOR="Test Author", GITHUB_ID="tester",
                       SEED="7")
    proc, log = run_train(env, tmp_path)
    size_after = os.path.getsize(code)
    if size_after != size_before:  # someone saved train_gpt.py mid-run: code bytes are not comparable
        pytest.skip("train_gpt.py was edited while the run was going")
    assert proc.returncode == 0, proc.stderr[-3000:]
    artifact = tmp_path / "final_model.int6.ptz"
    model_bytes = os.path.getsize(artifact)

    total = int(_last(r"Total submission size int6\+zstd: (\d+) bytes", log))
    serialized = int(_last(r"Serialized model int6\+zstd: (\d+) bytes", log))
    code_logged = int(_last(r"Code size: (\d+) bytes", log))
    assert total == model_bytes + size_after
    assert serialized == model_bytes
    assert code_logged == size_after

    sub = json.loads((tmp_path / "submission.json").read_text())
    for key in ("author", "github_id", "name", "blurb", "date", "val_loss", "val_bpb", "bytes_total", "bytes_code",
                "step_stop", "wallclock_seconds", "eval_time_seconds", "hardware", "pytorch_version", "seed",
                "pre_quant_val_bpb"):
        assert key in sub, key
    assert (sub["author"], sub["github_id"], sub["seed"], sub["step_stop"]) == ("Test Author", "tester", 7, 4)
    assert sub["bytes_total"] == total and sub["bytes_code"] == size_after and sub["bytes_model"] == model_bytes
    assert sub["pytorch_version"] == torch.__version__
    assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", sub["date"])
    loss_s, bpb_s = re.findall(r"final_int8_zlib_roundtrip_exact val_loss:([0-9.]+) val_bpb:([0-9.]+)", log)[-1]
    assert f"{sub['val_loss']:.8f}" == loss_s and f"{sub['val_bpb']:.8f}" == bpb_s
    pre = _last(r"pre_quant val_loss:[0-9.]+ val_bpb:([0-9.]+)", log)
    assert f"{sub['pre_quant_val_bpb']:.4f}" == pre
    for key in ("val_loss", "val_bpb", "wallclock_seconds", "eval_time_seconds", "pre_quant_val_bpb"):
        assert isinstance(sub[key], float) and math.isfinite(sub[key]) and sub[key] > 0, key
