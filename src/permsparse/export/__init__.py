"""Deployment (docs/method.md §6): fold permutations into weights, runtime gathers, save, verify, 2:4 kernels.

Primary API: ``export_model(model, report.perms, pattern, out_dir)`` on a model pruned by ``prune_model``;
``load_exported(out_dir)`` rebuilds it; :func:`permsparse.runs.export_run` (``python -m permsparse.export <run dir>``)
exports a finished run folder. ``fold_model`` does the folding in memory; ``to_semi_structured`` turns the
deployed 2:4 linears into PyTorch's semi-structured sparse tensors on Ampere+ GPUs.

The ``q,k,v``/``qkv``, ``gate,up`` and ``fc1`` permutations (readers of the residual stream) fold only when
they are one shared permutation (``perm.residual=shared``): ``fold_residual_permutation`` then stores the
residual stream permuted; otherwise those layers get a runtime gather. Which permutations fold is permutation
algebra, in :mod:`permsparse.permutation.foldable` and :mod:`permsparse.permutation.heads`.
"""

from permsparse.export.export import (
    EXPORT_FAMILIES,
    PRUNED_STATE,
    REFERENCE,
    SIDECAR,
    ExportFamily,
    ExportResult,
    ExportVerificationError,
    example_inputs,
    export_model,
    load_exported,
    load_pruned_state,
    model_outputs,
    register_export_family,
    save_pruned_state,
    verify_outputs,
)
from permsparse.export.fold import (
    FoldReport,
    GroupFold,
    check_deployed_nm,
    check_pruned_nm,
    fold_model,
    plan_fold,
)
from permsparse.export.gather import PermutedLinear, find_gathers, insert_gather, remove_gather
from permsparse.export.kernels import semi_structured_support, to_semi_structured
from permsparse.export.residual import fold_residual_permutation, residual_groups, shared_residual_perm

__all__ = [
    "EXPORT_FAMILIES",
    "PRUNED_STATE",
    "REFERENCE",
    "SIDECAR",
    "ExportFamily",
    "ExportResult",
    "ExportVerificationError",
    "FoldReport",
    "GroupFold",
    "PermutedLinear",
    "check_deployed_nm",
    "check_pruned_nm",
    "example_inputs",
    "export_model",
    "find_gathers",
    "fold_residual_permutation",
    "fold_model",
    "insert_gather",
    "load_exported",
    "load_pruned_state",
    "model_outputs",
    "plan_fold",
    "register_export_family",
    "remove_gather",
    "residual_groups",
    "save_pruned_state",
    "semi_structured_support",
    "shared_residual_perm",
    "to_semi_structured",
    "verify_outputs",
]
