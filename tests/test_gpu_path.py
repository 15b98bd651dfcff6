"""The CUDA code path as far as a CPU can run it: bf16 autocast, torch.compile(fullgraph) and DDP over gloo; the
evaluation graph compiled once; fp32 Hessians under autocast; and tools/gpu_check.py --cpu end to end."""
import re
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, make_h, randomized, run_train, tiny_run_env
import train_gpt

needs_compiler = pytest.mark.skipif(not any(shutil.which(c) for c in ("g++", "c++", "clang++")),
                                    reason="inductor needs a C++ compiler on the CPU")


def test_bf16_autocast_runs_the_residual_stream_in_bf16_and_matches_fp32():
    h = make_h()
    model = randomized(h)
    g = torch.Generator().manual_seed(1)
    x, y = (torch.randint(0, h.vocab_size, (4, 64), generator=g) for _ in range(2))
    seen = []
    hook = model.blocks[1].register_forward_pre_hook(lambda m, args: seen.append(args[0].dtype))
    with torch.no_grad():
        fp32 = model(x, y)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16 = model(x, y)
    hook.remove()
    half = len(seen) // 2  # every pass of the block (the tiny model loops it), fp32 run first
    assert set(seen[:half]) == {torch.float32} and set(seen[half:]) == {torch.bfloat16}  # the residual stream itself
    assert bf16.dtype == torch.float32 and abs(bf16.item() - fp32.item()) < 0.02 * fp32.item(), (bf16, fp32)
    assert all(p.dtype == torch.float32 for p in model.parameters())  # master weights stay fp32


