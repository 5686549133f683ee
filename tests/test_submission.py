"""The whole benchmark in one command, and a submission zip the GLUE server accepts."""

import glob
import io
import json
import os
import shutil
import subprocess
import sys
import zipfile

import pandas as pd
import pytest

import glue
from conftest import (REAL_SUBMISSION, REPO, crash_runs, error_of,
                      grow_test_files_to_official_size, write_glue_data)

needs_reference = pytest.mark.skipif(not os.path.isdir(REAL_SUBMISSION),
                                     reason="../shared/glue_reference_submission is not here")
TINY = ("--epochs=1", "--batch_size=4", "--max_sequence_length=32")


def reference_files():
    return glue.read_submission(REAL_SUBMISSION)


def zipped(contents):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in contents.items():
            archive.writestr(name, data)
    return buffer.getvalue()


# --- The validator ------------------------------------------------------------------------------

@needs_reference
def test_the_real_reference_submission_passes(tmp_path):
    errors, warnings = glue.validate_submission(reference_files())
    assert errors == []
    zip_path = tmp_path / "reference.zip"
    zip_path.write_bytes(zipped(reference_files()))
    assert glue.validate_submission(glue.read_submission(str(zip_path)))[0] == []


def damage(name, edit):
    contents = reference_files()
    contents[name] = edit(contents[name].decode()).encode()
    return contents


def replace_line(text, number, new):
    lines = text.split("\r\n")
    lines[number - 1] = new
    return "\r\n".join(lines)


@needs_reference
@pytest.mark.parametrize("contents, expected", [
    (lambda: damage("RTE.tsv", lambda text: "\r\n".join(text.split("\r\n")[:2001])),
     "RTE.tsv: 2000 rows, the test set has 3000"),
    (lambda: damage("MNLI-m.tsv", lambda text: replace_line(text, 5, "3\tmaybe")),
     "MNLI-m.tsv, line 5: prediction 'maybe' is not one of entailment, neutral, contradiction"),
    (lambda: damage("CoLA.tsv", lambda text: replace_line(text, 3, "1\t2")),
     "CoLA.tsv, line 3: prediction '2' is not one of 0, 1"),
    (lambda: {name: data for name, data in reference_files().items() if name != "QNLI.tsv"},
     "QNLI.tsv: missing"),
    (lambda: damage("WNLI.tsv", lambda text: replace_line(text, 4, "1\t0")),
     "WNLI.tsv, line 4: index 1 repeats line 3"),
    (lambda: damage("SST-2.tsv", lambda text: ""), "SST-2.tsv: empty file"),
    (lambda: damage("MRPC.tsv", lambda text: replace_line(text, 1, "id\tlabel")),
     "MRPC.tsv, line 1: the header must be 'index<TAB>prediction'"),
    (lambda: damage("STS-B.tsv", lambda text: replace_line(text, 2, "0\tnan")),
     "STS-B.tsv, line 2: prediction 'nan' is not a finite number"),
    (lambda: damage("AX.tsv", lambda text: replace_line(text, 2, "1104\tneutral")),
     "AX.tsv, line 2: index '1104' is not in 0..1103"),
    (lambda: {("glue/" if name == "RTE.tsv" else "") + name: data
              for name, data in reference_files().items()},
     "glue/RTE.tsv: must sit at the top level of the zip"),
])
def test_damaged_copies_fail_with_the_problem_named(contents, expected):
    errors, _ = glue.validate_submission(contents())
    assert any(expected in error for error in errors), errors


@needs_reference
def test_line_ends_lf_or_crlf_both_pass_and_out_of_range_scores_only_warn():
    contents = reference_files()
    contents = {name: data.replace(b"\r\n", b"\n") for name, data in contents.items()}
    contents = damage_bytes(contents, "STS-B.tsv", lambda text: replace_line_lf(text, 2, "0\t5.3"))
    errors, warnings = glue.validate_submission(contents)
    assert errors == []
    assert any(warning.startswith("STS-B.tsv: ") and "outside [0, 5]" in warning
               for warning in warnings)


