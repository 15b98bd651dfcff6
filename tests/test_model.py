"""Model tests: causality (with a leaky negative control), document isolation at BOS, bit-exact agreement of the
switched-off model with an independent OpenAI-baseline reference, switch parameter sets, parameter counts,
initialisation, XSA, partial RoPE, FA3 vs SDPA (CUDA only) and torch.compile(fullgraph=True) on CPU."""
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import TINY, make_h
import train_gpt

BOS = train_gpt.BOS_ID
HEAD_DIM = int(TINY["MODEL_DIM"]) // int(TINY["NUM_HEADS"])  # 16
L_TINY = int(TINY["NUM_LAYERS"])  # 4

# The OpenAI parameter-golf baseline architecture expressed in this script's switches.
BASELINE = dict(LN_SCALE=0, SKIP_GATES=0, XSA_LAST_N=0, SMEAR_GATE=0, BIGRAM_BUCKETS=0, ATTN_GATE=0, VE_DIM=0,
                ROPE_DIMS=HEAD_DIM, MLP_ACT="relu2", ORTHO_INIT=0, QK_GAIN_INIT=1.5, DOC_ISOLATION=0, LOOP_LAYERS="off",
                PARALLEL_START="off")

# Each switch turned on alone on top of the baseline: (id, overrides).
SWITCHES = [
    ("ln_scale", dict(LN_SCALE=1)),
    ("skip_gates", dict(SKIP_GATES=1)),
    ("xsa_all", dict(XSA_LAST_N=L_TINY)),
    ("smear_gate", dict(SMEAR_GATE=1)),
    ("bigram", dict(BIGRAM_BUCKETS=64)),
    ("attn_gate", dict(ATTN_GATE=1)),
    ("value_embed", dict(VE_DIM=16, VE_LAYERS="2,3")),
    ("partial_rope", dict(ROPE_DIMS=8)),
    ("leaky_relu2", dict(MLP_ACT="leaky_relu2")),
    ("doc_isolation", dict(DOC_ISOLATION=1)),
    ("loop", dict(LOOP_LAYERS="1-2", LOOP_REPEATS=2)),
    ("lanes", dict(PARALLEL_START=2)),
]


def baseline_h(**overrides):
    return make_h(**{**BASELINE, **overrides})


