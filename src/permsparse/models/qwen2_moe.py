"""Binding spec for Qwen2-MoE (``Qwen2MoeForCausalLM``): every routed expert is its own pair of binding groups.

transformers 5 stores a mixture-of-experts layer's experts as two stacked 3D parameters,
``experts.gate_up_proj`` ``(experts, 2 x moe_intermediate, hidden)`` and ``experts.down_proj``
``(experts, hidden, moe_intermediate)``, applied with ``F.linear`` on slices (or grouped matmuls). Nothing in
permsparse -- calibration hooks, masks, learned parametrizations, runtime gathers, folding -- can see a slice of a
parameter as a layer, and teaching all of it about slices would touch every module. Instead
:func:`unfuse_experts` replaces each stacked experts module, in place and once, by :class:`ExpertLinears`: an
``nn.ModuleList`` of :class:`ExpertMLP` modules, each with its own ``gate_up_proj`` (``nn.Linear(hidden,
2 x moe_intermediate)``, the expert's slice of the stacked tensor, gate rows first) and ``down_proj``, whose forward
is the stock eager loop (route, run each hit expert on its tokens only, weight, scatter-add). The function the
model computes is unchanged; the loaders do it (:func:`permsparse.models.loaders.load_hf_causal_lm`,
:func:`permsparse.models.tiny.tiny_qwen2_moe`). For saving, :func:`fused_experts` swaps the stacked modules back
for the duration of ``save_pretrained``, so an export is a stock Qwen2-MoE checkpoint.

Because each expert is now an ordinary module called on exactly the tokens routed to it, everything else follows:

* each expert's ``gate_up_proj`` reads its own routed tokens (a row subset of the normalised residual stream) and
  its ``down_proj`` reads its own ``act(gate) * up``: two groups per expert, calibration statistics from the
  routed tokens only (the hooks see nothing else);
* the router (``mlp.gate``, a ``Qwen2MoeTopKRouter`` holding a bare weight) and the shared expert's scalar gate
  (``mlp.shared_expert_gate``, ``nn.Linear(hidden, 1)``) stay dense and unpermuted: they decide where tokens go
  and how much the shared expert counts; neither is in any group (:meth:`Qwen2MoeSpec.dense_linears`);
* the shared expert (``mlp.shared_expert``, a plain gate/up/down MLP) binds like Llama's MLP;
* export folds each expert's ``down`` permutation into the rows of both halves of its ``gate_up_proj``
  (:class:`~permsparse.models.binding.OutputRows` with ``chunks=2``, as Phi-3), and a shared residual-stream
  permutation into the router's and shared gate's columns as well as every writer (experts' ``down_proj`` rows).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn

from permsparse.errors import ConfigError
from permsparse.models.binding import BindingGroup, OutputRows, ResidualStream, register_spec
from permsparse.models.llama import LlamaLikeSpec, head_layout, hf_classes

__all__ = ["ExpertMLP", "ExpertLinears", "Qwen2MoeSpec", "unfuse_experts", "fused_experts", "stacked_experts"]


def _stacked_classes() -> tuple[type, ...]:
    """The stacked-experts module classes this spec knows how to unfuse (by class)."""
    return hf_classes(("transformers.models.qwen2_moe.modeling_qwen2_moe", ("Qwen2MoeExperts",)))


def _sparse_block_classes() -> tuple[type, ...]:
    return hf_classes(("transformers.models.qwen2_moe.modeling_qwen2_moe", ("Qwen2MoeSparseMoeBlock",)))


class ExpertMLP(nn.Module):
    """One routed expert: ``down_proj(act(gate) * up)`` with ``gate, up = gate_up_proj(x).chunk(2)``."""

    def __init__(self, gate_up: Tensor, down: Tensor, act_fn: Any) -> None:
        super().__init__()
        hidden, inter = int(gate_up.shape[1]), int(down.shape[1])
        with torch.device("meta"):
            self.gate_up_proj = nn.Linear(hidden, 2 * inter, bias=False)
            self.down_proj = nn.Linear(inter, hidden, bias=False)
        self.gate_up_proj.weight = nn.Parameter(gate_up.detach().clone(), requires_grad=gate_up.requires_grad)
        self.down_proj.weight = nn.Parameter(down.detach().clone(), requires_grad=down.requires_grad)
        self.act_fn = act_fn

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(self.act_fn(gate) * up)


class ExpertLinears(nn.ModuleList):
    """The routed experts of one MoE layer as ``nn.Linear`` modules (``experts.<e>.gate_up_proj`` / ``down_proj``).

    Called as the stacked module it replaces, ``(hidden_states (tokens, hidden), top_k_index, top_k_weights)``,
    and computes the same thing as transformers' eager experts loop: each expert that any token chose runs on
    those tokens only, its output scaled by the routing weight and added at their rows.
    """

    def __init__(self, stacked: nn.Module) -> None:
        act_fn = stacked.act_fn
        super().__init__([ExpertMLP(stacked.gate_up_proj[e], stacked.down_proj[e], act_fn)
                          for e in range(int(stacked.num_experts))])
        self.num_experts = int(stacked.num_experts)
        self.stacked_class = type(stacked)
        self.stacked_config = getattr(stacked, "config", None)

    def forward(self, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor) -> Tensor:
        out = torch.zeros_like(hidden_states)
        if hidden_states.device.type == "meta":  # no routing on the meta device (the planner): every expert runs
            for expert in self:
                out = out + expert(hidden_states)
            return out
        with torch.no_grad():
            hit = torch.unique(top_k_index).tolist()
        for e in hit:
            if not 0 <= e < self.num_experts:
                continue
            token_idx, top_k_pos = torch.where(top_k_index == e)
            routed = self[e](hidden_states[token_idx]) * top_k_weights[token_idx, top_k_pos, None]
            out.index_add_(0, token_idx, routed.to(out.dtype))
        return out

    def stacked(self) -> nn.Module:
        """A stock stacked-experts module holding these experts' current weights (copies, stacked)."""
        if self.stacked_config is None:
            raise ValueError("ExpertLinears: the config of the stacked module it replaced is unknown; cannot re-fuse")
        with torch.device("meta"):
            fused = self.stacked_class(self.stacked_config)
        fused.gate_up_proj = nn.Parameter(torch.stack([e.gate_up_proj.weight.detach() for e in self]))
        fused.down_proj = nn.Parameter(torch.stack([e.down_proj.weight.detach() for e in self]))
        fused.act_fn = self[0].act_fn
        return fused.train(self.training)


