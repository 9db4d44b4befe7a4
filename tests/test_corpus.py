import json

import pytest
import torch
from transformers import AutoTokenizer

from padd.corpus import CorpusError, iter_texts, sample_windows


@pytest.fixture(scope="module")
def tokenizer(llama_teacher):
    return AutoTokenizer.from_pretrained(llama_teacher)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_local_layouts_give_the_same_texts(tmp_path):
    rows = [{"problem": f"What is {i}+1?", "solution": f"\\boxed{{{i + 1}}}"} for i in range(5)]
    write_jsonl(tmp_path / "a.jsonl", rows)
    (tmp_path / "a.json").write_text(json.dumps(rows))
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "a.parquet")
    expected = [f"What is {i}+1?\n\\boxed{{{i + 1}}}" for i in range(5)]
    for name in ("a.jsonl", "a.json", "a.parquet"):
        assert list(iter_texts(str(tmp_path / name), "problem,solution")) == expected
    assert list(iter_texts(str(tmp_path / "a.jsonl")))[0] == "What is 0+1?"  # `problem` found by itself


def test_folder_and_saved_dataset(tmp_path):
    import datasets

    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "1.txt").write_text("alpha\nbeta\n")
    (tmp_path / "docs" / "2.txt").write_text("gamma\n")
    assert list(iter_texts(str(tmp_path / "docs"))) == ["alpha", "beta", "gamma"]
    datasets.Dataset.from_dict({"content": ["x y", "z"]}).save_to_disk(tmp_path / "saved")
    assert list(iter_texts(str(tmp_path / "saved"))) == ["x y", "z"]


def test_bad_corpora_say_what_is_wrong(tmp_path, tokenizer):
    write_jsonl(tmp_path / "rows.jsonl", [{"body": "no text field here"}])
    with pytest.raises(CorpusError, match="--text-field"):
        list(iter_texts(str(tmp_path / "rows.jsonl")))
    with pytest.raises(CorpusError, match="no field 'missing'"):
        list(iter_texts(str(tmp_path / "rows.jsonl"), "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(CorpusError, match="no .txt"):
        list(iter_texts(str(tmp_path / "empty")))
    (tmp_path / "blank.txt").write_text("\n\n")
    with pytest.raises(CorpusError, match="no text"):
        sample_windows(iter_texts(str(tmp_path / "blank.txt")), tokenizer, n_tokens=8, seq_len=4)


def test_window_sample_is_bounded_seeded_and_covers_the_stream(corpus_file, tokenizer):
    texts = list(iter_texts(str(corpus_file)))
    a = sample_windows(texts, tokenizer, n_tokens=1000, seq_len=50, seed=1)
    b = sample_windows(texts, tokenizer, n_tokens=1000, seq_len=50, seed=1)
    c = sample_windows(texts, tokenizer, n_tokens=1000, seq_len=50, seed=2)
    assert a.shape == (20, 50) and a.dtype == torch.long
    assert torch.equal(a, b) and not torch.equal(a, c)
    first = sample_windows(texts[:40], tokenizer, n_tokens=100000, seq_len=50)
    assert first.shape[0] < 20  # a short corpus gives what it has


def test_reservoir_stops_reading_a_huge_stream(tokenizer):
    read = 0

    def endless():
        nonlocal read
        while True:
            read += 1
            yield "1 + 2 = 3"

    windows = sample_windows(endless(), tokenizer, n_tokens=64, seq_len=16)
    assert windows.shape == (4, 16) and read < 1000


def test_world_corpus(tokenizer):
    texts = list(__import__("itertools").islice(iter_texts("world:add+reverse"), 4))
    assert texts[0].startswith("Problem: What is") and "Reverse the letters" in texts[1]
    assert all("\\boxed{" in t for t in texts)
    windows = sample_windows(iter_texts("world"), tokenizer, n_tokens=256, seq_len=32)
    assert windows.shape == (8, 32)
