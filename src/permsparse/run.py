"""One flow for every method: load, calibrate, evaluate dense, choose masks (pruner x perm), evaluate
pruned, write ``results.json`` (and the permutations beside it).

``train.py`` is a thin Hydra entry point around :func:`train`; a notebook can call it with a composed
config too (``hydra.compose``).
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import logging
import os
import platform
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict
from torch import Tensor, nn

from permsparse import zeroshot
from permsparse.config import accelerator_kind, block_steps, build_method, strategy_kind, validate_config
from permsparse.errors import ConfigError
from permsparse.export import save_pruned_state
from permsparse.models.binding import get_spec
from permsparse.permutation.base import PermutationMethod
from permsparse.permutation.foldable import restrict_if_foldable
from permsparse.permutation.learned import LearnedPermutation
from permsparse.permutation.residual import shared_residual_if
from permsparse.plan import check_plan
from permsparse.prune import (
    PruneReport,
    check_model_divisible,
    prune_model,
    prune_model_sequential,
    skip_indivisible,
)
from permsparse.runs import BLOCK_CHECKPOINT, CHECKPOINT, PERMS, PRUNED, RESULTS, RunRecord, build_model
from permsparse.sparsity.calibration import collect_stats
from permsparse.sparsity.nm import NMPattern
from permsparse.utils.io import atomic_torch_save

__all__ = ["train", "train_streamed", "learn_permutations", "learn_block_permutations", "build_permutation",
           "package_versions", "skip_indivisible_if", "SKIP_INDIVISIBLE_KEY", "STREAMED_PRUNED"]

SKIP_INDIVISIBLE_KEY = "prune.skip_indivisible"
#: the pruned checkpoint folder of a streamed run (``learning.stream=true``, ``save_pruned=true``)
STREAMED_PRUNED = "pruned"

log = logging.getLogger("permsparse")

_VERSIONED = ["permsparse", "torch", "pytorch-lightning", "hydra-core", "omegaconf", "transformers", "timm",
              "datasets", "wandb", "scipy", "numpy", "lm-eval"]


def package_versions() -> dict[str, str]:
    """Versions of the packages that shape a result (recorded in every ``results.json``)."""
    out = {"python": platform.python_version()}
    for name in _VERSIONED:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


class _Timer:
    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        log.info("phase: %s", phase)
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - start


def _build_logger(cfg: DictConfig) -> Any:
    logger_cfg = cfg.get("logger")
    if not logger_cfg or "_target_" not in logger_cfg:
        return None
    if "WandbLogger" in str(logger_cfg._target_) and not os.environ.get("WANDB_API_KEY"):
        os.environ.setdefault("WANDB_MODE", "offline")
    return instantiate(logger_cfg, _convert_="all")


def _prune(cfg: DictConfig, model: nn.Module, pruner: Any, pattern: NMPattern,
           permutation: Any, stats: Mapping | None, datamodule: Any) -> PruneReport:
    if cfg.calibration.sequential:
        return prune_model_sequential(
            model, pruner, pattern, datamodule.calibration_batches(cfg.calibration.samples, cfg.calibration.batch_size),
            permutation, forward=datamodule.forward, progress=cfg.progress,
        )
    return prune_model(model, pruner, pattern, permutation, stats, progress=cfg.progress)


def learn_permutations(cfg: DictConfig, method: LearnedPermutation, model: nn.Module, datamodule: Any,
                       pruner: Any, pattern: NMPattern, stats: Mapping | None, out_dir: Path, logger: Any = None,
                       ckpt_path: Path | None = None,
                       calibrate: Callable[[int, int], Mapping] | None = None) -> tuple[dict[str, Tensor], dict, Any]:
    """Train the permutation costs with Lightning; return the best hardened permutations, a summary and the
    calibration statistics used (``calibrate(rank, world_size)``: collected inside ``fit``, sharded across ranks,
    when ``stats`` is ``None``).

    ``method`` is the built ``perm.method``; the LightningModule comes from ``model.module`` with the optimiser,
    scheduler and distillation weight of ``perm``; the Trainer from ``trainer`` with the budget of ``learning``.
    ``ckpt_path``: a checkpoint to resume from, as checked by :func:`_resume_checkpoint`.
    """
    from permsparse.lit.callbacks import PermutationLearning, quiet_lightning
    from permsparse.lit.strategies import is_fsdp, unshard_model

    module = instantiate(cfg.model.module)(
        model=model, optimizer=instantiate(cfg.perm.optimizer), scheduler=instantiate(cfg.perm.scheduler),
        alpha=cfg.perm.alpha, distill=cfg.perm.distill, task_weight=cfg.perm.task_weight,
    )
    callback = PermutationLearning(method, pruner, pattern, stats, calibrate=calibrate,
                                   checkpoint_dir=(out_dir / CHECKPOINT).parent,
                                   checkpoint_every_n_steps=cfg.learning.get("checkpoint_every_n_steps"))
    trainer_kwargs: dict[str, Any] = {
        "max_epochs": cfg.learning.max_epochs,
        "max_steps": cfg.learning.max_steps,
        "callbacks": [callback],
        "enable_checkpointing": False,  # the callback writes checkpoints/last.ckpt at resumable boundaries
        "logger": logger if logger is not None else False,
        "default_root_dir": str(out_dir),
        "enable_progress_bar": bool(cfg.progress),
    }
    if cfg.learning.val_every_n_steps:
        trainer_kwargs["val_check_interval"] = int(cfg.learning.val_every_n_steps)
        trainer_kwargs["check_val_every_n_epoch"] = None
    with quiet_lightning():
        trainer = instantiate(cfg.trainer, **trainer_kwargs)
        seq_len = cfg.learning.get("seq_len")
        train_loader = datamodule.train_dataloader(cfg.learning.train_samples, cfg.learning.batch_size, seq_len)
        val_loader = datamodule.val_dataloader(cfg.learning.val_samples, cfg.learning.batch_size, seq_len)
        if ckpt_path is None:
            # Score the starting permutation too, so the kept (best-by-validation) one is never worse than it.
            trainer.validate(module, val_loader, verbose=False)
            if is_fsdp(trainer):
                unshard_model(trainer, module)  # validate wrapped it in FSDP; fit wraps it afresh
        trainer.fit(module, train_dataloaders=train_loader, val_dataloaders=val_loader,
                    ckpt_path=str(ckpt_path) if ckpt_path else None)
        if is_fsdp(trainer):
            unshard_model(trainer, module)  # the whole, unwrapped model for evaluation, pruning and export
    perms = callback.final_perms
    module.permutations.detach_model()  # dense weights back in place; masks are applied by prune_model
    summary = {"best_val_loss": callback.best_loss, "history": callback.history,
               "steps": trainer.global_step, "changed_channels": callback._changed_channels(perms),
               "grad_dtype": str(module.permutations.grad_dtype).removeprefix("torch.")}
    return perms, summary, callback.stats


def _block_mode(cfg: DictConfig) -> bool:
    return cfg.learning.get("mode", "e2e") == "block"


def _block_device(cfg: DictConfig) -> torch.device:
    """The device ``trainer.accelerator`` names, for block-local learning's own loop."""
    accelerator, kind = cfg.trainer.get("accelerator", "cpu"), accelerator_kind(cfg)
    if kind == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"trainer.accelerator={accelerator} but no CUDA device is available; use trainer=cpu")
    if kind in ("cuda", "cpu", "mps"):
        return torch.device(kind)
    raise ConfigError(f"trainer.accelerator={accelerator} is not supported by learning.mode=block; use cpu or gpu")


