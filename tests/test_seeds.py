"""Numbers for a paper: several seeds, the best evaluation, clipping, collapsed runs, and starting
from another finetuned model. Runs split across processes: test_reuse.py."""

import io
import shutil
import statistics
import zipfile

import h5py
import keras
import numpy as np
import pandas as pd
import pytest
import tensorflow as tf
from absl import flags

import glue
from conftest import error_of, entry_of, options_for

TINY = ("--epochs=1", "--batch_size=4", "--max_sequence_length=32")


# --- Seeds --------------------------------------------------------------------------------------

@pytest.mark.slow
def test_three_seeds_give_three_runs_and_their_median(glue_data, tiny_preset, tmp_path, run_glue,
                                                      capsys):
    run_glue("--task_name=rte", "--seed=1,2,3", f"--preset={tiny_preset}",
             f"--data_dir={glue_data[0]}", f"--submission_directory={tmp_path}", *TINY)
    entry = entry_of(tmp_path)
    assert [run["seed"] for run in entry["runs"]] == [1, 2, 3]
    accuracies = [run["validation"]["accuracy"] for run in entry["runs"]]
    summary = entry["seed_summary"]["5e-05"]["validation"]["accuracy"]
    assert summary["median"] == sorted(accuracies)[1] and summary["runs"] == 3
    assert summary["std"] == pytest.approx(statistics.stdev(accuracies))
    submitted = max(entry["runs"], key=glue.run_score)
    assert entry["submitted_run"] == {"learning_rate": 5e-5, "seed": submitted["seed"]}
    assert entry["validation"] == submitted["validation"]
    out = capsys.readouterr().out
    assert f"accuracy {100 * summary['median']:.2f} ± {100 * summary['std']:.2f}  (3 runs" in out


def test_a_metric_undefined_in_some_runs_is_left_out_of_its_summary():
    runs = [{"learning_rate": 1e-5, "seed": seed, "validation": {"pearson": value}}
            for seed, value in ((1, 0.8), (2, None), (3, 0.6))]
    entry = glue.summarized(runs)
    assert entry["seed_summary"]["1e-05"]["validation"]["pearson"] == {
        "median": 0.7, "mean": pytest.approx(0.7), "std": pytest.approx(0.1414, abs=1e-4),
        "min": 0.6, "max": 0.8, "runs": 2}
    assert entry["glue_task_score"] == 0.6  # the task scores 0.8, 0 and 0.6: an undefined 0
    assert "undefined in 1" in glue.format_results({"stsb": entry})


def test_one_run_has_a_spread_of_zero():
    entry = glue.summarized([{"learning_rate": 1e-5, "seed": 1, "validation": {"accuracy": 0.5}}])
    assert entry["seed_summary"]["1e-05"]["validation"]["accuracy"]["std"] == 0.0
    assert "accuracy 50.00 ± 0.00  (1 run)" in glue.format_results({"rte": entry})


def test_restart_seeds_never_meet_asked_seeds(run_glue):
    assert "1001 is a restart seed of 1" in error_of(
        run_glue, "--task_name=rte", "--seed=1,1001", "--max_restarts=1")
    assert "a seed repeats" in error_of(run_glue, "--task_name=rte", "--seed=3,3")


def test_seeds_must_be_integers(run_glue):
    with pytest.raises(flags.IllegalFlagValueError, match="integers"):
        flags.FLAGS(["glue.py", "--seed=1,two"])
    flags.FLAGS.unparse_flags()


# --- The best evaluation ------------------------------------------------------------------------

