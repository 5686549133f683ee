"""Runs glue.py like the command line does, but sends itself a signal once training reaches
the step given in GLUE_TEST_INTERRUPT ("SIGKILL:7" or "SIGTERM:6"): a crash or a preemption at
a known point, for the resume tests."""

import os
import signal
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app  # noqa: E402

import glue  # noqa: E402

signal_name, step = os.environ["GLUE_TEST_INTERRUPT"].split(":")
record_step = glue.TrainingCheckpoints.on_train_batch_end


def on_train_batch_end(self, batch, logs=None):
    if glue.trained_steps(self.model) == int(step):
        os.kill(os.getpid(), getattr(signal, signal_name))
    record_step(self, batch, logs)


glue.TrainingCheckpoints.on_train_batch_end = on_train_batch_end

if __name__ == "__main__":
    app.run(glue.main)
