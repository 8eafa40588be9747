"""Binding spec for Phi-3 (``Phi3ForCausalLM``): fused ``qkv_proj`` and ``gate_up_proj``."""

from __future__ import annotations

from torch import nn

from permsparse.models.binding import BindingGroup, OutputRows, ResidualStream, ValueRows, register_spec
from permsparse.models.llama import LlamaLikeSpec, head_layout, hf_classes

__all__ = ["Phi3Spec"]


@register_spec
class Phi3Spec(LlamaLikeSpec):
    """``{qkv_proj}``, ``{o_proj}``, ``{gate_up_proj}``, ``{down_proj}`` per decoder layer.

    ``qkv_proj``'s rows are ``[q: heads x head_dim | k: kv x head_dim | v: kv x head_dim]``, so ``o_proj``'s
    within-head permutation folds into the last ``kv x head_dim`` rows (:class:`ValueRows` with that offset).
    ``gate_up_proj``'s output is split by ``chunk(2)`` into ``gate`` and ``up``, and ``down_proj`` reads
    ``up * act(gate)``: its permutation folds into the rows of both halves alike (:class:`OutputRows` with
    ``chunks=2``). The residual stream is Llama's (two norms per layer, ``o_proj`` and ``down_proj`` write it).
    """

    family = "phi3"

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return isinstance(model, hf_classes(
            ("transformers.models.phi3.modeling_phi3", ("Phi3ForCausalLM", "Phi3Model"))))

    def groups(self, model: nn.Module) -> list[BindingGroup]:
        head_dim, heads, kv_heads = head_layout(model)
        v_start = (heads + kv_heads) * head_dim
        out: list[BindingGroup] = []
        for i, p in enumerate(self.block_prefixes(model)):
            a, m = f"{p}.self_attn", f"{p}.mlp"
            out += [
                BindingGroup(f"layers.{i}.qkv", [f"{a}.qkv_proj"], "qkv", i, ResidualStream()),
                BindingGroup(f"layers.{i}.o", [f"{a}.o_proj"], "o", i,
                             ValueRows(f"{a}.qkv_proj", (v_start, v_start + kv_heads * head_dim), head_dim, heads,
                                       kv_heads)),
                BindingGroup(f"layers.{i}.gate_up", [f"{m}.gate_up_proj"], "gate_up", i, ResidualStream()),
                BindingGroup(f"layers.{i}.down", [f"{m}.down_proj"], "down", i,
                             OutputRows((f"{m}.gate_up_proj",), chunks=2)),
            ]
        return out
