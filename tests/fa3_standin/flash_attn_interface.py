"""A CPU stand-in for FlashAttention 3's `flash_attn_interface` (the Hopper build), so the suite runs every FA3 call
site of train_gpt.py (FA3=force): the real public signatures of `flash_attn_func` and `flash_attn_varlen_func`,
torch custom ops with fake (meta) and autograd registrations as the real build has, so torch.compile(fullgraph=True)
traces them, the input checks of the real kernels (hopper/flash_api.cpp: fp16/bf16 only, one dtype, contiguous last
dim, head_dim a multiple of 8 and at most 256, heads a multiple of the KV heads, int32 cu_seqlens of batch+1
entries), plus what the kernels silently assume (cu_seqlens from 0 to the total, non-decreasing, max_seqlen at least
the longest sequence), and reference attention in fp32 (causal aligned bottom-right as FA3's, GQA).

Put this folder first on PYTHONPATH. FA3_STANDIN_COUNTS=<path>: at exit, write how often each entry point ran."""
from __future__ import annotations

import atexit
import json
import os
from collections import Counter

import torch

CALLS = Counter()
if os.environ.get("FA3_STANDIN_COUNTS"):
    atexit.register(lambda: open(os.environ["FA3_STANDIN_COUNTS"], "w").write(json.dumps(CALLS)))


def _check(q, k, v, cu_seqlens_q=None, cu_seqlens_k=None):
    """The real kernels' argument checks (TORCH_CHECK in hopper/flash_api.cpp)."""
    if q.dtype not in (torch.float16, torch.bfloat16):
        raise RuntimeError("FlashAttention only support fp16, bf16, and fp8_e4m3 data type")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise RuntimeError("query and key/value must have the same dtype")
    if any(t.stride(-1) != 1 for t in (q, k, v)):
        raise RuntimeError("Input tensor must have contiguous last dimension")
    head_dim, heads, kv_heads = q.size(-1), q.size(-2), k.size(-2)
    if head_dim > 256 or head_dim % 8:
        raise RuntimeError(f"head_size must be a multiple of 8 and at most 256; got {head_dim}")
    if heads % kv_heads or v.size(-2) != kv_heads:
        raise RuntimeError("Number of heads in key/value must divide number of heads in query")
    for cu in (cu_seqlens_q, cu_seqlens_k):
        if cu is not None and (cu.dtype != torch.int32 or cu.dim() != 1 or not cu.is_contiguous()):
            raise RuntimeError("cu_seqlens must be a contiguous 1-D tensor of dtype torch.int32")
    if cu_seqlens_q is not None and cu_seqlens_q.shape != cu_seqlens_k.shape:
        raise RuntimeError("cu_seqlens_q and cu_seqlens_k must have shape (batch_size + 1)")


def _check_lengths(cu, total, max_seqlen):
    """What the varlen kernels assume of cu_seqlens without checking (a violation reads out of bounds or drops rows)."""
    lengths = cu[1:] - cu[:-1]
    if int(cu[0]) != 0 or int(cu[-1]) != total:
        raise RuntimeError(f"cu_seqlens must run from 0 to the total {total}; got {int(cu[0])}..{int(cu[-1])}")
    if bool((lengths < 0).any()):
        raise RuntimeError("cu_seqlens must be non-decreasing")
    if lengths.numel() and int(lengths.max()) > max_seqlen:
        raise RuntimeError(f"max_seqlen {max_seqlen} is below the longest sequence {int(lengths.max())}")


def _sequences(cu_q, cu_k):
    """(q rows, k rows) slices of each non-empty sequence of a packed batch."""
    bounds = zip(cu_q.tolist(), cu_q[1:].tolist(), cu_k.tolist(), cu_k[1:].tolist())
    return [(slice(a, b), slice(c, d)) for a, b, c, d in bounds if b > a and d > c]


def _probs(q, k, scale, causal):
    """fp32 softmax probabilities (H, len_q, len_k) of one sequence, GQA heads expanded, and the row lse."""
    scores = torch.einsum("qhd,khd->hqk", q.float(), _expand(k, q)) * scale
    allowed = torch.ones(q.size(0), k.size(0), dtype=torch.bool, device=q.device)
    if causal:  # bottom-right aligned: query i sees keys up to i + len_k - len_q
        allowed = allowed.tril(k.size(0) - q.size(0))
    lse = torch.logsumexp(scores.masked_fill(~allowed, float("-inf")), -1)
    return torch.exp(scores - lse[..., None]).masked_fill(~allowed, 0.0), lse  # a row with no key gives zeros, as FA3


