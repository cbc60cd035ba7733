"""Which transformers Auto class loads an exported model, from its class name."""

from __future__ import annotations

from torch import nn

# The end of a task model's class name -> the Auto class that loads it.
AUTO_CLASSES = {"ForSequenceClassification": "AutoModelForSequenceClassification",
                "ForQuestionAnswering": "AutoModelForQuestionAnswering",
                "ForTokenClassification": "AutoModelForTokenClassification"}


def auto_class_name(class_name: str) -> str:
    """The Auto class of a task model class (``BertForQuestionAnswering`` ->
    ``AutoModelForQuestionAnswering``; a base model such as ``BertModel``, which a
    sentence embedder saves, -> ``AutoModel``); AutoModelForSequenceClassification
    otherwise."""
    for suffix, auto in AUTO_CLASSES.items():
        if class_name.endswith(suffix):
            return auto
    if class_name.endswith("Model") and "For" not in class_name:
        return "AutoModel"
    return "AutoModelForSequenceClassification"


def saved_class_name(model: nn.Module) -> str:
    """The class a model is saved as: a sentence embedder's encoder class
    (``hf_class_name``), else the model's own."""
    return str(getattr(model, "hf_class_name", type(model).__name__))
