"""Long runs survive interruption: resume mid-training exactly, and never lose a result."""

import json
import os
import subprocess
import sys
import threading

import keras
import numpy as np
import pytest

import glue
from conftest import REPO

HERE = os.path.dirname(os.path.abspath(__file__))
# 16 training examples in batches of 4 (batched by length: 5 batches an epoch) for 3 epochs.
TRAINING = ("--task_name=stsb", "--epochs=3", "--batch_size=4", "--max_sequence_length=32",
            "--checkpoint_every_steps=1")


def glue_command(tiny_preset, data_dir, out, interrupt=None):
    script = os.path.join(HERE, "interrupt_at_step.py") if interrupt else \
        os.path.join(REPO, "glue.py")
    command = [sys.executable, script, *TRAINING, f"--preset={tiny_preset}",
               f"--data_dir={data_dir}", f"--checkpoint_dir={out / 'checkpoints'}",
               f"--submission_directory={out}",
               f"--finetuning_model_save_path={out / 'model.keras'}"]
    env = dict(os.environ, GLUE_TEST_INTERRUPT=interrupt or "")
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)


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


def test_sigkill_mid_epoch_then_the_same_command_resumes_exactly(
        tiny_preset, glue_data, tmp_path, uninterrupted):
    killed = glue_command(tiny_preset, glue_data[0], tmp_path, interrupt="SIGKILL:6")
    assert killed.returncode == -9
    assert os.listdir(tmp_path / "checkpoints" / "stsb_lr5e-05") == ["step-000000005.npz"]
    assert not (tmp_path / "STS-B.tsv").exists()

    resumed = glue_command(tiny_preset, glue_data[0], tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Resuming from step 5" in resumed.stderr
    assert_same_training(tmp_path, uninterrupted)
    assert not (tmp_path / "checkpoints" / "stsb_lr5e-05").exists()  # cleaned up once done


def test_sigterm_saves_a_checkpoint_and_says_how_to_resume(tiny_preset, glue_data, tmp_path,
                                                           uninterrupted):
    stopped = glue_command(tiny_preset, glue_data[0], tmp_path, interrupt="SIGTERM:7")
    assert stopped.returncode == 1
    message = stopped.stderr.strip().splitlines()[-1]
    assert message == (
        f"glue.py: stopped by SIGTERM at step 7 of 15; the checkpoint is in "
        f"{tmp_path / 'checkpoints' / 'stsb_lr5e-05'}: run the same command again to resume")
    assert os.listdir(tmp_path / "checkpoints" / "stsb_lr5e-05") == ["step-000000007.npz"]
    assert "Traceback" not in stopped.stderr

    resumed = glue_command(tiny_preset, glue_data[0], tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Resuming from step 7" in resumed.stderr
    assert_same_training(tmp_path, uninterrupted)


def test_a_checkpoint_of_another_model_is_refused(tiny_preset, glue_data, tmp_path, run_glue):
    folder = tmp_path / "checkpoints" / "stsb_lr5e-05"
    folder.mkdir(parents=True)
    np.savez(folder / "step-000000003.npz", np.zeros(3))
    with pytest.raises(SystemExit) as exit_info:
        run_glue(*TRAINING, f"--preset={tiny_preset}", f"--data_dir={glue_data[0]}",
                 f"--checkpoint_dir={tmp_path / 'checkpoints'}")
    assert "is a checkpoint of another model or setting" in str(exit_info.value.code)


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
            glue.merge_results(path, f"task{worker}_{round_}", {"validation": {"accuracy": 0.5}})

    threads = [threading.Thread(target=writer, args=(worker,)) for worker in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    results = json.loads(open(path).read())
    assert len([name for name in results if name.startswith("task")]) == 60
