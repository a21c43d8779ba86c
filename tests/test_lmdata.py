"""The LM data kept in git (cosyvoice2.train.lmdata): pack merges sessions, resume seeds the builder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from cosyvoice2.train import lmdata
from cosyvoice2.train.data import read_manifest


def _corpus(root: Path, ids: list[str], tokens: dict[str, torch.Tensor]) -> tuple[Path, Path]:
    corpus, cache = root / "corpus", root / "cache"
    corpus.mkdir(parents=True, exist_ok=True)
    cache.mkdir(parents=True, exist_ok=True)
    rows = [
        {"id": i, "audio": f"wavs/{i}.flac", "text": f"text {i}", "language": "en", "speaker": "s",
         "duration": 1.5, "split": "train", "teacher": "kokoro"}
        for i in ids
    ]  # fmt: skip
    (corpus / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    save_file({k: v.to(torch.int32) for k, v in tokens.items()}, str(cache / "tokens.safetensors"))
    return corpus, cache


def test_pack_merges_sessions_and_the_lm_reads_it(tmp_path: Path) -> None:
    tok = tmp_path / "tokenizer.safetensors"
    tok.write_bytes(b"weights")
    out = tmp_path / "lm_data"
    t = {"a": torch.tensor([1, 6560, 3]), "b": torch.tensor([5, 6]), "c": torch.zeros(0)}
    corpus, cache = _corpus(tmp_path / "s1", ["a", "b", "c", "d"], t)
    info = lmdata.pack(corpus, cache, out, tok)
    # "c" was cached empty (too long to tokenise) and "d" has no tokens yet: neither is packed
    assert (info["utterances"], info["added"], info["tokens"]) == (2, 2, 5)
    corpus2, cache2 = _corpus(
        tmp_path / "s2", ["a", "b", "d"], {"a": torch.tensor([9]), "d": torch.tensor([7])}
    )
    info = lmdata.pack(corpus2, cache2, out, tok)
    assert (info["utterances"], info["added"]) == (3, 1)
    stored = load_file(str(out / "tokens.safetensors"))
    assert stored["a"].tolist() == [1, 6560, 3]  # a packed row is kept, not replaced
    assert stored["a"].dtype == torch.int16
    assert [u.id for u in read_manifest(out)] == ["a", "b", "d"]


def test_pack_refuses_tokens_of_another_tokenizer(tmp_path: Path) -> None:
    out = tmp_path / "lm_data"
    corpus, cache = _corpus(tmp_path, ["a"], {"a": torch.tensor([1])})
    (tmp_path / "t1").write_bytes(b"one")
    (tmp_path / "t2").write_bytes(b"two")
    lmdata.pack(corpus, cache, out, tmp_path / "t1")
    with pytest.raises(SystemExit, match="another speech tokenizer"):
        lmdata.pack(corpus, cache, out, tmp_path / "t2")


def test_resume_seeds_a_new_corpus_only(tmp_path: Path) -> None:
    tok = tmp_path / "tok"
    tok.write_bytes(b"w")
    corpus, cache = _corpus(tmp_path / "s1", ["a", "b"], {"a": torch.tensor([1]), "b": torch.tensor([2])})
    (corpus / "rejects.jsonl").write_text(json.dumps({"id": "z", "rejected": "silent"}) + "\n")
    out = tmp_path / "lm_data"
    lmdata.pack(corpus, cache, out, tok)
    fresh = tmp_path / "fresh"
    assert lmdata.resume(out, fresh) == 2
    assert json.loads((fresh / "rejects.jsonl").read_text())["id"] == "z"
    with pytest.raises(SystemExit, match="not empty"):
        lmdata.resume(out, fresh)