@dataclass
class _BlockRun:
    """What a block-local run takes from the config, in memory or streamed: the per-block settings, the cached
    training and validation batches, the blocks a resumed run has finished, and the per-block checkpoint."""

    settings: Any
    train: list
    val: list
    done: dict[int, tuple[dict[str, Tensor], dict]]
    checkpoint: Path
    logger: Any = None

    @classmethod
    def build(cls, cfg: DictConfig, datamodule: Any, out_dir: Path, logger: Any, resume: Path | None) -> _BlockRun:
        from permsparse.block_local import BlockSettings

        settings = BlockSettings(
            steps=block_steps(cfg), optimizer=instantiate(cfg.perm.optimizer),
            scheduler=instantiate(cfg.perm.scheduler), val_every=cfg.learning.get("val_every_n_steps"),
            device=_block_device(cfg), bf16=str(cfg.trainer.get("precision", "32-true")) == "bf16-mixed",
            seed=int(cfg.seed), progress=bool(cfg.progress),
        )
        seq_len = cfg.learning.get("seq_len")
        train = list(datamodule.train_dataloader(cfg.learning.train_samples, cfg.learning.batch_size, seq_len))
        val = list(datamodule.val_dataloader(cfg.learning.val_samples, cfg.learning.batch_size, seq_len))
        done = {}
        if resume is not None:
            state = torch.load(resume, map_location="cpu", weights_only=False)
            done = {s["block"]: ({g: state["perms"][g] for g in s["groups"]}, s) for s in state["blocks"]}
        return cls(settings, train, val, done, out_dir / BLOCK_CHECKPOINT, logger)

    def on_block_end(self, perms: dict[str, Tensor], summaries: list[dict]) -> None:
        self.checkpoint.parent.mkdir(parents=True, exist_ok=True)
        atomic_torch_save({"perms": perms, "blocks": summaries}, self.checkpoint)
        if self.logger is not None:
            last = summaries[-1]
            self.logger.log_metrics({"block/final_loss": last["final_loss"],
                                     "block/best_val_loss": last["best_val_loss"]}, step=last["block"])

    def summary(self, perms: Mapping[str, Tensor], blocks: list[dict]) -> dict[str, Any]:
        """``results.json``'s ``learning`` of a block-local run (docs/method.md §4.8)."""
        return {
            "mode": "block", "steps": sum(b["steps"] for b in blocks), "steps_per_block": self.settings.steps,
            "seconds": sum(b["seconds"] for b in blocks), "blocks": blocks,
            "changed_channels": int(sum((p != torch.arange(p.numel())).sum() for p in perms.values())),
            "grad_dtype": blocks[0]["grad_dtype"] if blocks else None, "finetune": None,
        }


