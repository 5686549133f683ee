"""Seeing the runs: TensorBoard logs of every run, the results report with its figures, and
progress lines that stay readable."""

import collections
import glob
import os
import re

import pytest
import tensorflow as tf

import glue
from conftest import entry_of, error_of, glue_main

TINY = ("--batch_size=4", "--max_sequence_length=32")


def events(folder):
    """`{tag: [(step, value), ...]}` of the event files in one folder, read back with
    TensorFlow alone, in the order TensorBoard reads the files."""
    points = collections.defaultdict(list)
    for path in sorted(glob.glob(os.path.join(folder, "events.out.tfevents.*"))):
        for event in tf.compat.v1.train.summary_iterator(path):
            for value in event.summary.value:
                points[value.tag].append((event.step, float(tf.make_ndarray(value.tensor))))
    return dict(points)


def steps(points):
    return [step for step, _ in points]


# --- TensorBoard --------------------------------------------------------------------------------

def test_a_run_s_logs_hold_its_training_and_every_evaluation(glue_data, tiny_preset, tmp_path,
                                                             run_glue):
    run_glue("--task_name=rte", "--epochs=2", "--evaluations_per_epoch=2",
             f"--preset={tiny_preset}", f"--data_dir={glue_data[0]}",
             f"--submission_directory={tmp_path}", *TINY)
    folder = tmp_path / "tensorboard" / "rte" / entry_of(tmp_path)["fingerprint_id"] / \
        "lr5e-05_seed42"  # the task's runs under one settings
    assert sorted(os.listdir(folder)) == ["train", "validation"]
    train, validation = events(folder / "train"), events(folder / "validation")
    # 5 batches an epoch: a point after each (1% of an epoch is less than a batch), and one at
    # each epoch's end.
    assert sorted(train) == ["batch_examples_per_second", "batch_learning_rate", "batch_loss",
                             "epoch_examples_per_second", "epoch_learning_rate", "epoch_loss"]
    for tag in ("batch_loss", "batch_learning_rate", "batch_examples_per_second"):
        assert steps(train[tag]) == list(range(1, 11)), tag
    for tag in ("epoch_loss", "epoch_learning_rate", "epoch_examples_per_second"):
        assert steps(train[tag]) == [5, 10], tag
    assert train["epoch_learning_rate"][-1][1] == 0.0  # the schedule ends at 0
    assert train["batch_learning_rate"][0][1] == pytest.approx(5e-5)  # after 1 warmup step
    run, = entry_of(tmp_path)["runs"]
    assert sorted(validation) == ["epoch_accuracy", "epoch_task_score"]
    assert validation["epoch_accuracy"] == [
        (evaluation["step"], pytest.approx(evaluation["validation"]["accuracy"]))
        for evaluation in run["evaluations"]]
    assert steps(validation["epoch_task_score"]) == [3, 5, 8, 10]


def test_steps_only_increase_across_a_kill_and_resume(glue_data, tiny_preset, tmp_path, run_glue,
                                                      monkeypatch):
    args = ("--task_name=rte", "--epochs=2", "--evaluations_per_epoch=2",
            "--checkpoint_every_steps=3", f"--checkpoint_dir={tmp_path / 'checkpoints'}",
            f"--preset={tiny_preset}", f"--data_dir={glue_data[0]}",
            f"--submission_directory={tmp_path}", *TINY)
    real = glue.TrainingCheckpoints.on_train_batch_end

    def crash_at_step_8(self, batch, logs=None):
        real(self, batch, logs)
        if self.evaluations.batches == 8:  # logged to step 8 (an evaluation too), checkpointed at 6
            raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(glue.TrainingCheckpoints, "on_train_batch_end", crash_at_step_8)
        with pytest.raises(KeyboardInterrupt):
            run_glue(*args)
    folder, = (tmp_path / "tensorboard" / "rte").glob("*/lr5e-05_seed42")
    assert max(steps(events(folder / "train")["batch_loss"])) == 8
    assert steps(events(folder / "validation")["epoch_accuracy"]) == [3, 5, 8]
    run_glue(*args)
    train, validation = events(folder / "train"), events(folder / "validation")
    assert steps(train["batch_loss"]) == list(range(1, 11))  # 7 and 8 once, nothing repeated
    assert steps(train["epoch_loss"]) == [5, 10]
    assert steps(validation["epoch_accuracy"]) == [3, 5, 8, 10]


