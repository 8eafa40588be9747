"""N:M masks, pruners (mask generators) and calibration statistics."""

from permsparse.sparsity.base import LayerStats, Pruner, PruneResult, apply_perm_mask
from permsparse.sparsity.calibration import (
    all_reduce_stats,
    collect_stats,
    collect_stats_sequential,
    default_forward,
    merge_stats,
    merge_stats_dicts,
)
from permsparse.sparsity.nm import NMPattern, check_nm, check_nm_shape, is_nm, nm_kept_score, nm_mask
from permsparse.sparsity.pruners import MagnitudePruner, RIAPruner, WandaPruner
from permsparse.sparsity.sparsegpt import SparseGPTPruner

__all__ = [
    "NMPattern",
    "nm_mask",
    "check_nm_shape",
    "check_nm",
    "is_nm",
    "nm_kept_score",
    "LayerStats",
    "PruneResult",
    "Pruner",
    "apply_perm_mask",
    "MagnitudePruner",
    "WandaPruner",
    "RIAPruner",
    "SparseGPTPruner",
    "collect_stats",
    "collect_stats_sequential",
    "default_forward",
    "merge_stats",
    "merge_stats_dicts",
    "all_reduce_stats",
]
