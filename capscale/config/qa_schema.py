"""The ``data.qa`` section: extractive question answering (``data.task_type: qa``).

How the data is laid out (the columns of flat rows; a local ``.json`` file in the SQuAD
layout is recognised by its shape), how a context longer than ``data.max_length`` is
cut into overlapping windows, and how spans are decoded for the SQuAD metrics (see
capscale.tasks.qa and docs/algorithm.md, "Extractive QA").
"""

from __future__ import annotations

from dataclasses import dataclass

Check = tuple[bool, str, str]  # (ok, field, why)


@dataclass
class QAConfig:
    """Extractive QA (SQuAD v1.1 / v2): columns, windows and span decoding."""

    # Columns of flat rows (the hub's ``squad`` / ``squad_v2``, JSON / JSONL / parquet
    # files). ``answers`` holds ``{"text": [...], "answer_start": [...]}`` or a list of
    # ``{"text", "answer_start"}``. A local ``.json`` file shaped like the SQuAD files
    # (``{"data": [{"title", "paragraphs": [{"context", "qas": [...]}]}]}``) is read as
    # such whatever these say.
    id_column: str = "id"
    question_column: str = "question"
    context_column: str = "context"
    answers_column: str = "answers"
    # Tokens shared by two consecutive windows of a context longer than max_length.
    doc_stride: int = 128
    # Longest predicted answer, in tokens, and candidate starts / ends kept per window.
    max_answer_length: int = 30
    n_best: int = 20
    # SQuAD v2: questions may have no answer; the empty answer is predicted when the
    # null score (start and end on the CLS token) beats the best span by more than
    # ``null_score_threshold``. False: every question must have an answer.
    version_2_with_negative: bool = False
    null_score_threshold: float = 0.0

    def check(self) -> list[Check]:
        return [
            (self.doc_stride >= 0, "data.qa.doc_stride", "must be >= 0"),
            (self.max_answer_length >= 1, "data.qa.max_answer_length", "must be >= 1"),
            (self.n_best >= 1, "data.qa.n_best", "must be >= 1"),
        ]
