"""Calibration statistics: dense collection, sequential (block-by-block) collection, merging."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from permsparse.sparsity import (
    LayerStats,
    NMPattern,
    WandaPruner,
    all_reduce_stats,
    collect_stats,
    collect_stats_sequential,
    merge_stats,
    merge_stats_dicts,
)


class TinyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(8, 16)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(16, 4)
        self.drop = nn.Dropout(0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.drop(self.act(self.fc1(x))))


def tiny_batches(n: int = 3, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, 5, 8, generator=g) for _ in range(n)]


def hook_count(model: nn.Module) -> int:
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())


def assert_stats_close(a: LayerStats, b: LayerStats, rtol: float = 1e-6, atol: float = 1e-8) -> None:
    assert a.count == b.count
    torch.testing.assert_close(a.sq_sum, b.sq_sum, rtol=rtol, atol=atol)
    if a.hessian is not None or b.hessian is not None:
        torch.testing.assert_close(a.hessian, b.hessian, rtol=rtol, atol=atol)


# ----------------------------------------------------------------------------------- collect_stats
def test_collect_stats_matches_manual():
    torch.manual_seed(0)
    model = TinyNet().train()
    batches = tiny_batches()
    stats = collect_stats(model, ["fc1", "fc2"], batches, hessian=True, progress=False)
    assert model.training  # mode restored
    x1 = torch.cat([b.reshape(-1, 8) for b in batches]).double()
    with torch.no_grad():
        x2 = torch.cat([model.act(model.fc1(b)).reshape(-1, 16) for b in batches]).double()
    for name, x in (("fc1", x1), ("fc2", x2)):
        s = stats[name]
        assert s.count == 3 * 2 * 5
        assert s.sq_sum.dtype == torch.float64
        torch.testing.assert_close(s.sq_sum, (x**2).sum(0))
        torch.testing.assert_close(s.hessian, x.T @ x)
        torch.testing.assert_close(s.input_norm, x.norm(dim=0))
    assert hook_count(model) == 0


def test_collect_stats_without_hessian_and_custom_forward():
    model = TinyNet()
    batches = [{"inp": b} for b in tiny_batches()]
    stats = collect_stats(model, ["fc2"], batches, forward=lambda m, b: m(b["inp"]), progress=False)
    assert stats["fc2"].hessian is None and stats["fc2"].count == 30


def test_default_forward_accepts_dicts_and_tuples():
    model = TinyNet()
    batches = tiny_batches()
    ref = collect_stats(model, ["fc1"], batches, progress=False)["fc1"]
    as_tuples = [(b, torch.zeros(2)) for b in batches]  # (inputs, labels)
    assert_stats_close(collect_stats(model, ["fc1"], as_tuples, progress=False)["fc1"], ref)

    class KwNet(TinyNet):
        def forward(self, pixels: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
            return super().forward(pixels)

    kw = KwNet()
    kw.load_state_dict(model.state_dict())
    dicts = [{"pixels": b} for b in batches]
    assert_stats_close(collect_stats(kw, ["fc1"], dicts, progress=False)["fc1"], ref)


def test_hooks_removed_on_error():
    model = TinyNet()

    def bad_forward(m: nn.Module, batch: torch.Tensor) -> None:
        m(batch)
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        collect_stats(model, ["fc1", "fc2"], tiny_batches(), forward=bad_forward, progress=False)
    assert hook_count(model) == 0


def test_unknown_or_unused_layer_is_an_error():
    model = TinyNet()
    with pytest.raises(ValueError, match="fc3"):
        collect_stats(model, ["fc1", "fc3"], tiny_batches(), progress=False)
    with pytest.raises(ValueError, match="no input"):
        collect_stats(model, ["fc1"], tiny_batches(), forward=lambda m, b: None, progress=False)
    assert hook_count(model) == 0


# ----------------------------------------------------------------------------------- merging
def test_merge_stats_equals_stats_of_all_batches():
    model = TinyNet()
    batches = tiny_batches(4)
    full = collect_stats(model, ["fc1", "fc2"], batches, hessian=True, progress=False)
    a = collect_stats(model, ["fc1", "fc2"], batches[:1], hessian=True, progress=False)
    b = collect_stats(model, ["fc1", "fc2"], batches[1:], hessian=True, progress=False)
    merged = merge_stats_dicts(a, b)
    for name in full:
        assert_stats_close(merged[name], full[name])
        assert_stats_close(merge_stats(a[name], b[name]), full[name])
    with pytest.raises(ValueError, match="Hessian"):
        merge_stats(a["fc1"], LayerStats(sq_sum=a["fc1"].sq_sum, count=1))


def test_all_reduce_is_noop_without_distributed():
    stats = collect_stats(TinyNet(), ["fc1"], tiny_batches(), progress=False)
    before = stats["fc1"].sq_sum.clone()
    assert all_reduce_stats(stats) is stats
    assert torch.equal(stats["fc1"].sq_sum, before)


# ----------------------------------------------------------------------------------- sequential
LLAMA_LINEARS = [
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
]
VIT_LINEARS = ["attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"]


def tiny_llama() -> nn.Module:
    from permsparse.models.tiny import tiny_llama as build

    return build(seed=0, max_position_embeddings=64)


def llama_batches() -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(2):
        ids = torch.randint(0, 128, (2, 12), generator=g)
        mask = torch.ones(2, 12, dtype=torch.long)
        mask[1, :3] = 0  # left padding in one row: the captured attention mask must be reused as is
        batches.append({"input_ids": ids, "attention_mask": mask})
    return batches


def tiny_vit() -> nn.Module:
    from permsparse.models.tiny import tiny_vit as build

    return build(seed=0, mlp_ratio=4.0)


def vit_batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(2)
    return [(torch.randn(3, 1, 8, 8, generator=g), torch.zeros(3, dtype=torch.long)) for _ in range(2)]


def wanda_on_block(model: nn.Module, pattern: NMPattern, seen: list[int]):
    """An ``on_block`` that prunes the block's linears in place with Wanda."""

    def on_block(index: int, stats: dict[str, LayerStats]) -> None:
        seen.append(index)
        pruner = WandaPruner()
        for name, s in stats.items():
            linear = model.get_submodule(name)
            mask = pruner.prune(linear.weight.detach(), s, pattern, name=name).mask
            linear.weight.data.mul_(mask)

    return on_block