def test_a_sweep_gives_one_folder_per_run_and_the_flags_move_or_stop_them(
        glue_data, tiny_preset, tmp_path, run_glue):
    common = ("--task_name=wnli", "--epochs=1", f"--preset={tiny_preset}",
              f"--data_dir={glue_data[0]}", *TINY)
    run_glue(*common, "--learning_rate=1e-3,5e-5", "--seed=1,2",
             f"--submission_directory={tmp_path / 'out'}", f"--tensorboard_dir={tmp_path / 'tb'}")
    settings, = os.listdir(tmp_path / "tb" / "wnli")
    assert sorted(os.listdir(tmp_path / "tb" / "wnli" / settings)) == [
        "lr0.001_seed1", "lr0.001_seed2", "lr5e-05_seed1", "lr5e-05_seed2"]
    assert not (tmp_path / "out" / "tensorboard").exists()
    run_glue(*common, f"--submission_directory={tmp_path / 'off'}", "--notensorboard")
    assert not (tmp_path / "off" / "tensorboard").exists()
    (tmp_path / "a_file").write_text("")
    assert "--tensorboard_dir: " in error_of(run_glue, *common,
                                             f"--tensorboard_dir={tmp_path / 'a_file' / 'tb'}")


# --- The report ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def swept(glue_data, tiny_preset, tmp_path_factory):
    """A submission folder with a 2-rate, 2-seed RTE sweep and one WNLI run."""
    out = tmp_path_factory.mktemp("swept")
    for args in (["--task_name=rte", "--learning_rate=1e-3,5e-5", "--seed=1,2",
                  "--evaluations_per_epoch=2"], ["--task_name=wnli"]):
        glue_main(*args, "--epochs=2", f"--preset={tiny_preset}", f"--data_dir={glue_data[0]}",
                  f"--submission_directory={out}", *TINY)
    return out


def test_the_report_shows_the_numbers_of_the_results(swept):
    report = (swept / "glue_report.md").read_text()
    results = {task: entry_of(swept, task) for task in ("rte", "wnli")}
    for task, entry in results.items():
        submitted = entry["submitted_run"]
        summary = entry["seed_summary"][glue.rate_label(submitted["learning_rate"])]
        values = summary["validation"]["accuracy"]
        row = (f"| {task} | validation | accuracy | {100 * values['median']:.2f} ± "
               f"{100 * values['std']:.2f} | {summary['task_score']['runs']} | "
               f"{summary['collapsed_runs']} | lr {submitted['learning_rate']:g}, seed "
               f"{submitted['seed']} |")
        assert row in report
    for rate, summary in results["rte"]["seed_summary"].items():  # the sweep's medians
        median = f"{100 * summary['task_score']['median']:.2f}"
        assert re.search(rf"\| (\*\*)?{re.escape(rate)}(\*\* \(chosen\))? \| 2 \| {median} \|",
                         report), rate
    score = entry_of(swept, "glue_score")["average"]
    assert f"GLUE average over 2 tasks: {100 * score:.2f}" in report


def test_every_image_of_the_report_exists_and_decodes(swept):
    report = (swept / "glue_report.md").read_text()
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report)
    assert links == ["glue_report/rte_dev_score.png", "glue_report/wnli_dev_score.png",
                     "glue_report/seed_spread.png"]
    for link in links:
        image = tf.io.decode_png(tf.io.read_file(str(swept / link)))
        assert image.shape[0] > 100 and image.shape[1] > 100 and image.shape[2] in (3, 4)


def test_a_figure_that_fails_costs_a_warning_line_only(glue_data, tiny_preset, tmp_path, run_glue,
                                                       monkeypatch, capsys):
    def broken(drawn, *args):
        raise RuntimeError("no fonts here")

    monkeypatch.setattr(glue, "draw_dev_scores", broken)
    run_glue("--task_name=wnli", "--epochs=1", f"--preset={tiny_preset}",
             f"--data_dir={glue_data[0]}", f"--submission_directory={tmp_path}", *TINY)
    out = capsys.readouterr().out
    warnings = [line for line in out.splitlines() if line.startswith("warning:")]
    assert warnings == ["warning: glue_report.md: could not draw wnli_dev_score.png "
                        "(RuntimeError: no fonts here); the report goes without it"]
    assert entry_of(tmp_path, "wnli")["runs"] and (tmp_path / "WNLI.tsv").exists()
    report = (tmp_path / "glue_report.md").read_text()
    assert "| wnli | validation | accuracy |" in report and "wnli_dev_score.png" not in report
    assert (tmp_path / "glue_report" / "seed_spread.png").exists()


# --- Progress lines -----------------------------------------------------------------------------

def test_a_short_phase_prints_only_its_summary(monkeypatch, capsys):
    now = [0.0]
    monkeypatch.setattr(glue.time, "perf_counter", lambda: now[0])
    quiet = glue.Progress("rte  tokenize train", 20, quiet_seconds=10, unit="rows")
    for step in range(1, 20):
        now[0] += 0.02
        quiet.update(step, step * 1024)
    quiet.summary(20 * 1024)
    assert capsys.readouterr().out.count("\n") == 1  # the summary alone
    now[0] = 100.0
    slow = glue.Progress("mnli  tokenize train", 20, quiet_seconds=10, unit="rows")
    for step in range(1, 20):
        now[0] += 1.0
        slow.update(step, step * 1024)
    lines = capsys.readouterr().out.splitlines()
    assert [int(line.split("step ")[1].split("/")[0]) for line in lines] == list(range(10, 20))
