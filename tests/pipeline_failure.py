"""A callback that kills a training run at a given step, for the pipeline's resume test (run in a stage's process)."""

from __future__ import annotations

import os
from typing import Any

import lightning.pytorch as pl

#: Set to a step number to make :class:`FailAtStep` stop the run with an error after that step.
FAIL_AT_STEP = "PIPELINE_TEST_FAIL_AT_STEP"


class FailAtStep(pl.Callback):
    """Raises after the optimizer step named by ``$PIPELINE_TEST_FAIL_AT_STEP`` (nothing when it is unset)."""

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        step = os.environ.get(FAIL_AT_STEP)
        if step and trainer.global_step == int(step):
            raise RuntimeError(f"killed at step {step} (test)")
