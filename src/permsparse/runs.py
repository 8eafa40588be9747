"""The run folder: what one ``python train.py`` writes, and :func:`load_run`, the one way to read it back.

Format (docs/run-format.md)::

    <run dir>/
      results.json            RunRecord: config, versions, seed, protocol, metrics, efficacy, learning, timings
      perms.pt                {group name: (d_in,) long tensor}: the permutation of every binding group
      pruned.safetensors      the pruned model in original channel order (masked weights), when save_pruned
      pruned/                 instead, in a streamed run (learning.stream=true): the same as a sharded checkpoint
      checkpoints/last.ckpt   the permutation training's last checkpoint (learned methods; resume=<run dir>)
      export/                 written later by ``python -m permsparse.export <run dir>``

Scripts, notebooks and export read runs through :class:`RunRecord` and :func:`load_run`; nobody rebuilds a
model from ``config.model.load`` by hand.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from permsparse.sparsity.nm import NMPattern
from permsparse.utils.io import atomic_write_json, read_json

__all__ = ["RESULTS", "PERMS", "PRUNED", "CHECKPOINT", "BLOCK_CHECKPOINT", "FORMAT_VERSION", "RunRecord", "LoadedRun", "load_run",
           "find_runs", "architecture_only", "build_model", "export_run"]

RESULTS = "results.json"
PERMS = "perms.pt"
PRUNED = "pruned.safetensors"
CHECKPOINT = "checkpoints/last.ckpt"
#: block-local learning's checkpoint: the finished blocks' permutations and summaries (learning.mode=block)
BLOCK_CHECKPOINT = "checkpoints/blocks.pt"
#: version of the results.json layout; runs written before it had a version read as 1
FORMAT_VERSION = 1


@dataclass
class RunRecord:
    """What ``results.json`` holds (docs/run-format.md lists every field and its meaning).

    ``metrics`` maps a phase (``dense``, ``identity``: the pruner without a permutation, ``pruned``: with the
    run's permutation) to ``{metric name: value}``, e.g. ``ppl`` / ``ppl_pydoc`` or ``top1``.
    """

    config: dict[str, Any]
    model: str
    dataset: str
    pattern: str
    pruner: str
    perm: str
    seed: int
    protocol: dict[str, Any]
    versions: dict[str, str]
    command: str
    metrics: dict[str, dict[str, float]]
    efficacy: dict[str, Any]
    kept_ratio: dict[str, Any]
    perm_seconds: dict[str, float]
    learning: dict[str, Any] | None
    timings: dict[str, float]
    calibration: dict[str, Any] = field(default_factory=dict)  # absent in runs written before it was recorded
    permutations_file: str = PERMS
    pruned_file: str | None = PRUNED
    #: prune.skip_indivisible=true: {group: {"linears": [...], "reasons": [...]}} of the groups left dense
    skipped: dict[str, Any] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION
    extra: dict[str, Any] = field(default_factory=dict)  # keys this version does not know (kept when re-written)

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        return {**out, **self.extra}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = RESULTS) -> RunRecord:
        version = int(data.get("format_version", 1))
        if version > FORMAT_VERSION:
            raise ValueError(f"{where}: run format version {version} is newer than this permsparse reads "
                             f"({FORMAT_VERSION}); upgrade permsparse")
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        required = {f.name for f in dataclasses.fields(cls)
                    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
        missing = sorted(required - set(data))
        if missing:
            raise ValueError(f"{where}: not a permsparse run record (missing {', '.join(missing)})")
        known = {k: v for k, v in data.items() if k in names}
        return cls(**known, extra={k: v for k, v in data.items() if k not in names})

    def write(self, run_dir: str | Path) -> Path:
        """Write ``<run_dir>/results.json`` atomically."""
        path = Path(run_dir) / RESULTS
        atomic_write_json(path, self.to_dict())
        return path

    @classmethod
    def read(cls, run_dir: str | Path) -> RunRecord:
        """Read ``<run_dir>/results.json``; a clear error if the folder is not a run."""
        path = Path(run_dir) / RESULTS
        if not path.is_file():
            raise FileNotFoundError(f"{run_dir} has no {RESULTS}: not a permsparse run folder")
        return cls.from_dict(read_json(path), str(path))

    @property
    def nm(self) -> NMPattern:
        return NMPattern.parse(self.pattern)


def find_runs(root: str | Path) -> list[Path]:
    """Every run folder (a folder holding ``results.json``) at or below ``root``, sorted."""
    return sorted(p.parent for p in Path(root).rglob(RESULTS))


def build_model(model_cfg: Mapping[str, Any], load: Mapping[str, Any] | None = None) -> tuple[nn.Module, Any]:
    """``(model in eval mode, tokenizer or None)`` from a ``model`` config node: its ``load`` loader (or ``load``
    given here, e.g. :func:`architecture_only` of it), which may return the pair itself, and its ``tokenizer``
    node when it has one."""
    from hydra.utils import instantiate

    loaded = instantiate(model_cfg["load"] if load is None else load, _convert_="all")
    model, tokenizer = loaded if isinstance(loaded, tuple) else (loaded, None)
    if model_cfg.get("tokenizer") is not None:
        tokenizer = instantiate(model_cfg["tokenizer"], _convert_="all")
    return model.eval(), tokenizer


def _loader(node: Mapping[str, Any]) -> Any:
    from hydra.utils import get_object

    return get_object(str(node["_target_"]))


def architecture_only(node: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of a ``model.load`` node that builds the architecture without fetching hub weights
    (``pretrained=False``, no ``checkpoint_path``); loaders of offline assets are unchanged."""
    out = dict(node)
    try:
        params = inspect.signature(_loader(out)).parameters
    except (ImportError, ValueError, TypeError):
        params = {}
    if "pretrained" in params or "pretrained" in out:
        out["pretrained"] = False
    if "checkpoint_path" in out:
        out["checkpoint_path"] = None
    return out


@dataclass
class LoadedRun:
    """A run folder read back: its record and, built on first use and then kept, its model (the architecture
    with the run's pruned weights), tokenizer, permutations and datamodule (same dataset, seed and windows)."""

    dir: Path
    record: RunRecord
    weights: str = "pruned"

    @property
    def config(self) -> dict[str, Any]:
        return self.record.config

    @property
    def pattern(self) -> NMPattern:
        return self.record.nm

    @functools.cached_property
    def build_node(self) -> dict[str, Any]:
        """The loader node that rebuilds the run's architecture (also what a timm export stores to rebuild it)."""
        try:
            node = self.config["model"]["load"]
        except KeyError as err:
            raise ValueError(f"{self.dir / RESULTS}: config lacks {err}; cannot rebuild the model") from None
        return architecture_only(node)

    @functools.cached_property
    def _built(self) -> tuple[nn.Module, Any]:
        model, tokenizer = build_model(self.config["model"], self.build_node)
        if self.weights == "pruned":
            from permsparse.export import load_pruned_state

            load_pruned_state(model, self.dir, _streamed_pruned(self.record))
        if self.record.skipped:  # prune.skip_indivisible: the run left these groups dense, so does every reader
            from permsparse.models.binding import leave_dense

            leave_dense(model, {name: "; ".join(info.get("reasons", [])) for name, info in self.record.skipped.items()})
        return model, tokenizer

    @property
    def model(self) -> nn.Module:
        return self._built[0]

    @property
    def tokenizer(self) -> Any:
        return self._built[1]

    @functools.cached_property
    def perms(self) -> dict[str, Tensor]:
        path = self.dir / self.record.permutations_file
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: the run's permutations are needed; re-run it")
        return torch.load(path, map_location="cpu", weights_only=True)

    @functools.cached_property
    def datamodule(self) -> Any:
        from hydra.utils import instantiate

        kwargs = {"tokenizer": self.tokenizer} if self.tokenizer is not None else {}
        return instantiate(self.config["dataset"]["datamodule"], seed=self.record.seed, **kwargs)


def load_run(run_dir: str | Path, weights: str = "pruned") -> LoadedRun:
    """Read a run folder. ``weights="pruned"``: the model gets ``pruned.safetensors`` (a clear error if the run
    did not save it); ``"architecture"``: the architecture with the loader's own weights (offline assets) or
    random ones (hub models, ``pretrained=False``): enough for fold plans. The model is built on first use."""
    if weights not in ("pruned", "architecture"):
        raise ValueError(f"weights={weights!r}: choose 'pruned' or 'architecture'")
    run_dir = Path(run_dir)
    if not (run_dir / RESULTS).is_file():
        raise FileNotFoundError(f"{run_dir} has no {RESULTS}: not a permsparse run folder")
    record = RunRecord.read(run_dir)
    folder = _streamed_pruned(record)
    if weights == "pruned" and folder is not None:
        if not (run_dir / folder).is_dir():
            raise FileNotFoundError(f"{run_dir / folder} is missing: the streamed run's pruned checkpoint folder "
                                    "is needed; re-run it to export")
    elif weights == "pruned" and not (run_dir / PRUNED).is_file():
        raise FileNotFoundError(f"{run_dir / PRUNED} is missing: the run was made with save_pruned=false or "
                                "before export support; re-run it to export")
    return LoadedRun(run_dir, record, weights)


def _streamed_pruned(record: RunRecord) -> str | None:
    """A streamed run's pruned checkpoint folder (``learning.stream.pruned_dir``, relative to the run folder), or
    ``None`` for a run that wrote ``pruned.safetensors`` (or nothing)."""
    if record.pruned_file is not None:
        return None
    return ((record.learning or {}).get("stream") or {}).get("pruned_dir")


def export_run(run_dir: str | Path, out_dir: str | Path | None = None, require_foldable: bool = False,
               **kwargs: Any) -> Path:
    """Export a run folder (``python -m permsparse.export <run dir>``) to ``out_dir`` (default ``<run_dir>/export``).

    :func:`load_run` rebuilds the pruned model; :func:`permsparse.export.export_model` folds, saves and verifies it
    (``kwargs`` go there).
    """
    from permsparse.export import export_model

    run = load_run(run_dir)
    perms = run.perms  # before the model: a missing perms.pt fails without loading anything
    record = run.record
    cfg = record.config
    extra = {"source_run": {"run_dir": str(run.dir.resolve()), "model": record.model, "dataset": record.dataset,
                            "perm": record.perm, "seed": record.seed,
                            "pruner_config": (cfg.get("pruner") or {}).get("method")}}
    result = export_model(run.model, perms, run.pattern, Path(out_dir) if out_dir else run.dir / "export",
                          build=run.build_node, pruner=record.pruner, tokenizer=run.tokenizer,
                          require_foldable=require_foldable, inplace=True,
                          extra={**extra, **kwargs.pop("extra", {})}, **kwargs)
    return result.path
