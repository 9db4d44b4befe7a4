import copy

import pytest
import torch

from padd.tiny import build_tokenizer
from padd.vocab import MASKED_LOGIT, SharedVocab, VocabError, shared_vocab


def test_same_tokenizer_padding_rows_are_cut():
    tok = build_tokenizer(["1 + 2 = 3", "abc"], vocab_size=300)
    assert shared_vocab(tok, tok, len(tok) + 64, len(tok)) == SharedVocab(len(tok))
    with pytest.raises(VocabError, match="vocabulary rows"):
        shared_vocab(tok, tok, len(tok) - 1, len(tok))


def test_different_tokenizers_are_refused_naming_the_first_differing_token():
    a = build_tokenizer(["1 + 2 = 3"], vocab_size=280)
    b = build_tokenizer(["the quick brown fox jumps"], vocab_size=300)
    with pytest.raises(VocabError, match="tokenizers differ: the teacher's token"):
        shared_vocab(a, b, len(a), len(b))


def qwen3_like(teacher_tok):
    """The teacher's tokenizer plus the tokens Qwen3's adds to Qwen2.5's, at new ids after them."""
    student_tok = copy.deepcopy(teacher_tok)
    student_tok.add_tokens(["<think>", "</think>", "<tool_response>", "</tool_response>"], special_tokens=True)
    return student_tok


def test_a_teacher_vocabulary_that_is_a_subset_of_the_students():
    """As Qwen2.5-Math-7B (152064 rows) and Qwen3 (151936 rows, four added tokens): accepted; KD
    compares the shared columns, the student-only ids among them masked out, padding cut."""
    teacher_tok = build_tokenizer(["1 + 2 = 3", "abc"], vocab_size=300)
    student_tok = qwen3_like(teacher_tok)
    added = [
        student_tok.convert_tokens_to_ids(t) for t in ("<think>", "</think>", "<tool_response>", "</tool_response>")
    ]
    assert min(added) >= len(teacher_tok)
    teacher_rows, student_rows = len(teacher_tok) + 16, len(student_tok) + 2  # both padded
    vocab = shared_vocab(teacher_tok, student_tok, teacher_rows, student_rows)
    assert vocab.width == min(teacher_rows, student_rows) and set(vocab.student_only) == set(added)
    view = vocab.kd_view(torch.zeros(2, 3, student_rows))
    assert view.shape[-1] == vocab.width and (view[..., added] == MASKED_LOGIT).all()
    assert (view[..., : len(teacher_tok)] == 0).all()
    with pytest.raises(VocabError, match="missing from the student's"):  # the reverse is not a subset
        shared_vocab(student_tok, teacher_tok, student_rows, teacher_rows)


def test_kd_over_a_shared_vocabulary_ignores_the_student_only_ids():
    """The masked columns carry no teacher probability and take none from the student: KD is the KL
    over the shared ids alone."""
    from padd.losses import distill_kl_loss

    vocab = SharedVocab(6, (4,))
    student, teacher = torch.randn(1, 2, 7), torch.randn(1, 2, 7)
    mask = torch.ones(1, 2)
    ours = distill_kl_loss(vocab.kd_view(student), vocab.kd_view(teacher), mask)
    keep = [0, 1, 2, 3, 5]
    reference = distill_kl_loss(student[..., keep], teacher[..., keep], mask)
    assert torch.allclose(ours, reference, atol=1e-6)
