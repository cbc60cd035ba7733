"""torch FSDP2 (``fully_shard``) for the student and for frozen references.

Every block of a ``ModuleList`` (the encoder layers) and every embedding is sharded on
its own, then the root. Parameters become DTensors sharded on dim 0 (rows): rank ``r`` holds rows
``[r * C, min((r + 1) * C, out))``, ``C = ceil(out / world)`` (``torch.chunk``); masks
are sliced the same way and multiplied into ``p.grad.to_local()`` / ``p.to_local()``.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
import torch.distributed.checkpoint as dcp
from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

from capscale.distributed.context import DistContext
from capscale.distributed.precision import Precision
from capscale.distributed.strategy import LrLambda, Strategy, adamw, switched, unwrap
from capscale.pruning.masked import MaskedLinear

if TYPE_CHECKING:
    from torch.distributed.tensor import DTensor

DCP_DIR = "dcp"  # torch.distributed.checkpoint folder inside a checkpoint
SCHED_FILE = "scheduler.pt"


class FSDP2Strategy(Strategy):
    """FSDP2: sharded student with torch AdamW over DTensors; sharded references."""

    name = "fsdp2"
    shards_parameters = True

    def __init__(self, ctx: DistContext, options: Any = None,
                 precision: Precision | None = None) -> None:
        super().__init__(ctx, options, precision)
        self.mesh = init_device_mesh(ctx.device.type, (ctx.world_size,))

    def shard(self, model: nn.Module, mixed: bool = False) -> nn.Module:
        """``fully_shard`` every ModuleList block and the word embeddings, then the root
        (in place).

        FSDP2 keeps the root's own parameters gathered after forward, so the tables of
        the embedding block (word, position, token type) get their own units; the root
        is left with the small head and any other table. Those stay in the root's unit
        because a table whose weight the model reads directly, without calling it
        (DeBERTa's relative-position embeddings in the encoder), is only gathered by the
        unit that owns the module doing so.

        ``mixed``: the units gather their parameters in the run's low dtype and reduce
        gradients in fp32 (a student under bf16 / fp16; references are cast instead).
        """
        mp = MixedPrecisionPolicy(param_dtype=self.precision.dtype, reduce_dtype=torch.float32
                                  ) if mixed and self.precision.low else MixedPrecisionPolicy()
        tables = _embedding_block(model)
        units: list[nn.Module] = []
        for mod in model.modules():
            if isinstance(mod, nn.ModuleList):
                units.extend(mod)
            elif isinstance(mod, nn.Embedding) and any(mod is t for t in tables):
                units.append(mod)
        # Innermost first: a unit takes the parameters no inner unit holds (ALBERT nests
        # its layers' ModuleList inside its groups' ModuleList).
        for unit in reversed(units):
            fully_shard(unit, mesh=self.mesh, mp_policy=mp)
        fully_shard(model, mesh=self.mesh, mp_policy=mp)
        return model

    def prepare_student(self, model: nn.Module, param_groups: list[dict], lr_lambda: LrLambda,
                        micro_batch_size: int = 1, grad_clip: float = 0.0
                        ) -> tuple[nn.Module, Optimizer, LambdaLR]:
        """Shard, then rebuild the groups on the new DTensor parameters (same names)."""
        names = {id(p): n for n, p in model.named_parameters()}
        by_name = [[names[id(p)] for p in g["params"]] for g in param_groups]
        self.shard(model.to(self.ctx.device), mixed=True)
        params = dict(model.named_parameters())
        groups = [{**g, "params": [params[n] for n in group_names]}
                  for g, group_names in zip(param_groups, by_name)]
        opt = adamw(groups, self.ctx.device)
        return model, opt, LambdaLR(opt, lr_lambda)

    def prepare_reference(self, model: nn.Module) -> nn.Module:
        if not getattr(self.options, "shard_references", True):
            return super().prepare_reference(model)
        return self.shard(model.to(self.ctx.device, self.precision.reference_dtype)).eval()

    # -- stepping ------------------------------------------------------------------
    def grad_sync(self, model: nn.Module, sync: bool) -> contextlib.AbstractContextManager:
        """FSDP2's switch: off, every unit keeps its unsharded gradients and
        reduce-scatters nothing until a backward with it on (which sends the sum)."""
        return switched(cast(FSDPModule, model).set_requires_gradient_sync,
                                       sync)

    def discard_grads(self, model: nn.Module, opt: Optimizer) -> None:
        """Also the unsharded gradients that backward passes without sync left in the
        units (FSDP2 would add them to the next reduce-scatter)."""
        super().discard_grads(model, opt)
        for unit in unwrap(model).modules():
            if not isinstance(unit, FSDPModule):
                continue
            group = unit._get_fsdp_state()._fsdp_param_group
            for param in group.fsdp_params if group is not None else []:
                param.unsharded_accumulated_grad = None
                if hasattr(param, "_unsharded_param"):
                    param._unsharded_param.grad = None

    # -- shards --------------------------------------------------------------------
    def _rows(self, out_features: int) -> slice:
        size = math.ceil(out_features / self.ctx.world_size)
        start = min(self.ctx.rank * size, out_features)
        return slice(start, min(start + size, out_features))

    def local_mask(self, full: Tensor) -> Tensor:
        return full[self._rows(full.shape[0])]

    def local_importance(self, m: MaskedLinear) -> Tensor:
        """The local shard rounded as the forward's gathered copy is (low-precision
        gathers), so a global threshold splits the values the forward ranks."""
        if m.mask_scores is not None:
            return self.precision.ranked(cast("DTensor", m.mask_scores.detach()).to_local())
        return self.precision.ranked(cast("DTensor", m.weight.detach()).to_local()).abs()

    def mul_local_grad(self, p: Tensor, mask: Tensor) -> None:
        if p.grad is not None:
            local = cast("DTensor", p.grad).to_local()
            _check(local, mask)
            local.mul_(mask.to(local.dtype))

    def mul_local_weight(self, p: Tensor, mask: Tensor) -> None:
        local = cast("DTensor", p.detach()).to_local()
        _check(local, mask)
        local.mul_(mask.to(local.dtype))

    def full_grads(self, model: nn.Module) -> dict[str, Tensor]:
        return {n: cast("DTensor", p.grad).full_tensor().detach().clone()
                for n, p in unwrap(model).named_parameters() if p.grad is not None}

    @contextmanager
    def gathered(self, model: nn.Module) -> Iterator[nn.Module]:
        bare = unwrap(model)
        shards = [m for m in bare.modules() if isinstance(m, FSDPModule)]
        for m in shards:
            m.unshard()
        try:
            yield bare
        finally:
            for m in shards:
                m.reshard()

    # -- checkpoints -----------------------------------------------------------------
    def save_state(self, path: Path, model: nn.Module, opt: Optimizer, sched: LambdaLR
                   ) -> list[Path]:
        """Every rank writes its shards (student + AdamW) with torch.distributed.checkpoint.

        The LR schedule is replicated: rank 0 writes it. Collective.

        Returns:
            this rank's ``.distcp`` files (and, on rank 0, the metadata and schedule).
        """
        model_sd, optim_sd = get_state_dict(model, opt)
        folder = path / DCP_DIR
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=folder)
        files = sorted(folder.glob(f"__{self.ctx.rank}_*.distcp"))
        if self.ctx.is_main:
            torch.save({"scheduler": sched.state_dict(), **self.scaler_state()},
                       path / SCHED_FILE)
            files += [folder / ".metadata", path / SCHED_FILE, folder]  # + its entries
        return files

    def load_state(self, path: Path, model: nn.Module, opt: Optimizer, sched: LambdaLR
                   ) -> None:
        """Read the shards back into this sharding (collective) and the LR schedule."""
        model_sd, optim_sd = get_state_dict(model, opt)  # the layout to load into
        state: dict[str, Any] = {"model": model_sd, "optim": optim_sd}
        dcp.load(state, checkpoint_id=path / DCP_DIR)
        set_state_dict(model, opt, model_state_dict=state["model"],
                       optim_state_dict=state["optim"])
        replicated = torch.load(path / SCHED_FILE, weights_only=True)
        sched.load_state_dict(replicated["scheduler"])
        self.load_scaler_state(replicated)
        for m in self.masked:  # weights / scores changed under the no-grad cache's key
            m.invalidate_mask_cache()


def _check(local: Tensor, mask: Tensor) -> None:
    if local.shape != mask.shape:
        raise RuntimeError(f"mask shard {tuple(mask.shape)} does not match the local "
                           f"parameter shard {tuple(local.shape)}")


def _embedding_block(model: nn.Module) -> list[nn.Module]:
    """The embedding tables next to the word embeddings (every table if unknown)."""
    get_input = getattr(model, "get_input_embeddings", None)
    words = get_input() if callable(get_input) else None
    if words is None:
        return [m for m in model.modules() if isinstance(m, nn.Embedding)]
    names = {id(m): n for n, m in model.named_modules()}
    block = names.get(id(words), "").rpartition(".")[0]
    parent = model.get_submodule(block) if block else model
    return [m for m in parent.modules() if isinstance(m, nn.Embedding)]
