"""The permutation-learning Callback: attaches costs + Sinkhorn to every bound group and drives them.

Per step it anneals the temperature and recomputes every group's straight-through permutation and
N:M masks; per validation it evaluates the zero-temperature (Hungarian-hardened) permutations and
keeps the best ones by validation loss; at the end of fitting those best permutations are final.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import Any

import pytorch_lightning as pl
import torch
from torch import Tensor

from permsparse.permutation.learned import LearnedPermutations
from permsparse.permutation.schedule import TemperatureSchedule
from permsparse.sparsity.base import LayerStats, Pruner
from permsparse.sparsity.nm import NMPattern

__all__ = ["PermutationLearning"]

log = logging.getLogger(__name__)


class PermutationLearning(pl.Callback):
    """Learn one block-diagonal input permutation per binding group of the module's frozen model.

    Args:
        pruner: the mask generator whose scores choose the N:M mask of the permuted weight.
        pattern: N:M pattern, e.g. ``"2:4"``.
        stats: calibration statistics per linear (collected once on the dense model).
        groups: channel groups per layer (G, the paper's default 4).
        tau_start, tau_end, tau_schedule: temperature annealing (exponential 1.0 -> 0.05 by default).
        sinkhorn_iters: Sinkhorn iterations per step (the first step when warm-starting).
        warm_iters: if set, warm-start Sinkhorn from the previous step's potentials with this many iterations.
        mode: ``"hard"`` (Hungarian + straight-through, default) or ``"soft"`` (the Sinkhorn matrix).
        gumbel_scale: scale of Gumbel noise on the cost during training (0 = none).
        init, init_scale, noise, normalize: see :class:`~permsparse.permutation.cost.LearnableCost`.
        seed: seed of the cost initialisation and the Gumbel noise.
        foldable: restrict the attention-output groups (o_proj / attn.proj) to within-head permutations tied
            across the query heads of each kv head, so that export always folds them (``perm.foldable``; see
            :class:`~permsparse.permutation.learned.LearnedPermutations`).
    """

    def __init__(
        self,
        pruner: Pruner,
        pattern: NMPattern | str = "2:4",
        stats: Mapping[str, LayerStats] | None = None,
        groups: int = 4,
        tau_start: float = 1.0,
        tau_end: float = 0.05,
        tau_schedule: str = "exponential",
        sinkhorn_iters: int = 20,
        warm_iters: int | None = None,
        mode: str = "hard",
        gumbel_scale: float = 0.0,
        init: str | Mapping[str, Tensor] = "identity",
        init_scale: float = 1.0,
        noise: float = 0.01,
        normalize: bool = True,
        seed: int = 0,
        foldable: bool = False,
    ) -> None:
        if mode not in {"hard", "soft"}:
            raise ValueError(f"perm.mode must be 'hard' or 'soft', got {mode!r}")
        self.pruner, self.pattern, self.stats = pruner, NMPattern.parse(pattern), stats
        self.groups, self.sinkhorn_iters, self.mode, self.gumbel_scale = groups, sinkhorn_iters, mode, gumbel_scale
        self.warm_iters = warm_iters
        self.init, self.init_scale, self.noise, self.normalize, self.seed = init, init_scale, noise, normalize, seed
        self.foldable = foldable
        self.schedule = TemperatureSchedule(tau_start, tau_end, 1, tau_schedule)
        self.best_loss = math.inf
        self.best_perms: dict[str, Tensor] | None = None
        self.final_perms: dict[str, Tensor] | None = None
        self.history: list[dict[str, float]] = []
        self._generator: torch.Generator | None = None

    # -- set-up ---------------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if pl_module.permutations is not None:
            return
        learned = LearnedPermutations(
            pl_module.model, self.pruner, self.pattern, self.stats, self.groups, init=self.init,
            init_scale=self.init_scale, noise=self.noise, normalize=self.normalize, seed=self.seed,
            foldable=self.foldable,
        )
        pl_module.permutations = learned.to(pl_module.device)
        learned.attach()
        self._generator = torch.Generator().manual_seed(self.seed)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.schedule.total_steps = max(int(trainer.estimated_stepping_batches), 1)

    # -- training -------------------------------------------------------------------------------
    def tau(self, step: int) -> float:
        return self.schedule(step)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        tau = self.tau(trainer.global_step)
        residual = pl_module.permutations.refresh(tau, hard=self.mode == "hard", n_iters=self.sinkhorn_iters,
                                                  gumbel_scale=self.gumbel_scale, generator=self._generator,
                                                  warm_iters=self.warm_iters)
        pl_module.log("perm/tau", tau)
        pl_module.log("perm/sinkhorn_residual", residual)

    # -- validation: hardened permutations, keep the best ----------------------------------------
    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        learned = pl_module.permutations
        self._val_perms = learned.hard_permutations()
        learned.set_permutations(self._val_perms)

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        metric = trainer.callback_metrics.get("val/loss")
        if metric is None:
            return
        loss = float(metric)
        changed = self._changed_channels(self._val_perms)
        self.history.append({"step": trainer.global_step, "val_loss": loss, "changed_channels": changed})
        pl_module.log("perm/changed_channels", float(changed))
        if math.isfinite(loss) and loss < self.best_loss:
            self.best_loss = loss
            self.best_perms = {k: v.clone() for k, v in self._val_perms.items()}
            pl_module.log("perm/best_val_loss", loss)

    @staticmethod
    def _changed_channels(perms: Mapping[str, Tensor]) -> int:
        return int(sum((p != torch.arange(p.numel())).sum() for p in perms.values()))

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        learned = pl_module.permutations
        self.final_perms = self.best_perms if self.best_perms is not None else learned.hard_permutations()
        learned.set_permutations(self.final_perms)

    # -- checkpointing --------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "best_loss": self.best_loss,
            "best_perms": self.best_perms,
            "history": self.history,
            "generator": None if self._generator is None else self._generator.get_state(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.best_loss = state_dict["best_loss"]
        self.best_perms = state_dict["best_perms"]
        self.history = state_dict["history"]
        if state_dict.get("generator") is not None:
            self._generator = torch.Generator()
            self._generator.set_state(state_dict["generator"])
