"""Offline data sets and evaluation protocols: text corpora and windows (``text``), images (``vision``)."""

from permsparse.data.text import (
    CORPORA,
    HUB_CORPORA,
    OFFLINE_CORPORA,
    TokenSplit,
    cache_dir,
    encode_text,
    eval_windows,
    load_corpus,
    load_token_split,
    perplexity,
    tokenize_corpus,
    train_windows,
)
from permsparse.data.vision import (
    FASHION_MNIST_ROOT,
    ImageSplits,
    load_digits_dataset,
    load_fashion_mnist,
    load_image_dataset,
    load_imagenet_folder,
    top1,
)

__all__ = [
    "CORPORA",
    "HUB_CORPORA",
    "OFFLINE_CORPORA",
    "TokenSplit",
    "cache_dir",
    "encode_text",
    "eval_windows",
    "load_corpus",
    "load_token_split",
    "perplexity",
    "tokenize_corpus",
    "train_windows",
    "FASHION_MNIST_ROOT",
    "ImageSplits",
    "load_digits_dataset",
    "load_fashion_mnist",
    "load_image_dataset",
    "load_imagenet_folder",
    "top1",
]
