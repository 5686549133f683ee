"""Long runs survive interruption: resume mid-training exactly, and never lose a result."""

import glob
import json
import os
import subprocess
import sys
import threading

import keras
import numpy as np
import pytest

import glue
from conftest import REPO, options_for

HERE = os.path.dirname(os.path.abspath(__file__))
# 16 training examples in batches of 4 (batched by length: 5 batches an epoch) for 3 epochs.
TRAINING = ("--task_name=stsb", "--epochs=3", "--batch_size=4", "--max_sequence_length=32",
            "--checkpoint_every_steps=1")


def glue_command(tiny_preset, data_dir, out, interrupt=None, extra=(), env=None, wrap=False,
                 new_session=False):
    """Runs glue.py as a command (through interrupt_at_step.py to interrupt its run, or with
    `wrap` to set the test's loss scale); `new_session`: in a process group of its own."""
    script = os.path.join(HERE, "interrupt_at_step.py") if interrupt or wrap else \
        os.path.join(REPO, "glue.py")
    command = [sys.executable, script, *TRAINING, f"--preset={tiny_preset}",
               f"--data_dir={data_dir}", f"--checkpoint_dir={out / 'checkpoints'}",
               f"--submission_directory={out}",
               f"--finetuning_model_save_path={out / 'model.keras'}", *extra]
    env = dict(os.environ, GLUE_TEST_INTERRUPT=interrupt or "", **(env or {}))
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=600,
                          start_new_session=new_session)