def learn_block_permutations(cfg: DictConfig, method: LearnedPermutation, model: nn.Module, datamodule: Any,
                             pruner: Any, pattern: NMPattern, stats: Mapping | None, out_dir: Path, logger: Any = None,
                             resume: Path | None = None) -> tuple[dict[str, Tensor], dict, Any]:
    """Block-local learning (``learning.mode=block``, :mod:`permsparse.block_local`), then, with
    ``learning.finetune_e2e``, a short end-to-end pass (:func:`learn_permutations`) that starts from the block-local
    permutations. Same return as :func:`learn_permutations`.

    ``resume``: a block checkpoint (``checkpoints/blocks.pt`` of an earlier run); its finished blocks are not
    trained again. After every block the checkpoint is written to ``out_dir``.
    """
    import dataclasses

    from permsparse.block_local import learn_block_local

    run = _BlockRun.build(cfg, datamodule, out_dir, logger, resume)
    perms, blocks = learn_block_local(model, method, pruner, pattern, stats, run.train, run.val, run.settings,
                                      forward=datamodule.forward, done=run.done, on_block_end=run.on_block_end)
    summary = run.summary(perms, blocks)
    if cfg.learning.get("finetune_e2e"):
        finetune_cfg = cfg.copy()
        with open_dict(finetune_cfg):
            finetune_cfg.learning.mode = "e2e"
            if cfg.learning.get("finetune_steps") is not None:
                finetune_cfg.learning.max_steps = int(cfg.learning.finetune_steps)
        last = None if resume is None else resume.parent.parent / CHECKPOINT
        perms, summary["finetune"], stats = learn_permutations(
            finetune_cfg, dataclasses.replace(method, init=perms), model, datamodule, pruner, pattern, stats,
            out_dir, logger, ckpt_path=last if last is not None and last.is_file() else None)
        summary["best_val_loss"] = summary["finetune"]["best_val_loss"]
        summary["history"] = summary["finetune"]["history"]
        summary["changed_channels"] = summary["finetune"]["changed_channels"]
    return perms, summary, stats


