"""Binding spec for the Gemma 3 text decoder (``Gemma3ForCausalLM``): Llama's groups, two more norms per layer."""

from __future__ import annotations

from torch import nn

from permsparse.models.binding import register_spec
from permsparse.models.llama import LlamaLikeSpec, hf_classes

__all__ = ["Gemma3Spec"]


@register_spec
class Gemma3Spec(LlamaLikeSpec):
    """Gemma 3's text decoder binds like Llama: ``{q,k,v}``, ``{o}``, ``{gate,up}``, ``{down}`` per layer.

    What differs is folding knowledge, not binding:

    * ``q_norm`` / ``k_norm`` normalise each query / key head over ``head_dim`` after ``q_proj`` / ``k_proj``.
      They sit on the outputs of ``q``/``k``, not on any bound input, and nothing is folded into ``q``/``k`` rows,
      so they need nothing. ``v`` is not normalised, so ``o``'s within-head permutation still folds into ``v``'s
      rows (with one kv head every query head shares it: the permutation must then be one ``head_dim``
      permutation repeated over all heads).
    * Four norms per layer carry the residual stream: ``input_layernorm`` and ``pre_feedforward_layernorm``
      before the readers, ``post_attention_layernorm`` and ``post_feedforward_layernorm`` on the writers' outputs
      before the residual add. All are RMSNorms over the hidden channels (``x / rms(x) * (1 + weight)``), so a
      residual-stream permutation permutes their weights like any other norm.
    * The embedding is scaled by ``sqrt(hidden)`` (a scalar buffer) and tied to ``lm_head`` by default: one tensor,
      permuted once.
    """

    family = "gemma3"
    layer_norms = ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                   "post_feedforward_layernorm")

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return isinstance(model, hf_classes(
            ("transformers.models.gemma3.modeling_gemma3", ("Gemma3ForCausalLM", "Gemma3TextModel"))))
