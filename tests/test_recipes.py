"""All of GLUE the way papers run it: per-task settings from a recipe, gradient accumulation, and
the warm start from another task's chosen model."""

import json
import os
import re
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf
from absl import flags

import glue
from conftest import crash_runs, entry_of, error_of, options_for

HERE = os.path.dirname(os.path.abspath(__file__))
TINY = ("--max_sequence_length=32",)


def recipe_file(tmp_path, recipe):
    path = tmp_path / "recipe.json"
    path.write_text(json.dumps(recipe))
    return str(path)


# --- Per-task settings --------------------------------------------------------------------------

RECIPE = {"source": "a test", "defaults": {"epochs": 1, "batch_size": 4},
          "rte": {"epochs": 2, "batch_size": 8, "seed": [1, 2]},
          "wnli": {"seed": [3], "learning_rate": [1e-4]}}


def test_a_recipe_gives_each_task_its_own_settings(glue_data, tiny_preset, tmp_path, run_glue,
                                                   capsys):
    run_glue("--task_name=rte,wnli", f"--recipe={recipe_file(tmp_path, RECIPE)}",
             f"--preset={tiny_preset}", f"--data_dir={glue_data[0]}",
             f"--submission_directory={tmp_path / 'out'}", *TINY)
    rte, wnli = entry_of(tmp_path / "out", "rte"), entry_of(tmp_path / "out", "wnli")
    assert (rte["flags"]["epochs"], rte["flags"]["batch_size"]) == (2, 8)
    assert (rte["fingerprint"]["epochs"], rte["fingerprint"]["batch_size"]) == (2, 8)
    assert [(run["learning_rate"], run["seed"]) for run in rte["runs"]] == [(5e-5, 1), (5e-5, 2)]
    assert all([e["epoch"] for e in run["evaluations"]] == [1, 2] for run in rte["runs"])
    assert (wnli["flags"]["epochs"], wnli["flags"]["batch_size"]) == (1, 4)
    assert [(run["learning_rate"], run["seed"]) for run in wnli["runs"]] == [(1e-4, 3)]
    # Both train on 16 rows: batches of 8 take fewer steps an epoch than batches of 4.
    assert rte["runs"][0]["evaluations"][0]["step"] < wnli["runs"][0]["evaluations"][0]["step"]
    assert f"Recipe: {tmp_path / 'recipe.json'}" in capsys.readouterr().out


def test_a_run_gets_its_task_s_settings_as_its_flags(glue_data, tiny_preset, tmp_path, run_glue,
                                                     monkeypatch):
    """The custom code blocks read FLAGS: in a run's process they hold that run's settings, and
    the run's record keeps the command that reruns it alone."""
    seen, load = [], glue.load_pretrained_model

    def recording():
        seen.append((glue.FLAGS.task_name, glue.FLAGS.epochs, glue.FLAGS.batch_size,
                     glue.FLAGS.seed))
        return load()

    monkeypatch.setattr(glue, "load_pretrained_model", recording)
    run_glue("--task_name=rte,wnli", f"--recipe={recipe_file(tmp_path, RECIPE)}",
             f"--preset={tiny_preset}", f"--data_dir={glue_data[0]}",
             f"--submission_directory={tmp_path / 'out'}", *TINY)
    assert seen == [(["rte"], 2, 8, ["1"]), (["rte"], 2, 8, ["2"]), (["wnli"], 1, 4, ["3"])]
    command = entry_of(tmp_path / "out", "wnli")["runs"][0]["command"].split()
    assert command[:2] == ["python", "glue.py"]
    assert {"--task_name=wnli", "--seed=3", "--learning_rate=0.0001", "--epochs=1",
            "--batch_size=4", "--max_sequence_length=32"} <= set(command)
    assert not any(argument.startswith(("--run_", "--keep_model", "--nokeep_model"))
                   for argument in command)


