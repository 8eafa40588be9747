"""Tiny, seeded, randomly initialised models of every supported family, built in milliseconds.

In the spirit of Hugging Face's ``ModelTester``: sizes are divisible by M (4 and 8) and by the
permutation group count, and the LLMs use grouped-query attention (4 query heads, 2 kv heads), so
binding, masking, permutation and export tests exercise the real code paths offline in well under
a second. Every builder seeds a private RNG (the global torch RNG is left untouched) and returns the
model in eval mode; the same seed always gives bit-identical weights.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = [
    "TINY_LM_CONFIG",
    "TINY_VIT_CONFIG",
    "CharTokenizer",
    "tiny_tokenizer",
    "tiny_hf_tokenizer",
    "tiny_llama",
    "tiny_qwen2",
    "tiny_mistral",
    "tiny_phi",
    "tiny_opt",
    "tiny_gemma3",
    "tiny_phi3",
    "tiny_qwen2_moe",
    "tiny_qwen2_5_vl",
    "tiny_vit",
    "random_causal_lm",
]

TINY_LM_CONFIG: dict[str, Any] = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=128,
    max_position_embeddings=256,
)
TINY_VIT_CONFIG: dict[str, Any] = dict(
    img_size=8, patch_size=2, in_chans=1, num_classes=10, embed_dim=64, depth=2, num_heads=4, mlp_ratio=2.0
)


class CharTokenizer:
    """ASCII character tokenizer matching the tiny LMs' vocabulary of 128: id = ASCII code.

    Non-ASCII characters become ``?``. It has the small part of the HF tokenizer interface that
    :mod:`permsparse.data.text` uses (``__call__`` with ``add_special_tokens``, ``decode``, ``len``).
    """

    name_or_path = "permsparse/ascii-char"
    vocab_size = 128

    def __len__(self) -> int:
        return self.vocab_size

    def __call__(self, text: str, add_special_tokens: bool = False, **_: Any) -> dict[str, list[int]]:
        return {"input_ids": list(text.encode("ascii", "replace"))}

    def decode(self, ids: Any, **_: Any) -> str:
        return bytes(int(i) for i in ids).decode("ascii", "replace")

    def to_hf(self) -> Any:
        """The same tokenizer as a ``transformers`` fast tokenizer (one token per character, id = ASCII code,
        ``?`` for anything else), for code that accepts only those, such as lm-evaluation-harness. NUL (id 0,
        absent from every corpus) is its end-of-text token, which lm-eval puts before an empty context."""
        from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
        from transformers import PreTrainedTokenizerFast

        backend = Tokenizer(models.WordLevel(vocab={chr(i): i for i in range(self.vocab_size)}, unk_token="?"))
        # every character is its own pre-token; (?m) lets "." match a newline too (Oniguruma's dot-all)
        backend.pre_tokenizer = pre_tokenizers.Split(Regex("(?m)."), behavior="isolated")
        backend.decoder = decoders.Fuse()
        out = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="?", eos_token="\x00")
        out.name_or_path = self.name_or_path
        return out


def tiny_tokenizer() -> CharTokenizer:
    """The ASCII character tokenizer that fits the tiny LMs (vocab 128)."""
    return CharTokenizer()


def tiny_hf_tokenizer(specials: dict[str, int] | None = None) -> Any:
    """The same ASCII character tokenizer as a Hugging Face fast tokenizer (``save_pretrained`` / ``AutoTokenizer``
    round trip), built offline: saved beside a tiny model it makes a local folder that ``model=hf_causal_lm`` loads.
    ``specials``: special tokens (``{text: id}``) that take the place of the characters with those ids; the
    tokenizer then also has a pad (``\\x00``) and an end-of-text (``\\x02``) token."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = dict(specials or {})
    vocab = {chr(i): i for i in range(128) if i not in specials.values()} | specials
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="?"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("[\\s\\S]"), behavior="isolated")  # every character a token
    tok.decoder = decoders.Fuse()
    extra = dict(pad_token="\x00", eos_token="\x02", additional_special_tokens=list(specials)) if specials else {}
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="?", **extra)


def _seeded_build(seed: int, build: Any) -> Any:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build()
    return model.eval()


def _lm(config_cls: Any, model_cls: Any, seed: int, overrides: dict[str, Any]) -> nn.Module:
    cfg = config_cls(**{**TINY_LM_CONFIG, **overrides})
    return _seeded_build(seed, lambda: model_cls(cfg))