def randomize_(model, seed=0, scale=0.1):
    """Every parameter <- its value + scale*N(0,1), so zero-init gates/projections/lambdas cannot hide a leak."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
            assert (p != 0).all(), f"{name} still has zeros after randomisation"
    return model


def build(h, seed=0, randomized=True):
    torch.manual_seed(seed)
    model = train_gpt.build_model(h).float().eval()
    return randomize_(model, seed + 1) if randomized else model


def sample_ids(vocab, B=2, T=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, vocab, (B, T), generator=g)
    ids[1, 0] = BOS  # a packed stream that starts with BOS ...
    ids[:, 7] = BOS  # ... and document boundaries inside the window
    ids[0, 20] = BOS
    return ids


# ----------------------------------------------------------------------------------------------------
# 1. Causality.

CAUSAL_POSITIONS = (0, 1, 6, 7, 8, 16, 30, 31)


def causality_report(model, ids, vocab, positions=CAUSAL_POSITIONS, atol=1e-6):
    """(leaks, dead): positions t where changing ids[:, t] moved logits at some position < t by more than atol,
    and positions where it changed nothing at >= t. Each t is tried with a random other token and with BOS
    (or, where ids[:, t] is already BOS, a non-BOS token)."""
    leaks, dead = [], []
    g = torch.Generator().manual_seed(123)
    with torch.no_grad():
        base = model.forward_logits(ids)
        for t in positions:
            random_other = (ids[:, t] + torch.randint(1, vocab - 2, (ids.size(0),), generator=g)) % vocab
            random_other = torch.where(random_other == ids[:, t], (random_other + 1) % vocab, random_other)
            to_bos = torch.where(ids[:, t] == BOS, torch.full_like(ids[:, t], 5), torch.full_like(ids[:, t], BOS))
            for new in (random_other, to_bos):
                changed = ids.clone()
                changed[:, t] = new
                assert (changed != ids).any()
                out = model.forward_logits(changed)
                if t > 0:
                    diff = (out[:, :t] - base[:, :t]).abs().max().item()
                    if diff > atol:
                        leaks.append((t, diff))
                if torch.equal(out[:, t:], base[:, t:]):
                    dead.append(t)
    return leaks, dead


CAUSAL_CONFIGS = [
    pytest.param(dict(), id="default_stack"),
    pytest.param(dict(VE_DIM=16, VE_LAYERS="2,3"), id="default_stack_ve"),
    pytest.param(BASELINE, id="baseline"),
] + [pytest.param({**BASELINE, **over}, id=name) for name, over in SWITCHES]


@pytest.mark.parametrize("overrides", CAUSAL_CONFIGS)
def test_causality(overrides):
    h = make_h(**overrides)
    model = build(h)
    leaks, dead = causality_report(model, sample_ids(h.vocab_size), h.vocab_size)
    assert not leaks, f"future tokens change earlier logits: (t, max |diff|) = {leaks}"
    assert not dead, f"changing the token at t changed no logits at >= t for t in {dead}"


def _leaky_sdpa(original):
    def sdpa(*args, **kwargs):  # full attention: no causal flag, no document mask
        kwargs["is_causal"], kwargs["attn_mask"] = False, None
        return original(*args, **kwargs)
    return sdpa


def _leaky_smear(self, x, ids):  # reads the NEXT token instead of the previous one
    nxt = F.pad(x[:, 1:], (0, 0, 0, 1))
    gate = torch.sigmoid(x[..., :12] @ self.smear_w.to(x.dtype))[..., None]
    return x + self.smear_lambda.to(x.dtype) * gate * nxt


def _leaky_bigram(self, ids):  # hashes (next, current) instead of (prev, current)
    nxt = F.pad(ids[:, 1:], (0, 1))
    return torch.bitwise_xor(36313 * ids, 27191 * nxt) % (self.buckets - 1)


@pytest.mark.parametrize("leak", ["sdpa_not_causal", "smear_next_token", "bigram_next_token"])
def test_causality_check_detects_leaks(monkeypatch, leak):
    """Negative control: the same check must flag a deliberately leaky model."""
    if leak == "sdpa_not_causal":
        monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                            _leaky_sdpa(torch.nn.functional.scaled_dot_product_attention))
    elif leak == "smear_next_token":
        monkeypatch.setattr(train_gpt.SmearGate, "forward", _leaky_smear)
    else:
        monkeypatch.setattr(train_gpt.TableEmbedding, "bucket_ids", _leaky_bigram)
    h = make_h(FA3=0)
    model = build(h)
    leaks, _ = causality_report(model, sample_ids(h.vocab_size), h.vocab_size, positions=(1, 8, 31))
    assert leaks, f"the causality check did not detect the {leak} leak"


# ----------------------------------------------------------------------------------------------------
# 2. Document isolation at BOS.

def packed_stream():
    """[docA (6 tokens), BOS, docB (9), BOS, docC (...)] in one row, plus a second row starting with BOS."""
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(2, 1024, (2, 24), generator=g)
    ids[0, 6] = BOS
    ids[0, 16] = BOS
    ids[1, 0] = BOS
    ids[1, 11] = BOS
    return ids


def test_smear_gate_is_identity_at_bos():
    smear = train_gpt.SmearGate()
    with torch.no_grad():
        smear.smear_w.copy_(torch.randn(12))
        smear.smear_lambda.fill_(0.7)
    ids = packed_stream()
    x = torch.randn(*ids.shape, 32)
    with torch.no_grad():
        out = smear(x, ids)
    bos = ids == BOS
    assert torch.equal(out[bos], x[bos]), "SmearGate mixes the previous document into a BOS position"
    # control: everywhere else (except position 0, which has no previous token) the gate does mix
    mixing = ~bos
    mixing[:, 0] = False
    assert ((out - x).abs().amax(-1)[mixing] > 0).all()
    assert torch.equal(out[:, 0], x[:, 0])


def test_bigram_bucket_ids_at_sequence_start_and_bos():
    buckets = 64
    bigram = train_gpt.TableEmbedding(buckets, 8, 16, 0.02, 0.05, buckets)
    ids = packed_stream()
    got = bigram.bucket_ids(ids)
    starts = ids == BOS
    starts[:, 0] = True
    assert (got[starts] == buckets - 1).all()
    # everywhere else: the XOR hash of (prev, current), computed here in plain Python ints, never the start bucket
    for b in range(ids.size(0)):
        for t in range(ids.size(1)):
            if not starts[b, t]:
                cur, prev = int(ids[b, t]), int(ids[b, t - 1])
                assert int(got[b, t]) == ((36313 * cur) ^ (27191 * prev)) % (buckets - 1)
    # the bucket at a BOS position does not depend on the previous document's last token
    changed = ids.clone()
    changed[0, 5] = (changed[0, 5] + 17) % 1024
    changed[0, 15] = (changed[0, 15] + 3) % 1024
    new = bigram.bucket_ids(changed)
    assert new[0, 6] == got[0, 6] == buckets - 1 and new[0, 16] == got[0, 16] == buckets - 1
    assert new[0, 7] == got[0, 7]  # BOS -> first token of docB is unaffected too
    assert not torch.equal(new[0, 1:6], got[0, 1:6])  # control: inside a document the previous token matters


def _embedding_stage(model, ids):
    return model.smear(model.tok_emb(ids) + model.bigram(ids), ids)


def _captured_x0(model, ids):
    """x0 as the real forward computes it (the second argument of block 0)."""
    seen = {}

    def hook(module, args):
        seen["x0"] = args[1].clone()

    handle = model.blocks[0].register_forward_pre_hook(hook)
    try:
        model.forward_logits(ids)
    finally:
        handle.remove()
    return seen["x0"]


def test_full_model_embedding_stage_isolated_at_bos():
    h = make_h()
    model = build(h)
    ids = packed_stream()
    with torch.no_grad():
        emb, x0 = _embedding_stage(model, ids), _captured_x0(model, ids)
        for bos_pos in (6, 16):
            changed = ids.clone()
            changed[0, bos_pos - 1] = (changed[0, bos_pos - 1] + 101) % h.vocab_size
            emb2, x02 = _embedding_stage(model, changed), _captured_x0(model, changed)
            assert torch.equal(emb2[0, bos_pos], emb[0, bos_pos]), "embedding at BOS depends on the previous document"
            assert torch.equal(x02[0, bos_pos], x0[0, bos_pos]), "x0 at BOS depends on the previous document"
            # control: the changed token's own position does change
            assert not torch.equal(emb2[0, bos_pos - 1], emb[0, bos_pos - 1])
        # control: a non-BOS position does depend on its previous token (smear + bigram)
        changed = ids.clone()
        changed[0, 2] = (changed[0, 2] + 101) % h.vocab_size
        assert not torch.equal(_embedding_stage(model, changed)[0, 3], emb[0, 3])
        assert not torch.equal(_captured_x0(model, changed)[0, 3], x0[0, 3])


def document_spans(ids):
    """[(row, start, end)] of every document in a packed batch (a document starts at each BOS and each row start)."""
    spans = []
    for r in range(ids.size(0)):
        starts = sorted({0} | {int(t) for t in torch.nonzero(ids[r] == BOS).flatten()})
        spans += [(r, a, b) for a, b in zip(starts, starts[1:] + [ids.size(1)])]
    return spans


def cross_document_leaks(model, ids, vocab):
    """[(span, max |diff|)] where changing a (non-BOS) token inside one document moved a logit outside it."""
    leaks = []
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        base = model.forward_logits(ids)
        for r, a, b in document_spans(ids):
            for t in {a + 1, (a + b) // 2, b - 1} - {a} if b - a > 1 else set():
                changed = ids.clone()
                changed[r, t] = 2 + (int(ids[r, t]) - 2 + int(torch.randint(1, vocab - 3, (1,), generator=g))) % (vocab - 2)
                out = model.forward_logits(changed)
                outside = torch.ones(ids.shape, dtype=torch.bool)
                outside[r, a:b] = False
                diff = (out - base).abs().amax(-1)[outside].max().item()
                if diff > 1e-6:
                    leaks.append(((r, a, b, t), diff))
                assert (out[r, t:b] - base[r, t:b]).abs().max() > 0, "the change had no effect inside its own document"
    return leaks


@pytest.mark.parametrize("overrides", CAUSAL_CONFIGS)
def test_document_isolation(overrides):
    """With parameters randomised, changing any token of one document changes no logit of any other document in the
    same window, under every switch."""
    h = make_h(**{**overrides, "DOC_ISOLATION": 1})
    model = build(h)
    assert not cross_document_leaks(model, sample_ids(h.vocab_size), h.vocab_size)


def test_document_isolation_check_detects_leaks():
    """Negative control: without DOC_ISOLATION later documents attend to earlier ones."""
    model = build(make_h(DOC_ISOLATION=0))
    assert cross_document_leaks(model, sample_ids(1024), 1024)


def test_document_starts_are_exact_and_bucketed():
    """FA3's varlen starts are every document start (each BOS and row start) exactly, however many documents a row
    holds (here more than one per 64 tokens), padded with the total to a multiple of 64 entries; the static size
    (bucket=0) holds the same starts; SDPA's mask describes the same documents."""
    ids = sample_ids(1024, B=3, T=256)
    ids[0, 100:160:4] = BOS  # 15 more documents in row 0
    n, real = ids.numel(), [r * 256 + a for r, a, _ in document_spans(ids)]
    cu = train_gpt.document_starts(ids)
    assert cu.dtype == torch.int32 and cu.numel() % 64 == 0 and cu.numel() > len(real)
    assert cu.tolist() == real + [n] * (cu.numel() - len(real))
    static = train_gpt.document_starts(ids, 0)
    assert static.numel() == n + 1 and static.tolist() == real + [n] * (n + 1 - len(real))
    assert train_gpt.document_starts(torch.full((2, 64), 5)).tolist() == [0, 64] + [128] * 62  # rows never merge
    mask = train_gpt.document_mask(ids)[:, 0]
    for r, a, b in document_spans(ids):
        seg = mask[r, a:b]
        assert torch.equal(seg[:, a:b], torch.ones(b - a, b - a, dtype=torch.bool).tril())
        assert not seg[:, :a].any() and not seg[:, b:].any()


