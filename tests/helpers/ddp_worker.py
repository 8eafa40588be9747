"""Learn permutations of a tiny Llama with Lightning, on 1 process or with DDP on 2 CPU processes (gloo).

Run as a script (Lightning's DDP launcher re-executes it for rank 1):
    python tests/helpers/ddp_worker.py --devices 2 --per-device-batch 2 --out result_ddp.pt
Rank 0 saves the final permutations, the best validation loss, the learned costs and the costs at the first step.
"""

from __future__ import annotations

import argparse
import functools

import pytorch_lightning as pl
import torch

from permsparse.lit import CausalLMModule, PermutationLearning
from permsparse.models.tiny import tiny_llama
from permsparse.permutation.learned import LearnedPermutation
from permsparse.sparsity.pruners import MagnitudePruner


def _costs(module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.permutations.state_dict().items() if k.endswith("raw")}


class _StartCosts(pl.Callback):
    """The costs as the permutation callback attached them, before any step (listed after it, so it runs later)."""

    def on_train_start(self, trainer, module) -> None:
        self.costs = _costs(module)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--per-device-batch", type=int, default=4)
    parser.add_argument("--out", required=True)
    parser.add_argument("--max-steps", type=int, default=-1)
    parser.add_argument("--lr", type=float, default=50.0)
    parser.add_argument("--base", default="none", help="perm.method.base (none: the block-diagonal RIA start)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    pl.seed_everything(0, verbose=False)
    data = torch.randint(0, 128, (16, 24), generator=torch.Generator().manual_seed(0))
    model = tiny_llama(seed=0)
    module = CausalLMModule(model, optimizer=functools.partial(torch.optim.SGD, lr=args.lr), alpha=1e-5)
    # float32 permutation gradients: the test compares DDP's averaged gradients with one process's to float32
    # rounding, and a bf16 rounding per rank (grad_precision=auto on a bf16-capable CPU) is coarser than that
    # rounding; with base=none the block-diagonal RIA start, whose 8-step trajectory at lr 50 meets no Hungarian
    # near-tie (a tie broken differently by float32 rounding sends the two runs apart: the default base meets one
    # after 3 steps, so the test compares it over 2)
    method = LearnedPermutation(groups=2, init="ria" if args.base == "none" else "identity", base=args.base,
                                init_scale=0.05, tau_end=0.1, warm_iters=3, grad_precision="float32")
    callback = PermutationLearning(method, MagnitudePruner(), "2:4")
    start = _StartCosts()
    trainer = pl.Trainer(
        accelerator="cpu", devices=args.devices, strategy="ddp" if args.devices > 1 else "auto", max_epochs=2, max_steps=args.max_steps,
        callbacks=[callback, start], logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, deterministic=True, use_distributed_sampler=False,
    )
    # Each rank reads every world_size-th sample, so a DDP step's global batch is the single-process batch.
    def loader(x):
        sampler = torch.utils.data.DistributedSampler(x, trainer.world_size, trainer.global_rank, shuffle=False)
        return torch.utils.data.DataLoader(x, batch_size=args.per_device_batch, sampler=sampler)

    trainer.fit(module, loader(data), loader(data[:8]))
    if trainer.global_rank == 0:
        torch.save({"perms": callback.final_perms, "best_loss": callback.best_loss, "costs": _costs(module),
                    "start_costs": start.costs,
                    "steps": trainer.global_step, "history": callback.history}, args.out)


if __name__ == "__main__":
    main()