def _distributed(cfg: DictConfig) -> bool:
    """A multi-process Lightning strategy (DDP/FSDP): calibration and learning happen inside ``fit``."""
    return strategy_kind(cfg) != "single"


def _global_rank() -> int:
    """Rank of this process under torch.distributed / Lightning's DDP launcher (0 when not distributed)."""
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")))


def _check_fsdp(cfg: DictConfig) -> None:
    """``trainer=fsdp`` learns end to end from the start: no ``resume=`` (docs/planning.md)."""
    if strategy_kind(cfg) != "fsdp":
        return
    if cfg.get("resume"):  # (learning.mode=block with any multi-process strategy is refused by validate_config)
        raise ConfigError("resume= is not supported with trainer=fsdp (a sharded run's checkpoint has not been "
                          "tested to resume exactly); resume with trainer=ddp or start afresh")


def _resume_checkpoint(cfg: DictConfig) -> Path | None:
    """The checkpoint to resume from, checked readable before any model is loaded."""
    if not cfg.get("resume"):
        return None
    if _block_mode(cfg):
        path = Path(cfg.resume) / BLOCK_CHECKPOINT
        if not path.is_file():
            raise ConfigError(f"resume={cfg.resume}: no block checkpoint at {path}; did the run finish a block?")
        try:
            state = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as err:
            raise ConfigError(f"resume={cfg.resume}: block checkpoint {path} is unreadable: {err}") from None
        if not isinstance(state, dict) or not {"perms", "blocks"} <= set(state):
            raise ConfigError(f"resume={cfg.resume}: {path} is not a block checkpoint (no perms / blocks)")
        return path
    path = Path(cfg.resume) / CHECKPOINT
    if not path.is_file():
        raise ConfigError(f"resume={cfg.resume}: no checkpoint at {path}; was the run's permutation training started?")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # a truncated or overwritten file fails in many ways inside torch.load
        raise ConfigError(f"resume={cfg.resume}: checkpoint {path} is unreadable (corrupt or truncated): {err}") from None
    if not isinstance(state, dict) or "state_dict" not in state:
        raise ConfigError(f"resume={cfg.resume}: {path} is not a Lightning checkpoint (no state_dict)")
    return path


def _check_context(cfg: DictConfig, model: nn.Module) -> None:
    """Windows longer than the model's context would fail deep inside attention (or silently extrapolate)."""
    context = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if not context:
        return
    for key, value in (("dataset.datamodule.seq_len", cfg.dataset.datamodule.get("seq_len")),
                       ("learning.seq_len", cfg.learning.get("seq_len"))):
        if value and int(value) > int(context):
            raise ConfigError(f"{key}={value} is longer than the model's context of {context} positions; "
                              f"set {key} <= {context}")


def _metrics_row(prefix: str, metrics: Mapping[str, float]) -> dict[str, float]:
    return {f"{prefix}/{k}": float(v) for k, v in metrics.items()}


def _print_table(results: dict) -> None:
    metrics = results["metrics"]
    rows = [("dense", metrics["dense"])] if "dense" in metrics else []
    if "identity" in metrics:
        rows.append((f"{results['pruner']} {results['pattern']} (identity)", metrics["identity"]))
    rows.append((f"{results['pruner']} {results['pattern']} + perm={results['perm']}", metrics.get("pruned", {})))
    keys = list(rows[0][1])
    width = max(len(r[0]) for r in rows) + 2
    lines = ["", f"{'':<{width}}" + "".join(f"{k:>18}" for k in keys)]
    for name, vals in rows:
        lines.append(f"{name:<{width}}" + "".join(f"{vals.get(k, float('nan')):>18.4f}" for k in keys))
    print("\n".join(lines) + "\n", flush=True)


