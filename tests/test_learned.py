"""The learned permutation: gradients reach only the costs, the loss falls, the teacher is the dense model."""

import functools

import pytorch_lightning as pl
import torch

from permsparse.lit import CausalLMModule, PermutationLearning
from permsparse.models.tiny import tiny_llama
from permsparse.permutation.learned import LearnedPermutations
from permsparse.sparsity.pruners import MagnitudePruner


def _data(n=16, seq=24, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 128, (n, seq), generator=gen)


def test_only_the_costs_receive_gradients_and_dense_mode_is_the_teacher():
    model = tiny_llama(seed=0)
    ids = _data(2)
    with torch.no_grad():
        dense = model(input_ids=ids).logits
    learned = LearnedPermutations(model, MagnitudePruner(), "2:4", groups=4).attach()
    loss = torch.nn.functional.cross_entropy(model(input_ids=ids).logits[:, :-1].reshape(-1, 128), ids[:, 1:].reshape(-1))
    loss.backward()
    assert all(p.grad is None for p in model.parameters())
    assert all(c.raw.grad is not None and c.raw.grad.abs().sum() > 0 for c in learned.costs.values())
    with torch.no_grad(), learned.dense():
        assert torch.allclose(model(input_ids=ids).logits, dense, atol=1e-6)
    learned.detach_model()
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids).logits, dense, atol=1e-6)


def test_learning_lowers_the_loss_on_a_tiny_model():
    """Fit the costs on a fixed batch: the best hardened permutation beats the identity's loss."""
    torch.manual_seed(0)
    model = tiny_llama(seed=0)
    data = _data(8)
    module = CausalLMModule(model, optimizer=functools.partial(torch.optim.AdamW, lr=0.05), alpha=1e-5)
    callback = PermutationLearning(MagnitudePruner(), "2:4", groups=2, init_scale=0.05, tau_start=1.0, tau_end=0.1)
    loader = torch.utils.data.DataLoader(data, batch_size=8)
    trainer = pl.Trainer(max_steps=30, callbacks=[callback], accelerator="cpu", logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         val_check_interval=5, check_val_every_n_epoch=None, num_sanity_val_steps=0)
    trainer.validate(module, loader, verbose=False)
    trainer.fit(module, loader, loader)
    losses = [h["val_loss"] for h in callback.history]
    assert callback.history[0]["step"] == 0 and callback.history[0]["changed_channels"] == 0
    assert min(losses[1:]) < losses[0] - 1e-3, losses
    assert callback.best_loss == min(losses)
    assert any(not torch.equal(p, torch.arange(p.numel())) for p in callback.final_perms.values())


def test_a_non_finite_loss_skips_the_step_and_too_many_abort():
    import pytest

    model = tiny_llama(seed=0)
    module = CausalLMModule(model, alpha=0.0, max_nonfinite=3)
    learned = LearnedPermutations(model, MagnitudePruner(), "2:4", groups=2).attach()
    module.permutations = learned
    module.log = lambda *a, **k: None  # outside a Trainer
    module.task_loss = lambda output, batch: torch.tensor(float("nan"))
    batch = _data(2)
    with pytest.warns(UserWarning, match="non-finite loss"):
        assert module.training_step(batch, 0) is None
        assert module.training_step(batch, 1) is None
    with pytest.warns(UserWarning), pytest.raises(FloatingPointError, match="3 non-finite losses in a row"):
        module.training_step(batch, 2)
