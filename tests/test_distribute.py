"""tf.distribute on CPU: two logical devices stand in for two GPUs, two processes on 127.0.0.1
for two machines. Each run is its own process, as TensorFlow's devices and collectives can be set
up only once per process."""

import json
import os
import socket
import subprocess
import sys
import time

import pandas as pd
import pytest

import glue
from conftest import REPO

# Long enough for the tiny model to learn the task below, so that each row's prediction
# depends on its text: a lost, doubled or misordered row would show. The last epoch's weights are
# compared, not the best epoch's: the first epoch to reach the best dev score is where the model
# has only just learned the task, and on some CPUs it came one epoch apart between runs.
TRAINING = ("--epochs=15", "--batch_size=8", "--max_sequence_length=32", "--learning_rate=3e-3",
            "--pooling=cls", "--select_best_epoch=false")
TIMEOUT = 300  # seconds; every run here takes well under a minute


def glue_command(script, tiny_preset, data_dir, out, *args):
    return [sys.executable, os.path.join(REPO, script), "--task_name=sst2",
            f"--preset={tiny_preset}", f"--data_dir={data_dir}",
            f"--submission_directory={out}", *TRAINING, *args]


def predictions(out):
    return pd.read_csv(os.path.join(out, "SST-2.tsv"), sep="\t")


def results(out):
    with open(os.path.join(out, "glue_results.json"), encoding="utf-8") as file:
        return json.load(file)["sst2"]


def dev_accuracy(out):
    return results(out)["validation"]["accuracy"]


@pytest.fixture(scope="module")
def one_device(tiny_preset, learnable_data, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("one_device"))
    subprocess.run(glue_command("glue.py", tiny_preset, learnable_data, out,
                                "--distribution_strategy=one_device"),
                   check=True, capture_output=True, timeout=TIMEOUT)
    assert dev_accuracy(out) > 0.9  # it learned: predictions depend on each row's text
    return out


def assert_same_as_one_device(out, one_device):
    assert results(out)["replicas"] == 2  # the model itself was trained on two replicas
    distributed, single = predictions(out), predictions(one_device)
    assert list(distributed["index"]) == list(range(33))
    # Each replica draws its own dropout masks, so training differs a little, no more.
    assert (distributed["prediction"] == single["prediction"]).mean() >= 0.9
    assert dev_accuracy(out) == pytest.approx(dev_accuracy(one_device), abs=0.1)