def build_permutation(cfg: DictConfig) -> PermutationMethod | LearnedPermutation:
    """``perm.method`` built by its ``_target_``; a heuristic is wrapped for ``perm.foldable=true`` (within-head
    attention-output permutations) and ``perm.residual=shared`` (one residual-stream permutation)."""
    method = build_method(cfg)
    if isinstance(method, LearnedPermutation):
        return method  # perm.foldable reaches it through the yaml (method.foldable: ${..foldable})
    if not isinstance(method, PermutationMethod):
        raise ConfigError(f"perm.method._target_={cfg.perm.method._target_} builds a {type(method).__name__}, "
                          "neither a PermutationMethod nor a LearnedPermutation")
    method = restrict_if_foldable(method, bool(cfg.perm.get("foldable", False)))
    return shared_residual_if(method, str(cfg.perm.get("residual", "per_layer")))


@dataclass
class _Setup:
    """What the load phase builds once and every later phase uses."""

    model: nn.Module
    datamodule: Any
    pruner: Any
    pattern: NMPattern
    linears: list[str]
    skipped: dict[str, dict[str, list[str]]]  # prune.skip_indivisible: the groups left dense, with why


def _load(cfg: DictConfig, method: Any, pattern: NMPattern, loaded: tuple[nn.Module, Any] | None = None) -> _Setup:
    """Model (``loaded``, or built from ``model``), checks, data module and pruner."""
    model, tokenizer = build_model(cfg.model) if loaded is None else loaded
    _check_context(cfg, model)
    foldable = bool(cfg.perm.get("foldable", False))
    # the learned method's blocks must hold whole M-groups (heads, where foldable): one error lists every layer
    learned = isinstance(method, LearnedPermutation)
    check = (lambda d_in, name: method.blocks_for(d_in, pattern.m, name)) if learned else None
    skipped = skip_indivisible_if(cfg, model, pattern, foldable, check)
    groups = get_spec(model).groups(model)
    check_model_divisible(model, groups, pattern, foldable=foldable, check=check)
    dm_kwargs = {"tokenizer": tokenizer} if tokenizer is not None else {}
    datamodule = instantiate(cfg.dataset.datamodule, seed=cfg.seed, **dm_kwargs)
    if hasattr(datamodule, "bind_model"):
        datamodule.bind_model(model)  # an ImageNet folder then uses the model's own eval transform
    pruner = instantiate(cfg.pruner.method)
    return _Setup(model, datamodule, pruner, pattern, [n for g in groups for n in g.linears], skipped)


def skip_indivisible_if(cfg: DictConfig, model: nn.Module, pattern: NMPattern, foldable: bool,
                        check: Callable[[int, str], object] | None) -> dict[str, dict[str, list[str]]]:
    """With ``prune.skip_indivisible=true``, leave every binding group that cannot be pruned to ``pattern`` dense
    (:func:`permsparse.prune.skip_indivisible`) and warn with the list; ``{}`` (and nothing marked) otherwise."""
    if not OmegaConf.select(cfg, SKIP_INDIVISIBLE_KEY, default=False):
        return {}
    skipped = skip_indivisible(model, pattern, foldable=foldable, check=check)
    if skipped:
        lines = "\n".join(f"  - {name}: {'; '.join(info['reasons'])}" for name, info in skipped.items())
        log.warning("%s=true: %d binding group(s) of %s stay dense and unpermuted (results.json lists them under "
                    "'skipped'):\n%s", SKIP_INDIVISIBLE_KEY, len(skipped), type(model).__name__, lines)
    return skipped


