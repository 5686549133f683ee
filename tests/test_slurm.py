"""--launcher=slurm: a whole recipe as Slurm jobs, through submitit. With no Slurm here, the
stand-in of tests/slurm_stand_in/ (sbatch, srun, sacct, squeue, scancel and scontrol, running
each job as local processes) puts submitit's real Slurm path to work; and where there is no
`srun` at all, submitit's local executor runs the jobs."""

import glob
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import types

import pytest

import glue
from conftest import REPO, error_of, options_for

HERE = os.path.dirname(os.path.abspath(__file__))
TINY = ("--epochs=1", "--batch_size=4", "--max_sequence_length=32")
RECIPE = {"defaults": {"epochs": 1, "batch_size": 4}, "rte": {"init_from_task": "mrpc"}}


@pytest.fixture
def shared(tiny_preset, glue_data):
    """A folder outside /tmp (compute nodes cannot reach a machine's own /tmp, and the command
    refuses it), holding a copy of the tiny preset and data, and the stand-in's job table."""
    folder = tempfile.mkdtemp(prefix="glue-slurm-test-", dir=os.path.expanduser("~"))
    shutil.copytree(tiny_preset, os.path.join(folder, "preset"))
    shutil.copytree(glue_data[0], os.path.join(folder, "glue_data"))
    with open(os.path.join(folder, "recipe.json"), "w") as file:
        json.dump(RECIPE, file)
    yield folder
    subprocess.run([os.path.join(HERE, "slurm_stand_in", "bin", "scancel"), *stand_in_jobs(
        folder)], env=stand_in(folder), check=False)  # none should be left; if so, not running
    shutil.rmtree(folder, ignore_errors=True)


def stand_in(folder, slurm=True):
    """The environment of a command on a machine with the stand-in Slurm (or, with `slurm`
    false, with no Slurm at all)."""
    path = os.environ["PATH"]
    if slurm:
        path = os.path.join(HERE, "slurm_stand_in", "bin") + os.pathsep + path
    return {**os.environ, "PATH": path, "SLURM_STAND_IN_DIR": os.path.join(folder, "slurm"),
            "SLURM_STAND_IN_PYTHON": sys.executable}


def stand_in_jobs(folder, state=None):
    path = os.path.join(folder, "slurm", "jobs.json")
    jobs = json.load(open(path)) if os.path.exists(path) else {}
    return [job for job, values in jobs.items() if state in (None, values["state"])]


def slurm_command(folder, *args, script="glue.py", env=None, slurm=True, **kwargs):
    """Runs glue.py on `folder`'s preset and data, as a process, with the stand-in Slurm."""
    script = os.path.join(REPO if script == "glue.py" else HERE, script)
    command = [sys.executable, script, f"--preset={folder}/preset",
               f"--data_dir={folder}/glue_data", f"--submission_directory={folder}/out",
               "--launcher=slurm", "--slurm=time=30,cpus=1", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=900,
                          env={**stand_in(folder, slurm), **(env or {})}, **kwargs)


@pytest.mark.slow
def test_a_recipe_runs_as_slurm_jobs_and_publishes_as_a_local_command_would(
        shared, tmp_path, run_glue):
    result = slurm_command(shared, "--task_name=mrpc,rte,wnli",
                           f"--recipe={shared}/recipe.json", "--seed=1,2", "--parallel_runs=2")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = result.stdout
    # Round 2 is submitted once round 1 has its chosen model, by the same command; the tasks of
    # round 1 run at once.
    mrpc_done = max(out.index(f"mrpc lr 5e-05 seed {seed} (Slurm job") for seed in (1, 2))
    assert out.index("rte: 2 runs submitted as Slurm job") > mrpc_done
    assert out.index("wnli: 2 runs submitted as Slurm job") < mrpc_done
    assert re.search(r"^mrpc: 2 runs submitted as Slurm job \d+ \(slurm\)$", out, re.M)
    assert re.search(r"^rte lr 5e-05 seed 2: Slurm job \d+_\d started$", out, re.M)
    assert len(stand_in_jobs(shared, "COMPLETED")) == 6
    # The same table as the same recipe run here, as local processes.
    run_glue("--task_name=mrpc,rte,wnli", f"--recipe={shared}/recipe.json", "--seed=1,2",
             f"--preset={shared}/preset", f"--data_dir={shared}/glue_data",
             f"--submission_directory={tmp_path}")
    slurm_results = json.load(open(f"{shared}/out/glue_results.json"))
    local_results = json.load(open(tmp_path / "glue_results.json"))
    for task in ("mrpc", "wnli", "rte"):  # rte's settings hold its copy of mrpc's model file
        for key in ("validation", "learning_rate", "fingerprint_id")[:2 if task == "rte" else 3]:
            assert slurm_results[task][key] == local_results[task][key], (task, key)
    assert open(f"{shared}/out/RTE.tsv").read() == (tmp_path / "RTE.tsv").read_text()
    # Published once per run as it ended, and the report made from the records.
    assert (open(f"{shared}/out/glue_report.md").read().split("## ")[1] ==
            (tmp_path / "glue_report.md").read_text().split("## ")[1])


