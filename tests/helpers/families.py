"""What every model family's tests check, shared by tests/test_discovery.py, tests/test_export.py and
tests/test_families.py: seeded permutations per group, "pruning leaves exactly N:M in every bound linear and
touches nothing else", and "a learned run of a few steps lowers its loss"."""

from __future__ import annotations

import functools
from collections.abc import Mapping

import pytorch_lightning as pl
import torch
from torch import nn

from permsparse.models import get_spec
from permsparse.models.binding import ValueRows
from permsparse.permutation.heads import restrict_to_heads
from permsparse.sparsity.nm import NMPattern, is_nm

__all__ = ["random_perms", "token_batches", "assert_exactly_nm_and_nothing_else", "learned_val_losses"]


def random_perms(model: nn.Module, seed: int = 0, o_mode: str = "within") -> dict[str, torch.Tensor]:
    """A seeded random permutation per group; o/proj ones ``within`` heads (GQA-tied) or ``arbitrary``."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for group in get_spec(model).groups(model):
        d_in = model.get_submodule(group.linears[0]).in_features
        perm = torch.randperm(d_in, generator=gen)
        if isinstance(group.producer, ValueRows) and o_mode == "within":
            perm = restrict_to_heads(perm, *group.producer.head_layout)
        out[group.name] = perm
    return out


def token_batches(n: int = 2, batch: int = 2, length: int = 16, vocab: int = 128) -> list[torch.Tensor]:
    """``n`` seeded batches of random token ids (calibration data for the tiny LMs)."""
    return [torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(i)) for i in range(n)]


def assert_exactly_nm_and_nothing_else(model: nn.Module, before: Mapping[str, torch.Tensor],
                                       perms: Mapping[str, torch.Tensor], pattern: str = "2:4") -> None:
    """Every bound linear is N:M under its group's permutation with exactly N of every M kept; every other tensor of
    the state dict equals ``before`` (its state before pruning)."""
    spec = get_spec(model)
    parsed = NMPattern.parse(pattern)
    perm_of = {n: perms[g.name] for g in spec.groups(model) for n in g.linears}
    seen = set()
    for key, value in model.state_dict().items():
        linear = key.removesuffix(".weight")
        if key.endswith(".weight") and linear in perm_of:
            assert is_nm(value[:, perm_of[linear]], pattern), key
            assert (value == 0).sum() == value.numel() * (parsed.m - parsed.n) // parsed.m, key
            seen.add(linear)
        else:
            assert torch.equal(value, before[key]), f"{key} was touched"
    assert seen == set(perm_of), sorted(set(perm_of) - seen)


def learned_val_losses(model: nn.Module, steps: int = 20, seed: int = 0) -> tuple[list[float], object]:
    """Learn permutations of a tiny LM for ``steps`` steps on random tokens (2:4, magnitude, two learned blocks
    per group); the validation losses, before training first, and the Lightning callback."""
    from permsparse.lit import CausalLMModule, PermutationLearning
    from permsparse.permutation.learned import LearnedPermutation
    from permsparse.sparsity.pruners import MagnitudePruner

    torch.manual_seed(seed)
    vocab = model.config.get_text_config().vocab_size  # a composite (vision-language) config keeps it in text_config
    data = torch.randint(0, int(vocab), (8, 24), generator=torch.Generator().manual_seed(seed))
    module = CausalLMModule(model, optimizer=functools.partial(torch.optim.AdamW, lr=0.05), alpha=1e-5)
    callback = PermutationLearning(LearnedPermutation(groups=2, init_scale=0.05, tau_start=1.0, tau_end=0.1,
                                                      warm_iters=None), MagnitudePruner(), "2:4")
    loader = torch.utils.data.DataLoader(data, batch_size=8)
    trainer = pl.Trainer(max_steps=steps, callbacks=[callback], accelerator="cpu", logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         val_check_interval=5, check_val_every_n_epoch=None, num_sanity_val_steps=0)
    trainer.validate(module, loader, verbose=False)
    trainer.fit(module, loader, loader)
    return [h["val_loss"] for h in callback.history], callback


def prune_greedy_and_check(model: nn.Module) -> tuple[dict[str, torch.Tensor], object]:
    """Wanda 2:4 scores with greedy channel swap on :func:`token_batches` statistics, then
    :func:`assert_exactly_nm_and_nothing_else`; returns ``(the weights before, the prune report)``."""
    from permsparse.permutation.channel_swap import GreedyChannelSwap
    from permsparse.prune import prune_model
    from permsparse.sparsity.calibration import collect_stats
    from permsparse.sparsity.pruners import WandaPruner

    before = {k: v.clone() for k, v in model.state_dict().items()}
    names = [n for g in get_spec(model).groups(model) for n in g.linears]
    stats = collect_stats(model, names, token_batches(), progress=False)
    report = prune_model(model, WandaPruner(), "2:4", GreedyChannelSwap(seed=0, perturb_rounds_per_group=0, escape_attempts=10), stats,
                         progress=False)
    assert_exactly_nm_and_nothing_else(model, before, report.perms)
    return before, report


def export_with_shared_residual(model: nn.Module, out, seed: int = 2, width: int = 64) -> tuple[dict, object]:
    """Random permutations, one shared permutation for every residual-stream reader, magnitude 2:4, then
    ``export_model`` into ``out``; returns ``(perms, the export result)``."""
    from permsparse.export import export_model
    from permsparse.models.binding import ResidualStream
    from permsparse.prune import prune_model
    from permsparse.sparsity.pruners import MagnitudePruner

    perms = random_perms(model, seed=seed)
    shared = torch.randperm(width, generator=torch.Generator().manual_seed(5))
    perms.update({g.name: shared for g in get_spec(model).groups(model) if isinstance(g.producer, ResidualStream)})
    prune_model(model, MagnitudePruner(), "2:4", perms, progress=False)
    return perms, export_model(model, perms, "2:4", out)


def run_and_export(tmp_path, model: str, perm: str) -> tuple[dict, dict, object]:
    """``train()`` on the tiny ``model`` config (Wanda, ``perm.foldable=true``, no identity row) into ``tmp_path``,
    then ``export_run``; returns ``(results, the export sidecar, the export folder)``."""
    from conftest import TINY_LM, compose_cfg

    from permsparse.export import SIDECAR
    from permsparse.run import train
    from permsparse.runs import export_run
    from permsparse.utils.io import read_json

    results = train(compose_cfg([*TINY_LM, f"model={model}", f"perm={perm}", "pruner=wanda",
                                 "perm.foldable=true", "eval.identity_baseline=false"], tmp_path))
    assert (results["learning"] is not None) == (perm == "learned")
    out = export_run(tmp_path)
    return results, read_json(out / SIDECAR), out
