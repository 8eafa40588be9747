"""SparseGPT N:M pruning (Frantar & Alistarh, 2023) with an optional input-channel permutation.

Follows the reference ``fasterprune`` (IST-DASLab/sparsegpt): ``H = 2 X^T X / n``, dead channels
(zero diagonal) get ``H_jj = 1`` and a zero weight column, 1 % mean-diagonal damping, upper
Cholesky factor ``U`` of ``H^-1``, columns in blocks of ``blocksize``; at every M-th column the
N:M mask of the next M columns keeps the N largest ``w^2 / U_jj^2`` (the reference prunes the
M - N smallest; we keep N, ties to the lower index), and each pruned column's error is propagated
to the later columns. Computation runs in ``dtype`` (default float32, as the reference; pass
``torch.float64`` for small layers or ill-conditioned Hessians). A float32 Cholesky failure is
retried once in float64.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

from permsparse.sparsity.base import LayerStats, Pruner, PruneResult
from permsparse.sparsity.nm import NMPattern, check_nm_shape

__all__ = ["SparseGPTPruner"]


class SparseGPTPruner(Pruner):
    """OBS-based N:M pruner that also rewrites the kept weights to compensate the pruned ones."""

    needs_stats = True
    needs_hessian = True
    updates_weights = True

    def __init__(
        self, blocksize: int = 128, percdamp: float = 0.01, dtype: torch.dtype = torch.float32
    ) -> None:
        if blocksize < 1:
            raise ValueError(f"sparsegpt: blocksize must be >= 1, got {blocksize}")
        if percdamp < 0:
            raise ValueError(f"sparsegpt: percdamp must be >= 0, got {percdamp}")
        if not dtype.is_floating_point:
            raise ValueError(f"sparsegpt: dtype must be a floating type, got {dtype}")
        self.blocksize = int(blocksize)
        self.percdamp = float(percdamp)
        self.dtype = dtype

    def __repr__(self) -> str:
        return f"SparseGPTPruner(blocksize={self.blocksize}, percdamp={self.percdamp}, dtype={self.dtype})"

    # ------------------------------------------------------------------ Hessian helpers
    def _hessian(
        self, stats: LayerStats, d_in: int, device: torch.device, name: str
    ) -> tuple[Tensor, Tensor]:
        """Damped ``H = 2 X^T X / n`` in ``self.dtype`` and the boolean mask of dead channels."""
        stats = self._require_stats(stats, hessian=True)
        assert stats.hessian is not None
        if stats.hessian.shape != (d_in, d_in):
            raise ValueError(
                f"{name}: Hessian has shape {tuple(stats.hessian.shape)} but the weight has d_in={d_in}"
            )
        if stats.count <= 0:
            raise ValueError(f"{name}: calibration statistics hold no tokens (count={stats.count})")
        h = stats.hessian.to(device=device, dtype=self.dtype) * (2.0 / stats.count)
        diag_idx = torch.arange(d_in, device=device)
        dead = h.diagonal() == 0
        h[diag_idx[dead], diag_idx[dead]] = 1.0
        damp = self.percdamp * h.diagonal().mean()
        h[diag_idx, diag_idx] += damp
        return h, dead

    def _hinv_upper(self, h: Tensor, name: str) -> Tensor:
        """Upper Cholesky factor ``U`` of ``H^-1`` (``H^-1 = U^T U``); retries a float32 failure in float64."""
        dtypes = [h.dtype] if h.dtype == torch.float64 else [h.dtype, torch.float64]
        for dtype in dtypes:
            chol, info = torch.linalg.cholesky_ex(h.to(dtype))
            if int(info) == 0:
                upper, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(chol), upper=True)
                if int(info) == 0:
                    return upper.to(h.dtype)
            if dtype != torch.float64:
                warnings.warn(
                    f"{name}: Cholesky failed in {dtype}; retrying in float64", RuntimeWarning, stacklevel=3
                )
        raise ValueError(
            f"{name}: the damped Hessian is not positive definite; increase percdamp (now {self.percdamp})"
        )

    # ------------------------------------------------------------------ Pruner interface
    def score(self, weight: Tensor, stats: LayerStats | None) -> Tensor:
        """OBS saliency ``w_ij^2 / [H^-1]_jj`` of removing one weight, in ``self.dtype``.

        Uses the full diagonal of the damped ``H^-1`` (not the order-dependent Cholesky diagonal that
        ``prune`` uses column by column), so the score is equivariant under channel permutations and
        can drive permutation search. Dead channels score 0.
        """
        if weight.dim() != 2:
            raise ValueError(f"sparsegpt: expected a 2-D weight, got shape {tuple(weight.shape)}")
        stats = self._require_stats(stats, hessian=True)
        h, dead = self._hessian(stats, weight.shape[1], weight.device, "sparsegpt")
        chol, info = torch.linalg.cholesky_ex(h.to(torch.float64))
        if int(info) != 0:
            raise ValueError(
                f"sparsegpt: the damped Hessian is not positive definite; increase percdamp (now {self.percdamp})"
            )
        hinv_diag = torch.cholesky_inverse(chol).diagonal().to(self.dtype)
        w = weight.detach().to(self.dtype).clone()
        w[:, dead] = 0
        return w.pow(2) / hinv_diag.unsqueeze(0)

    def prune(
        self,
        weight: Tensor,
        stats: LayerStats | None,
        pattern: NMPattern | str,
        perm: Tensor | None = None,
        name: str = "tensor",
    ) -> PruneResult:
        """SparseGPT N:M in the order ``perm`` (if given); mask and new weight in original channel order."""
        pattern = NMPattern.parse(pattern)
        check_nm_shape(weight.shape, pattern, name)
        if self.blocksize % pattern.m != 0:
            raise ValueError(
                f"{name}: sparsegpt blocksize={self.blocksize} must be a multiple of M={pattern.m} "
                f"(pattern {pattern}) so that no N:M group straddles two blocks"
            )
        stats = self._require_stats(stats, hessian=True)
        d_out, d_in = weight.shape
        device = weight.device
        h, dead = self._hessian(stats, d_in, device, name)
        w = weight.detach().to(self.dtype).clone()
        if perm is not None:
            perm = torch.as_tensor(perm, device=device, dtype=torch.long)
            if perm.shape != (d_in,) or not torch.equal(
                perm.sort().values, torch.arange(d_in, device=device)
            ):
                raise ValueError(f"{name}: perm must be a permutation of range({d_in})")
            w = w[:, perm]
            h = h[perm][:, perm]
            dead = dead[perm]
        w[:, dead] = 0
        if not torch.isfinite(w).all():
            raise ValueError(f"{name}: the weight contains NaN or Inf; cannot prune it")
        hinv = self._hinv_upper(h, name)

        m = pattern.m
        pruned = torch.ones(d_out, d_in, dtype=torch.bool, device=device)  # set to False where kept
        for i1 in range(0, d_in, self.blocksize):
            i2 = min(i1 + self.blocksize, d_in)
            count = i2 - i1
            w1 = w[:, i1:i2].clone()
            q1 = torch.zeros_like(w1)
            err1 = torch.zeros_like(w1)
            hinv1 = hinv[i1:i2, i1:i2]
            d1 = hinv1.diagonal()
            pruned1 = pruned[:, i1:i2]
            for i in range(count):
                col = w1[:, i]
                d = d1[i]
                if i % m == 0:
                    saliency = w1[:, i : i + m].pow(2) / d1[i : i + m].pow(2).unsqueeze(0)
                    # keep the N largest; a stable descending sort breaks ties towards the lower index
                    # (no host sync here, unlike nm_mask's finiteness check: checked once below)
                    order = torch.sort(saliency, dim=1, descending=True, stable=True).indices
                    pruned1[:, i : i + m].scatter_(1, order[:, : pattern.n], False)
                q = torch.where(pruned1[:, i], torch.zeros_like(col), col)
                q1[:, i] = q
                err = (col - q) / d
                w1[:, i:] -= err.unsqueeze(1) * hinv1[i, i:].unsqueeze(0)
                err1[:, i] = err
            w[:, i1:i2] = q1
            w[:, i2:] -= err1 @ hinv[i1:i2, i2:]

        if not torch.isfinite(w).all():
            raise ValueError(f"{name}: sparsegpt produced NaN/Inf weights (non-finite weight or Hessian?)")
        mask = ~pruned
        new_weight = torch.where(mask, w, torch.zeros_like(w)).to(weight.dtype)
        if perm is not None:
            mask_orig = torch.empty_like(mask)
            mask_orig[:, perm] = mask
            weight_orig = torch.empty_like(new_weight)
            weight_orig[:, perm] = new_weight
            mask, new_weight = mask_orig, weight_orig
        return PruneResult(mask=mask, weight=new_weight)
