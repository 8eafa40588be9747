"""Binding spec for Hugging Face Llama-like decoders (Llama, Qwen2, Mistral), grouped-query attention included."""

from __future__ import annotations

from torch import nn

from permsparse.models.binding import (
    BindingGroup,
    BindingSpec,
    OutputRows,
    ResidualStream,
    ValueRows,
    register_spec,
)

__all__ = ["LlamaLikeSpec", "hf_classes", "head_layout"]


def hf_classes(*sources: tuple[str, tuple[str, ...]]) -> tuple[type, ...]:
    """The classes ``names`` of each transformers ``module`` that this transformers version has (by class, so that a
    spec matches by ``isinstance``, never by a name string)."""
    classes: list[type] = []
    for module, names in sources:
        try:
            mod = __import__(module, fromlist=list(names))
        except ImportError:  # pragma: no cover - depends on the transformers version
            continue
        classes += [getattr(mod, n) for n in names if hasattr(mod, n)]
    return tuple(classes)


def _llama_like_classes() -> tuple[type, ...]:
    return hf_classes(
        ("transformers.models.llama.modeling_llama", ("LlamaForCausalLM", "LlamaModel")),
        ("transformers.models.qwen2.modeling_qwen2", ("Qwen2ForCausalLM", "Qwen2Model")),
        ("transformers.models.mistral.modeling_mistral", ("MistralForCausalLM", "MistralModel")),
    )


def head_layout(model: nn.Module) -> tuple[int, int, int]:
    """``(head_dim, num_heads, num_kv_heads)`` of a Hugging Face decoder, from its config (the text config of a
    composite one, e.g. a vision-language model's ``config.text_config``)."""
    cfg = model.config
    cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    heads = cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return int(head_dim), int(heads), int(kv_heads)


@register_spec
class LlamaLikeSpec(BindingSpec):
    """``{q,k,v}``, ``{o}``, ``{gate,up}``, ``{down}`` per decoder layer; never embeddings or ``lm_head``.

    ``down`` reads ``act(gate(x)) * up(x)``, so its permutation folds into the rows of ``gate`` and ``up``;
    ``o`` reads the concatenated attention heads, foldable into ``v``'s rows within a head, identically
    across the query heads that share one kv head.
    """

    family = "llama_like"
    #: the norms of a decoder layer, each on the residual stream (weight, and bias where present)
    layer_norms: tuple[str, ...] = ("input_layernorm", "post_attention_layernorm")

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return isinstance(model, _llama_like_classes())

    @staticmethod
    def _decoder(model: nn.Module) -> tuple[nn.Module, str]:
        if hasattr(model, "model") and hasattr(model.model, "layers"):
            return model.model, "model."
        return model, ""

    def blocks(self, model: nn.Module) -> list[nn.Module]:
        return [model.get_submodule(p) for p in self.block_prefixes(model)]

    def layer_prefixes(self, model: nn.Module) -> list[str]:
        """Module-name prefix of every decoder layer. The blocks are these layers here; a family with blocks of its
        own before them (a vision tower) overrides :meth:`block_prefixes` and keeps this."""
        decoder, root = self._decoder(model)
        return [f"{root}layers.{i}" for i in range(len(decoder.layers))]

    def block_prefixes(self, model: nn.Module) -> list[str]:
        return self.layer_prefixes(model)

    def groups(self, model: nn.Module) -> list[BindingGroup]:
        layout = head_layout(model)
        out: list[BindingGroup] = []
        for i, p in enumerate(self.layer_prefixes(model)):
            out += self.attention_groups(i, p, layout) + self.swiglu_groups(i, f"layers.{i}", f"{p}.mlp")
        return out

    @staticmethod
    def attention_groups(i: int, prefix: str, layout: tuple[int, int, int]) -> list[BindingGroup]:
        """Layer ``i``'s q/k/v group (reads the residual stream) and its o group (folds into v's rows, per kv
        head); ``layout`` is ``(head_dim, heads, kv_heads)``."""
        head_dim, heads, kv_heads = layout
        a = f"{prefix}.self_attn"
        return [
            BindingGroup(f"layers.{i}.qkv", [f"{a}.q_proj", f"{a}.k_proj", f"{a}.v_proj"], "qkv", i, ResidualStream()),
            BindingGroup(f"layers.{i}.o", [f"{a}.o_proj"], "o", i,
                         ValueRows(f"{a}.v_proj", (0, kv_heads * head_dim), head_dim, heads, kv_heads)),
        ]

    @staticmethod
    def swiglu_groups(i: int, name: str, mlp: str) -> list[BindingGroup]:
        """A SwiGLU MLP's gate/up group (reads the residual stream) and its down group (folds into gate's and
        up's rows), named ``<name>.gate_up`` / ``<name>.down``."""
        return [
            BindingGroup(f"{name}.gate_up", [f"{mlp}.gate_proj", f"{mlp}.up_proj"], "gate_up", i, ResidualStream()),
            BindingGroup(f"{name}.down", [f"{mlp}.down_proj"], "down", i,
                         OutputRows((f"{mlp}.gate_proj", f"{mlp}.up_proj"))),
        ]

    def residual_params(self, model: nn.Module) -> list[tuple[str, int]]:
        decoder, root = self._decoder(model)
        out: list[tuple[str, int]] = [(f"{root}embed_tokens.weight", 1)]
        for p in self.layer_prefixes(model):
            for norm in self.layer_norms:
                out.append((f"{p}.{norm}.weight", 0))
                if getattr(model.get_submodule(f"{p}.{norm}"), "bias", None) is not None:  # not in stock Llama
                    out.append((f"{p}.{norm}.bias", 0))
            out += self._writer_rows(model, f"{p}.self_attn.o_proj")
            out += self.mlp_residual_params(model, p)
        out.append((f"{root}norm.weight", 0))
        if getattr(decoder.norm, "bias", None) is not None:
            out.append((f"{root}norm.bias", 0))
        head = getattr(model, "lm_head", None) if root else None
        if head is not None:
            out.append(("lm_head.weight", 1))  # tied to embed_tokens or not: permuted once either way
        return out

    def mlp_residual_params(self, model: nn.Module, prefix: str) -> list[tuple[str, int]]:
        """The residual-stream parameters of the MLP of the decoder layer at ``prefix`` (Llama: ``down_proj``'s output
        rows and bias); a family whose MLP writes or reads the stream elsewhere (mixture of experts) overrides it."""
        return self._writer_rows(model, f"{prefix}.mlp.down_proj")

    @staticmethod
    def _writer_rows(model: nn.Module, writer: str) -> list[tuple[str, int]]:
        out = [(f"{writer}.weight", 0)]
        if model.get_submodule(writer).bias is not None:
            out.append((f"{writer}.bias", 0))
        return out
