"""DeepSpeed ZeRO-3 for the student (with its optimiser) and for frozen references.

ZeRO-3 partitions each parameter flat: rank ``r`` holds elements
``[r * P, (r + 1) * P)`` of the flattened tensor in ``p.ds_tensor``, ``P =
ceil(numel / world)``, the last rank zero-padded; ``p.shape`` reads ``(0,)`` outside
forward. Masks are sliced the same way and applied through DeepSpeed's local
grad / fp32 accessors (made for pruning), plus the low-precision partition itself.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, cast

import torch
from torch import Tensor, nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

from capscale.distributed.context import DistContext
from capscale.distributed.precision import GradientOverflow, Precision
from capscale.distributed.strategy import LrLambda, Strategy, switched, unwrap
from capscale.pruning.masked import MaskedLinear


def import_deepspeed() -> Any:
    """Import DeepSpeed for this machine (CPU accelerator without CUDA; no JIT builds)."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed
    # The shared-memory comm op is JIT-compiled (60-90 s) on first use; gloo is enough.
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    return deepspeed


def _hidden(model: nn.Module) -> int:
    cfg = getattr(unwrap(model), "config", None)
    return int(getattr(cfg, "hidden_size", 0) or 1024)


def _fill_auto(node: Any, values: dict[str, Any]) -> Any:
    """Replace ``"auto"`` leaves by ``values[key]`` (as the HF DeepSpeed integration does)."""
    if isinstance(node, dict):
        return {k: (values[k] if v == "auto" and k in values else _fill_auto(v, values))
                for k, v in node.items()}
    return node


DS_DIR, DS_TAG = "deepspeed", "state"  # engine checkpoint folder and fixed tag


