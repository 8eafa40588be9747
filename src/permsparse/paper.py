"""The paper's tables: their layout, which runs fill each cell, and the paper's own numbers.

The numbers are those reported by Li, Liu et al., *Learnable Permutation for Structured Sparsity on Transformer
Models* (AAAI 2026, arXiv 2601.22980), one run each; docs/method.md §7 lists them in prose. Nothing here was
measured by permsparse. :mod:`permsparse.tables` fills the same layouts from run folders, and
``scripts/make_tables.py`` writes both side by side; the experiment that produces each table's runs is named by
:attr:`PaperTable.experiment` (``conf/experiment/``, docs/reproduction.md).

A cell is a row's and a column's ``match`` together: record fields (``model``, ``pattern``, ``pruner``, ``perm``)
and dotted config paths (``perm.method.groups``), each equal to the given value, read from the given phase of the
run's metrics (``dense``, ``identity``: the pruner without a permutation, ``pruned``). The metrics are ``top1`` /
``top5`` (percent), ``ppl`` (the run's first perplexity, WikiText-2 in the paper's runs), ``zeroshot`` (the mean
accuracy over :data:`ZEROSHOT_TASKS`, percent) and ``mmmu`` (lm-eval's ``mmmu_val`` accuracy, percent).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

__all__ = ["CITATION", "ZEROSHOT_TASKS", "MISSING_DEFAULTS", "Column", "Row", "PaperTable", "TABLES", "table"]

CITATION = ("Li, Liu et al., Learnable Permutation for Structured Sparsity on Transformer Models, AAAI 2026, "
            "arXiv 2601.22980")

#: the seven lm-eval tasks whose mean accuracy Table 2 reports (MMLU 5-shot, the others zero-shot)
ZEROSHOT_TASKS = ("arc_easy", "arc_challenge", "boolq", "hellaswag", "openbookqa", "winogrande", "mmlu")

#: the value a config path had in runs written before the key existed (the defaults of conf/perm/*.yaml)
MISSING_DEFAULTS: Mapping[str, Any] = MappingProxyType({
    "perm.foldable": False, "perm.residual": "per_layer", "perm.method.groups": 4, "perm.method.init": "identity",
    "perm.task_weight": 1.0, "perm.alpha": 1.0e-5, "perm.distill": "block_smooth_l1", "perm.method.kept_weight": 0.0,
    "perm.method.base": "none", "perm.method.mask_grad": False,
})

_EMPTY: Mapping[str, Any] = MappingProxyType({})


@dataclass(frozen=True)
class Column:
    """A column of a paper table: which runs and which phase of their metrics fill it."""

    name: str
    phase: str = "pruned"
    match: Mapping[str, Any] = field(default_factory=lambda: _EMPTY)


@dataclass(frozen=True)
class Row:
    """A row of a paper table: which runs it takes, and the paper's numbers ``{column: {metric: value}}``."""

    name: str
    match: Mapping[str, Any]
    paper: Mapping[str, Mapping[str, float]] = field(default_factory=lambda: _EMPTY)


@dataclass(frozen=True)
class PaperTable:
    """One table of the paper: its rows, columns and metrics, and the experiment that produces its runs."""

    key: str
    title: str
    experiment: str
    metrics: tuple[str, ...]
    columns: tuple[Column, ...]
    rows: tuple[Row, ...]
    note: str = ""

    def column(self, name: str) -> Column:
        return next(c for c in self.columns if c.name == name)


# The paper's settings of a permutation run: per-layer residual permutations, no foldable restriction; the learned
# method with G = 4, identity start, no heuristic frame, the constant mask (perm=learned_paper), the paper's loss
# (task cross-entropy and block SmoothL1 at alpha 1e-5) and no kept-score term. Pinned so that an ablation run (another G, another loss) never lands in a main table's cell.
_HEURISTIC = {"perm.foldable": False, "perm.residual": "per_layer"}
_LEARNED = {"pruner": "wanda", "perm": "learned", **_HEURISTIC, "perm.method.groups": 4,
            "perm.method.init": "identity", "perm.method.base": "none", "perm.method.mask_grad": False,
            "perm.task_weight": 1.0, "perm.alpha": 1.0e-5, "perm.distill": "block_smooth_l1",
            "perm.method.kept_weight": 0.0}


def _learned(**pins: Any) -> dict[str, Any]:
    return {**_LEARNED, **{k.replace("__", "."): v for k, v in pins.items()}}


