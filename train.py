"""Entry point: ``python train.py model=vit_b sparsity=2:4 perm=learned`` (Hydra; ``-m`` sweeps).

A bad config value or input (:class:`permsparse.errors.ConfigError`) prints its message alone and exits with
status 2; any other error keeps its traceback.
"""

import sys

import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    from permsparse.errors import ConfigError
    from permsparse.lit.callbacks import TrainingInterrupted
    from permsparse.run import train

    try:
        results = train(cfg)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        sys.exit(2)  # SystemExit passes through Hydra's job wrapper, which would print a traceback for an Exception
    except TrainingInterrupted as stop:
        overrides = " ".join(a for a in sys.argv[1:] if not a.startswith(("resume=", "-m", "--multirun")))
        print(f"\n{stop}.\nContinue with: python {sys.argv[0]} {overrides} resume={cfg.output_dir} "
              f"hydra.run.dir={cfg.output_dir}", file=sys.stderr, flush=True)
        sys.exit(130)  # the shell's code for "stopped by Ctrl-C"; a sweep stops here too
    if "metrics" not in results:  # a DDP rank other than 0: rank 0 evaluates and reports
        return None
    # Hydra sweepers (e.g. the Optuna sweeper plugin) minimise the returned value.
    pruned = results["metrics"]["pruned"]
    return next(iter(pruned.values()), None)


if __name__ == "__main__":
    main()