def damage_bytes(contents, name, edit):
    return {**contents, name: edit(contents[name].decode()).encode()}


def replace_line_lf(text, number, new):
    lines = text.split("\n")
    lines[number - 1] = new
    return "\n".join(lines)


def test_many_problems_in_one_file_are_summarised():
    rows = "\n".join(f"{index}\tmaybe" for index in range(146))
    errors, _ = glue.validate_submission({"WNLI.tsv": f"index\tprediction\n{rows}\n".encode()})
    wnli = [error for error in errors if error.startswith("WNLI.tsv")]
    assert len(wnli) == glue.SHOWN_PROBLEMS_PER_FILE + 1
    assert wnli[-1] == "WNLI.tsv: ... and 136 more problems"


@needs_reference
def test_validate_submission_flag(tmp_path, run_glue, capsys):
    run_glue(f"--validate_submission={REAL_SUBMISSION}")
    assert "all 11 files pass" in capsys.readouterr().out
    broken = tmp_path / "broken"
    shutil.copytree(REAL_SUBMISSION, broken)
    os.chmod(broken, 0o755)
    os.chmod(broken / "QQP.tsv", 0o644)
    (broken / "QQP.tsv").write_text("index\tprediction\n")
    with pytest.raises(SystemExit) as exit_info:
        run_glue(f"--validate_submission={broken}")
    assert "1 problems" in str(exit_info.value.code)
    assert "QQP.tsv: 0 rows, the test set has 390965" in capsys.readouterr().out


