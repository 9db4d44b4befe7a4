"""Teacher and student vocabularies for distillation over logits (docs/method.md §4 II).

The tokenizers must agree on every token the teacher has: equal tokenizers, or a teacher whose
token -> id map is a subset of the student's with equal ids (Qwen2.5's and Qwen3's: Qwen3 adds
`<think>`, `</think>`, ... after Qwen2.5's tokens). KD then compares the logit columns both models
have, with the student-only ids among them masked out of both distributions; rows past either
tokenizer (padding) are cut.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from padd.errors import UserError

# A masked logit: far below any real one, yet finite, so 0 · (log p_t − log p_s) stays 0 in the KL
MASKED_LOGIT = -1.0e4


class VocabError(UserError):
    """Teacher and student tokenizers differ; distillation over their logits would be meaningless."""


@dataclass(frozen=True)
class SharedVocab:
    """The logit columns KD compares: the first `width`, without the ids in `student_only`."""

    width: int
    student_only: tuple[int, ...] = ()

    def kd_view(self, logits: torch.Tensor) -> torch.Tensor:
        """[..., V] logits of either model -> [..., width], the student-only ids masked."""
        logits = logits[..., : self.width]
        if not self.student_only:
            return logits
        index = torch.tensor(self.student_only, device=logits.device)
        return logits.index_fill(-1, index, MASKED_LOGIT)


def shared_vocab(teacher_tokenizer, student_tokenizer, teacher_rows: int, student_rows: int) -> SharedVocab:
    """The vocabulary KD can use, or a VocabError naming the first token the two disagree on.

    Args:
        teacher_rows, student_rows: `config.vocab_size` of each model (the logit width).
    """
    t_vocab, s_vocab = teacher_tokenizer.get_vocab(), student_tokenizer.get_vocab()
    for token, index in sorted(t_vocab.items(), key=lambda item: item[1]):
        if s_vocab.get(token) != index:
            where = "missing from the student's" if token not in s_vocab else f"id {s_vocab[token]} in the student's"
            raise VocabError(
                f"teacher and student tokenizers differ: the teacher's token {token!r} (id {index}) is {where}; "
                "the teacher's tokens must keep their ids in the student's tokenizer (distil from a teacher "
                "whose tokenizer the student shares or extends)"
            )
    width = min(teacher_rows, student_rows)
    if width < max(t_vocab.values(), default=-1) + 1:
        raise VocabError(f"a model has {width} vocabulary rows but the teacher's tokenizer has {len(t_vocab)} tokens")
    student_only = tuple(sorted(i for token, i in s_vocab.items() if token not in t_vocab and i < width))
    return SharedVocab(width, student_only)