def _expand(kv, q):
    return kv.float().repeat_interleave(q.size(1) // kv.size(1), 1)


@torch.library.custom_op("fa3_standin::fwd", mutates_args=())
def _fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_q: torch.Tensor, cu_k: torch.Tensor,
         max_q: int, max_k: int, scale: float, causal: bool, entry: str) -> tuple[torch.Tensor, torch.Tensor]:
    CALLS[entry] += 1  # counted here, where it runs (inside a compiled graph the Python wrapper ran once, at trace time)
    _check_lengths(cu_q, q.size(0), max_q)
    _check_lengths(cu_k, k.size(0), max_k)
    out = q.new_zeros(q.shape)
    lse = torch.full((q.size(1), q.size(0)), float("-inf"), device=q.device)
    for rq, rk in _sequences(cu_q, cu_k):  # sequence by sequence: the reference never builds a cross-sequence matrix
        probs, lse[:, rq] = _probs(q[rq], k[rk], scale, causal)
        out[rq] = torch.einsum("hqk,khd->qhd", probs, _expand(v[rk], q)).to(q.dtype)
    return out, lse


@_fwd.register_fake
def _(q, k, v, cu_q, cu_k, max_q, max_k, scale, causal, entry):
    return q.new_empty(q.shape), q.new_empty((q.size(1), q.size(0)), dtype=torch.float32)


@torch.library.custom_op("fa3_standin::bwd", mutates_args=())
def _bwd(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_q: torch.Tensor, cu_k: torch.Tensor,
         scale: float, causal: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The attention backward in closed form, fp32, sequence by sequence (autograd does not run inside a kernel)."""
    dq, dk, dv = (torch.zeros(t.shape, device=t.device) for t in (q, k, v))
    group = q.size(1) // k.size(1)
    fold = lambda g: g.view(g.size(0), k.size(1), group, g.size(-1)).sum(2)  # GQA: sum over a KV head's query heads
    for rq, rk in _sequences(cu_q, cu_k):
        probs, _ = _probs(q[rq], k[rk], scale, causal)
        do = dout[rq].float()
        dv[rk] = fold(torch.einsum("hqk,qhd->khd", probs, do))
        dp = torch.einsum("qhd,khd->hqk", do, _expand(v[rk], q))
        ds = probs * (dp - (dp * probs).sum(-1, keepdim=True)) * scale
        dq[rq] = torch.einsum("hqk,khd->qhd", ds, _expand(k[rk], q))
        dk[rk] = fold(torch.einsum("hqk,qhd->khd", ds, q[rq].float()))
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


@_bwd.register_fake
def _(dout, q, k, v, cu_q, cu_k, scale, causal):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup(ctx, inputs, output):
    q, k, v, cu_q, cu_k, _, _, scale, causal, _ = inputs
    ctx.save_for_backward(q, k, v, cu_q, cu_k)
    ctx.scale, ctx.causal = scale, causal


def _backward(ctx, dout, dlse):
    q, k, v, cu_q, cu_k = ctx.saved_tensors
    return (*_bwd(dout, q, k, v, cu_q, cu_k, ctx.scale, ctx.causal), None, None, None, None, None, None, None)


_fwd.register_autograd(_backward, setup_context=_setup)


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, seqused_q=None,
                           seqused_k=None, softmax_scale=None, causal=False, qv=None, q_descale=None, k_descale=None,
                           v_descale=None, window_size=(-1, -1), attention_chunk=0, softcap=0.0, num_splits=1,
                           pack_gqa=None, deterministic=False, sm_margin=0, return_attn_probs=False):
    """q (total_q, H, D), k and v (total_k, H_kv, D); sequence i is rows cu_seqlens[i]:cu_seqlens[i+1]."""
    if seqused_q is not None or seqused_k is not None or qv is not None or window_size != (-1, -1) or softcap:
        raise NotImplementedError("the stand-in implements plain (causal) varlen attention only")
    _check(q, k, v, cu_seqlens_q, cu_seqlens_k)
    scale = q.size(-1) ** -0.5 if softmax_scale is None else softmax_scale
    out, lse = _fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, causal,
                   "flash_attn_varlen_func")
    return (out, lse) if return_attn_probs else out


def flash_attn_func(q, k, v, softmax_scale=None, causal=False, qv=None, q_descale=None, k_descale=None, v_descale=None,
                    window_size=(-1, -1), attention_chunk=0, softcap=0.0, num_splits=1, pack_gqa=None,
                    deterministic=False, sm_margin=0, return_attn_probs=False):
    """q (B, T_q, H, D), k and v (B, T_k, H_kv, D): the varlen op on B sequences of equal length."""
    if qv is not None or window_size != (-1, -1) or softcap:
        raise NotImplementedError("the stand-in implements plain (causal) attention only")
    _check(q, k, v)
    (B, Tq), Tk = q.shape[:2], k.size(1)
    scale = q.size(-1) ** -0.5 if softmax_scale is None else softmax_scale
    cu_q = torch.arange(0, (B + 1) * Tq, Tq, dtype=torch.int32, device=q.device)
    cu_k = torch.arange(0, (B + 1) * Tk, Tk, dtype=torch.int32, device=q.device)
    out, lse = _fwd(q.reshape(B * Tq, *q.shape[2:]), k.reshape(B * Tk, *k.shape[2:]), v.reshape(B * Tk, *v.shape[2:]),
                    cu_q, cu_k, Tq, Tk, scale, causal, "flash_attn_func")
    out = out.view(q.shape)
    return (out, lse.view(q.size(2), B, Tq).transpose(0, 1)) if return_attn_probs else out
