"""Per-architecture binding specs (which linears share a permutation) and model loaders."""

from permsparse.models.binding import (
    SPECS,
    BindingGroup,
    BindingSpec,
    Discovered,
    Opaque,
    OutputRows,
    Producer,
    ResidualStream,
    SecondStream,
    ValueRows,
    get_spec,
    register_spec,
)
from permsparse.models.discovery import DiscoveredSpec, discover_spec
from permsparse.models.gemma3 import Gemma3Spec
from permsparse.models.llama import LlamaLikeSpec
from permsparse.models.phi3 import Phi3Spec
from permsparse.models.qwen2_5_vl import Qwen2_5_VLSpec
from permsparse.models.qwen2_moe import Qwen2MoeSpec, unfuse_experts
from permsparse.models.vit import TimmViTSpec

__all__ = ["SPECS", "BindingGroup", "BindingSpec", "Producer", "ResidualStream", "OutputRows", "ValueRows", "Opaque",
           "Discovered", "SecondStream", "DiscoveredSpec", "discover_spec", "get_spec", "register_spec", "LlamaLikeSpec",
           "Gemma3Spec", "Phi3Spec", "Qwen2MoeSpec", "Qwen2_5_VLSpec", "TimmViTSpec", "unfuse_experts"]