@pytest.mark.parametrize(
    "build, batches, prefix, linears",
    [
        (tiny_llama, llama_batches, "model.layers", LLAMA_LINEARS),
        (tiny_vit, vit_batches, "blocks", VIT_LINEARS),
    ],
    ids=["llama", "vit"],
)
@pytest.mark.parametrize("hessian", [False, True])
def test_sequential_calibration(build, batches, prefix, linears, hessian):
    model = build()
    data = batches()
    blocks = list(model.get_submodule(prefix))
    names = [[f"{prefix}.{i}.{lin}" for lin in linears] for i in range(len(blocks))]
    flat = [n for block_names in names for n in block_names]
    hooks_before = hook_count(model)
    dense = collect_stats(model, flat, data, hessian=hessian, progress=False)

    # without pruning, sequential calibration reproduces dense calibration for every block
    seen: list[int] = []
    noop = collect_stats_sequential(
        model, blocks, names, data, lambda i, s: seen.append(i), hessian=hessian, progress=False
    )
    assert seen == [0, 1] and set(noop) == set(flat)
    for name in flat:
        assert_stats_close(noop[name], dense[name], rtol=1e-4, atol=1e-6)

    # pruning each block in on_block: block 0 sees dense inputs, block 1 sees the pruned block 0
    seen = []
    seq = collect_stats_sequential(
        model,
        blocks,
        names,
        data,
        wanda_on_block(model, NMPattern(2, 4), seen),
        hessian=hessian,
        progress=False,
    )
    assert seen == [0, 1]
    assert hook_count(model) == hooks_before
    for name in names[0]:
        assert_stats_close(seq[name], dense[name], rtol=1e-4, atol=1e-6)
    for name in names[1]:
        assert seq[name].count == dense[name].count
        assert not torch.allclose(seq[name].sq_sum, dense[name].sq_sum, rtol=1e-3)
    for block_names in names:
        for name in block_names:
            w = model.get_submodule(name).weight
            assert ((w != 0).reshape(w.shape[0], -1, 4).sum(-1) <= 2).all()


def test_sequential_only_calls_model_until_first_block():
    model = tiny_llama()
    calls: list[int] = []
    lm_head = model.get_submodule("lm_head")
    lm_head.register_forward_hook(lambda *a: calls.append(1))
    blocks = list(model.model.layers)
    names = [[f"model.layers.{i}.mlp.down_proj"] for i in range(2)]
    stats = collect_stats_sequential(model, blocks, names, llama_batches(), lambda i, s: None, progress=False)
    assert calls == []  # the forward stopped at blocks[0]: the head never ran
    assert stats["model.layers.1.mlp.down_proj"].count == 2 * 2 * 12


def test_sequential_argument_checks():
    model = tiny_vit()
    blocks = list(model.blocks)
    hooks_before = hook_count(model)
    with pytest.raises(ValueError, match="2 blocks but 1"):
        collect_stats_sequential(model, blocks, [["blocks.0.attn.qkv"]], vit_batches(), lambda i, s: None)
    with pytest.raises(RuntimeError, match="never reached"):
        collect_stats_sequential(
            model,
            blocks,
            [[], []],
            vit_batches(),
            lambda i, s: None,
            forward=lambda m, b: None,
            progress=False,
        )
    assert hook_count(model) == hooks_before


def _all_reduce_worker(rank: int, world: int, init_file: str, out_file: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        model = TinyNet()  # the same weights on both ranks
        stats = collect_stats(model, ["fc2"], tiny_batches(2, seed=rank), hessian=True, progress=False)
        all_reduce_stats(stats)
        if rank == 0:
            torch.save(
                {"sq_sum": stats["fc2"].sq_sum, "count": stats["fc2"].count, "h": stats["fc2"].hessian},
                out_file,
            )
    finally:
        dist.destroy_process_group()


def test_all_reduce_stats_sums_across_ranks(tmp_path):
    mp = pytest.importorskip("torch.multiprocessing")
    out = tmp_path / "out.pt"
    mp.spawn(_all_reduce_worker, args=(2, str(tmp_path / "init"), str(out)), nprocs=2, join=True)
    torch.manual_seed(0)
    model = TinyNet()
    a = collect_stats(model, ["fc2"], tiny_batches(2, seed=0), hessian=True, progress=False)["fc2"]
    b = collect_stats(model, ["fc2"], tiny_batches(2, seed=1), hessian=True, progress=False)["fc2"]
    expected = merge_stats(a, b)
    got = torch.load(out)
    assert got["count"] == expected.count == 40
    torch.testing.assert_close(got["sq_sum"], expected.sq_sum)
    torch.testing.assert_close(got["h"], expected.hessian)
