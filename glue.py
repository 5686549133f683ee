"""Finetune a pretrained text encoder on a GLUE task and write its leaderboard file.

    python glue.py --task_name=mrpc --submission_directory=glue_submissions

The script loads the task (through tensorflow-datasets, or from a local `glue_data/` folder with
`--data_dir`), finetunes the model made in the custom code blocks, reports the official GLUE dev
metrics, and writes the test predictions as the `.tsv` file the GLUE server expects. The three
places meant to be edited sit between `### Custom code block starts ###` and
`### Custom code block ends ###`.
"""

import csv
import dataclasses
import json
import math
import os
import socket
import sys
import time
import urllib.parse
import uuid

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

from absl import app, flags, logging  # noqa: E402
import keras  # noqa: E402
import keras_hub  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import scipy.stats  # noqa: E402
import sklearn.metrics  # noqa: E402
import tensorflow as tf  # noqa: E402
import tensorflow_datasets as tfds  # noqa: E402

# ================================================================================================
# Flags
# ================================================================================================

FLAGS = flags.FLAGS

flags.DEFINE_enum(
    "task_name", "mrpc",
    ["cola", "sst2", "mrpc", "stsb", "qqp", "mnli", "mnli_matched", "mnli_mismatched", "qnli",
     "rte", "wnli", "ax"],
    "The GLUE task to finetune on. `mnli` also predicts the AX diagnostic.")
flags.DEFINE_integer("batch_size", 32, "Training and prediction batch size.", lower_bound=1)
flags.DEFINE_integer("epochs", 2, "Number of finetuning epochs.", lower_bound=1)
flags.DEFINE_float("learning_rate", 5e-5, "Peak learning rate of AdamW.", lower_bound=0.0)
flags.DEFINE_float("warmup_ratio", 0.1,
                   "Fraction of training steps spent warming the learning rate up from 0; "
                   "it then decays linearly to 0.", lower_bound=0.0, upper_bound=1.0)
flags.DEFINE_float("weight_decay", 0.01, "AdamW weight decay (not applied to biases and "
                   "layer-norm weights).", lower_bound=0.0)
flags.DEFINE_integer("max_sequence_length", 128,
                     "Longest tokenized input; longer pairs are truncated.", lower_bound=1)
flags.DEFINE_integer("seed", 42, "Random seed for weights, dropout and data order.")
flags.DEFINE_string("preset", "bert_tiny_en_uncased",
                    "KerasHub preset id, local KerasHub preset directory, or local Hugging "
                    "Face-format model folder.")
flags.DEFINE_string("data_dir", None,
                    "Local folder in the standard glue_data/ layout (CoLA/, MRPC/, ...). "
                    "Default: load GLUE through tensorflow-datasets.")
flags.DEFINE_string("submission_directory", None,
                    "Folder for the task's leaderboard .tsv file(s). Default: write none.")
flags.DEFINE_string("results_path", None,
                    "JSON file that collects dev metrics across runs. Default: "
                    "<submission_directory>/glue_results.json when a submission directory is set.")
flags.DEFINE_bool("use_default_classifier", True,
                  "Wrap the pretrained model in GlueClassifier; false uses the model built in "
                  "the third custom code block.")
flags.DEFINE_string("finetuning_model_save_path", None,
                    "Save the finetuned model to this `.keras` file.")
flags.DEFINE_string("finetuning_model_load_path", None,
                    "Skip finetuning: load this finetuned `.keras` model, then evaluate and "
                    "predict. The preprocessing still comes from --preset.")


class GlueError(Exception):
    """Bad input that deserves one clear line, not a traceback."""


# ================================================================================================
# Task table: everything that differs between GLUE tasks lives here.
# ================================================================================================


@dataclasses.dataclass(frozen=True)
class LocalFiles:
    """Where a GLUE dataset sits in the standard `glue_data/` folder, and its columns."""

    folder: str
    columns: tuple[str, ...]  # the file column holding each text feature, in order
    label_column: str = "label"
    index_column: str = "index"  # test files number their rows in this column
    files: tuple[tuple[str, str], ...] = (
        ("train", "train.tsv"), ("validation", "dev.tsv"), ("test", "test.tsv"))
    headerless_columns: tuple[str, ...] = ()  # names for train/dev files without a header row


