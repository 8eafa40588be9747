"""The permutation-learning Callback: attaches costs + Sinkhorn to every bound group and drives them.

Per step it anneals the temperature and recomputes every group's straight-through permutation and
N:M masks; per validation it evaluates the zero-temperature (Hungarian-hardened) permutations and
keeps the best ones by validation loss; at the end of fitting those best permutations are final.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import signal
import threading
import warnings
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from torch import Tensor

from permsparse.lit.strategies import full_params, is_fsdp
from permsparse.permutation.learned import LearnedPermutation
from permsparse.sparsity.base import LayerStats, Pruner
from permsparse.sparsity.calibration import all_reduce_stats, move_stats
from permsparse.sparsity.nm import NMPattern

__all__ = ["PermutationLearning", "TrainingInterrupted", "quiet_lightning"]

log = logging.getLogger(__name__)

# Lightning messages that say nothing a user of this flow can act on: the frozen model is in eval mode on
# purpose, the pytree deprecation is inside Lightning, the ResumableSampler makes mid-epoch resumption exact,
# and the logger tip is an advertisement.
_NOISE = (r".*module\(s\) in eval mode at the start of training.*", r".*isinstance\(treespec, LeafSpec\).*",
          r".*your dataloader is not resumable.*")
_LOG_NOISE = ("litlogger", "`weights_only` was not set")


class _DropNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(text in message for text in _LOG_NOISE)


@contextlib.contextmanager
def quiet_lightning() -> Iterator[None]:
    """Silence the Lightning warnings and log lines listed in ``_NOISE`` / ``_LOG_NOISE`` (and only those)."""
    # a logger's filters see only its own records, so every Lightning logger gets one
    loggers = [logging.getLogger(name) for name in list(logging.Logger.manager.loggerDict)
               if name.startswith(("pytorch_lightning", "lightning"))]
    noise = _DropNoise()
    with warnings.catch_warnings():
        for pattern in _NOISE:
            warnings.filterwarnings("ignore", message=pattern)
        for logger in loggers:
            logger.addFilter(noise)
        try:
            yield
        finally:
            for logger in loggers:
                logger.removeFilter(noise)


class TrainingInterrupted(RuntimeError):
    """Permutation training stopped on Ctrl-C after writing a checkpoint that ``resume=<run dir>`` continues."""

    def __init__(self, step: int, checkpoint: Path | None) -> None:
        where = f"checkpoint {checkpoint}" if checkpoint else "no checkpoint (checkpointing is off)"
        super().__init__(f"interrupted after step {step}; {where}")
        self.step, self.checkpoint = step, checkpoint


def _rng_states() -> dict[str, Any]:
    # Tensors and plain tuples only, so that the checkpoint loads with torch.load(weights_only=True).
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    states: dict[str, Any] = {"torch": torch.get_rng_state(),
                              "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss),
                              "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def _set_rng_states(states: Mapping[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    kind, keys, pos, has_gauss, gauss = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    random.setstate(states["python"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


class PermutationLearning(pl.Callback):
    """Learn one block-diagonal input permutation per binding group of the module's frozen model.

    Args:
        method: the learned method's settings (:class:`~permsparse.permutation.learned.LearnedPermutation`, built
            from ``conf/perm/learned.yaml``): groups, initialisation, Sinkhorn, temperature, mode, precision, seed.
        pruner: the mask generator whose scores choose the N:M mask of the permuted weight.
        pattern: N:M pattern, e.g. ``"2:4"``.
        stats: calibration statistics per linear (collected once on the dense model).
        calibrate: if ``stats`` is ``None``, a function ``(rank, world_size) -> stats`` of this rank's share
            of the calibration data; it runs in :meth:`setup`, where the process group exists, and the
            shares are summed across ranks (``trainer=ddp``: each rank calibrates ``1/world_size`` of the data).
        checkpoint_dir: where ``last.ckpt`` is written (``None``: no checkpoints, Ctrl-C just aborts).
        checkpoint_every_n_steps: write ``last.ckpt`` every this many optimiser steps (and on Ctrl-C).
        handle_sigint: while fitting, the first Ctrl-C finishes the current step, writes ``last.ckpt`` and
            raises :class:`TrainingInterrupted`; a second Ctrl-C aborts at once.

    Checkpoints are written at step boundaries that a resumed run continues from exactly: when a validation
    is due at that step, after it (so the resumed run neither repeats nor misses it). Together with the
    :class:`~permsparse.lit.data.ResumableSampler` (skipped forward on resume) and the saved RNG states, an
    interrupted-then-resumed run ends with the same permutations as an uninterrupted one.
    """

    def __init__(
        self,
        method: LearnedPermutation,
        pruner: Pruner,
        pattern: NMPattern | str = "2:4",
        stats: Mapping[str, LayerStats] | None = None,
        calibrate: Callable[[int, int], Mapping[str, LayerStats]] | None = None,
        checkpoint_dir: str | Path | None = None,
        checkpoint_every_n_steps: int | None = None,
        handle_sigint: bool = True,
    ) -> None:
        if not isinstance(method, LearnedPermutation):
            raise TypeError(f"PermutationLearning needs a LearnedPermutation (the built perm.method), got "
                            f"{type(method).__name__}")
        self.method = method
        self.pruner, self.pattern, self.stats = pruner, NMPattern.parse(pattern), stats
        self.schedule = method.schedule()
        self.best_loss = math.inf
        self.best_perms: dict[str, Tensor] | None = None
        self.final_perms: dict[str, Tensor] | None = None
        self.history: list[dict[str, float]] = []
        self._generator: torch.Generator | None = None
        self.calibrate = calibrate
        self.checkpoint_dir = None if checkpoint_dir is None else Path(checkpoint_dir)
        self.checkpoint_every = int(checkpoint_every_n_steps) if checkpoint_every_n_steps else None
        self.handle_sigint = handle_sigint
        self._stop_requested = False
        self._pending: dict[str, bool] | None = None  # a checkpoint (and stop) waiting for this step's validation
        self._previous_handler: Any = None
        self._loaded_rng: dict[str, Any] | None = None

    # -- set-up ---------------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if pl_module.permutations is not None:
            return
        if self.stats is None and self.calibrate is not None:
            self.stats = self._calibrate_sharded(trainer)
        learned = self.method.build(pl_module.model, self.pruner, self.pattern, self.stats)
        pl_module.permutations = learned.to(pl_module.device)
        learned.attach()
        self._generator = torch.Generator().manual_seed(self.method.seed)

    def _calibrate_sharded(self, trainer: pl.Trainer) -> dict[str, LayerStats]:
        """This rank's share of the calibration statistics, summed across ranks (sums and counts add up)."""
        stats = dict(self.calibrate(trainer.global_rank, trainer.world_size))
        if trainer.world_size > 1:
            # NCCL reduces CUDA tensors only
            stats = move_stats(all_reduce_stats(move_stats(stats, trainer.strategy.root_device)), "cpu")
        return stats

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.schedule.total_steps = max(int(trainer.estimated_stepping_batches), 1)
        self._stop_requested, self._pending = False, None
        if self.handle_sigint and threading.current_thread() is threading.main_thread():
            self._previous_handler = signal.signal(signal.SIGINT, self._on_sigint)

    def _on_sigint(self, signum: int, frame: Any) -> None:
        if self._stop_requested:  # second Ctrl-C: stop at once
            self._restore_sigint()
            raise KeyboardInterrupt
        self._stop_requested = True
        log.warning("Ctrl-C: finishing this step and writing a checkpoint; press Ctrl-C again to abort at once")

    def _restore_sigint(self) -> None:
        if self._previous_handler is not None:
            signal.signal(signal.SIGINT, self._previous_handler)
            self._previous_handler = None

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._restore_sigint()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._restore_sigint()

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._loaded_rng is None:
            return
        # Resuming: continue the data order where the checkpoint left it, and the random streams too.
        _set_rng_states(self._loaded_rng)
        self._loaded_rng = None
        done = trainer.fit_loop.epoch_loop.batch_progress.current.processed
        loader = trainer.train_dataloader
        sampler = getattr(loader, "sampler", None)
        batches = len(loader) if loader is not None else 0
        if 0 < done < batches:
            if hasattr(sampler, "skip"):
                sampler.skip(done * loader.batch_size)
            else:
                log.warning("resuming mid-epoch with a %s: the epoch's data order restarts from its first batch",
                            type(sampler).__name__)

    # -- checkpoints and Ctrl-C -----------------------------------------------------------------
    @property
    def checkpoint_path(self) -> Path | None:
        return None if self.checkpoint_dir is None else self.checkpoint_dir / "last.ckpt"

    def _save(self, trainer: pl.Trainer) -> None:
        if self.checkpoint_path is not None:
            # the whole state (optimiser, scheduler, this callback), written atomically by Lightning's checkpoint IO
            trainer.save_checkpoint(self.checkpoint_path, weights_only=False)

    def _checkpoint_or_stop(self, trainer: pl.Trainer, stop: bool) -> None:
        self._save(trainer)
        if stop:
            raise TrainingInterrupted(trainer.global_step, self.checkpoint_path)

    @staticmethod
    def _validation_due(trainer: pl.Trainer) -> bool:
        """Whether Lightning validates after this training step (Lightning's own decision)."""
        try:  # a private Lightning method (pytorch-lightning 2.x); without it, checkpoints may precede validation
            return bool(trainer.fit_loop.epoch_loop._should_check_val_fx(trainer.fit_loop._data_fetcher))
        except AttributeError:
            log.warning("this Lightning version hides when it validates: a checkpoint written at a validation "
                        "step will be resumed without that validation")
            return False

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        # One collective under DDP, so that every rank stops at the same step when any rank saw Ctrl-C.
        stop = bool(trainer.strategy.reduce_boolean_decision(self._stop_requested, all=False))
        due = bool(self.checkpoint_every) and trainer.global_step % self.checkpoint_every == 0
        if not (stop or due):
            return
        if self._validation_due(trainer):
            self._pending = {"stop": stop}  # save after the validation, which the checkpoint then includes
        else:
            self._checkpoint_or_stop(trainer, stop)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or self._pending is None:
            return
        pending, self._pending = self._pending, None
        self._checkpoint_or_stop(trainer, pending["stop"])

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._save(trainer)  # the finished state, so last.ckpt is the last step (resuming it trains nothing more)

    # -- training -------------------------------------------------------------------------------
    def tau(self, step: int) -> float:
        return self.schedule(step)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        tau = self.tau(trainer.global_step)
        if is_fsdp(trainer):
            # Under FSDP the costs are whole only inside the wrapped forward (the root unit gathers them there and
            # keeps them until the backward is done), so the refresh runs at the start of training_step.
            pl_module.before_step = lambda: self._refresh(pl_module, tau)
        else:
            self._refresh(pl_module, tau)

    def _refresh(self, pl_module: pl.LightningModule, tau: float) -> None:
        residual = self.method.refresh(pl_module.permutations, tau, self._generator)
        pl_module.log("perm/tau", tau)
        pl_module.log("perm/sinkhorn_residual", residual)

    # -- validation: hardened permutations, keep the best ----------------------------------------
    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        learned = pl_module.permutations
        with full_params(trainer):  # FSDP: the costs' shards gathered (no-op otherwise)
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
        pl_module.log("perm/changed_channels", float(changed), sync_dist=True)
        if math.isfinite(loss) and loss < self.best_loss:
            self.best_loss = loss
            self.best_perms = {k: v.clone() for k, v in self._val_perms.items()}
            pl_module.log("perm/best_val_loss", loss, sync_dist=True)

    @staticmethod
    def _changed_channels(perms: Mapping[str, Tensor]) -> int:
        return int(sum((p != torch.arange(p.numel())).sum() for p in perms.values()))

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._restore_sigint()
        learned = pl_module.permutations
        if self.best_perms is not None:
            self.final_perms = self.best_perms
        else:
            with full_params(trainer):
                self.final_perms = learned.hard_permutations()
        learned.set_permutations(self.final_perms)

    # -- checkpointing --------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "best_loss": self.best_loss,
            "best_perms": self.best_perms,
            "history": self.history,
            "generator": None if self._generator is None else self._generator.get_state(),
            "rng": _rng_states(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.best_loss = state_dict["best_loss"]
        self.best_perms = state_dict["best_perms"]
        self.history = state_dict["history"]
        if state_dict.get("generator") is not None:
            self._generator = torch.Generator()
            self._generator.set_state(state_dict["generator"])
        self._loaded_rng = state_dict.get("rng")  # applied in on_train_start, after Lightning's sanity check
