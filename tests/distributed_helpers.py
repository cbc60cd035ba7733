"""Tiny offline assets and the 2-rank worker shared by the distributed tests.

``make_assets`` writes a word-level BERT tokenizer, a tiny pre-trained encoder, a tiny
"fine-tuned" teacher (random, 3 labels) and a 3-class CSV task. ``worker`` is the body
of one rank (run on the session's two ranks, tests/rank_pool.py): it runs every check
of a strategy in one job and rank 0 saves what the parent test compares against one
process.
"""

from __future__ import annotations

import json
import random
import socket
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

WORDS = [f"w{i}" for i in range(200)]
GLOBAL_BATCH = 8
STEPS = 4


def make_assets(root: Path, hidden: int = 32, layers: int = 2, n_train: int = 48
                ) -> dict[str, str]:
    """Write tokenizer + student + teacher dirs and train / validation CSVs under ``root``."""
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizer

    root.mkdir(parents=True, exist_ok=True)
    vocab = root / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]))
    tok = BertTokenizer(str(vocab), do_lower_case=True)
    cfg = BertConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
                     intermediate_size=2 * hidden, vocab_size=len(WORDS) + 5,
                     max_position_embeddings=64, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0, num_labels=3)
    paths = {}
    for name, seed in (("student", 0), ("teacher", 1)):
        torch.manual_seed(seed)
        model = BertForSequenceClassification(cfg)
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
        paths[name] = str(root / name)
    rng = random.Random(0)
    for split, n in (("train", n_train), ("validation", 16)):
        rows = ["sentence,label"]
        for _ in range(n):
            label = rng.randrange(3)
            words = [WORDS[rng.randrange(label * 60, label * 60 + 80)]
                     for _ in range(rng.randrange(4, 12))]
            rows.append(f"{' '.join(words)},{'abc'[label]}")
        (root / f"{split}.csv").write_text("\n".join(rows) + "\n")
        paths[split] = str(root / f"{split}.csv")
    return paths


def run_config(assets: dict[str, str], out: str, **overrides: Any) -> dict[str, Any]:
    """The test run's config as a dict (YAML-ready)."""
    cfg: dict[str, Any] = {
        "model": {"name_or_path": assets["student"], "teacher": assets["teacher"]},
        "data": {"train_file": assets["train"], "validation_file": assets["validation"],
                 "max_length": 16},
        "pruning": {"method": "movement", "scope": "global", "initial_sparsity": 0.3,
                    "final_sparsity": 0.7, "initial_warmup": 0, "final_warmup": 0.3,
                    "score_lr": 0.01, "zero_pruned_weights": True},
        "cap": {"num_negatives": 8, "snapshot_schedule": "epoch", "max_snapshots": 2},
        "train": {"epochs": 1, "max_steps": 6, "batch_size": GLOBAL_BATCH, "lr": 1e-3,
                  "eval_batch_size": 8, "grad_clip": 1.0, "progress": False, "seed": 3},
        "output_dir": out,
    }
    for key, value in overrides.items():
        node = cfg
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return cfg


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scratch_dir(assets: dict[str, str]) -> str:
    """An output folder beside the assets, for runs whose outputs no test reads (never
    the working directory: a run may write its token cache there)."""
    return str(Path(assets["train"]).parent / "unused")


def build_run(assets: dict[str, str], ctx: Any, batch_size: int, **overrides: Any) -> Any:
    """A set-up CAPRecipe on the tiny assets (banks filled, SnC snapshot taken)."""
    from capscale.checks import run_config_from_dict
    from capscale.console import Console
    from capscale.recipe import CAPRecipe

    cfg = run_config_from_dict(run_config(assets, scratch_dir(assets), **{
        "train.batch_size": batch_size, **overrides}))
    run = CAPRecipe(cfg, ctx, Console(enabled=False))
    run.setup()
    run.snapshot(cfg.cap.snapshot_train_mode, "test snapshot")
    return run


def batch_rows(run: Any, start: int, stop: int) -> dict[str, torch.Tensor]:
    """Rows ``[start, stop)`` of the tokenised training set, collated."""
    from capscale.data import Collator
    ds = run.loaders.bank.dataset
    return Collator(0)([ds[i] for i in range(start, stop)])


