import pytest

from padd.tiny import build_tokenizer
from padd.vocab import VocabError, common_vocab_size


def test_same_tokenizer_padding_rows_are_cut():
    tok = build_tokenizer(["1 + 2 = 3", "abc"], vocab_size=300)
    assert common_vocab_size(tok, tok, len(tok) + 64, len(tok)) == len(tok)
    with pytest.raises(VocabError, match="vocabulary rows"):
        common_vocab_size(tok, tok, len(tok) - 1, len(tok))


def test_different_tokenizers_are_refused():
    a = build_tokenizer(["1 + 2 = 3"], vocab_size=280)
    b = build_tokenizer(["the quick brown fox jumps"], vocab_size=300)
    with pytest.raises(VocabError, match="tokenizers differ"):
        common_vocab_size(a, b, len(a), len(b))
