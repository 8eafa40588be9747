"""Entry point: ``python train.py model=vit_b sparsity=2:4 perm=learned`` (Hydra; ``-m`` sweeps)."""

import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    from permsparse.run import train

    results = train(cfg)
    # Hydra sweepers (e.g. Optuna in hparams_search/) minimise the returned value.
    pruned = results["metrics"]["pruned"]
    return next(iter(pruned.values()), None)


if __name__ == "__main__":
    main()