STSB = ("--task_name=stsb", "--seed=1,2", "--parallel_runs=2", "--epochs=2", "--batch_size=4",
        "--max_sequence_length=32", "--checkpoint_every_steps=1")


@pytest.mark.slow
def test_a_job_killed_mid_training_costs_its_run_alone_which_the_same_command_then_trains(
        shared):
    """The job of seed 2 loses its node at step 3: its run is named with its job and log, seed
    1 is recorded; the same command then trains seed 2 alone, from its checkpoint."""
    killed = slurm_command(shared, *STSB, script="interrupt_at_step.py", env={
        "GLUE_TEST_INTERRUPT": "SIGKILL:3:group", "GLUE_TEST_INTERRUPT_SEED": "2"})
    assert killed.returncode == 1
    line, = [line for line in killed.stderr.splitlines() if "LOST" in line]
    assert re.fullmatch(r"stsb lr 5e-05 seed 2: LOST \(Slurm job \d+_1, NODE_FAIL\); its log: "
                        r"\S+/lr5e-05_seed2/lost\.log", line), line
    assert "stsb lr 5e-05 seed 2  epoch 1/2  step 2/" in open(line.split("its log: ")[1]).read()
    assert "1 run lost (lines above)" in killed.stderr
    again = slurm_command(shared, *STSB)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "stsb: 1 of 2 asked runs recorded with these settings; training the other 1" in \
        again.stdout
    assert re.search(r"^stsb: 1 run submitted as Slurm job \d+ \(slurm\)$", again.stdout, re.M)
    runs = json.load(open(f"{shared}/out/glue_results.json"))["stsb"]["runs"]
    assert sorted(run["seed"] for run in runs) == [1, 2]