def _calibrator(cfg: DictConfig, setup: _Setup) -> Callable[..., dict]:
    def calibrate(rank: int = 0, world_size: int = 1) -> dict:
        """Statistics of this rank's share (every ``world_size``-th batch) of the calibration data."""
        batches = setup.datamodule.calibration_batches(cfg.calibration.samples, cfg.calibration.batch_size)
        return collect_stats(setup.model, setup.linears, batches[rank::world_size],
                             hessian=setup.pruner.needs_hessian, forward=setup.datamodule.forward,
                             progress=cfg.progress and rank == 0)

    return calibrate


def _zeroshot(cfg: DictConfig, setup: _Setup, timer: _Timer, phase: str, metrics: dict) -> None:
    """Add ``eval.lm_eval``'s task accuracies (``<task>/acc``, ``<task>/acc_norm``, their ``_stderr``) of the model
    as it is now to the phase's ``metrics``; nothing when no task is set (docs/protocols.md)."""
    settings = zeroshot.ZeroShotSettings.from_config(OmegaConf.select(cfg, zeroshot.KEY))
    if settings.tasks:
        with timer(f"zeroshot_{phase}"):
            metrics.update(zeroshot.evaluate(setup.model, getattr(setup.datamodule, "tokenizer", None), settings,
                                             seed=int(cfg.seed), processor=lambda: zeroshot.load_processor(cfg.model)))


def _evaluate_baselines(cfg: DictConfig, setup: _Setup, stats: Mapping | None, timer: _Timer) -> dict:
    """The dense model and the same pruner without a permutation (the identity row), each unless switched off."""
    model, datamodule = setup.model, setup.datamodule
    metrics = {}
    if cfg.eval.get("dense_baseline", True):
        with timer("eval_dense"):
            metrics["dense"] = datamodule.evaluate(model, batch_size=cfg.eval.batch_size, progress=cfg.progress)
        _zeroshot(cfg, setup, timer, "dense", metrics["dense"])
    if cfg.eval.identity_baseline and cfg.perm.name != "none":
        dense_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        with timer("prune_identity"):
            _prune(cfg, model, setup.pruner, setup.pattern, None, stats, datamodule)
        with timer("eval_identity"):
            metrics["identity"] = datamodule.evaluate(model, batch_size=cfg.eval.batch_size, progress=cfg.progress)
        _zeroshot(cfg, setup, timer, "identity", metrics["identity"])
        model.load_state_dict(dense_state)
    return metrics


def _record(cfg: DictConfig, setup: _Setup, report: PruneReport, metrics: dict, learning: dict | None,
            timer: _Timer, sharded: bool, pruned_file: str | None) -> RunRecord:
    return RunRecord(
        config=OmegaConf.to_container(cfg, resolve=True),  # type: ignore[arg-type]
        model=cfg.model.name, dataset=cfg.dataset.name, pattern=str(setup.pattern), pruner=cfg.pruner.name,
        perm=cfg.perm.name, seed=int(cfg.seed), protocol=setup.datamodule.describe(), versions=package_versions(),
        command=" ".join(sys.argv), metrics=metrics,
        efficacy={"mean": report.mean_efficacy, "per_group": {g.name: g.efficacy for g in report.groups}},
        kept_ratio={"mean": report.mean_kept_ratio, "per_group": {g.name: g.kept_ratio for g in report.groups}},
        perm_seconds={g.name: g.seconds for g in report.groups}, learning=learning, timings=timer.seconds,
        calibration={"samples": int(cfg.calibration.samples), "sharded_across_ranks": sharded},
        permutations_file=PERMS, pruned_file=pruned_file, skipped=setup.skipped,
    )


def _log_results(logger: Any, metrics: dict, report: PruneReport) -> None:
    if logger is None:
        return
    flat = {}
    for phase, vals in metrics.items():
        flat.update(_metrics_row(phase, vals))
    flat["perm/mean_efficacy"] = report.mean_efficacy
    flat["perm/mean_kept_ratio"] = report.mean_kept_ratio
    logger.log_metrics(flat)
    logger.save()
    if hasattr(logger, "experiment") and hasattr(logger.experiment, "summary"):
        logger.experiment.summary.update(flat)
        logger.experiment.finish()


