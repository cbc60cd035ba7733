"""CUDA throughput options chosen at run setup, checked where they are decided: fused
AdamW (capscale.distributed.strategy.adamw), TF32 for fp32 runs (capscale.train.tf32),
and the loaders' worker processes and pinned memory (capscale.data.loader_options): on
CPU, loaders with workers give the same batches in the same order as without, through
epochs and a resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from capscale.checks import load_run_config
from capscale.config import ConfigError, DataConfig, config_to_dict
from capscale.console import Console
from capscale.data import build_loaders, load_task_data, loader_options
from capscale.distributed import DistContext, Strategy
from capscale.distributed.strategy import adamw
from capscale.models.loading import load_tokenizer
from capscale.train.checkpoint import checkpoint_root, resolve_resume
from capscale.train.loop import TrainLoop
from capscale.train.state import RunState
from capscale.train.tf32 import runs_fp32, set_tf32

CUDA = torch.cuda.is_available()
NEW_TF32_API = hasattr(torch.backends.cuda.matmul, "fp32_precision")


def _groups(model: nn.Module) -> list[dict]:
    weights = [p for p in model.parameters() if p.ndim > 1]
    biases = [p for p in model.parameters() if p.ndim == 1]
    return [{"params": weights, "lr": 0.1, "weight_decay": 0.01},
            {"params": biases, "lr": 0.2, "weight_decay": 0.0}]


def test_adamw_is_torch_default_on_cpu():
    """A CPU run keeps torch's own choice (foreach / loop): fused stays unset, and the
    groups keep their own learning rates and decay."""
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    opt = adamw(_groups(model), torch.device("cpu"))
    assert isinstance(opt, torch.optim.AdamW)
    assert [g["fused"] for g in opt.param_groups] == [None, None]
    assert [(g["lr"], g["weight_decay"]) for g in opt.param_groups] == [(0.1, 0.01),
                                                                        (0.2, 0.0)]


def test_adamw_on_a_cuda_run_with_parameters_off_the_gpu_is_not_fused():
    """The device says CUDA but a parameter is not a CUDA tensor: the fused kernel
    would refuse it, so torch's default is kept (no CUDA needed to decide)."""
    model = nn.Linear(4, 3)
    opt = adamw(_groups(model), torch.device("cuda"))
    assert all(not g["fused"] for g in opt.param_groups)


def test_strategy_optimisers_go_through_adamw():
    """prepare_student and fresh_optimizer both build the helper's optimiser, and it
    steps like a plain torch AdamW."""
    torch.manual_seed(0)
    model, twin = nn.Linear(4, 3), nn.Linear(4, 3)
    twin.load_state_dict(model.state_dict())
    strategy = Strategy(DistContext())
    wrapped, opt, _ = strategy.prepare_student(model, _groups(model), lambda s: 1.0)
    fresh, _ = strategy.fresh_optimizer(wrapped, opt, _groups(model), lambda s: 1.0)
    plain = torch.optim.AdamW(_groups(twin))
    for o, m in ((opt, model), (plain, twin)):
        m(torch.ones(2, 4)).sum().backward()
        o.step()
    assert torch.equal(model.weight, twin.weight)
    assert [g["fused"] for g in fresh.param_groups] == [None, None]


@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_adamw_fused_on_cuda():
    model = nn.Linear(4, 3).cuda()
    assert all(g["fused"] for g in adamw(_groups(model), torch.device("cuda")).param_groups)
    half_on_cpu = [{"params": [model.weight]}, {"params": [nn.Parameter(torch.ones(3))]}]
    assert not any(g["fused"] for g in adamw(half_on_cpu,
                                             torch.device("cuda")).param_groups)


def _tf32_flags() -> tuple[object, object]:
    if NEW_TF32_API:
        return (torch.backends.cuda.matmul.fp32_precision,
                torch.backends.cudnn.conv.fp32_precision)
    return torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32


@pytest.fixture
def tf32_flags():
    """The process-wide TF32 flags as they were, put back after the test."""
    before = _tf32_flags()
    yield before
    if NEW_TF32_API:
        torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision = \
            before
    else:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def test_tf32_left_alone_off_cuda_and_in_half_precision(tf32_flags):
    """A CPU run, or a bf16 / fp16 run on CUDA, changes no process-wide flag."""
    for device, precision in (("cpu", "fp32"), ("cpu", "auto"), ("cuda", "bf16"),
                              ("cuda", "fp16")):
        assert set_tf32(torch.device(device), True, precision) is False
        assert set_tf32(torch.device(device), False, precision) is False
        assert _tf32_flags() == tf32_flags


def test_tf32_follows_the_switch_on_a_cuda_fp32_run(tf32_flags):
    """The flags are plain process settings (a CPU build holds them too), so the choice
    made for a CUDA fp32 run is checked here without a GPU."""
    on = ("tf32", "tf32") if NEW_TF32_API else (True, True)
    off = ("ieee", "ieee") if NEW_TF32_API else (False, False)
    assert set_tf32(torch.device("cuda", 0), True, "fp32") is True
    assert _tf32_flags() == on
    assert set_tf32(torch.device("cuda", 0), False, "fp32") is False
    assert _tf32_flags() == off