_DENSE = Column("dense", "dense")
_WANDA = Column("Wanda", "identity", {"pruner": "wanda"})
_CP = Column("CP", "pruned", {"pruner": "wanda", "perm": "greedy", **_HEURISTIC})
_CP_RIA = Column("CP (RIA's permutation)", "pruned", {"pruner": "wanda", "perm": "ria", **_HEURISTIC})
_RIA = Column("RIA", "pruned", {"pruner": "ria", "perm": "ria", **_HEURISTIC})
_LEARNED_COLUMN = Column("learned", "pruned", _learned())


def _pairs(**cells: tuple[float, float] | None) -> dict[str, dict[str, float]]:
    """``column=(top1, top5)`` as ``{column: {"top1": ..., "top5": ...}}``."""
    return {k: {"top1": v[0], "top5": v[1]} for k, v in cells.items() if v is not None}


def _llm(**cells: tuple[float, float]) -> dict[str, dict[str, float]]:
    names = {"magnitude": "magnitude", "sparsegpt": "SparseGPT", "wanda": "Wanda", "cp": "CP", "ria": "RIA"}
    return {names.get(k, k): {"ppl": v[0], "zeroshot": v[1]} for k, v in cells.items()}


TABLE1 = PaperTable(
    key="table1", title="ImageNet-1k top-1 / top-5 (%) of ViTs at 50 % non-zero; the learned method on Wanda scores",
    experiment="paper_table1", metrics=("top1", "top5"),
    columns=(_DENSE, _CP, _CP_RIA, _WANDA, _RIA, _LEARNED_COLUMN),
    rows=(
        Row("ViT-B/16 2:4", {"model": "vit_b", "pattern": "2:4"},
            _pairs(dense=(79.1, 94.1), CP=(66.2, 86.4), Wanda=(65.8, 86.4), RIA=(66.6, 86.6), learned=(67.9, 87.9))),
        Row("ViT-B/16 4:8", {"model": "vit_b", "pattern": "4:8"},
            _pairs(CP=(66.8, 88.2), Wanda=(66.4, 86.6), RIA=(71.4, 89.9), learned=(71.8, 90.2))),
        Row("ViT-L/14 2:4", {"model": "vit_l", "pattern": "2:4"},
            _pairs(dense=(85.2, 97.9), CP=(79.5, 94.7), Wanda=(79.2, 95.2), RIA=(79.6, 95.1), learned=(80.7, 95.8))),
        Row("ViT-L/14 4:8", {"model": "vit_l", "pattern": "4:8"},
            _pairs(CP=(82.0, 96.4), Wanda=(82.0, 96.4), RIA=(82.3, 96.4), learned=(82.7, 96.5))),
    ),
    note="The paper gives no dense number on the 4:8 rows (the same dense model as 2:4). Its CP column is a channel "
         "permutation on Wanda scores; ours is the greedy channel swap, with RIA's permutation beside it.",
)

TABLE2 = PaperTable(
    key="table2", title="LLMs at 2:4: WikiText-2 perplexity and the mean accuracy (%) of seven lm-eval tasks",
    experiment="paper_table2", metrics=("ppl", "zeroshot"),
    columns=(_DENSE, Column("magnitude", "identity", {"pruner": "magnitude"}),
             Column("SparseGPT", "identity", {"pruner": "sparsegpt"}), _WANDA, _CP, _CP_RIA, _RIA, _LEARNED_COLUMN),
    rows=(
        Row("LLaMA-3.2-1B", {"model": "llama3_2_1b", "pattern": "2:4"},
            _llm(dense=(9.06, 46.68), magnitude=(4808, 28.49), sparsegpt=(32.20, 36.35), wanda=(75.76, 33.23),
                 cp=(68.17, 33.81), ria=(72.56, 33.83), learned=(45.32, 35.90))),
        Row("LLaMA-2-7B", {"model": "llama2_7b", "pattern": "2:4"},
            _llm(dense=(5.12, 57.26), magnitude=(52.00, 43.84), sparsegpt=(10.30, 47.43), wanda=(11.38, 45.14),
                 cp=(10.68, 45.20), ria=(10.52, 45.62), learned=(10.17, 46.17))),
    ),
    note="The accuracy is the mean of each task's acc over ARC-e, ARC-c, BoolQ, HellaSwag, OpenBookQA, WinoGrande "
         "(zero-shot) and MMLU (5-shot); a run without all seven has none. The magnitude and SparseGPT columns are "
         "those pruners without a permutation.",
)

_GROUPS = (1, 2, 4, 8, 16)
_EPOCHS = (0, 1, 2, 5, 10, 20)

