"""Reuse you can trust: one folder per run is the only record; a fingerprint that sees the code
and the contents of the files; job arrays that lose no run; resumes that choose the same best
evaluation; errors caught before anything trains."""

import ast
import errno
import filecmp
import glob
import importlib.abc
import importlib.machinery
import json
import os
import shutil
import subprocess
import sys
import time

import filelock._filesystem._exchange
import keras
import keras_hub
import numpy as np
import pandas as pd
import pytest
import tensorflow as tf
from absl import flags

import glue
from conftest import REPO, error_of, entry_of, options_for

HERE = os.path.dirname(os.path.abspath(__file__))
TINY = ("--epochs=1", "--batch_size=4", "--max_sequence_length=32")


def run_folders(out, task="rte"):
    """The names of the folders of every run recorded under `out`, whatever its settings."""
    return sorted(os.path.basename(os.path.dirname(path))
                  for path in glob.glob(str(out / "runs" / task / "*" / "*" / "run.json")))


# --- The record of a run ------------------------------------------------------------------------

def test_each_run_writes_its_own_folder_and_the_results_come_from_them(
        glue_data, tiny_preset, tmp_path, run_glue):
    run_glue("--task_name=rte", "--seed=1,2", f"--preset={tiny_preset}",
             f"--data_dir={glue_data[0]}", f"--submission_directory={tmp_path}", *TINY)
    entry = entry_of(tmp_path)
    folder = tmp_path / "runs" / "rte" / entry["fingerprint_id"]
    assert sorted(os.listdir(folder)) == ["fingerprint.json", "lr5e-05_seed1", "lr5e-05_seed2"]
    assert json.loads((folder / "fingerprint.json").read_text()) == entry["fingerprint"]
    for run in entry["runs"]:
        run_dir = folder / f"lr5e-05_seed{run['seed']}"
        assert sorted(os.listdir(run_dir)) == ["RTE.tsv", "log.txt", "run.json",
                                               "validation_predictions.tsv"]  # no model
        record = json.loads((run_dir / "run.json").read_text())
        assert {key: value for key, value in record.items()
                if key not in glue.PROCESS_KEYS} == run
        assert record["flags"]["seed"] == [str(run["seed"])]  # its process' own flags
    submitted = entry["submitted_run"]
    assert (tmp_path / "RTE.tsv").read_text() == (
        folder / f"lr5e-05_seed{submitted['seed']}" / "RTE.tsv").read_text()
    assert entry == {**glue.summarized(glue.read_records(str(folder))),
                     "fingerprint": entry["fingerprint"], "fingerprint_id": entry["fingerprint_id"],
                     "submission_rows": {"RTE.tsv": 8}, "submission_files_run": submitted}


def test_a_restart_left_by_an_earlier_attempt_follows_nothing():
    head = {"learning_rate": 1e-5, "seed": 7, "run_id": "new", "collapsed": False,
            "validation": {"accuracy": 0.6}}
    stale = {"learning_rate": 1e-5, "seed": 1007, "run_id": "r", "restart_of": 7,
             "restarted_from": "old", "collapsed": False, "validation": {"accuracy": 0.9}}
    assert glue.chains([head, stale]) == [[head]]
    assert glue.summarized([head, stale])["submitted_run"] == {"learning_rate": 1e-5, "seed": 7}
    collapsed = {**head, "collapsed": True, "run_id": "old"}
    assert glue.chains([collapsed, stale]) == [[collapsed, stale]]
    assert glue.counted_runs([collapsed, stale]) == [stale]


# --- Edits and files ----------------------------------------------------------------------------

def edited_copy(folder, old, new, of=os.path.join(REPO, "glue.py")):
    """A copy of glue.py (or of the copy `of`) with `old` replaced by `new` (exactly once)."""
    source = open(of, encoding="utf-8").read()
    assert source.count(old) == 1, old
    path = os.path.join(folder, f"glue_edited_{abs(hash(new))}.py")
    with open(path, "w", encoding="utf-8") as file:
        file.write(source.replace(old, new))
    return path


@pytest.fixture
def code_of(monkeypatch):
    """Makes this process's fingerprint read the code of another copy of glue.py."""
    def use(path):
        monkeypatch.setattr(glue, "__file__", path)
        glue.code_ids.cache_clear()

    yield use
    glue.code_ids.cache_clear()


HEAD = "    hidden = keras.layers.Dropout(dropout)(backbone(inputs))\n"