def _finish(record: RunRecord, out_dir: Path, logger: Any, metrics: dict, report: PruneReport) -> dict:
    """Write ``results.json``, log the metrics, print the table; return the results."""
    record.write(out_dir)
    _log_results(logger, metrics, report)
    results = record.to_dict()
    _print_table(results)
    log.info("results written to %s", out_dir / RESULTS)
    return results


def _stream_load(cfg: DictConfig, folder: Path) -> tuple[Any, Any]:
    """``learning.stream=true``: the model of ``folder`` with its blocks on ``meta`` (:class:`StreamedModel`) and its
    tokenizer (the ``model.tokenizer`` node where there is one, else the folder's, as the Hugging Face loader)."""
    from hydra.utils import instantiate as build

    from permsparse.streaming import StreamedModel

    streamed = StreamedModel(folder, dtype=OmegaConf.select(cfg, "model.load.dtype", default="float32"))
    if cfg.model.get("tokenizer") is not None:
        tokenizer = build(cfg.model.tokenizer, _convert_="all")
    else:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(folder)
    return streamed, tokenizer


def train_streamed(cfg: DictConfig, method: LearnedPermutation, pattern: NMPattern, out_dir: Path, timer: _Timer,
                   resume: Path | None = None) -> dict:
    """:func:`train` with ``learning.stream=true``: block-local learning with one block at a time loaded from the
    model's safetensors folder (:func:`permsparse.streaming.stream_block_local`), the dense, identity and pruned
    evaluations walked in the same pass, and the run folder written as :func:`train` writes it (``results.json``,
    ``perms.pt``, ``checkpoints/blocks.pt``), except that the pruned model is the sharded checkpoint folder
    ``pruned/`` (with ``save_pruned=true``) instead of ``pruned.safetensors`` (``pruned_file`` is null)."""
    from permsparse.config import stream_folder
    from permsparse.streaming import stream_block_local

    folder = stream_folder(cfg)
    with timer("load"):
        streamed, tokenizer = _stream_load(cfg, folder)
        setup = _load(cfg, method, pattern, (streamed.model, tokenizer))
    datamodule = setup.datamodule
    if not hasattr(datamodule, "eval_sets"):
        raise ConfigError(f"learning.stream=true evaluates perplexity on a text data module's windows; "
                          f"dataset={cfg.dataset.name} ({type(datamodule).__name__}) has none")
    logger = _build_logger(cfg)
    run = _BlockRun.build(cfg, datamodule, out_dir, logger, resume)
    pruner = setup.pruner
    calibration = None
    if pruner.needs_stats or pruner.needs_hessian:
        calibration = datamodule.calibration_batches(cfg.calibration.samples, cfg.calibration.batch_size)
    phases = [*(["dense"] if cfg.eval.get("dense_baseline", True) else []), "pruned",
              *(["identity"] if cfg.eval.identity_baseline else [])]
    save = bool(cfg.get("save_pruned", True))
    with timer("stream"):
        result = stream_block_local(streamed, method, pruner, pattern, run.train, run.val, run.settings,
                                    calibration_batches=calibration, sequential=bool(cfg.calibration.sequential),
                                    eval_sets=datamodule.eval_sets(), eval_batch_size=int(cfg.eval.batch_size),
                                    phases=phases, forward=datamodule.forward, done=run.done,
                                    on_block_end=run.on_block_end, pruned_dir=out_dir / STREAMED_PRUNED if save else None)
    learning = run.summary(result.perms, result.blocks)
    learning["stream"] = {"source": str(folder), "pruned_dir": STREAMED_PRUNED if save else None,
                          "seconds": result.seconds}
    metrics = {phase: result.metrics[phase] for phase in ("dense", "identity", "pruned") if phase in result.metrics}
    report = result.reports["pruned"]
    atomic_torch_save(report.perms, out_dir / PERMS)
    return _finish(_record(cfg, setup, report, metrics, learning, timer, False, None), out_dir, logger, metrics,
                   report)


