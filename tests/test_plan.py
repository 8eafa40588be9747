"""The memory planner against the tensors a learned run really allocates (docs/planning.md).

The exact rows (weights, scores, masks, costs, gradients, optimiser states, workspaces, Sinkhorn intermediates) must
equal the bytes of the run's own tensors; what autograd saves in one step (masked weights and activations) must
agree with the meta-device trace to within 0.1 %, and the teacher's capture exactly. Peak memory end to end is
checked against the exact peak of torch's CPU allocator during the steps (``StepMeter(allocations=True)``, the
profiler's allocation events); CPU RSS is too noisy to test.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from conftest import TINY_LM, TINY_VIT, compose_cfg

from permsparse.config import validate_config
from permsparse.errors import ConfigError
from permsparse.lit.callbacks import PermutationLearning
from permsparse.plan import _group_plans, main, meta_model, parse_bytes, plan_run
from permsparse.run import train

QUICK = ["perm=learned", "eval.identity_baseline=false", "eval.dense_baseline=false", "learning.max_steps=2",
         "save_pruned=false"]


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


class _Measure:
    """Records, from a real run's first training step, the tensors the learned method holds and what autograd saves:
    during the Sinkhorn refresh (``sinkhorn``) and during the forward pass (``step``), each storage once, leaving out
    the persistent ones (weights, scores, masks, workspaces, costs) and the teacher's outputs (counted apart)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.saved: dict[str, dict[int, int]] = {"sinkhorn": {}, "step": {}}
        self.teacher: dict[int, int] = {}
        self.output: tuple[int, int] | None = None
        self.held: dict[str, int] = {}
        self._stack = contextlib.ExitStack()
        start, end = PermutationLearning.on_train_batch_start, PermutationLearning.on_train_batch_end
        measure = self

        def on_start(callback, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == 0:
                measure._begin(pl_module)
            start(callback, trainer, pl_module, batch, batch_idx)
            measure.phase = "step"

        def on_end(callback, trainer, pl_module, outputs, batch, batch_idx):
            if not measure.held:  # after the first optimiser step
                measure._stack.close()
                measure._end(trainer, pl_module)
            end(callback, trainer, pl_module, outputs, batch, batch_idx)

        monkeypatch.setattr(PermutationLearning, "on_train_batch_start", on_start)
        monkeypatch.setattr(PermutationLearning, "on_train_batch_end", on_end)

    def _begin(self, pl_module) -> None:
        learned = pl_module.permutations
        key = self._key
        self.persistent = {key(t) for t in [*pl_module.model.parameters(), *pl_module.model.buffers(),
                                            *learned.parameters(), *learned.buffers()]}
        for state in learned._states.values():
            self.persistent |= {key(t) for t in [*state.scores_t.values(), *state.masks_t.values()]}
        self.persistent |= {key(m.workspace) for m, _, _ in learned._masked if m.workspace is not None}
        self.phase = "sinkhorn"

        def pack(t):
            k = key(t)
            if k not in self.persistent and k not in self.teacher and all(k not in d for d in self.saved.values()):
                self.saved[self.phase][k] = t.untyped_storage().nbytes()
            return t

        self._stack.enter_context(torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t))
        forward = pl_module.forward_with_blocks

        def forward_with_blocks(batch):
            output, captured = forward(batch)
            if self.held:
                return output, captured
            if not torch.is_grad_enabled():
                self.teacher.update({key(t): t.untyped_storage().nbytes() for t in [*captured, output]})
            else:
                self.output = (key(output), output.untyped_storage().nbytes())
            return output, captured

        pl_module.forward_with_blocks = forward_with_blocks

    @staticmethod
    def _key(t) -> int:
        return t.untyped_storage().data_ptr()

    def _end(self, trainer, pl_module) -> None:
        learned = pl_module.permutations
        states = learned._states.values()
        optimizer = trainer.optimizers[0]
        self.held = {
            "frozen weights": sum(t.untyped_storage().nbytes() for t in
                                  {id(t): t for t in [*pl_module.model.parameters(), *pl_module.model.buffers()]}
                                  .values()),
            "pruner scores": _nbytes(t for s in states for t in s.scores_t.values()),
            "masks": _nbytes(t for s in states for t in s.masks_t.values()),
            "costs + Sinkhorn potentials": _nbytes([*learned.parameters(), *learned.buffers()]),
            "cost gradients": _nbytes(p.grad for p in learned.parameters() if p.grad is not None),
            "optimiser states (AdamW)": _nbytes(v for s in optimizer.state.values() for v in s.values()
                                                if torch.is_tensor(v)),
            "gradient workspaces": _nbytes(m.workspace for m, _, _ in learned._masked if m.workspace is not None),
        }

    def step_saved(self) -> int:
        output_key, output_bytes = self.output
        return sum(self.saved["step"].values()) + (0 if output_key in self.saved["step"] else output_bytes)