class ZeRO3Strategy(Strategy):
    """DeepSpeed ZeRO-3: student engine with DeepSpeed's optimiser; sharded references.

    ``options`` (config ``distributed``): ``deepspeed_config`` (JSON path; "auto" values
    filled from the model and the train section), ``offload_params``,
    ``offload_optimizer``, ``shard_references``.
    """

    name = "zero3"
    shards_parameters = True

    def __init__(self, ctx: DistContext, options: Any = None,
                 precision: Precision | None = None) -> None:
        super().__init__(ctx, options, precision)
        self.ds = import_deepspeed()
        self.ds.init_distributed(dist_backend="nccl" if ctx.device.type == "cuda" else "gloo")

    # -- configs -----------------------------------------------------------------
    def _base_config(self) -> dict[str, Any]:
        path = getattr(self.options, "deepspeed_config", None) or os.environ.get(
            "ACCELERATE_DEEPSPEED_CONFIG_FILE")
        if path:
            with open(path) as f:
                cfg = json.load(f)
        else:
            cfg = {"zero_optimization": {"stage": 3, "reduce_bucket_size": "auto",
                                         "stage3_prefetch_bucket_size": "auto",
                                         "stage3_param_persistence_threshold": "auto"}}
        return cfg

    def _precision_sections(self, cfg: dict[str, Any], name: str) -> dict[str, Any]:
        """``bf16`` / ``fp16`` sections set from ``name`` (``train.precision`` for the
        student, ``cap.reference_dtype`` for a reference): the file's other keys in them
        are kept (e.g. fp16's ``initial_scale_power``); gradients accumulate in fp32."""
        for key in ("bf16", "fp16"):
            given = cfg.get(key)
            section: dict[str, Any] = given if isinstance(given, dict) else {}
            cfg[key] = {**section, "enabled": key == name}
        if name != "fp32":
            cfg.setdefault("data_types", {})["grad_accum_dtype"] = "fp32"
        return cfg

    def _zero_values(self, model: nn.Module) -> dict[str, Any]:
        h = _hidden(model)
        # TRL's sizing from the hidden size; small models get small buckets (fast on CPU).
        return {"reduce_bucket_size": h * h, "stage3_prefetch_bucket_size": int(0.9 * h * h),
                "stage3_param_persistence_threshold": 10 * h}

    def _offload(self, zero: dict[str, Any]) -> None:
        if getattr(self.options, "offload_params", False):
            zero["offload_param"] = {"device": "cpu", "pin_memory": True}
        if getattr(self.options, "offload_optimizer", False):
            zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}

    def student_config(self, model: nn.Module, lr: float, micro_batch_size: int,
                       grad_clip: float) -> dict[str, Any]:
        """The student's DeepSpeed config: the file (or defaults) with "auto" filled."""
        values = {**self._zero_values(model), "train_micro_batch_size_per_gpu":
                  micro_batch_size, "gradient_accumulation_steps": 1,
                  "train_batch_size": micro_batch_size * self.ctx.world_size,
                  "gradient_clipping": grad_clip, "lr": lr}
        cfg = self._precision_sections(_fill_auto(self._base_config(), values),
                                       self.precision.name)
        for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                    "gradient_clipping"):
            cfg.setdefault(key, values[key])
        cfg.pop("train_batch_size", None)  # implied; a stale value would only conflict
        cfg.setdefault("optimizer", {"type": "AdamW", "params": {"lr": lr}})
        if self.ctx.device.type == "cpu":  # torch's AdamW: no fused-op build on CPU
            cfg["optimizer"].setdefault("params", {})["torch_adam"] = True
        cfg.setdefault("steps_per_print", 2**31 - 1)
        zero = cfg.setdefault("zero_optimization", {})
        if zero.get("stage") != 3:
            raise ValueError(f"strategy zero3 needs zero_optimization.stage 3, got "
                             f"{zero.get('stage')}")
        self._offload(zero)
        return cfg

    def reference_config(self, model: nn.Module) -> dict[str, Any]:
        """A frozen model's config: no optimiser, ZeRO-3 sized from its hidden size."""
        cfg = _fill_auto(copy.deepcopy(self._base_config()), self._zero_values(model))
        for key in ("optimizer", "scheduler", "gradient_clipping", "train_batch_size",
                    "data_types"):
            cfg.pop(key, None)
        cfg = self._precision_sections(cfg, self.precision.reference)
        cfg["train_micro_batch_size_per_gpu"] = 1
        cfg["gradient_accumulation_steps"] = 1
        cfg["zero_optimization"] = {**cfg.get("zero_optimization", {}), "stage": 3,
                                    **self._zero_values(model)}
        cfg.setdefault("steps_per_print", 2**31 - 1)
        self._offload(cfg["zero_optimization"])
        cfg["zero_optimization"].pop("offload_optimizer", None)  # nothing to optimise
        return cfg

    # -- wrapping ----------------------------------------------------------------
    def prepare_student(self, model: nn.Module, param_groups: list[dict], lr_lambda: LrLambda,
                        micro_batch_size: int = 1, grad_clip: float = 0.0
                        ) -> tuple[nn.Module, Optimizer, LambdaLR]:
        """A DeepSpeed engine; the groups (scores with their own lr) reach its AdamW."""
        cfg = self.student_config(model, param_groups[0]["lr"], micro_batch_size, grad_clip)
        engine, opt, _, sched = self.ds.initialize(
            model=model, model_parameters=param_groups, config=cfg,
            lr_scheduler=lambda o: LambdaLR(o, lr_lambda))
        return engine, opt, sched

    def fresh_optimizer(self, model: nn.Module, opt: Optimizer, param_groups: list[dict],
                        lr_lambda: LrLambda) -> tuple[Optimizer, LambdaLR]:
        """Reset the engine's optimiser in place and give it a new LR schedule.

        Rebuilding the engine would re-partition the model and re-register its hooks;
        instead the AdamW moments over this rank's fp32 partitions are dropped (torch
        AdamW and DeepSpeedCPUAdam both re-create them, step 0, at the next step) and
        the groups' lr / weight decay are set from ``param_groups``, one group each, as
        ``prepare_student`` built them.
        """
        # DeepSpeed (untyped) wraps the basic optimiser over the flat fp32 partitions.
        inner: Optimizer = cast(Any, opt).optimizer
        if len(inner.param_groups) != len(param_groups):
            raise ValueError(f"fresh_optimizer: {len(param_groups)} groups given, the "
                             f"engine's optimiser has {len(inner.param_groups)}")
        if getattr(opt, "swap_optimizer", False):
            raise ValueError("fresh_optimizer: NVMe-swapped optimiser states cannot be reset")
        inner.state.clear()
        for group, given in zip(inner.param_groups, param_groups):
            group["lr"] = group["initial_lr"] = given["lr"]
            group["weight_decay"] = given.get("weight_decay", group["weight_decay"])
        sched = LambdaLR(inner, lr_lambda)  # what ``prepare_student`` gave the engine
        cast(Any, model).lr_scheduler = sched  # the engine steps it inside ``model.step()``
        return opt, sched

    def prepare_reference(self, model: nn.Module) -> nn.Module:
        """A ZeRO-3 engine without optimiser, in ``cap.reference_dtype`` (DeepSpeed casts
        the module for its bf16 / fp16 section)."""
        if not getattr(self.options, "shard_references", True):
            return super().prepare_reference(model)
        engine, *_ = self.ds.initialize(model=model, config=self.reference_config(model))
        engine.eval()
        return engine

    # -- stepping ----------------------------------------------------------------
    def backward(self, loss: Tensor, model: nn.Module) -> None:
        cast(Any, model).backward(loss)  # a DeepSpeed engine

    def grad_sync(self, model: nn.Module, sync: bool) -> contextlib.AbstractContextManager:
        """ZeRO-3 reduce-scatters in every backward (its gradients are partitioned, so
        there is no local accumulation to defer to); off, the engine is told that this
        micro-batch is no accumulation boundary and adds its gradient partitions to the
        earlier ones until the step."""
        return switched(cast(Any, model).set_gradient_accumulation_boundary,
                                       sync)

    def step(self, model: nn.Module, opt: Optimizer, sched: LambdaLR, grad_clip: float) -> None:
        """DeepSpeed's step clips (config ``gradient_clipping``), steps and schedules;
        under fp16 its loss scaler skips a step whose gradients overflowed (the LR
        schedule too), which is raised as :class:`GradientOverflow`."""
        self._mask_grads()
        engine = cast(Any, model)
        engine.step()
        if not engine.was_step_applied():  # its gradients are dropped already
            raise GradientOverflow("fp16 gradients overflowed; DeepSpeed skipped the step "
                                   f"(loss scale now {engine.optimizer.cur_scale:g})")
        self._mask_weights()

    # -- shards --------------------------------------------------------------------
    def _partition(self, numel: int) -> tuple[int, int]:
        """(start, length) of this rank's partition of a flattened ``numel`` tensor."""
        size = math.ceil(numel / self.ctx.world_size)
        return self.ctx.rank * size, size

    def local_mask(self, full: Tensor) -> Tensor:
        start, size = self._partition(full.numel())
        flat = full.reshape(-1)[start:start + size]
        out = torch.zeros(size, dtype=full.dtype, device=full.device)
        out[:flat.numel()] = flat
        return out

    def local_importance(self, m: MaskedLinear) -> Tensor:
        p = m.mask_scores if m.mask_scores is not None else m.weight
        numel = m.num_scores
        start, size = self._partition(numel)
        valid = max(0, min(size, numel - start))  # drop the zero padding of the last rank
        local = _ds_partition(p).detach().reshape(-1)[:valid]
        return local if m.mask_scores is not None else local.abs()

    def mul_local_grad(self, p: Tensor, mask: Tensor) -> None:
        grad = self.ds.utils.safe_get_local_grad(p)
        if grad is not None:
            self.ds.utils.safe_set_local_grad(p, grad * _fit(mask, grad))

    def mul_local_weight(self, p: Tensor, mask: Tensor) -> None:
        fp32 = self.ds.utils.safe_get_local_fp32_param(p)
        if fp32 is not None:
            self.ds.utils.safe_set_local_fp32_param(p, fp32 * _fit(mask, fp32))
        # The low-precision partition would only pick the fp32 values up next step.
        _ds_partition(p).data.mul_(_fit(mask, _ds_partition(p)))

    def full_grads(self, model: nn.Module) -> dict[str, Tensor]:
        out = {}
        for n, p in unwrap(model).named_parameters():
            if p.requires_grad:
                g = self.ds.utils.safe_get_full_grad(p)
                if g is not None:
                    out[n] = g.detach().clone()
        return out

    @contextmanager
    def gathered(self, model: nn.Module) -> Iterator[nn.Module]:
        bare = unwrap(model)
        if hasattr(model, "empty_partition_cache"):  # wait for and release prefetches
            cast(Any, model).empty_partition_cache()
        with self.ds.zero.GatheredParameters(list(bare.parameters()), modifier_rank=None):
            yield bare

    # -- checkpoints -----------------------------------------------------------------
    def save_state(self, path: Path, model: nn.Module, opt: Optimizer, sched: LambdaLR
                   ) -> list[Path]:
        """The engine's own checkpoint: every rank writes its partitions. Collective.

        The LR schedule travels as client state and is restored explicitly, so it
        round-trips whether or not it is the engine's registered scheduler.

        Returns:
            this rank's partition files (and, on rank 0, the files no rank names).
        """
        folder = path / DS_DIR
        cast(Any, model).save_checkpoint(  # a DeepSpeed engine
            str(folder), tag=DS_TAG, save_latest=False,
            client_state={"capscale_scheduler": sched.state_dict()})
        written = sorted(p for p in (folder / DS_TAG).rglob("*") if p.is_file())
        mine = [p for p in written if p.name.startswith(f"zero_pp_rank_{self.ctx.rank}_")]
        if self.ctx.is_main:  # files no rank names, and the folders' entries
            mine += [p for p in written if not p.name.startswith("zero_pp_rank_")]
            mine += [folder / DS_TAG, folder]
        return mine

    def load_state(self, path: Path, model: nn.Module, opt: Optimizer, sched: LambdaLR
                   ) -> None:
        """Load this rank's partitions (fp32 master weights, AdamW moments), then the
        LR schedule. Collective; needs the same world size as the save."""
        loaded, client = cast(Any, model).load_checkpoint(
            str(path / DS_DIR), tag=DS_TAG, load_optimizer_states=True,
            load_lr_scheduler_states=False)
        if loaded is None:
            raise RuntimeError(f"DeepSpeed found no checkpoint under {path / DS_DIR}")
        sched.load_state_dict(client["capscale_scheduler"])
        for m in self.masked:  # weights / scores changed under the no-grad cache's key
            m.invalidate_mask_cache()


def _ds_partition(p: Tensor) -> Tensor:
    """This rank's flat partition of a ZeRO-3 parameter (DeepSpeed attaches ``ds_tensor``)."""
    return cast(Any, p).ds_tensor


def _fit(mask: Tensor, like: Tensor) -> Tensor:
    """The flat local mask shaped and typed like a local partition (padding cut off)."""
    flat = mask.reshape(-1)[: like.numel()]
    return flat.view(like.shape).to(device=like.device, dtype=like.dtype)