@pytest.mark.slow
def test_mirrored_over_two_devices_matches_one_device(one_device, tiny_preset, learnable_data,
                                                      tmp_path):
    out = str(tmp_path / "mirrored")
    result = subprocess.run(
        glue_command("tests/with_cpu_devices.py", tiny_preset, learnable_data, out,
                     "--distribution_strategy=mirrored", f"--checkpoint_dir={tmp_path / 'ck'}",
                     "--checkpoint_every_steps=5"),
        capture_output=True, text=True, timeout=TIMEOUT, env=dict(os.environ, GLUE_TEST_CPUS="2"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "gives MirroredStrategy with 2 replica(s)" in result.stderr
    assert_same_as_one_device(out, one_device)


@pytest.mark.slow
def test_the_own_classifier_block_runs_unchanged_under_mirrored(tiny_preset, learnable_data,
                                                                  tmp_path):
    # Custom block 3 makes new layers (variables): they must land on both replicas.
    out = str(tmp_path / "mirrored")
    result = subprocess.run(
        glue_command("tests/with_cpu_devices.py", tiny_preset, learnable_data, out,
                     "--distribution_strategy=mirrored", "--use_default_classifier=false",
                     "--epochs=1"),
        capture_output=True, text=True, timeout=TIMEOUT, env=dict(os.environ, GLUE_TEST_CPUS="2"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert results(out)["replicas"] == 2
    assert list(predictions(out)["index"]) == list(range(33))


def free_ports(count):
    sockets = [socket.socket() for _ in range(count)]
    for sock in sockets:
        sock.bind(("127.0.0.1", 0))
    ports = [sock.getsockname()[1] for sock in sockets]
    for sock in sockets:
        sock.close()
    return ports


def start_workers(commands, tmp_path):
    """Starts one process per command as the workers of one TF_CONFIG cluster."""
    addresses = [f"127.0.0.1:{port}" for port in free_ports(len(commands))]
    workers = []
    for index, (command, extra_env) in enumerate(commands):
        config = {"cluster": {"worker": addresses}, "task": {"type": "worker", "index": index}}
        env = dict(os.environ, TF_CONFIG=json.dumps(config), **extra_env)
        log = open(tmp_path / f"worker{index}.log", "w+", encoding="utf-8")  # noqa: SIM115
        workers.append((subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env),
                        log))
    return workers


def finish(workers, timeout=TIMEOUT):
    """Waits for every worker; returns (exit codes, logs). Kills them all past `timeout`."""
    deadline = time.monotonic() + timeout
    codes, logs = [], []
    for process, log in workers:
        try:
            codes.append(process.wait(timeout=max(deadline - time.monotonic(), 1)))
        except subprocess.TimeoutExpired:
            for other, _ in workers:
                other.kill()
            pytest.fail(f"a worker still runs after {timeout} s")
        log.seek(0)
        logs.append(log.read())
        log.close()
    return codes, logs


@pytest.mark.slow
def test_two_workers_train_together_and_only_the_chief_writes(one_device, tiny_preset,
                                                               learnable_data, tmp_path):
    outs = [str(tmp_path / f"out{index}") for index in range(2)]
    workers = start_workers([(glue_command("glue.py", tiny_preset, learnable_data, out,
                                           "--distribution_strategy=multi_worker_mirrored"), {})
                             for out in outs], tmp_path)
    codes, logs = finish(workers)
    assert codes == [0, 0], logs[0][-3000:] + logs[1][-3000:]
    assert "gives CollectiveAllReduceStrategy with 2 replica(s)" in logs[0]
    assert sorted(name for name in os.listdir(outs[0]) if not name.startswith(".")) == [
        "SST-2.tsv", "glue_report", "glue_report.md", "glue_results.json", "runs", "tensorboard"]
    assert not os.path.exists(outs[1])  # worker 1 wrote nothing
    assert_same_as_one_device(outs[0], one_device)


@pytest.mark.slow
def test_a_killed_worker_fails_the_others_with_one_line(tiny_preset, learnable_data, tmp_path):
    out = str(tmp_path / "out")
    args = ("--distribution_strategy=multi_worker_mirrored", f"--checkpoint_dir={tmp_path}/ck")
    workers = start_workers([
        (glue_command("glue.py", tiny_preset, learnable_data, out, *args), {}),
        (glue_command("tests/interrupt_at_step.py", tiny_preset, learnable_data, out, *args),
         {"GLUE_TEST_INTERRUPT": "SIGKILL:2"}),
    ], tmp_path)
    start = time.monotonic()
    codes, logs = finish(workers, timeout=180)
    assert codes[1] == -9
    assert codes[0] == 1
    assert time.monotonic() - start < 120
    last_line = logs[0].strip().splitlines()[-1]
    assert last_line.startswith("glue.py: error: sst2: lost contact with "
                                "/job:worker/replica:0/task:1"), last_line
    assert "start glue.py again on every worker" in last_line
    assert "Traceback" not in logs[0]
    assert not os.path.exists(os.path.join(out, "SST-2.tsv"))


@pytest.mark.slow
def test_a_worker_that_never_comes_is_waited_for_a_bounded_time(tiny_preset, learnable_data,
                                                                 tmp_path):
    command = glue_command("glue.py", tiny_preset, learnable_data, str(tmp_path / "out"),
                           "--distribution_strategy=multi_worker_mirrored",
                           "--worker_timeout_seconds=5")
    workers = start_workers([(command, {}), (["true"], {})], tmp_path)  # worker 1 never starts
    start = time.monotonic()
    codes, logs = finish(workers, timeout=120)
    assert codes[0] != 0
    assert time.monotonic() - start < 60
    assert logs[0].strip().splitlines()[-1] == (
        "glue.py: error: the workers in TF_CONFIG did not all start within "
        "--worker_timeout_seconds=5; start glue.py on every worker")


@pytest.mark.slow
def test_an_unreachable_tpu_is_waited_for_a_bounded_time(tiny_preset, learnable_data, tmp_path):
    start = time.monotonic()
    result = subprocess.run([sys.executable, os.path.join(REPO, "glue.py"), "--task_name=sst2",
                             f"--preset={tiny_preset}", f"--data_dir={learnable_data}",
                             "--distribution_strategy=tpu:grpc://127.0.0.1:9",
                             "--worker_timeout_seconds=5"],
                            capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert result.returncode != 0
    assert time.monotonic() - start < 60
    assert result.stderr.strip().splitlines()[-1] == (
        "glue.py: error: the TPU grpc://127.0.0.1:9 did not answer within "
        "--worker_timeout_seconds=5; check the address in "
        "--distribution_strategy=tpu:<address>")


WORKERS = {"worker": ["127.0.0.1:2222", "127.0.0.1:2223"]}


@pytest.mark.parametrize("tf_config, expected", [
    (None, "TF_CONFIG, which is not set"),
    ("", "TF_CONFIG, which is not set"),
    ("{cluster: 1}", "TF_CONFIG is not valid JSON"),
    ("[]", "`cluster` must map `worker`"),
    (json.dumps({"task": {"type": "worker", "index": 0}}), "`cluster` must map `worker`"),
    (json.dumps({"cluster": {"worker": []}, "task": {"type": "worker", "index": 0}}),
     "`cluster` must map `worker`"),
    (json.dumps({"cluster": {"worker": ["localhost"]}, "task": {"type": "worker", "index": 0}}),
     "lists of host:port addresses"),
    (json.dumps({"cluster": {"ps": ["h:1"], **WORKERS}, "task": {"type": "worker", "index": 0}}),
     "`cluster` must map `worker`"),
    (json.dumps({"cluster": WORKERS}), "`task` must name a job of the cluster"),
    (json.dumps({"cluster": WORKERS, "task": {"type": "worker", "index": 2}}),
     "this worker's index in it, got {'type': 'worker', 'index': 2}"),
    (json.dumps({"cluster": WORKERS, "task": {"type": "chief", "index": 0}}),
     "`task` must name a job of the cluster"),
    (json.dumps({"cluster": WORKERS, "task": {"type": "worker", "index": "0"}}),
     "`task` must name a job of the cluster"),
])
def test_a_bad_tf_config_is_one_clear_line(tf_config, expected, tiny_preset, learnable_data,
                                           run_glue, monkeypatch):
    if tf_config is None:
        monkeypatch.delenv("TF_CONFIG", raising=False)
    else:
        monkeypatch.setenv("TF_CONFIG", tf_config)
    with pytest.raises(SystemExit) as exit_info:
        run_glue("--task_name=rte", f"--preset={tiny_preset}", f"--data_dir={learnable_data}",
                 "--distribution_strategy=multi_worker_mirrored")
    message = exit_info.value.code
    assert message.startswith("glue.py: error: ") and "\n" not in message
    assert expected in message
    assert 'for example {"cluster": {"worker": ["host1:12345"' in message


def test_a_good_tf_config_passes():
    glue.check_tf_config(json.dumps({"cluster": {"chief": ["a:1"], **WORKERS},
                                     "task": {"type": "worker", "index": 1}}))


def test_one_device_and_auto_on_a_cpu_machine_use_one_replica():
    for name in ("one_device", "auto"):
        assert glue.make_strategy(name).num_replicas_in_sync == 1


def test_an_unknown_strategy_is_one_clear_line():
    with pytest.raises(glue.GlueError, match="unknown distribution strategy 'horovod'; use one "
                                             "of auto, one_device"):
        glue.make_strategy("horovod")


def test_the_tpu_address_is_read_from_the_strategy_flag():
    assert glue.strategy_and_tpu("tpu:grpc://10.0.0.2:8470") == ("tpu", "grpc://10.0.0.2:8470")
    assert glue.strategy_and_tpu("tpu") == ("tpu", None)
    assert glue.strategy_and_tpu("mirrored") == ("mirrored", None)


def test_the_keras_patch_refuses_a_keras_it_was_not_written_for():
    from keras.src.backend.tensorflow import trainer
    glue.check_keras_internals(trainer)  # the installed Keras: the one it was written for
    with pytest.raises(glue.GlueError, match=r"this is Keras 3\.16\.0; install the Keras of"):
        glue.check_keras_internals(trainer, version="3.16.0")

    class Moved:  # a Keras whose private trainer functions changed
        reduce_per_replica = staticmethod(lambda values, strategy: values)
        TensorFlowTrainer = trainer.TensorFlowTrainer
    with pytest.raises(glue.GlueError, match=r"\(changed: reduce_per_replica, "
                                             r"_collective_all_reduce_multi_worker\)"):
        glue.check_keras_internals(Moved)
