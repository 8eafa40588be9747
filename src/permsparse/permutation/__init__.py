"""Permutation methods and their algebra: greedy channel swap, RIA CP, the learned method (costs, Sinkhorn,
Hungarian), efficacy, head restriction and foldability. Plain PyTorch; nothing here needs a config.

Submodules are imported on demand (``from permsparse.permutation.sinkhorn import log_sinkhorn``); the names
below are the ones most callers want.
"""

from permsparse.permutation.base import Identity, PermutationMethod, WrappedMethod, invert, is_permutation
from permsparse.permutation.channel_swap import GreedyChannelSwap
from permsparse.permutation.learned import LearnedPermutation, LearnedPermutations
from permsparse.permutation.ria_cp import RIAChannelPermutation

__all__ = ["Identity", "PermutationMethod", "WrappedMethod", "invert", "is_permutation", "GreedyChannelSwap",
           "LearnedPermutation", "LearnedPermutations", "RIAChannelPermutation"]
