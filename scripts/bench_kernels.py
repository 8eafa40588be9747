"""Benchmark: dense vs 2:4 semi-structured vs 2:4 + runtime gather, per layer shape and end to end.

Per layer shape (d_in x d_out of ViT-B, SmolLM2-135M and LLaMA-7B), side by side in one run:

* ``gather only``  ``x.index_select(-1, perm)`` alone
* ``dense``        ``F.linear(x, W)`` with the 2:4-masked weight stored densely
* ``+gather``      ``F.linear(x.index_select(-1, perm), W)``: the cost of a runtime input gather
* ``2:4``          ``F.linear(x, to_sparse_semi_structured(W))`` (CUDA, compute capability >= 8.0 only)
* ``2:4+gather``   both

End to end: a pruned model in original order (masked dense) vs its deployed export (folded, gathers where
needed) vs the deployed model on 2:4 kernels; tiny models always, ViT-B and a SmolLM2-shaped Llama (random
weights: speed does not depend on their values) on a GPU or with ``--real``.

On a CPU-only machine it says so and runs the CPU parts (dense vs dense + gather); keep ``--tokens`` small
there (default 128) so it finishes in about a minute. Ratios are ``time / dense time`` (lower is faster).

    python scripts/bench_kernels.py                 # CPU: ~1 min; GPU: fp16, 4096 tokens
    python scripts/bench_kernels.py --tokens 1024 16384 --threads 4 --real
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils import benchmark

from permsparse.export import fold_model, semi_structured_support, to_semi_structured
from permsparse.models import ValueRows, get_spec
from permsparse.permutation.heads import restrict_to_heads
from permsparse.prune import prune_model
from permsparse.sparsity.nm import nm_mask
from permsparse.sparsity.pruners import MagnitudePruner

SHAPES: list[tuple[str, int, int]] = [
    ("ViT-B qkv", 768, 2304),
    ("ViT-B proj", 768, 768),
    ("ViT-B fc1", 768, 3072),
    ("ViT-B fc2", 3072, 768),
    ("SmolLM2 q/o", 576, 576),
    ("SmolLM2 k/v", 576, 192),
    ("SmolLM2 gate/up", 576, 1536),
    ("SmolLM2 down", 1536, 576),
    ("LLaMA-7B q/k/v/o", 4096, 4096),
    ("LLaMA-7B gate/up", 4096, 11008),
    ("LLaMA-7B down", 11008, 4096),
]


def _time(stmt: str, env: dict[str, Any], threads: int, min_time: float) -> float:
    """Median seconds per call (CUDA-synchronised by torch.utils.benchmark)."""
    timer = benchmark.Timer(stmt=stmt, globals=env, num_threads=threads)
    timer.timeit(2)  # warm-up: kernel selection, cuSPARSELt plans, caches
    return timer.blocked_autorange(min_run_time=min_time).median


def bench_layers(tokens: int, device: str, dtype: torch.dtype, sparse: bool, threads: int,
                 min_time: float) -> list[dict[str, Any]]:
    """Time every layer shape; returns one row per shape (seconds per call)."""
    from torch.sparse import to_sparse_semi_structured

    gen = torch.Generator().manual_seed(0)
    rows = []
    for name, d_in, d_out in SHAPES:
        weight = torch.randn(d_out, d_in, generator=gen)
        weight = (weight * nm_mask(weight.abs(), "2:4")).to(device, dtype)
        x = torch.randn(tokens, d_in, generator=gen).to(device, dtype)
        perm = torch.randperm(d_in, generator=gen).to(device)
        env: dict[str, Any] = {"F": F, "x": x, "w": weight, "perm": perm}
        row = {"layer": name, "d_in": d_in, "d_out": d_out, "tokens": tokens,
               "gather_only": _time("x.index_select(-1, perm)", env, threads, min_time),
               "dense": _time("F.linear(x, w)", env, threads, min_time),
               "gather": _time("F.linear(x.index_select(-1, perm), w)", env, threads, min_time)}
        if sparse:
            env["ws"] = to_sparse_semi_structured(weight)
            row["sparse"] = _time("F.linear(x, ws)", env, threads, min_time)
            row["sparse_gather"] = _time("F.linear(x.index_select(-1, perm), ws)", env, threads, min_time)
        rows.append(row)
        del weight, x, env
    return rows


def print_layers(rows: list[dict[str, Any]], sparse: bool) -> None:
    head = f"{'layer':<18}{'d_in x d_out':>14}{'tokens':>8}{'gather only':>19}{'dense ms':>10}{'+gather':>16}"
    if sparse:
        head += f"{'2:4':>16}{'2:4+gather':>16}"
    print(head)
    for r in rows:
        d = r["dense"]
        line = (f"{r['layer']:<18}{str(r['d_in']) + 'x' + str(r['d_out']):>14}{r['tokens']:>8}"
                f"{r['gather_only'] * 1e3:>12.3f} ({r['gather_only'] / d:4.2f}){d * 1e3:>10.3f}"
                f"{r['gather'] * 1e3:>9.3f} ({r['gather'] / d:4.2f})")
        if sparse:
            line += (f"{r['sparse'] * 1e3:>9.3f} ({r['sparse'] / d:4.2f})"
                     f"{r['sparse_gather'] * 1e3:>9.3f} ({r['sparse_gather'] / d:4.2f})")
        print(line)
    print("(ms per call; ratio to dense in parentheses, < 1 is faster)")


def _smollm2_shaped() -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                      num_key_value_heads=3, vocab_size=49152, max_position_embeddings=2048, tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).eval()


def _vit_b() -> torch.nn.Module:
    import timm

    return timm.create_model("vit_base_patch16_224", pretrained=False).eval()


def _models(real: bool) -> list[tuple[str, Any, str]]:
    from permsparse.models.tiny import tiny_llama, tiny_vit

    out = [("tiny_llama", tiny_llama, "lm"), ("tiny_vit", tiny_vit, "vit")]
    if real:
        out += [("ViT-B/16 (random weights)", _vit_b, "vit"), ("SmolLM2-135M shape (random)", _smollm2_shaped, "lm")]
    return out


def _foldable_perms(model: torch.nn.Module, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random permutations, within heads for o/proj (as ``perm.foldable=true`` would give)."""
    gen = torch.Generator().manual_seed(seed)
    perms = {}
    for group in get_spec(model).groups(model):
        perm = torch.randperm(model.get_submodule(group.linears[0]).in_features, generator=gen)
        if isinstance(group.producer, ValueRows):
            perm = restrict_to_heads(perm, *group.producer.head_layout)
        perms[group.name] = perm
    return perms


