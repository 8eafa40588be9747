"""Zero-shot and few-shot accuracy through lm-evaluation-harness, on the model object a run holds in memory.

The run's model (dense, identity-pruned or pruned with the permutations) is wrapped in lm-eval's ``HFLM``
with its tokenizer, and each task of ``eval.lm_eval.tasks`` is evaluated with its ``num_fewshot`` (0 unless
listed). Every task reports ``acc`` and, where the task defines it, ``acc_norm`` (the log-likelihood of each
choice divided by its length in characters), each with its standard error.

Task data is read from local files (docs/protocols.md, "Zero-shot evaluation"): a task whose dataset is the
hub's ``<path>`` (config ``<name>``) reads ``<data_dir>/<path>/<name>/<split>.jsonl`` (or ``.json``,
``.parquet``, ``.csv``; sharded ``<split>-00000-of-00002.parquet`` too), the files that ``datasets`` writes
with ``dataset[split].to_json(...)``. Task YAMLs anywhere under ``data_dir`` are registered as well, so a
folder can also bring its own tasks. A dataset that is neither there nor a local file is a
:class:`ConfigError` naming it, raised by :func:`check_tasks` before any model loads, unless
``eval.lm_eval.hub=true`` lets ``datasets`` fetch it (or reuse its cache).

lm-eval is an optional dependency (``pip install -e ".[zeroshot]"``); this module imports it only when a
task is set.
"""

from __future__ import annotations

import contextlib
import copy
import difflib
import functools
import importlib.metadata
import logging
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from permsparse.errors import ConfigError

__all__ = ["KEY", "METRICS", "PAPER_TASKS", "ZeroShotSettings", "DatasetSource", "harness_version", "check_tasks",
           "needs_images", "processor_source", "load_processor", "evaluate", "describe", "local_dataset_files", "export_task_data"]

log = logging.getLogger("permsparse")

#: the config node this module reads
KEY = "eval.lm_eval"
#: the metrics recorded per task (each with its ``_stderr``), as ``<task>/<metric>`` in ``metrics.<phase>``
METRICS = ("acc", "acc_norm")
#: the paper's tasks (Table 2) and their shots, as in conf/eval/lm_eval/paper.yaml
PAPER_TASKS = {"arc_easy": 0, "arc_challenge": 0, "boolq": 0, "hellaswag": 0, "openbookqa": 0, "winogrande": 0,
               "mmlu": 5}
#: file suffix -> the ``datasets`` builder that reads it
_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
#: dataset paths that name a local builder (their files are in ``dataset_kwargs.data_files``)
_LOCAL_BUILDERS = {"json", "csv", "parquet", "text", "arrow"}
_SHARD = re.compile(r"^(?P<split>.+?)(-\d+-of-\d+)?$")
_INSTALL = 'pip install -e ".[zeroshot]" (or bash scripts/install.sh --dev)'


