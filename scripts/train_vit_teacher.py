#!/usr/bin/env python
"""Train the offline ViT teacher (a small timm VisionTransformer) on Fashion-MNIST or digits, on CPU.

No hub offers ImageNet ViT weights offline, so the project's offline vision testbed is a ViT it
trains itself with this script (fixed seed, a few minutes on 2 CPU cores). The committed weights
live in ``src/permsparse/assets/<dataset>_vit.safetensors`` with a JSON next to them holding the
architecture, the training arguments and the measured top-1 (of the weights *as saved*), which
``permsparse.models.loaders.load_offline_vit`` reads back. Reproduce the committed teachers with::

    python scripts/train_vit_teacher.py --dataset fashion_mnist   # defaults = the committed model
    python scripts/train_vit_teacher.py --dataset digits

Run-to-run equality is only guaranteed on the same machine/thread count (CPU kernels may differ).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import platform
import time
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor

from permsparse.data.vision import load_image_dataset, top1

ASSETS = Path(__file__).resolve().parents[1] / "src" / "permsparse" / "assets"

# Per-data-set defaults: the architectures and schedules of the committed teachers. Both are 4-block ViTs of
# width 64 with 4 heads and MLP ratio 2, trained with AdamW at lr 2e-3, weight decay 0.05.
_SHARED = dict(embed_dim=64, depth=4, heads=4, mlp_ratio=2.0, lr=2e-3, weight_decay=0.05)
DEFAULTS = {
    # 139k parameters, 49 patches of 4x4 + class token; about 270 s of one CPU core. Chosen because one-shot
    # 2:4 Wanda costs it about 5 points of top-1 (a 206k-parameter patch-7 depth-6 model lost only 1.7).
    "fashion_mnist": dict(_SHARED, patch=4, epochs=4, batch_size=128),
    # 136k parameters, 16 patches of 2x2; about 40 s. A quick secondary teacher (2:4 Wanda costs ~1 point).
    "digits": dict(_SHARED, patch=2, epochs=60, batch_size=32),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", choices=sorted(DEFAULTS), default="fashion_mnist")
    p.add_argument("--embed-dim", type=int)
    p.add_argument("--depth", type=int)
    p.add_argument("--heads", type=int)
    p.add_argument("--patch", type=int)
    p.add_argument("--mlp-ratio", type=float)
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--weight-decay", type=float)
    p.add_argument("--warmup-frac", type=float, default=0.05, help="fraction of steps with linear lr warm-up")
    p.add_argument(
        "--augment",
        action="store_true",
        help="random shifts (and left/right flips on fashion_mnist); off for the committed teachers, "
        "which train for too few epochs to profit",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=["fp32", "fp16"], default="fp32", help="dtype of the saved weights")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (0: torch default; 1 is fastest on a busy 2-core box)",
    )
    p.add_argument(
        "--out", type=Path, default=ASSETS, help="output folder; writes <dataset>_vit.safetensors and .json"
    )
    args = p.parse_args(argv)
    for key, value in DEFAULTS[args.dataset].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def build_vit(arch: dict) -> VisionTransformer:
    """The teacher architecture from its JSON ``arch`` entry (kept in sync with ``load_offline_vit``)."""
    return VisionTransformer(**arch)


def random_shift(x: Tensor, max_shift: int, gen: torch.Generator) -> Tensor:
    """Translate every image by its own random offset in ``[-max_shift, max_shift]`` (zero fill)."""
    b, c, h, w = x.shape
    xp = F.pad(x, (max_shift,) * 4)
    dy = torch.randint(0, 2 * max_shift + 1, (b,), generator=gen)
    dx = torch.randint(0, 2 * max_shift + 1, (b,), generator=gen)
    rows = (torch.arange(h)[None, :] + dy[:, None])[:, None, :, None].expand(b, c, h, w)
    cols = (torch.arange(w)[None, :] + dx[:, None])[:, None, None, :].expand(b, c, h, w)
    bi = torch.arange(b)[:, None, None, None].expand(b, c, h, w)
    ci = torch.arange(c)[None, :, None, None].expand(b, c, h, w)
    return xp[bi, ci, rows, cols]


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    data = load_image_dataset(args.dataset, seed=args.seed)
    arch = dict(
        img_size=data.img_size,
        patch_size=args.patch,
        in_chans=data.in_chans,
        num_classes=data.num_classes,
        embed_dim=args.embed_dim,
        depth=args.depth,
        num_heads=args.heads,
        mlp_ratio=args.mlp_ratio,
    )
    model = build_vit(arch)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{data}\nViT {arch}: {n_params:,} parameters")

    x_train, y_train = data.train.tensors
    steps_per_epoch = math.ceil(len(y_train) / args.batch_size)
    total = steps_per_epoch * args.epochs
    warmup = max(1, int(args.warmup_frac * total))
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: (
            (s + 1) / warmup
            if s < warmup
            else 0.5 * (1 + math.cos(math.pi * (s - warmup) / max(1, total - warmup)))
        ),
    )
    gen = torch.Generator().manual_seed(args.seed)
    augment = args.augment
    max_shift = 2 if data.img_size >= 28 else 1
    t0, c0 = time.time(), time.process_time()
    for epoch in range(args.epochs):
        model.train()
        order = torch.randperm(len(y_train), generator=gen)
        loss_sum = 0.0
        for i in range(steps_per_epoch):
            idx = order[i * args.batch_size : (i + 1) * args.batch_size]
            x, y = x_train[idx], y_train[idx]
            if augment:
                x = random_shift(x, max_shift, gen)
                if args.dataset == "fashion_mnist":  # left/right flips keep a garment's class; not a digit's
                    flip = torch.rand(len(x), generator=gen) < 0.5
                    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss_sum += float(loss.detach())
        val = top1(model, data.val)
        print(
            f"epoch {epoch + 1}/{args.epochs}  loss {loss_sum / steps_per_epoch:.4f}  val top-1 {val:.2f}  "
            f"({time.time() - t0:.0f} s wall, {time.process_time() - c0:.0f} s CPU)",
            flush=True,
        )
    train_s, train_cpu_s = time.time() - t0, time.process_time() - c0

    args.out.mkdir(parents=True, exist_ok=True)
    weights = args.out / f"{args.dataset}_vit.safetensors"
    dtype = torch.float16 if args.dtype == "fp16" else torch.float32
    save_file({k: v.detach().to(dtype).contiguous() for k, v in model.state_dict().items()}, str(weights))
    # Report the accuracy of the weights exactly as saved (fp16 rounding included), in fp32 compute.
    saved = build_vit(arch)
    saved.load_state_dict({k: v.float() for k, v in load_file(str(weights)).items()})
    val, test = top1(saved, data.val), top1(saved, data.test)
    info = {
        "dataset": args.dataset,
        "arch": arch,
        "n_params": n_params,
        "weights": weights.name,
        "weights_dtype": args.dtype,
        "weights_sha256": hashlib.sha256(weights.read_bytes()).hexdigest(),
        "val_top1": round(val, 2),
        "test_top1": round(test, 2),
        "n_val": len(data.val),
        "n_test": len(data.test),
        "input": "float32 (N, C, H, W) in [0, 1], no mean/std normalisation (permsparse.data.vision)",
        "train": {
            k: getattr(args, k)
            for k in ("epochs", "batch_size", "lr", "weight_decay", "warmup_frac", "seed", "threads")
        }
        | {"augment": augment, "wall_seconds": round(train_s, 1), "cpu_seconds": round(train_cpu_s, 1)},
        "versions": {
            "torch": torch.__version__,
            "timm": timm.__version__,
            "python": platform.python_version(),
        },
    }
    (args.out / f"{args.dataset}_vit.json").write_text(json.dumps(info, indent=2) + "\n")
    print(
        f"saved {weights} ({weights.stat().st_size / 1e6:.2f} MB): val top-1 {val:.2f}  test top-1 {test:.2f}"
    )
    return info


if __name__ == "__main__":
    main()
