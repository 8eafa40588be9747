"""Checks on a resolved run config, before any model is loaded: one clear message per problem."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from permsparse.errors import ConfigError
from permsparse.permutation.foldable import FOLDABLE_KEY
from permsparse.permutation.learned import LearnedPermutation
from permsparse.permutation.residual import RESIDUAL_CHOICES, RESIDUAL_KEY
from permsparse.sparsity.nm import NMPattern

log = logging.getLogger("permsparse")

__all__ = ["ConfigError", "validate_config", "build_method", "LEARNING_MODES", "e2e_steps", "block_steps",
           "BLOCK_PRECISIONS", "strategy_kind", "accelerator_kind", "stream_folder"]

_TASKS = {"causal_lm", "image_classification"}
#: ``learning.mode``: end to end (the default) or block-local (:mod:`permsparse.block_local`)
LEARNING_MODES = ("e2e", "block")
#: ``trainer.precision`` values block-local learning runs in (its loop is plain PyTorch: fp32, or bf16 autocast)
BLOCK_PRECISIONS = ("32-true", "32", "bf16-mixed")


def strategy_kind(cfg: DictConfig) -> str:
    """``trainer.strategy`` as the run flow and the planner treat it: ``"fsdp"``, ``"ddp"`` (DDP or DeepSpeed: one
    process per device, the model replicated) or ``"single"`` (one process)."""
    name = str(cfg.trainer.get("strategy", "") or "").lower()
    return "fsdp" if "fsdp" in name else "ddp" if ("ddp" in name or "deepspeed" in name) else "single"


def accelerator_kind(cfg: DictConfig) -> str:
    """``trainer.accelerator`` as a torch device type: ``gpu`` / ``cuda`` -> ``"cuda"``, ``auto`` -> ``"cuda"`` when a
    GPU is visible else ``"cpu"``, anything else lower-cased as given."""
    import torch

    acc = str(cfg.trainer.get("accelerator", "cpu") or "cpu").lower()
    if acc in ("gpu", "cuda"):
        return "cuda"
    if acc == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return acc


def e2e_steps(cfg: DictConfig, world: int = 1) -> int:
    """Optimiser steps of an end-to-end run on one of ``world`` devices: ``ceil(train_samples / (batch_size x
    world))`` per epoch, times ``max_epochs``, capped by ``max_steps`` (``-1`` / null: no cap)."""
    learning = cfg.learning
    per_epoch = -(-int(learning.train_samples) // (int(learning.batch_size) * world))
    steps = per_epoch * int(learning.max_epochs or 1)
    max_steps = learning.get("max_steps")
    return min(steps, int(max_steps)) if max_steps not in (None, -1) else steps


def block_steps(cfg: DictConfig) -> int:
    """Optimiser steps per block in block-local learning: ``learning.block_steps``, or (null) as many as the
    end-to-end run takes in total."""
    steps = cfg.learning.get("block_steps")
    return int(steps) if steps is not None else e2e_steps(cfg)


def _require(cfg: DictConfig, key: str) -> object:
    node: object = cfg
    for part in key.split("."):
        if not isinstance(node, DictConfig) or part not in node or node[part] is None:
            raise ConfigError(f"{key} is missing from the config; set it on the command line ({key}=...) or in conf/")
        node = node[part]
    return node


def _positive_int(cfg: DictConfig, key: str, allow_zero: bool = False) -> None:
    value = _require(cfg, key)
    if isinstance(value, bool) or not isinstance(value, int) or value < (0 if allow_zero else 1):
        bound = ">= 0" if allow_zero else ">= 1"
        raise ConfigError(f"{key}={value!r} is invalid: it must be an integer {bound}")


def validate_config(cfg: DictConfig) -> None:
    """Raise :class:`ConfigError` for the first invalid value; cheap, loads nothing heavy.

    Checks here span several keys or belong to the run itself (budgets, batch sizes, folders). The keys of a
    permutation method are checked by its class when ``perm.method`` is built (also here, so that every error
    comes before anything loads); the choices come from the modules that define them.
    """
    n, m = _require(cfg, "sparsity.n"), _require(cfg, "sparsity.m")
    try:
        NMPattern(n, m)  # type: ignore[arg-type]
    except ValueError as err:
        raise ConfigError(f"sparsity={n}:{m} is invalid: {err}; choose e.g. sparsity=2:4, 4:8, 1:4 or 2:8") from None
    model_task, data_task = _require(cfg, "model.task"), _require(cfg, "dataset.task")
    if model_task not in _TASKS:
        raise ConfigError(f"model.task={model_task!r} is not one of {sorted(_TASKS)}")
    if model_task != data_task:
        raise ConfigError(
            f"model={cfg.model.name} is a {model_task} model but dataset={cfg.dataset.name} is a {data_task} "
            "dataset; pick a matching dataset"
        )
    skip = OmegaConf.select(cfg, "prune.skip_indivisible", default=False)
    if not isinstance(skip, bool):
        raise ConfigError(f"prune.skip_indivisible={skip!r} is invalid: it must be true or false (true keeps the "
                          "binding groups whose d_in the pattern or the group count does not divide dense)")
    _positive_int(cfg, "calibration.samples")
    _positive_int(cfg, "calibration.batch_size")
    _positive_int(cfg, "eval.batch_size")
    foldable = cfg.perm.get("foldable", False)
    if not isinstance(foldable, bool):
        raise ConfigError(f"{FOLDABLE_KEY}={foldable!r} is invalid: it must be true or false (true restricts the "
                          "o_proj / attn.proj permutations to within-head ones that export always folds)")
    residual = cfg.perm.get("residual", "per_layer")
    if residual not in RESIDUAL_CHOICES:
        raise ConfigError(f"{RESIDUAL_KEY}={residual!r} is invalid; choose per_layer (one permutation per residual-"
                          "reading group, gathered at export) or shared (one residual-stream permutation for all "
                          "of them, folded at export)")
    learned = isinstance(build_method(cfg), LearnedPermutation)
    if residual == "shared" and learned:
        raise ConfigError(f"{RESIDUAL_KEY}=shared is not supported with perm=learned (the learned method keeps one "
                          "permutation per group); use a heuristic (perm=greedy or perm=ria) or perm.residual=per_layer")
    if residual == "shared" and cfg.calibration.get("sequential"):
        raise ConfigError(f"{RESIDUAL_KEY}=shared needs calibration.sequential=false: the shared residual-stream "
                          "permutation is chosen once from the dense model's scores of every residual-reading group")
    if learned:
        _positive_int(cfg, "learning.train_samples")
        _positive_int(cfg, "learning.val_samples")
        _positive_int(cfg, "learning.batch_size")
        epochs, steps = _require(cfg, "learning.max_epochs"), _require(cfg, "learning.max_steps")
        if steps == 0 or (epochs is not None and epochs < 1 and steps in (-1, None)):
            raise ConfigError(
                f"perm=learned with learning.max_epochs={epochs} and learning.max_steps={steps} trains nothing; "
                "set learning.max_epochs >= 1 or learning.max_steps >= 1"
            )
        mode = cfg.learning.get("mode", "e2e")
        if mode not in LEARNING_MODES:
            raise ConfigError(f"learning.mode={mode!r} is invalid; choose e2e (end to end) or block (block-local)")
        if mode == "block":
            _check_block_mode(cfg)
        _check_stream(cfg, mode)
        every = cfg.learning.get("checkpoint_every_n_steps")
        if every is not None:
            _positive_int(cfg, "learning.checkpoint_every_n_steps")
        _warn_unused_base(cfg)
    resume = cfg.get("resume")
    if resume and not Path(str(resume)).is_dir():
        raise ConfigError(f"resume={resume} is not a folder; point it at a previous run's output folder")
    _check_image_folder(cfg)
    _check_model_targets(cfg)
    _check_model_source(cfg)
    _check_hub_model(cfg)
    _check_zeroshot(cfg)


def _warn_unused_base(cfg: DictConfig) -> None:
    """``perm.base`` (the learning frame's key, which an experiment may set) reaches the learned method only through
    ``perm=learned``'s ``method.base: ${..base}``; a method config that sets ``method.base`` itself (learned_paper,
    permllm) or a ``perm.method.base=`` override ignores it. Say so instead of letting the run look configured."""
    base = cfg.perm.get("base")
    used = OmegaConf.select(cfg, "perm.method.base", default=None)
    if base is not None and used is not None and str(base) != str(used):
        log.warning("perm.base=%s is not used: perm=%s learns in the frame perm.method.base=%s (set it to choose the "
                    "frame of this method)", base, cfg.perm.get("name"), used)


def _check_model_targets(cfg: DictConfig) -> None:
    """``model.targets`` (a vision-language model's towers to prune): the vision tower runs on images only, and a
    causal-LM dataset feeds token ids only, so a run could neither calibrate nor learn its permutations."""
    targets = OmegaConf.select(cfg, "model.targets", default=None)
    if targets is None:
        return
    chosen = [targets] if isinstance(targets, str) else list(targets)
    if "vision" in chosen and cfg.dataset.get("task") == "causal_lm":
        raise ConfigError(f"model.targets={chosen} includes vision, but dataset={cfg.dataset.name} feeds token ids "
                          "only: the vision tower would get no calibration data and no gradient. Use "
                          "model.targets=[language] here; prune the vision tower through the core API with image "
                          "batches (docs/architecture.md)")


def _check_block_mode(cfg: DictConfig) -> None:
    """What block-local learning (``learning.mode=block``) supports: one process, the paper's per-block SmoothL1,
    fp32 or bf16 autocast."""
    if strategy_kind(cfg) != "single":
        strategy = cfg.trainer.get("strategy")
        raise ConfigError(f"learning.mode=block runs in one process and does not support trainer.strategy={strategy} "
                          "(one block at a time already fits one device; python -m permsparse.plan shows it); use "
                          "trainer=cpu or trainer=gpu, or learning.mode=e2e for DDP/FSDP")
    devices = cfg.trainer.get("devices", 1)
    if isinstance(devices, int) and devices > 1 or int(cfg.trainer.get("num_nodes", 1) or 1) > 1:
        raise ConfigError(f"learning.mode=block runs on one device, not trainer.devices={devices} x "
                          f"trainer.num_nodes={cfg.trainer.get('num_nodes', 1)}; set trainer.devices=1")
    precision = str(cfg.trainer.get("precision", "32-true"))
    if precision not in BLOCK_PRECISIONS:
        raise ConfigError(f"trainer.precision={precision} is not supported by learning.mode=block; choose "
                          f"{', '.join(BLOCK_PRECISIONS)}")
    distill = cfg.perm.get("distill", "block_smooth_l1")
    if distill != "block_smooth_l1":
        raise ConfigError(f"perm.distill={distill} does not apply to learning.mode=block, which trains every block on "
                          "the SmoothL1 between its sparse and its dense output; use perm.distill=block_smooth_l1 "
                          "or learning.mode=e2e")
    for key in ("block_steps", "finetune_steps"):
        if cfg.learning.get(key) is not None:
            _positive_int(cfg, f"learning.{key}")
    if not isinstance(cfg.learning.get("finetune_e2e", False), bool):
        raise ConfigError(f"learning.finetune_e2e={cfg.learning.finetune_e2e!r} is invalid: it must be true or false")
    every = cfg.learning.get("val_every_n_steps")
    if every is not None:
        _positive_int(cfg, "learning.val_every_n_steps")


def _check_stream(cfg: DictConfig, mode: str) -> None:
    """``learning.stream=true`` (:mod:`permsparse.streaming`): block mode, a text model with a safetensors folder, and
    nothing that needs the whole model at once."""
    stream = cfg.learning.get("stream", False)
    if not isinstance(stream, bool):
        raise ConfigError(f"learning.stream={stream!r} is invalid: it must be true or false")
    if not stream:
        return
    if mode != "block":
        raise ConfigError(f"learning.stream=true streams the blocks of block-local learning; learning.mode={mode} "
                          "needs the whole model at once. Set learning.mode=block, or learning.stream=false")
    if cfg.learning.get("finetune_e2e"):
        raise ConfigError("learning.stream=true cannot run learning.finetune_e2e, an end-to-end pass over the whole "
                          "model; set learning.finetune_e2e=false")
    from permsparse.zeroshot import KEY, ZeroShotSettings

    if ZeroShotSettings.from_config(OmegaConf.select(cfg, KEY)).tasks:
        raise ConfigError(f"learning.stream=true evaluates perplexity only; {KEY}.tasks needs the whole model. Set "
                          f"{KEY}.tasks=[] (eval/lm_eval=none)")
    if OmegaConf.select(cfg, "model.targets", default=None) is not None:
        raise ConfigError("learning.stream=true streams a causal LM's decoder blocks; model.targets (a vision-language "
                          "model's towers) is not supported; set learning.stream=false")
    stream_folder(cfg)


def stream_folder(cfg: DictConfig) -> Path:
    """The Hugging Face safetensors folder that ``learning.stream=true`` loads blocks from: ``model.load.name_or_path``
    of ``model=hf_causal_lm`` (``load_hf_causal_lm``), a local folder or a hub id already in the local Hugging Face
    cache (never downloaded here). A :class:`ConfigError` says what is missing."""
    from permsparse.streaming import INDEX_FILE, SINGLE_FILE

    load = cfg.model.get("load")
    target = str(load.get("_target_", "")) if isinstance(load, DictConfig) else ""
    if not target.endswith(".load_hf_causal_lm"):
        raise ConfigError(f"learning.stream=true loads the blocks from a Hugging Face safetensors checkpoint folder, "
                          f"but model={cfg.model.get('name', '?')} is loaded by {target or 'no loader'}, which has none. "
                          "Save the model with save_pretrained and use model=hf_causal_lm "
                          "model.name_or_path=/path/to/folder, or learning.stream=false")
    if OmegaConf.select(load, "gguf_file", default=None, throw_on_missing=False):
        raise ConfigError("learning.stream=true reads safetensors shards, not a GGUF file; set model.gguf_file=null "
                          "with a safetensors folder, or learning.stream=false")
    source = str(OmegaConf.select(load, "name_or_path", default=None, throw_on_missing=False) or "")
    folder = Path(source).expanduser()
    if not folder.is_dir():
        folder = _hub_snapshot(source)
        if folder is None:
            raise ConfigError(f"learning.stream=true needs model.name_or_path={source or 'null'} as a local folder or "
                              "a hub model already in the local Hugging Face cache (streaming never downloads it): "
                              f"huggingface-cli download {source or '<hub id>'}, or point model.name_or_path at a "
                              "save_pretrained folder")
    if not ((folder / INDEX_FILE).is_file() or (folder / SINGLE_FILE).is_file()):
        raise ConfigError(f"learning.stream=true: {folder} holds no safetensors checkpoint (neither {INDEX_FILE} nor "
                          f"{SINGLE_FILE}); save the model there with save_pretrained, or learning.stream=false")
    return folder


def _hub_snapshot(repo_id: str) -> Path | None:
    """The local Hugging Face cache's snapshot folder of ``repo_id`` (never fetched), or ``None``."""
    if not repo_id:
        return None
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except Exception:  # not cached, or not a valid hub id
        return None


def build_method(cfg: DictConfig) -> object:
    """``perm.method`` built by its ``_target_`` (cheap: settings only); its class raises :class:`ConfigError` for a
    bad value, which comes out as that error rather than wrapped in Hydra's."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    node = _require(cfg, "perm.method")
    try:
        return instantiate(node)
    except InstantiationException as err:
        cause = err.__cause__
        if isinstance(cause, ConfigError):
            raise cause from None
        raise ConfigError(f"perm.method could not be built: {cause or err}") from None


def _check_image_folder(cfg: DictConfig) -> None:
    """An ImageFolder dataset (ImageNet) must exist and hold images in ``train/`` and ``val/``."""
    dm = cfg.dataset.get("datamodule")
    if dm is None or dm.get("dataset") != "imagenet":
        return
    root = None if OmegaConf.is_missing(dm, "root") else dm.get("root")
    if not root:
        raise ConfigError("dataset.datamodule.root is not set: dataset=imagenet needs "
                          "dataset.datamodule.root=/path/to/imagenet with train/<wnid>/ and val/<wnid>/ folders")
    for split in ("train", "val"):
        folder = Path(str(root)) / split
        if not folder.is_dir():
            raise ConfigError(f"dataset.datamodule.root={root}: {folder} does not exist; expected "
                              f"{root}/{split}/<class>/<image> (ImageFolder layout)")
        if not any(p.is_file() for c in folder.iterdir() if c.is_dir() for p in c.iterdir()):
            raise ConfigError(f"dataset.datamodule.root={root}: {folder} holds no images (the dataset is empty); "
                              f"expected {root}/{split}/<class>/<image>")


_OFFLINE_FLAGS = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
#: files one of which a cached hub snapshot holds: a transformers model's config, a timm model's weights
_TIMM_WEIGHTS = ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin")


def _hub_offline() -> bool:
    """Whether the Hugging Face Hub is switched off here (``HF_HUB_OFFLINE`` or ``TRANSFORMERS_OFFLINE`` set)."""
    return any(os.environ.get(key, "").strip().lower() in ("1", "true", "yes", "on") for key in _OFFLINE_FLAGS)


def _in_hub_cache(repo_id: str, filenames: tuple[str, ...]) -> bool:
    from huggingface_hub import try_to_load_from_cache

    try:
        return any(isinstance(try_to_load_from_cache(repo_id, name), str) for name in filenames)
    except ValueError:  # not a valid hub id (huggingface_hub's HFValidationError)
        return False


def _check_hub_model(cfg: DictConfig) -> None:
    """With the hub switched off, a hub model (``load_hf_causal_lm`` by hub id, ``load_timm_vit`` with pretrained
    weights) must already be in the local Hugging Face cache; otherwise one line says what to download or where to
    point, before anything loads. Online nothing is checked here: the loader downloads what it needs."""
    load = cfg.model.get("load")
    if load is None or not _hub_offline():
        return
    target = str(load.get("_target_", ""))
    if target.endswith(".load_hf_causal_lm"):
        name = str(load.get("name_or_path"))  # a local path was checked by _check_model_source
        if Path(name).expanduser().is_dir() or _in_hub_cache(name, ("config.json",)):
            return
        raise ConfigError(f"model={cfg.model.name} needs {name} from the Hugging Face Hub, which is offline here and "
                          f"not in the local cache: download it where the hub is reachable (huggingface-cli download "
                          f"{name}; gated models after accepting the licence and huggingface-cli login) or point "
                          "model.load.name_or_path=/path/to/model")
    if target.endswith(".load_timm_vit") and load.get("pretrained", True) and not load.get("checkpoint_path"):
        import timm

        name = str(load.get("name"))
        pretrained = timm.models.get_pretrained_cfg(name)
        repo = str(getattr(pretrained, "hf_hub_id", None) or "").split("@")[0]
        if not repo or _in_hub_cache(repo, _TIMM_WEIGHTS):
            return  # no hub weights to check (an unknown name fails in the loader with timm's message)
        raise ConfigError(f"model={cfg.model.name} needs the timm weights {repo} from the Hugging Face Hub, which is "
                          f"offline here and not in the local cache: download them where the hub is reachable "
                          f"(huggingface-cli download {repo}) or point model.load.checkpoint_path=/path/to/weights")


def _check_zeroshot(cfg: DictConfig) -> None:
    """``eval.lm_eval``: its shape, a language model to run it on, and every task's data found (lm-eval's task
    index is read, seconds; no data is loaded). Nothing to check when no task is set."""
    from permsparse.zeroshot import KEY, ZeroShotSettings, needs_images, processor_source

    settings = ZeroShotSettings.from_config(OmegaConf.select(cfg, KEY))
    if not settings.tasks:
        return
    if cfg.model.task != "causal_lm":
        raise ConfigError(f"{KEY}.tasks={list(settings.tasks)} needs a language model, but model={cfg.model.name} is "
                          f"a {cfg.model.task} model; set {KEY}.tasks=[]")
    images = needs_images(settings)  # checks every task's data first (check_tasks)
    if images and processor_source(cfg.model) is None:
        raise ConfigError(f"{KEY}.tasks: {', '.join(images)} show images and need a vision-language model with its "
                          f"processor, but model={cfg.model.name} has none (e.g. model=qwen2_5_vl_3b)")


def _check_model_source(cfg: DictConfig) -> None:
    """A loader that takes ``name_or_path`` (``model=hf_causal_lm``) needs one; a local folder or GGUF file given must
    exist. Hub ids are not looked up here (that needs the network): a string that is not a local path passes."""
    load = cfg.model.get("load")
    if not isinstance(load, DictConfig) or "name_or_path" not in load:
        return
    source = OmegaConf.select(load, "name_or_path", default=None, throw_on_missing=False)
    key = "model.name_or_path" if "name_or_path" in cfg.model else "model.load.name_or_path"
    if not source:
        raise ConfigError(f"{key} is not set: model={cfg.model.get('name', '?')} needs {key}=<hub id or local "
                          "folder> (e.g. Qwen/Qwen2.5-0.5B or /path/to/model), and model.gguf_file=<file.gguf> "
                          "for a GGUF checkpoint in it")
    path = Path(str(source)).expanduser()
    local = path.is_absolute() or str(source).startswith((".", "~"))
    if local and not path.is_dir():
        raise ConfigError(f"{key}={source}: no such folder (a local model is a save_pretrained folder; a hub id "
                          "looks like owner/name)")
    gguf = OmegaConf.select(load, "gguf_file", default=None, throw_on_missing=False)
    if gguf and path.is_dir() and not (path / str(gguf)).is_file():
        raise ConfigError(f"model.gguf_file={gguf}: {path / str(gguf)} does not exist (gguf_file names a file inside "
                          f"{key})")