@pytest.mark.parametrize("select_best_epoch", [True, False])
@pytest.mark.slow
def test_the_best_evaluation_s_weights_predict_test(glue_data, tiny_preset, tmp_path, run_glue,
                                                    monkeypatch, select_best_epoch):
    """Dev accuracy is scripted to peak at the second of three epochs: with best-epoch
    selection, the saved (and test-predicting) model has that epoch's weights."""
    scripted = iter([0.5, 0.9, 0.6])
    snapshots = []

    def evaluate(model, eval_rows, task, batch_size, name):
        snapshots.append(model.get_weights())
        return {"validation": {"accuracy": next(scripted)}}, False, {}

    monkeypatch.setattr(glue, "evaluate", evaluate)
    save_path = tmp_path / "model.keras"
    run_glue("--task_name=rte", "--epochs=3", "--batch_size=4", "--max_sequence_length=32",
             "--learning_rate=1e-2", f"--select_best_epoch={select_best_epoch}",
             f"--preset={tiny_preset}", f"--data_dir={glue_data[0]}",
             f"--submission_directory={tmp_path}", f"--finetuning_model_save_path={save_path}")
    run, = entry_of(tmp_path)["runs"]
    assert [(e["epoch"], e["validation"]["accuracy"]) for e in run["evaluations"]] == [
        (1, 0.5), (2, 0.9), (3, 0.6)]
    assert run["best_epoch"] == 2
    assert run["validation"] == {"accuracy": 0.9 if select_best_epoch else 0.6}
    saved = keras.models.load_model(save_path, compile=False).get_weights()
    expected, other = (snapshots[1], snapshots[2]) if select_best_epoch else \
        (snapshots[2], snapshots[1])
    for mine, theirs in zip(saved, expected):
        np.testing.assert_array_equal(mine, theirs)
    assert any(not np.array_equal(mine, theirs) for mine, theirs in zip(saved, other))
    # The test file is the saved model's predictions.
    model = keras.models.load_model(save_path, compile=False)
    rows = glue.tokenize(glue.load_split(glue_data[0], "rte", "test"), glue.TASKS["rte"],
                         tf_preprocess(tiny_preset))
    idx, _, predictions = glue.predict(model, rows, glue.TASKS["rte"], 4)
    expected_table = glue.submission_table(glue.TASKS["rte"], idx, predictions)
    written = pd.read_csv(tmp_path / "RTE.tsv", sep="\t")
    assert list(written["prediction"]) == list(expected_table["prediction"])


def tf_preprocess(preset):
    flags.FLAGS(["glue.py", f"--preset={preset}", "--max_sequence_length=32"])
    try:
        return tf.function(glue.make_preprocess_fn())
    finally:
        flags.FLAGS.unparse_flags()


