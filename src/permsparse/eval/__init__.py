"""Evaluation helpers: reading results and offline W&B runs."""