# ----------------------------------------------------------------------------------------------------
# 3. Independent reference of the OpenAI baseline; switch parameter sets; identity-at-init switches.

def ref_rms_norm(x):
    return F.rms_norm(x, (x.size(-1),))


def ref_rotary(x, T, base=10000.0):
    """Baseline Rotary + apply_rotary_emb on (B, H, T, D): full head dim, half-split."""
    dim = x.size(-1)
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    freqs = torch.outer(torch.arange(T, dtype=torch.float32), inv_freq)
    cos, sin = freqs.cos()[None, None, :, :], freqs.sin()[None, None, :, :]
    half = dim // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat((x1 * cos + x2 * sin, x1 * (-sin) + x2 * cos), dim=-1)


def ref_attention(sd, p, x, H, Hkv):
    B, T, D = x.shape
    hd = D // H
    q = F.linear(x, sd[p + "c_q.weight"]).reshape(B, T, H, hd).transpose(1, 2)
    k = F.linear(x, sd[p + "c_k.weight"]).reshape(B, T, Hkv, hd).transpose(1, 2)
    v = F.linear(x, sd[p + "c_v.weight"]).reshape(B, T, Hkv, hd).transpose(1, 2)
    q, k = ref_rms_norm(q), ref_rms_norm(k)
    q, k = ref_rotary(q, T), ref_rotary(k, T)
    q = q * sd[p + "q_gain"][None, :, None, None]
    y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=Hkv != H)
    y = y.transpose(1, 2).contiguous().reshape(B, T, D)
    return F.linear(y, sd[p + "proj.weight"])


def ref_mlp(sd, p, x):
    return F.linear(torch.relu(F.linear(x, sd[p + "fc.weight"])).square(), sd[p + "proj.weight"])


def ref_block(sd, i, x, x0, H, Hkv):
    p = f"blocks.{i}."
    mix = sd[p + "resid_mix"]
    x = mix[0][None, None, :] * x + mix[1][None, None, :] * x0
    x = x + sd[p + "attn_scale"][None, None, :] * ref_attention(sd, p + "attn.", ref_rms_norm(x), H, Hkv)
    return x + sd[p + "mlp_scale"][None, None, :] * ref_mlp(sd, p + "mlp.", ref_rms_norm(x))


def ref_baseline_logits(sd, ids, L, H, Hkv, softcap):
    """The OpenAI parameter-golf baseline GPT forward, from a state dict with the baseline's parameter names."""
    x = F.embedding(ids, sd["tok_emb.weight"])
    x = ref_rms_norm(x)
    x0 = x
    enc, dec = L // 2, L - L // 2
    skips = []
    for i in range(enc):
        x = ref_block(sd, i, x, x0, H, Hkv)
        skips.append(x)
    for i in range(dec):
        if skips:
            x = x + sd["skip_weights"][i][None, None, :] * skips.pop()
        x = ref_block(sd, enc + i, x, x0, H, Hkv)
    logits = F.linear(ref_rms_norm(x), sd["tok_emb.weight"])
    return softcap * torch.tanh(logits / softcap)


def baseline_keys(L):
    keys = {"tok_emb.weight", "skip_weights"}
    for i in range(L):
        keys |= {f"blocks.{i}.{k}" for k in ("attn.c_q.weight", "attn.c_k.weight", "attn.c_v.weight", "attn.proj.weight",
                                             "attn.q_gain", "mlp.fc.weight", "mlp.proj.weight", "attn_scale", "mlp_scale",
                                             "resid_mix")}
    return keys