@pytest.mark.parametrize("overrides", [
    [*TINY_LM, "perm.method.grad_precision=bfloat16"],  # with gradient workspaces
    [*TINY_LM, "perm.foldable=true", "perm.method.grad_precision=float32"],  # tied head costs (GQA)
    [*TINY_VIT, "perm.method.grad_precision=float32", "learning.train_samples=32"],
], ids=["llama-bf16-workspace", "llama-foldable", "vit"])
def test_planned_bytes_equal_what_a_learned_run_allocates(tmp_path, monkeypatch, overrides):
    cfg = compose_cfg([*overrides, *QUICK], tmp_path)
    plan = plan_run(cfg)
    measured = _Measure(monkeypatch)
    train(cfg)

    for name, value in measured.held.items():
        assert plan.item(name).bytes == value, name
    model, _ = meta_model(cfg.model)
    from permsparse.config import build_method
    from permsparse.models.binding import get_spec
    from permsparse.sparsity.nm import NMPattern

    groups = _group_plans(model, get_spec(model).groups(model), build_method(cfg), NMPattern(2, 4))
    tied = sum((g.blocks - g.free) * g.g * g.g * 4 for g in groups)  # alive in the groups' P, not saved by autograd
    assert ("foldable=true" in " ".join(overrides)) == (tied > 0)
    assert plan.item("Sinkhorn / permutation intermediates").bytes - tied == sum(measured.saved["sinkhorn"].values())
    assert plan.item("distillation teacher capture").bytes == sum(measured.teacher.values())
    planned = plan.item("masked weights kept for backward").bytes + plan.item("activations (one step)").bytes
    assert planned == pytest.approx(measured.step_saved(), rel=1e-3)


def test_train_stops_with_the_table_before_loading_weights(tmp_path, monkeypatch):
    import permsparse.run as run

    def no_load(*args, **kwargs):
        raise AssertionError("weights were loaded although the plan does not fit")

    monkeypatch.setattr(run, "_load", no_load)
    with pytest.raises(ConfigError, match="does not fit the device memory") as err:
        train(compose_cfg([*TINY_LM, "perm=learned", "plan.device_memory=1MB"], tmp_path))
    assert "DOES NOT FIT" in str(err.value) and "masks" in str(err.value) and "activations" in str(err.value)


def test_the_allocation_peak_counts_only_inside_the_marked_steps():
    from permsparse.measure import _STEP_BEGIN, _STEP_END, allocation_peak

    mib = 2**20
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        kept = torch.empty(3 * mib, dtype=torch.uint8)  # before the step: raises the level, not a peak of its own
        with torch.profiler.record_function(_STEP_BEGIN):
            pass
        transient = torch.empty(mib, dtype=torch.uint8)
        del transient
        with torch.profiler.record_function(_STEP_END):
            pass
        after = torch.empty(10 * mib, dtype=torch.uint8)  # after the step: not counted
        del after
    assert allocation_peak(prof) == 4 * mib
    del kept


@pytest.mark.parametrize("overrides", [[], ["learning.mode=block"]], ids=["e2e", "block"])
def test_the_planned_total_is_within_15_percent_of_the_measured_peak(tmp_path, overrides):
    from permsparse.measure import MEASURED_RUN, StepMeter

    cfg = compose_cfg([*TINY_LM, *MEASURED_RUN, "learning.max_steps=3", *overrides], tmp_path)
    plan = plan_run(cfg)
    with StepMeter(allocations=True) as meter:
        train(cfg)
    assert len(meter.steps) == (3 if not overrides else 6)  # two blocks of three steps block-local
    assert meter.alloc_peak == pytest.approx(plan.total, rel=0.15)


