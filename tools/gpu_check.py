"""One command that checks everything a GPU run depends on, and writes logs/gpu_check_<device>.txt.

    python3 tools/gpu_check.py          # on a CUDA machine (one GPU is enough): the full-size default model
    python3 tools/gpu_check.py --cpu    # the same path at a small size on the CPU (the test suite runs this)

It builds the smoke dataset (tools/smoke_data.py, no download) and runs train_gpt's own phases on it with settings
for a measurement, so what it proves is the code a real run executes: the attention kernel (FA3 present and
traceable under torch.compile; any fallback to SDPA FAILs unless FA3=0 is set), FA3's varlen attention against
SDPA's document mask in the trained model, the model compiled with fullgraph and bf16 autocast, gradient
accumulation 8, at least 30 timed steps (ms/step, tokens/s, MFU counting the depth-recurrence passes, measured
ms/step against the FLOP count, peak memory), Hessians, GPTQ and export of the model (time, bytes), the
evaluation: its compile inside the eval clock (the TTT graphs too; an eager fallback FAILs), a LoRA TTT batch of
long documents timed with its compile, the eval clock of FineWeb-shaped documents on 8 GPUs projected from that
batch by the TTT planner (tools/ttt_plan.py; FAIL over 600 s), and, when two or more GPUs
are visible, two training steps of a 2-rank NCCL run (torchrun). At --cpu the attention is FA3 through the test
stand-in (tests/fa3_standin, unless another flash_attn_interface imports first) and the final pass is sliding
windows (TTT=off), which keeps the check short. Each check prints one `check:` line; the exit code is 1 if any
failed. The numbers are measurements of this machine only.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

import smoke_data  # noqa: E402

STANDIN = ROOT / "tests" / "fa3_standin"

H100_BF16_DENSE_FLOPS = 989e12  # H100/H200 SXM peak dense bf16, the MFU denominator
FINEWEB_VAL_TARGETS = {1024: 62_021_632, 8192: 40_540_160}  # the official validation set, for the projection
TIMED_STEPS, WARMUP_STEPS = 32, 3

# At --cpu: a small model that still has every piece (GQA, XSA, bigram, gates) and the same accumulation of 8.
CPU_SIZE = dict(NUM_LAYERS="3", MODEL_DIM="64", NUM_HEADS="4", NUM_KV_HEADS="2", MLP_MULT="2", ROPE_DIMS="8",
                BIGRAM_BUCKETS="64", BIGRAM_DIM="16", TRAIN_SEQ_LEN="64", TRAIN_BATCH_TOKENS=str(8 * 2 * 64),
                EVAL_BATCH_SEQS="8", EVAL_STRIDE="16", MUON_MOMENTUM_WARMUP_STEPS="10",
                TTT="off", FA3="force")  # compiling the TTT graphs for the CPU would double this check; tests/test_ttt.py runs TTT


def settings(cpu, work):
    data, tokenizer = smoke_data.cached_dataset(work / "data")
    env = dict(DATA_PATH=str(data), TOKENIZER_PATH=str(tokenizer), RUN_ID="gpu_check", LOG_DIR=str(work / "logs"),
               OUTPUT_DIR=str(work / "out"), ITERATIONS=str(WARMUP_STEPS + TIMED_STEPS), WARMUP_STEPS=str(WARMUP_STEPS),
               MAX_WALLCLOCK_SECONDS="0", TRAIN_LOG_EVERY="1", GRAD_ACCUM_STEPS="8",
               GPTQ_CALIB_BATCHES="4", COMPILE="1", BF16="1")
    if cpu:
        env.update(CPU_SIZE)
    return env


def step_times(log):
    """{step: train_time ms} from the step lines."""
    return {int(s): float(t) for s, t in re.findall(r"^step:(\d+)/\d+ train_loss:\S+ train_time:(\d+)ms", log, re.M)}


def model_flops_per_token(model, seq_len, looping):
    """Training FLOPs per token, as usual for MFU: 6 x every weight a token multiplies through (a looped layer's once
    per pass, the tied embedding as LM head; table lookups are free) plus causal attention, 6 T d per layer pass."""
    import train_gpt

    def linear(module):
        return sum(m.weight.numel() for m in module.modules() if isinstance(m, train_gpt.CastedLinear))
    order = model.looped if looping else model.plain
    outside = linear(model) - sum(linear(b) for b in model.blocks) + model.tok_emb.weight.numel()
    return 6 * (sum(linear(model.blocks[i]) for i in order) + outside) + 6 * len(order) * seq_len * model.tok_emb.weight.size(1)


def two_rank_check(cpu, work, report):
    """Two training steps of the small model on 2 ranks (torchrun; NCCL on GPUs): DDP, its all-reduces and the
    distributed evaluation run."""
    env = {**os.environ, **settings(cpu, work), **CPU_SIZE, "ITERATIONS": "2", "WARMUP_STEPS": "1", "RUN_ID": "gpu_check_2rank",
           "GPTQ_CALIB_BATCHES": "1", "OMP_NUM_THREADS": "1"}
    if cpu:  # the ranks import the stand-in too, after any flash_attn_interface already on PYTHONPATH
        env["PYTHONPATH"] = os.pathsep.join(p for p in (env.get("PYTHONPATH"), str(STANDIN)) if p)
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(ROOT / "train_gpt.py")], env=env, capture_output=True, text=True, timeout=480, cwd=str(work))
    log = (work / "logs" / "gpu_check_2rank.txt").read_text() if (work / "logs" / "gpu_check_2rank.txt").exists() else ""
    ok = proc.returncode == 0 and "world_size:2" in log and "summary: val_bpb:" in log
    report(f"check: 2-rank {'gloo' if cpu else 'NCCL'} run: {'ok' if ok else 'FAIL'} 2 steps, export and evaluation on 2 ranks "
           f"in {time.perf_counter() - t:.0f}s" + ("" if ok else f"; exit {proc.returncode}: {proc.stderr[-1500:]}"))


def ttt_check(run, model, cpu, diagnostic_rate, report):
    """One LoRA TTT batch of long documents (TTT_BATCH_DOCS of EVAL_SEQ_LEN to twice that, random tokens) timed with
    its compile, then the eval clock of the whole FineWeb validation set on 8 such devices, projected by the TTT
    planner (tools/ttt_plan.py) from the cost model this batch fitted: the run's own plan, budget rule and driver.
    At --cpu: 4 documents, uncompiled (tests/test_ttt_budget.py compiles the TTT graphs)."""
    import copy
    import torch
    import train_gpt
    import ttt_plan

    def lora_settings(phases):  # the run's settings with LoRA TTT, validated as a run's are
        return train_gpt.Hyperparameters({**os.environ, "TTT": "lora", "TTT_PHASES": phases})
    h = lora_settings(run.h.ttt_phases if run.h.ttt == "lora" else "")
    ttt_run = copy.copy(run)
    ttt_run.h, ttt_run.compile = lora_settings(""), run.compile and not cpu  # one batch: no phase to run
    docs, L = (4, h.eval_seq_len) if cpu else (h.ttt_batch_docs, h.eval_seq_len)
    lengths = [2 * L - (L * i) // docs for i in range(docs)]
    tokens = torch.randint(4, h.vocab_size, (sum(lengths) + 1,), generator=torch.Generator().manual_seed(0))
    tokens[torch.tensor([0] + lengths).cumsum(0)] = train_gpt.BOS_ID
    luts = (torch.ones(h.vocab_size, dtype=torch.int64), torch.zeros(h.vocab_size, dtype=torch.bool), torch.zeros(h.vocab_size, dtype=torch.bool))
    scorer = train_gpt.Scorer(tokens.to(run.device), tuple(t.to(run.device) for t in luts))
    t = time.perf_counter()
    train_fn, lora_fn, lora = train_gpt.compile_ttt(ttt_run, model)
    run.sync()
    compile_s, t = time.perf_counter() - t, time.perf_counter()
    budget = train_gpt.TTTBudget(1e9, t, sync=run.sync)
    stats = train_gpt.ttt_lora(ttt_run, model, lora_fn, train_fn, lora, scorer, budget)
    batch_s = time.perf_counter() - t
    passes = train_gpt.BatchShape(sorted(lengths, reverse=True), h).work(True)["token_pass"]
    ok = stats["adapted_batches"] == stats["batches"] == 1 and scorer.result()["tokens"] == sum(lengths)
    report(f"check: TTT batch: {'ok' if ok else 'FAIL'} {docs} documents of {L}-{2 * L} tokens adapted in {batch_s:.1f}s "
           f"({passes / batch_s:,.0f} token passes/s) after a {compile_s:.1f}s {'compile' if ttt_run.compile else 'build (uncompiled)'}; "
           f"cost factor vs the records' prior (TTT_PRIOR): {budget.cost.factors[0]:.2f}")
    costs = {k: v * budget.cost.factors[train_gpt.CostModel.GROUPS[k]] for k, v in train_gpt.TTT_PRIOR.items()}
    full = FINEWEB_VAL_TARGETS.get(h.vocab_size, FINEWEB_VAL_TARGETS[1024])
    before = compile_s + full / diagnostic_rate / 8  # the TTT compile and the diagnostic pass come first
    lengths, source = ttt_plan.fineweb_lengths_for(h)
    plan = ttt_plan.simulate(lengths, h, 8, before, prior=costs)
    fits = plan["eval_clock"] <= 600
    report(f"check: TTT projection: {'ok' if fits or cpu else 'FAIL'} on 8 such devices, {source}: eval clock "
           f"{plan['eval_clock']:.0f}s ({before:.0f}s before TTT: its compile, the diagnostic pass), "
           f"{100 * plan['adapted']:.1f}% of targets adapted, {plan['phases']}/{plan['phases_planned']} phases "
           f"(TTT_BUDGET_SECONDS={h.ttt_budget_seconds:.0f})" + ("" if fits else "; over 600s" + (" (a CPU)" if cpu else "")))


def run_check(cpu, work, report):
    import torch
    if cpu:
        try:
            import flash_attn_interface  # noqa: F401  one first on PYTHONPATH wins
        except ImportError:
            sys.path.insert(0, str(STANDIN))
    import train_gpt

    os.environ.update(settings(cpu, work))
    t = time.perf_counter()
    run = train_gpt.start_run()
    h = run.h
    report(f"device: {train_gpt.describe_hardware(run.device, 1)}; torch {torch.__version__}")
    kernel = re.search(r"^attention: (.*)$", Path(run.log.path).read_text(), re.M).group(1)
    fallback = os.environ.get("FA3", "1") != "0" and not kernel.startswith("fa3")
    report(f"check: attention kernel: {'FAIL fell back to' if fallback else 'ok'} {kernel}")
    if not cpu and not run.is_cuda:
        report("check: CUDA: FAIL torch.cuda.is_available() is False (use --cpu on a machine without a GPU)")
        return
    data = train_gpt.Data(run)

    t = time.perf_counter()
    trained, hessians, _ = train_gpt.train_to_export(run, data)  # the run's own phases: train, Hessians, pre-quant eval
    log = Path(run.log.path).read_text()
    times = step_times(log)
    first, last = min(times), max(times)
    ms = (times[last] - times[first]) / (last - first)
    tokens = h.train_batch_tokens
    report(f"check: compiled training (fullgraph, bf16 autocast, grad accumulation {h.batch_layout(1)[0]}): ok "
           f"{len(times)} steps after {WARMUP_STEPS} warm-up steps; training, Hessians and pre-quant evaluation "
           f"{time.perf_counter() - t:.1f}s incl. compile")
    loop_on = re.search(r"^loop:on step:(\d+)", log, re.M)
    switch = int(loop_on.group(1)) if loop_on else last
    phases = [(False, first, switch), (True, switch, last)] if h.loop else [(False, first, last)]
    if h.loop:
        report(f"check: depth-recurrence switch: {'ok' if loop_on else 'FAIL'} "
               + (f"on at step {switch}" if loop_on else "the loop never switched on"))
    report(f"check: step time: ok {ms:.1f} ms/step over steps {first}..{last} at {tokens} tokens/step = "
           f"{tokens / (ms / 1000):,.0f} tokens/s on 1 device")
    for looping, a, b in phases:  # the FLOPs each step does (the loop's extra passes included) against its time
        if b - a < 2:
            continue
        phase_ms = (times[b] - times[a]) / (b - a)
        flops = model_flops_per_token(trained.model, h.train_seq_len, looping) * tokens
        report(f"check: FLOPs vs step time, loop {'on' if looping else 'off'}: ok {flops / 1e9:,.1f} GFLOP/step = "
               f"{1000 * flops / H100_BF16_DENSE_FLOPS:.3g} ms at 989 TFLOP/s; measured {phase_ms:.1f} ms/step over steps "
               f"{a}..{b}" + ("" if cpu else f" = MFU {100 * flops / (phase_ms / 1000) / H100_BF16_DENSE_FLOPS:.1f}%"))
    if run.is_cuda:
        report(f"check: peak memory: ok {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB allocated, "
               f"{torch.cuda.max_memory_reserved() / 2**30:.1f} GiB reserved (of {torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB)")

    if h.doc_isolation:  # the kernel that runs (FA3 varlen or SDPA mask) against the SDPA mask, in every layer
        ids = data.val_tokens[:4 * h.train_seq_len].view(4, -1).to(run.device)
        docs = int(train_gpt.document_starts(ids, 1).numel()) - 1
        with torch.no_grad(), run.autocast:
            got = trained.model.forward_logits(ids).float()
            use_fa3, trained.model.use_fa3 = trained.model.use_fa3, False  # the one switch every layer reads
            ref = trained.model.forward_logits(ids).float()
            trained.model.use_fa3 = use_fa3
        diff = (got - ref).abs().max().item()
        report(f"check: document-isolated attention, {'FA3 varlen' if use_fa3 else 'SDPA mask'} vs SDPA mask: "
               f"{'ok' if diff < 0.1 else 'FAIL'} max |logit diff| {diff:.4f} over {docs} documents in 4 rows (bf16 kernels)")
    t = time.perf_counter()
    artifact = train_gpt.export(run, trained, hessians)
    total = artifact.stat().st_size + run.code_bytes
    ok = total <= h.artifact_cap_bytes
    report(f"check: export: {'ok' if ok else 'FAIL'} {time.perf_counter() - t:.1f}s (GPTQ of {len(hessians or {})} "
           f"Hessians + compression), {total} bytes incl. code (cap {h.artifact_cap_bytes})")

    results = train_gpt.evaluate_artifact(run, data, artifact)
    log = Path(run.log.path).read_text()
    tag = results["pass"]  # the final pass the settings choose: sliding windows or score-first TTT
    pass_ms = float(re.search(rf"^{tag} val_loss:\S+ val_bpb:\S+ eval_time:(\d+)ms", log, re.M).group(1))
    n_targets = data.val_tokens.numel() - 1
    rate = n_targets / (pass_ms / 1000)
    uncompiled = re.search(r"^ttt: compile failed", log, re.M)  # a line of the run, not of the source in its header
    report(f"check: evaluation: {'FAIL' if uncompiled else 'ok'} every target scored once; eval clock "
           f"{results['eval_ms'] / 1000:.1f}s incl. compile (artifact open to last score); {tag} (stride {h.eval_stride}): "
           f"{n_targets} targets in {pass_ms / 1000:.2f}s = {rate:,.0f} targets/s on 1 device"
           + ("; the TTT graphs did not compile and ran eagerly (see the log)" if uncompiled else ""))
    diagnostic_ms = float(re.search(r"^final_int6_zstd_roundtrip val_loss:\S+ val_bpb:\S+ eval_time:(\d+)ms", log, re.M).group(1))
    ttt_check(run, trained.model, cpu, n_targets / (diagnostic_ms / 1000), report)
    report(f"check: run log: {run.log.path}")
    if run.is_cuda and torch.cuda.device_count() >= 2:
        two_rank_check(cpu, work, report)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpu", action="store_true", help="run the same path at a small size on the CPU")
    parser.add_argument("--out", default=None, help="report file (default logs/gpu_check_<device>.txt)")
    args = parser.parse_args(argv)
    import torch

    device = "cpu" if args.cpu or not torch.cuda.is_available() else re.sub(r"\W+", "_", torch.cuda.get_device_name(0))
    out = Path(args.out or ROOT / "logs" / f"gpu_check_{device}.txt")
    lines, failed = [], False
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()

    def report(line):
        print(line, flush=True)
        lines.append(line)

    report(f"gpu_check {time.strftime('%Y-%m-%d %H:%M:%S')} commit {commit or '?'}: python3 tools/gpu_check.py"
           + (" --cpu" if args.cpu else ""))
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as work:
        try:
            run_check(args.cpu, Path(work), report)
        except Exception:  # noqa: BLE001  the report must say what broke
            report("check: FAIL\n" + traceback.format_exc())
        failed = any("FAIL" in line for line in lines)
        report(f"gpu_check: {'FAILED' if failed else 'all checks ok'} in {time.perf_counter() - t0:.0f}s")
        run_logs = sorted(Path(work, "logs").glob("*.txt"))
        body = run_logs[0].read_text() if run_logs else ""
        body = re.sub(r"={100}\n.*?\n={100}\n", "(source omitted: see the commit above)\n", body, count=1, flags=re.S)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n\n---- the run's log\n" + body)
    print(f"wrote {out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
