"""Permutation-method benchmark, printed side by side in one run.

(a) seeded random 64x128 score matrices, and NVIDIA Apex's own test matrices (``np.random.seed(s);
np.random.rand(128, 64)``: 128 output rows x 64 input channels, seeds 1-6, as in Apex's
``permutation_tests/permutation_test.py``) with Apex's published efficacies printed beside ours; (b) every bound group of the real SmolLM2-135M with Wanda
scores from Shakespeare calibration text; (c) one Sinkhorn forward+backward over a (4, 384, 384) cost
with 20 iterations next to one 576x1536 matmul. For each method: mean efficacy (Apex's metric),
mean kept-score ratio against identity, and wall time.

    python scripts/bench_permutation.py                 # all parts
    python scripts/bench_permutation.py --skip-smollm2  # random matrices and Sinkhorn only
"""

from __future__ import annotations

import argparse
import time

import torch

from permsparse.permutation.base import Identity, is_permutation
from permsparse.permutation.channel_swap import GreedyChannelSwap
from permsparse.permutation.efficacy import efficacy_of, kept_ratio_of, kept_scores
from permsparse.permutation.ria_cp import RIAChannelPermutation
from permsparse.permutation.sinkhorn import sinkhorn
from permsparse.sparsity.nm import NMPattern


def methods(seed: int) -> dict:
    return {"identity": Identity(), "ria_cp": RIAChannelPermutation(), "greedy_cp": GreedyChannelSwap(seed=seed)}


def run_methods(named_scores: list[tuple[str, torch.Tensor]], pattern: NMPattern, seed: int, progress: bool) -> dict:
    out = {}
    for label, method in methods(seed).items():
        effs, kepts, start = [], [], time.perf_counter()
        for i, (name, scores) in enumerate(named_scores):
            perm = method.find(scores, pattern, name=name)
            assert is_permutation(perm, scores.shape[1]), f"{label} returned a non-bijection for {name}"
            kept = kept_scores(scores, perm, pattern, name)
            effs.append(efficacy_of(kept))
            kepts.append(kept_ratio_of(kept))
            if progress and label == "greedy_cp" and (i + 1) % 10 == 0:
                print(f"    {label}: {i + 1}/{len(named_scores)} groups, {time.perf_counter() - start:.1f} s", flush=True)
        out[label] = {"efficacy": sum(effs) / len(effs), "min_efficacy": min(effs),
                      "kept_ratio": sum(kepts) / len(kepts), "seconds": time.perf_counter() - start}
    return out


def print_table(title: str, results: dict, n: int) -> None:
    print(f"\n{title} ({n} matrices)")
    print(f"{'method':<12}{'mean efficacy':>16}{'min efficacy':>15}{'kept ratio':>13}{'seconds':>11}{'s / matrix':>12}")
    for label, r in results.items():
        print(f"{label:<12}{100 * r['efficacy']:>15.2f}%{100 * r['min_efficacy']:>14.2f}%{r['kept_ratio']:>13.5f}"
              f"{r['seconds']:>11.2f}{r['seconds'] / n:>12.3f}")


