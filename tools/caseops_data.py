"""CaseOps data: turn any shards + tokenizer into lossless-case shards, a retrained tokenizer and a validation byte sidecar.

CaseOps (the records since 04-18) lower-cases every maximal run of ASCII letters and says how it was cased with
reserved control characters: TITLE (first letter upper, the rest lower), ALLCAPS (two or more letters, all upper),
CAPNEXT (before each upper letter of any other mixed-case word, after an optional TITLE for an upper first
letter), and ESC before a control character that is literally in the text. A tokenizer then reuses one lower-case
piece for every casing. The transform is a bijection, so val_bpb can still be charged to the original UTF-8 bytes:
`fineweb_val_bytes_*.bin` (the shard format, one count per token, BOS 0) holds each token's original bytes.

    python3 tools/caseops_data.py SRC_DIR SRC_TOKENIZER OUT_DIR [--vocab 8192] [--tokenizer-docs N]

reads SRC_DIR/fineweb_{train,val}_*.bin, decodes each document with SRC_TOKENIZER, trains a SentencePiece model on
the transformed train documents (the official trainer settings, the four controls reserved as user-defined
pieces) and writes OUT_DIR/caseops_<vocab>_bpe.model, the shards and the sidecar. Every validation document is
checked: its tokens decode (and un-case) back to the exact source text and its sidecar counts sum to its UTF-8
bytes. `restore_documents` is the inverse: shard tokens back to the original text.
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train_gpt  # noqa: E402
from smoke_data import OFFICIAL_TRAINER_SETTINGS, write_shard  # noqa: E402

TITLE, ALLCAPS, CAPNEXT, ESC = "\ue001", "\ue002", "\ue003", "\ue004"  # the records' code points (private use)
CONTROLS = (TITLE, ALLCAPS, CAPNEXT, ESC)
BOS_ID, SHARD_TOKENS = 1, 10_000_000
WORD_OR_CONTROL = re.compile("[A-Za-z]+|[\ue001-\ue004]")
CASED_WORD = re.compile("\ue004(.)|([\ue001\ue002]?)((?:\ue003?[a-z])+)|([\ue001-\ue004])", re.S)
CAPNEXT_LETTER = re.compile("\ue003([a-z])")


class CaseOpsError(ValueError):
    """Text that no original text transforms into."""


def case_word(match):
    """One maximal ASCII-letter word (or a literal control character) in CaseOps form."""
    word = match.group()
    if word in CONTROLS:
        return ESC + word
    lower = word.lower()
    if word == lower:
        return word
    if len(word) > 1 and word == word.upper():
        return ALLCAPS + lower
    if word[1:] == lower[1:]:
        return TITLE + lower
    rest = "".join(CAPNEXT + c.lower() if c.isupper() else c for c in word[1:])
    return (TITLE if word[0].isupper() else "") + lower[0] + rest


def encode_caseops(text):
    """The CaseOps transform of `text` (lower-cased letters, case as control characters)."""
    return WORD_OR_CONTROL.sub(case_word, text)


def uncase_word(match):
    """The original of one escaped control or one cased word (an optional TITLE/ALLCAPS, then letters with CAPNEXTs)."""
    escaped, mode, letters, stray = match.groups()
    if stray is not None or (escaped is not None and escaped not in CONTROLS):
        raise CaseOpsError(f"a control character out of place near {match.string[max(match.start() - 20, 0):match.end() + 20]!r}")
    if escaped is not None:
        return escaped
    if mode == ALLCAPS:
        return letters.replace(CAPNEXT, "").upper()
    word = CAPNEXT_LETTER.sub(lambda m: m.group(1).upper(), letters)
    return word[0].upper() + word[1:] if mode == TITLE else word


def decode_caseops(text):
    """The original text of a CaseOps text; CaseOpsError when no text transforms into it."""
    return CASED_WORD.sub(uncase_word, text)


def token_original_bytes(sp, ids):
    """Original UTF-8 bytes of each token of one transformed document: its surface bytes (a piece's text with '▁'
    as a space, a byte piece one byte), none for a control that acts as an operator (one not escaped by ESC)."""
    counts, escaped = np.zeros(len(ids), dtype=np.int64), False
    for i, t in enumerate(ids):
        piece = sp.id_to_piece(t)
        if piece in CONTROLS and not escaped:
            escaped = piece == ESC
            continue
        escaped = False
        counts[i] = 1 if sp.is_byte(t) else 0 if sp.is_control(t) or sp.is_unknown(t) else len(piece.replace("\u2581", " ").encode())
    return counts


def split_documents(tokens):
    """Token lists of the documents of a shard stream (each starts at a BOS, which is dropped)."""
    starts = np.flatnonzero(tokens == BOS_ID)
    return [tokens[a + 1:b].tolist() for a, b in zip(starts, list(starts[1:]) + [len(tokens)])]


def restore_documents(sp, tokens):
    """The inverse of the data tool: CaseOps shard tokens back to the original documents' text."""
    return [decode_caseops(sp.decode(ids)) for ids in split_documents(np.asarray(tokens))]