@dataclasses.dataclass(frozen=True)
class GlueTask:
    name: str
    text_features: tuple[str, ...]  # tfds feature names, in model input order
    label_names: tuple[str, ...]  # tfds label order; empty for regression (STS-B)
    submission_labels: tuple[str, ...]  # how each class id is spelled in the .tsv
    metrics: tuple[str, ...]
    eval_splits: tuple[str, ...]  # dev splits of `train_dataset`
    outputs: tuple[tuple[str, str, str], ...]  # (dataset, test split, submission file)
    local: LocalFiles
    train_dataset: str = ""  # the GLUE dataset that finetunes the model; default: `name`

    @property
    def tfds_name(self):
        return f"glue/{self.name}"

    @property
    def is_regression(self):
        return not self.label_names

    @property
    def num_outputs(self):
        return 1 if self.is_regression else len(self.label_names)

    @property
    def training_data(self):
        return self.train_dataset or self.name


BINARY = ("0", "1")
ENTAILMENT_2 = ("entailment", "not_entailment")
ENTAILMENT_3 = ("entailment", "neutral", "contradiction")
SENTENCE_PAIR = ("sentence1", "sentence2")

_MNLI = GlueTask(
    name="mnli", text_features=("premise", "hypothesis"), label_names=ENTAILMENT_3,
    submission_labels=ENTAILMENT_3, metrics=("accuracy",),
    eval_splits=("validation_matched", "validation_mismatched"),
    outputs=(("mnli", "test_matched", "MNLI-m.tsv"), ("mnli", "test_mismatched", "MNLI-mm.tsv"),
             ("ax", "test", "AX.tsv")),
    local=LocalFiles("MNLI", SENTENCE_PAIR, label_column="gold_label", files=(
        ("train", "train.tsv"),
        ("validation_matched", "dev_matched.tsv"), ("validation_mismatched", "dev_mismatched.tsv"),
        ("test_matched", "test_matched.tsv"), ("test_mismatched", "test_mismatched.tsv"))),
)

TASKS = {task.name: task for task in (
    GlueTask(
        name="cola", text_features=("sentence",), label_names=("unacceptable", "acceptable"),
        submission_labels=BINARY, metrics=("matthews_corrcoef",), eval_splits=("validation",),
        outputs=(("cola", "test", "CoLA.tsv"),),
        local=LocalFiles("CoLA", ("sentence",),
                         headerless_columns=("source", "label", "original_label", "sentence"))),
    GlueTask(
        name="sst2", text_features=("sentence",), label_names=("negative", "positive"),
        submission_labels=BINARY, metrics=("accuracy",), eval_splits=("validation",),
        outputs=(("sst2", "test", "SST-2.tsv"),), local=LocalFiles("SST-2", ("sentence",))),
    GlueTask(
        name="mrpc", text_features=SENTENCE_PAIR, label_names=("not_equivalent", "equivalent"),
        submission_labels=BINARY, metrics=("f1", "accuracy"), eval_splits=("validation",),
        outputs=(("mrpc", "test", "MRPC.tsv"),),
        local=LocalFiles("MRPC", ("#1 String", "#2 String"), label_column="Quality")),
    GlueTask(
        name="stsb", text_features=SENTENCE_PAIR, label_names=(), submission_labels=(),
        metrics=("pearson", "spearmanr"), eval_splits=("validation",),
        outputs=(("stsb", "test", "STS-B.tsv"),),
        local=LocalFiles("STS-B", SENTENCE_PAIR, label_column="score")),
    GlueTask(
        name="qqp", text_features=("question1", "question2"),
        label_names=("not_duplicate", "duplicate"), submission_labels=BINARY,
        metrics=("f1", "accuracy"), eval_splits=("validation",),
        outputs=(("qqp", "test", "QQP.tsv"),),
        local=LocalFiles("QQP", ("question1", "question2"), label_column="is_duplicate",
                         index_column="id")),
    _MNLI,
    dataclasses.replace(
        _MNLI, name="mnli_matched", train_dataset="mnli", eval_splits=("validation_matched",),
        outputs=(("mnli", "test_matched", "MNLI-m.tsv"),)),
    dataclasses.replace(
        _MNLI, name="mnli_mismatched", train_dataset="mnli",
        eval_splits=("validation_mismatched",),
        outputs=(("mnli", "test_mismatched", "MNLI-mm.tsv"),)),
    GlueTask(
        name="qnli", text_features=("question", "sentence"), label_names=ENTAILMENT_2,
        submission_labels=ENTAILMENT_2, metrics=("accuracy",), eval_splits=("validation",),
        outputs=(("qnli", "test", "QNLI.tsv"),),
        local=LocalFiles("QNLI", ("question", "sentence"))),
    GlueTask(
        name="rte", text_features=SENTENCE_PAIR, label_names=ENTAILMENT_2,
        submission_labels=ENTAILMENT_2, metrics=("accuracy",), eval_splits=("validation",),
        outputs=(("rte", "test", "RTE.tsv"),), local=LocalFiles("RTE", SENTENCE_PAIR)),
    GlueTask(
        name="wnli", text_features=SENTENCE_PAIR, label_names=("not_entailment", "entailment"),
        submission_labels=BINARY, metrics=("accuracy",), eval_splits=("validation",),
        outputs=(("wnli", "test", "WNLI.tsv"),), local=LocalFiles("WNLI", SENTENCE_PAIR)),
    # AX is MNLI's diagnostic: it has only a test split, predicted by a model finetuned on MNLI.
    dataclasses.replace(
        _MNLI, name="ax", train_dataset="mnli", eval_splits=(),
        outputs=(("ax", "test", "AX.tsv"),),
        local=LocalFiles("diagnostic", SENTENCE_PAIR, files=(("test", "diagnostic.tsv"),))),
)}

