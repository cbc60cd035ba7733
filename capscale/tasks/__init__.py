"""Tasks: what the labels are, which head the model gets, and how it is scored.

A task is an entry of :data:`TASKS` (``data.task_type`` names it). It owns everything
that differs between, say, classification and regression: reading the label column
(:meth:`Task.label_names`, :meth:`Task.encode_labels`), the Hugging Face head class the
student, references and export use, the supervised loss, logit distillation, the
metrics and the main one, and which labels the supervised contrastive terms may use.
Extractive QA (``qa``, capscale.tasks.qa), sentence embeddings (``embedding``,
capscale.tasks.embedding) and token classification (``token_classification``,
capscale.tasks.token_classification) also bring their own data preparation through
optional hooks (see :class:`Task`). A new task is one more entry::

    from capscale.tasks import register_task
    register_task(MyTask())
"""

from __future__ import annotations

from capscale.tasks.base import TASKS, Task, get_task, register_task
from capscale.tasks.embedding import EmbeddingTask
from capscale.tasks.qa import QuestionAnsweringTask
from capscale.tasks.sequence import ClassificationTask, RegressionTask
from capscale.tasks.token_classification import TokenClassificationTask

register_task(ClassificationTask())
register_task(RegressionTask())
register_task(QuestionAnsweringTask())
register_task(EmbeddingTask())
register_task(TokenClassificationTask())

__all__ = ["TASKS", "ClassificationTask", "EmbeddingTask", "QuestionAnsweringTask",
           "RegressionTask", "Task", "TokenClassificationTask", "get_task", "register_task"]