def train(cfg: DictConfig) -> dict:
    """Run one experiment end to end and return the result dictionary written to ``results.json``.

    Phases: check the config and build the permutation method; load model, data and pruner; calibrate;
    choose the permutations (learn them, or keep the heuristic to run per group while pruning); evaluate the
    dense and identity baselines; prune with the permutations and evaluate; write the run folder
    (:mod:`permsparse.runs`). Under DDP every rank runs the flow up to the permutations; rank 0 does the rest.
    """
    import pytorch_lightning as pl

    validate_config(cfg)
    method = build_permutation(cfg)
    learned = isinstance(method, LearnedPermutation)
    if learned:
        _check_fsdp(cfg)
        check_plan(cfg)  # a run that cannot fit a declared (or a GPU's) memory stops here, before any weight loads
    out_dir = Path(cfg.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    timer = _Timer()
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    pattern = NMPattern(int(cfg.sparsity.n), int(cfg.sparsity.m))
    ckpt_path = _resume_checkpoint(cfg)  # a missing or corrupt checkpoint fails before any model is loaded
    if learned and _block_mode(cfg) and cfg.learning.get("stream", False):
        return train_streamed(cfg, method, pattern, out_dir, timer, ckpt_path)
    with timer("load"):
        setup = _load(cfg, method, pattern)
    logger = _build_logger(cfg)
    calibrate = _calibrator(cfg, setup)

    pruner = setup.pruner
    # Sequential pruning calibrates block by block itself; a learned method still learns on the dense statistics.
    needs_stats = (pruner.needs_stats or pruner.needs_hessian) and (learned or not cfg.calibration.sequential)
    # Under DDP/FSDP the process group only exists inside fit: each rank calibrates its share there and the
    # statistics are summed across ranks.
    sharded = learned and needs_stats and _distributed(cfg)
    stats = None
    if needs_stats and not sharded:
        with timer("calibrate"):
            stats = calibrate()

    learn_summary = None
    permutation: Any = method
    if learned:
        with timer("learn_permutations"):
            if _block_mode(cfg):
                permutation, learn_summary, stats = learn_block_permutations(
                    cfg, method, setup.model, setup.datamodule, pruner, pattern, stats, out_dir, logger, ckpt_path)
            else:
                permutation, learn_summary, stats = learn_permutations(
                    cfg, method, setup.model, setup.datamodule, pruner, pattern, stats, out_dir, logger, ckpt_path,
                    calibrate=calibrate if sharded else None,
                )
    if _global_rank() != 0:
        # Under DDP every rank runs this flow; only rank 0 evaluates and writes the results.
        return {"perms": permutation, "rank": _global_rank()}

    metrics = _evaluate_baselines(cfg, setup, stats, timer)
    with timer("prune"):
        report = _prune(cfg, setup.model, pruner, pattern, permutation, stats, setup.datamodule)
    with timer("eval_pruned"):
        metrics["pruned"] = setup.datamodule.evaluate(setup.model, batch_size=cfg.eval.batch_size,
                                                      progress=cfg.progress)
    _zeroshot(cfg, setup, timer, "pruned", metrics["pruned"])

    atomic_torch_save(report.perms, out_dir / PERMS)
    pruned_file = None
    if cfg.get("save_pruned", True):
        save_pruned_state(setup.model, out_dir)  # so that `python -m permsparse.export <run dir>` works
        pruned_file = PRUNED
    record = _record(cfg, setup, report, metrics, learn_summary, timer, sharded, pruned_file)
    if lm_eval := zeroshot.describe(zeroshot.ZeroShotSettings.from_config(OmegaConf.select(cfg, zeroshot.KEY))):
        record.protocol["lm_eval"] = lm_eval
    return _finish(record, out_dir, logger, metrics, report)