@pytest.mark.parametrize("shape", [dict(), dict(NUM_LAYERS=5, NUM_KV_HEADS=4), dict(NUM_LAYERS=3, NUM_KV_HEADS=1, MLP_MULT=3)],
                         ids=["4L_gqa", "5L_mha", "3L_mqa"])
def test_baseline_config_matches_reference_bit_for_bit(shape):
    h = baseline_h(**shape)
    model = build(h, seed=3)
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    assert set(sd) == baseline_keys(h.num_layers), "baseline config must have exactly the baseline's parameters"
    ids = sample_ids(h.vocab_size, T=40)
    with torch.no_grad():
        got = model.forward_logits(ids)
        want = ref_baseline_logits(sd, ids, h.num_layers, h.num_heads, h.num_kv_heads, h.logit_softcap)
    # Same ops in the same order on the same fp32 data (RoPE's -x1*sin + x2*cos equals x2*cos - x1*sin exactly in
    # IEEE arithmetic), so the logits must agree bit for bit.
    assert torch.equal(got, want), f"max |diff| = {(got - want).abs().max().item():.3e}"
    # and the loss is the mean cross-entropy of those logits
    targets = torch.roll(ids, -1, 1)
    with torch.no_grad():
        assert torch.equal(model(ids, targets), F.cross_entropy(want.reshape(-1, want.size(-1)), targets.reshape(-1)))


