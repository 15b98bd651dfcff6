"""CaseOps and byte sidecars: the transform round-trips any text, the data tool's sidecar sums to the original
bytes, the scorer charges target t the sidecar's count t+1, the sidecar is no val shard, and a run charged from a
sidecar scores exactly what the counts say (RULES.md section 7)."""
import math
import re
import shutil

import numpy as np
import pytest
import torch

import caseops_data
import smoke_data
import train_gpt
from caseops_data import ALLCAPS, CAPNEXT, ESC, TITLE, decode_caseops, encode_caseops
from conftest import DOCS_TINY, DOCS_TOKENIZER, make_h, run_train, tiny_run_env

ADVERSARIAL = ["", "The NASA Launch", "iPhone McDonald aB ABc A a Z", "HTTPServer getHTTPResponse XMLHttpRequest",
               TITLE + ALLCAPS + CAPNEXT + ESC, f"x{ESC}", f"{ESC}{ESC}A", f"Word{TITLE}Word {CAPNEXT}b",
               "Émile ÉCOLE straße ÅÄÖ ǅ ﬁ İstanbul", "123abcDEF4G 0xFF 3D", "  two  spaces\n\tTab\r\n",
               "snake_case_Name CONSTANT_VALUE", "\u2581lead PUA \ue000\ue005 emoji 🙂 Ok"]


def test_transform_round_trips_adversarial_text():
    for text in ADVERSARIAL + ["".join(ADVERSARIAL)]:
        cased = encode_caseops(text)
        assert decode_caseops(cased) == text, repr(text)
        assert not re.search("[A-Z]", cased)  # every ASCII capital became a control
    assert encode_caseops("The NASA iPhone") == f"{TITLE}the {ALLCAPS}nasa i{CAPNEXT}phone"
    for bad in (TITLE, f"{TITLE} a", f"a{ESC}", f"{ESC}x", CAPNEXT, f"{ALLCAPS}1"):
        with pytest.raises(caseops_data.CaseOpsError):
            decode_caseops(bad)


def sidecar_fixture(tmp_path, tokens, counts):
    smoke_data.write_shard(tmp_path / "fineweb_val_000000.bin", tokens)
    smoke_data.write_shard(tmp_path / "fineweb_val_bytes_000000.bin", counts)
    return str(tmp_path)


def test_sidecar_is_no_val_shard_and_must_fit(tmp_path):
    tokens = [1, 5, 6, 7, 1, 8, 9]
    data = sidecar_fixture(tmp_path, tokens, [0, 1, 2, 3, 0, 4, 5])
    assert [p.rsplit("/", 1)[1] for p in train_gpt.find_shards(data, "val")[1]] == ["fineweb_val_000000.bin"]
    assert train_gpt.load_validation_tokens(data, 2)[1].tolist() == tokens[:7]
    pattern, counts = train_gpt.load_byte_sidecar(data)
    assert pattern.endswith("fineweb_val_bytes_*.bin") and counts.tolist() == [0, 1, 2, 3, 0, 4, 5]
    smoke_data.write_shard(tmp_path / "fineweb_val_bytes_000000.bin", [0, 1, 2, 3, 0, 4])  # one short
    with pytest.raises(train_gpt.DataError, match="holds 6 counts but the validation shards hold 7 tokens"):
        train_gpt.load_byte_sidecar(data)
    (tmp_path / "fineweb_val_bytes_000000.bin").write_bytes(b"\0" * 1030)  # not the shard format
    with pytest.raises(train_gpt.DataError, match="fineweb_val_bytes_000000.bin: bad magic"):
        train_gpt.load_byte_sidecar(data)
    (tmp_path / "fineweb_val_bytes_000000.bin").unlink()
    assert train_gpt.load_byte_sidecar(data) is None


