"""Export a pruned model for deployment: fold, save in the family's own format, verify, reload.

Folder layout written by :func:`export_model`:

* HF causal LMs (Llama, Qwen2, Mistral, Gemma 3, Phi-3, Qwen2-MoE with its experts stacked back, and any causal LM bound
  by discovery) and Qwen2.5-VL (verified on token ids with an image each): ``save_pretrained`` output
  (``config.json``, ``model.safetensors`` and, when given, the tokenizer); timm ViTs: ``model.safetensors``, a
  plain timm state dict.
  State-dict keys are the stock ones: gathered layers keep their ``weight``/``bias`` names.
* ``permsparse_export.json`` (the sidecar): pattern, pruner, family, dtype, how to rebuild the architecture
  (timm), per group its permutation, whether it was folded or gathered and why, and the verification record.
* ``permsparse_reference.safetensors``: the fixed verification inputs and the masked original-order model's
  outputs on them, so that :func:`load_exported` can re-verify a reloaded model by itself.

Every bound linear is checked N:M *as stored* at export and at load. Layers that need a runtime gather only
work through :func:`load_exported` (it re-inserts them from the sidecar); a plain ``from_pretrained`` of a
folder with gathers gives a wrong model.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import pkgutil
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from permsparse.export.fold import FoldReport, check_deployed_nm, check_pruned_nm, fold_model
from permsparse.export.gather import insert_gather
from permsparse.models.binding import BindingSpec, get_spec
from permsparse.models.discovery import HF_CAUSAL_LM_FAMILY, TIMM_FAMILY, timm_input_size
from permsparse.sparsity.nm import NMPattern
from permsparse.utils.io import atomic_write_json, read_json

__all__ = [
    "SIDECAR",
    "REFERENCE",
    "PRUNED_STATE",
    "ExportVerificationError",
    "ExportFamily",
    "ExportResult",
    "EXPORT_FAMILIES",
    "register_export_family",
    "example_inputs",
    "model_outputs",
    "verify_outputs",
    "export_model",
    "load_exported",
    "save_pruned_state",
    "load_pruned_state",
]

SIDECAR = "permsparse_export.json"
REFERENCE = "permsparse_reference.safetensors"
PRUNED_STATE = "pruned.safetensors"
FORMAT_VERSION = 1


class ExportVerificationError(RuntimeError):
    """The exported (or reloaded) model does not compute what the masked original-order model computes."""


# ---------------------------------------------------------------------------------------------- families


@dataclass
class ExportFamily:
    """How one model family is fed, saved and rebuilt. Register new ones with :func:`register_export_family`."""

    name: str
    format: str
    inputs: Callable[[nn.Module, torch.Generator, int], dict[str, Tensor]]
    forward: Callable[[nn.Module, dict[str, Tensor]], Tensor]
    save: Callable[[nn.Module, Path, dict[str, Any], Any], None]
    load: Callable[[Path, dict[str, Any]], nn.Module]
    needs_build: bool = False  # the saved weights need a ``build`` node that rebuilds the architecture (timm)


EXPORT_FAMILIES: dict[str, ExportFamily] = {}


def register_export_family(family: ExportFamily) -> ExportFamily:
    """Make ``family`` (keyed by the binding spec's ``family`` name) available to export and load."""
    EXPORT_FAMILIES[family.name] = family
    return family


def _family(name: str) -> ExportFamily:
    if name not in EXPORT_FAMILIES:
        raise ValueError(f"no export support for model family {name!r}; known: {sorted(EXPORT_FAMILIES)}. "
                         "Register an ExportFamily with permsparse.export.register_export_family")
    return EXPORT_FAMILIES[name]


def _param_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _model_dtype(model: nn.Module) -> torch.dtype:
    return next(p.dtype for p in model.parameters() if p.is_floating_point())


def _hf_inputs(model: nn.Module, gen: torch.Generator, batch: int) -> dict[str, Tensor]:
    ids = torch.randint(0, int(model.config.vocab_size), (batch, 16), generator=gen)
    return {"input_ids": ids}


def _hf_forward(model: nn.Module, inputs: dict[str, Tensor]) -> Tensor:
    return model(input_ids=inputs["input_ids"], use_cache=False).logits


def _hf_save(model: nn.Module, folder: Path, build: dict[str, Any], tokenizer: Any) -> None:
    kwargs = {}
    if "safe_serialization" in inspect.signature(model.save_pretrained).parameters:  # transformers 4.x
        kwargs["safe_serialization"] = True
    model.save_pretrained(folder, **kwargs)
    if tokenizer is not None and hasattr(tokenizer, "save_pretrained"):
        tokenizer.save_pretrained(folder)


def _hf_load(folder: Path, sidecar: dict[str, Any]) -> nn.Module:
    """The saved folder through the auto class its config names (:func:`~permsparse.models.loaders.causal_lm_class`:
    a causal LM, or a vision-language model), refusing missing, unexpected or mismatched weights."""
    from transformers import AutoConfig

    from permsparse.models.loaders import causal_lm_class

    auto = causal_lm_class(AutoConfig.from_pretrained(folder, local_files_only=True))
    model, info = auto.from_pretrained(
        folder, dtype=getattr(torch, sidecar["dtype"]), local_files_only=True, output_loading_info=True
    )
    bad = {k: v for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
    if bad:
        raise ValueError(f"{folder}: the saved weights do not match the architecture: {bad}")
    return model


def _timm_inputs(model: nn.Module, gen: torch.Generator, batch: int) -> dict[str, Tensor]:
    embed = model.patch_embed
    size = tuple(int(s) for s in embed.img_size)
    return {"pixel_values": torch.randn((batch, int(embed.proj.in_channels), *size), generator=gen)}


def _timm_cfg_inputs(model: nn.Module, gen: torch.Generator, batch: int) -> dict[str, Tensor]:
    """Any timm model: random images of the size it accepts (:func:`~permsparse.models.discovery.timm_input_size`)."""
    size = timm_input_size(model)
    if size is None:
        raise ValueError(f"{type(model).__name__}: no pretrained_cfg['input_size'] to build verification images from")
    return {"pixel_values": torch.randn((batch, *size), generator=gen)}


def _timm_forward(model: nn.Module, inputs: dict[str, Tensor]) -> Tensor:
    return model(inputs["pixel_values"])


def _timm_save(model: nn.Module, folder: Path, build: dict[str, Any], tokenizer: Any) -> None:
    from safetensors.torch import save_model

    save_model(model, str(folder / "model.safetensors"), metadata={"format": "pt"})


def _timm_load(folder: Path, sidecar: dict[str, Any]) -> nn.Module:
    from safetensors.torch import load_model

    built = _build(sidecar["build"])
    model = built[0] if isinstance(built, tuple) else built
    model = model.to(getattr(torch, sidecar["dtype"]))
    missing, unexpected = load_model(model, str(folder / "model.safetensors"), strict=False)
    if missing or unexpected:
        raise ValueError(f"{folder}: the saved weights do not match the rebuilt architecture "
                         f"(missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}); check 'build' "
                         f"in {SIDECAR}")
    return model


# Hugging Face causal LMs with an explicit binding spec (models/llama.py, gemma3.py, phi3.py): one format
for _name in ("llama_like", "gemma3", "phi3"):
    register_export_family(ExportFamily(_name, "hf_save_pretrained", _hf_inputs, _hf_forward, _hf_save, _hf_load))


def _moe_save(model: nn.Module, folder: Path, build: dict[str, Any], tokenizer: Any) -> None:
    """Qwen2-MoE: the per-expert linears are stacked back into the stock 3D expert tensors while saving, so the
    folder is a stock checkpoint (gathers, non-persistent, live only in the sidecar as for every family)."""
    from permsparse.models.qwen2_moe import fused_experts

    with fused_experts(model):
        _hf_save(model, folder, build, tokenizer)


def _moe_load(folder: Path, sidecar: dict[str, Any]) -> nn.Module:
    from permsparse.models.qwen2_moe import unfuse_experts

    return unfuse_experts(_hf_load(folder, sidecar))


register_export_family(ExportFamily("qwen2_moe", "hf_save_pretrained", _hf_inputs, _hf_forward, _moe_save, _moe_load))


def _vl_inputs(model: nn.Module, gen: torch.Generator, batch: int) -> dict[str, Tensor]:
    """Qwen2.5-VL: token ids with one image each (both towers and the merger run, whatever is targeted)."""
    from permsparse.models.qwen2_5_vl import image_example

    return image_example(model, batch, generator=gen)


def _vl_forward(model: nn.Module, inputs: dict[str, Tensor]) -> Tensor:
    return model(**inputs, use_cache=False).logits


def _vl_load(folder: Path, sidecar: dict[str, Any]) -> nn.Module:
    """Qwen2.5-VL, reloaded as every HF family (its config names the image-text class); the towers the export
    pruned are marked again (``model.targets``), so that ``get_spec`` of the reloaded model binds what was pruned."""
    from permsparse.models.qwen2_5_vl import set_targets

    model = _hf_load(folder, sidecar)
    linears = [n for g in sidecar["groups"].values() for n in g["linears"]]
    towers = [t for t, part in (("language", ".language_model."), ("vision", ".visual."))
              if any(part in n for n in linears)]
    return set_targets(model, towers or ("language",))


register_export_family(ExportFamily("qwen2_5_vl", "hf_save_pretrained", _vl_inputs, _vl_forward, _hf_save,
                                    _vl_load))
register_export_family(ExportFamily("timm_vit", "timm_safetensors", _timm_inputs, _timm_forward, _timm_save, _timm_load,
                                    needs_build=True))
# models bound by discovery (permsparse.models.discovery): the same formats, found by what the model is
register_export_family(ExportFamily(HF_CAUSAL_LM_FAMILY, "hf_save_pretrained", _hf_inputs, _hf_forward, _hf_save,
                                    _hf_load))
register_export_family(ExportFamily(TIMM_FAMILY, "timm_safetensors", _timm_cfg_inputs, _timm_forward, _timm_save,
                                    _timm_load, needs_build=True))


# -------------------------------------------------------------------------------------------- build nodes


def _build(node: Mapping[str, Any]) -> Any:
    """Call a flat loader node ``{"_target_": "pkg.fn", **kwargs}`` (what a timm export stores to rebuild its
    architecture; the same nodes as ``conf/model/*.yaml``'s ``load``)."""
    kwargs = {k: v for k, v in node.items() if not k.startswith("_")}
    nested = [k for k, v in kwargs.items() if isinstance(v, Mapping) and "_target_" in v]
    if nested:
        raise ValueError(f"build node {node.get('_target_')!r}: nested _target_ nodes ({nested}) are not supported "
                         "here; give a loader function that takes plain arguments")
    return pkgutil.resolve_name(str(node["_target_"]))(**kwargs)


def _timm_default_build(model: nn.Module) -> dict[str, Any] | None:
    arch = (getattr(model, "pretrained_cfg", None) or {}).get("architecture")
    if not arch:
        return None
    return {"_target_": "timm.create_model", "model_name": arch, "pretrained": False,
            "num_classes": int(model.num_classes)}


# ---------------------------------------------------------------------------------------------- verifying


def example_inputs(model: nn.Module, family: str | None = None, seed: int = 0, batch: int = 2) -> dict[str, Tensor]:
    """The fixed verification batch: seeded random token ids (LMs) or images (ViTs), on CPU."""
    fam = _family(family or get_spec(model).family)
    return fam.inputs(model, torch.Generator().manual_seed(seed), batch)


@contextlib.contextmanager
def _cast(model: nn.Module, dtype: torch.dtype | None) -> Iterator[None]:
    """Temporarily cast every floating parameter and buffer to ``dtype``; restore each one's own dtype after."""
    if dtype is None:
        yield
        return
    saved: list[tuple[dict, str, torch.dtype]] = []
    try:
        for module in model.modules():
            for store in (module._parameters, module._buffers):
                for key, t in store.items():
                    if t is not None and t.is_floating_point() and t.dtype != dtype:
                        saved.append((store, key, t.dtype))
                        t.data = t.data.to(dtype)
        yield
    finally:
        for store, key, old in saved:
            store[key].data = store[key].data.to(old)


@torch.no_grad()
def model_outputs(model: nn.Module, inputs: Mapping[str, Tensor], family: str | None = None,
                  dtype: torch.dtype | None = torch.float64) -> Tensor:
    """The model's outputs (logits) on ``inputs``, computed in ``dtype`` (``None``: its own), returned on CPU.

    float64 makes the comparison of folded vs masked models measure the folding, not float summation order.
    """
    fam = _family(family or get_spec(model).family)
    device = _param_device(model)
    was_training = model.training
    model.eval()
    float_dtype = dtype or _model_dtype(model)
    feed = {k: v.to(device, float_dtype if v.is_floating_point() else v.dtype) for k, v in inputs.items()}
    try:
        with _cast(model, dtype):
            out = fam.forward(model, feed)
    finally:
        model.train(was_training)
    return out.detach().cpu()


def verify_outputs(reference: Tensor, actual: Tensor, tol: float = 1e-5, what: str = "exported model") -> float:
    """Max abs difference of ``actual`` vs ``reference``; raise :class:`ExportVerificationError` above
    ``tol * max(1, max |reference|)``: absolute for outputs of order 1, relative to the largest output above.
    Rounding grows with the scale of the computation, not with each output: Hugging Face computes RMSNorm in
    float32 whatever the model dtype, and a residual-stream permutation changes its summation order, which moves
    every logit of SmolLM2 (largest about 30) by up to about 2e-5, small ones included."""
    if reference.shape != actual.shape:
        raise ExportVerificationError(f"{what}: output shape {tuple(actual.shape)} != reference {tuple(reference.shape)}")
    if not torch.isfinite(actual).all():
        raise ExportVerificationError(f"{what}: outputs contain NaN or Inf")
    reference, actual = reference.double(), actual.double()
    diff = float((actual - reference).abs().max())
    scale = max(1.0, float(reference.abs().max()))
    if not diff <= tol * scale:
        raise ExportVerificationError(
            f"{what}: outputs differ from the masked original-order model by max abs {diff:.3e} > tol {tol:.1e} x "
            f"{scale:.3g} (the largest output); the fold or the saved weights are wrong"
        )
    return diff


# ---------------------------------------------------------------------------------------------- exporting


@dataclass
class ExportResult:
    """What :func:`export_model` produced: the folder, the deployed in-memory model and the fold report."""

    path: Path
    model: nn.Module
    report: FoldReport
    max_abs_diff: float
    reload_max_abs_diff: float
    sidecar: dict[str, Any] = field(default_factory=dict)


def _dtype_name(dtype: torch.dtype | None) -> str | None:
    return None if dtype is None else str(dtype).removeprefix("torch.")


def _replace_folder(tmp: Path, out_dir: Path) -> None:
    if out_dir.exists():
        if any(out_dir.iterdir()) and not (out_dir / SIDECAR).is_file():
            raise FileExistsError(f"{out_dir} exists and is not a permsparse export; refusing to overwrite it")
        old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
        os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out_dir)


def export_model(
    model: nn.Module,
    perms: Mapping[str, Tensor],
    pattern: NMPattern | str,
    out_dir: str | os.PathLike,
    *,
    build: Mapping[str, Any] | None = None,
    pruner: str | None = None,
    tokenizer: Any = None,
    require_foldable: bool = False,
    fold_residual: bool = True,
    tol: float = 1e-5,
    verify_dtype: torch.dtype | None = torch.float64,
    seed: int = 0,
    inplace: bool = False,
    spec: BindingSpec | None = None,
    extra: Mapping[str, Any] | None = None,
) -> ExportResult:
    """Fold, verify, save and re-verify a model pruned in original order by ``prune_model`` (the primary API).

    Args:
        model: pruned in original channel order (``W * M'[:, argsort(p)]``); with ``inplace=False`` untouched.
        perms: ``report.perms`` of that pruning (group name -> ``(d_in,)`` permutation).
        out_dir: the export folder (written atomically: built beside it, then renamed; a previous export there
            is replaced, any other non-empty folder is refused).
        build: for timm ViTs, a ``{"_target_": ..., **kwargs}`` node that rebuilds the architecture
            (weights are then loaded); defaults to ``timm.create_model(<architecture>)`` for registry models.
            Not needed for HF models (``config.json`` describes them).
        require_foldable: refuse (``ValueError``) an ``o``/``proj``/``down``/``fc2`` permutation that cannot be
            folded (cross-head, or not identical across GQA query heads) instead of gathering it.
        fold_residual: when every residual-reading group (``qkv``, ``gate_up``, ``fc1``) has the same permutation
            (``perm.residual=shared``), fold it into the residual stream (embeddings, norms, writers, head) instead
            of gathering; the saved weights then hold the permuted stream and load into the stock class.
        tol / verify_dtype: outputs of the folded model (and of the reloaded one) must match the masked
            model's within ``tol * max(1, max |output|)`` (:func:`verify_outputs`), computed in
            ``verify_dtype`` (default float64; ``None`` uses the model's dtype -- loosen ``tol`` then).
            Raises :class:`ExportVerificationError` otherwise.
    """
    pattern = NMPattern.parse(pattern)
    spec = spec or get_spec(model)
    family = _family(spec.family)
    out_dir = Path(out_dir)
    if family.needs_build:
        build = dict(build) if build is not None else _timm_default_build(model)
        if build is None:
            raise ValueError("exporting a timm model needs build={'_target_': ..., **kwargs} to rebuild its architecture "
                             "at load time (this model was not created through timm's registry)")
    check_pruned_nm(model, perms, pattern, spec)
    inputs = example_inputs(model, family.name, seed)
    reference = model_outputs(model, inputs, family.name, verify_dtype)

    deployed, report = fold_model(model, perms, pattern, spec, require_foldable, inplace, fold_residual)
    diff = verify_outputs(reference, model_outputs(deployed, inputs, family.name, verify_dtype), tol,
                          "folded model")

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}-tmp-"))
    tmp.chmod(0o755)
    try:
        family.save(deployed, tmp, dict(build or {}), tokenizer)
        from safetensors.torch import save_file

        save_file({**{f"inputs.{k}": v.contiguous() for k, v in inputs.items()}, "outputs": reference.contiguous()},
                  str(tmp / REFERENCE))
        sidecar = {
            "format_version": FORMAT_VERSION,
            "family": family.name,
            "format": family.format,
            "pattern": str(pattern),
            "pruner": pruner,
            "dtype": _dtype_name(_model_dtype(deployed)),
            "build": dict(build) if build is not None else None,
            "counts": report.counts(),
            "residual_stream": {"folded": report.residual_perm is not None,
                                "perm": None if report.residual_perm is None else
                                [int(i) for i in report.residual_perm.tolist()]},
            "groups": {g.name: g.to_dict() for g in report.groups},
            "gathers": {name: g.name for g in report.by_mode("gathered") for name in g.linears},
            "verification": {"tol": tol, "dtype": _dtype_name(verify_dtype), "seed": seed,
                             "inputs": {k: list(v.shape) for k, v in inputs.items()},
                             "max_abs_diff": diff},
            **dict(extra or {}),
        }
        atomic_write_json(tmp / SIDECAR, sidecar)
        reloaded = load_exported(tmp, verify=False)
        reload_diff = verify_outputs(reference, model_outputs(reloaded, inputs, family.name, verify_dtype), tol,
                                     "reloaded export")
        del reloaded
        sidecar["verification"]["reload_max_abs_diff"] = reload_diff
        atomic_write_json(tmp / SIDECAR, sidecar)
        _replace_folder(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return ExportResult(out_dir, deployed, report, diff, reload_diff, sidecar)


def load_exported(out_dir: str | os.PathLike, device: str | torch.device | None = None, verify: bool = True,
                  tol: float | None = None) -> nn.Module:
    """Rebuild a model written by :func:`export_model`: architecture, weights, runtime gathers; check and verify.

    Every bound linear must be N:M as stored. With ``verify`` the reloaded model is run on the stored
    reference inputs and must match the stored reference outputs (``tol`` default: the export's);
    a mismatch raises :class:`ExportVerificationError`.
    """
    out_dir = Path(out_dir)
    if not (out_dir / SIDECAR).is_file():
        raise FileNotFoundError(f"{out_dir} has no {SIDECAR}: not a permsparse export")
    sidecar = read_json(out_dir / SIDECAR)
    if sidecar.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{out_dir}: export format version {sidecar.get('format_version')} is not supported "
                         f"(this permsparse reads {FORMAT_VERSION})")
    family = _family(sidecar["family"])
    model = family.load(out_dir, sidecar)
    if device is not None:
        model = model.to(device)
    for name, group in sidecar["gathers"].items():
        insert_gather(model, name, torch.tensor(sidecar["groups"][group]["perm"], dtype=torch.long))
    names = [n for g in sidecar["groups"].values() for n in g["linears"]]
    check_deployed_nm(model, sidecar["pattern"], names)
    model.eval()
    if verify:
        from safetensors.torch import load_file

        ref = load_file(str(out_dir / REFERENCE))
        inputs = {k.removeprefix("inputs."): v for k, v in ref.items() if k.startswith("inputs.")}
        vdtype = sidecar["verification"].get("dtype")
        outputs = model_outputs(model, inputs, family.name, getattr(torch, vdtype) if vdtype else None)
        verify_outputs(ref["outputs"], outputs, sidecar["verification"]["tol"] if tol is None else tol,
                       f"reloaded export {out_dir}")
    return model


