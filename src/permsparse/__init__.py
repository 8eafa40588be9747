"""permsparse: N:M sparsity for Transformers with learned input-channel permutations."""

__version__ = "0.1.0"