def test_evaluations_per_epoch_evaluates_within_epochs(glue_data, tiny_preset, tmp_path,
                                                       run_glue):
    run_glue("--task_name=rte", "--epochs=2", "--evaluations_per_epoch=2", "--batch_size=4",
             "--max_sequence_length=32", f"--preset={tiny_preset}", f"--data_dir={glue_data[0]}",
             f"--submission_directory={tmp_path}")
    run, = entry_of(tmp_path)["runs"]
    steps = glue.steps_per_epoch(glue.tokenize(
        glue.load_split(glue_data[0], "rte", "train"), glue.TASKS["rte"],
        tf_preprocess(tiny_preset)), 4)
    assert [e["step"] for e in run["evaluations"]] == [
        -(-steps // 2), steps, steps + -(-steps // 2), 2 * steps]
    assert [e["epoch"] for e in run["evaluations"]][1::2] == [1, 2]
    assert run["validation"] == max(run["evaluations"], key=glue.run_score)["validation"]


# --- Clipping -----------------------------------------------------------------------------------

def test_clipping_scales_a_huge_gradient_to_norm_1():
    """With --clip_norm=1 a huge gradient acts as that gradient scaled to norm 1, and the
    training path differs from the unclipped one."""
    huge, ordinary = np.array([3e6, -4e6], np.float32), np.array([0.5, 0.1], np.float32)

    def path(clip_norm, gradients):
        optimizer = glue.make_optimizer(1e-2, total_steps=100, warmup_ratio=0.0,
                                        weight_decay=0.0, clip_norm=clip_norm)
        weight = keras.Variable(np.zeros(2, np.float32))
        for gradient in gradients:
            optimizer.apply([gradient], [weight])
        return np.array(weight)

    clipped = path(1.0, [huge, ordinary])
    np.testing.assert_allclose(clipped, path(0.0, [huge / 5e6, ordinary]), rtol=1e-6)
    assert not np.allclose(clipped, path(0.0, [huge, ordinary]), rtol=1e-3)


def test_clip_norm_joins_the_fingerprint():
    settings = glue.fingerprint(glue.TASKS["rte"], options_for("--clip_norm=0"),
                                ("_DefaultDistributionStrategy", 1))
    assert settings["clip_norm"] == 0.0
    for name in ("clip_norm", "evaluations_per_epoch", "select_best_epoch"):
        assert name in settings


# --- Collapsed runs -----------------------------------------------------------------------------

def force_first_run_to_collapse(monkeypatch):
    evaluated = []
    real = glue.evaluate

    def evaluate(model, eval_rows, task, batch_size, name):
        metrics, _, predictions = real(model, eval_rows, task, batch_size, name)
        evaluated.append(name)
        return metrics, len(evaluated) == 1, predictions

    monkeypatch.setattr(glue, "evaluate", evaluate)


def test_a_collapsed_run_is_marked(glue_data, tiny_preset, tmp_path, run_glue, monkeypatch,
                                   capsys):
    force_first_run_to_collapse(monkeypatch)
    run_glue("--task_name=rte", f"--preset={tiny_preset}", f"--data_dir={glue_data[0]}",
             f"--submission_directory={tmp_path}", *TINY)
    entry = entry_of(tmp_path)
    assert entry["runs"][0]["collapsed"] is True
    assert entry["seed_summary"]["5e-05"]["collapsed_runs"] == 1
    out = capsys.readouterr().out
    assert "rte: COLLAPSED: every dev prediction is the same" in out
    assert "(1 run, 1 collapsed)" in out


@pytest.mark.slow
def test_a_collapsed_run_is_restarted_with_seed_plus_1000(glue_data, tiny_preset, tmp_path,
                                                          run_glue, monkeypatch):
    force_first_run_to_collapse(monkeypatch)
    run_glue("--task_name=rte", "--seed=7", "--max_restarts=1", f"--preset={tiny_preset}",
             f"--data_dir={glue_data[0]}", f"--submission_directory={tmp_path}", *TINY)
    entry = entry_of(tmp_path)
    first, restart = entry["runs"]
    assert (first["seed"], first["collapsed"]) == (7, True)
    assert (restart["seed"], restart["restart_of"], restart["collapsed"]) == (1007, 7, False)
    assert entry["submitted_run"]["seed"] == 1007
    summary = entry["seed_summary"]["5e-05"]
    assert summary["collapsed_runs"] == 0 and summary["task_score"]["runs"] == 1


def test_a_rate_with_fewer_runs_than_the_others_is_not_chosen(glue_data, tiny_preset, tmp_path,
                                                              run_glue, monkeypatch, capsys):
    """An exploratory run at 1e-4 scores best; a sweep of two rates and two seeds follows into
    the same folder. The single run may not beat rates of two runs, and the table says so."""
    common = ("--task_name=rte", f"--preset={tiny_preset}", f"--data_dir={glue_data[0]}",
              f"--submission_directory={tmp_path}", *TINY)
    real, score = glue.evaluate, [0.99]

    def evaluate(model, eval_rows, task, batch_size, name):
        metrics, collapsed, predictions = real(model, eval_rows, task, batch_size, name)
        return ({split: {metric: score[0] for metric in values}
                 for split, values in metrics.items()}, collapsed, predictions)

    monkeypatch.setattr(glue, "evaluate", evaluate)
    run_glue(*common, "--learning_rate=1e-4", "--seed=1")
    score[0] = 0.6
    capsys.readouterr()
    run_glue(*common, "--learning_rate=2e-5,3e-5", "--seed=1,2")
    entry = entry_of(tmp_path)
    assert entry["submitted_run"] == {"learning_rate": 2e-5, "seed": 1}
    assert entry["glue_task_score"] == 0.6
    assert ("rte              lr 0.0001 not chosen: 1 of 2 runs (--learning_rate=0.0001 "
            "--seed=2 completes it)") in capsys.readouterr().out
    assert "| 0.0001 (not chosen: 1 of 2 runs) | 1 |" in (tmp_path / "glue_report.md").read_text()


def test_a_save_path_trains_the_chosen_run_again_for_its_model_alone(
        glue_data, tiny_preset, tmp_path, run_glue, capsys):
    """Runs recorded without models, then the same command with a save path: the chosen run
    alone is trained again, and its model, weights without optimizer state, is saved."""
    common = ("--task_name=rte", "--seed=1,2", f"--preset={tiny_preset}",
              f"--data_dir={glue_data[0]}", f"--submission_directory={tmp_path}", *TINY)
    run_glue(*common)
    chosen = entry_of(tmp_path)["submitted_run"]
    capsys.readouterr()
    save_path = tmp_path / "rte.keras"
    run_glue(*common, f"--finetuning_model_save_path={save_path}")
    out = capsys.readouterr().out
    assert (f"rte: its chosen run (lr 5e-05, seed {chosen['seed']}) was recorded without its "
            "model, which the save path or a warm start needs: training that run again") in out
    assert out.count(" steps of ") == 1  # that run alone
    with zipfile.ZipFile(save_path) as archive, archive.open("model.weights.h5") as weights:
        assert "optimizer" not in h5py.File(io.BytesIO(weights.read()), "r")
    assert keras.models.load_model(save_path, compile=False).count_params() > 0


@pytest.mark.slow
def test_a_chosen_restart_is_trained_again_as_itself_for_its_model(
        glue_data, tiny_preset, tmp_path, run_glue, monkeypatch, capsys):
    common = ("--task_name=rte", "--seed=7", "--max_restarts=1", f"--preset={tiny_preset}",
              f"--data_dir={glue_data[0]}", f"--submission_directory={tmp_path}", *TINY)
    force_first_run_to_collapse(monkeypatch)
    run_glue(*common)
    monkeypatch.undo()
    assert entry_of(tmp_path)["submitted_run"]["seed"] == 1007
    capsys.readouterr()
    run_glue(*common, f"--finetuning_model_save_path={tmp_path / 'rte.keras'}")
    out = capsys.readouterr().out
    assert "its chosen run (lr 5e-05, seed 1007) was recorded without its model" in out
    assert out.count(" steps of ") == 1 and "rte lr 5e-05 seed 1007  epoch 1/1:" in out
    entry = entry_of(tmp_path)
    assert [(run["seed"], run.get("restart_of")) for run in entry["runs"]] == [(7, None),
                                                                             (1007, 7)]
    assert (tmp_path / "rte.keras").is_file()


def test_restart_seeds_never_meet_asked_seeds_across_commands(glue_data, tiny_preset, tmp_path,
                                                              run_glue, monkeypatch):
    """Seed 7 collapses and its restart takes seed 1007. Asking seed 1007 later, or restarts
    of seed 6 when 1006 is recorded, would replace a recorded run's folder: refused at start,
    before a task before it in the command trains. A folder left holding only a restart (its
    run's folder deleted) publishes nothing, and crashes nothing."""
    common = (f"--preset={tiny_preset}", f"--data_dir={glue_data[0]}",
              f"--submission_directory={tmp_path}", *TINY)
    force_first_run_to_collapse(monkeypatch)
    run_glue("--task_name=rte", *common, "--seed=7", "--max_restarts=1")
    monkeypatch.undo()
    assert error_of(run_glue, "--task_name=wnli,rte", *common, "--seed=1007") == (
        "glue.py: error: rte: --seed=1007: seed 1007 (lr 5e-05) is recorded with these settings "
        "as a restart of seed 7; give another")
    assert not (tmp_path / "runs" / "wnli").exists()
    run_glue("--task_name=rte", *common, "--seed=1006")
    assert error_of(run_glue, "--task_name=rte", *common, "--seed=6", "--max_restarts=1") == (
        "glue.py: error: rte: --max_restarts=1: restart 1 of seed 6 (lr 5e-05) would take seed "
        "1006, which is recorded with these settings; give other seeds or fewer restarts")
    entry = entry_of(tmp_path)
    assert sorted(run["seed"] for run in entry["runs"]) == [7, 1006, 1007]
    folder = tmp_path / "runs" / "rte" / entry["fingerprint_id"]
    shutil.rmtree(folder / "lr5e-05_seed7")
    shutil.rmtree(folder / "lr5e-05_seed1006")
    run_glue("--task_name=none", f"--submission_directory={tmp_path}")  # only a restart left


def test_collapse_means_every_prediction_alike():
    assert glue.is_collapsed(np.array([1, 1, 1])) and not glue.is_collapsed(np.array([1, 0, 1]))
    assert glue.is_collapsed(np.array([2.5, 2.5004])) and not glue.is_collapsed(np.array([2.5, 3]))


# --- Starting from another finetuned model ------------------------------------------------------

def test_init_from_finetuned_takes_its_encoder_and_a_new_head(tiny_preset, tmp_path):
    path = tmp_path / "mnli.keras"
    flags.FLAGS(["glue.py", f"--preset={tiny_preset}"])
    try:
        source = glue.make_finetuning_model(glue.load_pretrained_model(), 3)  # as for MNLI
        encoder = glue.backbone_in(source)
        encoder.set_weights([np.full(w.shape, 0.5, w.dtype) for w in encoder.get_weights()])
        source.save(path)
        model = glue.starting_model(glue.TASKS["stsb"], init_from=str(path))
    finally:
        flags.FLAGS.unparse_flags()
    for weight in glue.backbone_in(model).get_weights():
        np.testing.assert_array_equal(weight, np.full(weight.shape, 0.5))
    assert model.output.shape[-1] == 1  # STS-B's own head


@pytest.mark.slow
def test_init_from_finetuned_end_to_end_is_recorded(glue_data, tiny_preset, tmp_path, run_glue):
    model_path = tmp_path / "mnli.keras"
    run_glue("--task_name=mnli", f"--preset={tiny_preset}", f"--data_dir={glue_data[0]}",
             f"--finetuning_model_save_path={model_path}", *TINY)
    out = tmp_path / "out"
    run_glue("--task_name=rte", f"--preset={tiny_preset}", f"--data_dir={glue_data[0]}",
             f"--init_from_finetuned={model_path}", f"--submission_directory={out}", *TINY)
    assert entry_of(out)["fingerprint"]["init_from_finetuned"] == glue.contents_id(model_path)


def test_init_from_finetuned_must_be_a_keras_file(run_glue, tmp_path):
    assert "no such `.keras` file" in error_of(
        run_glue, "--task_name=rte", f"--init_from_finetuned={tmp_path / 'missing.keras'}")
