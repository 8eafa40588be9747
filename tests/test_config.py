"""Every config group composes, and bad values give one clear error before anything loads."""

from pathlib import Path

import pytest
from conftest import CONF, compose_cfg
from omegaconf import open_dict

from permsparse.config import ConfigError, validate_config


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def test_default_config_is_the_embedded_offline_default():
    cfg = compose_cfg([], Path("/tmp/x"))
    assert (cfg.model.name, cfg.dataset.name, cfg.sparsity.name, cfg.pruner.name, cfg.perm.name) == (
        "smollm2_135m", "shakespeare", "2:4", "wanda", "learned")
    validate_config(cfg)


@pytest.mark.parametrize("group", ["model", "dataset", "sparsity", "pruner", "perm", "trainer", "logger"])
def test_every_option_of_every_group_composes(group):
    options = _options(group)
    assert options, f"conf/{group} is empty"
    for option in options:
        cfg = compose_cfg([f"{group}={option}"], Path("/tmp/x"))
        assert group in cfg


def test_sparsity_options_parse_from_the_command_line():
    for name in ["2:4", "4:8", "1:4", "2:8"]:
        cfg = compose_cfg([f"sparsity={name}"], Path("/tmp/x"))
        assert f"{cfg.sparsity.n}:{cfg.sparsity.m}" == name == cfg.sparsity.name


def test_every_model_matches_a_dataset_of_its_task():
    tasks = {opt: compose_cfg([f"dataset={opt}"], Path("/tmp/x")).dataset.task for opt in _options("dataset")}
    for model in _options("model"):
        cfg = compose_cfg([f"model={model}"], Path("/tmp/x"))
        assert cfg.model.task in tasks.values()


@pytest.mark.parametrize(
    "overrides,needle",
    [
        (["sparsity.n=5"], "N must not exceed M"),
        (["sparsity.n=0"], "N must be >= 1"),
        (["sparsity.m=0"], "M must be >= 1"),
        (["model=tiny_vit", "dataset=shakespeare"], "is a image_classification model but dataset=shakespeare"),
        (["calibration.samples=0"], "calibration.samples=0 is invalid"),
        (["perm.method.groups=-1"], "perm.method.groups=-1 is invalid"),
        (["learning.max_steps=0"], "trains nothing"),
        (["perm.method.mode=medium"], "perm.method.mode='medium' is invalid; choose hard or soft"),
        (["perm.method.grad_precision=fp8"], "perm.method.grad_precision='fp8' is invalid; choose auto, float32 or bfloat16"),
        (["perm.method.tau_end=0"], "temperatures must be > 0"),
        (["resume=/nonexistent/run"], "resume=/nonexistent/run is not a folder"),
    ],
)
def test_bad_configs_fail_with_a_clear_message(overrides, needle):
    cfg = compose_cfg(overrides, Path("/tmp/x"))
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        validate_config(cfg)


def test_missing_key_is_named():
    cfg = compose_cfg([], Path("/tmp/x"))
    with open_dict(cfg):
        del cfg.sparsity.n
    with pytest.raises(ConfigError, match="sparsity.n is missing"):
        validate_config(cfg)


