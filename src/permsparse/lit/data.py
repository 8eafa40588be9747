"""Data modules: one object per evaluation protocol, giving calibration batches, training and validation
loaders for the learned permutation, and the evaluation that every method is scored by.

Interface used by :mod:`permsparse.run` (any new data module implements it):
``calibration_batches(n, batch_size)``, ``train_dataloader(n, batch_size, seq_len)``,
``val_dataloader(n, batch_size, seq_len)``, ``evaluate(model, batch_size, progress) -> {metric: value}``,
``forward(model, batch)`` (for calibration hooks) and ``describe() -> dict`` (recorded in results.json).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import pytorch_lightning as pl
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import DataLoader, DistributedSampler, Subset, TensorDataset

from permsparse.errors import ConfigError

__all__ = ["ImageDataModule", "MixtureTextDataModule", "ResumableSampler", "TextDataModule"]


class ResumableSampler(DistributedSampler):
    """Training order that a resumed run can continue mid-epoch: the same seeded order as the interrupted run,
    from the first sample it had not trained on.

    The order of epoch ``e`` is a permutation seeded by ``seed + e``; under DDP (an initialised process group)
    each rank takes every ``world_size``-th index of it, padded to equal length as :class:`DistributedSampler`
    does. Being a ``DistributedSampler``, Lightning does not replace it under DDP. :meth:`skip` drops the
    first ``n`` indices of this rank's next iteration (the checkpointing callback calls it on resume).
    """

    def __init__(self, length: int, seed: int = 0, shuffle: bool = True) -> None:
        # No super().__init__: that needs the process group, which DDP only creates inside ``trainer.fit``.
        if length < 1:
            raise ValueError(f"ResumableSampler needs at least one sample, got {length}")
        self.length, self.seed, self.shuffle = length, seed, shuffle
        self.epoch, self.drop_last, self._skip = 0, False, 0

    @property
    def num_replicas(self) -> int:
        return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1

    @property
    def rank(self) -> int:
        return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0

    def __len__(self) -> int:
        return math.ceil(self.length / self.num_replicas)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def skip(self, n: int) -> None:
        """Start this rank's next iteration ``n`` samples in (resuming mid-epoch)."""
        self._skip = max(int(n), 0)

    def __iter__(self) -> Iterator[int]:
        if self.shuffle:
            order = torch.randperm(self.length, generator=torch.Generator().manual_seed(self.seed + self.epoch))
        else:
            order = torch.arange(self.length)
        world = self.num_replicas
        total = len(self) * world
        if total > self.length:  # pad by repeating the start, as DistributedSampler does
            order = torch.cat([order, order[: total - self.length]])
        mine = order[self.rank:total:world].tolist()
        start, self._skip = self._skip, 0
        return iter(mine[start:])


def _check_count(what: str, n: int, available: int) -> None:
    if n < 1:
        raise ValueError(f"{what}: asked for {n} samples; it must be >= 1")
    if n > available:
        raise ValueError(f"{what}: asked for {n} samples but only {available} are available")