def test_comments_and_docstrings_are_not_code(glue_data, tiny_preset, tmp_path, run_glue,
                                              capsys, code_of):
    args = ("--task_name=wnli", f"--preset={tiny_preset}", f"--data_dir={glue_data[0]}",
            f"--submission_directory={tmp_path / 'out'}", *TINY)
    run_glue(*args)
    code_of(edited_copy(tmp_path, '    """The default finetuning head: dropout',
                        "    # A comment, and no number changes.\n"
                        '    """The head, reworded: dropout'))
    capsys.readouterr()
    run_glue(*args)
    assert "wnli: already complete with these settings (1 run recorded), skipped" in \
        capsys.readouterr().out
    new_head = edited_copy(tmp_path, HEAD, HEAD.replace("(dropout)", "(0.3)"))
    code_of(new_head)
    run_glue(*args)
    assert "wnli: redone, the code of GlueClassifier changed" in capsys.readouterr().out
    code_of(edited_copy(tmp_path, '(var_names=["bias", "gamma", "beta"])',
                        '(var_names=["bias", "gamma", "beta", "embeddings"])', of=new_head))
    run_glue(*args)
    assert "wnli: redone, the code of make_optimizer changed" in capsys.readouterr().out


MY_HEAD = """import keras


def head(encoder, num_outputs):
    hidden = keras.layers.Dropout({dropout})(encoder.output)
    return keras.Model(encoder.input, keras.layers.Dense(num_outputs, dtype="float32")(hidden))
"""


def test_an_edited_module_that_block_3_imports_redoes_the_task_and_is_named(
        glue_data, tiny_preset, tmp_path, run_glue, capsys, code_of):
    """A head moved into a module of its own beside glue.py, as researchers do once it outgrows
    the block: the fingerprint takes the module by its contents."""
    module = tmp_path / "my_head.py"
    module.write_text(MY_HEAD.format(dropout=0.1))
    code_of(edited_copy(
        tmp_path, "        return GlueClassifier(backbone=encoder, num_classes=num_outputs)\n",
        "        import my_head\n        return my_head.head(encoder, num_outputs)\n"))
    args = ("--task_name=wnli", f"--preset={tiny_preset}", f"--data_dir={glue_data[0]}",
            f"--submission_directory={tmp_path / 'out'}", *TINY)
    run_glue(*args)
    assert "my_head.py" in entry_of(tmp_path / "out", "wnli")["fingerprint"]["code"]
    glue.code_ids.cache_clear()  # as a new command would
    capsys.readouterr()
    run_glue(*args)
    assert "wnli: already complete with these settings (1 run recorded), skipped" in \
        capsys.readouterr().out
    module.write_text(MY_HEAD.format(dropout=0.25))
    glue.code_ids.cache_clear()
    run_glue(*args)
    assert "wnli: redone, the code of my_head.py changed" in capsys.readouterr().out
    assert run_folders(tmp_path / "out", "wnli") == ["lr5e-05_seed42"] * 2


class EditableFinder(importlib.abc.MetaPathFinder):
    """What setuptools installs for `pip install -e` of a flat project: an import hook that
    finds the package in a folder that is not on sys.path."""

    def __init__(self, name, folder):
        self.name, self.folder = name, folder

    def find_spec(self, name, path=None, target=None):
        if name != self.name:
            return None
        return importlib.machinery.PathFinder.find_spec(name, [self.folder])


