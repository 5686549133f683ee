"""Runs glue.py like the command line does, but a run sends itself a signal once its training
reaches the step given in GLUE_TEST_INTERRUPT ("SIGKILL:7" or "SIGTERM:6"): a crash or a
preemption at a known point, for the resume tests. "SIGTERM:6:command" sends it to the command
that started the run instead, "SIGKILL:6:group" to the command's whole process group.
GLUE_TEST_INTERRUPT_SEED=2 interrupts only the run of seed 2. A command started through this
file starts its runs through it too, so these reach them. GLUE_TEST_KILL_AFTER_EVALUATION=N
kills a run right after its N-th dev evaluation, before any checkpoint holds it.
GLUE_TEST_DEV_SCORES ("5:0.5,10:0.9") replaces every dev metric of the evaluation after that
many batches by that number.
GLUE_TEST_LOSS_SCALE sets the initial loss scale of mixed_float16 training, so that a test can
force skipped steps."""

import os
import signal
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import keras  # noqa: E402
from absl import app  # noqa: E402

import glue  # noqa: E402

if os.environ.get("GLUE_TEST_INTERRUPT"):
    signal_name, step, *whom = os.environ["GLUE_TEST_INTERRUPT"].split(":")
    record_step = glue.TrainingCheckpoints.on_train_batch_end

    def on_train_batch_end(self, batch, logs=None):
        if self.evaluations.batches == int(step) and os.environ.get(
                "GLUE_TEST_INTERRUPT_SEED", glue.FLAGS.seed[0]) == glue.FLAGS.seed[0]:
            if whom == ["group"]:
                os.killpg(os.getpgid(0), getattr(signal, signal_name))
            os.kill(os.getppid() if whom == ["command"] else os.getpid(),
                    getattr(signal, signal_name))
        record_step(self, batch, logs)

    glue.TrainingCheckpoints.on_train_batch_end = on_train_batch_end

if os.environ.get("GLUE_TEST_DEV_SCORES"):
    scripted = {int(step): float(score) for step, score in (
        pair.split(":") for pair in os.environ["GLUE_TEST_DEV_SCORES"].split(","))}
    real_evaluation = glue.DevEvaluations.run_evaluation

    def scripted_evaluation(self):
        evaluate = self.evaluate

        def scored(model):
            metrics, collapsed, predictions = evaluate(model)
            return {split: {name: scripted[self.batches] for name in values}
                    for split, values in metrics.items()}, collapsed, predictions

        self.evaluate = scored
        try:
            real_evaluation(self)
        finally:
            self.evaluate = evaluate

    glue.DevEvaluations.run_evaluation = scripted_evaluation

if os.environ.get("GLUE_TEST_KILL_AFTER_EVALUATION"):
    evaluation = glue.DevEvaluations.run_evaluation

    def evaluation_then_kill(self):
        evaluation(self)
        if len(self.records) == int(os.environ["GLUE_TEST_KILL_AFTER_EVALUATION"]):
            os.kill(os.getpid(), signal.SIGKILL)

    glue.DevEvaluations.run_evaluation = evaluation_then_kill

if os.environ.get("GLUE_TEST_LOSS_SCALE"):
    scale = float(os.environ["GLUE_TEST_LOSS_SCALE"])
    wrap = keras.optimizers.LossScaleOptimizer.__init__

    def with_initial_scale(self, inner_optimizer, initial_scale=scale, **kwargs):
        wrap(self, inner_optimizer, initial_scale=scale, **kwargs)

    keras.optimizers.LossScaleOptimizer.__init__ = with_initial_scale

if __name__ == "__main__":
    app.run(glue.main)
