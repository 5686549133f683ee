"""tf.distribute on CPU: two logical devices stand in for two GPUs. Each command is its own
process, as TensorFlow's devices can be set up only once per process."""

import json
import os
import random
import subprocess
import sys
import time

import keras
import keras_hub
import numpy as np
import pandas as pd
import pytest

import glue
from conftest import REPO, VOCAB, WORDS, error_of, write_tsv

# Long enough for the tiny model to learn the task below, so that each row's prediction
# depends on its text: a lost, doubled or misordered row would show. The last epoch's weights are
# compared, not the best epoch's.
TRAINING = ("--epochs=15", "--batch_size=8", "--max_sequence_length=32", "--learning_rate=3e-3",
            "--pooling=cls", "--select_best_epoch=false")
TIMEOUT = 300  # seconds; every run here takes well under a minute
# Two replicas compute one device's update exactly only when nothing random differs between
# them and every batch splits into equal halves (the update is the mean of the replicas' mean
# gradients): no dropout, no clipping (Keras clips each replica's gradient on its own), and
# training rows of one length (one bucket of full batches of 8: 4 rows a replica).
EXACT = ("--epochs=15", "--batch_size=8", "--max_sequence_length=32", "--learning_rate=3e-3",
         "--select_best_epoch=false", "--use_default_classifier=false", "--clip_norm=0",
         "--notensorboard")
# What the two trainings may differ by: float32 sums taken in another order, which Adam carries
# on. Over these 180 steps the largest weight differed by 2.4e-5 (Intel Xeon, family 6). Any real
# difference (a batch lost, repeated or split wrongly) moves a weight by about one Adam step, the
# learning rate, 3e-3: the tolerance sits between the two, 40 times above the first.
WEIGHT_TOLERANCE = 1e-3


def glue_command(script, tiny_preset, data_dir, out, *args, training=TRAINING):
    return [sys.executable, os.path.join(REPO, script), "--task_name=sst2",
            f"--preset={tiny_preset}", f"--data_dir={data_dir}",
            f"--submission_directory={out}", *training, *args]


def predictions(out):
    return pd.read_csv(os.path.join(out, "SST-2.tsv"), sep="\t")


def results(out):
    with open(os.path.join(out, "glue_results.json"), encoding="utf-8") as file:
        return json.load(file)["sst2"]


def dev_accuracy(out):
    return results(out)["validation"]["accuracy"]


@pytest.fixture(scope="module")
def exact_preset(tmp_path_factory):
    """The tiny BERT of conftest without dropout: nothing random between replicas."""
    directory = str(tmp_path_factory.mktemp("tiny_bert_without_dropout"))
    keras_hub.models.BertBackbone(
        vocabulary_size=len(VOCAB), num_layers=1, num_heads=2, hidden_dim=8,
        intermediate_dim=16, max_sequence_length=64, dropout=0.0).save_to_preset(directory)
    keras_hub.models.BertTextClassifierPreprocessor(
        tokenizer=keras_hub.models.BertTokenizer(vocabulary=VOCAB, lowercase=True),
        sequence_length=32).save_to_preset(directory)
    return directory


@pytest.fixture(scope="module")
def exact_data(tmp_path_factory):
    """SST-2 files as learnable as conftest's, every sentence five words long (seven tokens
    with [CLS] and [SEP]), 96 training rows: 12 full batches of one length."""
    root = tmp_path_factory.mktemp("equal_length_glue_data")
    rng = random.Random(0)
    filler = [word for word in WORDS if word not in ("good", "bad", "not")]

    def example():
        label, words = rng.randint(0, 1), rng.choices(filler, k=4)
        words.insert(rng.randint(0, 4), "good" if label else "bad")
        return " ".join(words), label

    write_tsv(root / "SST-2" / "train.tsv", ["sentence", "label"], [example() for _ in range(96)])
    write_tsv(root / "SST-2" / "dev.tsv", ["sentence", "label"], [example() for _ in range(33)])
    test_rows = [[index, example()[0]] for index in range(33)]
    rng.shuffle(test_rows)
    write_tsv(root / "SST-2" / "test.tsv", ["index", "sentence"], test_rows)
    return str(root)


def final_weights(out):
    return keras.models.load_model(os.path.join(out, "model.keras"), compile=False).get_weights()


@pytest.fixture(scope="module")
def one_device(exact_preset, exact_data, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("one_device"))
    subprocess.run(glue_command("glue.py", exact_preset, exact_data, out,
                                "--distribution_strategy=one_device",
                                f"--finetuning_model_save_path={out}/model.keras",
                                training=EXACT),
                   check=True, capture_output=True, timeout=TIMEOUT)
    assert dev_accuracy(out) > 0.9  # it learned: predictions depend on each row's text
    return out


@pytest.mark.slow
def test_mirrored_over_two_devices_matches_one_device(one_device, exact_preset, exact_data,
                                                      tmp_path):
    out = str(tmp_path / "mirrored")
    result = subprocess.run(
        glue_command("tests/with_cpu_devices.py", exact_preset, exact_data, out,
                     "--distribution_strategy=mirrored", f"--checkpoint_dir={tmp_path / 'ck'}",
                     "--checkpoint_every_steps=5",
                     f"--finetuning_model_save_path={out}/model.keras", training=EXACT),
        capture_output=True, text=True, timeout=TIMEOUT, env=dict(os.environ, GLUE_TEST_CPUS="2"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert results(out)["replicas"] == 2  # the model itself was trained on two replicas
    for mirrored, single in zip(final_weights(out), final_weights(one_device), strict=True):
        np.testing.assert_allclose(mirrored, single, rtol=0, atol=WEIGHT_TOLERANCE)
    distributed, alone = predictions(out), predictions(one_device)
    assert list(distributed["index"]) == list(range(33))
    assert list(distributed["prediction"]) == list(alone["prediction"])
    assert dev_accuracy(out) == dev_accuracy(one_device)


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


@pytest.mark.slow
def test_an_unreachable_tpu_is_waited_for_a_bounded_time(tiny_preset, learnable_data, tmp_path):
    start = time.monotonic()
    result = subprocess.run([sys.executable, os.path.join(REPO, "glue.py"), "--task_name=sst2",
                             f"--preset={tiny_preset}", f"--data_dir={learnable_data}",
                             "--distribution_strategy=tpu:grpc://127.0.0.1:9",
                             "--tpu_timeout_seconds=5"],
                            capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert result.returncode != 0
    assert time.monotonic() - start < 60
    assert result.stderr.strip().splitlines()[-1] == (
        "glue.py: error: the TPU grpc://127.0.0.1:9 did not answer within "
        "--tpu_timeout_seconds=5; check the address in "
        "--distribution_strategy=tpu:<address>")
    assert result.stderr.count("did not answer within") == 1  # the run's line, said once


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


def test_a_multi_worker_cluster_ends_at_start_naming_what_to_use(run_glue, monkeypatch):
    monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": {"worker": ["a:1", "b:1"]},
                                                "task": {"type": "worker", "index": 0}}))
    message = error_of(run_glue, "--task_name=rte")
    assert message.startswith("glue.py: error: TF_CONFIG names a cluster of several workers: "
                              "multi-worker training is retired")
    assert "--parallel_runs=N" in message and "job arrays" in message
    # Single-node platforms set a TF_CONFIG of one worker: that one runs as before.
    glue.check_multi_worker(json.dumps({"cluster": {"worker": ["a:1"]},
                                        "task": {"type": "worker", "index": 0}}))
    glue.check_multi_worker(None)