def test_block_mode_plans_one_block_on_the_device_and_the_cache_on_the_host(tmp_path):
    e2e = plan_run(compose_cfg([*TINY_LM, "perm=learned"], tmp_path))
    cfg = compose_cfg([*TINY_LM, "perm=learned", "learning.mode=block", "learning.block_steps=7"], tmp_path)
    validate_config(cfg)  # block mode trains now (tests/test_block_local.py)
    block = plan_run(cfg)
    assert block.total < e2e.total
    assert block.item("masks").bytes * 2 == e2e.item("masks").bytes  # one of two identical blocks
    assert block.steps == 7 and block.blocks == 2  # learning.block_steps per block, for every block
    host = {i.name: i.bytes for i in block.host}
    assert host["block input cache"] > 0 and "block input cache" not in {i.name for i in block.items}
    assert host["dense copy of the current block"] == block.item("masks").bytes  # fp32 weights, fp32 0/1 masks
    assert any("one block's weights" in n for n in block.notes)


def test_a_streamed_block_plan_holds_no_block_on_the_host_but_caches_every_phase(tmp_path):
    """learning.stream=true: the device rows are the in-memory block plan's; the host holds the modules outside the
    blocks (not the model), one block's statistics, and the calibration and evaluation hidden states."""
    from permsparse.models.tiny import tiny_llama

    base = [*TINY_LM, "perm=learned", "learning.mode=block"]
    memory = plan_run(compose_cfg(base, tmp_path))
    streamed = plan_run(compose_cfg([*base, "learning.stream=true"], tmp_path))
    assert [(i.name, i.bytes) for i in streamed.items] == [(i.name, i.bytes) for i in memory.items]
    host = {i.name: i.bytes for i in streamed.host}
    assert "model as loaded" not in host and "model as loaded" in {i.name for i in memory.host}
    model = tiny_llama(seed=0)
    tensors = [*model.named_parameters(), *model.named_buffers()]  # buffers: the rotary frequencies
    outside = sum(t.numel() * t.element_size() for n, t in tensors if not n.startswith("model.layers."))
    assert host["modules outside the blocks"] == outside
    memory_host = {i.name: i.bytes for i in memory.host}
    assert host["calibration statistics"] * 2 == memory_host["calibration statistics"]  # one of two equal blocks
    hidden = 64 * 4  # one token's fp32 hidden state
    assert host["calibration windows' hidden states"] == 4 * 32 * hidden  # calibration.samples x seq_len
    assert host["evaluation hidden states"] == 3 * (4 + 2) * 32 * hidden  # dense, identity, pruned x 6 windows
    sequential = plan_run(compose_cfg([*base, "learning.stream=true", "calibration.sequential=true",
                                       "eval.dense_baseline=false"], tmp_path))
    host = {i.name: i.bytes for i in sequential.host}
    assert host["calibration windows' hidden states"] == 2 * 4 * 32 * hidden  # one copy per pruned phase
    assert host["evaluation hidden states"] == 2 * (4 + 2) * 32 * hidden
    assert any("checkpoint's shards" in n for n in sequential.notes)
    # a key the dataset config leaves out counts with the data module's own default (TextDataModule: 32 windows)
    default = plan_run(compose_cfg([*base, "learning.stream=true", "~dataset.datamodule.eval_windows"], tmp_path))
    assert {i.name: i.bytes for i in default.host}["evaluation hidden states"] == 3 * (32 + 2) * 32 * hidden


