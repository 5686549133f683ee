"""The GLUE readers: the real files, and the local reader agreeing with tensorflow-datasets."""

import contextlib
import csv
import os
from unittest import mock

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

import glue
from conftest import REAL_GLUE_DATA, write_glue_data

needs_real_data = pytest.mark.skipif(not os.path.isdir(REAL_GLUE_DATA),
                                     reason="../shared/glue_data is not beside this checkout")

REAL_FILES = {
    "CoLA/train.tsv": ("cola", "train"), "CoLA/dev.tsv": ("cola", "validation"),
    "CoLA/test.tsv": ("cola", "test"), "MRPC/train.tsv": ("mrpc", "train"),
    "MRPC/dev.tsv": ("mrpc", "validation"), "MRPC/test.tsv": ("mrpc", "test"),
    "RTE/train.tsv": ("rte", "train"), "RTE/dev.tsv": ("rte", "validation"),
    "RTE/test.tsv": ("rte", "test"), "WNLI/train.tsv": ("wnli", "train"),
    "WNLI/dev.tsv": ("wnli", "validation"), "WNLI/test.tsv": ("wnli", "test"),
    "QNLI/dev.tsv": ("qnli", "validation"), "QNLI/test.tsv": ("qnli", "test"),
    "diagnostic/diagnostic.tsv": ("ax", "test"),
}


def manifest_rows():
    with open(os.path.join(REAL_GLUE_DATA, "MANIFEST.tsv"), encoding="utf-8") as file:
        rows = {}
        for line in file:
            fields = line.rstrip("\n").split("\t")
            if len(fields) > 3 and fields[3] == "MATCH":
                rows[fields[0]] = int(fields[1])
        return rows


def as_rows(examples):
    """A dataset of tfds-style examples as a list of plain Python dicts."""
    return [{key: value.decode() if isinstance(value, bytes) else value.item()
             for key, value in example.items()} for example in examples.as_numpy_iterator()]


@needs_real_data
@pytest.mark.parametrize("file", sorted(REAL_FILES))
def test_real_files_have_the_official_row_counts(file):
    expected = manifest_rows()[file]
    dataset, split = REAL_FILES[file]
    task = glue.TASKS[dataset]
    rows = as_rows(glue.read_local_split(REAL_GLUE_DATA, dataset, split))
    assert len(rows) == expected
    assert sorted(row["idx"] for row in rows) == list(range(expected))
    for row in rows:
        assert all(row[name].strip() for name in task.text_features)
    labels = {row["label"] for row in rows}
    if split == "test":
        assert labels == {-1}
    else:
        assert labels == set(range(len(task.label_names)))


@needs_real_data
def test_real_file_traps_are_handled():
    mrpc = as_rows(glue.read_local_split(REAL_GLUE_DATA, "mrpc", "train"))
    assert mrpc[0]["label"] == 1  # read through the byte-order mark before `Quality`
    assert mrpc[0]["sentence1"].startswith("Amrozi accused his brother , whom he called \" the")
    cola = as_rows(glue.read_local_split(REAL_GLUE_DATA, "cola", "train"))
    assert cola[0] == {"sentence": "Our friends won't buy this analysis, let alone the next one "
                                   "we propose.", "label": 1, "idx": 0}  # no header row lost
    rte = as_rows(glue.read_local_split(REAL_GLUE_DATA, "rte", "validation"))
    assert rte[0]["label"] == glue.TASKS["rte"].label_names.index("not_entailment")


# tensorflow-datasets names its splits and folders itself; map them to the standard files.
TFDS_SPLIT_FILES = {"train": "train.tsv", "validation": "dev.tsv", "test": "test.tsv",
                    "validation_matched": "dev_matched.tsv",
                    "validation_mismatched": "dev_mismatched.tsv",
                    "test_matched": "test_matched.tsv", "test_mismatched": "test_mismatched.tsv"}


def tfds_generated_columns(data_dir, dataset, split):
    """Runs tfds' own GLUE example generator over a local file; returns tfds-typed columns."""
    builder = tfds.builder(f"glue/{dataset}")
    config = builder.builder_config
    if dataset == "ax":
        path = os.path.join(data_dir, "diagnostic", "diagnostic.tsv")
    else:
        path = os.path.join(data_dir, config.data_dir, TFDS_SPLIT_FILES[split])
    file_split = {"validation": "dev"}.get(split, split).split("_")[0]
    features = builder.info.features
    rows = [features.encode_example(example)
            for _, example in builder._generate_examples(path, file_split)]
    return {name: np.array([np.asarray(row[name]).item() for row in rows],
                           features[name].np_dtype)
            for name in features}