def read_split(src, split):
    return np.concatenate([np.asarray(train_gpt.read_shard(f)) for f in train_gpt.find_shards(str(src), split)[1]])


def write_shards(out_dir, name, stream):
    """`stream` cut into SHARD_TOKENS pieces as fineweb_<name>_000000.bin, ... (a sidecar is cut where its shards are)."""
    for k, start in enumerate(range(0, max(len(stream), 1), SHARD_TOKENS)):
        write_shard(out_dir / f"fineweb_{name}_{k:06d}.bin", stream[start:start + SHARD_TOKENS])


def train_caseops_tokenizer(texts, model_prefix, vocab_size):
    import sentencepiece as spm

    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_prefix=str(model_prefix), vocab_size=vocab_size, user_defined_symbols=list(CONTROLS),
        input_sentence_size=0, shuffle_input_sentence=False, max_sentence_length=1 << 24, num_threads=1, minloglevel=2,
        **OFFICIAL_TRAINER_SETTINGS)
    return spm.SentencePieceProcessor(model_file=f"{model_prefix}.model")


def build_caseops(src, src_tokenizer, out_dir, vocab_size=8192, tokenizer_docs=None, log=print):
    """Write the CaseOps tokenizer, shards and validation sidecar to out_dir; returns (out_dir, tokenizer path)."""
    import sentencepiece as spm

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    src_sp = spm.SentencePieceProcessor(model_file=str(src_tokenizer))
    docs = {split: src_sp.decode(split_documents(read_split(src, split))) for split in ("train", "val")}
    cased = {split: [encode_caseops(d) for d in texts] for split, texts in docs.items()}
    log(f"caseops: {len(docs['train'])} train and {len(docs['val'])} val documents decoded and transformed")
    sp = train_caseops_tokenizer(cased["train"][:tokenizer_docs], out_dir / f"caseops_{vocab_size}_bpe", vocab_size)
    for split in ("train", "val"):
        encoded = sp.encode(cased[split])
        write_shards(out_dir, split, np.array([t for ids in encoded for t in [BOS_ID, *ids]], dtype=np.int64))
        if split == "val":
            counts = [np.concatenate([[0], token_original_bytes(sp, ids)]) for ids in encoded]
            for i, (text, ids, c) in enumerate(zip(docs["val"], encoded, counts)):
                if decode_caseops(sp.decode(ids)) != text or int(c.sum()) != len(text.encode()):
                    raise SystemExit(f"error: val document {i} does not round-trip exactly ({int(c.sum())} sidecar bytes, "
                                     f"{len(text.encode())} text bytes); is its text normalised by the source tokenizer?")
            write_shards(out_dir, "val_bytes", np.concatenate(counts))
            log(f"caseops: val {sum(len(ids) + 1 for ids in encoded)} tokens, {sum(len(d.encode()) for d in docs['val'])} "
                f"original bytes in the sidecar; every document round-trips")
    return out_dir, out_dir / f"caseops_{vocab_size}_bpe.model"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("src", help="folder with fineweb_train_*.bin and fineweb_val_*.bin")
    ap.add_argument("src_tokenizer", help="SentencePiece model of the source shards")
    ap.add_argument("out", help="output folder")
    ap.add_argument("--vocab", type=int, default=8192, help="pieces of the CaseOps tokenizer")
    ap.add_argument("--tokenizer-docs", type=int, default=None, help="train the tokenizer on the first N train documents (default all)")
    args = ap.parse_args()
    data, tokenizer = build_caseops(args.src, args.src_tokenizer, args.out, args.vocab, args.tokenizer_docs)
    print(f"DATA_PATH={data} TOKENIZER_PATH={tokenizer}")


if __name__ == "__main__":
    main()