def ref_full_logits(sd, ids, h):
    """Every switch written out from TECHNIQUES.md section 1 (independently of train_gpt's code)."""
    L, H, Hkv, d = h.num_layers, h.num_heads, h.num_kv_heads, h.model_dim
    hd, rd = d // H, h.rope_dims
    B, T = ids.shape
    x = F.embedding(ids, sd["tok_emb.weight"])
    if h.bigram_buckets:  # idx_t = (36313 x_t XOR 27191 x_{t-1}) mod (B-1); B-1 at sequence starts and BOS
        nb = h.bigram_buckets
        prev = torch.cat((torch.zeros_like(ids[:, :1]), ids[:, :-1]), 1)
        idx = ((36313 * ids) ^ (27191 * prev)) % (nb - 1)
        idx[:, 0] = nb - 1
        idx[ids == BOS] = nb - 1
        x = x + sd["bigram.scale"] * (F.embedding(idx, sd["bigram.table.weight"]) @ sd["bigram.proj.weight"].T)
    if h.smear_gate:  # x_t += lambda * sigmoid(w . x_t[:12]) * x_{t-1} * [id_t != BOS]
        prev = torch.cat((torch.zeros_like(x[:, :1]), x[:, :-1]), 1)
        gate = torch.sigmoid((x[..., :12] * sd["smear.smear_w"]).sum(-1, keepdim=True))
        x = x + sd["smear.smear_lambda"] * gate * prev * (ids != BOS)[..., None].float()
    x = x0 = ref_rms_norm(x)
    ve = sd["ve.scale"] * (F.embedding(ids, sd["ve.table.weight"]) @ sd["ve.proj.weight"].T) if h.ve_dim else None
    inv_freq = 1.0 / (h.rope_base ** (torch.arange(0, rd, 2, dtype=torch.float32) / max(rd, 1)))
    ang = torch.outer(torch.arange(T, dtype=torch.float32), inv_freq)
    cos, sin = ang.cos()[None, None], ang.sin()[None, None]

    def rope(t):  # half-split on the first rd dims
        r = rd // 2
        t1, t2, rest = t[..., :r], t[..., r:rd], t[..., rd:]
        return torch.cat((t1 * cos + t2 * sin, -t1 * sin + t2 * cos, rest), -1)

    def attention(l, xn):
        p = f"blocks.{l}.attn."
        q = (xn @ sd[p + "c_q.weight"].T).reshape(B, T, H, hd).transpose(1, 2)
        k = (xn @ sd[p + "c_k.weight"].T).reshape(B, T, Hkv, hd).transpose(1, 2)
        v = xn @ sd[p + "c_v.weight"].T
        if p + "ve_lambda" in sd:
            v = v + sd[p + "ve_lambda"] * ve
        v = v.reshape(B, T, Hkv, hd).transpose(1, 2)
        q, k = ref_rms_norm(q), ref_rms_norm(k)
        if rd:
            q, k = rope(q), rope(k)
        q = q * sd[p + "q_gain"][None, :, None, None]
        mask = torch.ones(T, T, dtype=torch.bool).tril()
        if h.doc_isolation:  # a token sees only earlier tokens of its own document (one starts at each BOS and row start)
            doc = torch.cumsum((ids == BOS) | (torch.arange(T) == 0), 1)
            mask = mask & (doc[:, :, None] == doc[:, None, :])
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None] if mask.dim() == 3 else mask,
                                           enable_gqa=Hkv != H)  # (B, H, T, hd)
        if l >= L - h.xsa_last_n:  # y_h -= (y_h . v_hat) v_hat with the head's own KV head's value at t
            vh = F.normalize(v.repeat_interleave(H // Hkv, dim=1), dim=-1)
            y = y - (y * vh).sum(-1, keepdim=True) * vh
        if h.attn_gate:  # sigmoid(0.5 * W x_t[:12]) per head, x = the attention's (normed) input
            g = torch.sigmoid(0.5 * (xn[..., :12] @ sd[p + "attn_gate"].T))  # (B, T, H)
            y = y * g.transpose(1, 2)[..., None]
        return y.transpose(1, 2).reshape(B, T, d) @ sd[p + "proj.weight"].T

    def mlp(l, xn):
        u = xn @ sd[f"blocks.{l}.mlp.fc.weight"].T
        u = torch.where(u > 0, u, 0.5 * u) if h.mlp_act == "leaky_relu2" else torch.clamp_min(u, 0)
        return u.square() @ sd[f"blocks.{l}.mlp.proj.weight"].T

    order = list(range(L))  # depth recurrence: [0..a-1] + [a..b] x (repeats+1) + [b+1..L-1], shared weights
    if h.loop:
        a, b = h.loop
        order = order[:a] + order[a:b + 1] * (h.loop_repeats + 1) + order[b + 1:]
    enc = len(order) // 2
    skips, lane_a, lane_m = [], None, None
    for pos, l in enumerate(order):
        j = pos - enc
        s = 1 / math.sqrt(l + 1) if h.ln_scale else 1.0
        mix = sd[f"blocks.{l}.resid_mix"]
        if 0 <= j < enc:  # skips go to x, or to lane A once the lanes have started
            skip = sd["skip_weights"][j] * skips.pop()
            target = x if lane_a is None else lane_a
            target = skip + torch.sigmoid(sd["skip_gates"][j]) * (target - skip) if h.skip_gates else target + skip
            x, lane_a = (target, None) if lane_a is None else (x, target)
        if j >= 0 and h.lanes_from is not None and l >= h.lanes_from:
            if lane_a is None:
                lane_a = lane_m = x
            attn_out = sd[f"blocks.{l}.attn_scale"] * attention(l, ref_rms_norm(mix[0] * lane_a + mix[1] * x0) * s)
            mlp_out = sd[f"blocks.{l}.mlp_scale"] * mlp(l, ref_rms_norm(lane_m) * s)
            r, p = sd[f"blocks.{l}.lane_resid"], sd[f"blocks.{l}.lane_post"]  # p[source][lane]
            lane_a, lane_m = (r[0] * lane_a + p[0, 0] * attn_out + p[1, 0] * mlp_out,
                              r[1] * lane_m + p[0, 1] * attn_out + p[1, 1] * mlp_out)
            continue
        x = mix[0] * x + mix[1] * x0
        x = x + sd[f"blocks.{l}.attn_scale"] * attention(l, ref_rms_norm(x) * s)
        x = x + sd[f"blocks.{l}.mlp_scale"] * mlp(l, ref_rms_norm(x) * s)
        if pos < enc:
            skips.append(x)
    if lane_a is not None:
        x = (lane_a + lane_m) / 2
    logits = ref_rms_norm(x) @ sd["tok_emb.weight"].T
    return h.logit_softcap * torch.tanh(logits / h.logit_softcap)


@pytest.mark.parametrize("overrides", CAUSAL_CONFIGS + [pytest.param(dict(NUM_LAYERS=5, XSA_LAST_N=2, VE_DIM=8, VE_LAYERS="0,4"),
                                                                     id="5L_xsa2_ve")])
def test_every_switch_matches_reference(overrides):
    h = make_h(**overrides)
    model = build(h, seed=4)
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    ids = sample_ids(h.vocab_size)
    with torch.no_grad():
        got, want = model.forward_logits(ids), ref_full_logits(sd, ids, h)
    # Not bit-exact: the reference writes gates, lerp, leaky-relu and XSA (repeat_interleave) in other op orders.
    diff = (got - want).abs().max().item()
    assert diff <= 1e-5, f"max |diff| = {diff:.3e}"


# (overrides, parameters the switch adds, logits equal to the baseline's at the switch's init)
SWITCH_EXTRAS = {
    "ln_scale": (set(), False),
    "skip_gates": ({"skip_gates"}, False),
    "xsa_all": (set(), False),
    "smear_gate": ({"smear.smear_w", "smear.smear_lambda"}, True),
    "bigram": ({"bigram.table.weight", "bigram.proj.weight", "bigram.scale"}, True),
    "attn_gate": ({f"blocks.{i}.attn.attn_gate" for i in range(L_TINY)}, False),
    "value_embed": ({"ve.table.weight", "ve.proj.weight", "ve.scale", "blocks.2.attn.ve_lambda", "blocks.3.attn.ve_lambda"}, True),
    "partial_rope": (set(), False),
    "leaky_relu2": (set(), False),
    "doc_isolation": (set(), False),
    "loop": (set(), False),  # no new tensor: the skips over the longer virtual order widen skip_weights instead
    "lanes": ({f"blocks.{i}.{k}" for i in (2, 3) for k in ("lane_resid", "lane_post")}, False),
}
MORE_SWITCHES = [("ortho_init", dict(ORTHO_INIT=1)), ("qk_gain_5", dict(QK_GAIN_INIT=5.0)), ("xsa_last_1", dict(XSA_LAST_N=1))]


@pytest.mark.parametrize("name,overrides", SWITCHES + MORE_SWITCHES, ids=[s[0] for s in SWITCHES + MORE_SWITCHES])
def test_switch_adds_only_its_parameters_and_identity_inits(name, overrides):
    extra, identity = SWITCH_EXTRAS.get(name, (set(), name in ("ortho_init", "qk_gain_5")))
    base_model = build(baseline_h(), seed=5)
    torch.manual_seed(11)
    model = train_gpt.build_model(baseline_h(**overrides)).float().eval()  # fresh: the switch's params at init
    base_sd, sd = base_model.state_dict(), model.state_dict()
    assert set(sd) - set(base_sd) == extra, f"{name} adds {sorted(set(sd) - set(base_sd))}, expected {sorted(extra)}"
    assert set(base_sd) <= set(sd), f"{name} removes {sorted(set(base_sd) - set(sd))}"
    if name == "loop":  # the longer virtual order has more U-Net skips: the baseline's are its first ones
        assert sd["skip_weights"].shape[0] > base_sd["skip_weights"].shape[0]
        base_sd = {**base_sd, "skip_weights": torch.cat((base_sd["skip_weights"], sd["skip_weights"][base_sd["skip_weights"].shape[0]:]))}
    for k in base_sd:
        assert sd[k].shape == base_sd[k].shape, k
    missing, unexpected = model.load_state_dict(base_sd, strict=False)
    assert set(missing) == extra and not unexpected
    ids = sample_ids(1024)
    with torch.no_grad():
        same = torch.equal(model.forward_logits(ids), base_model.forward_logits(ids))
    if identity:
        assert same, f"{name} at its init should reproduce the baseline's logits exactly"
    else:
        assert not same, f"{name} should change the function (it did nothing)"


# ----------------------------------------------------------------------------------------------------
# 4. Parameter counts (the README formula, implemented here independently).

def formula_params(h):
    d, L, H, Hkv, V = h.model_dim, h.num_layers, h.num_heads, h.num_kv_heads, h.vocab_size
    hd = d // H
    kv = Hkv * hd
    m = int(h.mlp_mult * d)
    virtual = L + (h.loop[1] - h.loop[0] + 1) * h.loop_repeats if h.loop else L
    S = max(L // 2, virtual // 2)  # U-Net skips over the longer (virtual) layer order
    total = V * d
    total += 6 * (L - h.lanes_from) if h.lanes_from is not None else 0  # lane_resid (2) + lane_post (2x2)
    total += L * (2 * d * d + 2 * d * kv + 2 * d * m + H + 4 * d)
    total += L * 12 * H * int(bool(h.attn_gate))
    total += S * d * (1 + int(bool(h.skip_gates)))
    if h.bigram_buckets > 0:
        total += h.bigram_buckets * h.bigram_dim + h.bigram_dim * d + 1
    total += 13 * int(bool(h.smear_gate))
    if h.ve_dim > 0:
        total += V * h.ve_dim + h.ve_dim * kv + 1 + len(h.ve_layers)
    return total


def count_params(h):
    with torch.device("meta"):  # structure only: no memory, no (slow) orthogonal init
        model = train_gpt.build_model(h)
    return sum(p.numel() for p in model.parameters())


def test_param_count_shipped_default():
    h = train_gpt.Hyperparameters({})
    assert (h.num_layers, h.model_dim, h.mlp_mult, h.vocab_size) == (11, 512, 4.0, 1024)
    got, want = count_params(h), formula_params(h)
    assert got == want == 32_812_187, f"default 11L/512/MLP4x stack: model {got:,} params, formula {want:,}"


def test_param_count_openai_baseline():
    """The 9-layer, MLP 2x baseline is the well-known 17,059,912-parameter model."""
    env = {k: str(v) for k, v in {**BASELINE, "ROPE_DIMS": 64, "NUM_LAYERS": 9, "MLP_MULT": 2}.items()}
    h = train_gpt.Hyperparameters(env)
    got, want = count_params(h), formula_params(h)
    assert got == want == 17_059_912, f"baseline: model {got:,} params, formula {want:,}"


@pytest.mark.parametrize("env", [
    dict(VE_DIM="128"),
    dict(VE_DIM="128", VE_LAYERS="0,5,9", MLP_MULT="3", NUM_LAYERS="10", XSA_LAST_N="4"),
    dict(NUM_KV_HEADS="8", ATTN_GATE="0", SKIP_GATES="0", BIGRAM_BUCKETS="0", SMEAR_GATE="0"),
], ids=["ve128", "10L_mlp3_ve3", "mha_switches_off"])
def test_param_count_full_size_variants(env):
    h = train_gpt.Hyperparameters(env)
    got, want = count_params(h), formula_params(h)
    assert got == want, f"{env}: model {got:,} params, formula {want:,}"


@pytest.mark.parametrize("overrides", [
    dict(), BASELINE, dict(VE_DIM=16, VE_LAYERS="0,3"), dict(NUM_LAYERS=5, MLP_MULT=3, NUM_KV_HEADS=1),
    dict(NUM_LAYERS=1, XSA_LAST_N=1), dict(MLP_MULT=2.3), dict(NUM_KV_HEADS=4, BIGRAM_BUCKETS=2, BIGRAM_DIM=3),
] + [{**BASELINE, **over} for _, over in SWITCHES], ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "tiny_default")
def test_param_count_tiny_variants(overrides):
    h = make_h(**overrides)
    got, want = count_params(h), formula_params(h)
    assert got == want, f"{overrides}: model {got:,} params, formula {want:,}"


# ----------------------------------------------------------------------------------------------------
# 5. Initialisation.

def _orthogonality_error(w):
    w = w.double()
    g = w @ w.T if w.size(0) <= w.size(1) else w.T @ w
    return (g - torch.eye(g.size(0), dtype=g.dtype)).abs().max().item()


ZERO_INIT = ("attn.proj", "mlp.proj", "bigram.proj", "ve.proj")


@pytest.mark.parametrize("ortho", [1, 0])
@pytest.mark.parametrize("kv_heads", [2, 1])
def test_linear_init(ortho, kv_heads):
    h = make_h(MODEL_DIM=128, NUM_HEADS=4, NUM_KV_HEADS=kv_heads, MLP_MULT=2, VE_DIM=16, VE_LAYERS="2,3",
               ORTHO_INIT=ortho, ATTN_GATE=1, SMEAR_GATE=1)
    torch.manual_seed(0)
    model = train_gpt.build_model(h)
    seen_ortho = seen_small = 0
    for name, mod in model.named_modules():
        if not isinstance(mod, train_gpt.CastedLinear):
            continue
        w = mod.weight.detach()
        if name.endswith(ZERO_INIT):
            assert mod.zero_init and torch.count_nonzero(w) == 0, f"{name} must be zero-initialised"
            continue
        assert not mod.zero_init, name
        err = _orthogonality_error(w)
        if ortho and min(w.shape) >= 64:
            assert err < 1e-5, f"{name} {tuple(w.shape)} should be orthogonal (max |WW^T - I| = {err:.2e})"
            seen_ortho += 1
        else:
            assert err > 0.1, f"{name} {tuple(w.shape)} should keep the PyTorch default init, looks orthogonal"
            seen_small += min(w.shape) < 64
    if ortho:
        # c_q (128x128), fc (256x128 tall) and, with 2 KV heads, c_k/c_v (64x128 wide) in every layer
        assert seen_ortho == h.num_layers * (2 + 2 * (kv_heads == 2))
    if kv_heads == 1:
        assert seen_small == 2 * h.num_layers  # c_k, c_v are 32x128: below the threshold


@pytest.mark.parametrize("std", [0.005, 0.02])
def test_embedding_and_control_init(std):
    h = make_h(MODEL_DIM=128, TIED_EMBED_INIT_STD=std, QK_GAIN_INIT=2.75, LN_SCALE=1, VE_DIM=16, VE_LAYERS="1,3",
               ATTN_GATE=1, SMEAR_GATE=1, SKIP_GATES=1)
    torch.manual_seed(0)
    model = train_gpt.build_model(h)
    emb = model.tok_emb.weight.detach()
    assert abs(emb.std().item() / std - 1) < 0.03 and abs(emb.mean().item()) < std * 0.02
    for i, block in enumerate(model.blocks):
        assert torch.equal(block.attn.q_gain.detach(), torch.full((h.num_heads,), 2.75))
        assert torch.equal(block.resid_mix.detach(), torch.stack((torch.ones(128), torch.zeros(128))))
        assert torch.equal(block.attn_scale.detach(), torch.ones(128)) and torch.equal(block.mlp_scale.detach(), torch.ones(128))
        assert torch.count_nonzero(block.attn.attn_gate) == 0
        assert (block.attn.ve_lambda is not None) == (i in (1, 3))
        if block.attn.ve_lambda is not None:
            assert block.attn.ve_lambda.item() == 1.0
    assert torch.equal(model.skip_weights.detach(), torch.ones(len(model.looped) // 2, 128))  # skips over the virtual order
    lanes = [b for b in model.blocks if hasattr(b, "lane_resid")]
    assert len(lanes) == h.num_layers - h.lanes_from > 0
    assert all(torch.equal(b.lane_resid.detach(), torch.full((2,), 1.1)) and torch.equal(b.lane_post.detach(), torch.ones(2, 2))
               for b in lanes)
    assert torch.count_nonzero(model.skip_gates) == 0
    assert torch.count_nonzero(model.smear.smear_w) == 0 and model.smear.smear_lambda.item() == 0
    assert model.bigram.scale.item() == pytest.approx(0.05) and model.ve.scale.item() == pytest.approx(0.1)
    assert abs(model.bigram.table.weight.std().item() / 0.02 - 1) < 0.1
    assert abs(model.ve.table.weight.std().item() / 0.01 - 1) < 0.05


def test_ln_scale_factors():
    on, off = train_gpt.build_model(make_h(LN_SCALE=1)), train_gpt.build_model(make_h(LN_SCALE=0))
    x = torch.randn(2, 5, 64)
    for l, (b_on, b_off) in enumerate(zip(on.blocks, off.blocks)):
        assert b_on.ln_scale == pytest.approx(1 / math.sqrt(l + 1), abs=0, rel=1e-15) and b_off.ln_scale is None
        assert torch.allclose(b_on.norm(x), F.rms_norm(x, (64,)) / math.sqrt(l + 1), atol=1e-6, rtol=0)
        assert torch.equal(b_off.norm(x), F.rms_norm(x, (64,)))


def test_mlp_activations():
    x = torch.randn(3, 7, 64)
    for act in ("relu2", "leaky_relu2"):
        mlp = train_gpt.MLP(make_h(MLP_ACT=act))
        with torch.no_grad():
            mlp.proj.weight.normal_()
            hid = x @ mlp.fc.weight.T
            hid = torch.where(hid >= 0, hid, 0.5 * hid if act == "leaky_relu2" else torch.zeros_like(hid))
            want = hid.square() @ mlp.proj.weight.T
            assert torch.allclose(mlp(x), want, atol=1e-5, rtol=1e-5), act


# ----------------------------------------------------------------------------------------------------
# 6. XSA.

@pytest.mark.parametrize("kv_heads", [1, 2, 4, 8])
def test_xsa_orthogonal_to_own_value_and_matches_repeat_interleave(kv_heads):
    torch.manual_seed(0)
    B, T, H, D = 2, 5, 8, 16
    y, v = torch.randn(B, T, H, D), torch.randn(B, T, kv_heads, D)
    out = train_gpt.exclusive_self_attention(y, v)
    v_rep = v.repeat_interleave(H // kv_heads, dim=2)  # SDPA enable_gqa: query head h reads KV head h // (H/Hkv)
    vn = F.normalize(v_rep, dim=-1)
    dots = (out * vn).sum(-1)
    assert dots.abs().max() < 1e-5, f"XSA output keeps a component along its own value: {dots.abs().max():.2e}"
    want = y - (y * vn).sum(-1, keepdim=True) * vn
    assert (out - want).abs().max() <= 1e-6
    assert (out - y).abs().max() > 0.1  # it did remove something


def test_xsa_head_grouping_matches_sdpa_gqa():
    """At t = 0 causal attention returns the token's own value, so XSA must zero it, for every head; this only
    holds if XSA groups query heads onto KV heads the same way SDPA's enable_gqa does."""
    torch.manual_seed(0)
    B, T, H, Hkv, D = 2, 6, 8, 2, 16
    q, k, v = torch.randn(B, T, H, D), torch.randn(B, T, Hkv, D), torch.randn(B, T, Hkv, D)
    y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True,
                                       enable_gqa=True).transpose(1, 2)
    out = train_gpt.exclusive_self_attention(y, v)
    assert out[:, 0].abs().max() < 1e-5
    assert out[:, 1:].abs().max() > 0.1


# ----------------------------------------------------------------------------------------------------
# 7. Partial RoPE.

def rope_tables(rope_dims, T, base=10000.0, head_dim=HEAD_DIM):
    attn = train_gpt.CausalSelfAttention(make_h(ROPE_DIMS=rope_dims, ROPE_BASE=base), 0)
    want = 1.0 / base ** (torch.arange(0, rope_dims, 2, dtype=torch.float64) / rope_dims)
    assert torch.allclose(attn.inv_freq.double(), want, rtol=1e-6, atol=0)
    freqs = torch.outer(torch.arange(T, dtype=torch.float32), attn.inv_freq)[:, None, :]
    return freqs.cos(), freqs.sin()


@pytest.mark.parametrize("rope_dims", [2, 8, HEAD_DIM])
def test_partial_rope_untouched_dims_and_norm(rope_dims):
    T = 32
    cos, sin = rope_tables(rope_dims, T)
    x = torch.randn(2, T, 4, HEAD_DIM)
    out = train_gpt.apply_rope(x, cos, sin)
    assert torch.equal(out[..., rope_dims:], x[..., rope_dims:]), "dims >= ROPE_DIMS must pass through"
    assert torch.allclose(out[..., :rope_dims].norm(dim=-1), x[..., :rope_dims].norm(dim=-1), rtol=1e-5, atol=0)
    assert torch.equal(out[:, 0], x[:, 0])  # position 0 is not rotated
    # half-split pairs (x_i, x_{i+r/2}) rotated by -pos*inv_freq_i, written as complex multiplication
    half = rope_dims // 2
    z = torch.complex(x[..., :half].double(), x[..., half:rope_dims].double())
    theta = torch.complex(cos.double(), -sin.double())
    zr = z * theta
    assert torch.allclose(out[..., :half].double(), zr.real, atol=1e-5)
    assert torch.allclose(out[..., half:rope_dims].double(), zr.imag, atol=1e-5)


@pytest.mark.parametrize("rope_dims", [8, HEAD_DIM])
def test_rope_relative_position(rope_dims):
    T = 48
    cos, sin = rope_tables(rope_dims, T)
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(HEAD_DIM, generator=g), torch.randn(HEAD_DIM, generator=g)
    rq = train_gpt.apply_rope(q.expand(1, T, 1, HEAD_DIM), cos, sin)[0, :, 0]
    rk = train_gpt.apply_rope(k.expand(1, T, 1, HEAD_DIM), cos, sin)[0, :, 0]
    scores = rq @ rk.T  # scores[i, j] = <rope(q, i), rope(k, j)>
    for s in (1, 5, 17):
        assert torch.allclose(scores[s:, s:], scores[:-s, :-s], atol=1e-4, rtol=0), f"depends on more than i-j (shift {s})"
    diag = torch.stack([torch.diagonal(scores, o)[0] for o in range(-10, 11)])
    assert diag.max() - diag.min() > 1e-2  # control: the score does vary with i-j


# ----------------------------------------------------------------------------------------------------
# 8. FlashAttention 3 vs SDPA (CUDA only).

def test_fa3_matches_sdpa():
    if train_gpt.fa3_attention is None:
        pytest.skip("flash_attn_interface (FA3) is not importable here; train_gpt.fa3_attention is None")
    if not torch.cuda.is_available():
        pytest.skip("FA3 needs a CUDA (Hopper) GPU")
    torch.manual_seed(0)
    B, T, H, Hkv, D = 2, 256, 8, 4, 64
    q = torch.randn(B, T, H, D, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(B, T, Hkv, D, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(B, T, Hkv, D, device="cuda", dtype=torch.bfloat16)
    y = train_gpt.fa3_attention(q, k, v, causal=True)
    y = y[0] if isinstance(y, tuple) else y
    ref = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True,
                                         enable_gqa=True).transpose(1, 2)
    assert (y.float() - ref.float()).abs().max() < 2e-2
    # documents: FA3's varlen kernel and SDPA's mask (KV heads repeated) give the same attention
    ids = sample_ids(1024, B=B, T=T).cuda()
    y = train_gpt.attention_kernel(ids, True, True, train_gpt.document_starts(ids))(q, k, v)
    ref = train_gpt.attention_kernel(ids, False, True)(q, k, v)
    assert (y.float() - ref.float()).abs().max() < 2e-2


# ----------------------------------------------------------------------------------------------------
# 9. torch.compile(fullgraph=True) on CPU.

def _skip_if_no_cxx(exc):
    from torch._inductor import exc as ind_exc
    e = exc
    while e is not None:
        if isinstance(e, ind_exc.InvalidCxxCompiler):
            pytest.skip(f"inductor C++ compiler unavailable: {e}")
        if isinstance(e, ind_exc.CppCompileError) and "No such file or directory" in str(e):
            pytest.skip(f"inductor C++ toolchain incomplete: {str(e)[:300]}")
        e = e.__cause__ or e.__context__
    raise exc


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:.*torch.jit.script_method.*:DeprecationWarning")
def test_torch_compile_fullgraph_cpu():
    import torch._dynamo
    h = make_h(NUM_LAYERS=2, MODEL_DIM=32, NUM_HEADS=4, NUM_KV_HEADS=2, ROPE_DIMS=4, XSA_LAST_N=2, VOCAB_SIZE=128,
               BIGRAM_BUCKETS=32, BIGRAM_DIM=8)
    model = build(h, seed=2).train()
    ids = sample_ids(128, B=2, T=24)
    targets = torch.roll(ids, -1, 1)
    torch._dynamo.reset()
    try:
        logits_fn = torch.compile(model.forward_logits, fullgraph=True, dynamic=False)
        with torch.no_grad():
            got = logits_fn(ids)
        compiled = torch.compile(model, fullgraph=True, dynamic=False)
        loss = compiled(ids, targets)
        loss.backward()
    except torch._dynamo.exc.BackendCompilerFailed as e:
        _skip_if_no_cxx(e)
    finally:
        torch._dynamo.reset()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        want = model.forward_logits(ids)
    assert (got - want).abs().max() <= 1e-4
    model.zero_grad()
    eager_loss = model(ids, targets)
    eager_loss.backward()
    assert abs(loss.item() - eager_loss.item()) <= 1e-4
    for n, p in model.named_parameters():
        assert torch.isfinite(grads[n]).all(), n
        assert torch.allclose(grads[n], p.grad, atol=1e-4, rtol=1e-3), f"compiled grad of {n} differs"
