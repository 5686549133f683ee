"""Every task name, end to end on tiny fixture data: files, order, spellings and results."""

import json
import math
import os

import numpy as np
import pandas as pd
import pytest
import tensorflow as tf

import glue

TINY = ("--epochs=1", "--batch_size=4", "--max_sequence_length=32")


def read_submission(path):
    with open(path, encoding="utf-8") as file:
        header = file.readline()
    table = pd.read_csv(path, sep="\t", dtype={"prediction": str}, keep_default_na=False)
    return header, table


def check_submission(path, task, expected_rows):
    header, table = read_submission(path)
    assert header == "index\tprediction\n"
    assert list(table["index"]) == list(range(expected_rows))  # every row, ordered by index
    if task.is_regression:
        scores = table["prediction"].astype(float)
        assert scores.between(0, 5).all()
        assert table["prediction"].str.fullmatch(r"\d\.\d{3}").all()
    else:
        assert set(table["prediction"]) <= set(task.submission_labels)


@pytest.mark.parametrize("task_name", sorted(glue.TASKS))
def test_every_task_writes_its_files_and_metrics(task_name, tiny_preset, glue_data, tmp_path,
                                                 run_glue):
    data_dir, counts = glue_data
    task = glue.TASKS[task_name]
    run_glue(f"--task_name={task_name}", f"--preset={tiny_preset}", f"--data_dir={data_dir}",
             f"--submission_directory={tmp_path}", *TINY)

    written = sorted(name for name in os.listdir(tmp_path) if name.endswith(".tsv"))
    assert written == sorted(output.file for output in task.outputs)
    for output in task.outputs:
        check_submission(tmp_path / output.file, glue.TASKS[output.dataset],
                         counts[output.dataset][output.split])

    results = json.loads((tmp_path / "glue_results.json").read_text())
    entry = results[task_name]
    assert entry["flags"]["task_name"] == [task_name]
    assert entry["train_examples"] == counts[task.training_data]["train"]
    assert min(entry["load_seconds"], entry["train_seconds"], entry["predict_seconds"]) >= 0
    for split in task.eval_splits:
        assert set(entry[split]) == set(task.metrics)
        for value in entry[split].values():
            assert value is None or -1 <= value <= 1
    assert not any(key.startswith("validation") and key not in task.eval_splits for key in entry)


def test_glue_task_table_matches_the_leaderboard():
    files = {output.file for task in glue.TASKS.values() for output in task.outputs}
    assert files == {"AX.tsv", "CoLA.tsv", "MNLI-m.tsv", "MNLI-mm.tsv", "MRPC.tsv", "QNLI.tsv",
                     "QQP.tsv", "RTE.tsv", "SST-2.tsv", "STS-B.tsv", "WNLI.tsv"}
    assert glue.TASKS["mnli"].num_outputs == 3 and glue.TASKS["ax"].num_outputs == 3
    assert glue.TASKS["stsb"].is_regression and glue.TASKS["stsb"].num_outputs == 1
    assert [output.file for output in glue.TASKS["mnli"].outputs] == [
        "MNLI-m.tsv", "MNLI-mm.tsv", "AX.tsv"]


def test_submission_spellings_match_the_reference_submission():
    reference = os.path.join(os.path.dirname(__file__), "..", "..", "shared",
                             "glue_reference_submission")
    if not os.path.isdir(reference):
        pytest.skip("the shared reference submission is not beside this checkout")
    for task in glue.TASKS.values():
        if task.is_regression:
            continue
        for output in task.outputs:
            table = pd.read_csv(os.path.join(reference, output.file), sep="\t", dtype=str)
            assert set(table["prediction"].str.strip()) <= set(task.submission_labels), output


class FixedLogits:
    """Stands in for a Keras model: returns the given logits whatever the input."""

    def __init__(self, logits):
        self.logits = logits

    distribute_strategy = tf.distribute.get_strategy()

    def make_predict_function(self):
        self.predict_function = tf.function(lambda data: data)

    def predict(self, inputs, verbose=0, callbacks=()):
        return self.logits


