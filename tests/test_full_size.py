"""What a long run needs: progress a log file can follow, mistakes caught at start, and no old
result or checkpoint reused unless it was made with the same settings."""

import json
import os
import re
import shutil
import subprocess
import sys
import time

import pytest

import glue
from conftest import REPO, error_of

TINY = ("--epochs=2", "--batch_size=4", "--max_sequence_length=32")


@pytest.fixture
def nothing_may_run(monkeypatch):
    """Fails the test if any data is read or any model trained."""
    def forbidden(*args, **kwargs):
        raise AssertionError("the run went past its start-up checks")
    for name in ("load_task_data", "make_preprocess_fn", "finetune"):
        monkeypatch.setattr(glue, name, forbidden)


# --- Progress -----------------------------------------------------------------------------------

@pytest.mark.slow
def test_progress_lines_reach_a_log_file(tiny_preset, glue_data, tmp_path):
    log = tmp_path / "log.txt"
    with open(log, "w") as file:  # not a terminal
        subprocess.run([sys.executable, os.path.join(REPO, "glue.py"), "--task_name=rte",
                        f"--preset={tiny_preset}", f"--data_dir={glue_data[0]}",
                        f"--submission_directory={tmp_path / 'out'}", *TINY],
                       stdout=file, stderr=subprocess.STDOUT, check=True, timeout=300)
    lines = log.read_text().splitlines()
    headers = [line for line in lines if re.fullmatch(r"rte  epoch \d/2: \d+ steps of 4 examples",
                                                       line)]
    assert len(headers) == 2
    steps = int(headers[0].split()[3])
    for epoch in (1, 2):
        assert headers[epoch - 1] == f"rte  epoch {epoch}/2: {steps} steps of 4 examples"
        progress = [line for line in lines if line.startswith(f"rte  epoch {epoch}/2  step ")]
        assert progress and all(re.fullmatch(
            rf"rte  epoch {epoch}/2  step \d+/{steps}  loss \d+\.\d{{4}}  \d+ ex/s  "
            r"elapsed \S+  ETA \S+", line) for line in progress)
        assert any(re.fullmatch(rf"rte  epoch {epoch}/2: 16 ex in \S+ \(\d+ ex/s\), loss \S+",
                                line) for line in lines)
    for phase in ("tokenize train", "tokenize validation", "tokenize RTE.tsv",
                  "predict validation", "predict RTE.tsv"):
        assert any(re.fullmatch(rf"rte  {phase}: \d+ rows in \S+ \(\d+ rows/s\)", line)
                   for line in lines), phase


def test_a_line_every_5_percent_and_every_minute(monkeypatch, capsys):
    now = [0.0]
    monkeypatch.setattr(glue.time, "perf_counter", lambda: now[0])
    progress = glue.Progress("mnli  epoch 1/3", 1000, quiet_seconds=0)
    for step in range(1, 1000):
        now[0] += 0.01
        progress.update(step, 32 * step)
    assert len(capsys.readouterr().out.splitlines()) == 19  # every 50 steps, none at the end

    progress = glue.Progress("mnli  epoch 1/3", 1000, quiet_seconds=0)
    for step in range(1, 6):
        now[0] += 61  # slow steps: a line each minute, well before 5% of them
        progress.update(step, 32 * step)
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 5
    assert lines[0] == "mnli  epoch 1/3  step 1/1000  1 ex/s  elapsed 1m01s  ETA 16h55m"

    quiet = glue.Progress("rte  predict RTE.tsv", 40, quiet_seconds=10)
    for step in range(1, 40):  # 39 steps within 10 s: no 5% lines, only the summary would show
        now[0] += 0.25
        quiet.update(step, 32 * step)
    assert capsys.readouterr().out == ""

    quiet = glue.Progress("rte  predict RTE.tsv", 40, quiet_seconds=10)
    now[0] += 11  # past the quiet time, the 5% rule holds again...
    quiet.update(2, 64)
    assert capsys.readouterr().out.startswith("rte  predict RTE.tsv  step 2/40  ")
    quiet = glue.Progress("rte  predict RTE.tsv", 40, quiet_seconds=1000)
    now[0] += 60  # ...and a slow step gets its line within the minute, quiet or not
    quiet.update(1, 32)
    assert capsys.readouterr().out.startswith("rte  predict RTE.tsv  step 1/40  ")


# --- Start-up checks ----------------------------------------------------------------------------

@pytest.mark.parametrize("flag, make, expected", [
    ("submission_directory", "file", "is a file, not a folder"),
    ("checkpoint_dir", "file", "is a file, not a folder"),
    ("checkpoint_dir", "under a file", "is a file, not a folder"),
    ("results_path", "folder", "is a folder; give a file path"),
    ("finetuning_model_save_path", "under a file", "is a file, not a folder"),
])
def test_an_unusable_output_path_fails_at_once_and_trains_nothing(
        flag, make, expected, tiny_preset, glue_data, tmp_path, run_glue, nothing_may_run):
    (tmp_path / "a_file").write_text("kept")
    path = {"file": tmp_path / "a_file", "folder": tmp_path,
            "under a file": tmp_path / "a_file" / "model.keras"}[make]
    start = time.monotonic()
    message = error_of(run_glue, "--task_name=rte", f"--preset={tiny_preset}",
                       f"--data_dir={glue_data[0]}", f"--{flag}={path}")
    assert time.monotonic() - start < 30
    assert expected in message and f"--{flag}" in message
    assert (tmp_path / "a_file").read_text() == "kept"


