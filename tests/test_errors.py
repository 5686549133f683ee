"""Bad input ends in one clear line and a non-zero exit, and nothing already written is lost."""

import os
import shutil
import subprocess
import sys

import pandas as pd
import pytest

import glue
from conftest import REPO, error_of

TINY = ("--epochs=1", "--batch_size=4", "--max_sequence_length=32")


@pytest.fixture
def broken_data(glue_data, tmp_path):
    """A writable copy of the fixture data, to damage one file at a time."""
    data_dir = tmp_path / "glue_data"
    shutil.copytree(glue_data[0], data_dir)
    return data_dir


def replace_line(path, number, text):
    lines = path.read_text(encoding="utf-8").split("\n")
    lines[number - 1] = text
    path.write_text("\n".join(lines), encoding="utf-8")


# Each case starts a glue.py process (5 s of imports): three run in the quick suite.
SLOW = pytest.mark.slow
@pytest.mark.parametrize("args, expected", [
    (["--task_name=squad"], "each name must be all, none, or a GLUE task"),
    (["--learning_rate=2e-5,fast"], "give positive numbers"),
    (["--batch_size=0"], "--batch_size=0"),
    pytest.param(["--epochs=0"], "--epochs=0", marks=SLOW),
    pytest.param(["--max_sequence_length=-5"], "--max_sequence_length=-5", marks=SLOW),
    pytest.param(["--data_dir=/no/such/folder"], "--data_dir=/no/such/folder: no such folder",
                 marks=SLOW),
    pytest.param(["--distribution_strategy=horovod"], "use auto, one_device, mirrored or tpu:",
                 marks=SLOW),
    (["--distribution_strategy=multi_worker_mirrored"],
     "multi-worker training is retired: every GLUE encoder fits on one machine; use "
     "--parallel_runs=N for several runs at once on one machine, or job arrays"),
    pytest.param(["--distribution_strategy=mirrored:2"], "tpu:<name or grpc://host:port>",
                 marks=SLOW),
    pytest.param(["--tpu_timeout_seconds=0"], "--tpu_timeout_seconds=0", marks=SLOW),
    pytest.param(["--seed=-1"], "give non-negative integers", marks=SLOW),
    pytest.param(["--learning_rate=2e-5,2e-5"], "each once", marks=SLOW),
])
def test_bad_flags_exit_with_one_clear_line(args, expected):
    result = subprocess.run([sys.executable, os.path.join(REPO, "glue.py"), *args],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert expected in result.stderr
    assert "Traceback" not in result.stderr


def test_missing_task_folder_names_the_expected_path(tiny_preset, tmp_path, run_glue):
    message = error_of(run_glue, "--task_name=mrpc", f"--preset={tiny_preset}",
                       f"--data_dir={tmp_path}")
    assert os.path.join(str(tmp_path), "MRPC", "dev.tsv") in message  # dev is opened first


def test_missing_test_file_fails_before_training(broken_data, tiny_preset, run_glue):
    os.remove(broken_data / "MNLI" / "test_mismatched.tsv")
    message = error_of(run_glue, "--task_name=mnli", f"--preset={tiny_preset}",
                       f"--data_dir={broken_data}")
    assert os.path.join("MNLI", "test_mismatched.tsv") in message


@pytest.mark.parametrize("damage, expected", [
    ("1\t2\t3\tan extra field\tx\ty", "line 4: malformed TSV: 6 tab-separated fields"),
    ("1\tonly two", "line 4: malformed TSV: 2 tab-separated fields, expected 4"),
    ("7\ta b\tc d\tmaybe", "line 4: malformed TSV: bad label 'maybe'"),
])
def test_malformed_tsv_names_file_and_line(broken_data, tiny_preset, run_glue, damage,
                                           expected):
    replace_line(broken_data / "RTE" / "dev.tsv", 4, damage)
    message = error_of(run_glue, "--task_name=rte", f"--preset={tiny_preset}",
                       f"--data_dir={broken_data}")
    assert os.path.join(str(broken_data), "RTE", "dev.tsv") in message
    assert expected in message


def test_bad_index_in_a_test_file_names_the_line(broken_data, tiny_preset, run_glue):
    replace_line(broken_data / "CoLA" / "test.tsv", 3, "three\tthe cat sat")
    message = error_of(run_glue, "--task_name=cola", f"--preset={tiny_preset}",
                       f"--data_dir={broken_data}")
    assert "test.tsv, line 3: malformed TSV: bad index 'three'" in message


def test_class_id_out_of_range_is_rejected(broken_data, tiny_preset, run_glue):
    replace_line(broken_data / "CoLA" / "train.tsv", 2, "gj04\t2\t\tthe cat sat")
    message = error_of(run_glue, "--task_name=cola", f"--preset={tiny_preset}",
                       f"--data_dir={broken_data}")
    assert "train.tsv, line 2: malformed TSV: bad label '2'" in message


def test_empty_split_is_rejected(broken_data, tiny_preset, run_glue):
    (broken_data / "WNLI" / "dev.tsv").write_text("index\tsentence1\tsentence2\tlabel\n")
    message = error_of(run_glue, "--task_name=wnli", f"--preset={tiny_preset}",
                       f"--data_dir={broken_data}")
    assert "wnli validation split is empty" in message


def test_unknown_preset_points_at_a_local_directory(glue_data, run_glue):
    message = error_of(run_glue, "--preset=not_a_real_preset_name", f"--data_dir={glue_data[0]}")
    assert "cannot load preset 'not_a_real_preset_name'" in message
    assert "--preset=<local dir>" in message


def test_a_preset_never_downloaded_fails_at_start_offline_with_local_data(glue_data, run_glue,
                                                                         monkeypatch, tmp_path):
    def unreachable(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(glue.socket, "create_connection", unreachable)
    monkeypatch.setenv("KAGGLEHUB_CACHE", str(tmp_path))  # nothing downloaded
    monkeypatch.setattr(glue, "start_run", lambda *args, **kwargs: pytest.fail("a run started"))
    assert error_of(run_glue, "--preset=bert_tiny_en_uncased", f"--data_dir={glue_data[0]}") == (
        "glue.py: error: cannot load preset 'bert_tiny_en_uncased' (not downloaded before, and "
        "api.kaggle.com is unreachable); download it where you have network and pass "
        "--preset=<local dir>")


@pytest.mark.parametrize("preset", ["/no/such/preset/dir", "./no_such_dir", "models/bert"])
def test_a_preset_path_that_does_not_exist_is_no_such_folder(glue_data, run_glue, preset,
                                                             monkeypatch):
    monkeypatch.setattr(glue, "load_task_data", None)  # fails before any data is read
    message = error_of(run_glue, f"--preset={preset}", f"--data_dir={glue_data[0]}")
    assert message == (f"glue.py: error: --preset={preset}: no such folder; give a KerasHub "
                       "preset folder, a Hugging Face model folder, or a KerasHub preset id")


@pytest.mark.parametrize("flag", ["finetuning_model_save_path", "finetuning_model_load_path"])
def test_model_paths_must_be_keras_files(run_glue, flag, tmp_path):
    message = error_of(run_glue, f"--{flag}={tmp_path / 'model.h5'}")
    assert "must end in `.keras`" in message


def test_missing_model_to_load(run_glue, tmp_path):
    message = error_of(run_glue, f"--finetuning_model_load_path={tmp_path / 'nope.keras'}")
    assert "no such file" in message


def test_task_name_none_needs_a_folder_and_says_when_it_holds_no_runs(run_glue, tmp_path,
                                                                      capsys):
    assert error_of(run_glue, "--task_name=none") == (
        "glue.py: error: --task_name=none makes the results anew from the runs recorded in a "
        "folder: give its --submission_directory")
    run_glue("--task_name=none", f"--submission_directory={tmp_path}")  # a mistyped folder
    assert f"{tmp_path / 'runs'}: no runs recorded, so no results to make (a task's command " \
        "records them)" in capsys.readouterr().out


def test_unreadable_results_json_fails_before_training_and_is_kept(glue_data, tiny_preset,
                                                                     tmp_path, run_glue):
    results = tmp_path / "glue_results.json"
    results.write_text("{not json")
    message = error_of(run_glue, f"--preset={tiny_preset}", f"--data_dir={glue_data[0]}",
                       f"--submission_directory={tmp_path}")
    assert "cannot read the results JSON" in message
    assert results.read_text() == "{not json"
    assert not (tmp_path / "MRPC.tsv").exists()


def test_failed_run_leaves_an_existing_submission_untouched(broken_data, tiny_preset, tmp_path,
                                                            run_glue):
    submissions = tmp_path / "submissions"
    submissions.mkdir()
    (submissions / "MRPC.tsv").write_text("index\tprediction\n0\t1\n")
    replace_line(broken_data / "MRPC" / "test.tsv", 5, "x\ty")
    error_of(run_glue, f"--preset={tiny_preset}", f"--data_dir={broken_data}",
             f"--submission_directory={submissions}", *TINY)
    assert (submissions / "MRPC.tsv").read_text() == "index\tprediction\n0\t1\n"


def test_crash_while_writing_keeps_the_old_file_whole(tmp_path, monkeypatch):
    path = tmp_path / "RTE.tsv"
    path.write_text("index\tprediction\n0\tentailment\n")

    def write_half_then_die(self, target, **kwargs):
        with open(target, "w") as file:
            file.write("index\tpredic")
        raise KeyboardInterrupt

    monkeypatch.setattr(pd.DataFrame, "to_csv", write_half_then_die)
    table = glue.submission_table(glue.TASKS["rte"], [1, 0], [0, 1])
    with pytest.raises(KeyboardInterrupt):
        glue.write_submission(str(path), table)
    assert path.read_text() == "index\tprediction\n0\tentailment\n"
    assert os.listdir(tmp_path) == ["RTE.tsv"]  # no temporary file left behind


def test_duplicate_test_indices_are_refused():
    with pytest.raises(glue.GlueError, match="repeats example indices"):
        glue.submission_table(glue.TASKS["rte"], [0, 1, 1], [0, 1, 0])
