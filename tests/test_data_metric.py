"""Data pipeline, exact val_bpb accounting, sliding-window evaluation, settings validation and import hygiene
of train_gpt.py (RULES.md sections 6-8). CPU only, small tensors; the smoke dataset is shared via conftest."""
import io
import json
import math
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm
import torch

import smoke_data
import train_gpt
from conftest import DOCS_TINY, DOCS_TOKENIZER, ROOT, TINY, make_h

DataError, ConfigError = train_gpt.DataError, train_gpt.ConfigError
BOS = train_gpt.BOS_ID
README = ROOT / "README.md"


# ----------------------------------------------------------------------------------------------------
# helpers


def write_bytes(path, header_ints, body=b""):
    header = np.zeros(256, dtype="<i4")
    header[: len(header_ints)] = header_ints
    Path(path).write_bytes(header.tobytes() + body)
    return str(path)


def split_documents(tokens):
    """Documents of a [BOS]+ids stream, as lists of ids without their BOS."""
    tokens = [int(t) for t in tokens]
    assert tokens and tokens[0] == BOS
    docs, cur = [], None
    for t in tokens:
        if t == BOS:
            if cur is not None:
                docs.append(cur)
            cur = []
        else:
            cur.append(t)
    docs.append(cur)
    return docs


def lut_bytes_of_ids(luts, ids):
    """Bytes the look-up tables give the targets of [BOS] + ids."""
    seq = torch.tensor([BOS] + list(ids), dtype=torch.int64)
    return int(train_gpt.target_bytes(luts, seq[:-1], seq[1:]).sum())


def decoded_bytes(sp, ids):
    return len(sp.decode(list(ids)).encode("utf-8"))


def docs_val_tokens():
    if not (DOCS_TOKENIZER.exists() and (DOCS_TINY / "fineweb_val_000000.bin").exists()):
        pytest.skip("shared docs data (../shared/data) is absent")
    return train_gpt.read_shard(DOCS_TINY / "fineweb_val_000000.bin")


# ----------------------------------------------------------------------------------------------------
# 1. shards, shard discovery, tokenizer path, validation tokens


@pytest.mark.parametrize("tokens", [[], [0], [65535], [1, 2, 3, 65535, 0, 1024, 40000], list(range(0, 65536, 7))])
def test_shard_round_trip(tmp_path, tokens):
    path = tmp_path / "fineweb_train_000000.bin"
    smoke_data.write_shard(path, np.array(tokens, dtype=np.int64))
    assert path.stat().st_size == 1024 + 2 * len(tokens)
    got = train_gpt.read_shard(path)
    assert got.dtype == np.uint16
    assert got.tolist() == list(tokens)


def _malformed_cases(tmp_path):
    good = np.arange(10, dtype="<u2").tobytes()
    magic, version = train_gpt.SHARD_MAGIC, train_gpt.SHARD_VERSION
    return {
        "empty_file": (lambda p: p.write_bytes(b""), "shorter"),
        "short_header": (lambda p: p.write_bytes(b"\x00" * 1023), "shorter"),
        "bad_magic": (lambda p: write_bytes(p, [magic + 1, version, 10], good), "magic"),
        "bad_version": (lambda p: write_bytes(p, [magic, 2, 10], good), "version"),
        "truncated_body": (lambda p: write_bytes(p, [magic, version, 10], good[:-2]), "truncated"),
        "odd_truncated_body": (lambda p: write_bytes(p, [magic, version, 10], good[:-1]), "truncated"),
        "extra_bytes": (lambda p: write_bytes(p, [magic, version, 10], good + b"\x00\x00"), "truncated"),
        "header_only_promises_tokens": (lambda p: write_bytes(p, [magic, version, 1]), "truncated"),
        "negative_count": (lambda p: write_bytes(p, [magic, version, -1], good), "truncated"),
    }


@pytest.mark.parametrize("case", ["empty_file", "short_header", "bad_magic", "bad_version", "truncated_body",
                                  "odd_truncated_body", "extra_bytes", "header_only_promises_tokens", "negative_count"])
def test_read_shard_rejects_malformed(tmp_path, case):
    make, word = _malformed_cases(tmp_path)[case]
    path = tmp_path / "fineweb_val_000000.bin"
    make(path)
    with pytest.raises(DataError) as info:
        train_gpt.read_shard(path)
    assert str(path) in str(info.value)
    assert word in str(info.value)


