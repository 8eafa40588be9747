"""Image data sets that work offline (digits, Fashion-MNIST) plus a local ImageNet folder, and top-k accuracy.

Conventions: images are float32 tensors ``(N, C, H, W)`` with values in ``[0, 1]`` and *no* further
normalisation (the offline ViT teachers in ``permsparse/assets`` were trained on exactly this, and a
ViT's patch embedding plus LayerNorm absorbs any affine rescaling). Labels are int64 ``(N,)``.
Validation splits are carved from the training images with a seeded permutation, so the same seed
always yields the same split; the test split is never touched for model selection.
"""

from __future__ import annotations

import gzip
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

__all__ = [
    "ImageSplits",
    "FASHION_MNIST_ROOT",
    "FASHION_MNIST_CLASSES",
    "load_digits_dataset",
    "load_fashion_mnist",
    "load_image_dataset",
    "load_imagenet_folder",
    "top1",
    "topk_accuracy",
]

FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
_FASHION_FILES = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}


@dataclass
class ImageSplits:
    """Train/val/test tensors of one image classification set (images in ``[0, 1]``, int64 labels)."""

    name: str
    train: TensorDataset
    val: TensorDataset
    test: TensorDataset
    num_classes: int
    in_chans: int
    img_size: int

    def __repr__(self) -> str:
        return (
            f"ImageSplits({self.name!r}, train={len(self.train)}, val={len(self.val)}, test={len(self.test)}, "
            f"num_classes={self.num_classes}, in_chans={self.in_chans}, img_size={self.img_size})"
        )