@contextlib.contextmanager
def tfds_reading_local_files(data_dir, dataset, splits):
    """Mocks tfds so that `glue/<dataset>` yields what tfds' GLUE code makes of local files."""
    columns = {split: tfds_generated_columns(data_dir, dataset, split) for split in splits}

    def as_dataset(builder, split, **kwargs):
        assert builder.builder_config.name == dataset
        return tf.data.Dataset.from_tensor_slices(columns[split])

    # Nothing is downloaded under the mock, so the network check is moot.
    with tfds.testing.mock_data(as_dataset_fn=as_dataset), \
            mock.patch.object(glue, "download_problem", return_value=None):
        yield


def assert_same_examples(data_dir, dataset, split):
    with tfds_reading_local_files(data_dir, dataset, [split]):
        from_tfds = glue.load_tfds_split(dataset, split)
    local = glue.read_local_split(data_dir, dataset, split)
    assert from_tfds.element_spec == local.element_spec
    assert as_rows(local) == as_rows(from_tfds)


@needs_real_data
@pytest.mark.parametrize("dataset, split", [
    ("cola", "train"), ("cola", "validation"), ("cola", "test"), ("rte", "validation"),
    ("rte", "test"), ("wnli", "train"), ("qnli", "validation"), ("ax", "test")])
def test_local_reader_yields_what_tfds_yields_on_real_files(dataset, split):
    assert_same_examples(REAL_GLUE_DATA, dataset, split)


@pytest.fixture(scope="module")
def ordered_glue_data(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("ordered_glue_data"))
    write_glue_data(root, shuffle_test=False)
    return root


@pytest.mark.parametrize("dataset, split", [
    ("sst2", "train"), ("sst2", "test"), ("stsb", "validation"), ("stsb", "test"),
    ("qqp", "validation"), ("qqp", "test"), ("mnli", "train"), ("mnli", "validation_matched"),
    ("mnli", "validation_mismatched"), ("mnli", "test_matched"), ("mnli", "test_mismatched")])
def test_local_reader_yields_what_tfds_yields_on_layouts_not_shipped(ordered_glue_data, dataset,
                                                                     split):
    assert_same_examples(ordered_glue_data, dataset, split)


def test_tfds_path_end_to_end(ordered_glue_data, tiny_preset, tmp_path, run_glue):
    with tfds_reading_local_files(ordered_glue_data, "rte", ["train", "validation", "test"]):
        run_glue("--task_name=rte", f"--preset={tiny_preset}", "--epochs=1", "--batch_size=4",
                 "--max_sequence_length=32", f"--submission_directory={tmp_path}")
    lines = (tmp_path / "RTE.tsv").read_text().splitlines()
    assert lines[0] == "index\tprediction"
    assert [line.split("\t")[0] for line in lines[1:]] == [str(i) for i in range(8)]


def test_no_network_fails_fast_with_a_data_dir_hint(tiny_preset, run_glue, monkeypatch,
                                                    tmp_path):
    def unreachable(*args, **kwargs):
        raise OSError("network is unreachable")
    monkeypatch.setattr(glue.socket, "create_connection", unreachable)
    # Nothing prepared there. tensorflow-datasets read TFDS_DATA_DIR when it was imported, so
    # setting the variable now would change nothing: its default folder is this constant.
    monkeypatch.setattr(tfds.core.constants, "DATA_DIR", str(tmp_path))
    with pytest.raises(SystemExit) as exit_info:
        run_glue("--task_name=rte", f"--preset={tiny_preset}")
    message = str(exit_info.value.code)
    assert "cannot download glue/rte" in message and "--data_dir" in message
    assert "\n" not in message


def test_label_names_are_tfds_own_in_its_order():
    # A label id means the same class whichever source it came from: tfds' GLUE builders fix
    # the order (their info needs no download). STS-B is a regression: no names.
    for name, task in glue.TASKS.items():
        feature = tfds.builder(task.tfds_name).info.features["label"]
        assert list(task.label_names) == list(getattr(feature, "names", [])), name


def test_quotes_inside_sentences_survive(glue_data):
    data_dir, _ = glue_data
    with open(os.path.join(data_dir, "SST-2", "train.tsv"), encoding="utf-8") as file:
        expected = [row[0] for row in csv.reader(file, delimiter="\t",
                                                 quoting=csv.QUOTE_NONE)][1:]
    rows = as_rows(glue.read_local_split(data_dir, "sst2", "train"))
    assert [row["sentence"] for row in rows] == expected
    assert any('"' in sentence for sentence in expected)