def test_the_command_line_wins_over_the_recipe(glue_data, tiny_preset, tmp_path, run_glue):
    run_glue("--task_name=rte,wnli", f"--recipe={recipe_file(tmp_path, RECIPE)}", "--seed=7",
             "--epochs=2",  # the flag's default, given: it wins over the recipe's 1 for wnli
             f"--preset={tiny_preset}", f"--data_dir={glue_data[0]}",
             f"--submission_directory={tmp_path / 'out'}", *TINY)
    rte, wnli = entry_of(tmp_path / "out", "rte"), entry_of(tmp_path / "out", "wnli")
    assert (rte["flags"]["epochs"], rte["flags"]["batch_size"]) == (2, 8)
    assert (wnli["flags"]["epochs"], wnli["flags"]["batch_size"]) == (2, 4)
    assert [run["seed"] for run in rte["runs"] + wnli["runs"]] == [7, 7]


def test_recipe_values_are_held_as_the_flags_hold_them(tiny_preset):
    """A recipe's `"warmup_ratio": 0` is the command line's 0.0: the same fingerprint."""
    values = glue.recipe_values({"rte": {"warmup_ratio": 0, "select_best_epoch": False,
                                         "seed": [1, 2]}}, "rte", set(), glue.FLAGS)
    assert values == {"warmup_ratio": 0.0, "select_best_epoch": False, "seed": ["1", "2"]}
    assert type(values["warmup_ratio"]) is float


def test_a_recipe_s_mnli_entry_also_sets_mnli_s_dev_halves_and_ax():
    recipe = {"defaults": {"epochs": 1}, "mnli": {"epochs": 3}, "ax": {"epochs": 2}}
    epochs = {name: glue.recipe_values(recipe, name, set(), glue.FLAGS).get("epochs")
              for name in ("mnli", "mnli_matched", "mnli_mismatched", "ax", "rte")}
    assert epochs == {"mnli": 3, "mnli_matched": 3, "mnli_mismatched": 3, "ax": 2, "rte": 1}


def test_each_task_s_seeds_are_checked_at_start(glue_data, tiny_preset, tmp_path, run_glue,
                                                no_training):
    recipe = {"rte": {"seed": [1, 1001], "max_restarts": 1}}
    assert "rte, with the recipe: --seed=1,1001: 1001 is a restart seed of 1" in error_of(
        run_glue, "--task_name=rte", f"--recipe={recipe_file(tmp_path, recipe)}",
        f"--preset={tiny_preset}", f"--data_dir={glue_data[0]}")


def test_accumulation_over_several_replicas_is_refused_at_start(glue_data, tiny_preset,
                                                                 tmp_path):
    result = subprocess.run(
        [sys.executable, os.path.join(HERE, "with_cpu_devices.py"), "--task_name=rte",
         "--distribution_strategy=mirrored", "--gradient_accumulation_steps=2",
         f"--preset={tiny_preset}", f"--data_dir={glue_data[0]}"],
        capture_output=True, text=True, timeout=300, env=dict(os.environ, GLUE_TEST_CPUS="2"))
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "rte: --gradient_accumulation_steps=2 needs one replica (Keras cannot accumulate " \
           "over 2, keras-team/keras#20582)" in result.stderr


@pytest.fixture
def no_training(monkeypatch):
    def train(*args, **kwargs):
        raise AssertionError("trained before the recipe was checked")

    monkeypatch.setattr(glue, "finetune", train)


