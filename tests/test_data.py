"""The pretraining data pipeline: corpus sources, exact / near duplicate removal, validation split, token shards
(prepare + TokenShards), resume, and the `llama2 data` commands. Oracles: pydoc_data.topics for the text,
SentencePiece itself for the token ids, Python sets for Jaccard similarity."""

from __future__ import annotations

import hashlib
import json
import pickle
import re
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm
from pydoc_data.topics import topics

from llama2.cli import main
from llama2.data import sources
from llama2.data.corpus import build_corpus
from llama2.data.dedup import MinHasher, jaccard, lsh_params
from llama2.data.prepare import is_val, prepare_shards
from llama2.data.shards import TokenShards, token_dtype
from llama2.errors import Llama2Error
from llama2.tokenizer import Tokenizer

TOPICS = [topics[k].strip() for k in sorted(topics) if topics[k].strip()]


def read_jsonl(path: Path) -> list[str]:
    return [json.loads(line)["text"] for line in path.read_text(encoding="utf-8").splitlines()]


def write_jsonl(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    return path


def words(text: str, n: int) -> str:
    return " ".join(text.split()[:n])


def dir_bytes(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


def sp_encode(model: Path | bytes, texts: list[str]) -> list[list[int]]:
    sp = spm.SentencePieceProcessor()
    if isinstance(model, bytes):
        sp.LoadFromSerializedProto(model)
    else:
        sp.Load(str(model))
    return [sp.encode(t, add_bos=True, add_eos=True) for t in texts]


def big_vocab_model(sp_model_path: Path, extra: int) -> bytes:
    """The fixture tokenizer plus `extra` user-defined pieces "<x00000>"... (ids 1000...)."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    m = pb.ModelProto()
    m.ParseFromString(sp_model_path.read_bytes())
    for i in range(extra):
        p = m.pieces.add()
        p.piece, p.score, p.type = f"<x{i:05d}>", 0.0, pb.ModelProto.SentencePiece.USER_DEFINED
    return m.SerializeToString()


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory) -> Path:
    """A hand-made corpus directory: 60 pydoc topics cut to at most 300 words in train, 8 in val."""
    d = tmp_path_factory.mktemp("corpus")
    write_jsonl(d / "train.jsonl", [words(t, 300) for t in TOPICS[:60]])
    write_jsonl(d / "val.jsonl", [words(t, 300) for t in TOPICS[60:68]])
    return d


# ---------------------------------------------------------------------------------------------------------------
# Corpus


def test_pydoc_corpus_stats(tmp_path):
    stats = build_corpus(["pydoc"], [], tmp_path, val_fraction=0.1, seed=3, quiet=True)
    train, val = read_jsonl(tmp_path / "train.jsonl"), read_jsonl(tmp_path / "val.jsonl")
    assert json.loads((tmp_path / "stats.json").read_text()) == stats
    assert stats["documents_in"] == stats["documents_per_source"]["pydoc"] == len(TOPICS)
    # independent count of exact duplicates: same text up to case and spacing as an earlier topic
    seen, dups = set(), 0
    for t in TOPICS:
        key = " ".join(t.lower().split())
        dups += key in seen
        seen.add(key)
    assert stats["exact_duplicates_removed"] == dups
    kept = len(TOPICS) - stats["exact_duplicates_removed"] - stats["near_duplicates_removed"]
    assert stats["documents_kept"] == kept == len(train) + len(val)
    assert stats["splits"]["val"]["documents"] == len(val) == round(kept * 0.1)
    assert stats["splits"]["train"]["chars"] == sum(map(len, train))
    assert stats["splits"]["val"]["chars"] == sum(map(len, val))
    assert set(train + val) <= set(TOPICS)
    assert stats["minhash"]["bands"] * stats["minhash"]["rows"] <= stats["minhash"]["num_perm"] == 128


def test_exact_and_near_duplicates_counted(tmp_path):
    long_doc = words(TOPICS[5], 400)
    assert len(long_doc.split()) == 400
    ws = long_doc.split()
    ws[200] = "zebra"
    one_word_changed = " ".join(ws)
    short = "Return the number of items in the container, counting every nested element once."
    short_changed = short.replace("nested", "visible")
    docs = [long_doc, words(TOPICS[10], 300), long_doc,  # exact copy
            "  " + long_doc.upper().replace(" ", "\n  ") + "\n",  # same text up to case and spacing
            one_word_changed,  # near duplicate of a long document
            words(TOPICS[20], 300), short, short_changed,  # a short text one word apart is not near (Jaccard ~ 0.4)
            words(TOPICS[30], 300)]
    path = write_jsonl(tmp_path / "docs.jsonl", docs)
    stats = build_corpus(["files"], [path], tmp_path / "out", val_fraction=0.0, quiet=True)
    assert stats["documents_in"] == 9
    assert stats["exact_duplicates_removed"] == 2
    assert stats["near_duplicates_removed"] == 1
    kept = read_jsonl(tmp_path / "out" / "train.jsonl")
    assert sorted(kept) == sorted([long_doc, words(TOPICS[10], 300), words(TOPICS[20], 300), short, short_changed,
                                   words(TOPICS[30], 300)])  # the first occurrence is the one kept
    assert read_jsonl(tmp_path / "out" / "val.jsonl") == []
    # with a threshold above the pair's similarity the changed copy stays
    stats = build_corpus(["files"], [path], tmp_path / "out2", val_fraction=0.0, near_dup_threshold=1.0, quiet=True)
    assert stats["near_duplicates_removed"] == 0 and stats["documents_kept"] == 7


def _shingles(text: str, k: int = 5) -> set[str]:
    w = re.findall(r"\w+", text.lower())
    return {" ".join(w[i:i + k]) for i in range(len(w) - k + 1)}


def test_minhash_estimates_jaccard_and_lsh_threshold():
    base = words(" ".join(TOPICS[:3]), 600).split()
    rng = np.random.default_rng(0)
    hasher = MinHasher()
    for n_changed in (0, 6, 30, 120, 400):
        other = list(base)
        for i in rng.choice(len(base), n_changed, replace=False):
            other[i] = f"w{i}"
        a, b = " ".join(base), " ".join(other)
        true = len(_shingles(a) & _shingles(b)) / len(_shingles(a) | _shingles(b))
        est = jaccard(hasher.signature(a), hasher.signature(b))
        assert abs(est - true) < 0.12, (n_changed, est, true)
    for t in (0.5, 0.8, 0.9):
        bands, rows = lsh_params(t)
        assert abs((1 / bands) ** (1 / rows) - t) < 0.1  # the S-curve's steepest point sits near the threshold
    with pytest.raises(Llama2Error, match="threshold"):
        lsh_params(1.5)


def test_val_split_by_document_deterministic_and_disjoint(tmp_path):
    a = build_corpus(["pydoc"], [], tmp_path / "a", val_fraction=0.2, seed=7, quiet=True)
    build_corpus(["pydoc"], [], tmp_path / "b", val_fraction=0.2, seed=7, quiet=True)
    build_corpus(["pydoc"], [], tmp_path / "c", val_fraction=0.2, seed=8, quiet=True)
    assert dir_bytes(tmp_path / "a") == dir_bytes(tmp_path / "b")
    train, val = read_jsonl(tmp_path / "a" / "train.jsonl"), read_jsonl(tmp_path / "a" / "val.jsonl")
    assert not set(train) & set(val) and len(set(train + val)) == a["documents_kept"]
    assert len(val) == round(a["documents_kept"] * 0.2) > 0
    assert set(read_jsonl(tmp_path / "c" / "val.jsonl")) != set(val)


def test_files_source_txt_and_errors(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.txt").write_text(words(TOPICS[1], 50) + "\n\n" + words(TOPICS[2], 50) + "\n")
    (tmp_path / "in" / "b.txt").write_text(words(TOPICS[3], 50))
    stats = build_corpus(["files"], [tmp_path / "in"], tmp_path / "out", val_fraction=0.0, quiet=True)
    assert stats["documents_in"] == 2  # one document per .txt file, blank lines inside kept
    assert sorted(read_jsonl(tmp_path / "out" / "train.jsonl")) == sorted(
        [words(TOPICS[1], 50) + "\n\n" + words(TOPICS[2], 50), words(TOPICS[3], 50)])

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n\n{"text": "broken"\n')
    with pytest.raises(Llama2Error, match=re.escape(f"{bad}:3")):
        build_corpus(["files"], [bad], tmp_path / "o2", quiet=True)
    bad.write_text('{"text": "fine"}\n{"body": "no text"}\n')
    with pytest.raises(Llama2Error, match=re.escape(f"{bad}:2") + '.*"text"'):
        build_corpus(["files"], [bad], tmp_path / "o3", quiet=True)
    with pytest.raises(Llama2Error, match="not found"):
        build_corpus(["files"], [tmp_path / "nope.txt"], tmp_path / "o4", quiet=True)
    with pytest.raises(Llama2Error, match="unknown corpus source 'wiki'"):
        build_corpus(["wiki"], [], tmp_path / "o5", quiet=True)
    assert not (tmp_path / "o2").exists() and not (tmp_path / "o3").exists()


def test_python_docs_source(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "PYTHON_DOCS_ROOT", tmp_path / "missing")
    with pytest.raises(Llama2Error, match=re.escape("apt-get install python3.11-doc")):
        build_corpus(["python-docs"], [], tmp_path / "out", quiet=True)
    root = tmp_path / "_sources"
    (root / "faq").mkdir(parents=True)
    (root / "faq" / "general.rst.txt").write_text(words(TOPICS[4], 80))
    (root / "tutorial.rst.txt").write_text(words(TOPICS[6], 80))
    (root / "ignored.txt").write_text("not a documentation source")
    monkeypatch.setattr(sources, "PYTHON_DOCS_ROOT", root)
    stats = build_corpus(["python-docs"], [], tmp_path / "out", val_fraction=0.0, quiet=True)
    assert stats["documents_in"] == 2
    assert sorted(read_jsonl(tmp_path / "out" / "train.jsonl")) == sorted([words(TOPICS[4], 80),
                                                                          words(TOPICS[6], 80)])


@pytest.mark.slow
def test_default_corpus_has_sensible_size(tmp_path):
    """stdlib docstrings (~1.6 MB after skipping one-liners) + pydoc topics (~0.47 MB): about 2 MB of text."""
    stats = build_corpus(["default"], [], tmp_path, quiet=True)
    assert stats["sources"] == ["stdlib", "pydoc"]
    assert stats["documents_per_source"]["pydoc"] == len(TOPICS)
    assert stats["documents_per_source"]["stdlib"] > 4000
    chars = stats["splits"]["train"]["chars"] + stats["splits"]["val"]["chars"]
    assert 1_500_000 < chars < 3_000_000
    assert stats["exact_duplicates_removed"] > 0 and stats["near_duplicates_removed"] > 0
    texts = read_jsonl(tmp_path / "train.jsonl")
    assert any(t.startswith("JSON (JavaScript Object Notation)") for t in texts)  # json's module docstring


def test_stdlib_docstrings_match_runtime_docs(tmp_path):
    import inspect
    import json.decoder
    import sysconfig

    files = sources.stdlib_files()
    root = Path(sysconfig.get_paths()["stdlib"])
    parts = {p for f in files for p in f.relative_to(root).parts[:-1]}
    assert not parts & {"test", "tests", "idlelib", "site-packages"}
    assert root / "json" / "decoder.py" in files and len(files) > 500
    docs = sources.file_docstrings(root / "json" / "decoder.py")
    for obj in (json.decoder.JSONDecodeError, json.decoder.JSONDecoder, json.decoder.JSONDecoder.decode,
                json.decoder.JSONDecoder.raw_decode):  # the runtime __doc__ is the oracle
        assert inspect.cleandoc(obj.__doc__) in docs
    assert "Implementation of JSONDecoder" not in docs  # the 3-word module docstring is too short
    # nested definitions (also under if/try) are found; one-liners are skipped
    mod = tmp_path / "m.py"
    mod.write_text('''"""Module docstring with enough words to count as a document here."""
import sys
if sys:
    class A:
        """Class docstring with enough words to count as a document here."""
        def f(self):
            """Short."""
            def g():
                """Nested function docstring with enough words to be a document."""
''')
    assert [d.split()[0] for d in sources.file_docstrings(mod)] == ["Module", "Class", "Nested"]


# ---------------------------------------------------------------------------------------------------------------
# Token shards


def test_prepare_round_trip(tmp_path, sp_model_path, corpus_dir):
    out = tmp_path / "shards"
    m = prepare_shards(sp_model_path, [corpus_dir], out, workers=1, shard_tokens=5000, quiet=True)
    assert json.loads((out / "manifest.json").read_text()) == m
    assert m["format"] == "llama2-token-shards" and m["version"] == 1
    assert m["tokenizer_sha256"] == hashlib.sha256(sp_model_path.read_bytes()).hexdigest()
    assert (m["vocab_size"], m["dtype"], m["bos_id"], m["eos_id"]) == (1000, "uint16", 1, 2)
    for split in ("train", "val"):
        texts = read_jsonl(corpus_dir / f"{split}.jsonl")
        expected = sp_encode(sp_model_path, texts)
        flat = np.concatenate([np.array(e) for e in expected])
        ts = TokenShards(out, split)
        assert (ts.num_tokens, ts.num_documents, ts.vocab_size) == (flat.size, len(texts), 1000)
        assert ts.dtype == np.uint16 and ts.tokenizer_sha256 == m["tokenizer_sha256"]
        assert len(m["splits"][split]["shards"]) == -(-flat.size // 5000)
        # raw files: little-endian uint16, cut every 5000 tokens
        raw = b"".join((out / s["file"]).read_bytes() for s in m["splits"][split]["shards"])
        assert raw == flat.astype("<u2").tobytes()
        got = ts.read(0, ts.num_tokens)
        assert got.dtype == np.int64 and np.array_equal(got, flat)
        starts = ts.document_starts()
        assert np.array_equal(starts, np.cumsum([0] + [len(e) for e in expected[:-1]]))
        ends = list(starts[1:]) + [ts.num_tokens]
        sp = spm.SentencePieceProcessor(model_file=str(sp_model_path))
        for text, s, e in zip(texts, starts, ends):
            doc = got[s:e]
            assert doc[0] == 1 and doc[-1] == 2 and 1 not in doc[1:] and 2 not in doc[:-1]
            assert sp.decode(doc[1:-1].tolist()) == text
    ts.check_tokenizer(Tokenizer(sp_model_path))  # same tokenizer: no error


def test_reads_across_shard_boundaries(tmp_path, sp_model_path, corpus_dir):
    out = tmp_path / "shards"
    prepare_shards(sp_model_path, [corpus_dir], out, workers=2, shard_tokens=997, quiet=True)
    flat = np.concatenate([np.array(e) for e in sp_encode(sp_model_path, read_jsonl(corpus_dir / "train.jsonl"))])
    ts = TokenShards(out)
    assert len(ts.manifest["splits"]["train"]["shards"]) > 20
    rng = np.random.default_rng(0)
    windows = [(0, flat.size), (990, 20), (997, 997), (996, 2 * 997 + 2), (flat.size - 5, 5), (10, 0)]
    windows += [(int(s), int(rng.integers(0, 4000))) for s in rng.integers(0, flat.size - 4000, 50)]
    for start, length in windows:
        assert np.array_equal(ts.read(start, length), flat[start:start + length]), (start, length)
    with pytest.raises(IndexError):
        ts.read(flat.size - 3, 4)
    clone = pickle.loads(pickle.dumps(ts))  # for DataLoader workers: no token data in the pickle
    assert len(pickle.dumps(ts)) < 20_000 and np.array_equal(clone.read(5000, 3000), flat[5000:8000])


def test_uint32_for_vocab_over_65535(tmp_path, sp_model_path):
    assert token_dtype(65535) == np.uint16 and token_dtype(65536) == np.uint32
    model = big_vocab_model(sp_model_path, 65_100)  # 66,100 pieces
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "tokenizer.model").write_bytes(model)
    texts = [words(TOPICS[0], 60) + " <x65050> and <x00007>", words(TOPICS[1], 60)]
    m = prepare_shards(tmp_path / "tok", [write_jsonl(tmp_path / "d.jsonl", texts)], tmp_path / "out",
                       workers=1, quiet=True)
    assert (m["vocab_size"], m["dtype"]) == (66_100, "uint32")
    flat = np.concatenate([np.array(e) for e in sp_encode(model, texts)])
    assert 1000 + 65050 in flat and flat.max() > 65535
    assert (tmp_path / "out" / "train-00000.bin").read_bytes() == flat.astype("<u4").tobytes()
    assert np.array_equal(TokenShards(tmp_path / "out").read(0, flat.size), flat)


def test_resume_after_interruption_is_byte_identical(tmp_path, sp_model_path, corpus_dir):
    extra = write_jsonl(tmp_path / "extra.jsonl", [words(t, 200) for t in TOPICS[40:79]])
    args = (sp_model_path, [corpus_dir, extra])
    kw = dict(shard_tokens=3000, quiet=True)
    full = prepare_shards(*args, tmp_path / "full", workers=1, **kw)
    assert len(full["splits"]["train"]["shards"]) >= 4 and full["complete"]

    part = tmp_path / "part"
    m = prepare_shards(*args, part, workers=1, _max_shards=1, **kw)
    assert not m["complete"] and len(m["splits"]["train"]["shards"]) == 1 and m["resume"]["document"] > 0
    with pytest.raises(Llama2Error, match="unfinished.*resume"):
        TokenShards(part)
    # debris of a kill: the next shard renamed into place before the manifest recorded it, and a temp file
    (part / "train-00001.bin").write_bytes(b"\x00" * 77)
    (part / ".train-00002.bin.abc123.tmp").write_bytes(b"\x01" * 5)
    m = prepare_shards(*args, part, workers=2, _max_shards=2, **kw)  # a second interruption, then finish
    assert len(m["splits"]["train"]["shards"]) == 3 and not m["complete"]
    assert prepare_shards(*args, part, workers=2, **kw) == full
    assert dir_bytes(part) == dir_bytes(tmp_path / "full")
    # finished: rerunning is a no-op; other settings are refused
    assert prepare_shards(*args, part, workers=1, **kw) == full
    with pytest.raises(Llama2Error, match="other settings.*shard_tokens"):
        prepare_shards(*args, part, workers=1, shard_tokens=4000, quiet=True)


def test_prepare_files_with_val_fraction(tmp_path, sp_model_path):
    (tmp_path / "a.txt").write_text(words(TOPICS[7], 100))
    docs = [words(t, 80) for t in TOPICS[10:50]]
    inputs = [tmp_path / "a.txt", write_jsonl(tmp_path / "b.jsonl", docs)]
    m = prepare_shards(sp_model_path, inputs, tmp_path / "out", val_fraction=0.3, workers=1, quiet=True)
    all_docs = [words(TOPICS[7], 100)] + docs
    want_val = [t for t in all_docs if is_val(t, 0.3)]
    want_train = [t for t in all_docs if not is_val(t, 0.3)]
    assert 0 < len(want_val) < len(all_docs)
    for split, want in (("train", want_train), ("val", want_val)):
        flat = np.concatenate([np.array(e) for e in sp_encode(sp_model_path, want)])
        ts = TokenShards(tmp_path / "out", split)
        assert ts.num_documents == len(want) == m["splits"][split]["documents"]
        assert np.array_equal(ts.read(0, ts.num_tokens), flat)
    # without --val-fraction everything goes to train and val is empty
    m = prepare_shards(sp_model_path, inputs, tmp_path / "out2", workers=1, quiet=True)
    assert m["splits"]["val"] == {"tokens": 0, "documents": 0, "shards": []}
    assert m["splits"]["train"]["documents"] == len(all_docs)


def test_shard_errors(tmp_path, sp_model_path, corpus_dir):
    with pytest.raises(Llama2Error, match="does not exist.*llama2 data prepare"):
        TokenShards(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(Llama2Error, match="manifest.json is missing.*llama2 data prepare"):
        TokenShards(tmp_path / "empty")
    out = tmp_path / "shards"
    prepare_shards(sp_model_path, [corpus_dir], out, workers=1, shard_tokens=4000, quiet=True)
    with pytest.raises(Llama2Error, match="no split 'test'"):
        TokenShards(out, "test")

    other = tmp_path / "other"
    other.mkdir()
    (other / "tokenizer.model").write_bytes(big_vocab_model(sp_model_path, 1))
    with pytest.raises(Llama2Error, match="shards were prepared with a different tokenizer"):
        TokenShards(out).check_tokenizer(Tokenizer(other))
    with pytest.raises(Llama2Error, match="different tokenizer"):
        TokenShards(out).check_tokenizer(other)

    shard = out / "train-00001.bin"
    good = shard.read_bytes()
    shard.write_bytes(good[:-2])
    with pytest.raises(Llama2Error, match=re.escape(str(shard)) + ".*truncated"):
        TokenShards(out)
    shard.unlink()
    with pytest.raises(Llama2Error, match=re.escape(str(shard)) + " is missing"):
        TokenShards(out)
    shard.write_bytes(good)
    TokenShards(out)
    manifest = json.loads((out / "manifest.json").read_text())
    (out / "manifest.json").write_text(json.dumps({**manifest, "format": "something-else"}))
    with pytest.raises(Llama2Error, match="not a 'llama2-token-shards' manifest"):
        TokenShards(out)

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "one"}\n{"text": "two"}\n{"text": 3}\n')
    with pytest.raises(Llama2Error, match=re.escape(f"{bad}:3")):
        prepare_shards(sp_model_path, [bad], tmp_path / "o", workers=1, quiet=True)
    with pytest.raises(Llama2Error, match="no tokenizer.model"):
        prepare_shards(tmp_path / "empty", [bad], tmp_path / "o", quiet=True)


def test_cli(tmp_path, sp_model_path, capsys):
    assert main(["data", "corpus", "--source", "pydoc", "--val-fraction", "0.1", "-o", str(tmp_path / "c"),
                 "--quiet"]) == 0
    assert "documents in" in capsys.readouterr().out
    assert main(["data", "prepare", "--tokenizer", str(sp_model_path), "--input", str(tmp_path / "c"),
                 "--output", str(tmp_path / "s"), "--shard-tokens", "20000", "--quiet"]) == 0
    assert "uint16" in capsys.readouterr().out
    assert main(["data", "info", str(tmp_path / "s")]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["complete"] and info["splits"]["val"]["documents"] == json.loads(
        (tmp_path / "c" / "stats.json").read_text())["splits"]["val"]["documents"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text("not json\n")
    assert main(["data", "corpus", str(bad), "-o", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after the progress bar
    assert err.startswith("llama2: error:") and f"{bad}:1" in err and "Traceback" not in err