def stacked_experts(model: nn.Module) -> list[str]:
    """Names of the stacked (3D) experts modules of ``model`` that :func:`unfuse_experts` would replace."""
    kinds = _stacked_classes()
    return [n for n, m in model.named_modules() if kinds and isinstance(m, kinds)]


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def unfuse_experts(model: nn.Module) -> nn.Module:
    """Replace every stacked experts module of ``model`` in place by an :class:`ExpertLinears` (the same function);
    a no-op for a model without them, or already unfused. Returns ``model``."""
    for name in stacked_experts(model):
        _set(model, name, ExpertLinears(model.get_submodule(name)))
    return model


@contextlib.contextmanager
def fused_experts(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block, ``model`` holds stock stacked experts modules again (copies of the current expert weights;
    gathers are not persistent, so they are simply not part of it); on exit the :class:`ExpertLinears` are back.
    What ``save_pretrained`` needs to write a stock checkpoint."""
    unfused = [(n, m) for n, m in model.named_modules() if isinstance(m, ExpertLinears)]
    try:
        for name, module in unfused:
            _set(model, name, module.stacked())
        yield model
    finally:
        for name, module in unfused:
            _set(model, name, module)


@register_spec
class Qwen2MoeSpec(LlamaLikeSpec):
    """Per decoder layer: ``{q,k,v}``, ``{o}``; then in a sparse-MoE layer ``{shared_expert.gate, up}``,
    ``{shared_expert.down}`` and, per routed expert ``e``, ``{experts.e.gate_up_proj}``, ``{experts.e.down_proj}``
    (forward order: the shared expert runs first); in a dense layer (``mlp_only_layers``) Llama's ``{gate, up}``,
    ``{down}``. Needs the experts unfused (:func:`unfuse_experts`); a model with stacked experts does not match and
    binding discovery refuses it with that hint."""

    family = "qwen2_moe"

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return isinstance(model, hf_classes(
            ("transformers.models.qwen2_moe.modeling_qwen2_moe", ("Qwen2MoeForCausalLM", "Qwen2MoeModel")))) \
            and not stacked_experts(model)

    def _sparse(self, model: nn.Module, prefix: str) -> bool:
        mlp = model.get_submodule(f"{prefix}.mlp")
        if not isinstance(mlp, _sparse_block_classes()):
            return False
        if not isinstance(mlp.experts, ExpertLinears):
            raise ConfigError(f"{type(model).__name__}: {prefix}.mlp.experts is a {type(mlp.experts).__name__} "
                              "(stacked 3D expert weights); call permsparse.models.qwen2_moe.unfuse_experts(model) "
                              "first (the permsparse loaders do)")
        return True

    def groups(self, model: nn.Module) -> list[BindingGroup]:
        layout = head_layout(model)
        out: list[BindingGroup] = []
        for i, p in enumerate(self.block_prefixes(model)):
            m = f"{p}.mlp"
            out += self.attention_groups(i, p, layout)
            sparse = self._sparse(model, p)
            name, mlp = (f"layers.{i}.shared_expert", f"{m}.shared_expert") if sparse else (f"layers.{i}", m)
            out += self.swiglu_groups(i, name, mlp)
            for e in range(len(model.get_submodule(f"{m}.experts")) if sparse else 0):
                x = f"{m}.experts.{e}"
                out += [
                    BindingGroup(f"layers.{i}.experts.{e}.gate_up", [f"{x}.gate_up_proj"], "expert_gate_up", i,
                                 ResidualStream()),
                    BindingGroup(f"layers.{i}.experts.{e}.down", [f"{x}.down_proj"], "expert_down", i,
                                 OutputRows((f"{x}.gate_up_proj",), chunks=2)),
                ]
        return out

    def dense_linears(self, model: nn.Module) -> list[str]:
        """The gating modules that read the residual stream but stay dense and unpermuted: every sparse layer's
        router (``mlp.gate``) and shared-expert gate (``mlp.shared_expert_gate``)."""
        out: list[str] = []
        for p in self.block_prefixes(model):
            if self._sparse(model, p):
                out += [f"{p}.mlp.gate", f"{p}.mlp.shared_expert_gate"]
        return out

    def mlp_residual_params(self, model: nn.Module, prefix: str) -> list[tuple[str, int]]:
        if not self._sparse(model, prefix):
            return super().mlp_residual_params(model, prefix)
        m = f"{prefix}.mlp"
        out = [(f"{m}.shared_expert.down_proj.weight", 0),  # writers: their output rows
               *((f"{m}.experts.{e}.down_proj.weight", 0) for e in range(len(model.get_submodule(f"{m}.experts")))),
               (f"{m}.gate.weight", 1), (f"{m}.shared_expert_gate.weight", 1)]  # dense readers: their columns
        return out


def refusal_hint(model: nn.Module) -> str:
    """What binding discovery adds to its refusal of stacked expert weights when this module can unfuse them."""
    if stacked_experts(model):
        return (f"; for {type(model).__name__}, permsparse.models.qwen2_moe.unfuse_experts(model) turns the stacked "
                "experts into per-expert nn.Linear modules that the Qwen2-MoE spec binds (the loaders do it)")
    return ""

