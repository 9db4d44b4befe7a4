"""Teacher and student must share the tokenizer (docs/method.md §4 II)."""

from __future__ import annotations

from padd.errors import UserError


class VocabError(UserError):
    """Teacher and student tokenizers differ; distillation over their logits would be meaningless."""


def common_vocab_size(teacher_tokenizer, student_tokenizer, teacher_rows: int, student_rows: int) -> int:
    """How many logit columns teacher and student share.

    The tokenizers must map every token to the same id. The models' vocabulary rows may differ only by
    padding (rows past the tokenizer's size); logits are then cut to the smaller of the two.

    Args:
        teacher_rows, student_rows: `config.vocab_size` of each model (the logit width).
    """
    t_vocab, s_vocab = teacher_tokenizer.get_vocab(), student_tokenizer.get_vocab()
    if t_vocab != s_vocab:
        only_t = sorted(set(t_vocab) - set(s_vocab))[:5]
        only_s = sorted(set(s_vocab) - set(t_vocab))[:5]
        moved = [tok for tok in set(t_vocab) & set(s_vocab) if t_vocab[tok] != s_vocab[tok]][:5]
        raise VocabError(
            "teacher and student tokenizers differ "
            f"(only in teacher: {only_t}, only in student: {only_s}, different ids: {moved}); "
            "distil from a teacher whose tokenizer the student was decomposed with"
        )
    used = len(t_vocab)
    common = min(teacher_rows, student_rows)
    if common < used:
        raise VocabError(f"a model has {common} vocabulary rows but the tokenizer has {used} tokens")
    return common
