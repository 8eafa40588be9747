"""Cost of the permutation machinery next to one training step of the model, measured side by side.

Machinery = for every binding group: Sinkhorn (forward + backward), Hungarian hardening, N:M masks of
the permuted scores, and the masked-weight products ``((W P) * M) P^T`` (forward + backward to ``P``).
Model step = one forward + backward of the same model at the same batch (weights requiring grad, as
in ordinary training). Default: SmolLM2-135M at batch 4 x 256 tokens, Wanda-style scores.

    python scripts/bench_machinery.py [--tiny] [--batch 4] [--seq-len 256] [--repeats 3]
"""

from __future__ import annotations

import argparse
import time

import torch

from permsparse.models.binding import get_spec
from permsparse.permutation.learned import LearnedPermutations, cost_key
from permsparse.sparsity.pruners import MagnitudePruner


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="a tiny random Llama instead of SmolLM2-135M")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--groups", type=int, default=4)
    parser.add_argument("--sinkhorn-iters", type=int, default=20)
    parser.add_argument("--warm-iters", type=int, default=None,
                        help="warm-start Sinkhorn with this many iterations (conf/perm/learned.yaml: 5)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    if args.tiny:
        from permsparse.models.tiny import tiny_llama

        model, vocab = tiny_llama(seed=0), 128
    else:
        from permsparse.models.loaders import load_smollm2

        model, tok = load_smollm2()
        vocab = model.config.vocab_size
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch} x {args.seq_len} tokens")
    ids = torch.randint(0, vocab, (args.batch, args.seq_len), generator=torch.Generator().manual_seed(0))

    def model_step() -> None:
        model.zero_grad(set_to_none=True)
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()

    t_model = timed(model_step, args.repeats)
    model.zero_grad(set_to_none=True)

    learned = LearnedPermutations(model, MagnitudePruner(), "2:4", groups=args.groups)
    learned.attach()  # freezes the model
    spec = get_spec(model)
    linears = [(g.name, n) for g in spec.groups(model) for n in g.linears]
    gen = torch.Generator().manual_seed(1)
    upstream = {n: torch.randn(model.get_submodule(n).parametrizations.weight.original.shape, generator=gen)
                for _, n in linears}

    def refresh_only() -> None:
        learned.zero_grad(set_to_none=True)
        learned.refresh(tau=0.5, hard=True, n_iters=args.sinkhorn_iters, warm_iters=args.warm_iters)

    def machinery() -> None:
        learned.zero_grad(set_to_none=True)
        learned.refresh(tau=0.5, hard=True, n_iters=args.sinkhorn_iters, warm_iters=args.warm_iters)
        # The model's backward hands each masked weight its gradient; feed it directly (no extra loss terms).
        weights = [model.get_submodule(name).weight for _, name in linears]
        torch.autograd.backward(weights, [upstream[name] for _, name in linears])

    # Make every group's permutation change between calls so the masks are really recomputed.
    for cost in learned.costs.values():
        with torch.no_grad():
            cost.raw.add_(0.5 * torch.randn(cost.raw.shape, generator=gen))
    t_refresh = timed(refresh_only, args.repeats)
    t_machinery = timed(machinery, args.repeats)

    def frozen_step() -> None:
        learned.zero_grad(set_to_none=True)
        learned.refresh(tau=0.5, hard=True, n_iters=args.sinkhorn_iters, warm_iters=args.warm_iters)
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()

    t_learn_step = timed(frozen_step, args.repeats)
    learned.detach_model()
    n_groups = len(learned.group_names)
    sizes = sorted({(c.groups, c.group_size) for c in (learned.costs[cost_key(g)] for g in learned.group_names)})
    print(f"{n_groups} binding groups, cost blocks (G, g): {sizes}; Sinkhorn {args.sinkhorn_iters} iterations"
          + (f", warm-started with {args.warm_iters}" if args.warm_iters else ", from scratch every step"))
    print(f"{'':<58}{'seconds':>10}{'/ model step':>15}")
    rows = [
        ("model forward+backward (weights require grad)", t_model),
        ("machinery: Sinkhorn+Hungarian+masks (forward only)", t_refresh),
        ("machinery: all of it, forward+backward to the costs", t_machinery),
        ("one permutation-learning step (machinery + frozen model)", t_learn_step),
    ]
    for name, t in rows:
        print(f"{name:<58}{t:>10.3f}{t / t_model:>14.1%}")


if __name__ == "__main__":
    main()
