"""Binding spec for Qwen2.5-VL (``Qwen2_5_VLForConditionalGeneration``): the language decoder, and the vision tower
as an option.

The model is two Transformers joined by a projector. In transformers 5 the modules are

* ``model.visual``: the vision tower. ``patch_embed`` (a ``Conv3d``), then ``blocks.<i>``, each with
  ``norm1 -> attn.qkv -> attn.proj`` and ``norm2 -> mlp.{gate_proj, up_proj} -> mlp.down_proj`` (RMSNorms, every
  linear with a bias), then ``merger`` (``ln_q``, then ``mlp.0`` on four neighbouring patches concatenated, GELU,
  ``mlp.2``), which writes image embeddings into the decoder's input at the image-token positions;
* ``model.language_model``: a Qwen2 decoder (``layers.<i>`` with q/k/v with biases, o, gate/up/down,
  ``input_layernorm`` and ``post_attention_layernorm``, then ``norm``). Its rotary embedding is multimodal (3D
  positions), which changes q and k only;
* ``lm_head``.

**Which linears are targeted** is a property of the model, set by :func:`set_targets` (the loader does it from the
config key ``model.targets``): ``("language",)`` by default, ``("language", "vision")`` to prune the vision tower's
blocks as well. The merger, the patch embedding and ``lm_head`` always stay dense. The mark is an attribute of the
model object, so it survives the ``deepcopy`` export folds, and :func:`get_spec` needs no argument.

**Folding knowledge.** The language decoder binds and folds exactly as Qwen2 (:class:`LlamaLikeSpec`). Its residual
stream has one writer more than Qwen2's: ``model.visual.merger.mlp.2`` puts image embeddings into it, so a shared
residual-stream permutation must permute that linear's output rows and bias too (listed in
:meth:`Qwen2_5_VLSpec.residual_params` whether or not the vision tower is targeted). In a vision block:

* ``{attn.qkv}`` and ``{mlp.gate_proj, mlp.up_proj}`` read the vision tower's normalised residual stream. Their
  permutation is a column permutation of those linears; export gathers it (:class:`SecondStream`: permsparse folds
  one residual-stream permutation per model, the decoder's);
* ``{attn.proj}`` reads the attention heads concatenated. ``qkv``'s output is reshaped to ``(tokens, 3, heads,
  head_dim)``, so its rows are ``[q | k | v]``, each ``heads x head_dim`` (no grouped-query attention), and the
  rotary embedding touches q and k only: a within-head permutation of ``proj``'s input folds into the v rows
  ``2 x hidden .. 3 x hidden`` of ``qkv`` and their biases (:class:`ValueRows`), as in a timm ViT;
* ``{mlp.down_proj}`` reads ``silu(gate) * up`` (elementwise): it folds into the rows and biases of ``gate_proj``
  and ``up_proj`` (:class:`OutputRows`).

Blocks are listed in forward order, vision blocks (when targeted) before the decoder layers: the distillation loss
sees every one of them. Calibration block by block (``calibration.sequential=true``) and block-local learning pass
one block's output to the next, which cannot cross from the vision tower to the decoder; with the vision tower
targeted, calibrate on whole forward passes.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn

from permsparse.errors import ConfigError
from permsparse.models.binding import BindingGroup, OutputRows, SecondStream, ValueRows, register_spec
from permsparse.models.llama import LlamaLikeSpec, hf_classes

__all__ = ["TARGETS", "TARGETS_KEY", "Qwen2_5_VLSpec", "set_targets", "targets_of", "image_example"]

#: what ``model.targets`` may list
TARGETS = ("language", "vision")
TARGETS_KEY = "model.targets"
DEFAULT_TARGETS = ("language",)
_TARGETS_ATTR = "_permsparse_targets"


def _classes() -> tuple[type, ...]:
    return hf_classes(("transformers.models.qwen2_5_vl.modeling_qwen2_5_vl",
                       ("Qwen2_5_VLForConditionalGeneration", "Qwen2_5_VLModel")))


def set_targets(model: nn.Module, targets: Iterable[str] | str = DEFAULT_TARGETS) -> nn.Module:
    """Mark which towers of a Qwen2.5-VL ``model`` are pruned: a non-empty subset of :data:`TARGETS`
    (``model.targets``). Returns ``model``. A :class:`~permsparse.errors.ConfigError` names the key for anything
    else."""
    chosen = [targets] if isinstance(targets, str) else list(targets)
    bad = [t for t in chosen if t not in TARGETS]
    if bad or not chosen:
        raise ConfigError(f"{TARGETS_KEY}={chosen!r} is invalid: list one or both of {list(TARGETS)} "
                          "(language: the decoder's layers; vision: the vision tower's blocks)")
    object.__setattr__(model, _TARGETS_ATTR, tuple(t for t in TARGETS if t in chosen))
    return model


def targets_of(model: nn.Module) -> tuple[str, ...]:
    """The towers :func:`set_targets` marked on ``model`` (``("language",)`` if none was marked)."""
    return tuple(getattr(model, _TARGETS_ATTR, None) or DEFAULT_TARGETS)


@register_spec
class Qwen2_5_VLSpec(LlamaLikeSpec):
    """Per vision block (``model.targets`` with ``vision``): ``{attn.qkv}``, ``{attn.proj}``, ``{mlp.gate_proj,
    mlp.up_proj}``, ``{mlp.down_proj}``; then per decoder layer (with ``language``) Qwen2's ``{q,k,v}``, ``{o}``,
    ``{gate,up}``, ``{down}``. See the module docstring for the folding knowledge."""

    family = "qwen2_5_vl"

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return isinstance(model, _classes())

    @staticmethod
    def _root(model: nn.Module) -> tuple[nn.Module, str]:
        """The ``Qwen2_5_VLModel`` and its name prefix (``"model."`` under the generation class)."""
        inner = getattr(model, "model", None)
        if inner is not None and hasattr(inner, "language_model"):
            return inner, "model."
        return model, ""

    @staticmethod
    def _decoder(model: nn.Module) -> tuple[nn.Module, str]:
        inner, root = Qwen2_5_VLSpec._root(model)
        return inner.language_model, f"{root}language_model."

    def vision_prefixes(self, model: nn.Module) -> list[str]:
        """Module-name prefix of every vision block (all of them, targeted or not)."""
        inner, root = self._root(model)
        return [f"{root}visual.blocks.{i}" for i in range(len(inner.visual.blocks))]

    def layer_prefixes(self, model: nn.Module) -> list[str]:
        return super().layer_prefixes(model) if "language" in targets_of(model) else []

    def block_prefixes(self, model: nn.Module) -> list[str]:
        vision = self.vision_prefixes(model) if "vision" in targets_of(model) else []
        return [*vision, *self.layer_prefixes(model)]

    def vision_groups(self, model: nn.Module) -> list[BindingGroup]:
        """The binding groups of the vision blocks, block indices counted from 0."""
        inner, _ = self._root(model)
        cfg = inner.visual.config
        heads = int(cfg.num_heads)
        hidden = int(cfg.hidden_size)
        head_dim = hidden // heads
        out: list[BindingGroup] = []
        for i, p in enumerate(self.vision_prefixes(model)):
            a, m = f"{p}.attn", f"{p}.mlp"
            name = f"visual.blocks.{i}"
            stream = SecondStream("vision tower")
            out += [
                BindingGroup(f"{name}.qkv", [f"{a}.qkv"], "vision_qkv", i, stream),
                BindingGroup(f"{name}.proj", [f"{a}.proj"], "vision_proj", i,
                             ValueRows(f"{a}.qkv", (2 * hidden, 3 * hidden), head_dim, heads, heads)),
                BindingGroup(f"{name}.gate_up", [f"{m}.gate_proj", f"{m}.up_proj"], "vision_gate_up", i, stream),
                BindingGroup(f"{name}.down", [f"{m}.down_proj"], "vision_down", i,
                             OutputRows((f"{m}.gate_proj", f"{m}.up_proj"))),
            ]
        return out

    def groups(self, model: nn.Module) -> list[BindingGroup]:
        targets = targets_of(model)
        vision = self.vision_groups(model) if "vision" in targets else []
        offset = len(self.vision_prefixes(model)) if vision else 0
        language = super().groups(model)  # Qwen2's groups over layer_prefixes (none without "language")
        for g in language:
            g.block += offset
        return [*vision, *language]

    def residual_params(self, model: nn.Module) -> list[tuple[str, int]]:
        """Qwen2's decoder stream, and the merger's last linear, which writes image embeddings into it. The vision
        tower's own stream is another one (its readers' permutations are gathered)."""
        if "language" not in targets_of(model):
            raise NotImplementedError("Qwen2.5-VL with model.targets=[vision]: no group reads the decoder's residual "
                                      "stream, and the vision tower's stream is not folded")
        _, root = self._root(model)
        out = super().residual_params(model)
        merger = f"{root}visual.merger.mlp.2"
        return [*out, *self._writer_rows(model, merger)]


def _special_ids(config: object) -> list[int]:
    return [int(getattr(config, k)) for k in ("image_token_id", "video_token_id", "vision_start_token_id",
                                              "vision_end_token_id") if getattr(config, k, None) is not None]


def image_example(model: nn.Module, batch: int = 2, tokens: int = 16, generator: torch.Generator | None = None,
                  ) -> dict[str, Tensor]:
    """A batch that runs both towers: each sequence is ``<vision_start> <image> x4 <vision_end>`` and random text
    (ids below every special token), with one random image per sequence of ``(1, 2 x merge, 2 x merge)`` patches
    (4 decoder tokens). Keyword arguments of the model's forward (``input_ids``, ``pixel_values``,
    ``image_grid_thw``, ``mm_token_type_ids``), on the CPU. Export verifies with it, so that a wrong fold in the vision
    tower or the merger changes the logits."""
    gen = generator or torch.Generator().manual_seed(0)
    inner, _ = Qwen2_5_VLSpec._root(model)
    vcfg, cfg = inner.visual.config, inner.config
    merge = int(vcfg.spatial_merge_size)
    grid = (1, 2 * merge, 2 * merge)
    image_tokens = grid[0] * grid[1] * grid[2] // merge**2
    if tokens < image_tokens + 3:
        raise ValueError(f"image_example: {tokens} tokens cannot hold an image of {image_tokens} tokens and some text")
    vocab = int(cfg.get_text_config().vocab_size)
    special = _special_ids(cfg)
    ids = torch.randint(0, min([vocab, *special]), (batch, tokens), generator=gen)
    ids[:, 0] = cfg.vision_start_token_id
    ids[:, 1:1 + image_tokens] = cfg.image_token_id
    ids[:, 1 + image_tokens] = cfg.vision_end_token_id
    types = torch.zeros_like(ids, dtype=torch.int32)
    types[:, 1:1 + image_tokens] = 1
    patch = int(vcfg.in_channels) * int(vcfg.temporal_patch_size) * int(vcfg.patch_size) ** 2
    pixels = torch.randn((batch * grid[0] * grid[1] * grid[2], patch), generator=gen)
    return {"input_ids": ids, "pixel_values": pixels, "image_grid_thw": torch.tensor([grid] * batch),
            "mm_token_type_ids": types}
