"""`python tests/ddp_die_once.py TRAIN-ARGS...` under torchrun: the CLI's train command, except
that in the first attempt rank 1 dies (exit 3, no clean-up) while evaluating epoch 2, after
epoch 1's checkpoint is on disk. Used by tests/test_ddp.py to check that torchrun's restart
resumes the run."""

import os
import sys

import resnets.train as train_mod
from resnets.cli import main

if os.environ.get("TORCHELASTIC_RESTART_COUNT") == "0" and os.environ.get("RANK") == "1":
    real_evaluate = train_mod.evaluate
    calls = [0]

    def evaluate_then_die(*args, **kwargs):
        calls[0] += 1
        if calls[0] == 2:
            os._exit(3)
        return real_evaluate(*args, **kwargs)

    train_mod.evaluate = evaluate_then_die

sys.exit(main(["train", *sys.argv[1:]]))