def tiny_llama(seed: int = 0, **overrides: Any) -> nn.Module:
    """A 2-layer ``LlamaForCausalLM`` (hidden 64, MLP 128, 4 heads / 2 kv heads, vocab 128)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    return _lm(LlamaConfig, LlamaForCausalLM, seed, overrides)


def random_causal_lm(seed: int = 0, model_type: str = "llama", dtype: str | torch.dtype | None = None,
                     **shape: Any) -> nn.Module:
    """A seeded, randomly initialised causal LM of any size: ``model_type`` and the config fields of a ``shape:``
    block of ``conf/model/*.yaml`` (:func:`permsparse.models.loaders.shape_config`), e.g. LLaMA-2-7B's shape with
    ``num_hidden_layers=2`` (``scripts/bench_scale.py``). ``dtype``: of the weights (float32 when unset). Built as
    the hub loader builds it (the auto class, Qwen2-MoE experts unfused); nothing is downloaded."""
    from permsparse.models.loaders import causal_lm_class, shape_config
    from permsparse.models.qwen2_moe import unfuse_experts

    config = shape_config({"model_type": model_type, **shape})
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else (dtype or torch.float32)
    return unfuse_experts(_seeded_build(seed, lambda: causal_lm_class(config).from_config(config, dtype=dtype)))


def tiny_qwen2(seed: int = 0, **overrides: Any) -> nn.Module:
    """A 2-layer ``Qwen2ForCausalLM`` (as :func:`tiny_llama`; q/k/v carry biases)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    return _lm(Qwen2Config, Qwen2ForCausalLM, seed, overrides)


def tiny_mistral(seed: int = 0, **overrides: Any) -> nn.Module:
    """A 2-layer ``MistralForCausalLM`` (as :func:`tiny_llama`)."""
    from transformers import MistralConfig, MistralForCausalLM

    return _lm(MistralConfig, MistralForCausalLM, seed, overrides)


def tiny_phi(seed: int = 0, **overrides: Any) -> nn.Module:
    """A 2-layer ``PhiForCausalLM`` (as :func:`tiny_llama`): no explicit spec, bound by discovery. Its attention and
    MLP run in parallel on one norm, so ``q, k, v`` and ``fc1`` read the same tensor and share a permutation."""
    from transformers import PhiConfig, PhiForCausalLM

    return _lm(PhiConfig, PhiForCausalLM, seed, overrides)


def tiny_opt(seed: int = 0, **overrides: Any) -> nn.Module:
    """A 2-layer ``OPTForCausalLM`` (hidden 64, MLP 128, 4 heads, vocab 128): no explicit spec, bound by discovery."""
    from transformers import OPTConfig, OPTForCausalLM

    base = {k: v for k, v in TINY_LM_CONFIG.items() if k not in ("intermediate_size", "num_key_value_heads")}
    cfg = OPTConfig(**{**base, "ffn_dim": TINY_LM_CONFIG["intermediate_size"],
                       "word_embed_proj_dim": TINY_LM_CONFIG["hidden_size"], **overrides})
    return _seeded_build(seed, lambda: OPTForCausalLM(cfg))


def tiny_gemma3(seed: int = 0, **overrides: Any) -> nn.Module:
    """A 2-layer ``Gemma3ForCausalLM`` (hidden 64, MLP 128, 4 query heads sharing **one** kv head, head_dim 16, vocab
    128, tied embeddings): q/k norms, four norms per layer; layer 0 slides over 8 tokens, layer 1 attends fully."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    return _lm(Gemma3TextConfig, Gemma3ForCausalLM, seed, {
        "num_key_value_heads": 1, "head_dim": 16, "query_pre_attn_scalar": 16, "sliding_window": 8,
        "layer_types": ["sliding_attention", "full_attention"], **overrides})


def tiny_phi3(seed: int = 0, **overrides: Any) -> nn.Module:
    """A 2-layer ``Phi3ForCausalLM`` (as :func:`tiny_llama`): fused ``qkv_proj`` and ``gate_up_proj``."""
    from transformers import Phi3Config, Phi3ForCausalLM

    # Phi-3's default special token ids (32000) lie outside the tiny vocabulary
    return _lm(Phi3Config, Phi3ForCausalLM, seed, {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2,
                                                   **overrides})


def tiny_qwen2_moe(seed: int = 0, **overrides: Any) -> nn.Module:
    """A 2-layer ``Qwen2MoeForCausalLM`` (hidden 64, 4 heads / 2 kv heads, vocab 128), both layers sparse: 4 routed
    experts (intermediate 64, top 2 per token) and a shared expert (intermediate 128) each. Its experts come unfused,
    one ``nn.Linear`` pair per expert (:func:`permsparse.models.qwen2_moe.unfuse_experts`), as the spec needs."""
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    from permsparse.models.qwen2_moe import unfuse_experts

    model = _lm(Qwen2MoeConfig, Qwen2MoeForCausalLM, seed, {
        "moe_intermediate_size": 64, "shared_expert_intermediate_size": 128, "num_experts": 4,
        "num_experts_per_tok": 2, **overrides})
    return unfuse_experts(model)


#: the tiny Qwen2.5-VL's vision tower: 2 blocks, hidden 32, 2 heads of 16, SwiGLU MLP 64; 3-channel 2x2 patches, one
#: frame per patch, 2x2 patches merged into one decoder token, windows of 2x2 merged tokens (block 0) and full
#: attention (block 1)
TINY_QWEN2_5_VL_VISION: dict[str, Any] = dict(
    depth=2, hidden_size=32, intermediate_size=64, num_heads=2, in_channels=3, patch_size=2, temporal_patch_size=1,
    spatial_merge_size=2, window_size=8, fullatt_block_indexes=[1], out_hidden_size=TINY_LM_CONFIG["hidden_size"],
)
#: the tiny Qwen2.5-VL's special token ids, at the top of the 128-character vocabulary (DEL and the three below it)
TINY_QWEN2_5_VL_TOKENS: dict[str, int] = dict(vision_start_token_id=124, vision_end_token_id=125, video_token_id=126,
                                              image_token_id=127)


def tiny_qwen2_5_vl(seed: int = 0, targets: Any = ("language",), **overrides: Any) -> nn.Module:
    """A ``Qwen2_5_VLForConditionalGeneration``: the decoder as :func:`tiny_qwen2` (hidden 64, 2 layers, 4 heads / 2 kv
    heads, q/k/v biases, vocab 128, multimodal rotary sections 2/3/3 of the 8 frequencies) and a 2-block vision tower
    (:data:`TINY_QWEN2_5_VL_VISION`). Text-only input (``input_ids``) runs the decoder alone. ``targets``
    (``model.targets``): which towers are pruned (:func:`permsparse.models.qwen2_5_vl.set_targets`). ``overrides``
    go to the text config; ``vision_config={...}`` to the vision tower's."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from permsparse.models.qwen2_5_vl import set_targets

    vision = {**TINY_QWEN2_5_VL_VISION, **overrides.pop("vision_config", {})}
    text = {**TINY_LM_CONFIG, "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0,
                                                  "mrope_section": [2, 3, 3]},
            "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2, **overrides}
    cfg = Qwen2_5_VLConfig(text_config=text, vision_config=vision, **TINY_QWEN2_5_VL_TOKENS)
    return set_targets(_seeded_build(seed, lambda: Qwen2_5_VLForConditionalGeneration(cfg)), targets)


def tiny_qwen2_5_vl_processor() -> Any:
    """The tiny Qwen2.5-VL's ``Qwen2_5_VLProcessor``, built offline: the character tokenizer of
    :func:`tiny_hf_tokenizer` with the four vision tokens at the ids of :data:`TINY_QWEN2_5_VL_TOKENS` (in place of
    the characters 124-127), and image / video processors for the tower's 2-pixel patches merged 2 x 2 (images
    resized to 8 x 8 ... 16 x 16 pixels: 4 to 16 image tokens each)."""
    from transformers import Qwen2_5_VLProcessor, Qwen2VLImageProcessor
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    ids = TINY_QWEN2_5_VL_TOKENS
    tokenizer = tiny_hf_tokenizer({"<|vision_start|>": ids["vision_start_token_id"],
                                   "<|vision_end|>": ids["vision_end_token_id"],
                                   "<|video_pad|>": ids["video_token_id"], "<|image_pad|>": ids["image_token_id"]})
    vision = TINY_QWEN2_5_VL_VISION
    shape = dict(patch_size=vision["patch_size"], temporal_patch_size=vision["temporal_patch_size"],
                 merge_size=vision["spatial_merge_size"])
    return Qwen2_5_VLProcessor(image_processor=Qwen2VLImageProcessor(min_pixels=8 * 8, max_pixels=16 * 16, **shape),
                               tokenizer=tokenizer, video_processor=Qwen2VLVideoProcessor(**shape))


def tiny_vit(seed: int = 0, **overrides: Any) -> nn.Module:
    """A 2-block timm ``VisionTransformer`` for 8x8 one-channel images (dim 64, 4 heads, MLP 128, 10 classes)."""
    from timm.models.vision_transformer import VisionTransformer

    cfg = {**TINY_VIT_CONFIG, **overrides}
    return _seeded_build(seed, lambda: VisionTransformer(**cfg))