@dataclass(frozen=True)
class ZeroShotSettings:
    """``eval.lm_eval`` as plain values (conf/train.yaml documents each key)."""

    tasks: tuple[str, ...] = ()
    num_fewshot: dict[str, int] = field(default_factory=dict)
    data_dir: Path | None = None
    hub: bool = False
    limit: int | float | None = None
    batch_size: int = 4
    apply_chat_template: bool = False

    @classmethod
    def from_config(cls, node: Mapping[str, Any] | None) -> ZeroShotSettings:
        """Read and check the node's shape (a missing node means no zero-shot evaluation)."""
        if node is None:
            return cls()
        tasks = node.get("tasks") or []
        if isinstance(tasks, str) or not all(isinstance(t, str) and t for t in tasks):
            raise ConfigError(f"{KEY}.tasks={tasks!r} is invalid: it must be a list of lm-eval task names, "
                              "e.g. eval.lm_eval.tasks=[arc_easy,boolq]")
        if len(set(tasks)) != len(tasks):
            raise ConfigError(f"{KEY}.tasks={list(tasks)} names a task twice")
        shots = dict(node.get("num_fewshot") or {})
        for name, value in shots.items():
            if name not in tasks:
                raise ConfigError(f"{KEY}.num_fewshot.{name} is set but {name} is not in {KEY}.tasks={list(tasks)}")
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"{KEY}.num_fewshot.{name}={value!r} is invalid: it must be an integer >= 0")
        limit = node.get("limit")
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, (int, float)) or limit <= 0):
            raise ConfigError(f"{KEY}.limit={limit!r} is invalid: null (every example), an integer >= 1 or a "
                              "fraction in (0, 1)")
        batch_size = node.get("batch_size", 4)
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError(f"{KEY}.batch_size={batch_size!r} is invalid: it must be an integer >= 1")
        hub = node.get("hub", False)
        if not isinstance(hub, bool):
            raise ConfigError(f"{KEY}.hub={hub!r} is invalid: it must be true or false")
        chat = node.get("apply_chat_template", False)
        if not isinstance(chat, bool):
            raise ConfigError(f"{KEY}.apply_chat_template={chat!r} is invalid: it must be true or false")
        data_dir = node.get("data_dir")
        return cls(tuple(tasks), {str(k): int(v) for k, v in shots.items()},
                   Path(str(data_dir)).expanduser() if data_dir else None, hub, limit, batch_size, chat)

    def fewshot(self, task: str) -> int:
        """The number of in-context examples of ``task`` (0: zero-shot, the default)."""
        return self.num_fewshot.get(task, 0)


@dataclass(frozen=True)
class DatasetSource:
    """Where one leaf task's dataset comes from: ``local`` (a folder under ``data_dir``), ``files`` (the task's
    own local files), ``hub`` (``datasets``, with ``eval.lm_eval.hub=true``) or ``unchecked`` (a Python task
    that loads its data itself)."""

    task: str
    path: str | None
    name: str | None
    kind: str
    where: str = ""
    images: bool = False  # the task shows images (its config has doc_to_image): it needs a vision-language model


def harness_version() -> str:
    """The installed lm-eval version, or ``"not installed"``."""
    try:
        return importlib.metadata.version("lm-eval")
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _require_harness() -> None:
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise ConfigError(f"{KEY}.tasks is set but lm-evaluation-harness is not installed: {_INSTALL}") from None


