"""Cost of the permutation machinery next to one training step of the model, measured side by side.

Machinery = for every binding group: Sinkhorn (forward + backward), Hungarian hardening, N:M masks of
the permuted scores, and the masked-weight products ``((W P) * M) P^T`` (forward + backward to ``P``).
Model step = one forward + backward of an untouched copy of the model at the same batch (weights requiring
grad and in their own layout, as in ordinary training). Default: SmolLM2-135M at batch 4 x 256 tokens,
magnitude scores, the permutation gradient's matmuls in the precision ``perm.method.grad_precision=auto`` picks
(``--grad-precision``).

The machinery is timed in a training-like state, not a frozen one: before every timed call the costs
take one small random step (``--step``, relative to their spread), so permutations change and masks are
recomputed as they are during training; the script prints how many channels and M-blocks changed per
call and how many Hungarian blocks needed scipy. The costs start either from a real run's checkpoint
(``--costs results/.../checkpoints/last.ckpt``) or from the identity initialisation of
``conf/perm/learned.yaml`` plus noise of the same size (``--spread``), which like a trained state is
far enough from a permutation that nearly every block needs a full assignment solve.

Timing on a shared machine drifts, so the four measurements are interleaved: each of ``--rounds`` rounds
times every one of them once, and the table gives medians, with the per-round ratio's range beside it.

    python scripts/bench_machinery.py [--tiny] [--batch 4] [--seq-len 256] [--rounds 5] [--costs CKPT]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from permsparse.models.binding import get_spec
from permsparse.permutation.learned import LearnedPermutation, LearnedPermutations, cost_key
from permsparse.sparsity.pruners import MagnitudePruner


def timed(fn, setup=lambda: None) -> float:
    setup()
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    defaults = LearnedPermutation()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="a tiny random Llama instead of SmolLM2-135M")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--groups", type=int, default=defaults.groups)
    parser.add_argument("--sinkhorn-iters", type=int, default=defaults.sinkhorn_iters)
    parser.add_argument("--warm-iters", type=int, default=defaults.warm_iters or 0,
                        help="warm-start Sinkhorn with this many iterations (default: the method's; 0: from scratch)")
    parser.add_argument("--tau", type=float, default=0.5)
    parser.add_argument("--costs", default=None, help="start from the costs in this checkpoint (a learned run's last.ckpt)")
    parser.add_argument("--spread", type=float, default=1.0,
                        help="without --costs: noise added to the identity cost, relative to init_scale")
    parser.add_argument("--step", type=float, default=0.05,
                        help="cost change before each timed call, relative to the cost's spread. 0.05 changes about "
                             "15%% of the channels and 46%% of the M-blocks per call, as one AdamW step at the peak "
                             "lr (0.01) does to the default run's trained costs (16%% and 48%%)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--grad-precision", default=defaults.grad_precision, choices=["auto", "float32", "bfloat16"],
                        help="matmuls of the permutation gradient (default: the method's)")
    args = parser.parse_args()

    if args.tiny:
        from permsparse.models.tiny import tiny_llama

        model, reference, vocab = tiny_llama(seed=0), tiny_llama(seed=0), 128
    else:
        from permsparse.models.loaders import load_smollm2

        (model, _), (reference, _) = load_smollm2(), load_smollm2()
        vocab = model.config.vocab_size
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch} x {args.seq_len} tokens")
    ids = torch.randint(0, vocab, (args.batch, args.seq_len), generator=torch.Generator().manual_seed(0))

    method = LearnedPermutation(groups=args.groups, grad_precision=args.grad_precision)  # the rest: the defaults
    init_scale = method.init_scale
    learned = method.build(model, MagnitudePruner(), "2:4")
    learned.attach()  # freezes the model

    def model_step() -> None:
        """An ordinary training step of an untouched copy of the model: every weight requiring grad, the
        weights in their own layout (``attach`` lays the bound ones out transposed)."""
        reference.zero_grad(set_to_none=True)
        reference(input_ids=ids, labels=ids).loss.backward()
    warm = args.warm_iters or None
    spec = get_spec(model)
    linears = [(g.name, n) for g in spec.groups(model) for n in g.linears]
    gen = torch.Generator().manual_seed(1)
    # laid out like the weight, as a linear layer's backward hands it over (LearnedPermutations stores the bound
    # weights transposed, and their gradients arrive transposed too)
    upstream = {n: torch.empty_like(model.get_submodule(n).parametrizations.weight.original).normal_(generator=gen)
                for _, n in linears}

    costs = {name: learned.costs[cost_key(name)] for name in learned.group_names}
    if args.costs:
        state = torch.load(args.costs, map_location="cpu", weights_only=False)["state_dict"]
        with torch.no_grad():
            for key, cost in learned.costs.items():
                cost.raw.copy_(state[f"permutations.costs.{key}.raw"])
    else:
        with torch.no_grad():
            for cost in costs.values():
                cost.raw.add_(args.spread * init_scale * torch.randn(cost.raw.shape, generator=gen))
    changes = []

    def training_step_of_the_costs() -> None:
        """One small random step of every cost, like an optimiser step; records what it changed."""
        before = learned.current_permutations()
        with torch.no_grad():
            for cost in costs.values():
                cost.raw.add_(args.step * cost.raw.std() * torch.randn(cost.raw.shape, generator=gen))
        changes.append(before)

    def refresh_only() -> None:
        learned.zero_grad(set_to_none=True)
        learned.refresh(tau=args.tau, hard=True, n_iters=args.sinkhorn_iters, warm_iters=warm)

    def machinery() -> None:
        learned.zero_grad(set_to_none=True)
        learned.refresh(tau=args.tau, hard=True, n_iters=args.sinkhorn_iters, warm_iters=warm)
        # The model's backward hands each masked weight its gradient; feed it directly (no extra loss terms).
        weights = [model.get_submodule(name).weight for _, name in linears]
        torch.autograd.backward(weights, [upstream[name] for _, name in linears])

    def frozen_step() -> None:
        learned.zero_grad(set_to_none=True)
        learned.refresh(tau=args.tau, hard=True, n_iters=args.sinkhorn_iters, warm_iters=warm)
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()

    refresh_only()
    scipy_blocks = _count_scipy_blocks(learned, args.tau)
    names = ["model", "refresh", "machinery", "learning step"]
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_ in range(args.rounds + 1):  # round 0 warms up
        measured = {
            "model": timed(model_step),
            "refresh": timed(refresh_only, training_step_of_the_costs),
            "machinery": timed(machinery, training_step_of_the_costs),
            "learning step": timed(frozen_step, training_step_of_the_costs),
        }
        if round_:
            for name in names:
                times[name].append(measured[name])
    moved_channels, moved_blocks, total_channels = 0, 0, 0
    before, after = changes[-1], learned.current_permutations()
    for name, perm in after.items():
        diff = perm != before[name]
        moved_channels += int(diff.sum())
        moved_blocks += int(diff.reshape(-1, 4).any(-1).sum())
        total_channels += perm.numel()

    learned.detach_model()
    n_groups = len(learned.group_names)
    sizes = sorted({(c.groups, c.group_size) for c in (learned.costs[cost_key(g)] for g in learned.group_names)})
    print(f"{n_groups} binding groups, cost blocks (G, g): {sizes}; tau {args.tau}; Sinkhorn "
          + (f"warm-started with {warm} iterations" if warm else f"{args.sinkhorn_iters} iterations from scratch every step")
          + f"; permutation-gradient matmuls in {str(learned.grad_dtype).removeprefix('torch.')} "
          + f"(--grad-precision {args.grad_precision})")
    print(f"costs: {'from ' + args.costs if args.costs else f'identity + noise (spread {args.spread})'}; "
          f"per timed call a step of {args.step} x spread changed {moved_channels / total_channels:.1%} of the channels "
          f"and {moved_blocks / (total_channels // 4):.1%} of the M-blocks; "
          f"Hungarian blocks solved by scipy: {scipy_blocks[0]} of {scipy_blocks[1]}")
    print(f"medians of {args.rounds} interleaved rounds; the ratio's range over the rounds in brackets")
    print(f"{'':<58}{'seconds':>10}{'/ model step':>15}")
    labels = {
        "model": "model forward+backward (weights require grad)",
        "refresh": "machinery: Sinkhorn+Hungarian+masks (forward only)",
        "machinery": "machinery: all of it, forward+backward to the costs",
        "learning step": "one permutation-learning step (machinery + frozen model)",
    }
    for name in names:
        ratios = [t / m for t, m in zip(times[name], times["model"], strict=True)]
        print(f"{labels[name]:<58}{statistics.median(times[name]):>10.3f}{statistics.median(ratios):>14.1%}"
              + (f"  [{min(ratios):.1%} .. {max(ratios):.1%}]" if name != "model" else ""))


def _count_scipy_blocks(learned: LearnedPermutations, tau: float) -> tuple[int, int]:
    """Blocks whose Sinkhorn matrix (20 iterations from scratch at ``tau``, close to the warm-started one) is not a
    near-permutation (row argmaxes collide), so Hungarian runs scipy on them."""
    need = total = 0
    for name in learned.group_names:
        soft, _ = learned.costs[cost_key(name)](tau, hard=False)
        cols = soft.detach().argmax(-1)
        need += int((cols.sort(-1).values != torch.arange(cols.shape[-1])).any(-1).sum())
        total += cols.shape[0]
    return need, total


if __name__ == "__main__":
    main()
