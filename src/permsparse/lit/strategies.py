"""Lightning's FSDP for permutation learning (``trainer=fsdp``): one FSDP unit per Transformer block, on GPUs and on
CPUs (gloo), and the way back to a plain model after ``fit``.

What is sharded (docs/planning.md, "Modes and strategies"): the module's *parameters*, i.e. the frozen weights (one
unit per block, the rest in the root unit) and the cost parameters (root unit), and with them the optimiser states.
The pruner scores, masks, gradient workspaces and Sinkhorn potentials are plain tensors or buffers of
:class:`~permsparse.permutation.learned.LearnedPermutations` and stay whole on every rank; the root unit (costs,
embeddings, head) stays gathered from the start of a training step to the end of its backward pass, because the
costs' Sinkhorn refresh runs inside the step (:meth:`PermutationLearning.on_train_batch_start` defers it there).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from typing import Any

import torch
from pytorch_lightning.strategies import FSDPStrategy
from torch import nn

from permsparse.models.binding import get_spec

__all__ = ["PermutationFSDPStrategy", "is_fsdp", "full_params", "unshard_model"]


class PermutationFSDPStrategy(FSDPStrategy):
    """:class:`~pytorch_lightning.strategies.FSDPStrategy` that wraps every Transformer block of the frozen model
    (the binding spec's :meth:`blocks`) in its own FSDP unit unless an ``auto_wrap_policy`` is given, and that runs
    on CPU processes too.

    Lightning refuses ``strategy="fsdp"`` with ``accelerator="cpu"`` (``_check_strategy_and_fallback`` tests
    ``type(strategy) is FSDPStrategy``, which a subclass is not), and torch's FSDP refuses a CPU module unless it
    is given ``device_id=torch.device("cpu")``, which Lightning never passes (it passes ``root_device.index``,
    ``None`` on a CPU). With both, torch FSDP runs on CPU processes over gloo (tests/test_fsdp.py).
    """

    strategy_name = "permsparse_fsdp"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("use_orig_params", True)  # frozen weights and trainable costs share the root unit
        super().__init__(*args, **kwargs)

    def _setup_model(self, model: nn.Module) -> nn.Module:
        from torch.distributed.fsdp import FullyShardedDataParallel
        from torch.distributed.fsdp.wrap import lambda_auto_wrap_policy

        if "auto_wrap_policy" not in self.kwargs and not any(
                isinstance(m, FullyShardedDataParallel) for m in model.modules()):
            frozen = getattr(model, "model", model)
            blocks = {id(b) for b in get_spec(frozen).blocks(frozen)}
            self.kwargs["auto_wrap_policy"] = functools.partial(lambda_auto_wrap_policy,
                                                                lambda_fn=lambda m: id(m) in blocks)
        if self.root_device.type != "cpu":
            return super()._setup_model(model)
        wrapped = FullyShardedDataParallel(
            module=model, cpu_offload=self.cpu_offload, mixed_precision=self.mixed_precision_config,
            sharding_strategy=self.sharding_strategy, device_id=torch.device("cpu"), **self.kwargs,
        )
        return wrapped


def is_fsdp(trainer: Any) -> bool:
    return isinstance(getattr(trainer, "strategy", None), FSDPStrategy)


@contextlib.contextmanager
def full_params(trainer: Any) -> Iterator[None]:
    """Outside a forward pass FSDP leaves each rank its shard only (with ``use_orig_params`` a parameter's local
    view can be empty); inside this context every parameter is whole again (read-only). A no-op without FSDP."""
    if not is_fsdp(trainer) or trainer.strategy.model is None:
        yield
        return
    from torch.distributed.fsdp import FullyShardedDataParallel

    with FullyShardedDataParallel.summon_full_params(trainer.strategy.model, writeback=False):
        yield


def unshard_model(trainer: Any, model: nn.Module) -> nn.Module:
    """Give ``model`` (the LightningModule, or the frozen model inside it, that FSDP wrapped in place during
    ``fit`` or ``validate``) its whole parameters back as ordinary tensors and remove the FSDP units from its tree,
    so that evaluation, pruning and export after learning see the plain model on every rank, and a later ``fit``
    can wrap it afresh. A collective: every rank calls it. Returns ``model``."""
    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.distributed.fsdp._flat_param import FlatParameter

    whole: list[tuple[nn.Module, str, torch.Tensor, bool]] = []
    with full_params(trainer):
        for module in model.modules():
            for name, param in module._parameters.items():
                if param is not None and not isinstance(param, FlatParameter):
                    whole.append((module, name, param.detach().clone(), param.requires_grad))
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, FullyShardedDataParallel):
                setattr(module, name, child.module)
    for module, name, tensor, requires_grad in whole:  # the costs stay trainable, the frozen weights frozen
        module._parameters[name] = nn.Parameter(tensor, requires_grad=requires_grad)
    return model