# The official GLUE dev metrics, computed from (labels, predictions).
METRICS = {
    "accuracy": sklearn.metrics.accuracy_score,
    "f1": sklearn.metrics.f1_score,
    "matthews_corrcoef": sklearn.metrics.matthews_corrcoef,
    "pearson": lambda labels, predictions: scipy.stats.pearsonr(labels, predictions)[0],
    "spearmanr": lambda labels, predictions: scipy.stats.spearmanr(labels, predictions)[0],
}

# ================================================================================================
# Data loading. Both sources yield tfds-style examples: the task's text features as strings,
# `label` (class id, float score for STS-B, -1 on test splits) and `idx`.
# ================================================================================================


def read_local_split(data_dir, dataset, split):
    """Reads one split of a GLUE dataset from the standard `glue_data/` layout."""
    task = TASKS[dataset]
    files = dict(task.local.files)
    if split not in files:
        raise GlueError(f"{dataset} has no {split!r} split in the glue_data layout")
    path = os.path.join(data_dir, task.local.folder, files[split])
    if not os.path.isfile(path):
        raise GlueError(f"--data_dir: expected the {dataset} {split} file at {path}; "
                        "point --data_dir at a folder in the standard glue_data/ layout")
    is_test = split.startswith("test")
    headerless_columns = () if is_test else task.local.headerless_columns
    table = read_tsv(path, headerless_columns)
    first_line = 1 if headerless_columns else 2
    key_column = task.local.index_column if is_test else task.local.label_column
    for column in task.local.columns + (key_column,):
        if column not in table.columns:
            raise GlueError(f"{path}: malformed TSV: no column {column!r} "
                            f"(columns: {', '.join(map(str, table.columns))})")

    def parse(convert, what):
        values = []
        for line, text in enumerate(table[key_column], start=first_line):
            try:
                values.append(convert(text))
            except ValueError:
                raise GlueError(f"{path}, line {line}: malformed TSV: {what} {text!r}") from None
        return values

    if is_test:  # the leaderboard keys rows by the file's index column
        idx, labels = parse(int, "bad index"), [-1] * len(table)
    else:  # tfds numbers train and dev rows in file order
        idx, labels = range(len(table)), parse(lambda text: parse_label(task, text), "bad label")
    columns = {feature: table[column].to_numpy(dtype=object)
               for feature, column in zip(task.text_features, task.local.columns)}
    columns["label"] = np.array(labels, np.float32 if task.is_regression else np.int64)
    columns["idx"] = np.array(idx, np.int32)
    return tf.data.Dataset.from_tensor_slices(columns)