def test_the_modules_found_are_the_researcher_s_own_wherever_they_are(tmp_path, monkeypatch):
    package = tmp_path / "lib" / "pkg"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("from . import layers\n")
    (package / "layers.py").write_text("import numpy\nfrom .util import x\nimport hooked\n")
    (package / "util.py").write_text("import json\nx = 1\n")
    (tmp_path / "project" / "hooked").mkdir(parents=True)
    (tmp_path / "project" / "hooked" / "__init__.py").write_text("from .heads import head\n")
    (tmp_path / "project" / "hooked" / "heads.py").write_text("def head():\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path / "lib"))  # as PYTHONPATH would
    monkeypatch.setattr(sys, "meta_path", [*sys.meta_path, EditableFinder(
        "hooked", str(tmp_path / "project"))])  # as an editable install would
    script = tmp_path / "glue.py"
    script.write_text("import os\nimport keras\nfrom pkg.layers import x\n")
    assert [os.path.relpath(file, tmp_path) for file in glue.own_modules(str(script))] == [
        "lib/pkg/__init__.py", "lib/pkg/layers.py", "lib/pkg/util.py",
        "project/hooked/__init__.py", "project/hooked/heads.py"]


@pytest.mark.slow
def test_an_edited_glue_classifier_in_a_copy_of_glue_py_redoes_a_completed_task(
        glue_data, tiny_preset, tmp_path):
    """The copy runs its own model, and its fingerprint sees its own code."""
    def run(script):
        result = subprocess.run(
            [sys.executable, script, "--task_name=wnli", f"--preset={tiny_preset}",
             f"--data_dir={glue_data[0]}", f"--submission_directory={tmp_path / 'out'}",
             f"--finetuning_model_save_path={tmp_path / 'model.keras'}", *TINY],
            capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
        return result.stdout

    run(os.path.join(REPO, "glue.py"))
    before = entry_of(tmp_path / "out", "wnli")
    deeper = edited_copy(tmp_path, HEAD,  # one more Dense layer, another dropout rate
                         "    hidden = keras.layers.Dense(8, activation='gelu', name='extra')("
                         "backbone(inputs))\n    hidden = keras.layers.Dropout(0.2)(hidden)\n")
    out = run(deeper)
    assert "wnli: redone, the code of GlueClassifier changed" in out
    after = entry_of(tmp_path / "out", "wnli")
    assert [name for name in before["fingerprint"]["code"]
            if before["fingerprint"]["code"][name] != after["fingerprint"]["code"][name]] == [
        "GlueClassifier"]
    model = keras.models.load_model(tmp_path / "model.keras", compile=False)
    assert "extra" in [layer.name for layer in model.layers]  # the edited model was trained
    assert run_folders(tmp_path / "out", "wnli") == ["lr5e-05_seed42"] * 2  # the old one stays


def copy_of_preset(tiny_preset, folder):
    shutil.copytree(tiny_preset, folder)
    return str(folder)


def test_replaced_preset_weights_at_the_same_path_redo_the_task(glue_data, tiny_preset,
                                                                tmp_path, run_glue, capsys):
    preset = copy_of_preset(tiny_preset, tmp_path / "preset")
    args = ("--task_name=wnli", f"--preset={preset}", f"--data_dir={glue_data[0]}",
            f"--submission_directory={tmp_path / 'out'}", *TINY)
    run_glue(*args)
    backbone = keras_hub.models.Backbone.from_preset(preset)
    backbone.set_weights([weight + 0.01 for weight in backbone.get_weights()])
    other = tmp_path / "other"
    backbone.save_to_preset(str(other))
    shutil.copyfile(other / "model.weights.h5", tmp_path / "preset" / "model.weights.h5")
    capsys.readouterr()
    run_glue(*args)
    assert "wnli: redone, --preset folder contents changed" in capsys.readouterr().out


def test_changed_data_files_redo_the_task(glue_data, tiny_preset, tmp_path, run_glue, capsys):
    data_dir = tmp_path / "glue_data"
    shutil.copytree(glue_data[0], data_dir)
    args = ("--task_name=wnli", f"--preset={tiny_preset}", f"--data_dir={data_dir}",
            f"--submission_directory={tmp_path / 'out'}", *TINY)
    run_glue(*args)
    train = data_dir / "WNLI" / "train.tsv"
    train.write_text(train.read_text().replace("\t0\n", "\t1\n", 1))
    capsys.readouterr()
    run_glue(*args)
    assert "wnli: redone, --data_dir files changed (wnli train)" in capsys.readouterr().out


def test_a_re_made_init_from_finetuned_model_redoes_the_task(glue_data, tiny_preset, tmp_path,
                                                             run_glue, capsys):
    source = tmp_path / "mnli.keras"

    def save_mnli_model(value):
        flags.FLAGS(["glue.py", f"--preset={tiny_preset}"])
        try:
            model = glue.make_finetuning_model(glue.load_pretrained_model(), 3)
        finally:
            flags.FLAGS.unparse_flags()
        encoder = glue.backbone_in(model)
        encoder.set_weights([np.full(w.shape, value, w.dtype) for w in encoder.get_weights()])
        model.save(source)

    save_mnli_model(0.1)
    args = ("--task_name=rte", f"--preset={tiny_preset}", f"--data_dir={glue_data[0]}",
            f"--init_from_finetuned={source}", f"--submission_directory={tmp_path / 'out'}",
            *TINY)
    run_glue(*args)
    save_mnli_model(0.2)  # MNLI finetuned again, saved at the same path
    capsys.readouterr()
    run_glue(*args)
    assert "rte: redone, --init_from_finetuned file contents changed" in capsys.readouterr().out


def test_a_checkpoint_made_by_other_code_is_not_resumed(glue_data, tiny_preset, tmp_path,
                                                        run_glue, monkeypatch, capsys, code_of):
    args = ("--task_name=rte", "--epochs=2", "--batch_size=4", "--max_sequence_length=32",
            "--checkpoint_every_steps=1", f"--checkpoint_dir={tmp_path / 'checkpoints'}",
            f"--preset={tiny_preset}", f"--data_dir={glue_data[0]}")
    real = glue.TrainingCheckpoints.on_train_batch_end

    def crash_at_step_3(self, batch, logs=None):
        real(self, batch, logs)
        if self.evaluations.batches == 3:
            raise KeyboardInterrupt  # the process dies, its step-3 checkpoint written

    with monkeypatch.context() as patch:
        patch.setattr(glue.TrainingCheckpoints, "on_train_batch_end", crash_at_step_3)
        with pytest.raises(KeyboardInterrupt):
            run_glue(*args)
    old, = os.listdir(tmp_path / "checkpoints")
    code_of(edited_copy(tmp_path, HEAD, HEAD.replace("(dropout)", "(0.3)")))
    capsys.readouterr()
    run_glue(*args)
    out = capsys.readouterr().out
    assert "rte  epoch 1/2: 5 steps of 4 examples\n" in out and "resuming" not in out
    assert os.listdir(tmp_path / "checkpoints") == [old]  # the other code's is left alone
    assert os.listdir(tmp_path / "checkpoints" / old) == ["step-000000003.npz"]


# --- --overwrite, job arrays and the chosen run's model -----------------------------------------

def test_overwrite_retrains_the_asked_runs_and_keeps_the_others(glue_data, tiny_preset, tmp_path,
                                                                run_glue, capsys):
    args = ("--task_name=rte", f"--preset={tiny_preset}", f"--data_dir={glue_data[0]}",
            f"--submission_directory={tmp_path}", *TINY)
    run_glue(*args, "--seed=1,2")
    before = {run["seed"]: run["run_id"] for run in entry_of(tmp_path)["runs"]}
    capsys.readouterr()
    run_glue(*args, "--seed=2", "--overwrite")
    assert "rte: --overwrite: training the 1 asked run again (other recorded runs stay)" in \
        capsys.readouterr().out
    after = {run["seed"]: run["run_id"] for run in entry_of(tmp_path)["runs"]}
    assert sorted(after) == [1, 2] and after[1] == before[1] and after[2] != before[2]


def test_task_none_publishes_each_task_from_its_latest_settings(glue_data, tiny_preset,
                                                                tmp_path, run_glue, capsys):
    """Two settings of RTE in one folder; the older one's command, run again, is the last to
    write the results. --task_name=none publishes the settings of the last run recorded, and
    names the others, with what differs and how to publish them."""
    args = ("--task_name=rte", f"--preset={tiny_preset}", f"--data_dir={glue_data[0]}",
            f"--submission_directory={tmp_path}", "--batch_size=4", "--max_sequence_length=32")
    run_glue(*args, "--epochs=1", "--seed=1,2")
    run_glue(*args, "--epochs=2", "--seed=1")  # the latest settings
    run_glue(*args, "--epochs=1", "--seed=1,2")  # complete: publishes the older settings again
    older = entry_of(tmp_path)["fingerprint_id"]
    capsys.readouterr()
    run_glue("--task_name=none", f"--submission_directory={tmp_path}")
    entry = entry_of(tmp_path)
    assert entry["fingerprint"]["epochs"] == 2 and len(entry["runs"]) == 1
    folder = tmp_path / "runs" / "rte" / older
    assert (f"rte: published from its latest settings ({entry['fingerprint_id']}); also "
            f"recorded: 2 runs under {older} (epochs 2 -> 1): to publish those instead, run one "
            f"of their commands again (`command` in {folder}/*/run.json)"
            ) in capsys.readouterr().out


def glue_process(*args):
    return subprocess.Popen([sys.executable, os.path.join(REPO, "glue.py"), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(*processes):
    outputs = []
    for process in processes:
        output, _ = process.communicate(timeout=600)
        assert process.returncode == 0, output[-3000:]
        outputs.append(output)
    return outputs


def comparable(entry):
    """What must not depend on how runs were split across processes."""
    runs = [{key: run[key] for key in ("learning_rate", "seed", "validation", "collapsed",
                                       "best_epoch")} for run in entry["runs"]]
    return {"runs": runs, "seed_summary": entry["seed_summary"],
            "submitted_run": entry["submitted_run"], "validation": entry["validation"],
            "glue_task_score": entry["glue_task_score"]}


@pytest.mark.slow
def test_job_arrays_with_overwrite_keep_every_run_and_save_the_chosen_model(
        learnable_data, tiny_preset, tmp_path):
    # Which seed wins depends on the CPU's kernels, so the single job names the winner; the job
    # arrays then run the loser first, so their choice must change when the winner's record lands.
    common = ("--task_name=sst2", f"--preset={tiny_preset}", f"--data_dir={learnable_data}",
              "--epochs=6", "--batch_size=8", "--max_sequence_length=32", "--learning_rate=1e-2",
              "--pooling=cls", "--overwrite", "--notensorboard")

    def job(folder, seeds):
        return glue_process(*common, f"--seed={seeds}", f"--submission_directory={folder}",
                            f"--finetuning_model_save_path={folder / 'model.keras'}")

    single, one_by_one, at_once = tmp_path / "single", tmp_path / "one_by_one", tmp_path / "at_once"
    finish(job(single, "2,3"))
    expected = comparable(entry_of(single, "sst2"))
    winner = expected["submitted_run"]["seed"]
    loser = ({2, 3} - {winner}).pop()
    finish(job(one_by_one, loser))
    assert entry_of(one_by_one, "sst2")["submitted_run"]["seed"] == loser
    finish(job(one_by_one, winner))
    finish(job(at_once, loser), job(at_once, winner))
    reference = keras.models.load_model(single / "model.keras", compile=False).get_weights()
    for folder in (one_by_one, at_once):
        finish(glue_process("--task_name=none", f"--submission_directory={folder}",
                            f"--finetuning_model_save_path={folder / 'chosen.keras'}"))
        entry = entry_of(folder, "sst2")
        assert comparable(entry) == expected
        assert (folder / "SST-2.tsv").read_text() == (single / "SST-2.tsv").read_text()
        assert run_folders(folder, "sst2") == ["lr0.01_seed2", "lr0.01_seed3"]
        assert sorted(name for name in os.listdir(folder) if name.endswith(".tsv")) == [
            "SST-2.tsv"]
        chosen = folder / "runs" / "sst2" / entry["fingerprint_id"] / f"lr0.01_seed{winner}"
        assert filecmp.cmp(folder / "chosen.keras", chosen / "model.keras", shallow=False)
        weights = keras.models.load_model(folder / "chosen.keras", compile=False).get_weights()
        for mine, theirs in zip(weights, reference):
            np.testing.assert_array_equal(mine, theirs)


def record(folder, seed, accuracy, model=False):
    run = {"learning_rate": 1e-5, "seed": seed, "run_id": f"id{seed}", "collapsed": False,
           "validation": {"accuracy": accuracy}, "test_files": {"RTE.tsv": 1}}
    run_dir = os.path.join(folder, f"lr1e-05_seed{seed}")
    os.makedirs(run_dir)
    with open(os.path.join(run_dir, "run.json"), "w") as file:
        json.dump(run, file)
    with open(os.path.join(run_dir, "RTE.tsv"), "w") as file:
        file.write(f"index\tprediction\n0\tseed {seed}\n")
    if model:
        with open(os.path.join(run_dir, "model.keras"), "w") as file:
            file.write(f"model of seed {seed}")


def test_a_chosen_run_without_a_model_still_submits_its_test_files(tmp_path, capsys):
    folder = str(tmp_path / "runs" / "rte" / "abc")
    record(folder, 1, 0.6, model=True)
    record(folder, 2, 0.7)  # once a worse run of its rate, say, then redone better elsewhere
    save_path = tmp_path / "model.keras"
    save_path.write_text("model of seed 1")
    options = options_for(f"--submission_directory={tmp_path}")
    entry = glue.publish(glue.TASKS["rte"], options, {"a": 1}, folder, str(save_path))
    assert entry["submitted_run"] == {"learning_rate": 1e-5, "seed": 2}
    assert (tmp_path / "RTE.tsv").read_text() == "index\tprediction\n0\tseed 2\n"
    assert entry["submission_files_run"] == entry["submitted_run"]
    assert f"rte: the chosen run (lr1e-05_seed2) kept no model (a run keeps it only for a save " \
        f"path or a warm start); the model that was at {save_path} is now at " \
        f"{tmp_path / 'model.earlier.keras'}; run the task with --finetuning_model_save_path " \
        "to train that run again" in capsys.readouterr().out
    assert not save_path.exists()  # it holds the chosen run's model or none


def test_a_model_stays_only_with_a_run_that_may_be_chosen(tmp_path):
    folder = str(tmp_path / "runs" / "rte" / "abc")
    record(folder, 1, 0.6, model=True)
    options = options_for(f"--submission_directory={tmp_path}")
    for seed, accuracy in ((2, 0.7), (3, 0.5)):
        record(str(tmp_path / "made"), seed, accuracy, model=True)
        staged = os.path.join(folder, f"{glue.STAGED}here:1:{seed}")
        os.rename(tmp_path / "made" / f"lr1e-05_seed{seed}", staged)
        run = json.loads(open(os.path.join(staged, "run.json")).read())
        glue.record_run(glue.TASKS["rte"], options, {"a": 1}, staged, run, None)
    kept = sorted(os.path.basename(os.path.dirname(path))
                  for path in glob.glob(os.path.join(folder, "*", "model.keras")))
    assert kept == ["lr1e-05_seed2"]  # seed 1's went when seed 2 beat it; seed 3's at once


def test_staged_folders_of_gone_processes_and_old_ones_are_removed(tmp_path):
    """Under every settings of the task, not only those a command runs."""
    folder, other_settings = tmp_path / "0123456789", tmp_path / "9876543210"
    gone = subprocess.Popen([sys.executable, "-c", ""])
    gone.wait()
    host, day = glue.socket.gethostname(), 24 * 3600
    names = {f"{glue.STAGED}{host}:{gone.pid}:a": False,
             f"{glue.STAGED}{host}:{os.getpid()}:b": True,  # alive, however old
             f"{glue.STAGED}elsewhere:1:c": True, f"{glue.STAGED}elsewhere:1:d": False,
             f"{glue.STAGED}elsewhere:1:e": True,  # its log was written to an hour ago
             ".tmp-0123456789ab": False, ".tmp-ba9876543210": True, "lr1e-05_seed1": True,
             f"{glue.STAGED}slurm:g": True}  # a Slurm job's, perhaps queued for days
    for name in names:
        os.makedirs(folder / name)
    (folder / f"{glue.STAGED}elsewhere:1:e" / "log.txt").write_text("epoch 9/10 ...")
    os.utime(folder / f"{glue.STAGED}elsewhere:1:e" / "log.txt", (time.time() - 3600,) * 2)
    for old in (f"{glue.STAGED}{host}:{os.getpid()}:b", f"{glue.STAGED}elsewhere:1:d",
                f"{glue.STAGED}elsewhere:1:e", ".tmp-0123456789ab", f"{glue.STAGED}slurm:g"):
        os.utime(folder / old, (time.time() - 2 * day,) * 2)
    os.makedirs(other_settings / f"{glue.STAGED}{host}:{gone.pid}:f")
    glue.remove_abandoned(str(tmp_path))
    assert sorted(os.listdir(folder)) == sorted(name for name, kept in names.items() if kept)
    assert os.listdir(other_settings) == []


LEASE_HOLDER = """
import filelock, sys, time
lease = filelock.SoftFileLease(sys.argv[1], lease_duration=float(sys.argv[2]))
lease.acquire()
print("held", flush=True)
time.sleep(600)
"""


def test_a_results_lock_that_is_never_free_ends_in_one_line(tmp_path, monkeypatch):
    """A lock file an older glue.py (flock) or a killed writer left empty names no holder, so
    no lease takes it over: the command stops in one line naming the file, never hangs."""
    monkeypatch.setattr(glue, "LOCK_TIMEOUT_SECONDS", 1)
    (tmp_path / ".glue_results.json.lease").write_text("")
    with pytest.raises(glue.GlueError, match=r"\.glue_results\.json\.lease: the results lock "
                                             r"was not free within 1\.0s"):
        with glue.updating_results(str(tmp_path / "glue_results.json")):
            pass


def test_a_results_lock_left_by_a_dead_process_is_recovered(tmp_path, monkeypatch):
    """The lock is a lease: a dead holder's is taken at once on its host, and once it has gone
    unrenewed for LOCK_LEASE_SECONDS when it names another host (whose processes cannot be
    seen): job arrays on NFS, where flock may fail silently, are not stuck for ever."""
    monkeypatch.setattr(glue, "LOCK_LEASE_SECONDS", 2)
    path = tmp_path / "glue_results.json"
    lock = tmp_path / ".glue_results.json.lease"
    for host in (None, "another-host"):
        holder = subprocess.Popen([sys.executable, "-c", LEASE_HOLDER, str(lock), "2"],
                                  stdout=subprocess.PIPE, text=True)
        assert holder.stdout.readline().strip() == "held"
        holder.kill()
        holder.wait()
        if host:
            marker = lock.read_text()
            lock.write_text(marker.replace(f"host={glue.socket.gethostname()}", f"host={host}"))
        start = time.monotonic()
        with glue.updating_results(str(path)) as results:
            results["rte"] = {"taken": host or "this host"}
        assert time.monotonic() - start < (30 if host else 5)
        assert json.loads(path.read_text())["rte"] == {"taken": host or "this host"}


def test_a_dead_holder_s_lock_is_taken_back_where_the_file_system_refuses_exchanges(
        tmp_path, monkeypatch, capsys):
    """filelock takes a dead holder's lease over by exchanging two names (renameat2), which NFS
    refuses (EINVAL). Refused here the same way, the lease file, unchanged for three lease
    lengths, is moved aside and the lock taken, well before the command would give up; a live
    holder's never is."""
    monkeypatch.setattr(glue, "LOCK_LEASE_SECONDS", 1)
    monkeypatch.setattr(glue, "LOCK_TIMEOUT_SECONDS", 30)
    monkeypatch.setattr(filelock._filesystem._exchange, "_rename_call",
                        lambda: (lambda *names_and_flags: errno.EINVAL, 2))
    lock = tmp_path / ".glue_results.json.lease"
    holder = subprocess.Popen([sys.executable, "-c", LEASE_HOLDER, str(lock), "1"],
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    holder.kill()
    holder.wait()
    start = time.monotonic()
    with glue.updating_results(str(tmp_path / "glue_results.json")) as results:
        results["rte"] = {"taken": True}
    assert 3 <= time.monotonic() - start < 15
    printed = capsys.readouterr().out  # a line each lease length it waits, and what it did
    assert f"{lock}: waiting for the results lock (" in printed
    assert f"{lock}: unchanged for " in printed
    assert os.listdir(tmp_path) == ["glue_results.json"]  # the lease gone with its holder
    monkeypatch.setattr(glue, "LOCK_TIMEOUT_SECONDS", 6)
    holder = subprocess.Popen([sys.executable, "-c", LEASE_HOLDER, str(lock), "1"],
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    try:  # a live holder renews its lease: it is never moved aside
        with pytest.raises(glue.GlueError, match="the results lock was not free within 6.0s"):
            with glue.updating_results(str(tmp_path / "glue_results.json")):
                pass
        assert f"pid={holder.pid}" in lock.read_text() and "moved aside" not in \
            capsys.readouterr().out
    finally:
        holder.kill()


# --- Resume -------------------------------------------------------------------------------------

def resumable(tiny_preset, data_dir, out, **env):
    """glue.py through interrupt_at_step.py, with dev scores scripted to peak at epoch 1 of 3:
    the test file then comes from weights a resume can only have from the checkpoint."""
    command = [sys.executable, os.path.join(HERE, "interrupt_at_step.py"), "--task_name=rte",
               "--epochs=3", "--batch_size=4", "--max_sequence_length=32",
               f"--preset={tiny_preset}", f"--data_dir={data_dir}",
               f"--checkpoint_dir={out / 'checkpoints'}", f"--submission_directory={out}",
               f"--finetuning_model_save_path={out / 'model.keras'}"]
    return subprocess.run(command, capture_output=True, text=True, timeout=600, env=dict(
        os.environ, GLUE_TEST_DEV_SCORES="5:0.9,10:0.5,15:0.6", **env))


@pytest.fixture(scope="module")
def scripted_reference(tiny_preset, glue_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("scripted_reference")
    done = resumable(tiny_preset, glue_data[0], out)
    assert done.returncode == 0, done.stderr[-3000:]
    return out


@pytest.mark.slow
@pytest.mark.parametrize("evaluation", [2, 3])
def test_a_kill_between_an_evaluation_and_its_checkpoint_resumes_to_the_same_best(
        tiny_preset, glue_data, tmp_path, scripted_reference, evaluation):
    reference, out = scripted_reference, tmp_path / "resumed"
    killed = resumable(tiny_preset, glue_data[0], out,
                       GLUE_TEST_KILL_AFTER_EVALUATION=str(evaluation))
    assert killed.returncode == 1 and "(killed by SIGKILL)" in killed.stderr
    folder, = glob.glob(str(out / "checkpoints" / "rte_*"))
    last = 5 * (evaluation - 1)  # the evaluation just made is in no checkpoint
    assert os.listdir(folder) == [f"step-{last:09d}.npz"]
    resumed = resumable(tiny_preset, glue_data[0], out)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"Resuming from step {last}" in resumed.stderr
    run, = entry_of(out)["runs"]
    reference_run, = entry_of(reference)["runs"]
    assert run["best_epoch"] == reference_run["best_epoch"] == 1
    assert [e["step"] for e in run["evaluations"]] == [5, 10, 15]
    assert (out / "RTE.tsv").read_text() == (reference / "RTE.tsv").read_text()
    trained = keras.models.load_model(out / "model.keras", compile=False).get_weights()
    expected = keras.models.load_model(reference / "model.keras", compile=False).get_weights()
    for mine, theirs in zip(trained, expected):
        np.testing.assert_allclose(mine, theirs, rtol=1e-5, atol=1e-6)


def test_a_crash_before_the_run_s_folder_resumes_from_its_last_checkpoint(
        glue_data, tiny_preset, tmp_path, run_glue, monkeypatch):
    out = tmp_path / "out"
    args = ("--task_name=rte", "--seed=1,2", f"--preset={tiny_preset}",
            f"--data_dir={glue_data[0]}", f"--submission_directory={out}",
            f"--checkpoint_dir={tmp_path / 'checkpoints'}", *TINY)
    real_predict_test, real_restore = glue.predict_test, glue.TrainingCheckpoints.restore
    predicted = []

    def crash_on_the_second(*args, **kwargs):
        if predicted:
            raise RuntimeError("killed")
        predicted.append(True)
        return real_predict_test(*args, **kwargs)

    monkeypatch.setattr(glue, "predict_test", crash_on_the_second)
    with pytest.raises(SystemExit):
        run_glue(*args)
    assert [run["seed"] for run in entry_of(out)["runs"]] == [1]  # seed 2 was not recorded
    resumed = []

    def restore(self, model):
        resumed.append(real_restore(self, model))
        return resumed[-1]

    monkeypatch.setattr(glue, "predict_test", real_predict_test)
    monkeypatch.setattr(glue.TrainingCheckpoints, "restore", restore)
    run_glue(*args)
    assert resumed == [5]  # only seed 2, from its final checkpoint: nothing trained again
    assert [run["seed"] for run in entry_of(out)["runs"]] == [1, 2]
    assert os.listdir(tmp_path / "checkpoints") == []  # each went once its run was recorded


# --- Errors -------------------------------------------------------------------------------------

@pytest.fixture
def no_training(monkeypatch):
    def train(*args, **kwargs):
        raise AssertionError("trained before the start-up checks failed")

    monkeypatch.setattr(glue, "finetune", train)


def test_a_missing_folder_of_a_later_task_fails_before_the_first_trains(
        glue_data, tiny_preset, tmp_path, run_glue, no_training):
    data_dir = tmp_path / "glue_data"
    shutil.copytree(glue_data[0], data_dir)
    shutil.rmtree(data_dir / "QQP")
    message = error_of(run_glue, "--task_name=rte,qqp", f"--preset={tiny_preset}",
                       f"--data_dir={data_dir}", f"--submission_directory={tmp_path / 'out'}")
    assert message.startswith(f"glue.py: error: qqp: --data_dir: expected the qqp validation "
                              f"file at {data_dir / 'QQP' / 'dev.tsv'}")
    assert not (tmp_path / "out").exists()


def test_a_bad_line_in_a_later_task_s_test_file_fails_before_the_first_trains(
        glue_data, tiny_preset, tmp_path, run_glue, no_training):
    data_dir = tmp_path / "glue_data"
    shutil.copytree(glue_data[0], data_dir)
    test_file = data_dir / "MNLI" / "test_mismatched.tsv"
    lines = test_file.read_text().split("\n")
    lines[3] = "x" + lines[3]
    test_file.write_text("\n".join(lines))
    message = error_of(run_glue, "--task_name=all", f"--preset={tiny_preset}",
                       f"--data_dir={data_dir}")
    assert message == (f"glue.py: error: mnli: {test_file}, line 4: malformed TSV: bad index "
                       f"'x{lines[3][1:].split(chr(9))[0]}'")


def test_a_run_that_crashes_is_one_lost_line_with_its_log(glue_data, tiny_preset, tmp_path,
                                                           run_glue, monkeypatch, capsys):
    def finetune(*args, **kwargs):
        raise tf.errors.UnavailableError(None, None, "the file system did not answer")

    monkeypatch.setattr(glue, "finetune", finetune)
    message = error_of(run_glue, "--task_name=rte", f"--preset={tiny_preset}",
                       f"--data_dir={glue_data[0]}", f"--submission_directory={tmp_path}", *TINY)
    log = next((tmp_path / "runs" / "rte").glob("*/lr5e-05_seed42/lost.log"))
    assert message == (f"glue.py: error: rte: LOST (exit status 1: tensorflow.python.framework."
                       f"errors_impl.UnavailableError: the file system did not answer); its log: "
                       f"{log}")
    assert "UnavailableError: the file system did not answer" in log.read_text()
    assert "UnavailableError: the file system did not answer" in capsys.readouterr().err
    assert not (log.parent / "run.json").exists() and "rte" not in json.loads(
        (tmp_path / "glue_results.json").read_text())


def test_help_works_without_linux_only_calls(monkeypatch):
    hide = ("import os, runpy, sys\n"
            "del os.sched_getaffinity\n"
            "sys.modules['fcntl'] = None\n"  # importing it now fails, as on Windows
            f"sys.argv = [{os.path.join(REPO, 'glue.py')!r}, '--help']\n"
            "runpy.run_path(sys.argv[0], run_name='__main__')\n")
    result = subprocess.run([sys.executable, "-c", hide], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Task and data:" in result.stdout
    monkeypatch.delattr(os, "sched_getaffinity")
    assert glue.available_cores() == os.cpu_count()


def test_the_table_and_files_of_a_task_name_none_come_from_the_records(
        glue_data, tiny_preset, tmp_path, run_glue):
    run_glue("--task_name=wnli", f"--preset={tiny_preset}", f"--data_dir={glue_data[0]}",
             f"--submission_directory={tmp_path}", *TINY)
    (tmp_path / "WNLI.tsv").unlink()
    results = json.loads((tmp_path / "glue_results.json").read_text())
    results["wnli"]["validation"] = {"accuracy": 0.0}  # a stale copy is no source of truth
    (tmp_path / "glue_results.json").write_text(json.dumps(results))
    run_glue("--task_name=none", f"--submission_directory={tmp_path}")
    entry = entry_of(tmp_path, "wnli")
    run, = entry["runs"]
    assert entry["validation"] == run["validation"] != {"accuracy": 0.0}
    assert len(pd.read_csv(tmp_path / "WNLI.tsv", sep="\t")) == glue_data[1]["wnli"]["test"]