class ImageDataModule(pl.LightningDataModule):
    """Image classification: calibration and training from the train split, validation from a held-out
    part of it, top-1 and top-5 on the test split (ImageNet: the ``val`` folder).

    ImageNet images go through the evaluation transform of the model the run holds (resize, crop, mean and std
    from its timm pretrained config), once :meth:`bind_model` has been given it; the run does so right after it
    loads the model. Without a bound model, timm's ImageNet defaults at 224 pixels apply.
    """

    def __init__(self, dataset: str = "digits", root: str | None = None, seed: int = 0, num_workers: int = 0) -> None:
        super().__init__()
        self.dataset, self.root, self.seed, self.num_workers = dataset, root, seed, num_workers
        self._splits: Any = None
        self._model: nn.Module | None = None

    def bind_model(self, model: nn.Module) -> None:
        """Use ``model``'s own evaluation transform for ImageNet folders (before the first read)."""
        self._model = model

    def _load(self) -> Any:
        if self._splits is None:
            if self.dataset == "imagenet":
                from permsparse.data.vision import load_imagenet_folder

                if not self.root:
                    raise ValueError("dataset=imagenet needs dataset.datamodule.root=/path/to/imagenet (ImageFolder)")
                self._splits = {"train": load_imagenet_folder(self.root, "train", model=self._model),
                                "test": load_imagenet_folder(self.root, "val", model=self._model)}
                self._splits["val"] = self._splits["train"]
            else:
                from permsparse.data.vision import load_image_dataset

                splits = load_image_dataset(self.dataset, seed=self.seed)
                self._splits = {"train": splits.train, "val": splits.val, "test": splits.test}
        return self._splits

    def _subset(self, split: str, n: int, offset: int = 0) -> Subset:
        splits = self._load()
        data = splits[split]
        _check_count(f"{self.dataset} {split} split", offset + n, len(data))
        order = torch.randperm(len(data), generator=torch.Generator().manual_seed(self.seed + 1))
        if split == "val" and data is splits["train"]:
            # ImageNet has no val split of its own: validation takes the end of the seeded order, training and
            # calibration its start, so the two do not overlap while together they fit the train folder
            return Subset(data, order.flip(0)[offset:offset + n].tolist())
        return Subset(data, order[offset:offset + n].tolist())

    def calibration_batches(self, n: int, batch_size: int) -> list[tuple[Tensor, Tensor]]:
        return list(DataLoader(self._subset("train", n), batch_size=batch_size, shuffle=False))

    def train_dataloader(self, n: int = 1024, batch_size: int = 64, seq_len: int | None = None) -> DataLoader:
        return DataLoader(self._subset("train", n), batch_size=batch_size, sampler=ResumableSampler(n, self.seed),
                          num_workers=self.num_workers)

    def val_dataloader(self, n: int = 256, batch_size: int = 64, seq_len: int | None = None) -> DataLoader:
        return DataLoader(self._subset("val", n), batch_size=batch_size, shuffle=False)

    @staticmethod
    def forward(model: nn.Module, batch: Any) -> Tensor:
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        param = next(model.parameters())
        return model(x.to(param.device, param.dtype))

    @torch.no_grad()
    def evaluate(self, model: nn.Module, batch_size: int = 256, progress: bool = True) -> dict[str, float]:
        from permsparse.data.vision import topk_accuracy

        classes = getattr(model, "num_classes", None)
        ks = (1,) if classes is not None and classes < 5 else (1, 5)
        acc = topk_accuracy(model, self._load()["test"], ks=ks, batch_size=batch_size, progress=progress)
        return {f"top{k}": v for k, v in acc.items()}

    def describe(self) -> dict:
        splits = self._load()
        out = {"dataset": self.dataset, "seed": self.seed,
               "metric": "top1 and top5 (percent) on the test split",
               **{f"{k}_size": len(v) for k, v in splits.items()}}
        test = splits["test"]
        if hasattr(test, "transform") and test.transform is not None:
            out["eval_transform"] = repr(test.transform)
        return out


