"""--compare_with: is this folder's model better than another's, with an interval over seeds and
dev examples. Each run keeps its dev predictions, which the comparison resamples, paired."""

import json
import os
import shutil

import numpy as np
import pandas as pd
import pytest

import glue
from conftest import InProcessRun, error_of, glue_main, write_tsv

# Long enough for the tiny model to learn the task (as in test_distribute.py).
TRAINING = ("--task_name=sst2", "--epochs=15", "--batch_size=8", "--max_sequence_length=32",
            "--learning_rate=3e-3", "--pooling=cls", "--select_best_epoch=false",
            "--seed=1,2,3", "--notensorboard")


def shuffled_labels(data_dir, out):
    """A copy of the learnable SST-2 files whose training labels are shuffled: the same dev set,
    nothing to learn."""
    shutil.copytree(data_dir, out)
    path = os.path.join(out, "SST-2", "train.tsv")
    table = pd.read_csv(path, sep="\t")
    table["label"] = np.random.default_rng(0).permutation(table["label"].to_numpy())
    write_tsv(path, list(table.columns), table.itertuples(index=False))
    return str(out)


@pytest.fixture(scope="module")
def folders(tiny_preset, learnable_data, tmp_path_factory):
    """Two submission folders of 3 seeds each: `learned` on the true labels, compared as it
    trains with `shuffled`, on shuffled ones."""
    root = tmp_path_factory.mktemp("compare")
    shuffled_data = shuffled_labels(learnable_data, root / "shuffled_data")
    learned, shuffled = root / "learned", root / "shuffled"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(glue, "start_run", InProcessRun)
        glue_main(*TRAINING, f"--preset={tiny_preset}", f"--data_dir={shuffled_data}",
                  f"--submission_directory={shuffled}")
        glue_main(*TRAINING, f"--preset={tiny_preset}", f"--data_dir={learnable_data}",
                  f"--submission_directory={learned}", f"--compare_with={shuffled}")
    return learned, shuffled


def comparison_of(folder):
    return json.loads((folder / glue.COMPARISON).read_text())


@pytest.mark.slow
def test_true_labels_beat_shuffled_ones_with_every_dev_example_paired(folders):
    learned, shuffled = folders
    comparison = comparison_of(learned)
    row = comparison["tasks"]["sst2"]
    assert comparison["against"] == str(shuffled)
    assert row["verdict"] == "better" and row["interval"][0] > 0
    assert row["interval"][0] <= row["difference"] <= row["interval"][1]
    assert row["paired_examples"] == 33 and row["runs"] == [3, 3]
    assert "note" not in row
    results = json.loads((learned / "glue_results.json").read_text())
    assert row["this"] == results["sst2"]["glue_task_score"]
    assert comparison["glue_score"]["verdict"] == "better"
    report = (learned / glue.REPORT).read_text()
    assert f"## Compared with {shuffled}" in report
    assert "sst2" in report.split("## Compared with")[1] and "better" in report
    figure = learned / glue.REPORT_FIGURES / "comparison.png"
    assert figure.read_bytes().startswith(b"\x89PNG")


@pytest.mark.slow
def test_each_run_keeps_the_dev_predictions_its_metrics_come_from(folders):
    learned, _ = folders
    entry = json.loads((learned / "glue_results.json").read_text())["sst2"]
    for run in entry["runs"]:
        folder = glue.run_folder(learned / "runs" / "sst2" / entry["fingerprint_id"],
                                 run["learning_rate"], run["seed"])
        table = pd.read_csv(os.path.join(folder, "validation_predictions.tsv"), sep="\t")
        assert list(table.columns) == ["index", "label", "prediction"]
        assert list(table["index"]) == list(range(33))
        accuracy = (table["label"] == table["prediction"]).mean()
        assert accuracy == pytest.approx(run["validation"]["accuracy"])


@pytest.mark.slow
def test_a_folder_against_itself_shows_no_difference(folders, capsys):
    learned, _ = folders
    glue_main("--task_name=none", f"--submission_directory={learned}",
              f"--compare_with={learned}")
    out = capsys.readouterr().out
    assert "--compare_with is this folder itself" in out
    row = comparison_of(learned)["tasks"]["sst2"]
    assert row["difference"] == 0 and row["verdict"] == "no difference shown"
    assert row["interval"][0] <= 0 <= row["interval"][1]
    line = next(line for line in out.splitlines() if line.startswith("sst2 ") and "[" in line)
    assert line.endswith("no difference shown")


@pytest.mark.slow
def test_runs_without_dev_predictions_or_on_other_dev_sets_resample_runs_only(folders, tmp_path,
                                                                              capsys):
    learned, shuffled = folders
    older = tmp_path / "older"
    shutil.copytree(shuffled, older)
    for path in (older / "runs").glob("*/*/*/validation_predictions.tsv"):
        path.unlink()  # as recorded by a glue.py before dev predictions were kept
    other_dev = tmp_path / "other_dev"
    shutil.copytree(shuffled, other_dev)
    results = json.loads((other_dev / "glue_results.json").read_text())
    results["sst2"]["fingerprint"]["data"]["sst2 validation"] = "sha256:another"
    (other_dev / "glue_results.json").write_text(json.dumps(results))
    for other, why in ((older, "without their dev predictions"),
                       (other_dev, "the dev sets' files differ")):
        glue_main("--task_name=none", f"--submission_directory={learned}",
                  f"--compare_with={other}")
        row = comparison_of(learned)["tasks"]["sst2"]
        assert row["paired_examples"] == 0 and why in row["note"]
        assert row["runs"] == [3, 3] and row["verdict"] != "no verdict"  # 3 runs a side
        assert why in capsys.readouterr().out