def test_hessians_are_fp32_under_autocast_and_shared_by_qkv():
    h = make_h()
    model = randomized(h)
    g = torch.Generator().manual_seed(2)
    batches = [torch.randint(0, h.vocab_size, (2, 64), generator=g) for _ in range(2)]
    inputs = []
    hook = model.blocks[0].attn.c_q.register_forward_hook(lambda m, args, out: inputs.append(args[0].detach().float()))
    hessians = train_gpt.collect_hessians(model, batches, h, torch.autocast("cpu", dtype=torch.bfloat16))
    hook.remove()
    H = hessians["blocks.0.attn.c_q.weight"]
    assert H.dtype == torch.float32
    expected = sum(x.reshape(-1, x.size(-1)).T @ x.reshape(-1, x.size(-1)) / (x.numel() // x.size(-1)) for x in inputs) / 2
    torch.testing.assert_close(H, expected, rtol=1e-5, atol=1e-6)  # fp32 products of the (bf16) activations
    assert hessians["blocks.0.attn.c_k.weight"] is H and hessians["blocks.0.attn.c_v.weight"] is H


@pytest.mark.slow
@needs_compiler
def test_compiled_evaluation_compiles_once():
    """The eval-clock warm-up runs the exact graph evaluate() uses: no recompilation afterwards."""
    import torch._dynamo

    h = make_h()
    model = randomized(h).eval()
    torch._dynamo.reset()
    try:
        logits_fn = train_gpt.make_logits_fn(model, True, torch.autocast("cpu", enabled=False))
        logits_fn(torch.randint(0, h.vocab_size, (4, 64)))  # the warm-up, as evaluate_artifact does it
        tokens = torch.randint(0, h.vocab_size, (1000,))
        luts = (torch.ones(h.vocab_size, dtype=torch.int64), torch.zeros(h.vocab_size, dtype=torch.bool),
                torch.zeros(h.vocab_size, dtype=torch.bool))
        with torch._dynamo.config.patch(error_on_recompile=True):
            for stride in (64, 16):
                res = train_gpt.evaluate(logits_fn, tokens, luts, 64, stride, 4)
                assert res["tokens"] == 999
            with pytest.raises(Exception, match="[Rr]ecompil"):  # the negative control: a grad-mode graph differs
                compiled = torch.compile(model.forward_logits, dynamic=False, fullgraph=True)
                compiled(tokens[:256].view(4, 64))
                with torch.no_grad():
                    compiled(tokens[:256].view(4, 64))
    finally:
        torch._dynamo.reset()


@pytest.mark.slow
@needs_compiler
def test_cuda_code_path_two_steps_on_cpu(smoke_dataset, tmp_path):
    """Two training steps through bf16 autocast, COMPILE=1 and DDP around the compiled model over 2 gloo ranks."""
    env = tiny_run_env(smoke_dataset, COMPILE="1", BF16="1", ITERATIONS="2", WARMUP_STEPS="1", TRAIN_LOG_EVERY="1",
                       GRAD_ACCUM_STEPS="2", TRAIN_BATCH_TOKENS="512", NUM_LAYERS="2", XSA_LAST_N="-1",
                       RUN_ID="cuda_path")
    proc, log = run_train(env, tmp_path, nproc=2)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "world_size:2 grad_accum_steps:2" in log and "attention: sdpa (CPU)" in log
    losses = [float(v) for v in re.findall(r"step:\d/2 train_loss:([0-9.]+)", log)]
    assert len(losses) == 2 and all(0 < v < 8 for v in losses)
    assert "summary: val_bpb:" in log.strip().splitlines()[-1]


@pytest.mark.slow
@needs_compiler
def test_gpu_check_runs_on_cpu(tmp_path):
    out = tmp_path / "report.txt"
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "gpu_check.py"), "--cpu", "--out", str(out)],
                          capture_output=True, text=True, timeout=900, cwd=str(tmp_path),
                          env={**dict(__import__("os").environ), "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = out.read_text()
    for check in ("attention kernel: ok", "compiled training (fullgraph, bf16 autocast, grad accumulation 8): ok",
                  "step time: ok", "export: ok", "evaluation: ok every target scored once", "TTT batch: ok",
                  "TTT projection: ok on 8 such devices, FineWeb-shaped", "all checks ok"):
        assert f"{check}" in report, check
    steps = int(re.search(r"over steps (\d+)\.\.(\d+)", report).group(2)) - int(re.search(r"over steps (\d+)", report).group(1))
    assert steps >= 30
    assert "---- the run's log" in report and "final_int6_sliding_window_exact" in report


@pytest.mark.slow
def test_gpu_check_two_rank_run_on_cpu(tmp_path, monkeypatch):
    """The check's 2-rank run (NCCL on a node with two GPUs) works: here over gloo, FA3 through the stand-in, eager."""
    import gpu_check

    monkeypatch.setitem(gpu_check.CPU_SIZE, "COMPILE", "0")
    lines = []
    gpu_check.two_rank_check(True, tmp_path, lines.append)
    assert len(lines) == 1 and lines[0].startswith("check: 2-rank gloo run: ok"), lines


@pytest.mark.slow
@needs_compiler
def test_loop_switch_costs_no_recompile_after_the_warm_up():
    """The rolled-back warm-up compiles the graph with the loop off and on; switching it on mid-run (and back)
    then runs a cached graph, and the two graphs compute different functions."""
    import torch._dynamo

    h = make_h(LOOP_LAYERS="1-2", LOOP_START_FRAC=0.5)
    model = randomized(h)
    x, y = (torch.randint(0, h.vocab_size, (2, 64), generator=torch.Generator().manual_seed(s)) for s in (1, 2))
    torch._dynamo.reset()
    try:
        compiled = torch.compile(model, dynamic=False, fullgraph=True)
        for looping in (False, True):  # what train() does in the warm-up
            model.looping = looping
            compiled(x, y).backward()
        losses = {}
        with torch._dynamo.config.patch(error_on_recompile=True):
            for looping in (False, True, False):
                model.looping = looping
                loss = compiled(x, y)
                loss.backward()
                losses[looping] = loss.item()
                assert loss.item() == pytest.approx(model(x, y).item(), rel=1e-5)
        assert losses[True] != losses[False]
    finally:
        torch._dynamo.reset()
