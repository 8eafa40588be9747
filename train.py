"""Entry point: ``python train.py model=vit_b sparsity=2:4 perm=learned`` (Hydra; ``-m`` sweeps)."""

import sys

import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    from permsparse.lit.callbacks import TrainingInterrupted
    from permsparse.run import train

    try:
        results = train(cfg)
    except TrainingInterrupted as stop:
        overrides = " ".join(a for a in sys.argv[1:] if not a.startswith(("resume=", "-m", "--multirun")))
        print(f"\n{stop}.\nContinue with: python {sys.argv[0]} {overrides} resume={cfg.output_dir} "
              f"hydra.run.dir={cfg.output_dir}", file=sys.stderr, flush=True)
        sys.exit(130)  # the shell's code for "stopped by Ctrl-C"; a sweep stops here too
    if "metrics" not in results:  # a DDP rank other than 0: rank 0 evaluates and reports
        return None
    # Hydra sweepers (e.g. Optuna in hparams_search/) minimise the returned value.
    pruned = results["metrics"]["pruned"]
    return next(iter(pruned.values()), None)


if __name__ == "__main__":
    main()