def made_up_mnli(folder, seeds=(1, 2, 3)):
    """MNLI records with dev predictions, one side right on 90% of each dev split, the other on
    60%: {side: results}, the records under folder / side."""
    task, rng = glue.TASKS["mnli"], np.random.default_rng(0)
    labels = {split: rng.integers(0, 3, 200) for split in task.eval_splits}
    results = {}
    for side, accuracy in (("this", 0.9), ("other", 0.6)):
        records = []
        for seed in seeds:
            run, tables = {"learning_rate": 2e-5, "seed": seed, "run_id": f"{side}{seed}"}, {}
            for split, gold in labels.items():
                predicted = np.where(rng.random(200) < accuracy, gold, (gold + 1) % 3)
                run[split] = glue.compute_metrics(task, gold, predicted)
                tables[glue.DEV_PREDICTIONS.format(split)] = pd.DataFrame(
                    {"index": np.arange(200), "label": gold, "prediction": predicted})
            glue.write_run(glue.run_folder(folder / side / "mnli" / "id", 2e-5, seed),
                           run, tables)
            records.append(run)
        results[side] = {"mnli": {**glue.summarized(records), "fingerprint_id": "id",
                                  "fingerprint": {"data": {"mnli validation_matched": "m"}}}}
    return results


def test_mnli_pairs_each_dev_split_on_its_own(tmp_path):
    results = made_up_mnli(tmp_path)
    comparison = glue.compare(results["this"], tmp_path / "this", results["other"],
                              tmp_path / "other")
    row = comparison["tasks"]["mnli"]
    assert row["paired_examples"] == 400 and row["runs"] == [3, 3]
    assert row["verdict"] == "better" and 0.2 < row["interval"][0] < row["difference"]
    assert comparison == glue.compare(results["this"], tmp_path / "this", results["other"],
                                      tmp_path / "other")  # a fixed seed: reproducible
    swapped = glue.compare(results["other"], tmp_path / "other", results["this"],
                           tmp_path / "this")
    assert swapped["tasks"]["mnli"]["verdict"] == "worse"


def test_too_few_runs_say_what_the_interval_leaves_out(tmp_path):
    """One run a side, paired: an interval over the examples, and a note that seeds are not in
    it. Two runs a side without examples to pair: no verdict (one run would give an interval of
    width 0)."""
    results = made_up_mnli(tmp_path / "one", seeds=(1,))
    row = glue.compare(results["this"], tmp_path / "one" / "this", results["other"],
                       tmp_path / "one" / "other")["tasks"]["mnli"]
    assert row["verdict"] == "better" and "a side of one run" in row["note"]
    results = made_up_mnli(tmp_path / "two", seeds=(1, 2))
    for path in (tmp_path / "two" / "other").glob("*/*/*/*_predictions.tsv"):
        path.unlink()
    comparison = glue.compare(results["this"], tmp_path / "two" / "this", results["other"],
                              tmp_path / "two" / "other")
    row = comparison["tasks"]["mnli"]
    assert row["verdict"] == "no verdict" and "fewer than 3 runs a side" in row["note"]
    assert comparison["glue_score"]["verdict"] == "no verdict"


def test_the_resampled_metrics_are_the_official_ones_on_the_whole_dev_set():
    """Drawing every example once, the resampled metrics equal METRICS' (sklearn, scipy)."""
    rng = np.random.default_rng(1)
    labels, predictions = rng.integers(0, 2, 50), rng.integers(0, 2, 50)
    scores = rng.uniform(0, 5, 50).round(1), rng.uniform(0, 5, 50)
    everything = np.arange(50)[None, :], np.ones((1, 50), np.float32)
    for metric, (gold, predicted) in {
            "accuracy": (labels, predictions), "f1": (labels, predictions),
            "matthews_corrcoef": (labels, predictions), "pearson": scores,
            "spearmanr": scores}.items():
        resampled = glue.RESAMPLED_METRICS[metric](
            gold.astype(np.float32), predicted.astype(np.float32), *everything)
        assert resampled[0] == pytest.approx(glue.METRICS[metric](gold, predicted), abs=1e-5)
    drawn, counts = glue.example_draws(7, np.random.default_rng(0))
    assert drawn.shape == counts.shape == (glue.RESAMPLES, 7)
    assert (counts.sum(axis=1) == 7).all()
    assert all((np.bincount(row, minlength=7) == count).all() for row, count in zip(drawn, counts))


def test_bad_compare_with_ends_at_start_with_nothing_written(glue_data, tiny_preset, tmp_path,
                                                             run_glue):
    out = tmp_path / "out"
    args = ("--task_name=rte", f"--preset={tiny_preset}", f"--data_dir={glue_data[0]}",
            f"--submission_directory={out}")
    missing = tmp_path / "missing"
    assert error_of(run_glue, *args, f"--compare_with={missing}") == (
        f"glue.py: error: --compare_with={missing}: no such folder; give a submission folder "
        "with its glue_results.json")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert f"--compare_with={empty}: no dev results there" in error_of(
        run_glue, *args, f"--compare_with={empty}")
    other = tmp_path / "other"
    other.mkdir()
    run = {"learning_rate": 1e-5, "seed": 1, "validation": {"matthews_corrcoef": 0.1}}
    (other / "glue_results.json").write_text(json.dumps({"cola": {
        **run, "submitted_run": {"learning_rate": 1e-5, "seed": 1}, "runs": [run]}}))
    assert error_of(run_glue, *args, f"--compare_with={other}") == (
        f"glue.py: error: --compare_with={other}: no task in common (it has cola; this one rte)")
    assert not out.exists()