@pytest.mark.parametrize("recipe, expected", [
    ({"squad": {"epochs": 3}}, "unknown key 'squad'; the keys are task names"),
    ({"rte": {"epoch": 3}}, "rte.epoch: unknown setting"),
    ({"defaults": {"epochs": "3"}}, "defaults.epochs: give an integer, got '3'"),
    ({"rte": {"epochs": 2.5}}, "rte.epochs: give an integer, got 2.5"),
    ({"rte": {"epochs": 0}}, "rte.epochs: "),
    ({"rte": {"learning_rate": 1e-5}}, "rte.learning_rate: give a list of positive numbers"),
    ({"rte": {"seed": [1, "2"]}}, "rte.seed: give a list of non-negative integers"),
    ({"rte": {"seed": [-1]}}, "rte.seed: give a list of non-negative integers, each once"),
    ({"rte": {"learning_rate": [1e-5, 1e-5]}}, "rte.learning_rate: give a list of positive "
                                               "numbers, each once, got [1e-05, 1e-05]"),
    ({"rte": {"select_best_epoch": 1}}, "rte.select_best_epoch: give true or false, got 1"),
    ({"rte": {"init_from_task": "multinli"}}, "rte.init_from_task: 'multinli' is not a task"),
    ({"rte": {"init_from_task": "rte"}}, "rte cannot start from its own model"),
    ({"rte": {"init_from_task": "mrpc"}, "mrpc": {"init_from_task": "rte"}},
     "start from each other's models"),
    (["rte"], "give a JSON object whose keys are task names"),
])
def test_a_bad_recipe_fails_at_start_with_one_line(glue_data, tiny_preset, tmp_path, run_glue,
                                                    no_training, recipe, expected):
    message = error_of(run_glue, "--task_name=rte", f"--recipe={recipe_file(tmp_path, recipe)}",
                       f"--preset={tiny_preset}", f"--data_dir={glue_data[0]}")
    assert expected in message


def test_an_unknown_recipe_name_is_one_line(run_glue, no_training):
    assert "--recipe=robertta: neither a shipped recipe (bert, roberta, modernbert) nor a " \
           "JSON file" in error_of(run_glue, "--task_name=rte", "--recipe=robertta")


@pytest.mark.parametrize("name", sorted(glue.RECIPES))
def test_the_shipped_recipes_are_valid_and_name_their_source(name):
    recipe = glue.read_recipe(name, glue.FLAGS)
    assert len(recipe["source"]) > 40 and "20" in recipe["source"]  # a paper and its year
    settings = {task: glue.recipe_values(recipe, task, set(), glue.FLAGS)
                for task in glue.ALL_TASKS}
    order = glue.in_rounds(list(glue.ALL_TASKS), settings)
    for task, values in settings.items():
        if "init_from_task" in values:
            assert order.index(values["init_from_task"]) < order.index(task)


def test_roberta_runs_mnli_before_the_tasks_that_start_from_it():
    recipe = glue.read_recipe("roberta", glue.FLAGS)
    settings = {task: glue.recipe_values(recipe, task, set(), glue.FLAGS)
                for task in glue.ALL_TASKS}
    assert glue.in_rounds(list(glue.ALL_TASKS), settings) == [
        "wnli", "cola", "sst2", "qnli", "qqp", "mnli", "rte", "mrpc", "stsb"]
    assert settings["rte"] == {
        "learning_rate": ["1e-05", "2e-05", "3e-05"], "seed": ["1", "2", "3", "4", "5"],
        "epochs": 10, "batch_size": 16, "warmup_ratio": 0.06, "weight_decay": 0.1,
        "clip_norm": 0.0, "init_from_task": "mnli"}
    given = {"learning_rate", "init_from_finetuned"}
    assert "learning_rate" not in glue.recipe_values(recipe, "rte", given, glue.FLAGS)
    assert "init_from_task" not in glue.recipe_values(recipe, "rte", given, glue.FLAGS)


# --- Gradient accumulation ----------------------------------------------------------------------

def trained_dense(batch_size, accumulation, batches):
    """A dense model (no dropout) trained for 2 epochs on fixed data in a fixed order."""
    keras.utils.set_random_seed(3)
    features = np.random.default_rng(0).normal(size=(8, 5)).astype("float32")
    targets = features @ np.arange(1, 6, dtype="float32")[:, None]
    model = keras.Sequential([keras.Input((5,)), keras.layers.Dense(4, activation="tanh"),
                              keras.layers.Dense(1)])
    model.compile(loss="mse", optimizer=glue.make_optimizer(
        1e-1, total_steps=batches, warmup_ratio=0.5, weight_decay=0.01, clip_norm=1.0,
        accumulation=accumulation))
    model.fit(features, targets, batch_size=batch_size, epochs=2, shuffle=False, verbose=0)
    return model


