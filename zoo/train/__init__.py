"""Training: the shared engine (`zoo.train.engine`) and the tasks on it (classification now).

    >>> from zoo.train import parse_train_args, run_train
    >>> run_train(parse_train_args(["--model", "efficientvit_m0", "--data-dir", "data/", "--epochs", "5"]))
"""
from zoo.train.cli import parse_train_args, run_train, run_validate
from zoo.train.engine import Engine, Task, TrainConfig

__all__ = ["Engine", "Task", "TrainConfig", "parse_train_args", "run_train", "run_validate"]