@pytest.fixture(scope="module")
def uninterrupted(tiny_preset, glue_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted")
    result = glue_command(tiny_preset, glue_data[0], out)
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def assert_same_training(out, reference):
    trained = keras.models.load_model(out / "model.keras", compile=False)
    expected = keras.models.load_model(reference / "model.keras", compile=False)
    for mine, theirs in zip(trained.get_weights(), expected.get_weights()):
        np.testing.assert_allclose(mine, theirs, rtol=1e-5, atol=1e-6)
    assert (out / "STS-B.tsv").read_text() == (reference / "STS-B.tsv").read_text()
    metrics = json.loads((out / "glue_results.json").read_text())["stsb"]["validation"]
    reference_metrics = json.loads(
        (reference / "glue_results.json").read_text())["stsb"]["validation"]
    assert metrics == pytest.approx(reference_metrics, abs=1e-6, nan_ok=True)
    # The evaluations before the interruption came back with the checkpoint.
    run, = json.loads((out / "glue_results.json").read_text())["stsb"]["runs"]
    reference_run, = json.loads((reference / "glue_results.json").read_text())["stsb"]["runs"]
    assert [e["step"] for e in run["evaluations"]] == [5, 10, 15]
    assert run["best_epoch"] == reference_run["best_epoch"]
    for mine, theirs in zip(run["evaluations"], reference_run["evaluations"]):
        assert mine["validation"] == pytest.approx(theirs["validation"], abs=1e-6, nan_ok=True)


def run_folders(out):
    """The checkpoint folders of the runs in `out`: one per task, rate, seed and settings."""
    return sorted(glob.glob(str(out / "checkpoints" / "stsb_lr5e-05_seed42_*")))


@pytest.mark.slow
def test_sigkill_mid_epoch_then_the_same_command_resumes_exactly(
        tiny_preset, glue_data, tmp_path, uninterrupted):
    killed = glue_command(tiny_preset, glue_data[0], tmp_path, interrupt="SIGKILL:6")
    assert killed.returncode == 1  # the run was killed; the command names it
    assert killed.stderr.strip().splitlines()[-1].startswith(
        "glue.py: error: stsb: LOST (killed by SIGKILL); its log: ")
    folder, = run_folders(tmp_path)
    # The state after epoch 1, with that epoch's evaluation in it.
    assert sorted(os.listdir(folder)) == ["step-000000005.npz"]
    assert not (tmp_path / "STS-B.tsv").exists()

    resumed = glue_command(tiny_preset, glue_data[0], tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Resuming from step 5" in resumed.stderr
    assert_same_training(tmp_path, uninterrupted)
    assert not os.path.exists(folder)  # cleaned up once done


@pytest.mark.slow
def test_sigterm_to_a_run_saves_a_checkpoint_and_says_how_to_resume(
        tiny_preset, glue_data, tmp_path, uninterrupted):
    stopped = glue_command(tiny_preset, glue_data[0], tmp_path, interrupt="SIGTERM:7")
    assert stopped.returncode == 1
    message = stopped.stderr.strip().splitlines()[-1]
    folder, = run_folders(tmp_path)
    assert message == (f"glue.py: error: stopped by SIGTERM at step 7 of 15; the checkpoint is "
                       f"in {folder}: run the same command again to resume")
    assert sorted(os.listdir(folder)) == ["step-000000007.npz"]
    assert "Traceback" not in stopped.stderr

    resumed = glue_command(tiny_preset, glue_data[0], tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Resuming from step 7" in resumed.stderr
    assert_same_training(tmp_path, uninterrupted)


@pytest.mark.slow
def test_sigterm_to_the_command_reaches_its_run_which_checkpoints(tiny_preset, glue_data,
                                                                   tmp_path, uninterrupted):
    stopped = glue_command(tiny_preset, glue_data[0], tmp_path, interrupt="SIGTERM:7:command")
    assert stopped.returncode == 1
    assert stopped.stderr.strip().splitlines()[-1] == (
        "glue.py: stopped by SIGTERM; the runs keep their checkpoints: run the same command "
        "again to resume")
    folder, = run_folders(tmp_path)
    step, = os.listdir(folder)  # the step the run had reached when the command's SIGTERM came
    resumed = glue_command(tiny_preset, glue_data[0], tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"Resuming from step {int(step[5:14])}" in resumed.stderr
    assert_same_training(tmp_path, uninterrupted)


@pytest.mark.slow
def test_sigkill_to_the_whole_command_then_the_same_command_resumes(tiny_preset, glue_data,
                                                                    tmp_path, uninterrupted):
    """The process group of the command and its run killed at once (what a job scheduler does
    at its time limit): the run's checkpoint is resumed, and nothing is left running."""
    killed = glue_command(tiny_preset, glue_data[0], tmp_path, interrupt="SIGKILL:6:group",
                          new_session=True)
    assert killed.returncode == -9
    folder, = run_folders(tmp_path)
    assert sorted(os.listdir(folder)) == ["step-000000005.npz"]
    resumed = glue_command(tiny_preset, glue_data[0], tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Resuming from step 5" in resumed.stderr
    assert_same_training(tmp_path, uninterrupted)


def test_a_checkpoint_of_another_model_is_refused(tiny_preset, glue_data, tmp_path, run_glue):
    args = (*TRAINING, f"--preset={tiny_preset}", f"--data_dir={glue_data[0]}",
            f"--checkpoint_dir={tmp_path / 'checkpoints'}")
    options = options_for(*args)
    task = glue.TASKS["stsb"]
    folder = glue.checkpoint_folder(options.checkpoint_dir, task, 5e-5, 42, glue.fingerprint(
        task, options, ("_DefaultDistributionStrategy", 1)))
    os.makedirs(folder)
    np.savez(os.path.join(folder, "step-000000003.npz"), np.zeros(3), batches=np.array(3))
    with pytest.raises(SystemExit) as exit_info:
        run_glue(*args)
    assert "is a checkpoint of another model or setting" in str(exit_info.value.code)


@pytest.mark.slow
def test_concurrent_runs_into_one_submission_directory_keep_both_results(
        tiny_preset, glue_data, tmp_path):
    commands = [[sys.executable, os.path.join(REPO, "glue.py"), f"--task_name={task}",
                 f"--preset={tiny_preset}", f"--data_dir={glue_data[0]}", "--epochs=1",
                 "--batch_size=4", "--max_sequence_length=32",
                 f"--submission_directory={tmp_path}"] for task in ("wnli", "rte")]
    runs = [subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                             text=True) for command in commands]
    for run in runs:
        assert run.wait(timeout=600) == 0, run.stderr.read()[-3000:]
    results = json.loads((tmp_path / "glue_results.json").read_text())
    assert {"rte", "wnli"} <= set(results)


def test_merges_from_many_writers_at_once_lose_nothing(tmp_path):
    path = str(tmp_path / "glue_results.json")

    def writer(worker):
        for round_ in range(10):
            with glue.updating_results(path) as results:
                results[f"task{worker}_{round_}"] = {"validation": {"accuracy": 0.5}}

    threads = [threading.Thread(target=writer, args=(worker,)) for worker in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    results = json.loads(open(path).read())
    assert len([name for name in results if name.startswith("task")]) == 60


@pytest.mark.slow
def test_a_checkpoint_made_with_another_batch_size_is_not_resumed(tiny_preset, glue_data,
                                                                  tmp_path):
    killed = glue_command(tiny_preset, glue_data[0], tmp_path, interrupt="SIGKILL:3")
    assert killed.returncode == 1 and "(killed by SIGKILL)" in killed.stderr
    old_folder, = run_folders(tmp_path)

    other = glue_command(tiny_preset, glue_data[0], tmp_path, extra=["--batch_size=8"])
    assert other.returncode == 0, other.stderr[-3000:]
    assert "Resuming" not in other.stderr
    assert "stsb  epoch 1/3: 3 steps of 8 examples\n" in other.stdout  # from the first step
    assert run_folders(tmp_path) == [old_folder]  # the other run's checkpoint is left alone
    assert os.listdir(old_folder) == ["step-000000002.npz"]


@pytest.mark.slow
def test_resume_is_exact_under_mixed_float16_when_the_loss_scale_skips_steps(
        tiny_preset, glue_data, tmp_path):
    # A huge first loss scale overflows float16: the loss-scale optimizer skips those steps
    # (and halves the scale), so its step counter falls behind the batches trained.
    half = ["--mixed_precision=mixed_float16"]
    env = {"GLUE_TEST_LOSS_SCALE": str(2.0 ** 24)}
    reference = tmp_path / "reference"
    done = glue_command(tiny_preset, glue_data[0], reference, extra=half, env=env, wrap=True)
    assert done.returncode == 0, done.stderr[-3000:]
    run, = json.loads((reference / "glue_results.json").read_text())["stsb"]["runs"]
    assert 0 < run["skipped_steps"] < 15  # some of the 15 steps were skipped

    out = tmp_path / "resumed"
    killed = glue_command(tiny_preset, glue_data[0], out, interrupt="SIGKILL:9", extra=half,
                          env=env)
    assert killed.returncode == 1 and "(killed by SIGKILL)" in killed.stderr
    resumed = glue_command(tiny_preset, glue_data[0], out, extra=half, env=env, wrap=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Resuming from step 8" in resumed.stderr
    assert_same_training(out, reference)


@pytest.mark.slow
def test_resume_is_exact_under_mixed_bfloat16(tiny_preset, glue_data, tmp_path):
    brain = ["--mixed_precision=mixed_bfloat16"]  # what CPUs with AMX or avx512_bf16 run fast
    reference = tmp_path / "reference"
    done = glue_command(tiny_preset, glue_data[0], reference, extra=brain)
    assert done.returncode == 0, done.stderr[-3000:]
    out = tmp_path / "resumed"
    killed = glue_command(tiny_preset, glue_data[0], out, interrupt="SIGKILL:9", extra=brain)
    assert killed.returncode == 1 and "(killed by SIGKILL)" in killed.stderr
    resumed = glue_command(tiny_preset, glue_data[0], out, extra=brain)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Resuming from step 8" in resumed.stderr
    assert_same_training(out, reference)
