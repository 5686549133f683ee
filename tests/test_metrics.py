"""The official GLUE metrics on values worked out by hand."""

import json

import numpy as np
import pytest

import glue


def test_classification_metrics_on_known_values():
    labels = np.array([1, 1, 1, 0, 0, 0])
    predictions = np.array([1, 1, 0, 0, 0, 1])  # 2 TP, 2 TN, 1 FP, 1 FN
    assert glue.compute_metrics(glue.TASKS["mrpc"], labels, predictions) == pytest.approx(
        {"f1": 2 / 3, "accuracy": 4 / 6})
    # MCC = (TP*TN - FP*FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN)) = 3 / 9
    assert glue.compute_metrics(glue.TASKS["cola"], labels, predictions) == pytest.approx(
        {"matthews_corrcoef": 1 / 3})
    assert glue.compute_metrics(glue.TASKS["mnli"], np.array([0, 1, 2, 2]),
                                np.array([0, 1, 2, 0])) == {"accuracy": 0.75}


def test_f1_is_of_the_positive_class():
    # Everything predicted negative: accuracy is high but F1 of the positive class is 0.
    labels = np.array([0, 0, 0, 1])
    assert glue.compute_metrics(glue.TASKS["qqp"], labels, np.zeros(4, int)) == pytest.approx(
        {"f1": 0.0, "accuracy": 0.75})


def test_regression_metrics_on_known_values():
    scores = np.array([1.0, 2.0, 3.0, 4.0])
    squares = scores ** 2  # monotonic, so Spearman is exactly 1 while Pearson is not
    pearson = np.corrcoef(scores, squares)[0, 1]
    metrics = glue.compute_metrics(glue.TASKS["stsb"], scores, squares)
    assert metrics == pytest.approx({"pearson": pearson, "spearmanr": 1.0})
    assert 0.98 < metrics["pearson"] < 0.99


def test_undefined_correlation_is_reported_as_none_not_nan():
    metrics = glue.compute_metrics(glue.TASKS["stsb"], np.array([1.0, 2.0, 3.0]),
                                   np.full(3, 2.5))
    assert metrics == {"pearson": None, "spearmanr": None}
    json.dumps(metrics, allow_nan=False)  # stays valid JSON


def test_results_table_prints_percentages():
    table = glue.format_results({"mrpc": {"validation": {"f1": 0.88123, "accuracy": 0.84},
                                          "train_seconds": 3.0}})
    assert "f1 88.12" in table and "accuracy 84.00" in table
    assert "train_seconds" not in table


def merge(path, task_name, entry):
    with glue.updating_results(path) as results:
        results[task_name] = entry


def test_results_merge_keeps_other_tasks(tmp_path):
    path = str(tmp_path / "results.json")
    merge(path, "rte", {"validation": {"accuracy": 0.6}})
    merge(path, "cola", {"validation": {"matthews_corrcoef": 0.3}})
    merge(path, "rte", {"validation": {"accuracy": 0.7}})
    results = json.loads(open(path).read())
    assert results["cola"] == {"validation": {"matthews_corrcoef": 0.3}}
    assert results["rte"] == {"validation": {"accuracy": 0.7}}
    assert results["glue_score"]["average"] == pytest.approx(0.5)