@pytest.mark.parametrize("experiment", _options("experiment"))
def test_every_experiment_composes_and_validates(experiment, tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    overrides = [f"experiment={experiment}"]
    cfg = compose_cfg(overrides, tmp_path)
    if cfg.dataset.name == "imagenet":  # a local ImageFolder: validation checks that it holds images
        with pytest.raises(ConfigError, match="dataset.datamodule.root"):
            validate_config(cfg)
        for split in ("train", "val"):
            (tmp_path / split / "n01440764").mkdir(parents=True)
            (tmp_path / split / "n01440764" / "x.JPEG").write_bytes(b"")
        cfg = compose_cfg([*overrides, f"dataset.datamodule.root={tmp_path}"], tmp_path)
    assert cfg.experiment_name == experiment
    if "load_smollm2" not in cfg.model.load._target_ and "offline_vit" not in cfg.model.load._target_:
        # a hub model, offline (conftest) and not in the (empty) cache: validation names what to download
        with pytest.raises(ConfigError, match="from the Hugging Face Hub, which is offline here"):
            validate_config(cfg)
        monkeypatch.setattr("permsparse.config._in_hub_cache", lambda repo, files: True)
    if cfg.eval.lm_eval.get("tasks") and cfg.eval.lm_eval.get("data_dir") is None:
        with pytest.raises(ConfigError, match="eval.lm_eval.data_dir is not set"):  # the tasks' data, offline
            validate_config(cfg)
        return
    validate_config(cfg)


def test_learned_yaml_and_class_hold_the_same_knobs_and_defaults():
    """The learned method's defaults live in LearnedPermutation; conf/perm/learned.yaml lists every field with the
    same value, so neither can drift (adding a knob: a field there, a key here)."""
    import dataclasses

    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from permsparse.permutation.learned import LearnedPermutation

    yaml = OmegaConf.load(CONF / "perm" / "learned.yaml")
    node = yaml.method
    fields = {f.name: f.default for f in dataclasses.fields(LearnedPermutation)}
    assert set(node) - {"_target_"} == set(fields)
    interpolated = {k for k in node if OmegaConf.is_interpolation(node, k)}
    assert interpolated == {"foldable", "base", "seed"}  # perm.foldable, perm.base and the run's seed
    assert yaml.base == fields["base"]
    for key, default in fields.items():
        if key not in interpolated:
            assert node[key] == default, f"perm.method.{key}: yaml {node[key]!r} != class default {default!r}"
    built = instantiate(compose_cfg([], Path("/tmp/x")).perm.method)
    assert built == LearnedPermutation()


@pytest.mark.parametrize("perm", _options("perm"))
def test_every_permutation_method_is_built_by_its_target(perm):
    from permsparse.permutation.base import PermutationMethod
    from permsparse.permutation.learned import LearnedPermutation
    from permsparse.run import build_permutation

    cfg = compose_cfg([f"perm={perm}"], Path("/tmp/x"))
    method = build_permutation(cfg)
    learned = cfg.perm.method._target_.endswith("LearnedPermutation")
    assert isinstance(method, LearnedPermutation if learned else PermutationMethod)
    assert learned == (perm in ("learned", "learned_paper", "permllm"))


def test_sparsegpt_selects_the_published_block_by_block_calibration_unless_overridden():
    assert compose_cfg(["pruner=sparsegpt"], Path("/tmp/x")).calibration.sequential is True
    assert compose_cfg(["pruner=sparsegpt", "calibration.sequential=false"], Path("/tmp/x")).calibration.sequential is False
    for pruner in ("magnitude", "wanda", "ria"):
        assert compose_cfg([f"pruner={pruner}"], Path("/tmp/x")).calibration.sequential is False


@pytest.mark.parametrize(("overrides", "unused"), [
    (["experiment=vit_fmnist"], None),                            # perm=learned reads perm.base=greedy
    (["perm=learned_paper"], None),                              # its own perm.base agrees with its method's
    (["experiment=vit_fmnist", "perm=learned_paper"], "perm.base=greedy is not used: perm=learned learns in the "
                                                      "frame perm.method.base=none"),
    (["experiment=vit_fmnist", "perm=permllm"], "perm.base=greedy is not used: perm=permllm learns in the frame "
                                                "perm.method.base=none"),
    (["perm.method.base=none"], "perm.base=ria is not used: perm=learned learns in the frame perm.method.base=none"),
    (["perm.base=greedy"], None),
    (["perm=ria"], None),                                         # a heuristic has no frame
])
def test_a_perm_base_that_the_method_ignores_is_named_in_a_warning(overrides, unused, tmp_path, caplog):
    cfg = compose_cfg(overrides, tmp_path)
    with caplog.at_level("WARNING", logger="permsparse"):
        validate_config(cfg)
    warned = [r.getMessage() for r in caplog.records if "perm.base=" in r.getMessage()]
    assert warned == ([] if unused is None else [unused + " (set it to choose the frame of this method)"])