@pytest.mark.slow
def test_a_requeued_job_resumes_its_run_from_its_checkpoint(shared):
    """Slurm's USR2 (a preemption, or the time limit near) reaches submitit at step 3: the run
    checkpoints and stops, the job is requeued, and the run resumes where it stopped."""
    result = slurm_command(shared, *STSB[:1], "--seed=1", *STSB[3:],
                           script="interrupt_at_step.py",
                           env={"GLUE_TEST_INTERRUPT": "SIGUSR2:3:command"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    job, = stand_in_jobs(shared)
    assert json.load(open(f"{shared}/slurm/jobs.json"))[job]["requeued"] == 1
    folder, = [path for path, _, files in os.walk(f"{shared}/out/runs") if "run.json" in files]
    log = open(os.path.join(folder, "log.txt")).read()
    stopped = re.search(r"glue.py: stopped by SIGTERM at step (\d+) of 10", log)
    assert stopped, log[-3000:]
    assert f"Resuming from step {stopped[1]}" in log
    run = json.load(open(os.path.join(folder, "run.json")))
    assert [evaluation["step"] for evaluation in run["evaluations"]] == [5, 10]


@pytest.mark.slow
def test_ctrl_c_cancels_the_command_s_jobs_and_leaves_none_running(shared):
    """Two tasks, running at once: Ctrl-C reaches both tasks' jobs."""
    command = subprocess.Popen(
        [sys.executable, os.path.join(REPO, "glue.py"), f"--preset={shared}/preset",
         f"--data_dir={shared}/glue_data", f"--submission_directory={shared}/out",
         "--launcher=slurm", "--task_name=stsb,wnli", "--seed=1", "--epochs=200", *STSB[4:]],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=stand_in(shared))
    deadline = time.time() + 300
    while len(glob_logs(shared)) < 2 or not all(
            "step 2/" in open(log).read() for log in glob_logs(shared)):
        assert time.time() < deadline and command.poll() is None, command.communicate()
        time.sleep(0.5)
    command.send_signal(signal.SIGINT)
    out, err = command.communicate(timeout=300)
    assert command.returncode == 1
    for task in ("stsb", "wnli"):
        assert f"{task}: SIGINT: cancelling 1 Slurm job (a run checkpoints as it stops)" in out
    assert "stopped by SIGINT; the runs keep their checkpoints" in err
    assert not stand_in_jobs(shared, "RUNNING") and not stand_in_jobs(shared, "PENDING")
    assert len(stand_in_jobs(shared, "CANCELLED")) == 2


def glob_logs(folder):
    return [os.path.join(path, "log.txt") for path, _, files in os.walk(f"{folder}/out/runs")
            if "log.txt" in files]


@pytest.mark.slow
def test_the_same_command_takes_over_the_jobs_of_a_command_that_died(shared):
    """The command is killed (its login node rebooted) while its jobs run: they go on, and the
    same command, run again, waits for them instead of starting second copies."""
    args = [sys.executable, os.path.join(REPO, "glue.py"), f"--preset={shared}/preset",
            f"--data_dir={shared}/glue_data", f"--submission_directory={shared}/out",
            "--launcher=slurm", *STSB]
    first = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             env=stand_in(shared))
    deadline = time.time() + 300
    while len(stand_in_jobs(shared, "RUNNING")) < 2:
        assert time.time() < deadline and first.poll() is None
        time.sleep(0.2)
    first.kill()
    first.wait()
    again = subprocess.run(args, capture_output=True, text=True, env=stand_in(shared),
                           timeout=600)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    for seed in (1, 2):
        assert re.search(rf"^stsb lr 5e-05 seed {seed}: taking over Slurm job \d+_{seed - 1}, "
                         "of an earlier command$", again.stdout, re.M), again.stdout
    assert "submitted" not in again.stdout
    assert len(stand_in_jobs(shared)) == 2
    runs = json.load(open(f"{shared}/out/glue_results.json"))["stsb"]["runs"]
    assert sorted(run["seed"] for run in runs) == [1, 2]


@pytest.mark.slow
def test_with_no_slurm_here_submitit_runs_the_jobs_on_this_machine(shared):
    result = slurm_command(shared, "--task_name=rte", *TINY, slurm=False)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert re.search(r"^rte: 1 run submitted as Slurm job \d+ \(local\)$", result.stdout, re.M)
    assert re.search(r"^rte \(Slurm job \d+\): validation accuracy", result.stdout, re.M)
    assert "validation" in json.load(open(f"{shared}/out/glue_results.json"))["rte"]


@pytest.mark.parametrize("args, expected", [
    (["--slurm=partition=gpu"], "--slurm sets the resources of Slurm jobs: give "
                                "--launcher=slurm too"),
    (["--launcher=slurm", "--slurm=time"], "--slurm=time: give key=value, such as "
                                           "partition=gpu or time=240 (minutes)"),
    (["--launcher=slurm", "--slurm=gpus=two"], "--slurm=gpus=two: give key=value"),
    (["--launcher=slurm"], "--launcher=slurm: give --submission_directory, on a filesystem "
                           "the compute nodes share"),
    (["--launcher=slurm", "--submission_directory=/tmp/glue-out"],
     "--launcher=slurm: --submission_directory=/tmp/glue-out is in this machine's own "
     "temporary folder, which compute nodes cannot reach; give a folder on a shared "
     "filesystem"),
])
def test_bad_slurm_input_ends_at_start_in_one_line(glue_data, run_glue, args, expected,
                                                   monkeypatch):
    monkeypatch.setattr(glue, "SlurmJobs", None)  # nothing may be submitted
    assert expected in error_of(run_glue, "--task_name=rte", f"--data_dir={glue_data[0]}",
                                *args)


def test_the_slurm_launcher_without_submitit_ends_at_start(run_glue, monkeypatch):
    real = glue.importlib.util.find_spec
    monkeypatch.setattr(glue.importlib.util, "find_spec",
                        lambda name, *rest: None if name == "submitit" else real(name, *rest))
    assert error_of(run_glue, "--task_name=rte", "--launcher=slurm",
                    f"--submission_directory={os.path.expanduser('~')}/out") == \
        "glue.py: error: --launcher=slurm needs submitit: pip install submitit"


def test_slurm_flags_map_to_submitit_s_parameters_and_stay_out_of_the_fingerprint():
    assert glue.slurm_parameters(["partition=gpu", "time=240", "gpus=1", "cpus=8", "mem=32",
                                  "account=lab", "qos=high", "constraint=a100"]) == {
        "slurm_partition": "gpu", "timeout_min": 240, "gpus_per_node": 1, "cpus_per_task": 8,
        "mem_gb": 32.0, "slurm_account": "lab", "slurm_qos": "high",
        "slurm_additional_parameters": {"constraint": "a100"}}
    assert glue.slurm_parameters([])["timeout_min"] == 1440  # not submitit's 5 minutes
    # A value with commas, which absl's list flag splits: each piece goes on the value before it.
    assert glue.slurm_parameters(options_for(
        "--slurm=exclude=node1,node2,mail-type=END,FAIL,time=60").slurm) == {
        "timeout_min": 60,
        "slurm_additional_parameters": {"exclude": "node1,node2", "mail-type": "END,FAIL"}}
    local, slurm = (glue.fingerprint(glue.TASKS["rte"], options_for(*args), ("one_device", 1))
                    for args in ([], ["--launcher=slurm", "--slurm=partition=gpu"]))
    assert local == slurm


def test_jobs_slurm_refuses_end_the_command_in_one_line(shared):
    result = slurm_command(shared, "--task_name=rte", "--slurm=partition=nope", *TINY)
    assert result.returncode == 1
    assert result.stderr.splitlines()[-1] == (
        "glue.py: error: Slurm refused rte's jobs: sbatch: error: invalid partition specified: "
        "nope")
    assert not stand_in_jobs(shared)
    assert not glob.glob(f"{shared}/out/runs/rte/*/.staged*")  # nothing left behind


def test_a_line_says_when_each_job_starts_and_every_minute_counts_the_jobs(
        tmp_path, monkeypatch, capsys):
    jobs = object.__new__(glue.SlurmJobs)  # its watching alone, with no executor
    jobs.task_name, jobs.said_at, jobs.outlive = "rte", 0, False
    runs = [types.SimpleNamespace(name=f"rte seed {seed}", process=glue.SlurmRun(
        types.SimpleNamespace(job_id=f"7_{seed}"), str(tmp_path / f"{seed}.log")))
        for seed in range(3)]
    jobs.jobs = [run.process for run in runs]
    for seed in (0, 1):  # a job's run opens its log as the job starts
        (tmp_path / f"{seed}.log").write_text("")
    runs[1].process.returncode = 0
    monkeypatch.setattr(glue, "PROGRESS_SECONDS", 0)
    jobs.watch(runs)
    assert capsys.readouterr().out.splitlines() == [
        "rte seed 0: Slurm job 7_0 started", "rte seed 1: Slurm job 7_1 started",
        "rte: Slurm jobs: 1 pending, 1 running, 1 ended"]


def test_a_kerashub_preset_id_is_no_temporary_path_even_from_a_temporary_folder(
        run_glue, monkeypatch, tmp_path):
    """The /tmp check reads a preset id as an id: from a command started in /tmp, the id once
    resolved to a path there, and the command was refused."""
    monkeypatch.chdir(tmp_path)  # under /tmp
    with pytest.raises(SystemExit) as stop:
        run_glue("--task_name=rte", "--launcher=slurm", "--preset=bert_tiny_en_uncased",
                 f"--submission_directory={tmp_path}/out")
    assert "--submission_directory" in str(stop.value.code)  # not --preset
    glue.check_slurm(options_for("--launcher=slurm", "--preset=bert_tiny_en_uncased",
                                 f"--submission_directory={os.path.expanduser('~')}/out"))