def test_stsb_predictions_are_clipped_to_the_label_range(glue_data):
    data_dir, _ = glue_data
    task = glue.TASKS["stsb"]
    examples = glue.read_local_split(data_dir, "stsb", "test")
    scores = np.array([[-1.5], [0.25], [7.0], [5.0004], [2.0], [3.0], [4.0], [6.0]], "float32")
    tokenized = glue.tokenize(examples, task, tf.function(lambda feature, label: (feature, label)))
    idx, _, predictions = glue.predict(FixedLogits(scores), tokenized, task, batch_size=4)
    assert predictions.tolist() == pytest.approx([0.0, 0.25, 5.0, 5.0, 2.0, 3.0, 4.0, 5.0])
    table = glue.submission_table(task, idx, predictions)
    assert table["index"].tolist() == sorted(idx.tolist())
    assert set(table["prediction"]) <= {"0.000", "0.250", "5.000", "2.000", "3.000", "4.000"}


def test_rows_follow_the_index_column_not_the_file_order(glue_data, tiny_preset, tmp_path,
                                                         run_glue):
    data_dir, _ = glue_data
    file_order = pd.read_csv(os.path.join(data_dir, "RTE", "test.tsv"), sep="\t")["index"]
    assert file_order.tolist() != sorted(file_order)  # the fixture is shuffled on purpose
    run_glue("--task_name=rte", f"--preset={tiny_preset}", f"--data_dir={data_dir}",
             f"--submission_directory={tmp_path}", *TINY)
    _, table = read_submission(tmp_path / "RTE.tsv")
    assert table["index"].tolist() == sorted(file_order)


@pytest.mark.slow
def test_saved_model_reloads_and_predicts_the_same(glue_data, tiny_preset, tmp_path, run_glue):
    data_dir, _ = glue_data
    model_path = tmp_path / "mrpc.keras"
    common = (f"--preset={tiny_preset}", f"--data_dir={data_dir}", "--task_name=mrpc", *TINY)
    run_glue(*common, f"--submission_directory={tmp_path / 'trained'}",
             f"--finetuning_model_save_path={model_path}")
    run_glue(*common, f"--submission_directory={tmp_path / 'loaded'}",
             f"--finetuning_model_load_path={model_path}")
    trained = json.loads((tmp_path / "trained" / "glue_results.json").read_text())["mrpc"]
    loaded = json.loads((tmp_path / "loaded" / "glue_results.json").read_text())["mrpc"]
    assert loaded["validation"] == trained["validation"]
    assert "train_examples" not in loaded
    assert ((tmp_path / "trained" / "MRPC.tsv").read_text() ==
            (tmp_path / "loaded" / "MRPC.tsv").read_text())


@pytest.mark.slow
def test_ax_predicts_with_a_saved_mnli_model(glue_data, tiny_preset, tmp_path, run_glue):
    data_dir, counts = glue_data
    model_path = tmp_path / "mnli.keras"
    common = (f"--preset={tiny_preset}", f"--data_dir={data_dir}", *TINY)
    run_glue("--task_name=mnli", *common, f"--submission_directory={tmp_path / 'mnli'}",
             f"--finetuning_model_save_path={model_path}")
    run_glue("--task_name=ax", *common, f"--submission_directory={tmp_path / 'ax'}",
             f"--finetuning_model_load_path={model_path}")
    assert ((tmp_path / "ax" / "AX.tsv").read_text() ==
            (tmp_path / "mnli" / "AX.tsv").read_text())
    visible = [name for name in os.listdir(tmp_path / "ax") if not name.startswith(".")]
    # runs/: see test_reuse.py; nothing trained, so no TensorBoard logs and nothing to draw
    assert sorted(visible) == ["AX.tsv", "glue_report.md", "glue_results.json", "runs"]


def test_own_classifier_block_is_used_without_the_default_head(glue_data, tiny_preset, tmp_path,
                                                               run_glue):
    data_dir, counts = glue_data
    run_glue("--task_name=stsb", "--nouse_default_classifier", f"--preset={tiny_preset}",
             f"--data_dir={data_dir}", f"--submission_directory={tmp_path}", *TINY)
    check_submission(tmp_path / "STS-B.tsv", glue.TASKS["stsb"], counts["stsb"]["test"])