def test_the_issue_shapes_plan_offline_from_their_yaml(tmp_path):
    """LLaMA-2 shapes without network (conftest sets HF_HUB_OFFLINE): 7B's 6,738,415,616 parameters in fp32; its
    block-local run fits 24 GB, its end-to-end run does not fit 80 GB (the cold Sinkhorn's saved iterates are the
    largest row); a 70B block-local run fits 80 GB."""
    gpu = ["perm=learned", "trainer=gpu"]
    e2e = plan_run(compose_cfg(["model=llama2_7b", *gpu, "plan.device_memory=80GB"], tmp_path))
    assert "shape fallback" in e2e.title[0]
    assert abs(e2e.item("frozen weights").bytes - 6_738_415_616 * 4) < 2**20  # + the rotary buffers
    assert e2e.fits is False and e2e.enforced
    assert max(e2e.items, key=lambda i: i.bytes).name == "Sinkhorn / permutation intermediates"
    block = plan_run(compose_cfg(["model=llama2_7b", *gpu, "learning.mode=block", "plan.device_memory=24GB"],
                                 tmp_path))
    assert block.fits is True
    big = plan_run(compose_cfg(["model=llama2_70b", *gpu, "learning.mode=block", "plan.device_memory=80GB"],
                               tmp_path))
    assert big.fits is True


def test_fsdp_and_ddp_rows_against_the_single_device_plan(tmp_path):
    single = plan_run(compose_cfg([*TINY_LM, "perm=learned"], tmp_path))
    ddp = plan_run(compose_cfg([*TINY_LM, "perm=learned", "trainer=ddp"], tmp_path))
    fsdp = plan_run(compose_cfg([*TINY_LM, "perm=learned", "trainer=fsdp", "trainer.accelerator=cpu"], tmp_path))
    costs = single.item("cost gradients").bytes
    assert ddp.total == single.total + costs  # + the DDP gradient buckets
    # FSDP shards parameters (frozen weights, costs) and optimiser states; the plain tensors stay whole
    assert fsdp.item("frozen weights").bytes == single.item("frozen weights").bytes // 2
    assert fsdp.item("optimiser states (AdamW)").bytes == single.item("optimiser states (AdamW)").bytes // 2
    for row in ("masks", "pruner scores", "costs + Sinkhorn potentials", "cost gradients",
                "activations (one step)"):
        assert fsdp.item(row).bytes == single.item(row).bytes, row
    assert fsdp.item("FSDP gathered units").bytes > costs // 2
    assert fsdp.steps == ddp.steps
    assert ddp.steps == single.steps // 2  # the data is split across the two ranks


def test_sizes_parse_in_si_and_binary_units():
    assert parse_bytes("80GB") == 80 * 10**9 and parse_bytes("80GiB") == 80 * 2**30
    assert parse_bytes("24G") == 24 * 10**9 and parse_bytes(1024) == 1024 and parse_bytes(None) is None
    with pytest.raises(ConfigError, match="plan.device_memory"):
        parse_bytes("lots")


def test_the_command_line_prints_the_table_and_says_when_it_does_not_fit(capsys):
    assert main([*TINY_LM, "perm=learned", "device_memory=1KB"]) == 1  # device_memory= is short for plan.*
    out = capsys.readouterr().out
    assert "DOES NOT FIT" in out and "optimiser states (AdamW)" in out and "FLOPs" in out


def test_the_llama2_7b_single_80gb_experiment_fits_as_its_header_says(tmp_path):
    """conf/experiment/llama2_7b_a100.yaml: the paper's 7B row, block-local, on one declared 80 GB device; the same
    protocol end to end does not fit, which is why the experiment is block-local."""
    cfg = compose_cfg(["experiment=llama2_7b_a100"], tmp_path)
    from permsparse.config import _check_block_mode

    _check_block_mode(cfg)  # block mode's own checks (one device, perm.distill, precision) pass; validate_config
    # would also want the checkpoint in the HF cache, which this offline test has not
    assert (cfg.learning.mode, cfg.pruner.name, cfg.perm.name, cfg.sparsity.n, cfg.sparsity.m) == \
        ("block", "wanda", "learned", 2, 4)
    assert cfg.perm.optimizer.lr == 1e-4 and cfg.learning.max_epochs == 20  # the paper's LLM hyperparameters
    plan = plan_run(cfg)
    assert plan.enforced and plan.fits is True
    assert plan.device_memory == 80 * 10**9
    assert abs(plan.total - 12.31 * 2**30) < 0.01 * 2**30  # the header's "total 12.31 GiB"
    e2e = plan_run(compose_cfg(["experiment=llama2_7b_a100", "learning.mode=e2e"], tmp_path))
    assert e2e.fits is False