class TextDataModule(pl.LightningDataModule):
    """Causal LM text protocol (``shakespeare`` offline; ``wikitext2``/``c4`` from the hub).

    Calibration and training windows are seeded random ``seq_len`` windows of the first 90 % of the
    tokens (the last 5 % of that region is kept for validation windows); evaluation is perplexity on
    the first ``eval_windows`` non-overlapping windows of the last 10 %, plus ``second_domain``.

    ``eval_corpus`` evaluates on another corpus's eval range instead of ``corpus``'s own (the Wanda / SparseGPT
    convention: calibrate and learn on C4, report WikiText-2 test perplexity); the metric is then
    ``ppl_<eval_corpus>`` and ``corpus``'s eval range is never read.
    """

    def __init__(self, tokenizer: Any, corpus: str = "shakespeare", seq_len: int = 512, eval_windows: int | None = 32,
                 second_domain: str | None = "pydoc", second_domain_windows: int = 16, seed: int = 0,
                 val_fraction: float = 0.05, eval_corpus: str | None = None) -> None:
        super().__init__()
        from permsparse.data.text import CORPORA

        if eval_corpus is not None and eval_corpus not in CORPORA:
            raise ConfigError(f"dataset.datamodule.eval_corpus={eval_corpus!r} is not a corpus; choose one of {CORPORA}")
        if eval_corpus is not None and eval_corpus in (corpus, second_domain):
            raise ConfigError(f"dataset.datamodule.eval_corpus={eval_corpus!r} is already the "
                             f"{'corpus' if eval_corpus == corpus else 'second_domain'}; set it to null or to "
                             "another corpus")
        self.tokenizer, self.corpus, self.seq_len = tokenizer, corpus, seq_len
        self.eval_windows, self.second_domain, self.second_domain_windows = eval_windows, second_domain, second_domain_windows
        self.seed, self.val_fraction, self.eval_corpus = seed, val_fraction, eval_corpus
        self._ids: dict[str, Tensor] | None = None

    @property
    def evaluated_corpus(self) -> str:
        """The corpus whose eval range gives the main perplexity (``eval_corpus``, else ``corpus``)."""
        return self.eval_corpus or self.corpus

    def _load(self) -> dict[str, Tensor]:
        if self._ids is None:
            from permsparse.data import text

            split = text.load_token_split(self.corpus, self.tokenizer)
            self._ids = dict(zip(("train", "val", "eval"), self._train_val_eval(split), strict=True))
            if self.eval_corpus:
                self._ids["eval"] = text.load_token_split(self.eval_corpus, self.tokenizer).eval
            if self.second_domain:
                self._ids["second"] = text.load_token_split(self.second_domain, self.tokenizer).eval
        return self._ids

    def _train_val_eval(self, split: Any) -> tuple[Tensor, Tensor, Tensor]:
        """A corpus's train range without its last ``val_fraction`` (training, calibration), that last part
        (validation) and its eval range."""
        n_val = int(len(split.train) * self.val_fraction)
        return split.train[: len(split.train) - n_val], split.train[len(split.train) - n_val:], split.eval

    def _windows(self, split: str, n: int, seq_len: int | None, seed_offset: int) -> Tensor:
        from permsparse.data.text import train_windows

        return train_windows(self._load()[split], n, seq_len or self.seq_len, seed=self.seed + seed_offset)

    def calibration_batches(self, n: int, batch_size: int) -> list[Tensor]:
        return list(self._windows("train", n, None, 0).split(batch_size))

    def train_dataloader(self, n: int = 64, batch_size: int = 4, seq_len: int | None = None) -> DataLoader:
        return DataLoader(TensorDataset(self._windows("train", n, seq_len, 1)), batch_size=batch_size,
                          sampler=ResumableSampler(n, self.seed))

    def val_dataloader(self, n: int = 8, batch_size: int = 4, seq_len: int | None = None) -> DataLoader:
        return DataLoader(TensorDataset(self._windows("val", n, seq_len, 2)), batch_size=batch_size, shuffle=False)

    @staticmethod
    def forward(model: nn.Module, batch: Any) -> Any:
        ids = batch[0] if isinstance(batch, (tuple, list)) else batch
        return model(input_ids=ids.to(next(model.parameters()).device))

    def eval_sets(self) -> dict[str, Tensor]:
        """``{metric name: (n, seq_len) token windows}`` that :meth:`evaluate` scores by perplexity, in its order
        (the streamed run scores the same windows block by block, :mod:`permsparse.streaming`)."""
        from permsparse.data.text import eval_windows

        ids = self._load()
        out = {f"ppl_{self.evaluated_corpus}": eval_windows(ids["eval"], self.eval_windows, self.seq_len)}
        if "second" in ids:
            out[f"ppl_{self.second_domain}"] = eval_windows(ids["second"], self.second_domain_windows, self.seq_len)
        return out

    @torch.no_grad()
    def evaluate(self, model: nn.Module, batch_size: int = 4, progress: bool = True) -> dict[str, float]:
        from permsparse.data.text import perplexity

        return {name: perplexity(model, windows, batch_size=batch_size, progress=progress)
                for name, windows in self.eval_sets().items()}

    def describe(self) -> dict:
        ids = self._load()
        return {
            "corpus": self.corpus, "eval_corpus": self.evaluated_corpus, "seq_len": self.seq_len,
            "eval_windows": self.eval_windows,
            "second_domain": self.second_domain, "second_domain_windows": self.second_domain_windows,
            "seed": self.seed, "tokenizer": getattr(self.tokenizer, "name_or_path", type(self.tokenizer).__name__),
            "tokens": {k: int(v.numel()) for k, v in ids.items()},
            "protocol": "calibration/training: seeded random windows of the first 90 % of tokens (its last "
                        f"{self.val_fraction:.0%} for validation); evaluation: first non-overlapping windows of "
                        + (f"{self.eval_corpus}'s eval range" if self.eval_corpus else "the last 10 %"),
        }


