"""Session fixtures: tiny saved models and tiny task data (see tests/tiny.py)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a wrong path must fail fast, not retry a hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("DS_ACCELERATOR", "cpu")

from collections.abc import Callable
from pathlib import Path

import pytest
import rank_pool
import torch
import transformers
from _tiny_run import setup
from references import References
from tiny import save_tiny, sentiment_rows, write_csv

transformers.logging.set_verbosity_error()
# Tiny models: one thread is faster than several (no sync overhead), and on a busy
# shared CPU much faster.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_model_factory(tmp_path_factory) -> Callable[..., Path]:
    """``factory(family, num_labels=2)`` -> folder of a saved tiny model (made once)."""
    cache: dict[tuple[str, int], Path] = {}

    def make(family: str, num_labels: int = 2) -> Path:
        key = (family, num_labels)
        if key not in cache:
            cache[key] = save_tiny(family, tmp_path_factory.mktemp(f"{family}-{num_labels}"),
                                   num_labels)
        return cache[key]
    return make


@pytest.fixture(scope="session")
def tiny_bert(tiny_model_factory) -> Path:
    return tiny_model_factory("bert")


@pytest.fixture(scope="session")
def tiny_csv(tmp_path_factory) -> tuple[Path, Path]:
    """(train.csv with 64 rows, validation.csv with 16 rows); columns sentence, label."""
    d = tmp_path_factory.mktemp("data")
    return (write_csv(d / "train.csv", sentiment_rows(64, 0)),
            write_csv(d / "validation.csv", sentiment_rows(16, 1)))


@pytest.fixture(scope="session")
def resume_assets(tmp_path_factory) -> dict[str, Path]:
    """The tiny BERT and task of the kill-and-resume tests (tests/_tiny_run.setup)."""
    return setup(tmp_path_factory.mktemp("resume_assets"))


@pytest.fixture(scope="session")
def references(request, resume_assets, tmp_path_factory) -> References:
    """Their uninterrupted reference runs (tests/references.py), made on first use."""
    modules = {item.path.stem for item in request.session.items}
    return References(resume_assets, tmp_path_factory.mktemp("references"), modules)


# Test modules that share one session fixture's expensive product run in one worker
# under ``pytest -n 2 --dist loadgroup`` (scripts/test.sh): the kill / resume modules
# compare with the same uninterrupted reference runs (tests/references.py).
SHARED_WORKER = {"test_resume": "references", "test_resume_modes": "references",
                 "test_resume_sharded": "references",
                 "test_gradient_accumulation": "references"}
# The longest groups start first (one process, CPU: seconds), so that neither worker is
# left with a long tail; the rest follow in file order.
LONGEST_FIRST = ["references",  # ~300
                 "test_bench_smoke", "test_slurm_real",  # ~190, ~160
                 "test_families_distributed", "test_export_formats",  # ~70 each
                 "test_tasks_ranks",  # ~70
                 "test_gradient_accumulation", "test_gradient_checkpointing",  # ~40
                 "test_qa", "test_faithful", "test_families_deep", "test_faults"]  # ~25


@pytest.hookimpl(tryfirst=True)  # before xdist reads the groups off the items
def pytest_collection_modifyitems(config, items) -> None:
    """Under xdist: each test module is one unit of work (its module fixtures are made
    once), modules sharing a session product form one unit, and the longest go first."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return

    def group(item) -> str:
        return SHARED_WORKER.get(item.path.stem, item.path.stem)

    for item in items:
        item.add_marker(pytest.mark.xdist_group(group(item)))
    order = {g: i for i, g in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: order.get(group(item), len(order)))  # stable


def pytest_sessionfinish(session, exitstatus) -> None:
    rank_pool.close()  # the session's two ranks (tests/rank_pool.py), when started