# ------------------------------------------------------------------------------------------- run folders


def save_pruned_state(model: nn.Module, run_dir: str | os.PathLike) -> Path:
    """Write the pruned (original-order, masked) model's state dict to ``<run_dir>/pruned.safetensors``, atomically.

    Called by the run flow after pruning so that :func:`permsparse.runs.export_run` can export runs of any pruner
    (wanda, ria and sparsegpt masks cannot be recomputed without calibration data). Tied weights are stored once.
    """
    from safetensors.torch import save_model

    path = Path(run_dir) / PRUNED_STATE
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_model(model, tmp, metadata={"format": "pt"})
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def load_pruned_state(model: nn.Module, run_dir: str | os.PathLike, folder: str | None = None) -> nn.Module:
    """Load ``<run_dir>/pruned.safetensors`` into ``model`` (strict); a clear error for runs made before export.

    ``folder``: the run wrote its pruned model as a sharded checkpoint folder instead (a streamed run's
    ``pruned/``, :class:`permsparse.streaming.PrunedCheckpoint`): every shard its index names is loaded, and only
    a tied tensor (one that shares its storage with a loaded one, e.g. a tied head) may be absent.
    """
    if folder is not None:
        return _load_pruned_folder(model, Path(run_dir) / folder)
    from safetensors.torch import load_model

    path = Path(run_dir) / PRUNED_STATE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: the run was made before export support (or with saving the "
                                "pruned model switched off); re-run it to export")
    missing, unexpected = load_model(model, str(path), strict=False)
    if missing or unexpected:
        raise ValueError(f"{path} does not fit the rebuilt model (missing {sorted(missing)[:5]}, "
                         f"unexpected {sorted(unexpected)[:5]})")
    return model