class MixtureTextDataModule(TextDataModule):
    """The generalisation protocol: calibrate, learn and validate on a mixture of text sources; score on each
    source's own held-out tail and on held-out domains that nothing before the evaluation ever reads.

    Each source is split like the Shakespeare protocol (first 90 % of its tokens for calibration and training,
    the last 5 % of that region for validation, the last 10 % for in-domain evaluation). A request for ``n``
    windows takes ``n / len(sources)`` from every source (the remainder from the first ones), each seeded, and
    interleaves them in a seeded order, so every batch mixes the sources. The held-out domains are used whole,
    for evaluation only (docs/protocols.md).

    ``evaluate`` returns ``ppl_<domain>`` for every held-out domain first, then ``ppl_<source>`` for every source;
    ``eval_windows=0`` leaves the sources' own perplexities out (the offline miniatures score the held-out domains
    only, which is most of a run's time saved).

    ``validation_source`` (one of ``sources``) makes the run a leave-one-source-out fold: that source is taken out
    of calibration and learning, and validation draws from it alone, so the learned run's validation loss
    measures transfer to text it did not learn on, without touching a held-out domain (how settings are chosen,
    docs/protocols.md). Evaluation still scores every source.
    """

    def __init__(self, tokenizer: Any, sources: list[str] | tuple[str, ...] = ("shakespeare", "kjv", "debian_reference"),
                 held_out: list[str] | tuple[str, ...] = ("pydoc", "manpages"), seq_len: int = 512,
                 eval_windows: int = 8, held_out_windows: int = 16, seed: int = 0, val_fraction: float = 0.05,
                 validation_source: str | None = None) -> None:
        super().__init__(tokenizer, corpus="mixture", seq_len=seq_len, eval_windows=eval_windows, second_domain=None,
                         seed=seed, val_fraction=val_fraction)
        self.sources, self.held_out, self.held_out_windows = list(sources), list(held_out), held_out_windows
        if not self.sources:
            raise ConfigError("dataset.datamodule.sources is empty; name at least one training source")
        self.validation_source = validation_source or None
        if self.validation_source is not None:
            if self.validation_source not in self.sources:
                raise ConfigError(f"dataset.datamodule.validation_source={self.validation_source!r} is not one of the "
                                  f"sources {self.sources}; a held-out domain may never be validated on")
            if len(self.sources) < 2:
                raise ConfigError("dataset.datamodule.validation_source needs at least two sources: one to validate "
                                  "on and one to calibrate and learn on")
        overlap = sorted(set(self.sources) & set(self.held_out))
        if overlap:
            raise ConfigError(f"dataset.datamodule: {overlap} is both a training source and a held-out domain; a "
                              "held-out domain must never be read before evaluation")
        if len(set(self.sources)) != len(self.sources) or len(set(self.held_out)) != len(self.held_out):
            raise ConfigError("dataset.datamodule: a source or held-out domain is listed twice")
        if eval_windows < 0 or held_out_windows < 1:
            raise ConfigError(f"dataset.datamodule: eval_windows={eval_windows} must be >= 0 (0 scores no source) and "
                              f"held_out_windows={held_out_windows} >= 1")
        if eval_windows == 0 and not self.held_out:
            raise ConfigError("dataset.datamodule: eval_windows=0 and no held_out domain leaves nothing to evaluate; "
                              "name a held-out domain or score the sources (eval_windows >= 1)")

    def _load(self) -> dict[str, Tensor]:
        if self._ids is None:
            from permsparse.data import text

            ids: dict[str, Tensor] = {}
            for source in self.sources:
                split = text.load_token_split(source, self.tokenizer, train_fraction=0.9)
                for part, tokens in zip(("train", "val", "eval"), self._train_val_eval(split), strict=True):
                    ids[f"{part}:{source}"] = tokens
            for domain in self.held_out:
                ids[f"held:{domain}"] = text.load_token_split(domain, self.tokenizer, train_fraction=0.0).eval
            self._ids = ids
        return self._ids

    def _windows(self, split: str, n: int, seq_len: int | None, seed_offset: int) -> Tensor:
        from permsparse.data.text import train_windows

        ids, sources = self._load(), self._sources_for(split)
        k = len(sources)
        # Seeds follow a source's place in ``sources``, so a source's windows are seeded alike in a fold and in the
        # full mixture.
        parts = [train_windows(ids[f"{split}:{source}"], n // k + (i < n % k), seq_len or self.seq_len,
                               seed=self.seed + seed_offset + 1000 * self.sources.index(source))
                 for i, source in enumerate(sources)]
        windows = torch.cat(parts)
        order = torch.randperm(len(windows), generator=torch.Generator().manual_seed(self.seed + seed_offset + 7))
        return windows[order]

    def _sources_for(self, split: str) -> list[str]:
        """The sources a split draws from: all of them, or in a fold the validation source for validation and
        the others for calibration and training."""
        if self.validation_source is None:
            return self.sources
        if split == "val":
            return [self.validation_source]
        return [s for s in self.sources if s != self.validation_source]

    def eval_sets(self) -> dict[str, Tensor]:
        from permsparse.data.text import eval_windows

        ids = self._load()
        out = {f"ppl_{domain}": eval_windows(ids[f"held:{domain}"], self.held_out_windows, self.seq_len)
               for domain in self.held_out}
        for source in self.sources if self.eval_windows else ():
            out[f"ppl_{source}"] = eval_windows(ids[f"eval:{source}"], self.eval_windows, self.seq_len)
        return out

    def describe(self) -> dict:
        ids = self._load()
        return {
            "corpus": "mixture", "sources": self.sources, "held_out": self.held_out, "seq_len": self.seq_len,
            "validation_source": self.validation_source,
            "eval_windows": self.eval_windows, "held_out_windows": self.held_out_windows, "seed": self.seed,
            "tokenizer": getattr(self.tokenizer, "name_or_path", type(self.tokenizer).__name__),
            "tokens": {k: int(v.numel()) for k, v in ids.items()},
            "protocol": "calibration/training: seeded random windows, an equal share from the first 90 % of every "
                        f"source (its last {self.val_fraction:.0%} for validation); evaluation: the first "
                        "non-overlapping windows of every held-out domain (never read before) and of every "
                        "source's last 10 %",
        }
