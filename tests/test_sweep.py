"""A command is a sweep of runs, each a process of its own: a lost run costs that run only, and
runs can go side by side on shares of the devices."""

import contextlib
import glob
import json
import os
import subprocess
import sys
import time

import pytest
from absl import flags

import glue
from conftest import REPO, crash_runs, entry_of, error_of, imported_modules, options_for

HERE = os.path.dirname(os.path.abspath(__file__))
TINY = ("--task_name=rte", "--epochs=2", "--batch_size=4", "--max_sequence_length=32")


def command(tiny_preset, data_dir, out, *args, script="glue.py"):
    return [sys.executable, os.path.join(HERE if script != "glue.py" else REPO, script), *TINY,
            f"--preset={tiny_preset}", f"--data_dir={data_dir}",
            f"--submission_directory={out}", f"--checkpoint_dir={out / 'checkpoints'}", *args]


@pytest.mark.slow
def test_a_killed_run_costs_that_run_only_and_the_same_command_trains_it_alone(
        tiny_preset, glue_data, tmp_path):
    sweep = command(tiny_preset, glue_data[0], tmp_path, "--seed=1,2,3",
                    "--checkpoint_every_steps=1", script="interrupt_at_step.py")
    killed = subprocess.run(sweep, capture_output=True, text=True, timeout=600, env=dict(
        os.environ, GLUE_TEST_INTERRUPT="SIGKILL:3", GLUE_TEST_INTERRUPT_SEED="2"))
    assert killed.returncode == 1
    assert [run["seed"] for run in entry_of(tmp_path)["runs"]] == [1, 3]
    log = glob.glob(str(tmp_path / "runs" / "rte" / "*" / "lr5e-05_seed2" / "lost.log"))[0]
    assert f"rte lr 5e-05 seed 2: LOST (killed by SIGKILL); its log: {log}" in killed.stderr
    assert "rte lr 5e-05 seed 2  epoch 1/2" in open(log).read()  # its whole log, kept
    assert killed.stderr.strip().splitlines()[-1] == (
        "glue.py: error: 1 run lost (lines above); run the same command again to train what "
        "is missing")

    again = subprocess.run(sweep, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "rte: 2 of 3 asked runs recorded with these settings; training the other 1" in \
        again.stdout
    assert "Resuming from step 2" in again.stderr  # its checkpoint before the kill
    assert [run["seed"] for run in entry_of(tmp_path)["runs"]] == [1, 2, 3]


def run_processes(out):
    """The run processes alive now of the command writing into `out`: {pid: allowed cores}."""
    found = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as file:
                arguments = file.read().decode(errors="replace").split("\0")
            with open(f"/proc/{pid}/status") as file:
                cores = next(line.split()[1] for line in file
                             if line.startswith("Cpus_allowed_list"))
        except (OSError, StopIteration):
            continue
        if any(argument.startswith(f"--run_dir={out}") for argument in arguments):
            found[pid] = cores
    return found


HEAVY = {"tensorflow", "keras", "keras_hub", "tensorflow_datasets"}  # only a run loads them


def maps_tensorflow(pid):
    with open(f"/proc/{pid}/maps") as maps:
        return "tensorflow" in maps.read()


@pytest.mark.slow
@pytest.mark.skipif(glue.available_cores() < 2, reason="needs two cores to share out")
def test_parallel_runs_go_side_by_side_each_on_its_own_cores(tiny_preset, glue_data, tmp_path):
    """...started by a command that never maps TensorFlow, and that shows none of the lines
    TensorFlow prints as a run starts; the runs' logs keep them. Then publishing and comparing
    the folder load no TensorFlow either. The runs leave no autograph code in /tmp."""
    temporary = tmp_path / "tmp"
    temporary.mkdir()
    sweep = subprocess.Popen(command(tiny_preset, glue_data[0], tmp_path, "--seed=1,2",
                                     "--parallel_runs=2"), env=dict(os.environ, TMPDIR=temporary),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    most, cores, command_mapped = 0, set(), False
    while sweep.poll() is None:
        alive = run_processes(tmp_path)
        most = max(most, len(alive))
        cores |= {tuple(sorted(alive.values()))} if len(alive) == 2 else set()
        with contextlib.suppress(OSError):
            command_mapped |= maps_tensorflow(sweep.pid)
        time.sleep(0.1)
    out, err = sweep.communicate()
    assert sweep.returncode == 0, err[-3000:]
    assert most == 2
    (first, second), = cores or [(None, None)]
    assert first != second and "," not in first + second  # one core each, not the same one
    assert [run["seed"] for run in entry_of(tmp_path)["runs"]] == [1, 2]
    assert not command_mapped
    logs = "".join(open(log).read() for log in glob.glob(str(tmp_path / "runs" / "*" / "*" / "*"
                                                             / "log.txt")))
    assert "rte lr 5e-05 seed 1  epoch 1/2" in out and "rte lr 5e-05 seed 1  epoch 1/2" in logs
    assert not [line for line in (out + err).splitlines()
                if any(chatter in line for chatter in glue.TENSORFLOW_CHATTER)]
    assert any(chatter in logs for chatter in glue.TENSORFLOW_CHATTER)  # kept there
    assert not list(temporary.glob("__autograph_generated_file*"))
    publish = subprocess.run(
        [sys.executable, "-X", "importtime", os.path.join(REPO, "glue.py"), "--task_name=none",
         f"--submission_directory={tmp_path}", f"--compare_with={tmp_path}"],
        capture_output=True, text=True, timeout=120)
    assert publish.returncode == 0, publish.stderr[-3000:]
    assert "GLUE average over 1 tasks (rte)" in publish.stdout
    assert not imported_modules(publish.stderr) & HEAVY


def test_device_slots_share_out_the_gpus_or_the_cores(monkeypatch):
    assert glue.device_slots(1, gpus=2, cores=16) == [({}, None)]
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert glue.device_slots(2, gpus=4, cores=16) == [
        ({"CUDA_VISIBLE_DEVICES": "0,1"}, None), ({"CUDA_VISIBLE_DEVICES": "2,3"}, None)]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3,5,7")  # the command's own share
    assert glue.device_slots(2, gpus=4, cores=16) == [
        ({"CUDA_VISIBLE_DEVICES": "2,3"}, None), ({"CUDA_VISIBLE_DEVICES": "5,7"}, None)]
    mine = sorted(os.sched_getaffinity(0))
    if len(mine) >= 2:
        assert glue.device_slots(2, gpus=0, cores=len(mine)) == [
            ({}, set(mine[:len(mine) // 2])), ({}, set(mine[len(mine) // 2:2 * (len(mine) // 2)]))]


def test_more_parallel_runs_than_devices_is_one_line_at_start(run_glue, glue_data, tiny_preset):
    message = error_of(run_glue, *TINY, f"--preset={tiny_preset}",
                       f"--data_dir={glue_data[0]}", "--parallel_runs=64")
    assert message.startswith("glue.py: error: --parallel_runs=64: there are ")
    assert message.endswith(f"to share out; give at most {glue.available_cores()}")


def test_a_run_s_flags_are_spelled_as_its_command_line():
    assert glue.arguments({"task_name": ["rte"], "epochs": 3, "warmup_ratio": 0.06,
                           "select_best_epoch": False, "jit_compile": True, "pooling": None}) == [
        "--task_name=rte", "--epochs=3", "--warmup_ratio=0.06", "--noselect_best_epoch",
        "--jit_compile"]
    names = glue.run_flag_names(["epochs", "my_dropout", "overwrite", "run_dir", "seed"])
    assert names == ["epochs", "my_dropout", "seed"]  # a researcher's own flag goes to the run


def test_a_flag_a_researcher_adds_for_a_block_is_one_edit():
    """One DEFINE line in a custom code block: --help shows the flag, each run gets it, and the
    fingerprint counts it."""
    flags.DEFINE_float("head_dropout", 0.1, "Dropout of my head.", module_name=glue.__name__)
    try:
        assert "Your own flags:\n  --head_dropout: Dropout of my head. (default: '0.1')" in \
            glue.grouped_help(flags.FLAGS)
        options = options_for("--head_dropout=0.3")
        assert "head_dropout" in glue.run_flag_names(vars(options))
        assert glue.fingerprint(glue.TASKS["rte"], options, ("_DefaultDistributionStrategy", 1))[
            "head_dropout"] == 0.3
    finally:
        delattr(flags.FLAGS, "head_dropout")


def test_a_lost_run_adds_no_entry_and_the_others_are_recorded(glue_data, tiny_preset, tmp_path,
                                                              run_glue, monkeypatch, capsys):
    crash_runs(monkeypatch, lambda label: label.endswith("seed 2"), MemoryError("out of memory"))
    with pytest.raises(SystemExit):
        run_glue(*TINY, "--seed=1,2,3", f"--preset={tiny_preset}",
                 f"--data_dir={glue_data[0]}", f"--submission_directory={tmp_path}")
    assert [run["seed"] for run in entry_of(tmp_path)["runs"]] == [1, 3]
    assert "rte lr 5e-05 seed 2: LOST (exit status 1: MemoryError: out of memory); its log: " \
        in capsys.readouterr().err
    records = glob.glob(str(tmp_path / "runs" / "rte" / "*" / "*" / "run.json"))
    assert sorted(json.load(open(path))["seed"] for path in records) == [1, 3]


def test_a_sweep_that_becomes_live_after_the_command_was_stopped_starts_no_run(
        tmp_path, monkeypatch):
    """The command catches SIGTERM and Ctrl-C in one place (`run_tasks`): a signal that came
    while a task was still planning stops its sweep as it starts, before any run."""
    started = []
    monkeypatch.setattr(glue, "start_run", lambda *args: started.append(args))
    sweep = glue.Sweep(glue.TASKS["rte"], options_for("--seed=1,2"), {}, str(tmp_path),
                       "glue.py", False, ["SIGTERM"])
    with pytest.raises(glue.Preempted, match="stopped by SIGTERM; the runs keep their"):
        sweep.train([(5e-5, 1, []), (5e-5, 2, [])], record=None)
    assert not started and not glue.Sweep.live