def read_tsv(path, headerless_columns=()):
    """A GLUE TSV file as a table of strings; `headerless_columns` names a header-less file's."""
    check_field_counts(path, len(headerless_columns) or None)
    try:
        # QUOTE_NONE: GLUE sentences contain bare quote characters. utf-8-sig drops MRPC's BOM.
        return pd.read_csv(
            path, sep="\t", quoting=csv.QUOTE_NONE, dtype=str, keep_default_na=False,
            encoding="utf-8-sig", header=None if headerless_columns else "infer",
            names=list(headerless_columns) or None)
    except (pd.errors.ParserError, UnicodeDecodeError) as error:
        raise GlueError(f"{path}: malformed TSV: {str(error).strip()}") from None
    except pd.errors.EmptyDataError:
        raise GlueError(f"{path}: the file is empty") from None


def check_field_counts(path, expected=None):
    """Every line has as many fields as the first (or `expected`); pandas would pad short ones."""
    with open(path, encoding="utf-8-sig", errors="replace") as file:
        for number, line in enumerate(file, start=1):
            if not line.strip():
                continue
            fields = line.count("\t") + 1
            expected = expected or fields
            if fields != expected:
                raise GlueError(f"{path}, line {number}: malformed TSV: {fields} tab-separated "
                                f"fields, expected {expected}")


def parse_label(task, text):
    """A label as tfds stores it: the float score, or the class id (names or digits in files)."""
    if task.is_regression:
        return float(text)
    if text in task.label_names:
        return task.label_names.index(text)
    label = int(text)
    if not 0 <= label < len(task.label_names):
        raise ValueError(text)
    return label


def check_download_possible(builder):
    """Fails fast when GLUE cannot be downloaded: tfds would retry for minutes first."""
    url = builder.builder_config.data_url or "https://dl.fbaipublicfiles.com"
    host = urllib.parse.urlparse(url).hostname
    try:
        socket.create_connection((host, 443), timeout=5).close()
    except OSError:
        raise GlueError(f"cannot download {builder.name}/{builder.builder_config.name} "
                        f"({host} is unreachable); pass --data_dir=<folder in the glue_data/ "
                        "layout> to read local GLUE files instead") from None


def load_tfds_split(dataset, split):
    builder = tfds.builder(TASKS[dataset].tfds_name)
    if not builder.is_prepared():
        check_download_possible(builder)
        builder.download_and_prepare()
    return builder.as_dataset(split=split)


def load_split(data_dir, dataset, split):
    if data_dir:
        examples = read_local_split(data_dir, dataset, split)
    else:
        examples = load_tfds_split(dataset, split)
    if count(examples) == 0:
        raise GlueError(f"the {dataset} {split} split is empty")
    return examples


def count(examples):
    known = int(examples.cardinality())
    return known if known >= 0 else int(examples.reduce(0, lambda total, _: total + 1))


def features_and_label(task):
    """Maps a tfds-style example to `((text, ...), label)`, the input of `preprocess_fn`."""
    return lambda example: (tuple(example[name] for name in task.text_features), example["label"])


# ================================================================================================
# Custom code blocks. Edit these three to finetune your own model. They may read FLAGS.
# ================================================================================================


def from_preset(cls, preset, **kwargs):
    """`cls.from_preset`, with one clear line when the preset cannot be had."""
    try:
        return cls.from_preset(preset, **kwargs)
    except Exception as error:  # KerasHub raises many types: unknown id, no network, bad files.
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise GlueError(f"cannot load preset {preset!r} ({reason[:200]}); download it where "
                        "you have network and pass --preset=<local dir>") from None


### Custom code block starts ###
# (1) Preprocessing: `preprocess_fn(feature, label)` turns a batch of examples into model inputs.
# `feature` is a tuple of one or two string tensors (the task's sentences); `label` is passed on.
def make_preprocess_fn():
    preprocessor = from_preset(
        keras_hub.models.TextClassifierPreprocessor, FLAGS.preset,
        sequence_length=FLAGS.max_sequence_length)

    def preprocess_fn(feature, label):
        # `x=` matters: a positional tuple would be read as (x, y).
        return preprocessor(x=feature), label

    return preprocess_fn