def test_auto_precision_is_fp32_where_it_does_not_resolve_to_bf16():
    assert runs_fp32(torch.device("cpu"), "auto")
    assert runs_fp32(torch.device("cpu"), "fp32")
    assert not runs_fp32(torch.device("cpu"), "bf16")
    if CUDA:
        assert runs_fp32(torch.device("cuda"), "auto") == (
            not torch.cuda.is_bf16_supported())


def _resumes(tmp_path: Path, saved_change: dict[str, dict], *overrides: str) -> bool:
    """Whether a checkpoint saved under the default config, edited by ``saved_change``
    (section -> fields; a None value drops the field, as an older capscale wrote it),
    is resumed by a run with ``overrides``."""
    ckpt = tmp_path / "checkpoints" / "step-00000003"
    ckpt.mkdir(parents=True)
    base = ["data.preset=tweets", f"output_dir={tmp_path}"]
    saved = config_to_dict(load_run_config(None, base))
    for section, fields in saved_change.items():
        for key, value in fields.items():
            if value is None:
                del saved[section][key]
            else:
                saved[section][key] = value
    (ckpt / "trainer_state.json").write_text(json.dumps({"config": saved}))
    cfg = load_run_config(None, [*base, "resume=latest", *overrides])
    return resolve_resume(cfg.resume, checkpoint_root(cfg.checkpoint.dir, cfg.output_dir),
                          config_to_dict(cfg)) == ckpt


def test_tf32_may_change_when_resuming(tmp_path):
    assert _resumes(tmp_path / "a", {}, "train.tf32=false")
    assert _resumes(tmp_path / "b", {"train": {"tf32": None}})  # saved before the switch


def test_loader_options_by_device():
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert loader_options("auto", cpu) == {"workers": 0, "pin_memory": False}
    assert loader_options("auto", cuda) == {"workers": 2, "pin_memory": True}
    assert loader_options(3, cpu) == {"workers": 3, "pin_memory": False}
    assert loader_options(0, cuda) == {"workers": 0, "pin_memory": True}


def test_dataloader_workers_config_is_checked(tmp_path):
    assert load_run_config(None, ["data.preset=tweets"]).train.dataloader_workers == "auto"
    assert load_run_config(None, ["data.preset=tweets", "train.dataloader_workers=4"]
                           ).train.dataloader_workers == 4
    with pytest.raises(ConfigError, match=r"train\.dataloader_workers = -1: must be >= 0"):
        load_run_config(None, ["data.preset=tweets", "train.dataloader_workers=-1"])
    assert _resumes(tmp_path, {"train": {"dataloader_workers": None}},
                    "train.dataloader_workers=2")


@pytest.fixture(scope="module")
def tiny_task(tiny_csv):
    data = load_task_data(DataConfig(train_file=str(tiny_csv[0]),
                                     validation_file=str(tiny_csv[1])))
    return data, load_tokenizer("minilm")


def _loaders(tiny_task, workers: int, world: int = 1):
    """Rank 0's loaders of ``world`` ranks (a DistributedSampler when ``world > 1``)."""
    data, tok = tiny_task
    return build_loaders(data, tok, DataConfig(max_length=16), 8, 8, seed=3, rank=0,
                         world_size=world, workers=workers)


def _train(loader, state: RunState, total: int) -> list[tuple[list[int], float]]:
    """Each step's examples and a draw from the global RNG (dropout's source), through
    the training loop (per-epoch seeding, resume skipping)."""
    seen: list[tuple[list[int], float]] = []

    def step(batches):
        seen.append((batches[0]["example_id"].tolist(), torch.rand(()).item()))
        return {"loss": 0.0}
    TrainLoop(state, loader, total, step, Console(enabled=False), "t").run()
    return seen


@pytest.mark.parametrize("world", [1, 2])
def test_workers_give_the_same_batches_through_epochs_and_a_resume(tiny_task, world):
    """The same examples in the same order and the same global RNG stream, with and
    without workers. One rank: the loader's own generator orders it; rank 0 of two: a
    DistributedSampler does, and each pass seeds its workers from the global RNG."""
    torch.manual_seed(0)
    total = 20 if world == 1 else 10  # 8 (4) batches an epoch: 3 epochs
    alone = _train(_loaders(tiny_task, 0, world).train, RunState(), total)
    torch.manual_seed(0)
    loaders = _loaders(tiny_task, 2, world)
    assert loaders.train.num_workers == 2 and not loaders.train.persistent_workers
    assert _train(loaders.train, RunState(), total) == alone
    # Killed in epoch 1, 3 batches in; resumed with a new loader.
    torch.manual_seed(0)
    first, state = RunState(), RunState()
    stop = (8 if world == 1 else 4) + 3
    head = _train(_loaders(tiny_task, 2, world).train, first, stop)
    state.load_state_dict(first.state_dict())
    state.load_rank_state(first.rank_state())
    tail = _train(_loaders(tiny_task, 2, world).train, state, total)
    assert head + tail == alone


def test_workers_draw_from_the_global_rng_as_a_loader_without(tiny_task):
    """A loader with no generator of its own (every loader under a DistributedSampler)
    seeds each pass from the global RNG: with workers it must draw the same, or the
    dropout masks after an evaluation would change."""
    after = []
    for workers in (0, 2):
        eval_loader = _loaders(tiny_task, workers, world=2).eval
        assert eval_loader.generator is None
        torch.manual_seed(0)
        batches = [b["input_ids"].tolist() for _ in range(2) for b in eval_loader]
        after.append((batches, torch.rand(()).item()))
    assert after[0] == after[1]