def bench_models(device: str, dtype: torch.dtype, sparse: bool, real: bool, threads: int, min_time: float,
                 lm_batch: tuple[int, int], vit_batch: int) -> list[dict[str, Any]]:
    """Throughput of masked (original order) vs deployed (folded + gathers) vs deployed on 2:4 kernels."""
    rows = []
    for name, build, kind in _models(real):
        model = build()
        perms = _foldable_perms(model)
        prune_model(model, MagnitudePruner(), "2:4", perms, progress=False)
        deployed, report = fold_model(model, perms, "2:4")
        model, deployed = model.to(device, dtype), deployed.to(device, dtype)
        gen = torch.Generator().manual_seed(0)
        if kind == "lm":
            b, t = lm_batch
            inp = torch.randint(0, int(model.config.vocab_size), (b, t), generator=gen).to(device)
            stmt, units, n = "m(input_ids=inp, use_cache=False)", "tokens/s", b * t
        else:
            e = model.patch_embed
            inp = torch.randn(vit_batch, e.proj.in_channels, *e.img_size, generator=gen).to(device, dtype)
            stmt, units, n = "m(inp)", "images/s", vit_batch
        c = report.counts()
        row = {"model": name, "units": units, "folded": c["folded_linears"], "gathered": c["gathered_linears"]}
        seconds = {}
        with torch.inference_mode():
            seconds["masked"] = _time(stmt, {"m": model, "inp": inp}, threads, min_time)
            seconds["deployed"] = _time(stmt, {"m": deployed, "inp": inp}, threads, min_time)
            if sparse:
                status = to_semi_structured(deployed, "2:4", strict=False)
                row["converted"] = sum(v == "2:4" for v in status.values())
                seconds["sparse"] = _time(stmt, {"m": deployed, "inp": inp}, threads, min_time)
        row["seconds"] = seconds
        row.update({k: n / s for k, s in seconds.items()})  # throughput
        rows.append(row)
        del model, deployed
    return rows


