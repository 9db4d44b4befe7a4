"""Text corpora for Stage I: stream documents from local files or `datasets`, pack them into token windows.

A corpus SPEC is a local file (.txt, .jsonl, .json, .parquet), a folder of such files, a dataset saved
with `save_to_disk`, a `datasets` hub name (optionally `name:config`), or the miniature world
(`world`, `world:SKILL`). Everything is read as a
stream through `datasets`, so memory is bounded by the sample, not by the corpus.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch

from padd.data import build_prompt
from padd.errors import UserError
from padd.world.tasks import iter_tasks, parse_world_spec

_BUILDERS = {".txt": "text", ".text": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
_TEXT_FIELDS = ("text", "content", "problem", "question", "prompt")
# How far past the sample size the reservoir looks: a wider window samples more of the corpus, a
# narrower one starts faster. Bounded so a multi-terabyte dataset is never read to its end.
SCAN_FACTOR = 16


class CorpusError(UserError):
    """The corpus cannot be read or holds no usable text; the message says why."""


def _local_files(path: Path) -> tuple[str, list[str]]:
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.suffix in _BUILDERS)
    if not files:
        raise CorpusError(f"no .txt/.jsonl/.json/.parquet files under {path}")
    builders = {_BUILDERS.get(p.suffix) for p in files}
    if None in builders:
        raise CorpusError(f"{path}: unsupported file type; use .txt, .jsonl, .json or .parquet")
    if len(builders) > 1:
        raise CorpusError(f"{path} mixes file types {sorted(builders)}; point --corpus at one kind")
    return builders.pop(), [str(p) for p in files]


def open_stream(spec: str, split: str = "train") -> Iterable[dict]:
    """An iterable of records (dicts) from a corpus SPEC, streamed."""
    import datasets

    path = Path(spec)
    if path.exists():
        if path.is_dir() and ((path / "dataset_info.json").exists() or (path / "state.json").exists()):
            ds = datasets.load_from_disk(str(path))
            ds = ds[split] if isinstance(ds, datasets.DatasetDict) else ds
            return ds.to_iterable_dataset()
        builder, files = _local_files(path)
        return datasets.load_dataset(builder, data_files=files, split="train", streaming=True)
    name, _, config = spec.partition(":")
    try:
        return datasets.load_dataset(name, config or None, split=split, streaming=True)
    except Exception as err:  # datasets raises many types for "not found / offline"
        raise CorpusError(
            f"cannot open corpus {spec!r}: not a local file or folder, and `datasets` could not load it ({err})"
        ) from err


def _world_texts(skills: list[str], split: str, per_skill: int = 4000) -> Iterator[str]:
    """The world's tasks as the teacher reads them (prompt, then solution), skills interleaved."""

    # lazily: a reader that needs a few thousand tokens draws only the problems it reads
    streams = [iter_tasks(s, split, max_tries=100 * per_skill + 1000) for s in skills]
    for rows in zip(*streams, strict=False):
        for row in rows:
            yield build_prompt(None, row["problem"]) + " " + row["solution"]


def iter_texts(spec: str, text_field: str | None = None, split: str = "train") -> Iterator[str]:
    """Yield the text of each record. `text_field` may join several fields: "problem,solution".

    `world` / `world:SKILL` stream the miniature world's tasks (prompt and solution).
    """

    skills = parse_world_spec(spec)
    if skills is not None:
        yield from _world_texts(skills, split)
        return
    fields = [f.strip() for f in text_field.split(",")] if text_field else None
    for row in open_stream(spec, split):
        if fields is None:
            found = next((f for f in _TEXT_FIELDS if f in row), None)
            if found is None:
                raise CorpusError(
                    f"corpus {spec!r} has no text field among {_TEXT_FIELDS}; pass --text-field (columns: {list(row)})"
                )
            fields = [found]
        missing = [f for f in fields if f not in row]
        if missing:
            raise CorpusError(f"corpus {spec!r} has no field {missing[0]!r} (columns: {list(row)})")
        text = "\n".join(str(row[f]) for f in fields if row[f] is not None)
        if text.strip():
            yield text


def sample_windows(
    texts: Iterable[str],
    tokenizer,
    *,
    n_tokens: int,
    seq_len: int,
    seed: int = 0,
) -> torch.LongTensor:
    """Pack the token stream into windows of `seq_len` and reservoir-sample ceil(n_tokens / seq_len) of them.

    Documents are joined with the EOS token. The reservoir looks at most SCAN_FACTOR times the
    sample, so memory is O(n_tokens) and time is bounded whatever the corpus size.

    Returns:
        LongTensor [n_windows, seq_len]; fewer windows if the corpus is shorter than the sample.
    """
    if n_tokens <= 0 or seq_len <= 0:
        raise ValueError("n_tokens and seq_len must be positive")
    n_windows = -(-n_tokens // seq_len)
    sep = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    rng = random.Random(seed)
    reservoir: list[list[int]] = []
    seen = 0
    buffer: list[int] = []
    for text in texts:
        buffer.extend(tokenizer(text, add_special_tokens=False)["input_ids"] + sep)
        while len(buffer) >= seq_len:
            window, buffer = buffer[:seq_len], buffer[seq_len:]
            if seen < n_windows:
                reservoir.append(window)
            else:
                j = rng.randrange(seen + 1)
                if j < n_windows:
                    reservoir[j] = window
            seen += 1
        if seen >= n_windows * SCAN_FACTOR:
            break
    if not reservoir:
        if buffer:  # a corpus shorter than one window still gives one (short) window
            return torch.tensor([buffer], dtype=torch.long)
        raise CorpusError("the corpus holds no text")
    return torch.tensor(reservoir, dtype=torch.long)


def sample_corpus(
    spec: str, tokenizer, *, n_tokens: int, seq_len: int, seed: int = 0, text_field: str | None = None, split="train"
) -> torch.LongTensor:
    """`sample_windows` over the texts of a corpus SPEC: [n_windows, seq_len] token windows."""
    return sample_windows(iter_texts(spec, text_field, split), tokenizer, n_tokens=n_tokens, seq_len=seq_len, seed=seed)