@needs_reference
def test_the_command_line_exits_0_with_its_output_flushed():
    # glue.py leaves with os._exit once main returns, past TensorFlow's slow native teardown:
    # what it printed must still reach a pipe, which Python buffers.
    result = subprocess.run([sys.executable, os.path.join(REPO, "glue.py"),
                             f"--validate_submission={REAL_SUBMISSION}"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.endswith("all 11 files pass\n")


# --- Packaging ----------------------------------------------------------------------------------

@needs_reference
@pytest.mark.parametrize("source_kind", ["folder", "zip"])
def test_fill_missing_from_a_sample_submission(tmp_path, run_glue, capsys, source_kind):
    source = REAL_SUBMISSION
    if source_kind == "zip":
        source = tmp_path / "sample.zip"
        source.write_bytes(zipped(reference_files()))
    submissions = tmp_path / "submissions"
    submissions.mkdir()
    for name in ("RTE.tsv", "MRPC.tsv"):
        shutil.copy(os.path.join(REAL_SUBMISSION, name), submissions / name)
    run_glue("--task_name=none", f"--submission_directory={submissions}",
             "--make_submission_zip", f"--fill_missing_from={source}")
    out = capsys.readouterr().out
    copied = sorted(set(glue.SUBMISSION_FILES) - {"RTE.tsv", "MRPC.tsv"})
    assert f"Copied from {source}: {', '.join(copied)}" in out
    with zipfile.ZipFile(submissions / "submission.zip") as archive:
        assert sorted(archive.namelist()) == sorted(glue.SUBMISSION_FILES)
        assert archive.read("RTE.tsv") == (submissions / "RTE.tsv").read_bytes()


def test_no_zip_is_written_for_an_incomplete_submission(tmp_path, run_glue, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_glue("--task_name=none", f"--submission_directory={tmp_path}",
                 "--make_submission_zip")
    assert "no zip written" in str(exit_info.value.code)
    assert "AX.tsv: missing" in capsys.readouterr().out
    assert not (tmp_path / "submission.zip").exists()


# --- Running several tasks ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def official_size_data(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("official_size_glue_data"))
    write_glue_data(root)
    grow_test_files_to_official_size(root)
    return root


@pytest.mark.slow
def test_all_tasks_in_one_command_give_a_valid_zip(official_size_data, tiny_preset, tmp_path,
                                                   run_glue, capsys):
    run_glue("--task_name=all", f"--preset={tiny_preset}", f"--data_dir={official_size_data}",
             f"--submission_directory={tmp_path}", "--make_submission_zip", "--epochs=1",
             "--batch_size=512", "--max_sequence_length=16")
    out = capsys.readouterr().out
    assert f"Wrote {tmp_path / 'submission.zip'}" in out
    contents = glue.read_submission(str(tmp_path / "submission.zip"))
    assert sorted(contents) == sorted(glue.SUBMISSION_FILES)
    assert glue.validate_submission(contents)[0] == []
    results = json.loads((tmp_path / "glue_results.json").read_text())
    assert sorted(results["glue_score"]["tasks"]) == sorted(glue.ALL_TASKS)
    assert "GLUE average over 9 tasks" in out


@pytest.mark.slow
def test_a_crash_then_a_rerun_skips_finished_tasks(glue_data, tiny_preset, tmp_path, run_glue,
                                                   monkeypatch, capsys):
    args = ("--task_name=rte,mrpc", f"--preset={tiny_preset}", f"--data_dir={glue_data[0]}",
            f"--submission_directory={tmp_path}", *TINY)
    with monkeypatch.context() as patch:
        # The process dies mid-way through mrpc.
        crash_runs(patch, lambda label: label == "mrpc", KeyboardInterrupt())
        with pytest.raises(KeyboardInterrupt):
            run_glue(*args)
    assert (tmp_path / "RTE.tsv").exists() and not (tmp_path / "MRPC.tsv").exists()
    rte_before = (tmp_path / "RTE.tsv").stat().st_mtime_ns

    capsys.readouterr()
    run_glue(*args)
    assert "rte: already complete" in capsys.readouterr().out
    assert (tmp_path / "RTE.tsv").stat().st_mtime_ns == rte_before
    assert sorted(json.loads((tmp_path / "glue_results.json").read_text())) == [
        "glue_score", "mrpc", "rte"]

    (tmp_path / "RTE.tsv").write_text("index\tprediction\n0\tentailment\n")  # damaged since
    run_glue(*args)
    assert len(pd.read_csv(tmp_path / "RTE.tsv", sep="\t")) == glue_data[1]["rte"]["test"]

    capsys.readouterr()
    run_glue(*args, "--overwrite")
    assert "already complete" not in capsys.readouterr().out


@pytest.mark.slow
def test_one_failing_task_does_not_stop_the_others(glue_data, tiny_preset, tmp_path, run_glue,
                                                   monkeypatch, capsys):
    crash_runs(monkeypatch, lambda label: label == "cola", RuntimeError("out of memory"))
    with pytest.raises(SystemExit) as exit_info:
        run_glue("--task_name=cola,wnli,stsb", f"--preset={tiny_preset}",
                 f"--data_dir={glue_data[0]}", f"--submission_directory={tmp_path}", *TINY)
    assert exit_info.value.code == "glue.py: error: 1 of 3 tasks failed: cola (reasons above)"
    assert "cola: FAILED: cola: LOST (exit status 1: RuntimeError: out of memory); its log: " \
        in capsys.readouterr().err
    assert (tmp_path / "WNLI.tsv").exists() and (tmp_path / "STS-B.tsv").exists()
    assert not (tmp_path / "CoLA.tsv").exists()
    assert sorted(json.loads((tmp_path / "glue_results.json").read_text())) == [
        "glue_score", "stsb", "wnli"]


@pytest.mark.slow
def test_a_save_path_names_each_task_s_model_alike_in_every_command(glue_data, tiny_preset,
                                                                     tmp_path, run_glue):
    """`{task}` in the path gives each task its file, the same from a task's command and from
    --task_name=none; a path without it, which several tasks would share, is refused at start,
    whether they are one command's, a folder's, or one already saved by an earlier command."""
    out, models = tmp_path / "out", tmp_path / "models"
    common = (f"--preset={tiny_preset}", f"--data_dir={glue_data[0]}", *TINY,
              f"--submission_directory={out}")
    run_glue("--task_name=wnli,rte", *common,
             f"--finetuning_model_save_path={models / 'model_{task}.keras'}")
    assert sorted(os.listdir(models)) == ["model_rte.keras", "model_wnli.keras"]
    shutil.rmtree(models)
    run_glue("--task_name=none", f"--submission_directory={out}",
             f"--finetuning_model_save_path={models / 'model_{task}.keras'}")
    assert sorted(os.listdir(models)) == ["model_rte.keras", "model_wnli.keras"]
    one_file = f"--finetuning_model_save_path={models / 'model.keras'}"

    def expected(already=""):
        return (f"glue.py: error: {one_file} is one file for the models of 2 tasks (rte, wnli);"
                f"{already} put {{task}} in it for a file per task: "
                f"{models / 'model'}_{{task}}.keras")

    assert error_of(run_glue, "--task_name=wnli,rte", *common, one_file) == expected()
    assert error_of(run_glue, "--task_name=none", f"--submission_directory={out}",
                    one_file) == expected()
    run_glue("--task_name=rte", *common, one_file)  # recorded: its model is copied there
    assert sorted(os.listdir(models)) == ["model.keras", "model_rte.keras", "model_wnli.keras"]
    assert error_of(run_glue, "--task_name=wnli", *common, one_file) == \
        expected(" rte's is there already: move it away, or")


# --- GLUE score and learning-rate sweep ---------------------------------------------------------

def test_glue_average_on_bert_large_leaderboard_numbers():
    # BERT-large on the GLUE leaderboard: score 80.5 (AX is not part of the average).
    results = {
        "cola": {"validation": {"matthews_corrcoef": 0.605}},
        "sst2": {"validation": {"accuracy": 0.949}},
        "mrpc": {"validation": {"f1": 0.893, "accuracy": 0.854}},
        "stsb": {"validation": {"pearson": 0.876, "spearmanr": 0.865}},
        "qqp": {"validation": {"f1": 0.721, "accuracy": 0.893}},
        "mnli": {"validation_matched": {"accuracy": 0.867},
                 "validation_mismatched": {"accuracy": 0.859}},
        "qnli": {"validation": {"accuracy": 0.927}},
        "rte": {"validation": {"accuracy": 0.701}},
        "wnli": {"validation": {"accuracy": 0.651}},
        "ax": {"train_seconds": 1.0},
    }
    score = glue.glue_score(results)
    assert round(100 * score["average"], 1) == 80.5
    assert score["tasks"]["mnli"] == pytest.approx(0.863)
    assert glue.format_results(results).endswith(": 80.52")


def test_mnli_counts_once_however_it_was_run():
    split_runs = {"mnli_matched": {"validation_matched": {"accuracy": 0.8}},
                  "mnli_mismatched": {"validation_mismatched": {"accuracy": 0.7}}}
    assert glue.glue_score(split_runs) == {"average": pytest.approx(0.75),
                                           "tasks": {"mnli": pytest.approx(0.75)}}


class StandInModel:
    """A finetuned model as far as a run needs one."""

    run = None  # (learning rate, seed): what its weights come from

@pytest.mark.slow
def test_the_rate_with_the_best_median_wins_and_test_is_predicted_once_per_rate(
        glue_data, tiny_preset, tmp_path, run_glue, monkeypatch):
    dev_accuracy = {(2e-5, 1): 0.60, (2e-5, 2): 0.90, (2e-5, 3): 0.61,  # median 0.61, best 0.90
                    (3e-5, 1): 0.70, (3e-5, 2): 0.72, (3e-5, 3): 0.71}  # median 0.71
    predicted = []

    def finetune(model, split, checkpoints, *, seed, **kwargs):
        model.run = (float(glue.FLAGS.learning_rate[0]), seed)  # the run's own flags
        return {"collapsed": False, "validation": {"accuracy": dev_accuracy[model.run]}}

    def predict_test(model, test_rows, task, batch_size, name):
        predicted.append(model.run)
        table = pd.DataFrame({"index": [0], "prediction": [f"{model.run}"]})
        return {"RTE.tsv": table}

    monkeypatch.setattr(glue, "finetune", finetune)
    monkeypatch.setattr(glue, "predict_test", predict_test)
    monkeypatch.setattr(glue, "load_pretrained_model", lambda: None)
    monkeypatch.setattr(glue, "make_finetuning_model", lambda pretrained, outputs: StandInModel())
    monkeypatch.setattr(glue, "compile_for", lambda *args: None)
    run_glue("--task_name=rte", "--learning_rate=2e-5,3e-5", "--seed=1,2,3",
             f"--preset={tiny_preset}", f"--data_dir={glue_data[0]}",
             f"--submission_directory={tmp_path}")
    entry = json.loads((tmp_path / "glue_results.json").read_text())["rte"]
    # 3e-5 has the better median, though 2e-5 has the best single run.
    assert entry["submitted_run"] == {"learning_rate": 3e-5, "seed": 2}
    assert entry["learning_rate"] == 3e-5 and entry["validation"] == {"accuracy": 0.72}
    assert entry["glue_task_score"] == pytest.approx(0.71)
    assert [(run["learning_rate"], run["seed"]) for run in entry["runs"]] == sorted(dev_accuracy)
    assert entry["seed_summary"]["3e-05"]["validation"]["accuracy"] == {
        "median": 0.71, "mean": pytest.approx(0.71), "std": pytest.approx(0.01), "min": 0.70,
        "max": 0.72, "runs": 3}
    assert entry["learning_rate_sweep"] == {"2e-05": {"validation": {"accuracy": 0.61}},
                                            "3e-05": {"validation": {"accuracy": 0.71}}}
    # Every run predicts test, once, into its own folder under runs/; the chosen one is copied
    # up.
    assert predicted == sorted(dev_accuracy)
    folder, = glob.glob(str(tmp_path / "runs" / "rte" / "*" / "lr2e-05_seed2"))
    assert open(os.path.join(folder, "RTE.tsv")).read() == "index\tprediction\n0\t(2e-05, 2)\n"
    assert (tmp_path / "RTE.tsv").read_text() == "index\tprediction\n0\t(3e-05, 2)\n"
    assert entry["submission_rows"] == {"RTE.tsv": 1}


@pytest.mark.slow
def test_sweep_end_to_end_records_every_value(glue_data, tiny_preset, tmp_path, run_glue):
    run_glue("--task_name=mrpc", "--learning_rate=1e-3,5e-5", f"--preset={tiny_preset}",
             f"--data_dir={glue_data[0]}", f"--submission_directory={tmp_path}", *TINY)
    entry = json.loads((tmp_path / "glue_results.json").read_text())["mrpc"]
    sweep = entry["learning_rate_sweep"]
    assert sorted(sweep) == ["0.001", "5e-05"]
    best = max(sorted(sweep, key=float), key=lambda rate: glue.task_score(sweep[rate]))  # ties:
    # the smaller rate
    assert entry["learning_rate"] == float(best)


@pytest.mark.parametrize("args, expected", [
    (["--task_name=ax", "--learning_rate=1e-5,2e-5"], "ax has no dev set"),
    (["--task_name=rte,mrpc", "--finetuning_model_load_path=x.keras"], "no such file"),
    (["--make_submission_zip"], "need --submission_directory"),
])
def test_bad_combinations_are_refused(run_glue, args, expected):
    with pytest.raises(SystemExit) as exit_info:
        run_glue(*args)
    assert expected in str(exit_info.value.code)