def print_models(rows: list[dict[str, Any]], sparse: bool) -> None:
    head = f"{'model':<30}{'folded/gathered':>16}{'masked':>14}{'deployed':>20}"
    if sparse:
        head += f"{'deployed 2:4':>22}"
    print(head)
    for r in rows:
        m = r["masked"]
        line = (f"{r['model']:<30}{str(r['folded']) + '/' + str(r['gathered']):>16}{m:>14.0f}"
                f"{r['deployed']:>12.0f} ({r['deployed'] / m:4.2f})")
        if sparse:
            line += f"{r['sparse']:>14.0f} ({r['sparse'] / m:4.2f})"
        print(line + f"  {r['units']}")
    print("(throughput; ratio to the masked original-order model in parentheses, > 1 is faster; "
          "folded/gathered counts linears)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=None,
                        help="tokens (rows of x) per layer call (default: 4096 on GPU, 128 on CPU)")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads for the timings (default 1)")
    parser.add_argument("--min-time", type=float, default=None, help="seconds of timing per measurement")
    parser.add_argument("--dtype", default=None, help="float16/bfloat16 on GPU (default float16), float32 on CPU")
    parser.add_argument("--real", action="store_true", help="also ViT-B and SmolLM2-shaped models (default on GPU)")
    parser.add_argument("--no-layers", action="store_true", help="skip the per-layer table")
    parser.add_argument("--no-models", action="store_true", help="skip the end-to-end table")
    parser.add_argument("--json", type=Path, default=None, help="also write all rows to this JSON file")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    cuda_ok, why = semi_structured_support()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    sparse = cuda_ok
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.float16 if device == "cuda" else torch.float32)
    tokens = args.tokens or ([4096] if device == "cuda" else [128])
    min_time = args.min_time if args.min_time is not None else (0.5 if device == "cuda" else 0.2)
    real = args.real or device == "cuda"
    print(f"torch {torch.__version__}, device {device}, dtype {str(dtype).removeprefix('torch.')}, "
          f"threads {args.threads}")
    if sparse:
        print(f"2:4 semi-structured kernels: available ({why})")
    else:
        print(f"2:4 semi-structured kernels: NOT available: {why}.\n"
              "Running the CPU parts only: dense vs dense + gather (the cost of a runtime gather).")
    out: dict[str, Any] = {"device": device, "dtype": str(dtype), "sparse": sparse, "layers": [], "models": []}
    start = time.perf_counter()
    if not args.no_layers:
        for t in tokens:
            print(f"\n== per layer, {t} tokens")
            rows = bench_layers(t, device, dtype, sparse, args.threads, min_time)
            print_layers(rows, sparse)
            out["layers"] += rows
    if not args.no_models:
        print("\n== end to end (2:4 magnitude, random permutations, within heads for o/proj)")
        lm_batch = (8, 512) if device == "cuda" else (4, 64)
        vit_batch = 128 if device == "cuda" else 16
        rows = bench_models(device, dtype, sparse, real, args.threads, min_time, lm_batch, vit_batch)
        print_models(rows, sparse)
        out["models"] = rows
        if not real:
            print("(ViT-B and SmolLM2-shaped models skipped on CPU; pass --real to include them)")
    print(f"\ntotal {time.perf_counter() - start:.0f} s")
    if args.json:
        args.json.write_text(json.dumps(out, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