def random_part(pattern: NMPattern, count: int, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    for kind, make in [("uniform", lambda: torch.rand(64, 128, generator=gen)),
                       ("|normal|", lambda: torch.randn(64, 128, generator=gen).abs())]:
        scores = [(f"random{i}", make()) for i in range(count)]
        print_table(f"(a) random 64x128 {kind} scores, {pattern}", run_methods(scores, pattern, seed, False), count)


# Apex's README (permutation_tests): efficacy on its seed-1 matrix, 2:4
APEX_PUBLISHED = {"Apex channel swap": 32.1, "Apex stripe-group search, window 8": 35.5,
                  "Apex stripe-group search, window 12 (GPU)": 36.6}


def apex_part(seeds: tuple[int, ...] = (1, 2, 3, 4, 5, 6)) -> None:
    import numpy as np

    pattern = NMPattern.parse("2:4")
    scores = []
    for s in seeds:
        np.random.seed(s)
        scores.append((f"apex seed {s}", torch.from_numpy(np.random.rand(128, 64)).float()))
    # the greedy search without its last phase too, to show what the perturbations add
    no_perturbations = GreedyChannelSwap(seed=seeds[0], perturb_rounds_per_group=0)
    rows = {**methods(seeds[0]), "greedy_cp without perturbations": no_perturbations}
    print("\n(a') Apex's test matrices: np.random.seed(s); np.random.rand(128, 64), 2:4 (Apex publishes seed 1 only)")
    print(f"{'method':<58}" + "".join(f"{'seed ' + str(s):>9}" for s in seeds) + f"{'mean':>9}{'s / matrix':>12}")
    for label, method in rows.items():
        start = time.perf_counter()
        effs = [100 * efficacy_of(kept_scores(m, method.find(m, pattern, name=n), pattern, n)) for n, m in scores]
        seconds = (time.perf_counter() - start) / len(scores)
        print(f"{label:<58}" + "".join(f"{e:>8.1f}%" for e in effs) + f"{sum(effs) / len(effs):>8.1f}%{seconds:>12.3f}")
    for label, value in APEX_PUBLISHED.items():
        print(f"{label + ' (published)':<58}{value:>8.1f}%")


def smollm2_part(pattern: NMPattern, seed: int, calib: int, seq_len: int) -> None:
    from permsparse.data.text import load_token_split
    from permsparse.models.binding import get_spec
    from permsparse.models.loaders import load_smollm2
    from permsparse.prune import group_scores
    from permsparse.sparsity.calibration import collect_stats
    from permsparse.sparsity.pruners import WandaPruner

    model, tokenizer = load_smollm2()
    split = load_token_split("shakespeare", tokenizer)
    windows = split.train_windows(calib, seq_len, seed=seed)
    groups = get_spec(model).groups(model)
    start = time.perf_counter()
    stats = collect_stats(model, [n for g in groups for n in g.linears], list(windows.split(4)),
                          forward=lambda m, b: m(input_ids=b))
    print(f"\n(b) SmolLM2-135M: Wanda statistics from {calib} x {seq_len} Shakespeare tokens "
          f"in {time.perf_counter() - start:.1f} s")
    scores = [(g.name, group_scores(model, g, WandaPruner(), stats)) for g in groups]
    shapes = sorted({tuple(s.shape) for _, s in scores})
    print(f"    {len(scores)} bound groups, score shapes {shapes}")
    print_table(f"(b) SmolLM2-135M every bound group, Wanda scores, {pattern}",
                run_methods(scores, pattern, seed, True), len(scores))


def sinkhorn_part() -> None:
    cost = torch.randn(4, 384, 384, requires_grad=True)
    a, b = torch.randn(576, 1536), torch.randn(1536, 576)

    def sk() -> None:
        sinkhorn(cost, tau=0.5, n_iters=20).sum().backward()

    def mm() -> None:
        a @ b

    timings = {}
    for name, fn in [("sinkhorn fwd+bwd (4,384,384), 20 it", sk), ("matmul 576x1536 @ 1536x576", mm)]:
        fn()
        reps, start = 5, time.perf_counter()
        for _ in range(reps):
            fn()
        timings[name] = (time.perf_counter() - start) / reps
    print("\n(c) Sinkhorn cost next to a matmul (same process, same threads)")
    base = timings["matmul 576x1536 @ 1536x576"]
    for name, t in timings.items():
        print(f"    {name:<40}{1000 * t:>10.2f} ms{t / base:>10.1f} x matmul")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pattern", default="2:4")
    parser.add_argument("--random-count", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--calib", type=int, default=16, help="calibration windows for SmolLM2")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--skip-smollm2", action="store_true")
    args = parser.parse_args()
    pattern = NMPattern.parse(args.pattern)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    random_part(pattern, args.random_count, args.seed)
    apex_part()
    sinkhorn_part()
    if not args.skip_smollm2:
        smollm2_part(pattern, args.seed, args.calib, args.seq_len)


if __name__ == "__main__":
    main()