def _load_pruned_folder(model: nn.Module, folder: Path) -> nn.Module:
    from safetensors.torch import load_file
    from transformers.utils import SAFE_WEIGHTS_INDEX_NAME

    index = folder / SAFE_WEIGHTS_INDEX_NAME
    if not index.is_file():
        raise FileNotFoundError(f"{index} is missing: {folder} is not a sharded pruned checkpoint (re-run to export)")
    shards = sorted(set(read_json(index)["weight_map"].values()))
    missing_shards = [s for s in shards if not (folder / s).is_file()]
    if missing_shards:
        raise FileNotFoundError(f"{folder}: shards {missing_shards[:3]} named by its index are missing")
    state: dict[str, torch.Tensor] = {}
    for shard in shards:
        state.update(load_file(folder / shard))
    own = model.state_dict()
    unexpected = sorted(set(state) - set(own))
    loaded_storage = {own[k].untyped_storage().data_ptr() for k in state if k in own}
    missing = sorted(k for k in set(own) - set(state) if own[k].untyped_storage().data_ptr() not in loaded_storage)
    if missing or unexpected:
        raise ValueError(f"{folder} does not fit the rebuilt model (missing {missing[:5]}, unexpected {unexpected[:5]})")
    with torch.no_grad():
        for name, value in state.items():
            if own[name].shape != value.shape:
                raise ValueError(f"{folder}: {name} has shape {tuple(value.shape)}, the model {tuple(own[name].shape)}")
            own[name].copy_(value)
    return model
