"""LightningModules that train only the permutation costs of a frozen model.

Loss (docs/method.md §4.5): ``CE(task) + alpha * sum_l SmoothL1(h_l_dense, h_l_sparse)`` where
``h_l`` is the output of block ``l`` and the dense teacher is the same model with masks switched off.
The :class:`~permsparse.lit.callbacks.PermutationLearning` callback attaches the learnable costs as
``self.permutations`` before the optimisers are configured.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.utilities import rank_zero_warn
from torch import Tensor, nn

from permsparse.errors import ConfigError
from permsparse.models.binding import get_spec
from permsparse.sparsity.calibration import block_hidden_state

__all__ = ["PermutationModule", "CausalLMModule", "ImageClassifierModule", "DISTILL"]

#: the distillation terms ``perm.distill`` accepts (docs/method.md §4.5)
DISTILL = ("block_smooth_l1", "final_cosine", "logits_kl")


class PermutationModule(pl.LightningModule):
    """Base: a frozen model, block-output capture for the distillation term, AdamW + cosine on the costs.

    Args:
        model: the frozen network (timm ViT or HF causal LM).
        optimizer: a partial optimiser factory (Hydra ``_partial_: true``), called with the cost parameters.
        scheduler: a partial LR-scheduler factory or ``None``; cosine over all steps by default config.
        alpha: weight of the distillation term (the paper's 1e-5); 0 disables the teacher pass.
        task_weight: weight of the task cross-entropy (1; PermLLM trains on its distillation term alone: 0).
        distill: the distillation term (``perm.distill``): ``"block_smooth_l1"`` (the paper: SmoothL1 between the
            dense and the sparse output of every block, summed), ``"final_cosine"`` (PermLLM: one minus the cosine
            similarity of the last block's outputs, averaged over tokens) or ``"logits_kl"`` (KL divergence from
            the dense model's output distribution to the sparse one's, averaged over positions).
        max_nonfinite: a non-finite loss skips its step with a warning; this many in a row abort training
            (the best permutation found so far is kept by the callback).
    """

    def __init__(self, model: nn.Module, optimizer: Callable | None = None, scheduler: Callable | None = None,
                 alpha: float = 1e-5, distill: str = "block_smooth_l1", task_weight: float = 1.0,
                 max_nonfinite: int = 5) -> None:
        super().__init__()
        if not task_weight >= 0 or not alpha >= 0 or task_weight == alpha == 0:
            raise ConfigError(f"perm.task_weight={task_weight} and perm.alpha={alpha}: both must be >= 0 and not both 0")
        self.task_weight = task_weight
        if distill not in DISTILL:
            raise ConfigError(f"perm.distill={distill!r} is invalid; choose {', '.join(DISTILL[:-1])} or {DISTILL[-1]}")
        self.distill = distill
        self.max_nonfinite = max_nonfinite
        self._nonfinite_in_a_row = 0
        self.model = model
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.alpha = alpha
        self.permutations: nn.Module | None = None  # set by the PermutationLearning callback
        # run once at the start of the next training_step (the callback's cost refresh under FSDP, where the costs
        # are whole only inside the wrapped forward)
        self.before_step: Callable[[], None] | None = None
        self._captured: list[Tensor] | None = None
        for block in get_spec(model).blocks(model):
            block.register_forward_hook(self._capture_hook)

    def _capture_hook(self, module: nn.Module, args: Any, output: Any) -> None:
        if self._captured is not None:
            self._captured.append(block_hidden_state(output))

    def forward_with_blocks(self, batch: Any) -> tuple[Any, list[Tensor]]:
        """Run the task forward and return its output and every block's output."""
        self._captured = []
        try:
            out = self.task_forward(batch)
            return out, self._captured
        finally:
            self._captured = None

    def train(self, mode: bool = True) -> PermutationModule:
        """The frozen model stays in eval mode (no dropout) while the costs train."""
        super().train(mode)
        self.model.eval()
        return self

    # -- task specifics -----------------------------------------------------------------------
    def task_forward(self, batch: Any) -> Any:
        raise NotImplementedError

    def task_loss(self, output: Any, batch: Any) -> Tensor:
        raise NotImplementedError

    # -- Lightning ----------------------------------------------------------------------------
    def _distill_and_task(self, batch: Any) -> tuple[Tensor, Tensor, Tensor]:
        if self.permutations is None:
            raise RuntimeError("no permutations attached: add the PermutationLearning callback to the Trainer")
        distill = torch.zeros((), device=self.device)
        teacher: list[Tensor] = []
        if self.alpha > 0:
            with torch.no_grad(), self.permutations.dense():
                teacher_out, teacher = self.forward_with_blocks(batch)
        output, student = self.forward_with_blocks(batch)
        task = self.task_loss(output, batch)
        if self.alpha > 0:
            distill = self._distillation(output, student, teacher_out, teacher)
        loss = self.task_weight * task + self.alpha * distill
        extra = self.permutations.regularizer()  # terms of the permutation method itself (None: none)
        if extra is not None:
            self.log("train/perm_regularizer", extra)
            loss = loss + extra
        return loss, task, distill

    def _distillation(self, output: Any, student: list[Tensor], teacher_output: Any, teacher: list[Tensor]) -> Tensor:
        if self.distill == "block_smooth_l1":
            return sum(F.smooth_l1_loss(s.float(), t.float()) for s, t in zip(student, teacher, strict=False))
        if self.distill == "final_cosine":
            s, t = student[-1].float(), teacher[-1].float()
            return (1 - F.cosine_similarity(s.reshape(-1, s.shape[-1]), t.reshape(-1, t.shape[-1]), dim=-1)).mean()
        s, t = output.float(), teacher_output.float()  # task_forward's logits
        s, t = s.reshape(-1, s.shape[-1]).log_softmax(-1), t.reshape(-1, t.shape[-1]).log_softmax(-1)
        return F.kl_div(s, t, log_target=True, reduction="batchmean")

    def training_step(self, batch: Any, batch_idx: int) -> Tensor | None:
        if self.before_step is not None:
            before, self.before_step = self.before_step, None
            before()
        loss, task, distill = self._distill_and_task(batch)
        if not torch.isfinite(loss):
            self._nonfinite_in_a_row += 1
            rank_zero_warn(f"non-finite loss ({float(loss)}) at step {self.global_step}: step skipped "
                           f"({self._nonfinite_in_a_row} in a row, abort at {self.max_nonfinite})")
            if self._nonfinite_in_a_row >= self.max_nonfinite:
                raise FloatingPointError(
                    f"{self._nonfinite_in_a_row} non-finite losses in a row; training stopped, the best "
                    "permutation so far is kept. Lower the learning rate or raise perm.method.tau_end"
                )
            return None  # Lightning skips the optimiser step
        self._nonfinite_in_a_row = 0
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/task_loss", task)
        self.log("train/distill_loss", distill)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> Tensor:
        loss = self.task_loss(self.task_forward(batch), batch)
        self.log("val/loss", loss, prog_bar=True, sync_dist=True)
        return loss

    def configure_optimizers(self) -> Any:
        if self.permutations is None:
            raise RuntimeError("no permutations attached: add the PermutationLearning callback to the Trainer")
        params = list(self.permutations.parameters())
        factory = self.optimizer_factory or (lambda params: torch.optim.AdamW(params, lr=1e-2, weight_decay=0.01))
        optimizer = factory(params=params)
        if self.scheduler_factory is None:
            return optimizer
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        scheduler = self.scheduler_factory(optimizer=optimizer, T_max=total)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def state_dict(self, *args: Any, **kwargs: Any) -> dict:
        """Only the learnable costs are checkpointed; the frozen model is rebuilt from its config."""
        full = super().state_dict(*args, **kwargs)
        return {k: v for k, v in full.items() if k.startswith("permutations.")}

    def load_state_dict(self, state_dict: dict, strict: bool = True, assign: bool = False) -> Any:
        return super().load_state_dict(state_dict, strict=False, assign=assign)


class CausalLMModule(PermutationModule):
    """Next-token cross-entropy on windows of token ids ``(B, T)`` (HF causal LM)."""

    def task_forward(self, batch: Tensor) -> Tensor:
        ids = batch[0] if isinstance(batch, (tuple, list)) else batch
        return self.model(input_ids=ids).logits

    def task_loss(self, output: Tensor, batch: Tensor) -> Tensor:
        ids = batch[0] if isinstance(batch, (tuple, list)) else batch
        logits = output[:, :-1].float()
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


class ImageClassifierModule(PermutationModule):
    """Class-label cross-entropy on ``(images, labels)`` batches (timm ViT)."""

    def task_forward(self, batch: tuple[Tensor, Tensor]) -> Tensor:
        return self.model(batch[0])

    def task_loss(self, output: Tensor, batch: tuple[Tensor, Tensor]) -> Tensor:
        return F.cross_entropy(output.float(), batch[1])

    def validation_step(self, batch: Any, batch_idx: int) -> Tensor:
        logits = self.task_forward(batch)
        loss = self.task_loss(logits, batch)
        self.log("val/loss", loss, prog_bar=True, sync_dist=True)
        self.log("val/top1", (logits.argmax(-1) == batch[1]).float().mean(), sync_dist=True)
        return loss