TABLE3 = PaperTable(
    key="table3", title="A vision-language model at 2:4: MMMU accuracy (%), the language decoder pruned",
    experiment="paper_table3", metrics=("mmmu",),
    columns=(_DENSE, _WANDA, _RIA, _LEARNED_COLUMN),
    rows=(Row("Qwen2.5-VL-3B 2:4", {"model": "qwen2_5_vl_3b", "pattern": "2:4"},
              {"Wanda": {"mmmu": 37.2}, "RIA": {"mmmu": 37.3}, "learned": {"mmmu": 38.1}}),),
    note="MMMU is lm-eval's mmmu_val (the validation split, 900 questions with images). The paper gives no dense "
         "number.",
)

TABLE5 = PaperTable(
    key="table5_groups", title="Channel groups G of the learned permutation: LLaMA-2-7B 2:4, Wanda, WikiText-2 "
                               "perplexity", experiment="paper_table5_groups", metrics=("ppl",),
    columns=tuple(Column(f"G={g}", "pruned", _learned(perm__method__groups=g)) for g in _GROUPS),
    rows=(Row("LLaMA-2-7B 2:4", {"model": "llama2_7b", "pattern": "2:4"},
              {f"G={g}": {"ppl": v} for g, v in zip(_GROUPS, (10.11, 10.12, 10.17, 10.25, 10.63), strict=True)}),),
)

TABLE6 = PaperTable(
    key="table6_pruners", title="The learned permutation on other pruners' scores: LLaMA-2-7B 2:4, WikiText-2 "
                                "perplexity", experiment="paper_table6_pruners", metrics=("ppl",),
    columns=(Column("without", "identity"), Column("with", "pruned", {k: v for k, v in _LEARNED.items()
                                                                      if k != "pruner"})),
    rows=(
        Row("magnitude", {"model": "llama2_7b", "pattern": "2:4", "pruner": "magnitude"},
            {"without": {"ppl": 52.00}, "with": {"ppl": 45.82}}),
        Row("Wanda", {"model": "llama2_7b", "pattern": "2:4", "pruner": "wanda"},
            {"without": {"ppl": 11.38}, "with": {"ppl": 10.17}}),
        Row("RIA", {"model": "llama2_7b", "pattern": "2:4", "pruner": "ria"},
            {"without": {"ppl": 10.52}, "with": {"ppl": 10.02}}),
        Row("SparseGPT", {"model": "llama2_7b", "pattern": "2:4", "pruner": "sparsegpt"},
            {"without": {"ppl": 10.30}}),
    ),
    note="The paper reports magnitude and RIA; its Wanda row is Table 2's Wanda and learned entries, its SparseGPT "
         "'without' Table 2's SparseGPT. Its RIA 'without' is Table 2's RIA column, which includes RIA's channel "
         "permutation; ours is RIA's scores alone.",
)

TABLE7 = PaperTable(
    key="table7_loss", title="Loss terms of the learned permutation: LLaMA-3.2-1B 2:4, Wanda, WikiText-2 perplexity",
    experiment="paper_table7_loss", metrics=("ppl",),
    columns=(Column("CE only", "pruned", _learned(perm__alpha=0.0)),
             Column("distillation only", "pruned", _learned(perm__task_weight=0.0)),
             Column("both", "pruned", _learned())),
    rows=(Row("LLaMA-3.2-1B 2:4", {"model": "llama3_2_1b", "pattern": "2:4"},
              {"CE only": {"ppl": 46.15}, "distillation only": {"ppl": 52.58}, "both": {"ppl": 45.32}}),),
)

TABLE_EPOCHS = PaperTable(
    key="epochs", title="Training epochs of the learned permutation: LLaMA-2-7B 2:4, Wanda, WikiText-2 perplexity",
    experiment="paper_epochs", metrics=("ppl",),
    columns=(Column("0", "identity", {"pruner": "wanda"}),
             *(Column(str(e), "pruned", _learned(learning__max_epochs=e)) for e in _EPOCHS[1:])),
    rows=(Row("LLaMA-2-7B 2:4", {"model": "llama2_7b", "pattern": "2:4"},
              {str(e): {"ppl": v} for e, v in zip(_EPOCHS, (11.38, 10.56, 10.31, 10.27, 10.21, 10.17), strict=True)}),),
    note="Epoch 0 is plain Wanda (every learned run's identity phase).",
)

#: every table, in the paper's order
TABLES: tuple[PaperTable, ...] = (TABLE1, TABLE2, TABLE3, TABLE5, TABLE6, TABLE7, TABLE_EPOCHS)


def table(key: str) -> PaperTable:
    """The table named ``key`` (``table1``, ``table2``, ``table3``, ``table5_groups``, ``table6_pruners``, ``table7_loss``,
    ``epochs``)."""
    for t in TABLES:
        if t.key == key:
            return t
    raise KeyError(f"no paper table {key!r}; choose one of {', '.join(t.key for t in TABLES)}")