def _split_indices(n: int, n_val: int, n_test: int, seed: int) -> tuple[Tensor, Tensor, Tensor]:
    """Seeded disjoint (train, val, test) index sets covering ``range(n)``."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    test = order[:n_test]
    val = order[n_test : n_test + n_val]
    train = order[n_test + n_val :]
    return train, val, test


def load_digits_dataset(seed: int = 0, val_fraction: float = 0.1, test_fraction: float = 0.2) -> ImageSplits:
    """scikit-learn's 1,797 8x8 handwritten digits as ``(N, 1, 8, 8)`` floats in ``[0, 1]``.

    Bundled with scikit-learn, so it always works offline. The (train, val, test) split is a seeded
    random partition: 20 % test, 10 % val, the rest train by default (1258/180/359 images).
    """
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.from_numpy(bunch.images.astype(np.float32) / 16.0).unsqueeze(1)
    y = torch.from_numpy(bunch.target.astype(np.int64))
    n = len(y)
    n_test, n_val = int(round(test_fraction * n)), int(round(val_fraction * n))
    tr, va, te = _split_indices(n, n_val, n_test, seed)
    return ImageSplits(
        "digits",
        TensorDataset(x[tr], y[tr]),
        TensorDataset(x[va], y[va]),
        TensorDataset(x[te], y[te]),
        num_classes=10,
        in_chans=1,
        img_size=8,
    )


def _read_idx(path: Path, offset: int) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        return np.frombuffer(f.read(), dtype=np.uint8, offset=offset)


def load_fashion_mnist(
    root: str | os.PathLike = FASHION_MNIST_ROOT, seed: int = 0, n_val: int = 5000
) -> ImageSplits:
    """Fashion-MNIST (60k train, 10k test, 28x28 grey) from the Debian package's IDX files.

    Images become ``(N, 1, 28, 28)`` float32 in ``[0, 1]`` (pixel / 255, no mean/std normalisation).
    ``n_val`` images of the official training set (seeded choice) form the validation split; the
    official 10k test set is the test split. Needs ``apt-get install dataset-fashion-mnist``.
    """
    root = Path(root)
    missing = [f for f in _FASHION_FILES.values() if not (root / f).is_file()]
    if missing:
        raise FileNotFoundError(
            f"Fashion-MNIST not found under {root} (missing {', '.join(missing)}). "
            "Install it with `apt-get install dataset-fashion-mnist` (Debian/Ubuntu) or pass root= "
            "a folder holding the four IDX .gz files."
        )
    arrays = {}
    for key, fname in _FASHION_FILES.items():
        arrays[key] = _read_idx(root / fname, 16 if key.endswith("images") else 8)

    def images(a: np.ndarray) -> Tensor:
        return torch.from_numpy(a.astype(np.float32) / 255.0).reshape(-1, 1, 28, 28)

    x_train, y_train = (
        images(arrays["train_images"]),
        torch.from_numpy(arrays["train_labels"].astype(np.int64)),
    )
    x_test, y_test = images(arrays["test_images"]), torch.from_numpy(arrays["test_labels"].astype(np.int64))
    if len(x_train) != len(y_train) or len(x_test) != len(y_test):
        raise ValueError(f"corrupt Fashion-MNIST files under {root}: image and label counts differ")
    tr, va, _ = _split_indices(len(y_train), n_val, 0, seed)
    return ImageSplits(
        "fashion_mnist",
        TensorDataset(x_train[tr], y_train[tr]),
        TensorDataset(x_train[va], y_train[va]),
        TensorDataset(x_test, y_test),
        num_classes=10,
        in_chans=1,
        img_size=28,
    )


def load_image_dataset(name: str, seed: int = 0, **kwargs) -> ImageSplits:
    """Dispatch ``"digits"`` or ``"fashion_mnist"`` (the offline sets) by name."""
    loaders = {"digits": load_digits_dataset, "fashion_mnist": load_fashion_mnist}
    if name not in loaders:
        raise ValueError(
            f"unknown offline image set {name!r}; choose one of {sorted(loaders)} "
            "(ImageNet: use load_imagenet_folder(root))"
        )
    return loaders[name](seed=seed, **kwargs)


def load_imagenet_folder(
    root: str | os.PathLike,
    split: str = "val",
    model: nn.Module | None = None,
    input_size: int = 224,
) -> Dataset:
    """An ImageNet-style ``root/<split>/<class>/*.JPEG`` folder with timm's standard eval transform.

    The transform (resize, centre crop, mean/std) comes from ``model``'s pretrained config when a timm
    model is given (``timm.data.resolve_data_config``), else timm's ImageNet defaults at
    ``input_size``. Class indices follow the sorted folder names, as torchvision's ``ImageFolder``
    does, which matches the 1k-class order when folders are the WordNet ids. Needs the data locally.
    """
    import timm.data
    from torchvision.datasets import ImageFolder

    path = Path(root) / split
    if not path.is_dir():
        raise FileNotFoundError(
            f"ImageNet folder {path} not found: expected {Path(root)}/{split}/<wnid>/<image> (ImageFolder layout). "
            "ImageNet is not downloadable here; offline, use load_fashion_mnist() or load_digits_dataset()."
        )
    if model is not None:
        cfg = timm.data.resolve_data_config({}, model=model)
    else:
        cfg = timm.data.resolve_data_config({"input_size": (3, input_size, input_size)})
    transform = timm.data.create_transform(**cfg, is_training=False)
    return ImageFolder(str(path), transform=transform)


def _batches(
    data: DataLoader | Dataset | tuple[Tensor, Tensor] | Iterable, batch_size: int
) -> Iterable[tuple[Tensor, Tensor]]:
    if isinstance(data, tuple) and len(data) == 2 and isinstance(data[0], Tensor):
        x, y = data
        for i in range(0, len(x), batch_size):
            yield x[i : i + batch_size], y[i : i + batch_size]
    elif isinstance(data, TensorDataset):
        yield from _batches(tuple(data.tensors[:2]), batch_size)
    elif isinstance(data, Dataset):
        yield from DataLoader(data, batch_size=batch_size, shuffle=False)
    else:
        yield from data


def top1(
    model: nn.Module,
    data: DataLoader | Dataset | tuple[Tensor, Tensor],
    batch_size: int = 512,
    progress: bool = False,
) -> float:
    """Top-1 accuracy **in percent** (0-100) of ``model`` on a DataLoader, Dataset or ``(images, labels)``
    (:func:`topk_accuracy` with ``ks=(1,)``)."""
    return topk_accuracy(model, data, ks=(1,), batch_size=batch_size, progress=progress)[1]


@torch.no_grad()
def topk_accuracy(
    model: nn.Module,
    data: DataLoader | Dataset | tuple[Tensor, Tensor],
    ks: tuple[int, ...] = (1, 5),
    batch_size: int = 512,
    progress: bool = False,
) -> dict[int, float]:
    """Top-k accuracy **in percent** for every ``k`` in ``ks``, in one pass: ``{k: percent}``. A sample counts for
    ``k`` when its label is among the ``k`` largest logits (ties broken by ``torch.topk``).

    Runs in eval mode under ``no_grad`` on the model's device and restores the previous train/eval
    mode afterwards. An empty data set, or a ``k`` above the number of classes, raises ``ValueError`` rather
    than returning a silent number.
    """
    if not ks or min(ks) < 1:
        raise ValueError(f"topk_accuracy: ks={ks} must be positive integers")
    was_training = model.training
    model.eval()
    try:
        param = next(model.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
        dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
        batches = _batches(data, batch_size)
        if progress:
            from tqdm.auto import tqdm

            batches = tqdm(batches, desc="top-k", leave=False)
        correct = dict.fromkeys(ks, 0)
        total = 0
        for x, y in batches:
            logits = model(x.to(device=device, dtype=dtype))
            if max(ks) > logits.shape[-1]:
                raise ValueError(f"topk_accuracy: k={max(ks)} but the model has {logits.shape[-1]} classes")
            top = logits.topk(max(ks), dim=-1).indices.cpu()
            hit = top == y.view(-1, 1)
            for k in ks:
                correct[k] += int(hit[:, :k].any(dim=1).sum())
            total += len(y)
    finally:
        model.train(was_training)
    if total == 0:
        raise ValueError("top-k accuracy: the data set is empty")
    return {k: 100.0 * correct[k] / total for k in ks}