@pytest.mark.slow
def test_results_merge_across_runs_and_results_path(glue_data, tiny_preset, tmp_path, run_glue):
    data_dir, _ = glue_data
    results_path = tmp_path / "all_results.json"
    for task_name in ("wnli", "cola"):
        run_glue(f"--task_name={task_name}", f"--preset={tiny_preset}", f"--data_dir={data_dir}",
                 f"--results_path={results_path}", *TINY)
    results = json.loads(results_path.read_text())
    assert sorted(results) == ["cola", "glue_score", "wnli"]
    assert sorted(results["glue_score"]["tasks"]) == ["cola", "wnli"]
    assert set(results["cola"]["validation"]) == {"matthews_corrcoef"}
    assert not any(name.endswith(".tsv") for name in os.listdir(tmp_path))  # no submission dir


@pytest.mark.slow
def test_same_seed_same_predictions(glue_data, tiny_preset, tmp_path, run_glue):
    data_dir, _ = glue_data
    for run in ("first", "second"):
        run_glue("--task_name=stsb", f"--preset={tiny_preset}", f"--data_dir={data_dir}",
                 f"--submission_directory={tmp_path / run}", *TINY)
    first = pd.read_csv(tmp_path / "first" / "STS-B.tsv", sep="\t")["prediction"]
    second = pd.read_csv(tmp_path / "second" / "STS-B.tsv", sep="\t")["prediction"]
    assert all(math.isclose(a, b, abs_tol=1e-3) for a, b in zip(first, second))


def test_limit_checks_an_edit_on_a_few_rows_and_keeps_it_apart(tiny_preset, glue_data, tmp_path,
                                                                run_glue, capsys):
    """--limit=N: the first N training rows and N rows of each dev split, no leaderboard file,
    recorded under settings of its own (a full run is not taken for it, nor it for one), the
    table says so, and a zip is refused while a task's results are limited."""
    data_dir, counts = glue_data
    common = ("--task_name=mnli", f"--preset={tiny_preset}", f"--data_dir={data_dir}",
              f"--submission_directory={tmp_path}", *TINY)
    run_glue(*common, "--limit=5")
    entry = json.loads((tmp_path / "glue_results.json").read_text())["mnli"]
    assert entry["train_examples"] == 5 and entry["fingerprint"]["limit"] == 5
    run_folder, = (tmp_path / "runs" / "mnli").glob("*/lr*")
    assert sorted(os.listdir(run_folder)) == [
        "log.txt", "run.json", "validation_matched_predictions.tsv",
        "validation_mismatched_predictions.tsv"]  # dev predictions only: no test file
    for split in ("matched", "mismatched"):
        assert len(pd.read_csv(run_folder / f"validation_{split}_predictions.tsv", sep="\t")) == 5
    assert not list(tmp_path.glob("*.tsv"))
    assert "; limited to the first 5 rows)" in capsys.readouterr().out
    assert "| mnli | validation_matched | accuracy |" in (tmp_path / "glue_report.md").read_text()
    assert "| 1, first 5 rows |" in (tmp_path / "glue_report.md").read_text()  # its table too

    with pytest.raises(SystemExit) as refused:
        run_glue("--task_name=none", f"--submission_directory={tmp_path}",
                 "--make_submission_zip")
    assert refused.value.code == (
        "glue.py: error: --make_submission_zip: mnli ran with --limit, which writes no "
        "leaderboard file; zip after runs without it")

    run_glue(*common)  # the full run is trained, not taken from the limited one
    out = capsys.readouterr().out
    assert "mnli: redone, limit 5 -> None" in out and "limited to" not in out
    entry = json.loads((tmp_path / "glue_results.json").read_text())["mnli"]
    assert entry["train_examples"] == counts["mnli"]["train"]
    assert sorted(path.name for path in tmp_path.glob("*.tsv")) == ["AX.tsv", "MNLI-m.tsv",
                                                                    "MNLI-mm.tsv"]