def test_find_shards_missing_dir_and_no_match(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(DataError) as info:
        train_gpt.find_shards(str(missing), "train")
    msg = str(info.value)
    assert str(missing) in msg and "cached_challenge_fineweb.py" in msg and "smoke" in msg

    (tmp_path / "fineweb_val_000000.bin").write_bytes(b"")  # a val shard is not a train shard
    (tmp_path / "other_train_000000.bin").write_bytes(b"")
    with pytest.raises(DataError) as info:
        train_gpt.find_shards(str(tmp_path), "train")
    msg = str(info.value)
    assert "fineweb_train_" in msg and "cached_challenge_fineweb.py" in msg and "smoke" in msg


def test_find_shards_sorted_and_split_specific(tmp_path):
    for name in ["fineweb_train_000002.bin", "fineweb_train_000000.bin", "fineweb_val_000000.bin",
                 "fineweb_train_000001.bin", "fineweb_train_000001.txt"]:
        smoke_data.write_shard(tmp_path / name, [1, 2])
    pattern, files = train_gpt.find_shards(str(tmp_path), "train")
    assert [Path(f).name for f in files] == [f"fineweb_train_00000{i}.bin" for i in range(3)]
    assert pattern.endswith("fineweb_train_*.bin")
    _, val = train_gpt.find_shards(str(tmp_path), "val")
    assert [Path(f).name for f in val] == ["fineweb_val_000000.bin"]


def test_load_tokenizer_missing(tmp_path):
    missing = tmp_path / "tok.model"
    with pytest.raises(DataError) as info:
        train_gpt.load_tokenizer(str(missing))
    msg = str(info.value)
    assert str(missing) in msg and "cached_challenge_fineweb.py" in msg and "smoke" in msg
    with pytest.raises(DataError):  # a folder is not a model file
        train_gpt.load_tokenizer(str(tmp_path))


def test_load_tokenizer_corrupt(tmp_path):
    bad = tmp_path / "tok.model"
    bad.write_bytes(b"not a sentencepiece model")
    with pytest.raises(DataError) as info:
        train_gpt.load_tokenizer(str(bad))
    assert str(bad) in str(info.value)


def test_load_validation_tokens_concatenates_sorted_and_truncates(tmp_path):
    rng = np.random.default_rng(0)
    parts = {i: rng.integers(0, 65536, size=n) for i, n in ((10, 7), (0, 13), (2, 5), (1, 1))}
    for i in (10, 2, 0, 1):  # written out of order
        smoke_data.write_shard(tmp_path / f"fineweb_val_{i:06d}.bin", parts[i])
    smoke_data.write_shard(tmp_path / "fineweb_train_000000.bin", [9] * 50)  # must not be read
    full = np.concatenate([parts[i] for i in (0, 1, 2, 10)])
    N = len(full)  # 26
    for L in (1, 2, 5, 8, 12, 25):
        pattern, tok = train_gpt.load_validation_tokens(str(tmp_path), L)
        keep = ((N - 1) // L) * L + 1
        assert tok.dtype == torch.int64
        assert tok.tolist() == full[:keep].tolist(), L
        assert (tok.numel() - 1) % L == 0
        assert pattern.endswith("fineweb_val_*.bin")
    for L in (26, 40):  # N - 1 = 25 targets: no whole window
        with pytest.raises(DataError):
            train_gpt.load_validation_tokens(str(tmp_path), L)


def test_load_validation_tokens_boundary(tmp_path):
    smoke_data.write_shard(tmp_path / "fineweb_val_000000.bin", np.arange(17))
    assert train_gpt.load_validation_tokens(str(tmp_path), 16)[1].tolist() == list(range(17))
    with pytest.raises(DataError):
        train_gpt.load_validation_tokens(str(tmp_path), 17)
    with pytest.raises(DataError) as info:
        train_gpt.load_validation_tokens(str(tmp_path / "missing"), 16)
    assert "cached_challenge_fineweb.py" in str(info.value)


# ----------------------------------------------------------------------------------------------------
# 2. WindowSampler / DistributedTokenLoader


@pytest.fixture
def three_shards(tmp_path):
    parts = [np.arange(0, 10), np.arange(100, 107), np.arange(200, 213)]
    files = []
    for i, p in enumerate(parts):
        f = tmp_path / f"fineweb_train_{i:06d}.bin"
        smoke_data.write_shard(f, p)
        files.append(str(f))
    return files, np.concatenate(parts)


def test_loader_with_only_empty_shards_raises(tmp_path):
    import signal

    files = []
    for i in range(2):
        smoke_data.write_shard(tmp_path / f"fineweb_train_{i:06d}.bin", [])
        files.append(str(tmp_path / f"fineweb_train_{i:06d}.bin"))

    def timeout(*_):
        raise TimeoutError("next_batch did not return within 1 s")

    old = signal.signal(signal.SIGALRM, timeout)
    signal.alarm(1)
    try:
        with pytest.raises(DataError):
            train_gpt.DistributedTokenLoader(files, 0, 1, torch.device("cpu"), 4, 2, 0).next_batch()
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def test_distributed_loader_deterministic(three_shards):
    files, _ = three_shards
    a = train_gpt.DistributedTokenLoader(files, 1, 2, torch.device("cpu"), 6, 3, 5)
    b = train_gpt.DistributedTokenLoader(files, 1, 2, torch.device("cpu"), 6, 3, 5)
    for _ in range(6):
        xa, ya, _ = a.next_batch()
        xb, yb, _ = b.next_batch()
        assert torch.equal(xa, xb) and torch.equal(ya, yb)



def _write_shards(tmp_path, lengths, base=1000):
    """Shards whose token at position i of shard k is base*(k+1)+i, so a row tells where it was cut from."""
    files = []
    for k, n in enumerate(lengths):
        f = tmp_path / f"fineweb_train_{k:06d}.bin"
        smoke_data.write_shard(f, base * (k + 1) + np.arange(n))
        files.append(str(f))
    return files


def _origin(row, base=1000):
    """(shard, start) of a sampled row; asserts it is one contiguous stretch of one shard."""
    row = [int(t) for t in row]
    assert row == list(range(row[0], row[0] + len(row)))
    shard, start = divmod(row[0], base)
    assert (row[-1]) // base == shard
    return shard - 1, start


@pytest.mark.parametrize("seq_len", [1, 3, 8])
def test_window_sampler_takes_each_window_of_a_grid_once_per_epoch(tmp_path, seq_len):
    lengths = [40, 7, 0, 29]
    files = _write_shards(tmp_path, lengths)
    sampler = train_gpt.WindowSampler(files, seq_len, seed=5)
    starts_seen = []
    for epoch in range(4):
        first = sampler.take(1)  # opens the epoch, so its grid is known
        assert sampler.epoch == epoch
        n_windows = int(sampler.first_window[-1])
        rows = np.concatenate([first, sampler.take(n_windows - 1)])
        origins = [_origin(r) for r in rows]
        grid = sorted((k, sampler.phase + j * seq_len) for k, n in enumerate(lengths)
                      for j in range(max(0, (n - 1 - sampler.phase) // seq_len)))
        assert sorted(origins) == grid  # every window of this epoch's grid exactly once, nothing else
        assert all(start + seq_len < lengths[k] for k, start in origins)
        starts_seen.append(origins)
    assert len({tuple(o) for o in starts_seen}) == 4  # each epoch its own order (and phase)
    every = [o for e in starts_seen for o in e]
    assert [_origin(r) for r in train_gpt.WindowSampler(files, seq_len, seed=5).take(len(every))] == every  # replays
    assert [_origin(r) for r in train_gpt.WindowSampler(files, seq_len, seed=6).take(len(every))] != every


def test_window_sampler_short_shards(tmp_path):
    with pytest.raises(DataError, match="window"):
        train_gpt.WindowSampler(_write_shards(tmp_path, [4, 0, 3]), 4, seed=0)
    sampler = train_gpt.WindowSampler(_write_shards(tmp_path, [5]), 4, seed=0)  # only phase 0 fits
    rows = sampler.take(3)
    assert [_origin(r) for r in rows] == [(0, 0)] * 3


@pytest.mark.parametrize("world_size", [1, 2, 4])
@pytest.mark.parametrize("local_tokens,seq_len", [(4, 2), (6, 3), (8, 8)])
def test_shuffled_loader_ranks_partition_the_global_batch(tmp_path, world_size, local_tokens, seq_len):
    files = _write_shards(tmp_path, [50, 31, 17])
    cpu = torch.device("cpu")
    loaders = [train_gpt.DistributedTokenLoader(files, r, world_size, cpu, local_tokens, seq_len, 3) for r in range(world_size)]
    single = train_gpt.DistributedTokenLoader(files, 0, 1, cpu, local_tokens, seq_len, 3)
    reference = train_gpt.WindowSampler(files, seq_len, 3)
    rows = local_tokens // seq_len
    for _ in range(12):  # crosses epochs
        expected = reference.take(rows * world_size)
        for r, loader in enumerate(loaders):
            x, y, _ = loader.next_batch()
            assert x.shape == y.shape == (rows, seq_len) and x.dtype == y.dtype == torch.int64
            assert torch.equal(x[:, 1:], y[:, :-1])
            share = torch.from_numpy(expected[r * rows:(r + 1) * rows])
            assert torch.equal(x, share[:, :-1]) and torch.equal(y, share[:, 1:])
            x1, y1, _ = single.next_batch()  # one rank's consecutive micro-steps see what the ranks see
            assert torch.equal(x1, x) and torch.equal(y1, y)

# ----------------------------------------------------------------------------------------------------
# 3. byte look-up tables

SAMPLE_TEXTS = [
    "naïve café — ☃ 漢字",
    "Hello, world! The quick brown fox jumps over the lazy dog.",
    "digits 0123456789 and 3.14159 and 1,000,000",
    "multiple   spaces    here  and\ttabs\nand\n\nnewlines",
    " text starting with a space",
    "   three leading spaces and trailing   ",
    "emoji 😀🚀 and math ∑∫√ and ﬁ ligature and full-width ＡＢＣ１２３",
    "Ünïcödé ÀÉÎÕÜ ßœæ ñ ç ø å",
    "\u3000ideographic space and non-breaking\u00a0space",
    "a",
    " ",
    "",
    "def f(x):\n    return x ** 2  # comment",
    "Ελληνικά Кириллица עברית العربية हिन्दी",
    "@?Z`!&^~ <>{}[]|\\ \"quotes\" 'single'",
    "e\u0301 combining acute",
]


def check_luts_against_decode(sp, luts, texts):
    for text in texts:
        ids = sp.encode(text)
        assert lut_bytes_of_ids(luts, ids) == decoded_bytes(sp, ids), repr(text)
    # several documents back to back: BOS targets add 0 bytes, the first piece after BOS has no space
    stream, expected = [], 0
    for text in texts:
        ids = sp.encode(text)
        stream += [BOS] + ids
        expected += decoded_bytes(sp, ids)
    seq = torch.tensor(stream, dtype=torch.int64)
    assert int(train_gpt.target_bytes(luts, seq[:-1], seq[1:]).sum()) == expected


def check_luts_on_documents(sp, luts, tokens):
    docs = split_documents(tokens)
    assert len(docs) >= 2
    total_lut = total_dec = 0
    for ids in docs:
        a, b = lut_bytes_of_ids(luts, ids), decoded_bytes(sp, ids)
        assert a == b
        total_lut, total_dec = total_lut + a, total_dec + b
    seq = torch.as_tensor(np.asarray(tokens, dtype=np.int64))
    assert int(train_gpt.target_bytes(luts, seq[:-1], seq[1:]).sum()) == total_dec == total_lut


def check_lut_classes(sp, luts):
    base, space, boundary = luts
    n_byte = n_control = 0
    for i in range(sp.vocab_size()):
        if sp.is_byte(i):
            n_byte += 1
            assert base[i] == 1 and not space[i] and not boundary[i], i
            for prev in (BOS, i, sp.piece_to_id("\u2581")):
                assert int(train_gpt.target_bytes(luts, torch.tensor([prev]), torch.tensor([i]))) == 1
        elif sp.is_control(i) or sp.is_unknown(i):
            n_control += 1
            assert base[i] == 0 and not space[i] and boundary[i], i
            assert int(train_gpt.target_bytes(luts, torch.tensor([5]), torch.tensor([i]))) == 0
        else:
            assert not boundary[i]
            piece = sp.id_to_piece(i)
            assert bool(space[i]) == piece.startswith("\u2581")
    assert n_byte == 256 and n_control == 4
    assert boundary[BOS] and base[BOS] == 0
    # a space-piece after a boundary loses its space, after anything else keeps it
    sp_word = next(i for i in range(sp.vocab_size()) if sp.id_to_piece(i).startswith("\u2581") and len(sp.id_to_piece(i)) > 2)
    word_len = len(sp.id_to_piece(sp_word).encode("utf-8")) - 3  # '▁' is 3 UTF-8 bytes
    tb = lambda prev: int(train_gpt.target_bytes(luts, torch.tensor([prev]), torch.tensor([sp_word])))
    assert tb(BOS) == word_len and tb(0) == word_len and tb(4) == word_len + 1 and tb(sp_word) == word_len + 1


def test_luts_smoke_tokenizer(smoke_dataset, smoke_tokenizer):
    sp = smoke_tokenizer
    luts = train_gpt.build_byte_luts(sp)
    assert all(t.shape == (1024,) for t in luts)
    check_lut_classes(sp, luts)
    check_luts_against_decode(sp, luts, SAMPLE_TEXTS)
    check_luts_on_documents(sp, luts, train_gpt.read_shard(smoke_dataset[0] / "fineweb_val_000000.bin"))


def test_luts_docs_tokenizer():
    tokens = docs_val_tokens()
    sp = train_gpt.load_tokenizer(str(DOCS_TOKENIZER))
    luts = train_gpt.build_byte_luts(sp)
    check_lut_classes(sp, luts)
    check_luts_against_decode(sp, luts, SAMPLE_TEXTS)
    check_luts_on_documents(sp, luts, tokens)


def test_luts_reject_tokenizer_without_space_piece():
    texts = ["abcabcabcbcaabbcc" * 5, "cabbacabcabc" * 4, "aaabbbccc" * 3] * 10  # no spaces: no '▁' piece
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(texts), model_writer=model, vocab_size=12, model_type="bpe",
                                   add_dummy_prefix=False, hard_vocab_limit=False, minloglevel=2, character_coverage=1.0,
                                   pad_id=0, bos_id=1, eos_id=2, unk_id=3)
    sp = spm.SentencePieceProcessor(model_proto=model.getvalue())
    assert sp.piece_to_id("\u2581") == sp.unk_id()
    with pytest.raises(DataError) as info:
        train_gpt.build_byte_luts(sp)
    assert "\u2581" in str(info.value)


# ----------------------------------------------------------------------------------------------------
# 4. exact val_bpb against an independent byte count


def independent_bytes(sp, tokens):
    """UTF-8 bytes of the decoded text of each (possibly cut) document of a [BOS]+ids stream."""
    return sum(decoded_bytes(sp, ids) for ids in split_documents(tokens))


def pick_seq_len(sp, raw, candidates):
    """A window length whose truncation does not cut the last kept document inside a multi-byte character."""
    for L in candidates:
        keep = ((len(raw) - 1) // L) * L + 1
        last = split_documents(raw[:keep])[-1]
        if keep < len(raw) and "\ufffd" not in sp.decode(last):
            return L
    pytest.fail("no safe sequence length among the candidates")


@pytest.mark.parametrize("source", ["smoke", "docs"])
def test_val_bpb_exact(tmp_path, smoke_dataset, smoke_tokenizer, source):
    if source == "smoke":
        data_path, sp = smoke_dataset[0], smoke_tokenizer
        raw = train_gpt.read_shard(data_path / "fineweb_val_000000.bin")
    else:
        raw = docs_val_tokens()
        data_path, sp = DOCS_TINY, train_gpt.load_tokenizer(str(DOCS_TOKENIZER))
    V = 1024
    L = pick_seq_len(sp, raw, (100, 64, 96, 128, 80, 112))
    _, tokens = train_gpt.load_validation_tokens(str(data_path), L)
    n = tokens.numel() - 1
    assert n == ((len(raw) - 1) // L) * L and n < len(raw) - 1  # truncation really drops a tail here
    luts = train_gpt.build_byte_luts(sp)
    nbytes = independent_bytes(sp, tokens.tolist())

    if source == "smoke":  # uniform logits: every target costs ln V
        uniform = lambda x: torch.zeros(*x.shape, V)
        res = train_gpt.evaluate(uniform, tokens, luts, L, L, 64)
        nll32 = float(-torch.log_softmax(torch.zeros(V), 0)[0])
        assert res["tokens"] == n and res["bytes"] == nbytes
        assert res["val_loss"] == pytest.approx(nll32, rel=1e-9)
        assert res["val_loss"] == pytest.approx(math.log(V), rel=1e-6)
        assert res["val_bpb"] == pytest.approx(nll32 * n / (math.log(2) * nbytes), rel=1e-9)

    # a fixed random bigram table: logits depend on the input token only
    table = torch.randn(V, V, generator=torch.Generator().manual_seed(1)) * 3
    nll_table = -torch.log_softmax(table, -1)
    expected_nll = nll_table[tokens[:-1], tokens[1:]].double().sum().item()
    for stride in ((L, L // 4) if source == "smoke" else (L,)):
        res = train_gpt.evaluate(lambda x: table[x], tokens, luts, L, stride, 64)
        assert res["tokens"] == n and res["bytes"] == nbytes
        assert res["val_loss"] == pytest.approx(expected_nll / n, rel=1e-9)
        assert res["val_bpb"] == pytest.approx(expected_nll / (math.log(2) * nbytes), rel=1e-9)
        assert res["val_bpb"] == pytest.approx(res["val_loss"] / math.log(2) * n / nbytes, rel=1e-12)


# ----------------------------------------------------------------------------------------------------
# 5. sliding windows


def reference_windows(n, L, S):
    """RULES section 8 written out: (starts, [(window start, position)] of every scored target)."""
    C = L - S
    starts = [ws for ws in range(0, n, S) if ws + C < n]
    pairs = []
    for ws in starts:
        end = min(ws + L, n)
        s = 0 if ws == 0 else C
        pairs += [(ws, p) for p in range(s, end - ws)]
    return starts, pairs


def fake_luts(V, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randint(0, 5, (V,), generator=g)
    space = torch.rand(V, generator=g) < 0.5
    boundary = torch.zeros(V, dtype=torch.bool)
    boundary[:2] = True
    base[:2] = 0
    space[:2] = False
    return base, space, boundary


class PositionModel:
    """Logits that depend on the current token and its position inside the window (not a real causal LM)."""

    def __init__(self, V, L, seed=0):
        self.table = torch.randn(V, L, V, generator=torch.Generator().manual_seed(seed)) * 2
        self.nll = -torch.log_softmax(self.table.double(), -1)

    def __call__(self, x):
        return self.table[x, torch.arange(x.size(1))]

    def reference(self, tokens, pairs):
        return sum(float(self.nll[tokens[ws + p], p, tokens[ws + p + 1]]) for ws, p in pairs)


class TokenModel:
    """Logits that depend on the current token only (a causal model: context never matters)."""

    def __init__(self, V, seed=0):
        self.table = torch.randn(V, V, generator=torch.Generator().manual_seed(seed)) * 2

    def __call__(self, x):
        return self.table[x]


SLIDING_CASES = [  # (n, seq_len, stride, batch_seqs)
    (100, 16, 4, 3), (100, 16, 16, 2), (101, 16, 5, 4), (97, 10, 3, 1), (64, 16, 7, 64),
    (17, 16, 1, 5), (20, 16, 16, 1), (12, 16, 8, 2), (33, 8, 8, 3), (200, 32, 12, 7), (50, 7, 2, 4),
]


@pytest.mark.parametrize("n,L,S,B", SLIDING_CASES)
def test_sliding_windows_score_every_target_once(n, L, S, B):
    V = 24
    starts, pairs = reference_windows(n, L, S)
    assert sorted(ws + p for ws, p in pairs) == list(range(n))  # the rule itself covers each target once
    assert train_gpt.window_starts(n, L, S).tolist() == starts
    tokens = torch.randint(0, V, (n + 1,), generator=torch.Generator().manual_seed(n * L + S))
    luts = fake_luts(V)
    model = PositionModel(V, L)
    res = train_gpt.evaluate(model, tokens, luts, L, S, B)
    assert res["tokens"] == n
    exp_bytes = int(train_gpt.target_bytes(luts, tokens[:-1], tokens[1:]).sum())
    assert res["bytes"] == exp_bytes
    # the (window, position) pairs evaluate scores are exactly the reference ones
    assert res["val_loss"] * n == pytest.approx(model.reference(tokens.tolist(), pairs), rel=1e-6)


@pytest.mark.parametrize("n,L,S,B", [c for c in SLIDING_CASES if c[2] < c[1] and c[0] > c[1]])
def test_stride_matters_only_for_context_dependent_models(n, L, S, B):
    V = 24
    tokens = torch.randint(0, V, (n + 1,), generator=torch.Generator().manual_seed(7))
    luts = fake_luts(V, 1)
    # stride == seq_len is the plain non-overlapping evaluation
    pos_model = PositionModel(V, L, 3)
    flat = train_gpt.evaluate(pos_model, tokens, luts, L, L, B)
    chunks = [(ws, p) for ws in range(0, n, L) for p in range(min(L, n - ws))]
    assert flat["val_loss"] * n == pytest.approx(pos_model.reference(tokens.tolist(), chunks), rel=1e-6)
    # a model that ignores context scores the same either way
    tok_model = TokenModel(V, 4)
    a = train_gpt.evaluate(tok_model, tokens, luts, L, S, B)
    b = train_gpt.evaluate(tok_model, tokens, luts, L, L, B)
    assert a["tokens"] == b["tokens"] == n and a["bytes"] == b["bytes"]
    assert a["val_loss"] == pytest.approx(b["val_loss"], rel=1e-12)
    assert a["val_bpb"] == pytest.approx(b["val_bpb"], rel=1e-12)
    # a position-dependent one does not
    slide = train_gpt.evaluate(pos_model, tokens, luts, L, S, B)
    assert slide["bytes"] == flat["bytes"]
    assert abs(slide["val_loss"] - flat["val_loss"]) > 1e-4


class _Collected(Exception):
    pass


@pytest.mark.parametrize("world_size", [2, 3, 4, 8])
@pytest.mark.parametrize("n,L,S,B", [(100, 16, 4, 3), (101, 16, 5, 2), (64, 16, 16, 1), (200, 32, 12, 7)])
def test_evaluate_rank_split(monkeypatch, world_size, n, L, S, B):
    V = 24
    tokens = torch.randint(0, V, (n + 1,), generator=torch.Generator().manual_seed(11))
    luts = fake_luts(V, 2)
    model = PositionModel(V, L, 5)
    whole = train_gpt.evaluate(model, tokens, luts, L, S, B)

    partial = []

    def record(t, *args, **kwargs):
        partial.append(t.clone())
        raise _Collected

    monkeypatch.setattr(train_gpt.dist, "all_reduce", record)
    for r in range(world_size):
        with pytest.raises(_Collected):
            train_gpt.evaluate(model, tokens, luts, L, S, B, rank=r, world_size=world_size)
    assert len(partial) == world_size and all(p.dtype == torch.float64 for p in partial)

    # each rank scores a contiguous block of windows (reference split), together every target once
    starts, pairs = reference_windows(n, L, S)
    toks = tokens.tolist()
    for r in range(world_size):
        mine = set(starts[len(starts) * r // world_size:len(starts) * (r + 1) // world_size])
        my_pairs = [(ws, p) for ws, p in pairs if ws in mine]
        assert int(partial[r][1]) == len(my_pairs)
        assert float(partial[r][0]) == pytest.approx(model.reference(toks, my_pairs), rel=1e-6, abs=1e-9)
        my_bytes = sum(int(train_gpt.target_bytes(luts, tokens[ws + p:ws + p + 1], tokens[ws + p + 1:ws + p + 2]))
                       for ws, p in my_pairs)
        assert int(partial[r][2]) == my_bytes
    total = torch.stack(partial).sum(0)
    assert int(total[1]) == n

    monkeypatch.setattr(train_gpt.dist, "all_reduce", lambda t, *a, **k: t.copy_(total))
    for r in range(world_size):
        res = train_gpt.evaluate(model, tokens, luts, L, S, B, rank=r, world_size=world_size)
        assert res["tokens"] == whole["tokens"] == n and res["bytes"] == whole["bytes"]
        assert res["val_loss"] == pytest.approx(whole["val_loss"], rel=1e-12)
        assert res["val_bpb"] == pytest.approx(whole["val_bpb"], rel=1e-12)


def test_evaluate_detects_miscount(monkeypatch):
    V, n, L = 24, 50, 8
    tokens = torch.randint(0, V, (n + 1,), generator=torch.Generator().manual_seed(0))
    monkeypatch.setattr(train_gpt.dist, "all_reduce", lambda t, *a, **k: None)  # rank 0 of 2 alone: half the targets
    with pytest.raises(RuntimeError, match="exactly once"):
        train_gpt.evaluate(TokenModel(V), tokens, fake_luts(V), L, 4, 2, rank=0, world_size=2)


# ----------------------------------------------------------------------------------------------------
# 6. settings


# One case per branch of parse_setting, each with its whole message (the 469 per-setting cases these replace
# exercised the same eight branches; test_every_setting_rejects_a_value_of_the_wrong_kind keeps the per-setting sweep).
BAD_VALUES = [  # (name, raw, the exact message)
    ("SEED", "1.5", "SEED must be an integer; got '1.5'"),  # int: not an integer
    ("SEED", "", "SEED must be an integer; got ''"),  # int: empty
    ("ZSTD_LEVEL", "1e3", "ZSTD_LEVEL must be an integer; got '1e3'"),  # int: no float spelling
    ("ITERATIONS", "0", "ITERATIONS must be a finite number >= 1; got '0'"),  # int: the lower bound
    ("XSA_LAST_N", "-2", "XSA_LAST_N must be a finite number >= -1; got '-2'"),  # int: a negative lower bound
    ("MATRIX_LR", "abc", "MATRIX_LR must be a number; got 'abc'"),  # float: not a number
    ("MATRIX_LR", "nan", "MATRIX_LR must be a finite number >= 0; got 'nan'"),  # float: non-finite
    ("MATRIX_LR", "inf", "MATRIX_LR must be a finite number >= 0; got 'inf'"),
    ("ROPE_BASE", "-inf", "ROPE_BASE must be a finite number >= 1; got '-inf'"),
    ("MLP_MULT", "0.005", "MLP_MULT must be a finite number >= 0.01; got '0.005'"),  # float: the lower bound
    ("LN_SCALE", "maybe", "LN_SCALE must be a boolean (1/0, true/false, yes/no, on/off); got 'maybe'"),  # bool
    ("LN_SCALE", "2", "LN_SCALE must be a boolean (1/0, true/false, yes/no, on/off); got '2'"),
    ("COMPILE", "", "COMPILE must be a boolean (1/0, true/false, yes/no, on/off, auto); got ''"),  # auto_bool
    ("MLP_ACT", "gelu", "MLP_ACT must be one of leaky_relu2, relu2; got 'gelu'"),  # tuple of words
    ("AVERAGING", "EMA", "AVERAGING must be one of ema, none; got 'EMA'"),  # words are case-sensitive
]


@pytest.mark.parametrize("name,raw,message", BAD_VALUES, ids=[f"{n}={r!r}" for n, r, _ in BAD_VALUES])
def test_bad_values_name_the_variable(name, raw, message):
    with pytest.raises(ConfigError) as info:
        make_h(**{name: raw})
    assert str(info.value) == message


def test_str_settings_take_any_text_as_given():
    h = make_h(RUN_NAME=" 11L int6: test ", AUTHOR="", DATA_PATH="1.5")
    assert (h.run_name, h.author, h.data_path) == (" 11L int6: test ", "", "1.5")


def test_every_setting_rejects_a_value_of_the_wrong_kind():
    """One loop over HYPERPARAMETERS (not one test item per setting): each non-text setting refuses a value of the
    wrong kind with a message that starts with its name."""
    wrong = {int: "1.5", float: "abc", bool: "maybe", "auto_bool": "maybe"}
    checked = 0
    for name, kind, _, lower, _ in train_gpt.HYPERPARAMETERS:
        if kind is str:
            continue
        raws = [kind[0].upper() + "x"] if isinstance(kind, tuple) else [wrong[kind]]
        if kind in (int, float) and lower is not None:
            raws.append(str(lower - 1))
        for raw in raws:
            with pytest.raises(ConfigError) as info:
                make_h(**{name: raw})
            assert str(info.value).startswith(name + " must be "), (name, raw, str(info.value))
            checked += 1
    assert checked > 100


def test_lower_bounds_are_inclusive():
    h = make_h(SEED="0", GRAD_ACCUM_STEPS="0", VE_DIM="0", XSA_LAST_N="0", ROPE_DIMS="0", BIGRAM_BUCKETS="0",
               WARMUP_STEPS="0", MAX_WALLCLOCK_SECONDS="0", GRAD_CLIP_NORM="0", EVAL_SEQ_LEN="0",
               ITERATIONS="1", ATTN_BITS="2", MLP_BITS="2", EMBED_BITS="2", ZSTD_LEVEL="1", MLP_MULT="0.01")
    assert (h.seed, h.grad_accum_steps, h.rope_dims, h.iterations, h.attn_bits, h.zstd_level) == (0, 0, 0, 1, 2, 1)
    assert h.mlp_mult == 0.01 and h.eval_seq_len == h.train_seq_len == 64


def test_defaults_and_types():
    h = train_gpt.Hyperparameters({})
    for name, kind, default, _, _ in train_gpt.HYPERPARAMETERS:
        value = getattr(h, name.lower())
        if name in ("RUN_ID", "EVAL_SEQ_LEN", "VE_LAYERS", "XSA_LAST_N") or kind == "auto_bool":
            continue
        assert value == default and type(value) is type(default), name
    assert h.compile is None and h.bf16 is None and h.xsa_last_n == h.num_layers == 11
    assert h.ve_layers == [9, 10] and h.eval_seq_len == h.train_seq_len and h.run_id
    assert train_gpt.Hyperparameters({"VE_DIM": "0"}).ve_layers == []
    assert train_gpt.Hyperparameters({"NUM_LAYERS": "1"}).ve_layers == [0]


@pytest.mark.parametrize("layers", [1, 4, 10, 11, 12])
def test_per_layer_defaults_follow_the_depth(layers):
    """Changing NUM_LAYERS alone never needs a second edit: XSA covers every layer, VE the last two."""
    assert train_gpt.Hyperparameters({"NUM_LAYERS": str(layers)}).xsa_last_n == layers
    if layers >= 2:
        assert train_gpt.Hyperparameters({"NUM_LAYERS": str(layers), "VE_DIM": "8"}).ve_layers == [layers - 2, layers - 1]
    assert train_gpt.Hyperparameters({"NUM_LAYERS": str(layers), "XSA_LAST_N": str(layers)}).xsa_last_n == layers
    with pytest.raises(ConfigError, match="XSA_LAST_N"):
        train_gpt.Hyperparameters({"NUM_LAYERS": str(layers), "XSA_LAST_N": str(layers + 1)})
    h2 = make_h(SEED=" 42 ", MATRIX_LR="1e-2", MLP_MULT="3")
    assert h2.seed == 42 and type(h2.seed) is int and h2.matrix_lr == 0.01 and type(h2.mlp_mult) is float


@pytest.mark.parametrize("raw,value", [("1", True), ("0", False), ("true", True), ("False", False), ("YES", True),
                                       ("no", False), ("off", False), ("On", True), (" TRUE ", True), ("oFf", False)])
def test_boolean_spellings(raw, value):
    names = [n for n, kind, *_ in train_gpt.HYPERPARAMETERS if kind in (bool, "auto_bool")]
    h = make_h(**{n: raw for n in names})
    assert all(getattr(h, n.lower()) is value for n in names)


@pytest.mark.parametrize("raw", ["auto", "AUTO", " Auto "])
def test_auto_bool(raw):
    h = make_h(COMPILE=raw, BF16=raw)
    assert h.compile is None and h.bf16 is None
    with pytest.raises(ConfigError, match="auto"):
        make_h(COMPILE="sometimes")
    with pytest.raises(ConfigError, match="LN_SCALE"):
        make_h(LN_SCALE="auto")  # plain booleans have no auto


def test_choices():
    for name, kind, *_ in train_gpt.HYPERPARAMETERS:
        if isinstance(kind, tuple):
            for word in kind:
                assert getattr(make_h(**{name: word}), name.lower()) == word
    with pytest.raises(ConfigError) as info:
        make_h(MLP_ACT="gelu")
    assert "MLP_ACT" in str(info.value) and "leaky_relu2" in str(info.value)


INVALID = [  # (overrides, words the message must contain)
    (dict(MODEL_DIM=64, NUM_HEADS=3), ["MODEL_DIM", "NUM_HEADS"]),
    (dict(MODEL_DIM=64, NUM_HEADS=5, NUM_KV_HEADS=1), ["MODEL_DIM", "NUM_HEADS"]),
    (dict(NUM_HEADS=4, NUM_KV_HEADS=3), ["NUM_HEADS", "NUM_KV_HEADS"]),
    (dict(NUM_HEADS=4, NUM_KV_HEADS=8), ["NUM_HEADS", "NUM_KV_HEADS"]),
    (dict(MODEL_DIM=60, NUM_HEADS=4), ["MODEL_DIM/NUM_HEADS", "even"]),
    (dict(ROPE_DIMS=7), ["ROPE_DIMS"]),
    (dict(ROPE_DIMS=18), ["ROPE_DIMS"]),
    (dict(XSA_LAST_N=5), ["XSA_LAST_N", "NUM_LAYERS"]),
    (dict(VE_DIM=8, VE_LAYERS="4"), ["VE_LAYERS"]),
    (dict(VE_DIM=8, VE_LAYERS="0,-4"), ["VE_LAYERS", "repeat"]),  # -4 is layer 0 of 4
    (dict(VE_DIM=8, VE_LAYERS="-5"), ["VE_LAYERS"]),
    (dict(VE_DIM=8, VE_LAYERS="a,b"), ["VE_LAYERS"]),
    (dict(VE_DIM=8, VE_LAYERS="1.5"), ["VE_LAYERS"]),
    (dict(VE_DIM=8, VE_LAYERS="1;2"), ["VE_LAYERS"]),
    (dict(EVAL_STRIDE=65), ["EVAL_STRIDE", "EVAL_SEQ_LEN"]),
    (dict(EVAL_SEQ_LEN=32, EVAL_STRIDE=33), ["EVAL_STRIDE", "EVAL_SEQ_LEN"]),
    (dict(ATTN_BITS=9), ["ATTN_BITS"]),
    (dict(MLP_BITS=9), ["MLP_BITS"]),
    (dict(EMBED_BITS=9), ["EMBED_BITS"]),
    (dict(EMBED_BITS=17), ["EMBED_BITS"]),
    (dict(ATTN_BITS=1), ["ATTN_BITS"]),
    (dict(ZSTD_LEVEL=23), ["ZSTD_LEVEL"]),
    (dict(BIGRAM_BUCKETS=1), ["BIGRAM_BUCKETS"]),
    (dict(MODEL_DIM=8, NUM_HEADS=2, NUM_KV_HEADS=1, ROPE_DIMS=4), ["SMEAR_GATE", "MODEL_DIM"]),
    (dict(GPTQ_RESERVE_SECONDS=600, MAX_WALLCLOCK_SECONDS=600), ["GPTQ_RESERVE_SECONDS", "MAX_WALLCLOCK_SECONDS"]),
    (dict(GPTQ_RESERVE_SECONDS=10, MAX_WALLCLOCK_SECONDS=5), ["GPTQ_RESERVE_SECONDS", "MAX_WALLCLOCK_SECONDS"]),
    (dict(TTT_PHASES="8,4"), ["TTT_PHASES", "increasing"]),
    (dict(TTT_PHASES="0,8"), ["TTT_PHASES", "increasing"]),
    (dict(TTT_PHASES="8,x"), ["TTT_PHASES", "comma list of document counts"]),
    (dict(TTT="lora", TTT_PHASES="8", TTT_SGD_CHUNK=100), ["TTT_SGD_CHUNK", "EVAL_SEQ_LEN"]),
    (dict(EVAL_ARTIFACT="/no/such/artifact.ptz"), ["EVAL_ARTIFACT", "/no/such/artifact.ptz", "not a file"]),
    (dict(LOOP_START_FRAC=1), ["LOOP_START_FRAC", "below 1", "LOOP_LAYERS=off"]),  # the loop would never train
] + [(dict([(n, "1.01")]), [n, "[0, 1]"]) for n in ("WARMDOWN_FRAC", "MIN_LR", "LOOP_START_FRAC", "WD_TAPER_START_FRAC")] \
    + [(dict([(n, "1.01")]), [n, "[0, 1)"]) for n in ("EMA_DECAY", "BETA1", "BETA2")]


@pytest.mark.parametrize("overrides,words", INVALID, ids=lambda v: "-".join(f"{k}={x}" for k, x in v.items()) if isinstance(v, dict) else None)
def test_invalid_combinations(overrides, words):
    with pytest.raises(ConfigError) as info:
        make_h(**overrides)
    for word in words:
        assert word in str(info.value), (word, str(info.value))


def test_loop_start_frac_one_is_accepted_only_without_the_loop():
    assert make_h(LOOP_LAYERS="off", LOOP_START_FRAC=1).loop is None
    assert make_h(LOOP_START_FRAC=0.99).loop is not None


@pytest.mark.parametrize("overrides", [
    dict(VE_DIM=0, VE_LAYERS="9,10"), dict(VE_DIM=8, VE_LAYERS="0,3"), dict(VE_DIM=8, VE_LAYERS=" 1 , 2 ,"),
    dict(VE_DIM=8), dict(VE_DIM=8, VE_LAYERS="0,-1"),
    dict(ROPE_DIMS=16), dict(XSA_LAST_N=4), dict(EVAL_STRIDE=64), dict(EVAL_SEQ_LEN=128, EVAL_STRIDE=100),
    dict(EMBED_BITS=16), dict(ATTN_BITS=8, MLP_BITS=5), dict(GPTQ=0, GPTQ_RESERVE_SECONDS=600, MAX_WALLCLOCK_SECONDS=600),
    dict(MAX_WALLCLOCK_SECONDS=0, GPTQ_RESERVE_SECONDS=1000), dict(GPTQ_RESERVE_SECONDS=599, MAX_WALLCLOCK_SECONDS=600),
    dict(WARMDOWN_FRAC=1, MIN_LR=1, EMA_DECAY=0.999, BETA1=0, BETA2=0.999), dict(MODEL_DIM=64, NUM_HEADS=1, NUM_KV_HEADS=1),
    dict(SMEAR_GATE=0, ATTN_GATE=0, MODEL_DIM=8, NUM_HEADS=2, NUM_KV_HEADS=1, ROPE_DIMS=4),
])
def test_valid_combinations(overrides):
    h = make_h(**overrides)
    for k, v in overrides.items():
        if k not in ("VE_LAYERS",):
            got = getattr(h, k.lower())
            assert got == (bool(int(v)) if isinstance(got, bool) else v), k
    if "VE_LAYERS" in overrides and overrides.get("VE_DIM"):
        assert h.ve_layers == [int(x) % h.num_layers for x in overrides["VE_LAYERS"].split(",") if x.strip()]


@pytest.mark.parametrize("world_size,accum", [(1, 8), (2, 4), (3, 2), (4, 2), (5, 1), (8, 1), (16, 1)])
def test_batch_layout_default_accum(world_size, accum):
    h = make_h(TRAIN_BATCH_TOKENS=64 * 8 * 3 * 5 * 16, GRAD_ACCUM_STEPS=0)
    got_accum, local = h.batch_layout(world_size)
    assert got_accum == accum
    assert local * world_size * accum == h.train_batch_tokens and local % h.train_seq_len == 0


def test_batch_layout_explicit_and_indivisible():
    h = make_h(TRAIN_BATCH_TOKENS=64 * 6, GRAD_ACCUM_STEPS=3)
    assert h.batch_layout(2) == (3, 64)
    assert h.batch_layout(1) == (3, 128)
    with pytest.raises(ConfigError) as info:
        h.batch_layout(4)
    assert "TRAIN_BATCH_TOKENS" in str(info.value) and "GRAD_ACCUM_STEPS" in str(info.value)
    with pytest.raises(ConfigError, match="TRAIN_BATCH_TOKENS"):
        make_h(TRAIN_BATCH_TOKENS=1000, GRAD_ACCUM_STEPS=1).batch_layout(1)  # not a multiple of TRAIN_SEQ_LEN
    with pytest.raises(ConfigError, match="TRAIN_BATCH_TOKENS"):
        make_h(TRAIN_BATCH_TOKENS=64 * 4).batch_layout(1)  # default accum 8 needs 8 sequences


@pytest.mark.parametrize("name", ["BETA1", "BETA2"])
def test_adam_beta_one_rejected(name):
    with pytest.raises(ConfigError) as info:
        make_h(**{name: "1"})
    assert name in str(info.value)


class FakeSP:
    def __init__(self, size, bos):
        self.size, self.bos = size, bos

    def vocab_size(self):
        return self.size

    def bos_id(self):
        return self.bos


def test_check_tokenizer(smoke_tokenizer):
    make_h(VOCAB_SIZE=1024).check_tokenizer(smoke_tokenizer)
    with pytest.raises(ConfigError) as info:
        make_h(VOCAB_SIZE=1000).check_tokenizer(smoke_tokenizer)
    assert "VOCAB_SIZE" in str(info.value) and "1024" in str(info.value)
    h = make_h(VOCAB_SIZE=1024, TOKENIZER_PATH="/some/tok.model")
    with pytest.raises(ConfigError) as info:
        h.check_tokenizer(FakeSP(1024, 2))
    assert "BOS" in str(info.value) and "/some/tok.model" in str(info.value)
    with pytest.raises(ConfigError, match="VOCAB_SIZE"):
        h.check_tokenizer(FakeSP(2048, 1))
    h.check_tokenizer(FakeSP(1024, 1))


def settings_table():
    """The README's settings table, rendered from HYPERPARAMETERS (the single source)."""
    rows = ["| variable | default | meaning |", "|---|---|---|"]
    for name, kind, default, _, meaning in train_gpt.HYPERPARAMETERS:
        shown = int(default) if kind is bool else default
        choices = " (`" + " \\| ".join(kind) + "`)" if isinstance(kind, tuple) else ""
        rows.append(f"| `{name}` | `{shown}` | {meaning}{choices} |")
    return "\n".join(rows) + "\n"


def test_readme_settings_table_is_the_hyperparameter_list():
    assert settings_table() in README.read_text(encoding="utf-8"), "README settings table is stale; paste:\n" + settings_table()


def _clean_env(extra):
    env = {k: v for k, v in os.environ.items() if k not in {n for n, *_ in train_gpt.HYPERPARAMETERS}}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    env.update(PYTHONDONTWRITEBYTECODE="1", OMP_NUM_THREADS="1")
    env.update({k: str(v) for k, v in extra.items()})
    return env


def _single_error_line(proc):
    return _single_error_line_of(proc.stderr)


def _single_error_line_of(stderr):
    lines = stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and lines == errors, stderr
    assert "Traceback" not in stderr
    return errors[0]


def _cli_in_process(monkeypatch, capsys, folder, settings):
    """train_gpt.cli() in this process with exactly `settings` as its environment's settings, from `folder`:
    (exit code, stderr). The fast relative of the subprocess runs below (which also cover the interpreter exit)."""
    for name, *_ in train_gpt.HYPERPARAMETERS:
        monkeypatch.delenv(name, raising=False)
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    for name, value in settings.items():
        monkeypatch.setenv(name, str(value))
    monkeypatch.chdir(folder)
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        code = train_gpt.cli()
    finally:
        for s, handler in handlers.items():
            signal.signal(s, handler)
    return code, capsys.readouterr().err


def test_cli_config_error_returns_2_in_process(tmp_path, monkeypatch, capsys):
    code, err = _cli_in_process(monkeypatch, capsys, tmp_path, dict(TINY, NUM_HEADS=3, MODEL_DIM=64,
                                                                    LOG_DIR=tmp_path / "logs", OUTPUT_DIR=tmp_path))
    assert code == 2 and "NUM_HEADS" in _single_error_line_of(err)
    assert not (tmp_path / "logs").exists()


def test_cli_missing_data_returns_2_with_hint_in_process(tmp_path, monkeypatch, capsys, smoke_dataset):
    code, err = _cli_in_process(monkeypatch, capsys, tmp_path, dict(
        TINY, DATA_PATH=tmp_path / "no_such_data", TOKENIZER_PATH=smoke_dataset[1], LOG_DIR=tmp_path / "logs",
        OUTPUT_DIR=tmp_path, RUN_ID="t", COMPILE=0))
    line = _single_error_line_of(err)
    assert code == 2 and str(tmp_path / "no_such_data") in line and "cached_challenge_fineweb.py" in line and "smoke" in line
    assert not (tmp_path / "final_model.int6.ptz").exists()
    assert (tmp_path / "logs" / "t.txt").read_text().strip().splitlines()[-1] == line  # the error reaches the log


IMPORT_PROBE = r"""
import json, os, sys
import numpy as np, torch
sys.path.insert(0, sys.argv[1])
before = (torch.get_num_threads(), torch.random.get_rng_state().clone(), np.random.get_state()[1].copy())
import train_gpt
import torch.distributed as dist
after = (torch.get_num_threads(), torch.random.get_rng_state(), np.random.get_state()[1])
print(json.dumps({
    "dist_initialized": dist.is_available() and dist.is_initialized(),
    "threads_same": before[0] == after[0],
    "torch_rng_same": bool(torch.equal(before[1], after[1])),
    "numpy_rng_same": bool((before[2] == after[2]).all()),
    "cwd_entries": sorted(os.listdir(".")),
}))
"""


@pytest.fixture(scope="module")
def subprocess_runs(tmp_path_factory, smoke_dataset):
    """The three subprocess checks, started together (each pays the torch import; 2 cores run them in parallel).
    Returns {name: (CompletedProcess, folder)}."""
    script = str(ROOT / "train_gpt.py")
    jobs = {}
    d = tmp_path_factory.mktemp("cli_heads")
    jobs["heads"] = ([sys.executable, script], d, _clean_env(dict(TINY, NUM_HEADS=3, MODEL_DIM=64,
                                                                   LOG_DIR=d / "logs", OUTPUT_DIR=d)))
    d = tmp_path_factory.mktemp("cli_data")
    jobs["data"] = ([sys.executable, script], d, _clean_env(dict(TINY, DATA_PATH=d / "no_such_data",
                                                                  TOKENIZER_PATH=smoke_dataset[1], LOG_DIR=d / "logs",
                                                                  OUTPUT_DIR=d, RUN_ID="t", COMPILE=0)))
    d = tmp_path_factory.mktemp("import_probe")
    (d / "cwd").mkdir()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # a torchrun-like environment: an import that set up distributed would hang or fail here
    jobs["import"] = ([sys.executable, "-c", IMPORT_PROBE, str(ROOT)], d, _clean_env(dict(
        RANK=0, WORLD_SIZE=2, LOCAL_RANK=0, MASTER_ADDR="127.0.0.1", MASTER_PORT=port, LOG_DIR=d / "logs",
        OUTPUT_DIR=d / "out", DATA_PATH=d / "data", RUN_ID="import_probe")))
    procs = {}
    for name, (cmd, folder, env) in jobs.items():
        cwd = folder / "cwd" if name == "import" else folder
        procs[name] = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    results = {}
    for name, proc in procs.items():
        try:
            out, err = proc.communicate(timeout=180)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        results[name] = (subprocess.CompletedProcess(proc.args, proc.returncode, out, err), jobs[name][1])
    return results


@pytest.mark.slow
def test_cli_config_error_exits_2(subprocess_runs):
    proc, folder = subprocess_runs["heads"]
    assert proc.returncode == 2, proc.stderr
    assert "NUM_HEADS" in _single_error_line(proc)
    assert not (folder / "logs").exists()


@pytest.mark.slow
def test_cli_missing_data_exits_2_with_hint(subprocess_runs):
    proc, folder = subprocess_runs["data"]
    assert proc.returncode == 2, proc.stderr
    line = _single_error_line(proc)
    assert str(folder / "no_such_data") in line and "cached_challenge_fineweb.py" in line and "smoke" in line
    assert not (folder / "final_model.int6.ptz").exists()


# ----------------------------------------------------------------------------------------------------
# 7. import has no side effects


@pytest.mark.slow
def test_import_has_no_side_effects(subprocess_runs):
    proc, folder = subprocess_runs["import"]
    assert proc.returncode == 0, proc.stderr
    out_lines = proc.stdout.strip().splitlines()
    assert len(out_lines) == 1, proc.stdout  # the import printed nothing
    info = json.loads(out_lines[0])
    assert info == {"dist_initialized": False, "threads_same": True, "torch_rng_same": True, "numpy_rng_same": True,
                    "cwd_entries": []}
    assert sorted(os.listdir(folder)) == ["cwd"] and os.listdir(folder / "cwd") == []


def test_stack_presets_and_explicit_settings_win():
    h = train_gpt.Hyperparameters({"STACK": "sp8192"})
    assert (h.vocab_size, h.bigram_buckets, h.ve_dim, h.embed_bits, h.embed_clip_k) == (8192, 0, 0, 7, 15.0)
    assert h.data_path.endswith("fineweb10B_sp8192") and h.tokenizer_path.endswith("fineweb_8192_bpe.model")
    assert h.num_layers == 11 and h.loop == (3, 5) and h.doc_isolation  # the rest as the SP1024 stack
    h = train_gpt.Hyperparameters({"STACK": "sp8192", "EMBED_BITS": "8", "BIGRAM_BUCKETS": "1024"})
    assert (h.embed_bits, h.bigram_buckets, h.vocab_size) == (8, 1024, 8192)
    assert train_gpt.Hyperparameters({}).vocab_size == 1024 and set(train_gpt.STACKS) == {"sp1024", "sp8192", "caseops"}
    for preset in train_gpt.STACKS.values():  # every preset names real settings, with values they accept
        assert set(preset) <= {n for n, *_ in train_gpt.HYPERPARAMETERS}
    with pytest.raises(ConfigError, match="STACK"):
        train_gpt.Hyperparameters({"STACK": "sp4096"})


@pytest.mark.slow
def test_largest_vocabulary_reads_trains_and_exports(tmp_path):
    """Shards hold uint16 ids, so 65,536 pieces is the ceiling: the top id survives the shard, the bigram hash, the
    byte tables and the export."""
    tokens = np.array([train_gpt.BOS_ID, 65535, 4, 65534, train_gpt.BOS_ID, 65535], dtype=np.int64)
    smoke_data.write_shard(tmp_path / "fineweb_val_000000.bin", tokens)
    assert train_gpt.read_shard(tmp_path / "fineweb_val_000000.bin").tolist() == tokens.tolist()
    h = make_h(VOCAB_SIZE=65536, MODEL_DIM=32, NUM_HEADS=2, NUM_KV_HEADS=1, ROPE_DIMS=8, NUM_LAYERS=2, XSA_LAST_N=-1)
    torch.manual_seed(0)
    model = train_gpt.build_model(h)
    ids = torch.from_numpy(tokens)[None]
    assert model.bigram.bucket_ids(ids).max() < h.bigram_buckets and torch.isfinite(model(ids, ids)).all()
    luts = train_gpt.build_byte_luts(_FakeSPVocab(65536))  # ids 65534 and 65535 are one-letter pieces
    assert luts[0].numel() == 65536 and train_gpt.target_bytes(luts, ids[:, :-1], ids[:, 1:]).tolist() == [[1, 1, 1, 0, 1]]
    blob, qstate, _ = train_gpt.export_artifact(model.state_dict(), make_h(VOCAB_SIZE=65536, BUDGET_FILL=0, ZSTD_LEVEL=1, MODEL_DIM=32,
                                               NUM_HEADS=2, NUM_KV_HEADS=1, ROPE_DIMS=8, NUM_LAYERS=2, XSA_LAST_N=-1), 0, log=lambda *a, **k: None)
    assert train_gpt.deserialize_quantized(blob)["tok_emb.weight"]["codes"].shape == (65536, 32)


class _FakeSPVocab:
    """A SentencePiece stand-in: ids 0-3 control, 4..259 bytes, the rest one-letter pieces, '▁' at id 260."""

    def __init__(self, size):
        self.size = size

    def vocab_size(self):
        return self.size

    def is_control(self, i):
        return i < 4

    is_unknown = is_unused = lambda self, i: False

    def is_byte(self, i):
        return 4 <= i < 260

    def id_to_piece(self, i):
        return "\u2581" if i == 260 else "a"

    def piece_to_id(self, piece):
        return 260

    def unk_id(self):
        return 3
