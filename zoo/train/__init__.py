"""Training: the shared engine (`zoo.train.engine`) and one module per task on it
(`zoo.train.classification`, `zoo.train.psf`). The command-line front end, with timm's
``train.py`` flags, is `zoo.cli.train`:

    >>> from zoo.cli.train import parse_train_args, run_train
    >>> run_train(parse_train_args(["--model", "efficientvit_m0", "--data-dir", "data/", "--epochs", "5"]))
"""
from zoo.train.engine import Engine, Task, TrainConfig

__all__ = ["Engine", "Task", "TrainConfig"]