def test_two_accumulated_batches_update_as_one_batch_twice_as_large():
    large = trained_dense(batch_size=4, accumulation=1, batches=4)
    accumulated = trained_dense(batch_size=2, accumulation=2, batches=8)
    assert int(accumulated.optimizer.iterations) == int(large.optimizer.iterations) == 4
    for mine, theirs in zip(accumulated.get_weights(), large.get_weights()):
        np.testing.assert_allclose(mine, theirs, rtol=1e-5, atol=1e-6)
    unaccumulated = trained_dense(batch_size=2, accumulation=1, batches=8)
    assert not np.allclose(unaccumulated.get_weights()[0], large.get_weights()[0], atol=1e-4)


def test_the_schedule_counts_updates():
    per_update = glue.WarmupLinearDecay(1.0, warmup_steps=2, total_steps=10)
    per_batch = glue.WarmupLinearDecay(1.0, warmup_steps=2, total_steps=10,
                                       batches_per_update=3)
    for batch in range(31):
        assert float(per_batch(batch)) == pytest.approx(float(per_update(batch // 3)))
    assert float(per_batch(30)) == 0.0 and float(per_batch(3)) == 0.5


def test_a_partial_group_carries_over_the_epoch_end(glue_data, tiny_preset):
    """5 batches an epoch, 3 epochs, N=2: 7 updates, one of them across each epoch's end; the
    run's last batch makes none."""
    flags.FLAGS(["glue.py", f"--preset={tiny_preset}", "--max_sequence_length=32"])
    try:
        rows = glue.tokenize(glue.load_split(glue_data[0], "stsb", "train"), glue.TASKS["stsb"],
                             tf.function(glue.make_preprocess_fn()))
        model = glue.make_finetuning_model(glue.load_pretrained_model(), 1)
    finally:
        flags.FLAGS.unparse_flags()
    assert glue.steps_per_epoch(rows, 4) == 5
    glue.compile_for(model, glue.TASKS["stsb"], glue.make_optimizer(
        1e-3, total_steps=15, warmup_ratio=0.1, weight_decay=0.01, accumulation=2))
    no_dev = glue.DevEvaluations(None, steps_per_epoch=5, epochs=3, per_epoch=0)
    glue.finetune(model, rows, glue.TrainingCheckpoints(None, no_dev), epochs=3, batch_size=4,
                  seed=1, label="stsb")
    assert glue.batches_applied(model.optimizer) == 15
    assert int(model.optimizer.iterations) == 7
    assert float(model.optimizer.learning_rate) == 0.0  # the schedule ended with the updates


def accumulating(tiny_preset, data_dir, out, interrupt=""):
    command = [sys.executable, os.path.join(HERE, "interrupt_at_step.py"), "--task_name=stsb",
               "--epochs=3", "--batch_size=4", "--max_sequence_length=32",
               "--gradient_accumulation_steps=2", "--checkpoint_every_steps=1",
               f"--preset={tiny_preset}", f"--data_dir={data_dir}",
               f"--checkpoint_dir={out / 'checkpoints'}", f"--submission_directory={out}",
               f"--finetuning_model_save_path={out / 'model.keras'}"]
    return subprocess.run(command, capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, GLUE_TEST_INTERRUPT=interrupt))


@pytest.mark.slow
def test_a_kill_mid_accumulation_resumes_exactly(tiny_preset, glue_data, tmp_path):
    reference, out = tmp_path / "reference", tmp_path / "resumed"
    assert accumulating(tiny_preset, glue_data[0], reference).returncode == 0
    # Killed as batch 8 ends, before its checkpoint: the last one, after batch 7, holds half
    # of the 4th update's group (batches 7 and 8).
    killed = accumulating(tiny_preset, glue_data[0], out, interrupt="SIGKILL:8")
    assert killed.returncode == 1 and "(killed by SIGKILL)" in killed.stderr
    resumed = accumulating(tiny_preset, glue_data[0], out)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Resuming from step 7" in resumed.stderr
    assert (out / "STS-B.tsv").read_text() == (reference / "STS-B.tsv").read_text()
    trained = keras.models.load_model(out / "model.keras", compile=False).get_weights()
    expected = keras.models.load_model(reference / "model.keras", compile=False).get_weights()
    for mine, theirs in zip(trained, expected):
        np.testing.assert_allclose(mine, theirs, rtol=1e-5, atol=1e-6)
    assert entry_of(out, "stsb")["fingerprint"]["gradient_accumulation_steps"] == 2


# --- The warm start -----------------------------------------------------------------------------

WARM = {"source": "a test", "defaults": {"epochs": 1, "batch_size": 4},
        "rte": {"init_from_task": "mnli"}}


@pytest.fixture
def copies(monkeypatch):
    """Every --init_from_finetuned copy: (source path, the target encoder's weights after)."""
    seen, real = [], glue.copy_encoder

    def copy_encoder(source, target, source_path):
        real(source, target, source_path)
        seen.append((source_path, glue.backbone_in(target).get_weights()))

    monkeypatch.setattr(glue, "copy_encoder", copy_encoder)
    return seen


def chosen_folder(out, task):
    entry = entry_of(out, task)
    run = entry["submitted_run"]
    return out / "runs" / task / entry["fingerprint_id"] / (
        f"lr{glue.rate_label(run['learning_rate'])}_seed{run['seed']}")


def test_rte_starts_from_the_chosen_mnli_run_in_a_second_round(glue_data, tiny_preset, tmp_path,
                                                               run_glue, copies, capsys):
    out = tmp_path / "out"
    run_glue("--task_name=rte,mnli", f"--recipe={recipe_file(tmp_path, WARM)}",
             f"--preset={tiny_preset}", f"--data_dir={glue_data[0]}",
             f"--submission_directory={out}", *TINY)
    printed = capsys.readouterr().out
    assert printed.index("mnli: training 1 run") < printed.index("rte: training 1 run")
    model_path = chosen_folder(out, "mnli") / "model.keras"
    (source, copied), = copies
    assert source == str(model_path)
    mnli = glue.backbone_in(keras.models.load_model(model_path, compile=False)).get_weights()
    for mine, theirs in zip(copied, mnli):
        np.testing.assert_array_equal(mine, theirs)
    rte = entry_of(out, "rte")
    assert rte["fingerprint"]["init_from_finetuned"] == glue.contents_id(model_path)
    assert rte["flags"]["init_from_finetuned"] == str(model_path)


def test_a_new_choice_for_mnli_redoes_rte(glue_data, tiny_preset, tmp_path, run_glue, copies,
                                          monkeypatch, capsys):
    args = ("--task_name=mnli,rte", f"--recipe={recipe_file(tmp_path, WARM)}",
            f"--preset={tiny_preset}", f"--data_dir={glue_data[0]}",
            f"--submission_directory={tmp_path / 'out'}", *TINY)
    run_glue(*args)
    capsys.readouterr()
    run_glue("--task_name=rte", *args[1:])  # a second round alone: its source checked at start
    printed = capsys.readouterr().out
    assert printed.count("rte: starts from mnli's chosen run (lr 5e-05, seed 42") == 1
    assert "rte: already complete" in printed
    real = glue.evaluate

    def seed_2_is_best(model, eval_rows, task, batch_size, name):
        metrics, collapsed, predictions = real(model, eval_rows, task, batch_size, name)
        if name.endswith("seed 2"):
            metrics = {split: {metric: 0.99 for metric in values}
                       for split, values in metrics.items()}
        return metrics, collapsed, predictions

    monkeypatch.setattr(glue, "evaluate", seed_2_is_best)
    capsys.readouterr()
    run_glue(*args)
    assert "rte: already complete" in capsys.readouterr().out  # the same choice: nothing redone
    run_glue(*args, "--seed=42,2")  # more MNLI seeds: seed 2 is now MNLI's choice
    printed = capsys.readouterr().out
    assert entry_of(tmp_path / "out", "mnli")["submitted_run"]["seed"] == 2
    assert "rte: redone, --init_from_finetuned file contents changed" in printed
    assert copies[-1][0] == str(chosen_folder(tmp_path / "out", "mnli") / "model.keras")


def test_a_source_task_neither_run_nor_recorded_fails_at_start(glue_data, tiny_preset, tmp_path,
                                                               run_glue, no_training):
    message = error_of(run_glue, "--task_name=rte", f"--recipe={recipe_file(tmp_path, WARM)}",
                       f"--preset={tiny_preset}", f"--data_dir={glue_data[0]}",
                       f"--submission_directory={tmp_path / 'out'}")
    assert message == ("glue.py: error: rte: init_from_task: mnli has no recorded runs with "
                       "this command's settings for it to start from; run it in the same "
                       "command (or before, into the same folder)")


def test_a_failed_source_task_stops_only_the_tasks_that_start_from_it(
        glue_data, tiny_preset, tmp_path, run_glue, monkeypatch, capsys):
    crash_runs(monkeypatch, lambda label: label.startswith("mnli"), RuntimeError("out of memory"))
    with pytest.raises(SystemExit):
        run_glue("--task_name=mnli,rte,wnli", f"--recipe={recipe_file(tmp_path, WARM)}",
                 f"--preset={tiny_preset}", f"--data_dir={glue_data[0]}",
                 f"--submission_directory={tmp_path / 'out'}", *TINY)
    assert "rte: FAILED: starts from mnli's model, and mnli failed" in capsys.readouterr().err
    assert entry_of(tmp_path / "out", "wnli")["runs"]  # the others go on


def test_a_source_recorded_without_its_model_trains_its_chosen_run_again(
        glue_data, tiny_preset, tmp_path, run_glue, copies, capsys):
    common = (f"--preset={tiny_preset}", f"--data_dir={glue_data[0]}",
              f"--submission_directory={tmp_path / 'out'}", "--epochs=1", "--batch_size=4",
              *TINY)
    run_glue("--task_name=mnli", *common)  # no recipe: no task starts from it, no model kept
    assert not (chosen_folder(tmp_path / "out", "mnli") / "model.keras").exists()
    capsys.readouterr()
    run_glue("--task_name=mnli,rte", f"--recipe={recipe_file(tmp_path, WARM)}", *common)
    assert "mnli: its chosen run (lr 5e-05, seed 42) was recorded without its model, which " \
           "the save path or a warm start needs: training that run again" in \
           capsys.readouterr().out
    model_path = chosen_folder(tmp_path / "out", "mnli") / "model.keras"
    assert model_path.exists() and copies[-1][0] == str(model_path)


def test_a_warm_start_needs_no_results_file(glue_data, tiny_preset, tmp_path, run_glue, copies,
                                            capsys):
    """No --submission_directory and no --results_path, as for dev numbers alone: the second
    round starts from the first round's chosen run of this very command, found in its
    records."""
    recipe = {"defaults": {"epochs": 1, "batch_size": 4}, "rte": {"init_from_task": "mrpc"}}
    run_glue("--task_name=mrpc,rte", f"--recipe={recipe_file(tmp_path, recipe)}",
             f"--preset={tiny_preset}", f"--data_dir={glue_data[0]}", *TINY)
    assert re.search(r"^rte: starts from mrpc's chosen run \(lr 5e-05, seed 42, settings "
                     r"\w{10}\)$", capsys.readouterr().out, re.MULTILINE)
    (source, _), = copies
    assert source.endswith(os.path.join("mrpc", source.split(os.sep)[-3], "lr5e-05_seed42",
                                        "model.keras"))


def test_a_flag_added_for_a_custom_block_joins_the_fingerprint():
    options = options_for()
    options.my_dropout = 0.2  # as a flag a researcher defines in glue.py would be read
    settings = glue.fingerprint(glue.TASKS["rte"], options, ("_DefaultDistributionStrategy", 1))
    assert settings["my_dropout"] == 0.2
    assert "run_dir" not in settings and "seed" not in settings