def test_offline_one_line_names_both_downloads_and_their_flags(run_glue, monkeypatch, tmp_path,
                                                               nothing_may_run):
    def unreachable(*args, **kwargs):
        raise OSError("network is unreachable")

    def no_kaggle(*args, **kwargs):
        raise ConnectionError("Failed to resolve 'api.kaggle.com'")

    monkeypatch.setattr(glue.socket, "create_connection", unreachable)
    monkeypatch.setattr(glue.keras_hub.models.Backbone, "from_preset", no_kaggle)
    monkeypatch.setattr(glue.tfds.core.DatasetBuilder, "is_prepared", lambda self: False)
    # What an earlier download that failed leaves in KaggleHub's cache: an empty version folder.
    (tmp_path / "models" / "keras" / "bert" / "keras" / "bert_tiny_en_uncased" / "3").mkdir(
        parents=True)
    monkeypatch.setenv("KAGGLEHUB_CACHE", str(tmp_path))
    message = error_of(run_glue, "--task_name=mrpc", "--preset=bert_tiny_en_uncased")
    assert "cannot download glue/mrpc" in message
    assert "cannot load preset 'bert_tiny_en_uncased'" in message
    assert "--data_dir=<folder in the glue_data/ layout>" in message
    assert "--preset=<local preset or model folder>" in message


# --- Nothing reused unless made with the same settings ------------------------------------------

@pytest.fixture
def trainings(monkeypatch):
    """The learning rates finetuned, in order."""
    rates, make = [], glue.make_optimizer

    def recording(learning_rate, *args, **kwargs):
        rates.append(learning_rate)
        return make(learning_rate, *args, **kwargs)

    monkeypatch.setattr(glue, "make_optimizer", recording)
    return rates


@pytest.mark.slow
def test_changed_settings_redo_a_completed_task(tiny_preset, glue_data, tmp_path, run_glue,
                                                trainings, capsys):
    out = tmp_path / "out"
    args = ("--task_name=rte", f"--data_dir={glue_data[0]}", f"--submission_directory={out}",
            *TINY)
    run_glue(*args, f"--preset={tiny_preset}")
    first = json.loads((out / "glue_results.json").read_text())["rte"]
    assert first["fingerprint"]["max_sequence_length"] == 32

    capsys.readouterr()
    run_glue(*args, f"--preset={tiny_preset}")
    assert "rte: already complete" in capsys.readouterr().out and len(trainings) == 1

    run_glue(*args, f"--preset={tiny_preset}", "--max_sequence_length=16")
    assert "rte: redone, max_sequence_length 32 -> 16" in capsys.readouterr().out
    assert len(trainings) == 2
    entry = json.loads((out / "glue_results.json").read_text())["rte"]
    assert entry["fingerprint"]["max_sequence_length"] == 16 and len(entry["runs"]) == 1

    moved = str(tmp_path / "another_place")  # the same preset in another folder: same contents
    shutil.copytree(tiny_preset, moved)
    run_glue(*args, f"--preset={moved}", "--max_sequence_length=16")
    assert "rte: already complete" in capsys.readouterr().out and len(trainings) == 2
    assert json.loads((out / "glue_results.json").read_text())["rte"]["fingerprint"][
        "preset"] == glue.contents_id(moved) == glue.contents_id(tiny_preset)

    run_glue(*args, f"--preset={tiny_preset}")  # back to the first settings: their runs count
    assert "rte: already complete" in capsys.readouterr().out and len(trainings) == 2


@pytest.mark.slow
def test_adding_a_learning_rate_runs_only_that_rate(tiny_preset, glue_data, tmp_path, run_glue,
                                                    trainings, capsys):
    args = ("--task_name=mrpc", f"--preset={tiny_preset}", f"--data_dir={glue_data[0]}",
            f"--submission_directory={tmp_path}", *TINY)
    run_glue(*args, "--learning_rate=5e-5")
    run_glue(*args, "--learning_rate=5e-5,1e-3")
    assert trainings == [5e-5, 1e-3]
    entry = json.loads((tmp_path / "glue_results.json").read_text())["mrpc"]
    assert [run["learning_rate"] for run in entry["runs"]] == [5e-5, 1e-3]
    kept, added = entry["runs"]
    best = added if glue.run_score(added) > glue.run_score(kept) else kept  # ties: 5e-5
    assert entry["submitted_run"] == {"learning_rate": best["learning_rate"], "seed": 42}
    assert entry["validation"] == best["validation"]
    assert entry["submission_files_run"] == entry["submitted_run"]
    chosen = tmp_path / "runs" / "mrpc" / entry["fingerprint_id"] / (
        f"lr{best['learning_rate']:g}_seed42")
    assert (tmp_path / "MRPC.tsv").read_text() == (chosen / "MRPC.tsv").read_text()

    capsys.readouterr()
    run_glue(*args, "--learning_rate=1e-3")
    assert "mrpc: already complete" in capsys.readouterr().out and len(trainings) == 2