def local_rows(step: int, rank: int, world: int) -> tuple[int, int]:
    per = GLOBAL_BATCH // world
    start = step * GLOBAL_BATCH + rank * per
    return start, start + per


def train_and_record(run: Any, ctx: Any) -> dict[str, Any]:
    """Step 0 with losses and full grads recorded, then STEPS - 1 more steps; masks etc."""
    from capscale.pruning.hybrid import HybridController

    rank, world = ctx.rank, ctx.world_size
    out: dict[str, Any] = {}
    pruner = run.controller.pruner
    pruner.update(0)
    model = run.student.model
    losses = run.loss(model, run.student.tap, batch_rows(run, *local_rows(0, rank, world)),
                      0)
    total = torch.stack(list(losses.values())).sum()
    out["losses"] = {k: float(ctx.all_reduce_sum(v.detach().float())) / world
                     for k, v in losses.items()}
    run.strategy.backward(total, model)
    out["grads"] = run.strategy.full_grads(model)
    run.strategy.step(model, run.student.optimizer, run.student.scheduler,
                      run.cfg.train.grad_clip)
    run.state.step = 1
    for step in range(1, STEPS):
        if step == STEPS - 1:  # the masks the last step's forward will use
            pruner.update(step)
            with run.strategy.gathered(model):
                out["masks"] = {k: v.cpu().clone() for k, v in pruner.masks().items()}
        run.train_step(batch_rows(run, *local_rows(step, rank, world)))
    # (hybrid: a few heads in all, so fractions that keep at least one)
    hybrid = isinstance(run.controller, HybridController)
    keeps = (0.3, 0.5, 0.8) if hybrid else (0.05, 0.5, 0.93)
    # Bisection over this rank's shards (all-reduced counts) ...
    out["thresholds"] = [pruner.global_threshold(k) for k in keeps]
    with run.strategy.gathered(model):
        out["weights"] = {k: m.weight.detach().cpu().clone()
                          for k, m in pruner.modules.items()}
        # ... vs. one process' top-k over the very same (gathered) scores.
        scores = torch.cat([m.importance().detach().flatten()
                            for m in pruner.modules.values()])
        out["thresholds_full"] = [float(scores.topk(round(k * scores.numel())).values.min())
                                  for k in keeps]
        live = {k: v.cpu().clone() for k, v in pruner.masks().items()}
    plain = run.full_student()  # what export writes: an unsharded copy on rank 0
    if plain is not None:
        names = run.adapter.qualified_names(plain)
        out["export_masks_equal"] = all(torch.equal(
            plain.get_submodule(names[k]).mask().bool().cpu(), v) for k, v in live.items())
    out["sparsity"] = run.controller.report()["linear_sparsity"]
    if hybrid:  # heads and FFN neurons apart
        out["unit_keep"] = run.controller.keep()
        out["ffn_thresholds"] = [run.controller.pruners[1].global_threshold(k) for k in keeps]
        out["hidden_keep"] = run.controller.hidden_keep()
        out["hidden_score"] = run.controller.hidden.score.clone()
    return out


def teacher_record(run: Any) -> dict[str, Any]:
    from capscale.data import model_inputs
    from capscale.distributed import local_param_bytes
    with torch.no_grad():
        logits = run.teacher(**model_inputs(batch_rows(run, 0, GLOBAL_BATCH),
                                            run.ctx.device)).logits
    return {"teacher_logits": logits.cpu(), "teacher_bytes": local_param_bytes(run.teacher)}