### Custom code block ends ###


### Custom code block starts ###
# (2) Load the pretrained model.
def load_pretrained_model():
    return from_preset(keras_hub.models.Backbone, FLAGS.preset)
### Custom code block ends ###


### Custom code block starts ###
# (3) Make the finetuning model: inputs as produced by `preprocess_fn`, outputs `num_outputs`
# logits per example (one score for STS-B regression).
def make_finetuning_model(pretrained_model, num_outputs):
    inputs = pretrained_model.input
    if FLAGS.use_default_classifier:
        # GlueClassifier wants one vector per example: BERT's pooled output.
        pooled = pretrained_model(inputs)["pooled_output"]
        wrapper = keras.Model(inputs=inputs, outputs=pooled)
        return GlueClassifier(backbone=wrapper, num_classes=num_outputs)
    # Your own classifier; this example reads the first ([CLS]) token of the last layer.
    first_token = pretrained_model(inputs)["sequence_output"][:, 0, :]
    logits = keras.layers.Dense(num_outputs, dtype="float32")(first_token)
    return keras.Model(inputs=inputs, outputs=logits)
### Custom code block ends ###

# ================================================================================================
# Model
# ================================================================================================


def GlueClassifier(backbone, num_classes, dropout=0.1):  # noqa: N802 (named as a Keras model)
    """The default finetuning head: dropout and a dense layer over one vector per example.

    `backbone` maps the model inputs to a `(batch, hidden)` tensor. The logits are float32 even
    under mixed precision, so the loss stays numerically stable.
    """
    inputs = backbone.input
    hidden = keras.layers.Dropout(dropout)(backbone(inputs))
    logits = keras.layers.Dense(
        num_classes, kernel_initializer=keras.initializers.TruncatedNormal(stddev=0.02),
        dtype="float32", name="logits")(hidden)
    return keras.Model(inputs=inputs, outputs=logits, name="glue_classifier")


@keras.saving.register_keras_serializable(package="glue")
class WarmupLinearDecay(keras.optimizers.schedules.LearningRateSchedule):
    """BERT's schedule: linear warmup from 0 to the peak, then linear decay to 0."""

    def __init__(self, peak_learning_rate, warmup_steps, total_steps):
        self.peak_learning_rate = peak_learning_rate
        self.warmup_steps = warmup_steps
        self.total_steps = total_steps

    def __call__(self, step):
        step = keras.ops.cast(step, "float32")
        warmup = step / max(self.warmup_steps, 1)
        decay = (self.total_steps - step) / max(self.total_steps - self.warmup_steps, 1)
        return self.peak_learning_rate * keras.ops.maximum(keras.ops.minimum(warmup, decay), 0.0)

    def get_config(self):
        return {"peak_learning_rate": self.peak_learning_rate,
                "warmup_steps": self.warmup_steps, "total_steps": self.total_steps}


def make_optimizer(learning_rate, total_steps, warmup_ratio, weight_decay):
    schedule = WarmupLinearDecay(learning_rate, int(total_steps * warmup_ratio), total_steps)
    optimizer = keras.optimizers.AdamW(learning_rate=schedule, weight_decay=weight_decay)
    optimizer.exclude_from_weight_decay(var_names=["bias", "gamma", "beta"])
    return optimizer


def compile_for(model, task, optimizer):
    if task.is_regression:
        loss = keras.losses.MeanSquaredError()
    else:
        loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    model.compile(optimizer=optimizer, loss=loss)


# ================================================================================================
# Train, evaluate, predict
# ================================================================================================


def tokenize(examples, task, preprocess_fn):
    """Tokenizes a split once, in large batches; yields unbatched `(inputs, label)` pairs."""
    return (examples.map(features_and_label(task))
            .batch(1024)
            .map(preprocess_fn, num_parallel_calls=tf.data.AUTOTUNE)
            .unbatch())


