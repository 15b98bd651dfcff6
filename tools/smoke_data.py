"""Build a small English dataset in the official shard format from the Python standard library's docstrings.

No download: every Python installation carries this text. A 1024-piece SentencePiece BPE model is trained on
the train split with the challenge's official trainer settings, then each docstring becomes one document
[BOS] + encode(text) in fineweb_train_000000.bin / fineweb_val_000000.bin. The result is cached in OUT_DIR
(rebuilt when missing). This is not FineWeb: use it for smoke runs and tests only.

    python tools/smoke_data.py [OUT_DIR]          # default: data/smoke
"""
from __future__ import annotations

import ast
import hashlib
import os
import random
import sys
import sysconfig
from pathlib import Path

import numpy as np

SHARD_MAGIC, SHARD_VERSION = 20240520, 1
OFFICIAL_TRAINER_SETTINGS = dict(
    model_type="bpe", character_coverage=0.999, byte_fallback=True, split_digits=True,
    normalization_rule_name="nmt_nfkc", add_dummy_prefix=False, pad_id=0, bos_id=1, eos_id=2, unk_id=3,
    hard_vocab_limit=False,
)


def write_shard(path, tokens):
    """Official shard: 256 little-endian int32 header [magic, version, n_tokens, 0...] then uint16 tokens."""
    tokens = np.asarray(tokens)
    if tokens.size and (tokens.min() < 0 or tokens.max() >= 2**16):
        raise ValueError("token ids must fit in uint16")
    header = np.zeros(256, dtype="<i4")
    header[:3] = (SHARD_MAGIC, SHARD_VERSION, tokens.size)
    with open(path, "wb") as f:
        f.write(header.tobytes())
        f.write(tokens.astype("<u2").tobytes())


def stdlib_docstrings(min_chars=200, max_docs=None):
    """Module, class and function docstrings of the standard library, in a fixed (sorted) order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    docs = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).parts
        if any(p in ("test", "tests", "idle_test", "site-packages") for p in rel):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in [tree, *ast.walk(tree)]:
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) >= min_chars:
                    docs.append(doc)
        if max_docs and len(docs) >= max_docs:
            break
    return docs[:max_docs] if max_docs else docs


def train_tokenizer(texts, model_prefix, vocab_size=1024):
    import sentencepiece as spm

    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_prefix=str(model_prefix), vocab_size=vocab_size,
        input_sentence_size=0, shuffle_input_sentence=False, max_sentence_length=1 << 20, num_threads=2,
        minloglevel=2, **OFFICIAL_TRAINER_SETTINGS)
    return spm.SentencePieceProcessor(model_file=f"{model_prefix}.model")


def encode_documents(sp, texts):
    out = []
    for ids in sp.encode(list(texts)):
        out.append(1)  # BOS
        out.extend(ids)
    return np.array(out, dtype=np.int64)


def build_dataset(out_dir, max_docs=6000, val_every=20, vocab_size=1024):
    """Write tokenizer + shards to out_dir; returns (data_path, tokenizer_path). Every val_every-th doc is val.
    Documents are shuffled (fixed seed) as FineWeb's are: in file order, one module's near-identical docstrings
    (e.g. 20K tokens of decimal doctests) come in a block, which a model fits and then fails on the next block."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    docs = stdlib_docstrings(max_docs=max_docs)
    random.Random(1337).shuffle(docs)
    val = docs[::val_every]
    train = [d for i, d in enumerate(docs) if i % val_every]
    sp = train_tokenizer(train, out_dir / "smoke_1024_bpe", vocab_size)
    write_shard(out_dir / "fineweb_train_000000.bin", encode_documents(sp, train))
    write_shard(out_dir / "fineweb_val_000000.bin", encode_documents(sp, val))
    return out_dir, out_dir / "smoke_1024_bpe.model"


def cached_dataset(out_dir):
    """build_dataset once per Python version (its stdlib is the text); later calls reuse the files."""
    out_dir = Path(out_dir)
    stamp = out_dir / "STAMP"
    key = hashlib.sha256(f"{sys.version}|{sysconfig.get_paths()['stdlib']}|v2".encode()).hexdigest()
    if not (stamp.exists() and stamp.read_text() == key):
        build_dataset(out_dir)
        stamp.write_text(key)
    return out_dir, out_dir / "smoke_1024_bpe.model"


if __name__ == "__main__":
    data, tok = cached_dataset(sys.argv[1] if len(sys.argv) > 1 else os.path.join("data", "smoke"))
    print(f"DATA_PATH={data} TOKENIZER_PATH={tok}")