@functools.lru_cache(maxsize=4)
def _task_manager(include: str | None) -> Any:
    """lm-eval's task index (its own tasks, plus the YAMLs under ``include``); built once per folder (seconds)."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=include)


def _manager(settings: ZeroShotSettings) -> Any:
    return _task_manager(str(settings.data_dir) if settings.data_dir else None)


def local_dataset_files(data_dir: Path | None, path: str | None, name: str | None) -> tuple[str, dict[str, list[str]]] | None:
    """``(builder, {split: files})`` of the hub dataset ``path`` (config ``name``) under ``data_dir``, or ``None``
    when that folder holds no data file. One folder holds one format."""
    if data_dir is None or not path:
        return None
    folder = data_dir / path / name if name else data_dir / path
    if not folder.is_dir():
        return None
    files: dict[str, list[str]] = {}
    builders = set()
    for file in sorted(folder.iterdir()):
        builder = _BUILDERS.get(file.suffix)
        if builder is None or not file.is_file():
            continue
        builders.add(builder)
        match = _SHARD.match(file.stem)
        files.setdefault(match.group("split") if match else file.stem, []).append(str(file))
    if not files:
        return None
    if len(builders) > 1:
        raise ConfigError(f"{KEY}.data_dir: {folder} mixes {sorted(builders)} files; keep one format per dataset")
    return builders.pop(), files


def _leaves(manager: Any, name: str, overrides: Mapping[str, Any], seen: set[str]) -> Iterator[tuple[str, dict]]:
    """Every leaf task of a task, group or tag name, with its (include-resolved) config and the dataset keys a
    parent group overrides."""
    entry = manager.task_index.get(name)
    if entry is None:
        raise KeyError(name)
    if name in seen:  # a group that (indirectly) lists itself
        return
    seen = seen | {name}
    kind = entry.kind.name
    cfg = dict(entry.cfg or {})
    if kind == "TAG":
        for task in sorted(entry.tags):
            yield from _leaves(manager, task, overrides, seen)
    elif kind == "GROUP":
        members = cfg.get("task") or []
        inherited = {**{k: v for k, v in cfg.items() if k.startswith("dataset_")}, **overrides}
        for member in members if isinstance(members, list) else [members]:
            yield from _member(manager, name, member, inherited, seen)
    else:
        yield name, {**cfg, **overrides}


def _member(manager: Any, group: str, member: Any, overrides: Mapping[str, Any], seen: set[str]) -> Iterator[tuple[str, dict]]:
    if isinstance(member, str):
        yield from _leaves(manager, member, overrides, seen)
        return
    if not isinstance(member, Mapping):
        return
    own = {**overrides, **{k: v for k, v in member.items() if k.startswith("dataset_")}}
    ref = member.get("group") or member.get("task")
    if isinstance(ref, str) and ref in manager.task_index:
        yield from _leaves(manager, ref, own, seen)
    elif "group" in member:  # an inline group
        for sub in member.get("task") or []:
            yield from _member(manager, group, sub, own, seen)
    else:  # an inline task
        yield f"{group}::{ref}", {**member, **own}


def _needed_splits(cfg: Mapping[str, Any]) -> list[str]:
    """The splits lm-eval reads when it builds a task: the one it scores (test, else validation) and the one its
    few-shot examples come from (fewshot, else train, validation, test), which it reads even when zero-shot."""
    def first(*keys: str) -> str | None:
        return next((str(cfg[k]) for k in keys if cfg.get(k) is not None), None)

    splits = [first("test_split", "validation_split"),
              first("fewshot_split", "training_split", "validation_split", "test_split")]
    return list(dict.fromkeys(s for s in splits if s))


def _source(task: str, cfg: Mapping[str, Any], data_dir: Path | None, hub: bool) -> DatasetSource:
    source = _where(task, cfg, data_dir, hub)
    return replace(source, images=True) if cfg.get("doc_to_image") is not None else source


def _where(task: str, cfg: Mapping[str, Any], data_dir: Path | None, hub: bool) -> DatasetSource:
    path, name = cfg.get("dataset_path"), cfg.get("dataset_name")
    if path is None or "class" in cfg or cfg.get("custom_dataset"):
        return DatasetSource(task, path, name, "unchecked")
    path, name = str(path), (str(name) if name is not None else None)
    found = local_dataset_files(data_dir, path, name)
    if found is not None:
        folder = Path(next(iter(found[1].values()))[0]).parent
        absent = [split for split in _needed_splits(cfg) if split not in found[1]]
        if absent:
            raise ConfigError(f"{KEY}.tasks: task {task} reads the split(s) {', '.join(absent)} of {path}"
                              f"{f' (config {name})' if name else ''}, but {folder} holds only "
                              f"{', '.join(sorted(found[1]))}; add {absent[0]}.jsonl there")
        return DatasetSource(task, path, name, "local", str(folder))
    if path in _LOCAL_BUILDERS or Path(path).expanduser().exists():
        files = (cfg.get("dataset_kwargs") or {}).get("data_files")
        listed = ([files] if isinstance(files, str) else list(files.values()) if isinstance(files, Mapping)
                  else list(files or []))
        flat = [str(f) for item in listed for f in ([item] if isinstance(item, str) else item)]
        missing = [f for f in flat if not any(ch in f for ch in "*?[") and not Path(f).expanduser().exists()]
        if missing:
            raise ConfigError(f"{KEY}.tasks: task {task} reads {missing[0]}, which does not exist")
        return DatasetSource(task, path, name, "files", ", ".join(flat) or path)
    if hub:
        return DatasetSource(task, path, name, "hub", path + (f" ({name})" if name else ""))
    return DatasetSource(task, path, name, "missing")


def check_tasks(settings: ZeroShotSettings) -> dict[str, list[DatasetSource]]:
    """Each task's leaf datasets and where they come from; a :class:`ConfigError` for an unknown task, a missing
    ``data_dir`` or a dataset with no local data. Loads no data and no model (it reads lm-eval's task index)."""
    if not settings.tasks:
        return {}
    _require_harness()
    if settings.data_dir is not None and not settings.data_dir.is_dir():
        raise ConfigError(f"{KEY}.data_dir={settings.data_dir} is not a folder")
    return _check_tasks(settings.tasks, settings.data_dir, settings.hub)


@functools.lru_cache(maxsize=8)
def _check_tasks(tasks: tuple[str, ...], data_dir: Path | None, hub: bool) -> dict[str, list[DatasetSource]]:
    manager = _task_manager(str(data_dir) if data_dir else None)
    out: dict[str, list[DatasetSource]] = {}
    for task in tasks:
        try:
            leaves = list(_leaves(manager, task, {}, set()))
        except KeyError as err:
            close = difflib.get_close_matches(task, manager.all_tasks, n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            where = f" nor a task YAML under {KEY}.data_dir={data_dir}" if data_dir else ""
            raise ConfigError(f"{KEY}.tasks: {err.args[0]!r} is not an lm-eval task, group or tag{where}{hint}") from None
        sources = [_source(name, cfg, data_dir, hub) for name, cfg in leaves]
        missing = [s for s in sources if s.kind == "missing"]
        if missing:
            raise ConfigError(_missing_message(task, missing, len(sources), data_dir))
        out[task] = sources
    return out


def _missing_message(task: str, missing: list[DatasetSource], leaves: int, data_dir: Path | None) -> str:
    first = missing[0]
    dataset = first.path + (f" (config {first.name})" if first.name else "")
    folder = f"{first.path}/{first.name}" if first.name else first.path
    what = f"task {task}"
    if leaves > 1:
        more = f" (and {len(missing) - 1} more of its {leaves} tasks)" if len(missing) > 1 else ""
        what = f"task {first.task} of {task}{more}"
    where = (f"{data_dir}/{folder}/ has no <split>.jsonl" if data_dir
             else f"{KEY}.data_dir is not set (expected <data_dir>/{folder}/<split>.jsonl)")
    return (f"{KEY}.tasks: {what} needs the dataset {dataset}, and {where}; export its splits there where the hub "
            f"is reachable (docs/protocols.md, zero-shot evaluation), or set {KEY}.hub=true to let `datasets` "
            "fetch it or read its cache")


@contextlib.contextmanager
def _local_datasets(data_dir: Path | None) -> Iterator[None]:
    """Within the block, ``datasets.load_dataset(path, name)`` of a dataset held under ``data_dir`` reads the
    local files instead (lm-eval loads every task's data through that call)."""
    import datasets

    if data_dir is None:
        yield
        return
    original = datasets.load_dataset

    def load_dataset(path: str, name: str | None = None, *args: Any, **kwargs: Any) -> Any:
        found = local_dataset_files(data_dir, path, name)
        if found is None:
            return original(path, name, *args, **kwargs)
        builder, files = found
        log.debug("lm-eval: %s (%s) from %s", path, name, files)
        return original(builder, data_files=files)

    datasets.load_dataset = load_dataset
    try:
        yield
    finally:
        datasets.load_dataset = original


def _hf_tokenizer(tokenizer: Any) -> Any:
    """A ``transformers`` tokenizer for HFLM: a copy of the run's (HFLM may add a pad token to it), or what its
    ``to_hf()`` gives (the tiny models' character tokenizer)."""
    from transformers import PreTrainedTokenizerBase

    if isinstance(tokenizer, PreTrainedTokenizerBase):
        return copy.deepcopy(tokenizer)
    if hasattr(tokenizer, "to_hf"):
        return tokenizer.to_hf()
    raise ConfigError(f"{KEY}: the model's tokenizer is a {type(tokenizer).__name__}; lm-eval needs a transformers "
                      "tokenizer (or one with to_hf())")


def _task_metrics(task: str, row: Mapping[str, Any] | None) -> dict[str, float]:
    out = {}
    for metric in METRICS:
        for key in (metric, f"{metric}_stderr"):
            value = (row or {}).get(f"{key},none")
            if isinstance(value, (int, float)):
                out[f"{task}/{key}"] = float(value)
    if not any(f"{task}/{m}" in out for m in METRICS):
        log.warning("lm-eval task %s reported neither acc nor acc_norm (got %s); nothing recorded for it",
                    task, sorted(row or {}))
    return out


def needs_images(settings: ZeroShotSettings) -> list[str]:
    """The tasks of ``settings`` that show images (multimodal, e.g. ``mmmu_val``): they run through lm-eval's
    ``hf-multimodal`` model on a vision-language model and its processor."""
    return [task for task, sources in check_tasks(settings).items() if any(s.images for s in sources)]


def processor_source(model_cfg: Mapping[str, Any]) -> Any:
    """Where a model config's multimodal processor comes from: its ``processor`` node (the tiny test model's), else
    its ``name_or_path`` (for ``AutoProcessor``); ``None`` when it names neither."""
    if model_cfg.get("processor") is not None:
        return model_cfg["processor"]
    return model_cfg.get("name_or_path") or (model_cfg.get("load") or {}).get("name_or_path") or None


def load_processor(model_cfg: Mapping[str, Any]) -> Any:
    """The multimodal processor (image processor + tokenizer) of a vision-language model config: its ``processor``
    node instantiated (the tiny test model's), else ``AutoProcessor`` of its ``name_or_path``."""
    source = processor_source(model_cfg)
    if isinstance(source, Mapping):
        from hydra.utils import instantiate

        return instantiate(source, _convert_="all")
    if not source:
        raise ConfigError(f"{KEY}: a task shows images, but model={model_cfg.get('name')} names neither a processor "
                          "nor a name_or_path to load one from; image tasks need a vision-language model")
    from transformers import AutoProcessor

    try:
        processor = AutoProcessor.from_pretrained(str(source))
    except OSError as e:
        raise ConfigError(f"{KEY}: could not load the processor of {source!r} ({str(e).strip().splitlines()[0]}); "
                          "image tasks need the model's processor files") from None
    if getattr(processor, "image_processor", None) is None:
        raise ConfigError(f"{KEY}: a task shows images, but {source!r} has no image processor (it is not a "
                          "vision-language model); e.g. model=qwen2_5_vl_3b")
    return processor


@functools.cache
def _vision_lm_class() -> type:
    """lm-eval's ``HFMultimodalLM`` for a model object and a processor object already in memory.

    lm-eval 0.4 loads the processor by name only (given an object it keeps none), so it is set here. For a model
    whose config names the tokens that open and close an image (Qwen2-VL, Qwen2.5-VL), each ``<image>`` of a
    prompt becomes ``start, image token, end``, the form the model was trained on, also without a chat template.
    """
    from lm_eval.models.hf_vlms import HFMultimodalLM

    class InMemoryVisionLM(HFMultimodalLM):
        def __init__(self, pretrained: Any, processor: Any, batch_size: int) -> None:
            self._given = processor
            config = pretrained.config
            ids = [getattr(config, k, None) for k in ("vision_start_token_id", "image_token_id", "vision_end_token_id")]
            image_string = processor.tokenizer.decode(ids) if None not in ids else None
            super().__init__(pretrained, tokenizer=processor, batch_size=batch_size, image_string=image_string)

        def _create_tokenizer(self, pretrained: Any, tokenizer: Any, *args: Any, **kwargs: Any) -> None:
            self.processor = self._given
            self.tokenizer = self._given.tokenizer

    return InMemoryVisionLM


def evaluate(model: Any, tokenizer: Any, settings: ZeroShotSettings, seed: int = 0,
             processor: Callable[[], Any] | None = None) -> dict[str, float]:
    """``{"<task>/acc": ..., "<task>/acc_stderr": ..., "<task>/acc_norm": ..., ...}`` of the model as it is now.

    ``seed`` seeds the choice of few-shot examples (the same for every phase of a run). The global random
    generators are left alone, so a run with zero-shot evaluation prunes exactly as one without. ``processor``:
    a function that returns the model's multimodal processor, called only when a task shows images (such tasks
    run through :func:`_vision_lm_class`, text tasks through ``HFLM``).
    """
    if not settings.tasks:
        return {}
    check_tasks(settings)
    from lm_eval.evaluator import evaluate as lm_evaluate
    from lm_eval.models.huggingface import HFLM

    lms: dict[bool, Any] = {}

    def lm_for(images: bool) -> Any:
        if images not in lms:
            if not images:
                lms[images] = HFLM(pretrained=model, tokenizer=_hf_tokenizer(tokenizer),
                                   batch_size=settings.batch_size)
            elif processor is None:
                raise ConfigError(f"{KEY}: a task shows images, and this model has no multimodal processor")
            else:
                lms[images] = _vision_lm_class()(model, processor(), settings.batch_size)
        return lms[images]

    manager = _manager(settings)
    out: dict[str, float] = {}
    with _local_datasets(settings.data_dir):
        for task in settings.tasks:
            loaded = manager.load([task])
            leaves = list(loaded["tasks"].values())
            for leaf in leaves:
                leaf.set_config(key="num_fewshot", value=settings.fewshot(task))
                leaf.set_fewshot_seed(seed=seed)
            images = any(getattr(leaf, "MULTIMODAL", False) for leaf in leaves)
            results = lm_evaluate(lm=lm_for(images), task_dict=loaded, limit=settings.limit, log_samples=False,
                                  apply_chat_template=settings.apply_chat_template)
            out.update(_task_metrics(task, (results or {}).get("results", {}).get(task)))
    return out


def describe(settings: ZeroShotSettings) -> dict[str, Any]:
    """What ``results.json`` records of the zero-shot protocol (its ``protocol.lm_eval``): the harness version,
    and per task its shots and where each of its datasets came from."""
    if not settings.tasks:
        return {}
    sources = check_tasks(settings)
    tasks = {}
    for task in settings.tasks:
        data = sorted({f"{s.kind}: {s.where}" if s.where else s.kind for s in sources[task]})
        tasks[task] = {"num_fewshot": settings.fewshot(task), "subtasks": len(sources[task]), "data": data,
                       "images": any(s.images for s in sources[task])}
    return {"harness": f"lm-eval {harness_version()}", "limit": settings.limit, "batch_size": settings.batch_size,
            "data_dir": str(settings.data_dir) if settings.data_dir else None, "hub": settings.hub,
            "apply_chat_template": settings.apply_chat_template, "tasks": tasks}


def _has_images(features: Any) -> bool:
    """Whether a ``datasets`` feature (or a dict / list of them) holds an ``Image``."""
    import datasets

    if isinstance(features, datasets.Image):
        return True
    if isinstance(features, Mapping):
        return any(_has_images(f) for f in features.values())
    if isinstance(features, (list, tuple)):
        return any(_has_images(f) for f in features)
    inner = getattr(features, "feature", None)  # datasets.Sequence / List
    return inner is not None and _has_images(inner)


def export_task_data(tasks: list[str] | tuple[str, ...], data_dir: str | Path, include: str | Path | None = None) -> list[Path]:
    """Write every hub dataset that ``tasks`` read as ``<data_dir>/<path>/<name>/<split>.jsonl`` (``.parquet`` for
    a dataset with images, e.g. MMMU), the layout ``eval.lm_eval.data_dir`` reads; run it once where the hub is reachable (``scripts/lm_eval_data.py``).
    ``include``: a folder of extra task YAMLs. Folders that already hold data are kept; returns those written."""
    _require_harness()
    import datasets

    root = Path(data_dir).expanduser()
    written = []
    for sources in _check_tasks(tuple(tasks), Path(include) if include else None, True).values():
        for source in sources:
            if source.kind != "hub" or not source.path:
                continue
            folder = root / source.path / source.name if source.name else root / source.path
            if local_dataset_files(root, source.path, source.name) is not None or folder in written:
                continue
            log.info("lm-eval data: %s (%s) -> %s", source.path, source.name, folder)
            splits = datasets.load_dataset(source.path, source.name)
            folder.mkdir(parents=True, exist_ok=True)
            for split, part in splits.items():
                if _has_images(part.features):  # JSON cannot hold them; Parquet keeps the image feature
                    part.to_parquet(str(folder / f"{split}.parquet"))
                else:
                    part.to_json(str(folder / f"{split}.jsonl"), lines=True, force_ascii=False)
            written.append(folder)
    return written