def train(model, examples, task, preprocess_fn, *, batch_size, epochs, learning_rate,
          warmup_ratio, weight_decay, seed):
    """Finetunes `model` in place and returns the number of training examples."""
    num_examples = count(examples)
    batches = (tokenize(examples, task, preprocess_fn)
               .apply(tf.data.experimental.assert_cardinality(num_examples))
               .cache()
               .shuffle(num_examples, seed=seed, reshuffle_each_iteration=True)
               .batch(batch_size)
               .prefetch(tf.data.AUTOTUNE))
    total_steps = epochs * math.ceil(num_examples / batch_size)
    compile_for(model, task,
                make_optimizer(learning_rate, total_steps, warmup_ratio, weight_decay))
    model.fit(batches, epochs=epochs, verbose=2, shuffle=False)  # `batches` is shuffled
    return num_examples


def labels_and_indices(examples):
    """The `label` and `idx` columns of a (non-empty) split, as numpy arrays."""
    columns = examples.map(lambda example: (example["label"], example["idx"])).batch(1 << 16)
    return tuple(np.concatenate(column) for column in zip(*columns.as_numpy_iterator()))


def predict(model, examples, task, preprocess_fn, batch_size):
    """Returns `(idx, labels, predictions)` for a split, in the split's order.

    Predictions are class ids, or STS-B scores clipped to the label range [0, 5].
    """
    labels, idx = labels_and_indices(examples)
    inputs = (examples.map(features_and_label(task))
              .batch(batch_size)
              .map(preprocess_fn, num_parallel_calls=tf.data.AUTOTUNE)
              .map(lambda model_inputs, label: model_inputs)
              .prefetch(tf.data.AUTOTUNE))
    logits = model.predict(inputs, verbose=0)
    if task.is_regression:
        predictions = np.clip(logits.reshape(-1), 0.0, 5.0)
    else:
        predictions = logits.argmax(axis=-1)
    return idx, labels, predictions


def compute_metrics(task, labels, predictions):
    """The task's official GLUE metrics, as fractions; None where undefined (constant input)."""
    values = {name: float(METRICS[name](labels, predictions)) for name in task.metrics}
    return {name: value if math.isfinite(value) else None for name, value in values.items()}


# ================================================================================================
# Submission and results writing. Every file is written to a temporary file beside it, then
# renamed, so an interrupted run never leaves a half-written file behind.
# ================================================================================================