def test_scorer_charges_each_target_the_count_of_the_token_it_predicts():
    """A sidecar of twice the piece-table bytes halves val_bpb exactly, on sliding and non-overlapping windows;
    a sidecar of position numbers shows target t is charged count t+1."""
    V, L = 64, 16
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(2, V, (8 * L + 1,), generator=g)
    tokens[::37] = train_gpt.BOS_ID
    luts = (torch.randint(0, 5, (V,), generator=g), torch.rand(V, generator=g) < 0.5, torch.arange(V) < 2)
    table = torch.randn(V, V, generator=g) * 3
    doubled = torch.cat([torch.zeros(1, dtype=torch.int64), 2 * train_gpt.target_bytes(luts, tokens[:-1], tokens[1:])])
    for stride in (L, L // 4):
        plain = train_gpt.evaluate(lambda x: table[x], tokens, luts, L, stride, 4)
        side = train_gpt.evaluate(lambda x: table[x], tokens, doubled, L, stride, 4)
        assert side["bytes"] == 2 * plain["bytes"] and side["tokens"] == plain["tokens"] and side["val_loss"] == plain["val_loss"]
        assert side["val_bpb"] == plain["val_bpb"] / 2
    scorer = train_gpt.Scorer(tokens, torch.arange(tokens.numel() + 5), record=True)  # longer than the cut stream: fine
    train_gpt.score_windows(lambda x: table[x], scorer, train_gpt.window_starts(scorer.n, L, L), L, L, 4)
    assert scorer.bytes.tolist() == list(range(1, tokens.numel()))


def documents_with_case(n):
    docs = smoke_data.stdlib_docstrings(max_docs=n)
    return docs[:-2] + [docs[-2] + " " + " ".join(ADVERSARIAL), ""]


def test_data_tool_sidecar_sums_to_original_bytes_and_restores_text(tmp_path):
    """Shards + tokenizer -> CaseOps shards, tokenizer with the controls reserved, and a sidecar whose counts sum to
    the UTF-8 bytes of every source document; restore_documents gives the source text back."""
    docs = documents_with_case(160)
    src = tmp_path / "src"
    src.mkdir()
    sp_src = smoke_data.train_tokenizer(docs[20:], src / "src", vocab_size=400)
    smoke_data.write_shard(src / "fineweb_train_000000.bin", smoke_data.encode_documents(sp_src, docs[20:]))
    smoke_data.write_shard(src / "fineweb_val_000000.bin", smoke_data.encode_documents(sp_src, docs[:20] + docs[-1:]))
    data, tok = caseops_data.build_caseops(src, src / "src.model", tmp_path / "out", vocab_size=500, log=lambda _: None)
    sp = train_gpt.load_tokenizer(str(tok))
    assert all(sp.piece_to_id(c) != sp.unk_id() for c in caseops_data.CONTROLS)
    originals = [sp_src.decode(ids) for ids in caseops_data.split_documents(train_gpt.read_shard(src / "fineweb_val_000000.bin"))]
    val = np.asarray(train_gpt.read_shard(data / "fineweb_val_000000.bin"))
    counts = np.asarray(train_gpt.read_shard(data / "fineweb_val_bytes_000000.bin"))
    assert len(counts) == len(val) and (counts[val == train_gpt.BOS_ID] == 0).all()
    assert int(counts.sum()) == sum(len(t.encode()) for t in originals)
    assert caseops_data.restore_documents(sp, val) == originals
    train = np.asarray(train_gpt.read_shard(data / "fineweb_train_000000.bin"))
    assert caseops_data.restore_documents(sp, train) == [sp_src.decode(ids) for ids in caseops_data.split_documents(
        train_gpt.read_shard(src / "fineweb_train_000000.bin"))]


def final_line(log, tag="final_int6_sliding_window"):
    loss, bpb = re.findall(rf"{tag}_exact val_loss:([0-9.]+) val_bpb:([0-9.]+)", log)[-1]
    targets, nbytes = re.findall(rf"{tag}_counts targets:(\d+) bytes:(\d+)", log)[-1]
    return float(loss), float(bpb), int(targets), int(nbytes)


@pytest.mark.slow
@pytest.mark.skipif(not (DOCS_TINY.exists() and DOCS_TOKENIZER.exists()), reason="../shared/data/docs_sp1024_tiny is absent")
def test_eval_artifact_charged_from_a_sidecar(tmp_path):
    """The issue's check on docs tiny (its val cut to 4,097 tokens to stay fast): a sidecar of twice the piece-table
    bytes halves an EVAL_ARTIFACT's val_bpb exactly, the run's loss/bpb ratio is ln 2 x sidecar bytes / targets, and
    a sidecar one token short ends the run with one `error:` line (exit 2, no traceback)."""
    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(DOCS_TINY / "fineweb_train_000000.bin", data)
    val = np.asarray(train_gpt.read_shard(DOCS_TINY / "fineweb_val_000000.bin"))[:4097].astype(np.int64)
    smoke_data.write_shard(data / "fineweb_val_000000.bin", val)
    env = tiny_run_env((data, DOCS_TOKENIZER), ITERATIONS="3", EVAL_STRIDE="64", RUN_ID="plain")
    proc, log = run_train(env, tmp_path / "train")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "val_bytes: piece table of the tokenizer" in log
    plain = final_line(log)

    luts = train_gpt.build_byte_luts(train_gpt.load_tokenizer(str(DOCS_TOKENIZER)))
    t = torch.from_numpy(val)
    doubled = np.concatenate([[0], 2 * train_gpt.target_bytes(luts, t[:-1], t[1:]).numpy()])
    smoke_data.write_shard(data / "fineweb_val_bytes_000000.bin", doubled)
    artifact = tmp_path / "train" / "final_model.int6.ptz"
    proc, log = run_train(dict(env, EVAL_ARTIFACT=str(artifact), RUN_ID="sidecar"), tmp_path / "eval")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "val_bytes: byte sidecar " in log and "val_bytes: read 4097 counts" in log
    loss, bpb, targets, nbytes = final_line(log)
    assert (loss, targets, nbytes) == (plain[0], plain[2], 2 * plain[3]) and nbytes == int(doubled[1:].sum())
    assert bpb == pytest.approx(plain[1] / 2, rel=1e-8, abs=0)
    assert loss / bpb == pytest.approx(math.log(2) * nbytes / targets, rel=1e-7)

    smoke_data.write_shard(data / "fineweb_val_bytes_000000.bin", doubled[:-1])
    proc, _ = run_train(dict(env, EVAL_ARTIFACT=str(artifact), RUN_ID="short"), tmp_path / "short")
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "holds 4096 counts but the validation shards hold 4097 tokens" in errors[0]


def test_an_eval_artifact_run_reads_no_validation_data_before_the_eval_clock(tmp_path, monkeypatch, smoke_dataset):
    """Start-up of an EVAL_ARTIFACT run names the byte source but reads neither sidecar nor tokens: both are read by
    the evaluation, inside the eval clock (Data.validation)."""
    data = tmp_path / "data"
    data.mkdir()
    smoke_data.write_shard(data / "fineweb_val_000000.bin", np.array([1, 5, 6, 1, 7, 8, 9]))
    smoke_data.write_shard(data / "fineweb_val_bytes_000000.bin", np.array([0, 1, 2, 0, 3, 4, 5]))
    (tmp_path / "model.ptz").write_bytes(b"x")
    h = make_h(DATA_PATH=str(data), TOKENIZER_PATH=str(smoke_dataset[1]), EVAL_ARTIFACT=str(tmp_path / "model.ptz"),
               EVAL_SEQ_LEN=3, EVAL_STRIDE=3)
    lines = []
    run = train_gpt.Run(h, 0, 1, torch.device("cpu"), lambda m, **k: lines.append(m))
    monkeypatch.setattr(train_gpt, "read_shard", lambda path: pytest.fail(f"read {path} at start-up"))
    data_ = train_gpt.Data(run)
    assert any(line.startswith("val_bytes: byte sidecar ") for line in lines)
    monkeypatch.undo()
    tokens, luts = data_.validation(run)
    assert luts.tolist() == [0, 1, 2, 0, 3, 4, 5] and tokens.numel() == 7


def test_wd_taper_and_caseops_stack():
    h = train_gpt.Hyperparameters({"WD_TAPER_START_FRAC": "0.7", "WD_TAPER_FINAL_MULT": "0.5"})
    assert [train_gpt.wd_multiplier(h, f) for f in (0.0, 0.7, 0.85, 1.0, 1.2)] == pytest.approx([1, 1, 0.75, 0.5, 0.5])
    off = train_gpt.Hyperparameters({"WD_TAPER_START_FRAC": "1"})
    assert {train_gpt.wd_multiplier(off, f) for f in (0.0, 0.99, 1.0, 1.5)} == {1.0}
    with pytest.raises(train_gpt.ConfigError, match="WD_TAPER_START_FRAC"):
        train_gpt.Hyperparameters({"WD_TAPER_START_FRAC": "1.5"})
    sp8192, caseops = (train_gpt.Hyperparameters({"STACK": s}) for s in ("sp8192", "caseops"))
    differ = {n for n, *_ in train_gpt.HYPERPARAMETERS if getattr(sp8192, n.lower()) != getattr(caseops, n.lower())}
    assert {"DATA_PATH", "TOKENIZER_PATH"} <= differ <= {"STACK", "RUN_ID", "DATA_PATH", "TOKENIZER_PATH", "WD_TAPER_START_FRAC", "WD_TAPER_FINAL_MULT", "LQER_TOP_K"}
    assert "caseops" in caseops.data_path and "caseops" in caseops.tokenizer_path and caseops.vocab_size == 8192


def test_lqer_is_a_rung_of_the_allocation_taken_where_it_pays():
    """LQER_TOP_K=2 offers both matrices each grid plus rank-4 int2 x int4 factors. Under a cap at their natural size,
    the allocation corrects the one whose rounding error is low-rank (weights on their grid plus a rank-1 offset of
    0.3 steps: the factors remove most of its error for ~1 kB) and pays for it by coarsening the other: less total
    error in the same bytes than without LQER. The factors survive the artifact round trip."""
    torch.manual_seed(0)
    w0 = 0.03 * torch.randn(256, 256)
    s0 = train_gpt.sdclip_scales(w0, 6, 12.0)
    u, v = (torch.randint(0, 2, (n,)) * 2 - 1 for n in (256, 256))
    structured = train_gpt.quantize_rows(w0, s0, 6) * s0[:, None] + 0.3 * s0[:, None] * (u[:, None] * v[None, :])
    state = {"blocks.0.mlp.fc.weight": structured, "blocks.0.mlp.proj.weight": 0.03 * torch.randn(256, 256)}
    natural, _, _ = train_gpt.export_artifact(state, make_h(ZSTD_LEVEL=9, BUDGET_FILL=0), 0, log=lambda *a, **k: None)
    cap = len(natural) + train_gpt.TARGET_SLACK
    errors = {}
    for k in (0, 2):
        blob, q, report = train_gpt.export_artifact(state, make_h(ZSTD_LEVEL=9, LQER_TOP_K=k, ARTIFACT_CAP_BYTES=cap), 0,
                                                    log=lambda *a, **k: None)
        deq = train_gpt.dequantize_state(train_gpt.deserialize_quantized(blob))
        assert len(blob) <= cap and all(torch.equal(deq[n], train_gpt.dequantize_entry(q[n])) for n in state)
        errors[k] = {n: float((state[n] - deq[n]).square().sum()) for n in state}
        assert report["lqer"] == ([] if k == 0 else ["blocks.0.mlp.fc.weight"] + report["lqer"][1:])
    assert errors[2]["blocks.0.mlp.fc.weight"] < 0.2 * errors[0]["blocks.0.mlp.fc.weight"]
    assert errors[2]["blocks.0.mlp.proj.weight"] > errors[0]["blocks.0.mlp.proj.weight"]  # coarsened to pay
    assert sum(errors[2].values()) < 0.8 * sum(errors[0].values())
