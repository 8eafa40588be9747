"""Learn permutations of a tiny Llama with Lightning, on 1 process or with FSDP on 2 CPU processes (gloo).

Run as a script (Lightning's launcher re-executes it for rank 1):
    python tests/helpers/fsdp_worker.py --devices 2 --per-device-batch 2 --out result_fsdp.pt
Rank 0 saves the final permutations, the best validation loss, the learned costs (gathered from the shards) and
what FSDP did to the model: how many FSDP units it had during fit, the size of rank 0's shard of a block weight, and
whether the model after :func:`permsparse.lit.strategies.unshard_model` is a plain module with its dense weights.
"""

from __future__ import annotations

import argparse
import functools

import pytorch_lightning as pl
import torch

from permsparse.lit import CausalLMModule, PermutationLearning
from permsparse.lit.strategies import PermutationFSDPStrategy, full_params, unshard_model
from permsparse.models.tiny import tiny_llama
from permsparse.permutation.learned import LearnedPermutation
from permsparse.sparsity.pruners import MagnitudePruner

BLOCK_WEIGHT = "model.layers.0.mlp.up_proj"


class _Probe(pl.Callback):
    """What FSDP holds on this rank during the first training batch."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx or trainer.current_epoch:
            return
        from torch.distributed.fsdp import FullyShardedDataParallel

        self.units = sum(isinstance(m, FullyShardedDataParallel) for m in trainer.strategy.model.modules())
        linear = pl_module.model.get_submodule(BLOCK_WEIGHT)
        self.local_numel = linear.parametrizations.weight.original.numel()  # the shard outside the forward
        self.cost_numel = sum(p.numel() for p in pl_module.permutations.parameters())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--per-device-batch", type=int, default=4)
    parser.add_argument("--out", required=True)
    parser.add_argument("--lr", type=float, default=50.0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    pl.seed_everything(0, verbose=False)
    data = torch.randint(0, 128, (16, 24), generator=torch.Generator().manual_seed(0))
    model = tiny_llama(seed=0)
    dense = {k: v.detach().clone() for k, v in model.state_dict().items()}
    module = CausalLMModule(model, optimizer=functools.partial(torch.optim.SGD, lr=args.lr), alpha=1e-5)
    # float32 permutation gradients, as in the DDP test: a bf16 rounding per rank is coarser than what is compared
    # the block-diagonal RIA start without a base, as in the DDP test (its 8-step trajectory meets no Hungarian
    # near-tie that float32 rounding could break differently)
    callback = PermutationLearning(LearnedPermutation(groups=2, init="ria", base="none", init_scale=0.05, tau_end=0.1,
                                                      warm_iters=3, grad_precision="float32"), MagnitudePruner(), "2:4")
    probe = _Probe()
    fsdp = args.devices > 1
    trainer = pl.Trainer(
        accelerator="cpu", devices=args.devices, strategy=PermutationFSDPStrategy() if fsdp else "auto",
        max_epochs=2, callbacks=[callback, probe], logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, deterministic=True, use_distributed_sampler=False,
    )

    # Each rank reads every world_size-th sample, so a step's global batch is the single-process batch.
    def loader(x):
        sampler = torch.utils.data.DistributedSampler(x, trainer.world_size, trainer.global_rank, shuffle=False)
        return torch.utils.data.DataLoader(x, batch_size=args.per_device_batch, sampler=sampler)

    # as permsparse.run.learn_permutations does: score the start, give the module its whole tensors back (validate
    # wrapped it), then fit (which wraps it afresh) and unwrap again
    trainer.validate(module, loader(data[:8]), verbose=False)
    if fsdp:
        unshard_model(trainer, module)
    trainer.fit(module, loader(data), loader(data[:8]))
    with full_params(trainer):  # a collective: every rank takes part
        costs = {k: v.detach().clone() for k, v in module.permutations.state_dict().items() if k.endswith("raw")}
    if fsdp:
        unshard_model(trainer, module)  # a collective too
    module.permutations.detach_model()
    from torch.distributed.fsdp import FullyShardedDataParallel

    restored = (not any(isinstance(m, FullyShardedDataParallel) for m in model.modules())
                and model.state_dict().keys() == dense.keys()
                and all(torch.equal(v, dense[k]) for k, v in model.state_dict().items()))
    if trainer.global_rank == 0:
        torch.save({"perms": callback.final_perms, "best_loss": callback.best_loss, "costs": costs,
                    "steps": trainer.global_step, "history": callback.history, "units": probe.units,
                    "local_numel": probe.local_numel, "full_numel": dense[f"{BLOCK_WEIGHT}.weight"].numel(),
                    "restored": restored, "world": trainer.world_size}, args.out)


if __name__ == "__main__":
    main()