def worker(rank: int, world: int, strategy: str, assets: dict[str, str], out_dir: str,
           smoke: bool) -> None:
    """One rank (of tests/rank_pool.py): parity, masks, threshold and teacher checks,
    then the real entry point."""
    from capscale.distributed import init_distributed
    ctx = init_distributed(strategy)  # the pool's process group, with this strategy
    run = build_run(assets, ctx, GLOBAL_BATCH // world)
    record = {**train_and_record(run, ctx), **teacher_record(run), "strategy": ctx.strategy}
    del run
    record["hybrid"] = train_and_record(
        build_run(assets, ctx, GLOBAL_BATCH // world, **HYBRID_OVERRIDES), ctx)
    if rank == 0:
        torch.save(record, Path(out_dir) / "record.pt")
    if smoke:
        _smoke(assets, out_dir, strategy)
    dist.barrier()


def _smoke(assets: dict[str, str], out_dir: str, strategy: str) -> None:
    import yaml

    from capscale.run import main
    cfg_path = Path(out_dir) / "smoke.yaml"
    out = str(Path(out_dir) / "smoke")
    if dist.get_rank() == 0:
        extra = {}
        if strategy == "zero3":  # the shipped DeepSpeed JSON, "auto" values filled
            extra["distributed.deepspeed_config"] = str(
                Path(__file__).resolve().parent.parent / "ds_configs" / "zero3.json")
        cfg_path.write_text(yaml.safe_dump(run_config(
            assets, out, **{"train.max_steps": 2, "train.batch_size": 4, **extra})))
    dist.barrier()
    rc = main(["--config", str(cfg_path), f"strategy={strategy}"])
    if dist.get_rank() == 0:
        (Path(out_dir) / "smoke_rc.json").write_text(json.dumps({"rc": rc}))


def make_family_assets(root: Path, family: str) -> dict[str, str]:
    """``make_assets`` with a student and teacher of another encoder ``family`` (the
    configs of structured_models, on this word-level vocabulary)."""
    from structured_models import CONFIGS
    from transformers import AutoModelForSequenceClassification

    paths = make_assets(root)
    tok_dir = Path(paths["student"])
    for name, seed in (("student", 0), ("teacher", 1)):
        cfg = CONFIGS[family]()
        cfg.vocab_size = len(WORDS) + 5
        torch.manual_seed(seed)
        model = AutoModelForSequenceClassification.from_config(cfg)
        out = root / f"{family}_{name}"
        model.save_pretrained(out)
        for f in tok_dir.iterdir():
            if f.name not in ("config.json", "model.safetensors"):
                (out / f.name).write_bytes(f.read_bytes())
        paths[name] = str(out)
    return paths


# Movement scores on whole heads and neurons, seeded by their norms (no ties: exact
# masks); emptied blocks skipped, a quarter of the hidden dimension pruned by movement.
HYBRID_OVERRIDES = {"pruning.method": "hybrid", "pruning.score_warm_start": "magnitude",
                    "structured.remove_empty_blocks": True,
                    "structured.hidden_sparsity": 0.25}
FAMILY_OVERRIDES = {"pruning.scope": "local"}  # per logical matrix top-k (fused maps split)


def family_worker(rank: int, world: int, strategy: str, assets: dict[str, dict[str, str]],
                  out_dir: str) -> None:
    """One rank (of tests/rank_pool.py): for each family, the parity record of
    ``train_and_record``."""
    from capscale.distributed import init_distributed
    ctx = init_distributed(strategy)  # the pool's process group, with this strategy
    records = {}
    for family, paths in assets.items():
        run = build_run(paths, ctx, GLOBAL_BATCH // world, **FAMILY_OVERRIDES)
        records[family] = train_and_record(run, ctx)
        del run
    if rank == 0:
        torch.save(records, Path(out_dir) / "records.pt")
    dist.barrier()


def assert_losses_and_grads_match(one: dict[str, Any], two: dict[str, Any],
                                  required: set[str]) -> None:
    """``two`` (2 ranks) gives ``one``'s (one process) loss terms and full gradients.

    Losses to rel 1e-5 and abs 1e-7 (a KL between almost equal float32 distributions is
    a difference of logs, exact only to ~1e-7 absolute); gradients to atol 1e-5 and
    rtol 1e-4 (reduction order differs between an all-reduce and one process' sums).
    """
    import pytest

    assert set(two["losses"]) == set(one["losses"]) >= required
    for name, value in one["losses"].items():
        assert two["losses"][name] == pytest.approx(value, rel=1e-5, abs=1e-7), name
    assert set(two["grads"]) == set(one["grads"])
    assert any(n.endswith("mask_scores") for n in one["grads"])
    for name, grad in one["grads"].items():
        torch.testing.assert_close(two["grads"][name], grad, atol=1e-5, rtol=1e-4,
                                   msg=lambda m, n=name: f"{n}: {m}")