def write_atomically(path, write):
    """Calls `write(temporary_path)`, then renames the temporary file to `path`."""
    folder, name = os.path.split(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    suffix = os.path.splitext(name)[1]  # Keras insists on the `.keras` suffix
    # Same folder, so the rename is atomic; a unique name, so concurrent runs never collide.
    temporary = os.path.join(folder, f".{name}.{uuid.uuid4().hex[:12]}.tmp{suffix}")
    try:
        write(temporary)
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def submission_table(task, idx, predictions):
    """The leaderboard rows: `index<TAB>prediction`, one per test example, ordered by index."""
    if len(np.unique(idx)) != len(idx):
        raise GlueError(f"{task.name}: the test split repeats example indices; check its data")
    if task.is_regression:
        spelled = [f"{score:.3f}" for score in predictions]
    else:
        spelled = [task.submission_labels[label] for label in predictions]
    table = pd.DataFrame({"index": idx, "prediction": spelled})
    return table.sort_values("index", kind="stable")


def write_submission(path, table):
    write_atomically(path, lambda temporary: table.to_csv(temporary, sep="\t", index=False))


def read_results(path):
    """The results JSON written by earlier runs ({} if none)."""
    if not os.path.exists(path):
        return {}
    try:
        with open(path) as file:
            results = json.load(file)
    except (OSError, ValueError) as error:
        raise GlueError(f"{path}: cannot read the results JSON ({error}); fix or move it, or "
                        "pass another --results_path") from None
    if not isinstance(results, dict):
        raise GlueError(f"{path}: the results JSON is not an object keyed by task; fix or move "
                        "it, or pass another --results_path")
    return results


def merge_results(path, task_name, entry):
    """Adds one task's entry to the results JSON, keeping every other task's."""
    results = read_results(path)
    results[task_name] = entry

    def write(temporary):
        with open(temporary, "w") as file:
            json.dump(results, file, indent=2, sort_keys=True)
            file.write("\n")

    write_atomically(path, write)
    return results


def format_results(results):
    """A small table of dev metrics, x100 as papers print them."""
    lines = [f"{'task':<16} {'split':<22} metrics"]
    for task_name, entry in sorted(results.items()):
        for split, metrics in entry.items():
            if split.startswith("validation"):
                shown = "  ".join(
                    f"{name} {'n/a' if value is None else f'{100 * value:.2f}'}"
                    for name, value in metrics.items())
                lines.append(f"{task_name:<16} {split:<22} {shown}")
    return "\n".join(lines)


# ================================================================================================
# Main
# ================================================================================================


def results_path():
    if FLAGS.results_path or not FLAGS.submission_directory:
        return FLAGS.results_path
    return os.path.join(FLAGS.submission_directory, "glue_results.json")


def check_flags():
    """Fails on bad paths before any data is read or any minute spent training."""
    for name in ("finetuning_model_save_path", "finetuning_model_load_path"):
        path = FLAGS[name].value
        if path and not path.endswith(".keras"):
            raise GlueError(f"--{name}={path}: the path must end in `.keras`")
    load_path = FLAGS.finetuning_model_load_path
    if load_path and not os.path.isfile(load_path):
        raise GlueError(f"--finetuning_model_load_path={load_path}: no such file")
    if FLAGS.data_dir and not os.path.isdir(FLAGS.data_dir):
        raise GlueError(f"--data_dir={FLAGS.data_dir}: no such folder")
    if results_path():
        read_results(results_path())


def run_task(task):
    """Finetunes (or loads), evaluates and predicts one task; returns its results entry."""
    keras.utils.set_random_seed(FLAGS.seed)

    def load(dataset, split):
        return load_split(FLAGS.data_dir, dataset, split)

    # Read all data first, so bad data fails before minutes of training.
    train_examples = None if FLAGS.finetuning_model_load_path else load(task.training_data,
                                                                         "train")
    eval_examples = {split: load(task.training_data, split) for split in task.eval_splits}
    test_examples = {file: load(dataset, split) for dataset, split, file in task.outputs}
    preprocess_fn = make_preprocess_fn()

    entry = {"flags": {flag.name: flag.value for flag in
                       FLAGS.get_key_flags_for_module(sys.modules[__name__])}}
    start = time.perf_counter()
    if FLAGS.finetuning_model_load_path:
        model = keras.models.load_model(FLAGS.finetuning_model_load_path, compile=False)
    else:
        model = make_finetuning_model(load_pretrained_model(), task.num_outputs)
        entry["train_examples"] = train(
            model, train_examples, task, preprocess_fn, batch_size=FLAGS.batch_size,
            epochs=FLAGS.epochs, learning_rate=FLAGS.learning_rate,
            warmup_ratio=FLAGS.warmup_ratio, weight_decay=FLAGS.weight_decay, seed=FLAGS.seed)
        if FLAGS.finetuning_model_save_path:
            write_atomically(FLAGS.finetuning_model_save_path, model.save)
    entry["train_seconds"] = round(time.perf_counter() - start, 2)

    start = time.perf_counter()
    for split, examples in eval_examples.items():
        _, labels, predictions = predict(model, examples, task, preprocess_fn, FLAGS.batch_size)
        entry[split] = compute_metrics(task, labels, predictions)
    # Compute every table before writing any, so a failure never leaves a partial submission.
    tables = {}
    for file, examples in test_examples.items():
        idx, _, predictions = predict(model, examples, task, preprocess_fn, FLAGS.batch_size)
        tables[file] = submission_table(task, idx, predictions)
    entry["predict_seconds"] = round(time.perf_counter() - start, 2)

    if FLAGS.submission_directory:
        for file, table in tables.items():
            path = os.path.join(FLAGS.submission_directory, file)
            write_submission(path, table)
            logging.info("Wrote %d predictions to %s", len(table), path)
    return entry


def main(argv):
    del argv
    try:
        check_flags()
        task = TASKS[FLAGS.task_name]
        entry = run_task(task)
        if results_path():
            merge_results(results_path(), task.name, entry)
        print(format_results({task.name: entry}))
    except GlueError as error:
        sys.exit(f"glue.py: error: {error}")


if __name__ == "__main__":
    app.run(main)
