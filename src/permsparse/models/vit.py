"""Binding spec for timm ``VisionTransformer`` and its subclasses (ViT, DeiT, DeiT III, DeiT distilled, ...): fused
``qkv``, ``proj``, ``fc1``, ``fc2``. Models whose block differs (EVA, ...) are not ``VisionTransformer``s: discovery
binds them."""

from __future__ import annotations

from torch import nn

from permsparse.models.binding import (
    BindingGroup,
    BindingSpec,
    Opaque,
    OutputRows,
    ResidualStream,
    ValueRows,
    register_spec,
)

__all__ = ["TimmViTSpec"]


@register_spec
class TimmViTSpec(BindingSpec):
    """timm ViT blocks: ``{attn.qkv}``, ``{attn.proj}``, ``{mlp.fc1}``, ``{mlp.fc2}`` (docs/method.md §3).

    Never the patch embedding or the head. ``qkv`` and ``fc1`` read the normalised residual stream;
    ``fc2`` reads ``act(fc1(x))`` so its permutation folds into the rows of ``fc1``; ``proj`` reads the
    concatenated head outputs, foldable into the ``v`` rows of ``qkv`` within heads.
    """

    family = "timm_vit"

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        try:
            from timm.models.vision_transformer import VisionTransformer
        except ImportError:  # pragma: no cover - timm is a dependency
            return False
        return isinstance(model, VisionTransformer)

    def blocks(self, model: nn.Module) -> list[nn.Module]:
        return list(model.blocks)

    def block_prefixes(self, model: nn.Module) -> list[str]:
        return [f"blocks.{i}" for i in range(len(model.blocks))]

    def groups(self, model: nn.Module) -> list[BindingGroup]:
        out: list[BindingGroup] = []
        for i, block in enumerate(model.blocks):
            p = f"blocks.{i}"
            attn, mlp = getattr(block, "attn", None), getattr(block, "mlp", None)
            if attn is None or not isinstance(getattr(attn, "qkv", None), nn.Linear):
                raise ValueError(
                    f"{p}: timm ViT spec expects a fused attn.qkv nn.Linear; this block type "
                    f"({type(block).__name__}) needs its own binding spec"
                )
            if mlp is None or not isinstance(getattr(mlp, "fc1", None), nn.Linear):
                raise ValueError(f"{p}: timm ViT spec expects mlp.fc1/mlp.fc2 nn.Linear (got {type(mlp).__name__})")
            heads = attn.num_heads
            head_dim = attn.qkv.out_features // (3 * heads)
            # Folding fc2's permutation into fc1's rows is exact only if everything between them is elementwise.
            mlp_elementwise = isinstance(getattr(mlp, "norm", nn.Identity()), nn.Identity)
            out += [
                BindingGroup(f"{p}.qkv", [f"{p}.attn.qkv"], "qkv", i, ResidualStream()),
                BindingGroup(f"{p}.proj", [f"{p}.attn.proj"], "proj", i,
                             ValueRows(f"{p}.attn.qkv", (2 * heads * head_dim, 3 * heads * head_dim), head_dim,
                                       heads, heads)),
                BindingGroup(f"{p}.fc1", [f"{p}.mlp.fc1"], "fc1", i, ResidualStream()),
                BindingGroup(f"{p}.fc2", [f"{p}.mlp.fc2"], "fc2", i,
                             OutputRows((f"{p}.mlp.fc1",)) if mlp_elementwise else Opaque()),
            ]
        return out

    def residual_params(self, model: nn.Module) -> list[tuple[str, int]]:
        if getattr(model, "attn_pool", None) is not None:
            raise NotImplementedError("timm ViT with global_pool='map' (attention-pool head): its residual-stream "
                                      "parameters are not listed; the residual-stream permutation cannot be folded")
        out: list[tuple[str, int]] = []

        def add(module_name: str, names: tuple[str, ...], dim: int) -> None:
            module = model.get_submodule(module_name) if module_name else model
            for name in names:
                if isinstance(getattr(module, name, None), nn.Parameter):
                    out.append((f"{module_name}.{name}" if module_name else name, dim))

        embed = model.patch_embed
        if not isinstance(getattr(embed, "proj", None), nn.Conv2d):
            raise NotImplementedError(f"timm ViT patch embedding {type(embed).__name__} without a Conv2d proj")
        add("patch_embed.proj", ("weight", "bias"), 0)
        add("patch_embed.norm", ("weight", "bias"), 0)
        add("", ("cls_token", "reg_token", "dist_token", "pos_embed"), -1)
        add("norm_pre", ("weight", "bias"), 0)
        for i, block in enumerate(model.blocks):
            p = f"blocks.{i}"
            for name in ("norm1", "norm2"):
                add(f"{p}.{name}", ("weight", "bias"), 0)
            add(f"{p}.attn.proj", ("weight", "bias"), 0)
            add(f"{p}.mlp.fc2", ("weight", "bias"), 0)
            for ls in ("ls1", "ls2"):
                if hasattr(block, ls):
                    add(f"{p}.{ls}", ("gamma",), 0)
            if hasattr(block, "attn") and not isinstance(getattr(block.attn, "proj", None), nn.Linear):
                raise NotImplementedError(f"{p}.attn.proj is not an nn.Linear")
        add("norm", ("weight", "bias"), 0)
        add("fc_norm", ("weight", "bias"), 0)
        for head in ("head", "head_dist"):  # head_dist: DeiT distilled's second head reads the distillation token
            if isinstance(getattr(model, head, None), nn.Linear):
                out.append((f"{head}.weight", 1))
        return out
