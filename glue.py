"""Finetune a pretrained text encoder on a GLUE task and write its leaderboard file.

    python glue.py --task_name=mrpc --submission_directory=glue_submissions

The script loads the task (through tensorflow-datasets, or from a local `glue_data/` folder with
`--data_dir`), finetunes the model made in the custom code blocks, reports the official GLUE dev
metrics, and writes the test predictions as the `.tsv` file the GLUE server expects. The three
places meant to be edited sit between `### Custom code block starts ###` and
`### Custom code block ends ###`.

The file tells two stories. Above the line "Nothing below needs editing", one run: the flags,
the custom code blocks, the task table, loading and tokenizing, the optimizer and the loss,
finetuning, prediction, the run's record and `main`. Below it, the command, each part before
the helpers it calls: the sweep plans its runs from the records already made and starts each as
a `glue.py` process with the run's flags, here or as a Slurm job; then its checks, recipes,
fingerprints, devices, checkpoints, progress lines and a run's tokenizing; then what it makes
from the records: results, submission files, the report, a comparison; last, what all share.
"""

import ast
import atexit
import collections
import concurrent.futures
import contextlib
import csv
import ctypes
import dataclasses
import functools
import glob
import hashlib
import importlib
import importlib.metadata
import importlib.util
import json
import math
import modulefinder
import operator
import os
import pathlib
import platform
import re
import shlex
import shutil
import signal
import site
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import types
import urllib.parse
import uuid
import warnings
import zipfile

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
# TensorFlow's informational start-up lines are noise here; its warnings and errors stay.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")

from absl import app, flags, logging  # noqa: E402
import filelock  # noqa: E402
import numpy as np  # noqa: E402


class Later(types.ModuleType):
    """A module imported at its first use. Only a run's process uses TensorFlow, Keras, KerasHub
    and tensorflow-datasets (about 5 s and 1 GB): the command that plans, starts and publishes
    runs never loads them, and loads pandas, scipy and scikit-learn only to read or score."""

    def __getattr__(self, name):
        module = importlib.import_module(self.__name__)
        return getattr(module, name) if hasattr(module, name) else \
            importlib.import_module(f"{self.__name__}.{name}")  # a submodule: scipy.stats


keras, keras_hub, pd, scipy, sklearn, tf, tfds = map(Later, (
    "keras", "keras_hub", "pandas", "scipy", "sklearn", "tensorflow", "tensorflow_datasets"))


def keras_subclass(base):
    """Class decorator: instances are of a subclass of the class and of Keras' `base`, made at the
    first one, so that reading this file imports no Keras; methods are found through the class."""
    def decorate(cls):
        with_base = functools.cache(lambda: type(
            cls.__name__, (cls, operator.attrgetter(base)(keras)), {}))
        cls.__new__ = staticmethod(lambda _, *args, **kwargs: object.__new__(with_base()))
        return cls
    return decorate


# ================================================================================================
# Flags, grouped as --help shows them, each with its roles

FLAGS = flags.FLAGS
FLAG_ROLES, HELP_GROUPS = {}, {}  # filled by `define`: absl alone would sort --help by name


def define(kind, name, default, help_text, roles="", **options):
    """Defines --`name` with absl's `DEFINE_<kind>` (`options`: bounds, enum values) in the --help
    group last opened, with its roles, among: `command` (only the command reads it; every other
    flag, a researcher's own too, goes to each run and its fingerprint), `uncounted` (left out of
    the fingerprint, which counts what it stands for: the place in a sweep, the contents of
    files, the devices), `folder` and `file` (counted by the contents of what it names), `writes`
    and `writes_file` (written into), `recipe` (a recipe may set it). A block's flag needs none."""
    getattr(flags, f"DEFINE_{kind}")(name, default, help=help_text, **options)
    HELP_GROUPS[next(reversed(HELP_GROUPS))].append(name)
    FLAG_ROLES[name] = roles.split()


HELP_GROUPS["Task and data"] = []
define("list", "task_name", ["mrpc"],
       "GLUE task(s), comma-separated: cola, sst2, mrpc, stsb, qqp, mnli (also predicts AX), "
       "mnli_matched, mnli_mismatched, qnli, rte, wnli, ax; `all` for every task, `none` for none "
       "(to choose again from the recorded runs, zip or validate).", roles="uncounted")
define("string", "data_dir", None,
       "Local folder in the standard glue_data/ layout (CoLA/, MRPC/, ...). Default: load GLUE "
       "through tensorflow-datasets.", roles="uncounted")
define("integer", "max_sequence_length", 128,
       "Longest tokenized input; longer pairs are truncated.", lower_bound=1, roles="recipe")
define("integer", "limit", None,
       "A quick check of an edit: train on the first N training rows, evaluate on the first N rows "
       "of each dev split. Recorded apart from full runs; writes no leaderboard file.",
       lower_bound=1)

HELP_GROUPS["Model"] = []
define("string", "preset", "bert_tiny_en_uncased",
       "KerasHub preset id, local KerasHub preset directory, or local Hugging Face-format model "
       "folder.", roles="folder")
define("enum", "pooling", None,
       "How GlueClassifier gets one vector per example: the backbone's pooled output, the first "
       "token's vector, or the mean over real tokens. Default: pooled where the backbone has a "
       "pooler (BERT, ALBERT, ELECTRA), else cls.", enum_values=["pooled", "cls", "mean"])
define("bool", "use_default_classifier", True,
       "Wrap the pretrained model in GlueClassifier; false uses the model built in the third "
       "custom code block.")
define("string", "init_from_finetuned", None,
       "Start from the encoder of a model finetuned on another task (a `.keras` file from "
       "--finetuning_model_save_path, typically MNLI), with a new head.", roles="file")
define("string", "finetuning_model_load_path", None,
       "Skip finetuning: load this finetuned `.keras` model, then evaluate and predict. The "
       "preprocessing still comes from --preset.", roles="file")

HELP_GROUPS["Training"] = []
define("string", "recipe", None,
       "Per-task settings of a paper's protocol: bert, roberta or modernbert (the RECIPES table in "
       "glue.py), or the path of a JSON file of the same form. Flags given on the command line win "
       "over it.", roles="uncounted")
define("integer", "epochs", 2, "Number of finetuning epochs.", lower_bound=1, roles="recipe")
define("integer", "batch_size", 32,
       "Training and prediction batch size.", lower_bound=1, roles="recipe")
define("list", "learning_rate", ["5e-5"],
       "Peak learning rate of AdamW. A comma list (2e-5,3e-5,5e-5) finetunes once per value and "
       "keeps the best on the dev set.", roles="uncounted recipe")
define("list", "seed", ["42"],
       "Random seed for weights, dropout and data order. A comma list (1,2,3,4,5) finetunes once "
       "per seed and learning rate; results give the median and spread over seeds, and the "
       "learning rate is chosen by its median.", roles="uncounted recipe")
define("float", "warmup_ratio", 0.1,
       "Fraction of training steps spent warming the learning rate up from 0; it then decays "
       "linearly to 0.", lower_bound=0.0, upper_bound=1.0, roles="recipe")
define("float", "weight_decay", 0.01,
       "AdamW weight decay (not applied to biases and layer-norm weights).",
       lower_bound=0.0, roles="recipe")
define("float", "clip_norm", 1.0,
       "Clip the gradients' global norm to this (0: no clipping), as BERT and the Hugging Face "
       "Trainer do.", lower_bound=0.0, roles="recipe")
define("integer", "evaluations_per_epoch", 1,
       "Evaluate on dev this many times an epoch (always at its end); every evaluation is "
       "recorded.", lower_bound=1, roles="recipe")
define("bool", "select_best_epoch", True,
       "Report dev metrics and predict test with the weights of the best dev evaluation; false: "
       "with the last weights.", roles="recipe")
define("integer", "max_restarts", 0,
       "Train a collapsed run (every dev prediction the same) again, up to this many times, with "
       "seed + 1000 * k.", lower_bound=0, roles="command recipe")
define("integer", "gradient_accumulation_steps", 1,
       "Update the weights every N batches, with their mean gradient: an effective batch of "
       "--batch_size x N in the memory of one batch.", lower_bound=1, roles="recipe")
define("enum", "mixed_precision", None,
       "Compute in 16-bit floats with float32 weights (GPUs: mixed_float16 or mixed_bfloat16; "
       "TPUs: mixed_bfloat16). Logits and loss stay float32.",
       enum_values=["mixed_bfloat16", "mixed_float16"])
define("bool", "jit_compile", False, "Compile training and prediction with XLA (GPUs, TPUs).")

HELP_GROUPS["Output"] = []
define("string", "submission_directory", None, "Folder for the task's leaderboard .tsv file(s). "
       "Default: write none.", roles="uncounted writes")
define("string", "results_path", None,
       "JSON file that collects dev metrics across runs. Default: "
       "<submission_directory>/glue_results.json when a submission directory is set.",
       roles="command writes_file")
define("string", "finetuning_model_save_path", None,
       "Save the finetuned model to this `.keras` file; `{task}` in it becomes the task's name, a "
       "file per task, which several tasks need.", roles="command writes_file")
define("bool", "report", True,
       "Write glue_report.md, with its figures in glue_report/, in the submission folder whenever "
       "the results change; --noreport writes none.", roles="command")
define("string", "compare_with", None,
       "Another submission folder: each task both have, the difference of scores with a 95% "
       "bootstrap interval over seeds and dev examples.", roles="command")
define("bool", "tensorboard", True,
       "Write TensorBoard logs of every run (training loss, learning rate and speed; every dev "
       "evaluation), when there is a folder for them; --notensorboard writes none.",
       roles="command")
define("string", "tensorboard_dir", None,
       "Folder of the TensorBoard logs, one folder per run (<task>/<settings "
       "id>/lr<rate>_seed<seed>/train and /validation). Default: "
       "<submission_directory>/tensorboard.", roles="command writes")
define("bool", "overwrite", False,
       "Train the asked runs again even when they are recorded with these settings, replacing only "
       "their records (other runs' stay; start afresh in another --submission_directory).",
       roles="command")
define("bool", "make_submission_zip", False,
       "After the tasks, validate the submission directory and write submission.zip with the 11 "
       "leaderboard files.", roles="command")
define("string", "fill_missing_from", None,
       "A sample submission (folder or zip) to copy the files of tasks not run from.",
       roles="command")
define("string", "validate_submission", None,
       "Only check this submission folder or zip as the GLUE server would, and exit.",
       roles="command")

HELP_GROUPS["Scale-out and resuming"] = []
define("integer", "parallel_runs", 1,
       "Run this many runs at once, each a process of its own with its share of the GPUs "
       "(CUDA_VISIBLE_DEVICES), or on CPU of the cores. 1: one run at a time, with every device.",
       lower_bound=1, roles="command")
define("enum", "launcher", "local", "Where runs run: local, as processes here; slurm, each as "
       "a Slurm job through submitit, --parallel_runs at a time, while the command waits.",
       enum_values=["local", "slurm"], roles="command")
define("list", "slurm", [], "Each Slurm job's resources, as key=value: partition, time "
       "(minutes; default 1440), gpus, cpus, mem (GB), account, qos; other keys go to sbatch.",
       roles="command")
define("string", "checkpoint_dir", None,
       "Keep the training state here (a folder per run: task, learning rate, seed and settings) at "
       "each epoch's end and every --checkpoint_every_steps; the same command resumes after a "
       "crash or preemption. Default: none, or <submission_directory>/checkpoints when several "
       "tasks run.", roles="command writes")
define("integer", "checkpoint_every_steps", 0,
       "Also checkpoint every this many training steps (0: only at epoch ends).",
       lower_bound=0, roles="uncounted")
define("string", "distribution_strategy", "auto",
       "How a run spreads over the devices it sees: auto (mirrored when more than one GPU is "
       "visible, else one device), one_device, mirrored (every local GPU, or every CPU device when "
       "there is none), or tpu:<the TPU's name or grpc://host:port> (tpu:local on a TPU VM; plain "
       "tpu finds it from the environment). --batch_size is the global batch, split across "
       "replicas.", roles="uncounted")
define("integer", "tpu_timeout_seconds", 600,
       "With tpu: how long to wait for the TPU to answer at start.",
       lower_bound=1, roles="uncounted")

RUN_FLAGS = "Set by a command for each run it starts"  # a run's process; not for a person
HELP_GROUPS[RUN_FLAGS] = []
define("string", "run_dir", None,
       "The folder this run writes its record into; given, the process is one run of a sweep.")
define("string", "run_label", None, "How the run's progress lines name it.")
define("bool", "keep_model", False, "Save the run's model in its folder.")
define("string", "run_checkpoints", None, "The run's own checkpoint folder.")
define("string", "run_tensorboard", None, "The run's own TensorBoard folder.")


### Custom code block starts ###
# (1) Preprocessing: `preprocess_fn(feature, label)` turns a batch of examples into model inputs.
# `feature` is a tuple of one or two string tensors (the task's sentences); `label` is passed on.
# It must be traceable by `tf.function` (TensorFlow ops, no Python-side loops over rows), and
# give every input of a batch a fixed length per row. glue.py trims the padding of the
# token-aligned inputs (`token_ids`, `segment_ids`, `padding_mask`) and pads each batch again to
# its own length; any other input passes untouched.
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
    if FLAGS.use_default_classifier:
        # GlueClassifier wants a model giving one vector per example.
        encoder = sentence_encoder(pretrained_model, FLAGS.pooling)
        return GlueClassifier(backbone=encoder, num_classes=num_outputs)
    # Your own classifier; this example puts a hidden layer over the mean of the token vectors.
    encoder = sentence_encoder(pretrained_model, "mean")
    hidden = keras.layers.Dense(256, activation="gelu")(encoder.output)
    logits = keras.layers.Dense(num_outputs, dtype="float32")(hidden)
    return keras.Model(inputs=encoder.input, outputs=logits)
### Custom code block ends ###


class GlueError(Exception):
    """Bad input that deserves one clear line, not a traceback."""


def from_preset(cls, preset, **kwargs):
    """`cls.from_preset`, with one clear line when the preset cannot be had or is no text model."""
    try:
        return cls.from_preset(preset, **kwargs)
    except Exception as error:  # KerasHub raises many types: unknown id, no network, bad files.
        raise GlueError(explain_preset_failure(preset, error)) from None


def sentence_encoder(backbone, pooling=None):
    """Wraps a KerasHub text backbone into a model giving one vector per example.

    `pooling`: "pooled" (the backbone's pooler, BERT-style), "cls" (the first token's vector, as
    RoBERTa-style classifiers read it) or "mean" (the average over real tokens, for checkpoints
    whose pooler was never trained). None picks pooled where there is a pooler."""
    if not is_text_backbone(backbone):
        raise GlueError(f"{type(backbone).__name__} is not a KerasHub text backbone (no "
                        "token_ids input); adapt the custom code blocks to your model")
    inputs = backbone.input
    outputs = backbone(inputs)
    has_pooler = isinstance(outputs, dict) and "pooled_output" in outputs
    sequence = outputs["sequence_output"] if isinstance(outputs, dict) else outputs
    pooling = pooling or ("pooled" if has_pooler else "cls")
    if pooling == "pooled" and not has_pooler:
        raise GlueError(f"--pooling=pooled: {type(backbone).__name__} has no pooled output; "
                        "use --pooling=cls or --pooling=mean")
    if pooling == "pooled":
        vector = outputs["pooled_output"]
    elif pooling == "cls":
        vector = sequence[:, 0, :]
    else:  # padding positions must not dilute the mean
        vector = keras.layers.GlobalAveragePooling1D()(sequence, mask=inputs["padding_mask"])
    return keras.Model(inputs=inputs, outputs=vector, name=f"{pooling}_encoder")


def GlueClassifier(backbone, num_classes, dropout=0.1):  # noqa: N802 (named as a Keras model)
    """The default finetuning head: dropout and a dense layer over one vector per example.

    `backbone` maps the model inputs to a `(batch, hidden)` tensor. The logits are float32 even
    under mixed precision, so the loss stays numerically stable."""
    inputs = backbone.input
    hidden = keras.layers.Dropout(dropout)(backbone(inputs))
    logits = keras.layers.Dense(
        num_classes, kernel_initializer=keras.initializers.TruncatedNormal(stddev=0.02),
        dtype="float32", name="logits")(hidden)
    return keras.Model(inputs=inputs, outputs=logits, name="glue_classifier")


def is_text_backbone(backbone):
    return isinstance(backbone.input, dict) and "token_ids" in backbone.input


# ================================================================================================
# Task table: everything that differs between GLUE tasks lives here.


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
class SubmissionFile:
    """One of the 11 leaderboard files: which test split it predicts, and its official size."""

    dataset: str
    split: str
    file: str
    rows: int  # the server rejects a file with any other number of rows


@dataclasses.dataclass(frozen=True)
class GlueTask:
    name: str
    text_features: tuple[str, ...]  # tfds feature names, in model input order
    label_names: tuple[str, ...]  # tfds label order; empty for regression (STS-B)
    submission_labels: tuple[str, ...]  # how each class id is spelled in the .tsv
    metrics: tuple[str, ...]
    eval_splits: tuple[str, ...]  # dev splits of `train_dataset`
    outputs: tuple[SubmissionFile, ...]
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
MNLI_M = SubmissionFile("mnli", "test_matched", "MNLI-m.tsv", 9796)
MNLI_MM = SubmissionFile("mnli", "test_mismatched", "MNLI-mm.tsv", 9847)
AX = SubmissionFile("ax", "test", "AX.tsv", 1104)

_MNLI = GlueTask(
    name="mnli", text_features=("premise", "hypothesis"), label_names=ENTAILMENT_3,
    submission_labels=ENTAILMENT_3, metrics=("accuracy",),
    eval_splits=("validation_matched", "validation_mismatched"),
    outputs=(MNLI_M, MNLI_MM, AX),
    local=LocalFiles("MNLI", SENTENCE_PAIR, label_column="gold_label", files=(
        ("train", "train.tsv"),
        ("validation_matched", "dev_matched.tsv"), ("validation_mismatched", "dev_mismatched.tsv"),
        ("test_matched", "test_matched.tsv"), ("test_mismatched", "test_mismatched.tsv"))),
)

TASKS = {task.name: task for task in (
    GlueTask(
        name="cola", text_features=("sentence",), label_names=("unacceptable", "acceptable"),
        submission_labels=BINARY, metrics=("matthews_corrcoef",), eval_splits=("validation",),
        outputs=(SubmissionFile("cola", "test", "CoLA.tsv", 1063),),
        local=LocalFiles("CoLA", ("sentence",),
                         headerless_columns=("source", "label", "original_label", "sentence"))),
    GlueTask(
        name="sst2", text_features=("sentence",), label_names=("negative", "positive"),
        submission_labels=BINARY, metrics=("accuracy",), eval_splits=("validation",),
        outputs=(SubmissionFile("sst2", "test", "SST-2.tsv", 1821),),
        local=LocalFiles("SST-2", ("sentence",))),
    GlueTask(
        name="mrpc", text_features=SENTENCE_PAIR, label_names=("not_equivalent", "equivalent"),
        submission_labels=BINARY, metrics=("f1", "accuracy"), eval_splits=("validation",),
        outputs=(SubmissionFile("mrpc", "test", "MRPC.tsv", 1725),),
        local=LocalFiles("MRPC", ("#1 String", "#2 String"), label_column="Quality")),
    GlueTask(
        name="stsb", text_features=SENTENCE_PAIR, label_names=(), submission_labels=(),
        metrics=("pearson", "spearmanr"), eval_splits=("validation",),
        outputs=(SubmissionFile("stsb", "test", "STS-B.tsv", 1379),),
        local=LocalFiles("STS-B", SENTENCE_PAIR, label_column="score")),
    GlueTask(
        name="qqp", text_features=("question1", "question2"),
        label_names=("not_duplicate", "duplicate"), submission_labels=BINARY,
        metrics=("f1", "accuracy"), eval_splits=("validation",),
        outputs=(SubmissionFile("qqp", "test", "QQP.tsv", 390965),),
        local=LocalFiles("QQP", ("question1", "question2"), label_column="is_duplicate",
                         index_column="id")),
    _MNLI,
    dataclasses.replace(_MNLI, name="mnli_matched", train_dataset="mnli",
                        eval_splits=("validation_matched",), outputs=(MNLI_M,)),
    dataclasses.replace(_MNLI, name="mnli_mismatched", train_dataset="mnli",
                        eval_splits=("validation_mismatched",), outputs=(MNLI_MM,)),
    GlueTask(
        name="qnli", text_features=("question", "sentence"), label_names=ENTAILMENT_2,
        submission_labels=ENTAILMENT_2, metrics=("accuracy",), eval_splits=("validation",),
        outputs=(SubmissionFile("qnli", "test", "QNLI.tsv", 5463),),
        local=LocalFiles("QNLI", ("question", "sentence"))),
    GlueTask(
        name="rte", text_features=SENTENCE_PAIR, label_names=ENTAILMENT_2,
        submission_labels=ENTAILMENT_2, metrics=("accuracy",), eval_splits=("validation",),
        outputs=(SubmissionFile("rte", "test", "RTE.tsv", 3000),),
        local=LocalFiles("RTE", SENTENCE_PAIR)),
    GlueTask(
        name="wnli", text_features=SENTENCE_PAIR, label_names=("not_entailment", "entailment"),
        submission_labels=BINARY, metrics=("accuracy",), eval_splits=("validation",),
        outputs=(SubmissionFile("wnli", "test", "WNLI.tsv", 146),),
        local=LocalFiles("WNLI", SENTENCE_PAIR)),
    # AX is MNLI's diagnostic: it has only a test split, predicted by a model finetuned on MNLI.
    dataclasses.replace(
        _MNLI, name="ax", train_dataset="mnli", eval_splits=(), outputs=(AX,),
        local=LocalFiles("diagnostic", SENTENCE_PAIR, files=(("test", "diagnostic.tsv"),))),
)}

# `all`: every leaderboard file, smallest tasks first so a broken setup fails within minutes.
# MNLI also writes AX.tsv, so ax needs no run of its own.
ALL_TASKS = ("wnli", "rte", "mrpc", "stsb", "cola", "sst2", "qnli", "qqp", "mnli")

# The official GLUE dev metrics, computed from (labels, predictions).
METRICS = {
    "accuracy": lambda *pair: sklearn.metrics.accuracy_score(*pair),
    "f1": lambda *pair: sklearn.metrics.f1_score(*pair),
    "matthews_corrcoef": lambda *pair: sklearn.metrics.matthews_corrcoef(*pair),
    "pearson": lambda *pair: scipy.stats.pearsonr(*pair)[0],
    "spearmanr": lambda *pair: scipy.stats.spearmanr(*pair)[0],
}


# ================================================================================================
# Scores: a run's, and a task's (the mean of its dev metrics)


def dev_metrics(entry):
    """The `{split: {metric: value}}` part of a task's results entry."""
    return {split: metrics for split, metrics in entry.items() if split.startswith("validation")}


def task_score(splits):
    """One number per task as the leaderboard ranks it: the mean of its dev metrics over its
    dev splits (MNLI: of matched and mismatched accuracy). An undefined metric counts as 0."""
    values = [value or 0.0 for metrics in splits.values() for value in metrics.values()]
    return sum(values) / len(values) if values else None


def run_score(run):
    return task_score(dev_metrics(run)) or 0.0

# ================================================================================================
# Loading. Both sources yield tfds-style examples: the task's text features as strings,
# `label` (class id, float score for STS-B, -1 on test splits) and `idx`.


def load_task_data(task, data_dir, training=True, limit=None):
    """Opens every split the task needs, dev and test first, checking files and labels before
    any training. Returns `(train, {dev split: examples}, {submission file: examples})`; no
    training split without `training`. With `limit`, the first `limit` rows of the training and
    dev splits, and no test split: a part of a test file is no submission."""
    examples = {(dataset, split): load_split(data_dir, dataset, split).take(limit or -1)
                for dataset, split in task_splits(task, training, tests=not limit)}
    eval_examples = {split: examples[task.training_data, split] for split in task.eval_splits}
    test_examples = {output.file: examples[output.dataset, output.split]
                     for output in task.outputs if (output.dataset, output.split) in examples}
    return examples.get((task.training_data, "train")), eval_examples, test_examples


def task_splits(task, training=True, tests=True):
    """The `(dataset, split)` pairs a task reads: its dev splits, its test splits (with
    `tests`), then its training split when it trains."""
    splits = [(task.training_data, split) for split in task.eval_splits]
    splits += [(output.dataset, output.split) for output in task.outputs if tests]
    if training:
        splits.append((task.training_data, "train"))
    return splits


# ================================================================================================
# Tokenized splits and their batches: each split is tokenized once, then batched by length

# Batches hold examples of similar length, padded to a multiple of 8 tokens: within 7 of their
# longest example. The training and prediction steps are traced once for inputs of any length,
# so many lengths cost no more tracing than few (with --jit_compile, XLA compiles each length).
BUCKET_WIDTHS = tuple(range(8, 513, 8))
TOKEN_ALIGNED = ("token_ids", "segment_ids", "padding_mask")  # one value per token
PIPELINE_THREADS = 2  # threads that gather batches of rows, and batches made ahead


def tokenize_task_data(data, task, preprocess_fn):
    """Tokenizes every split `load_task_data` opened, dev and test first: a bad line in them
    then fails within seconds, not after the training split."""
    train_examples, eval_examples, test_examples = data

    def tokenize_each(splits):
        return {name: tokenize(examples, task, preprocess_fn, name)
                for name, examples in splits.items()}

    eval_rows, test_rows = tokenize_each(eval_examples), tokenize_each(test_examples)
    train_rows = None if train_examples is None else tokenize(train_examples, task,
                                                              preprocess_fn, "train")
    return train_rows, eval_rows, test_rows


def bucket_widths(split):
    """The widths batches are padded to: multiples of 8, up to the padded length."""
    return [width for width in BUCKET_WIDTHS if width < split.padded_length] + [split.padded_length]


def batch_by_length(split, order, batch_size):
    """Batches of rows of similar length, taken in the order of the index dataset `order`. Most
    GLUE inputs are far shorter than the padded length, so this saves most of the arithmetic;
    the model sees the same real tokens. Only row indices pass through tf.data's bucketing."""
    if split.lengths is None:
        return order.batch(batch_size).map(gathered(split))
    lengths = tf.constant(split.lengths, tf.int32)
    widths = bucket_widths(split)
    return order.bucket_by_sequence_length(
        lambda index: tf.gather(lengths, index),
        bucket_boundaries=[width + 1 for width in widths],
        bucket_batch_sizes=[batch_size] * (len(widths) + 1), no_padding=True,
    ).map(gathered(split), num_parallel_calls=PIPELINE_THREADS)


def steps_per_epoch(split, batch_size):
    """How many batches `batch_by_length` makes of the split, in whatever order: every bucket
    gives full batches and one last partial batch."""
    if split.lengths is None:
        return math.ceil(len(split) / batch_size)
    buckets = np.bincount(np.searchsorted(bucket_widths(split), split.lengths))
    return int(sum(math.ceil(rows / batch_size) for rows in buckets))


def shortest_first(split):
    """The row order that sorts the split by length (stable): batches of near-equal lengths
    waste the least on padding."""
    if split.lengths is None:
        return np.arange(len(split))
    return np.argsort(split.lengths, kind="stable")


def prediction_batches(split, order, batch_size):
    """Batches of the split's rows in `order`, each padded to the bucket above its longest."""
    return tf.data.Dataset.from_tensor_slices(order).batch(batch_size).map(
        gathered(split), num_parallel_calls=PIPELINE_THREADS)


def model_inputs(batches, with_labels):
    """`(inputs, labels)` batches for `fit`, or inputs alone for `predict`. Boolean
    token-aligned inputs (KerasHub's padding masks) become int32: under a strategy, Keras
    averages the first batch across replicas, which booleans cannot do. tf.data's autotuning is
    off (PIPELINE_THREADS sets the threads): an autotuned iterator took 10 to 50 s to end."""
    options = tf.data.Options()
    options.autotune.enabled = False

    def cast(inputs):
        if not isinstance(inputs, dict):
            return inputs
        return {name: tf.cast(value, tf.int32) if name in TOKEN_ALIGNED and
                value.dtype == tf.bool else value for name, value in inputs.items()}

    return batches.map(lambda inputs, labels, idx: (cast(inputs), labels) if with_labels
                       else cast(inputs)).with_options(options)


# ================================================================================================
# The optimizer, its schedule and the loss


def make_optimizer(learning_rate, total_steps, warmup_ratio, weight_decay, clip_norm=0.0,
                   accumulation=1):
    """AdamW on BERT's schedule; `clip_norm` clips the gradients' global norm (0: not at all).
    Keras clips before it sums the replicas' gradients, so with several replicas each
    replica's share of the batch is clipped on its own.

    With `accumulation` = N > 1, Keras' optimizer updates every N batches, with their mean
    gradient (clipped once, the mean), and counts its Adam steps in updates; the schedule, which
    Keras feeds the count of batches, divides it by N. Updates follow the batches of the whole
    run, across epoch ends: a group may start in one epoch and end in the next, and the last
    `total_steps % N` batches of the run make no update."""
    updates = total_steps // accumulation
    if not updates:
        raise GlueError(f"--gradient_accumulation_steps={accumulation} is more than the "
                        f"{total_steps} batches of the whole training: no update would be made")
    schedule = WarmupLinearDecay(learning_rate, int(updates * warmup_ratio), updates, accumulation)
    optimizer = FusedAdamW(
        learning_rate=schedule, weight_decay=weight_decay, global_clipnorm=clip_norm or None,
        gradient_accumulation_steps=accumulation if accumulation > 1 else None)  # 1: refused
    optimizer.exclude_from_weight_decay(var_names=["bias", "gamma", "beta"])
    return optimizer


@keras_subclass("optimizers.AdamW")
class FusedAdamW:
    """Keras' AdamW, each variable's Adam step one TensorFlow kernel (ApplyAdam, Keras' formula)
    with the step's scalars made once: a fraction of the ops to trace and run. It replaces a
    private step of Keras' TensorFlow optimizer: benchmarks/first_step.py checks it still pays."""

    def _distributed_tf_update_step(self, distribution, grads_and_vars, learning_rate):
        lr, beta1, beta2, epsilon = (tf.cast(value, "float32") for value in (  # a replica's:
            distribution.experimental_local_results(learning_rate)[0],  # they are the same
            self.beta_1, self.beta_2, self.epsilon))
        step = tf.cast(self.iterations + 1, "float32")
        scalars = dict(lr=lr, beta1=beta1, beta2=beta2, epsilon=epsilon,
                       beta1_power=beta1 ** step, beta2_power=beta2 ** step)

        def adam_step(variable, gradient, m, v):  # one variable's, on its device
            tf.raw_ops.ResourceApplyAdam(var=variable.handle, m=m.handle, v=v.handle,
                                         grad=tf.cast(gradient, variable.dtype), **scalars)

        for gradient, variable in grads_and_vars:
            index = self._get_variable_index(variable)
            distribution.extended.update(variable, adam_step, args=(
                gradient, self._momentums[index].value, self._velocities[index].value),
                group=False)


@keras_subclass("optimizers.schedules.LearningRateSchedule")
class WarmupLinearDecay:
    """BERT's schedule, in updates: linear warmup from 0 to the peak, then linear decay to 0.
    Keras calls it with the batches trained, `batches_per_update` of them an update."""

    def __init__(self, peak_learning_rate, warmup_steps, total_steps, batches_per_update=1):
        self.peak_learning_rate = peak_learning_rate
        self.warmup_steps = warmup_steps
        self.total_steps = total_steps
        self.batches_per_update = batches_per_update

    def __call__(self, step):
        step = keras.ops.cast(keras.ops.floor_divide(step, self.batches_per_update), "float32")
        warmup = step / self.warmup_steps if self.warmup_steps else 1.0  # no warmup: full rate
        decay = (self.total_steps - step) / max(self.total_steps - self.warmup_steps, 1)
        return self.peak_learning_rate * keras.ops.maximum(keras.ops.minimum(warmup, decay), 0.0)

    def get_config(self):
        return {"peak_learning_rate": self.peak_learning_rate,
                "warmup_steps": self.warmup_steps, "total_steps": self.total_steps,
                "batches_per_update": self.batches_per_update}


def compile_for(model, task, optimizer, jit_compile=False):
    if task.is_regression:
        loss = keras.losses.MeanSquaredError()
    else:
        loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    model.compile(optimizer=optimizer, loss=loss, jit_compile=jit_compile)


# ================================================================================================
# Finetuning: the model the custom code blocks make, trained with its dev evaluations


def starting_model(task, load_path=None, init_from=None):
    """The model a run starts from: a finetuned model loaded whole (`load_path`: nothing is
    trained), or the custom code blocks' model, with the encoder of a finetuned model
    (`init_from`) in place of the pretrained one when given."""
    if load_path:
        return keras.models.load_model(load_path, compile=False)
    model = make_finetuning_model(load_pretrained_model(), task.num_outputs)
    if init_from:
        copy_encoder(keras.models.load_model(init_from, compile=False), model, init_from)
    return model


class Preempted(BaseException):
    """SIGTERM stopped training after a checkpoint. Not an Exception: it ends the whole run."""


def finetune(model, split, checkpoints, *, epochs, batch_size, seed, label, tensorboard=None):
    """Finetunes a compiled `model` in place on a tokenized split, with the dev evaluations
    `checkpoints` holds, and returns the run's record of it: times, speed, the reported (best or
    last) evaluation's dev metrics and every evaluation. `checkpoints` also resumes training
    from its folder, and stops it after a checkpoint on SIGTERM or Ctrl-C. With `tensorboard`,
    the run's logs go to that folder, their steps counted in batches trained."""
    steps = steps_per_epoch(split, batch_size)
    # Made now, the optimizer's variables spare `fit` a second trace of the training step.
    model.optimizer.build(model.trainable_variables)
    done = checkpoints.restore(model)
    if done:
        logging.info("Resuming from step %d, checkpoint in %s", done, checkpoints.directory)
    evaluations = checkpoints.evaluations
    progress = TrainingProgress(label, epochs, steps, batch_size, len(split))
    logs = tensorboard and TensorBoardLogs(tensorboard, steps, batch_size, evaluations)
    start = time.perf_counter()
    with checkpoints.stopping_on_signals(), logs or contextlib.nullcontext():
        for epoch in range(done // steps, epochs):
            # Each epoch's order depends on (seed, epoch) alone, so a resumed run sees the same
            # batches as an uninterrupted one; it skips those it has already trained on. Only
            # the row indices are shuffled, never the rows themselves.
            progress.resumed_steps = max(done - epoch * steps, 0)
            order = tf.data.Dataset.range(len(split)).shuffle(len(split), seed=seed + epoch)
            batches = (batch_by_length(split, order, batch_size)
                       .skip(progress.resumed_steps)
                       .apply(tf.data.experimental.assert_cardinality(
                           steps - progress.resumed_steps))
                       .apply(lambda batches: model_inputs(batches, with_labels=True))
                       .prefetch(PIPELINE_THREADS))
            # The evaluations come before the checkpoint, which then holds them.
            model.fit(batches, initial_epoch=epoch, epochs=epoch + 1, verbose=0, shuffle=False,
                      callbacks=[*filter(None, [evaluations, logs]), checkpoints, progress])
            if checkpoints.stopped_by:
                raise Preempted(
                    f"stopped by {checkpoints.stopped_by} at step {evaluations.batches} of "
                    f"{epochs * steps}; the checkpoint is in {checkpoints.directory}: run the "
                    "same command again to resume")
    record = {"train_seconds": round(seconds_since(start) - evaluations.seconds, 2),
              "train_examples": len(split)}
    flops = training_flops(model, split, epochs)
    if flops and not done and record["train_seconds"] > 0:  # a resumed run did less
        record["train_tflops_per_second"] = round(flops / record["train_seconds"] / 1e12, 4)
        say(f"{label}: train {Progress.per_second(epochs * len(split), record['train_seconds'])}, "
            f"{record['train_tflops_per_second']:.3f} TFLOP/s of encoder matmuls")
    if keras.mixed_precision.global_policy().name == "mixed_float16":
        # Steps the loss scale skipped, after an overflow.
        record["skipped_steps"] = epochs * steps - batches_applied(model.optimizer)
    reported = evaluations.finish(model)  # the best evaluation's weights, if selected
    if reported:
        record.update(dev_metrics(reported), collapsed=reported["collapsed"],
                      best_epoch=evaluations.records[evaluations.best]["epoch"],
                      evaluations=evaluations.records,
                      dev_predict_seconds=round(evaluations.seconds, 2))
    return record


def batches_applied(optimizer):
    """The batches the optimizer took: Keras' own count (its public `iterations` counts
    updates under gradient accumulation), of the inner optimizer under mixed_float16's loss
    scaling, which skips batches uncounted. `.numpy()`: int() refuses a MirroredVariable."""
    return int(getattr(optimizer, "inner_optimizer", optimizer)._iterations.numpy())


@keras_subclass("callbacks.Callback")
class DevEvaluations:
    """Evaluates on dev `per_epoch` times an epoch (0: never), the last time at its end, and
    records each: `{"epoch", "step", <dev split>: metrics, "collapsed"}`. First of the callbacks,
    it counts the batches trained, over a resume too: the run's one count, which the others read.

    With `keep_best`, a copy of the best evaluation's weights (the highest task score; a later one
    must beat it, not tie) is kept in memory while a later evaluation could still beat it, and
    `finish` puts it back; the checkpoints save it with the training state, in one file."""

    def __init__(self, evaluate, steps_per_epoch, epochs, per_epoch=1, keep_best=True):
        super().__init__()
        self.evaluate = evaluate  # model -> ({dev split: metrics}, collapsed, predictions)
        self.steps, self.total = steps_per_epoch, epochs * steps_per_epoch
        self.due = {math.ceil(steps_per_epoch * k / per_epoch) for k in range(1, per_epoch + 1)}
        self.keep_best = keep_best
        self.records, self.batches, self.seconds = [], 0, 0.0
        self.best_weights = None  # None while the model's own weights are the best ones
        self.predictions = None  # the dev predictions of the evaluation to report, if made here

    def resume(self, batches, records, best_weights):
        self.batches, self.records, self.best_weights = batches, records, best_weights

    @property
    def best(self):
        """The index of the best evaluation so far (the first of equals)."""
        scores = [run_score(record) for record in self.records]
        return scores.index(max(scores)) if scores else None

    def on_train_batch_end(self, batch, logs=None):
        self.batches += 1
        if (self.batches - 1) % self.steps + 1 in self.due:
            self.run_evaluation()

    def run_evaluation(self):
        start = time.perf_counter()
        metrics, collapsed, predictions = self.evaluate(self.model)
        self.seconds += time.perf_counter() - start
        epoch = self.batches / self.steps
        self.records.append({"epoch": int(epoch) if epoch.is_integer() else round(epoch, 3),
                             "step": self.batches, **metrics, "collapsed": collapsed})
        if not self.keep_best or self.best == len(self.records) - 1:
            self.predictions = predictions  # those of the evaluation to report, so far
            if self.keep_best:  # a copy only while a later evaluation could still beat this one
                self.best_weights = self.model.get_weights() if self.batches < self.total else None

    def finish(self, model):
        """Puts the best evaluation's weights back (with `keep_best`) and returns its record
        (None without any); `predictions` are its dev predictions (made again if it came
        before a resume)."""
        if not self.records:
            return None
        best = self.records[self.best] if self.keep_best else self.records[-1]
        if best is not self.records[-1]:
            model.set_weights(self.best_weights)
        self.best_weights = None
        if self.predictions is None:
            self.predictions = self.evaluate(model)[2]
        return best


# ================================================================================================
# Prediction: dev metrics, and the test predictions as the leaderboard's rows


def evaluate(model, eval_rows, task, batch_size, name):
    """`({dev split: metrics}, collapsed, {file: predictions})` of a model; collapsed: every dev
    prediction alike. The predictions (`index`, gold `label`, `prediction`) are what comparing
    two models resamples, and what error analysis reads."""
    metrics, tables = {}, {}
    for split, rows in eval_rows.items():
        idx, gold, predicted = predict(model, rows, task, batch_size, f"{name}  predict {split}")
        metrics[split] = compute_metrics(task, gold, predicted)
        tables[DEV_PREDICTIONS.format(split)] = pd.DataFrame(
            {"index": idx, "label": gold, "prediction": predicted}).sort_values("index")
    collapsed = bool(tables) and is_collapsed(
        np.concatenate([table["prediction"] for table in tables.values()]))
    return metrics, collapsed, tables


DEV_PREDICTIONS = "{}_predictions.tsv"  # one file per dev split, in the run's folder


def predict(model, split, task, batch_size, label=None):
    """Returns `(idx, labels, predictions)` for a tokenized split, shortest examples first.

    Predictions are class ids, or STS-B scores clipped to the label range [0, 5]."""
    order = shortest_first(split)
    batches = (prediction_batches(split, order, batch_size)
               .apply(lambda batches: model_inputs(batches, with_labels=False))
               .prefetch(PIPELINE_THREADS))
    trace_for_every_length(model, batches)
    progress = Progress(label or f"{task.name}  predict", math.ceil(len(split) / batch_size))
    logits = model.predict(batches, verbose=0, callbacks=[progress.callback(batch_size)])
    progress.summary(len(split))
    if task.is_regression:
        predictions = np.clip(logits.reshape(-1), 0.0, 5.0)
    else:
        predictions = logits.argmax(axis=-1)
    return split.idx[order], split.labels[order], predictions


def trace_for_every_length(model, batches):
    """Traces Keras' prediction step once, for batches of every size and length.

    Left to itself, Keras traces it for the first batch's exact shape, then again for a shape
    that fits every batch. This relies on Keras' private one-step signature (a list of one
    batch); MRPC dev's first prediction took 2.72 s against 3.62 s (benchmarks/tracing.py)."""
    model.make_predict_function()
    spec = model.distribute_strategy.experimental_distribute_dataset(batches).element_spec
    model.predict_function.get_concrete_function([spec])


def predict_test(model, test_rows, task, batch_size, name):
    """Every submission table, computed before any is written: a failure never leaves a
    partial submission."""
    tables = {}
    for file, rows in test_rows.items():
        idx, _, predictions = predict(model, rows, task, batch_size, f"{name}  predict {file}")
        tables[file] = submission_table(task, idx, predictions)
    return tables


def compute_metrics(task, labels, predictions):
    """The task's official GLUE metrics, as fractions; None where undefined (constant input)."""
    with warnings.catch_warnings():  # a constant input is reported as None instead
        warnings.simplefilter("ignore", scipy.stats.ConstantInputWarning)
        values = {name: float(METRICS[name](labels, predictions)) for name in task.metrics}
    return {name: value if math.isfinite(value) else None for name, value in values.items()}


def is_collapsed(predictions):
    """Whether a model gave every dev example the same class (STS-B: the same score)."""
    return len(predictions) > 1 and float(np.ptp(predictions)) <= COLLAPSED_SPREAD


COLLAPSED_SPREAD = 1e-3  # STS-B scores (0 to 5) closer together than this count as one


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


# ================================================================================================
# The run's own record: run.json, its dev and test predictions and, if asked, its model

RUN_RECORD = "run.json"


def write_run(folder, record, tables, model=None):
    """Writes a finished run's folder: its dev and test predictions, its model (None: none), and
    last its record, whose presence says the run is whole."""
    for file, table in tables.items():
        write_submission(os.path.join(folder, file), table)
    if model is not None:
        model.optimizer = None  # the weights alone: Adam's two slots would triple the file
        model.save(os.path.join(folder, "model.keras"))
    write_json(os.path.join(folder, RUN_RECORD), record)


def write_json(path, value):
    text = json.dumps(value, indent=2, sort_keys=True) + "\n"
    write_atomically(path, lambda temporary: pathlib.Path(temporary).write_text(text, "utf-8"))


def write_atomically(path, write):
    """Calls `write(temporary_path)`, then renames the temporary file to `path`."""
    folder, name = os.path.split(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    # Same folder, so the rename is atomic; a unique name, so concurrent runs never collide;
    # the same ending, since Keras and numpy insist on theirs (`.keras`, `.npz`).
    temporary = os.path.join(folder, f".tmp-{uuid.uuid4().hex[:12]}-{name}")
    try:
        write(temporary)
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def report_run(name, run):
    """The log line of a finished run."""
    shown = "  ".join(f"{split} {metric} {percent(value)}"
                      for split, metrics in dev_metrics(run).items()
                      for metric, value in metrics.items())
    at = f" (best evaluation at epoch {run['best_epoch']})" if "best_epoch" in run else ""
    say(f"{name}: {shown or 'trained (no dev set)'}{at}")


def percent(value):
    return "n/a" if value is None else f"{100 * value:.2f}"


def seconds_since(start):
    return round(time.perf_counter() - start, 2)


def say(line):
    """Progress and summary lines: stdout, flushed, so that a log file shows them as they come."""
    print(line, flush=True)


# ================================================================================================
# Main: one run, from its flags to its folder. A command without --run_dir is a sweep: it starts
# each of its runs as a `glue.py` process of its own, with that run's flags (`run_sweep`, below).


def quiet_expected_warnings():
    """--pooling=cls or mean leaves the backbone's pooler unused, and Keras warns at every trace
    that its variables get no gradient. That is expected, so it is not shown; a missing gradient
    for any other variable (a real mistake in a custom block) still is."""
    warnings.filterwarnings(
        "ignore", r"Gradients do not exist for variables \[('pooled_dense/(kernel|bias)'(, )?)+\] ",
        UserWarning)


def main(argv):
    try:
        if not FLAGS.run_dir:
            return run_sweep(FLAGS.get_key_flags_for_module(sys.modules[__name__]),
                             argv[0] if argv and argv[0].endswith(".py") else __file__)
        task = TASKS[FLAGS.task_name[0]]
        seed, label = int(FLAGS.seed[0]), FLAGS.run_label or task.name
        trains = not FLAGS.finetuning_model_load_path
        keras.mixed_precision.set_global_policy(FLAGS.mixed_precision or "float32")
        quiet_expected_warnings()
        strategy = make_strategy(FLAGS.distribution_strategy, FLAGS.tpu_timeout_seconds)
        record = {"learning_rate": float(FLAGS.learning_rate[0]) if trains else None,
                  "seed": seed, "run_id": uuid.uuid4().hex[:12],
                  "replicas": strategy.num_replicas_in_sync}
        with strategy.scope():
            # The custom code blocks run in the scope: they may create variables. The preset's
            # preprocessing loads first, so that a preset that cannot be had fails in seconds.
            preprocess_fn = tf.function(make_preprocess_fn())
            start = time.perf_counter()
            train_rows, eval_rows, test_rows = tokenize_task_data(
                load_task_data(task, FLAGS.data_dir, trains, FLAGS.limit), task, preprocess_fn)
            record["tokenize_seconds"] = seconds_since(start)
            keras.utils.set_random_seed(seed)
            start = time.perf_counter()
            model = starting_model(task, FLAGS.finetuning_model_load_path,
                                   FLAGS.init_from_finetuned)
            record["load_seconds"] = seconds_since(start)
            if not trains:  # --finetuning_model_load_path: evaluated as it is
                model.jit_compile = FLAGS.jit_compile
                start = time.perf_counter()
                metrics, collapsed, tables = evaluate(model, eval_rows, task, FLAGS.batch_size,
                                                      label)
                record.update(metrics, collapsed=collapsed,
                              dev_predict_seconds=seconds_since(start))
            else:
                steps = steps_per_epoch(train_rows, FLAGS.batch_size)
                compile_for(model, task, make_optimizer(
                    record["learning_rate"], FLAGS.epochs * steps, FLAGS.warmup_ratio,
                    FLAGS.weight_decay, FLAGS.clip_norm, FLAGS.gradient_accumulation_steps),
                    FLAGS.jit_compile)
                evaluations = DevEvaluations(
                    lambda model: evaluate(model, eval_rows, task, FLAGS.batch_size, label),
                    steps, FLAGS.epochs, FLAGS.evaluations_per_epoch if eval_rows else 0,
                    FLAGS.select_best_epoch)
                checkpoints = TrainingCheckpoints(FLAGS.run_checkpoints, evaluations,
                                                  FLAGS.checkpoint_every_steps)
                record.update(finetune(model, train_rows, checkpoints, epochs=FLAGS.epochs,
                                       batch_size=FLAGS.batch_size, seed=seed, label=label,
                                       tensorboard=FLAGS.run_tensorboard))
                tables = dict(evaluations.predictions or {})
            if FLAGS.submission_directory and not FLAGS.limit:
                start = time.perf_counter()
                tables.update(predict_test(model, test_rows, task, FLAGS.batch_size, label))
                record.update(test_predict_seconds=seconds_since(start), test_files={
                    output.file: len(tables[output.file]) for output in task.outputs})
        report_run(label, record)
        write_run(FLAGS.run_dir, record, tables, model if FLAGS.keep_model else None)
    except GlueError as error:
        sys.exit(f"glue.py: error: {error}")
    except Preempted as stop:
        sys.exit(f"glue.py: {stop}")


# Nothing below needs editing to bring your own model


# ================================================================================================
# The sweep. Each task's runs are planned from its records; each run is a `glue.py` process of
# its own, so its memory goes back to the system when it ends and a crash costs that run alone.
# As a run ends, the task's results are made anew from the records (`record_run`).


def run_sweep(own_flags, script):
    """The command: `own_flags` are glue.py's flags as parsed, `script` the file that starts a
    run (this one, or a test's wrapper of it)."""
    options = options_from_flags(own_flags)
    flag_values = {flag.name: flag for flag in own_flags}
    if options.validate_submission:
        errors, notices = validate_submission(read_submission(options.validate_submission))
        for line in notices + errors:
            print(line)
        if errors:
            raise GlueError(f"{options.validate_submission}: {len(errors)} problems")
        print(f"{options.validate_submission}: all 11 files pass")
        return
    task_names = list(dict.fromkeys(  # all, none and comma lists: each task once, in order
        task for name in options.task_name for task in {"all": ALL_TASKS, "none": ()}.get(
            name, (name,))))
    if (len(task_names) > 1 or options.launcher == "slurm") and options.submission_directory \
            and not options.checkpoint_dir:  # a requeued Slurm job resumes from there
        options.checkpoint_dir = os.path.join(options.submission_directory, "checkpoints")
    recipe = read_recipe(options.recipe, flag_values)
    check_options(options, task_names)
    given = {flag.name for flag in own_flags if flag.present}  # they win over the recipe
    settings = {name: recipe_values(recipe, name, given, flag_values) for name in TASKS}
    task_names = in_rounds(task_names, settings)
    check_task_settings(options, task_names, settings)
    other = options.compare_with and other_results(options, task_names)
    hint = task_names and not options.mixed_precision and not gpu_count() and \
        strategy_and_tpu(options.distribution_strategy)[0] != "tpu" and bf16_hint(cpu_flags())
    if hint:
        say(hint)
    with records_root(options) as root:
        check_save_path(options, root, task_names)
        known = check_recorded_runs(options, root, task_names, settings)
        results, failures = run_tasks(task_names, options, root, settings, known, script)
        if not task_names:
            publish_recorded(options, root)
        comparison = other and compare_and_record(options, results, root, other)
        if not task_names or comparison:
            report_results(options)
    report_and_package(options, results, comparison)
    if len(task_names) == 1 and failures:
        raise GlueError(failures[task_names[0]])
    if failures:
        raise GlueError(f"{len(failures)} of {len(task_names)} tasks failed: "
                        f"{', '.join(failures)} (reasons above)")


def run_tasks(task_names, options, root, settings, known, script):
    """Runs each task with its recipe settings (`settings`, of every task; `known`, those with
    their warm start in place, checked at start), past failures; returns (results, failures). A
    task others start from keeps its runs' models. With --launcher=slurm the tasks run at once,
    each when the task it starts from has ended (a thread per task waits for its jobs); else one
    at a time. SIGTERM or Ctrl-C, caught here alone, stops every task's runs."""
    sources = {values.get("init_from_task") for values in settings.values()}
    results, failures, stopped_by = {}, {}, []
    ended, reporting = {name: threading.Event() for name in task_names}, threading.Lock()

    def run(name):
        try:
            source = settings[name].get("init_from_task")
            if source in ended:
                ended[source].wait()
            if stopped_by:
                raise Preempted(f"stopped by {stopped_by[0]} before {name} started")
            if source in failures:  # its recorded choice, if any, is not this command's
                raise GlueError(f"starts from {source}'s model, and {source} failed")
            values = known[name] if name in known else \
                with_warm_start(options, root, name, settings)
            results[name] = run_task(TASKS[name], task_options(options, values), root, script,
                                     name in sources, stopped_by)
        except GlueError as error:
            failures[name] = str(error)
        finally:
            ended[name].set()
        if name in failures and len(task_names) > 1:
            print(f"{name}: FAILED: {failures[name]}", file=sys.stderr)
        with reporting:  # one report at a time: matplotlib draws in one thread at a time
            report_results(options)

    def stop(signal_name):
        stopped_by.append(signal_name)  # first: a sweep becoming live now sees it (`Sweep`)
        for sweep in list(Sweep.live):
            sweep.stop(signal_name)

    with on_stop_signals(stop):
        if not (options.launcher == "slurm" and shutil.which("srun") and len(task_names) > 1):
            for name in task_names:  # here (submitit's local executor too): one at a time
                run(name)
            return results, failures
        with concurrent.futures.ThreadPoolExecutor(len(task_names)) as pool:
            tasks = [pool.submit(run, name) for name in task_names]
    for task in tasks:
        task.result()  # a stop, or a failure of the command itself, ends it here
    return results, failures


def run_task(task, options, root, script, keep_models=False, stopped_by=()):
    """One task: the runs its records of these settings lack are trained, each written to its
    own folder as it ends; then its results and submission are made anew from the records. Runs
    keep their models with --finetuning_model_save_path, or `keep_models` (another task starts
    from this one's); `stopped_by`: the command's signals. Returns its entry; lost runs fail it."""
    settings = fingerprint(task, options, run_devices(options))
    folder = records_folder(root, task, fingerprint_id(settings))
    previous = read_results(options.results_path).get(task.name)
    save_path = model_save_path(options, task)
    keep_models = keep_models or bool(save_path and not options.finetuning_model_load_path)
    remove_abandoned(os.path.join(root, task.name))
    todo, line = plan_task(task, options, settings, folder, previous, keep_models)
    say(line)
    lost = []
    if todo:
        write_json(os.path.join(folder, "fingerprint.json"), settings)
        sweep = Sweep(task, options, settings, folder, script, keep_models, stopped_by)
        lost = sweep.train(todo, lambda staged, run: record_run(
            task, options, settings, staged, run, save_path))
    entry = publish(task, options, settings, folder, save_path)
    if lost and (len(todo) == 1 or sweep.said_why):
        raise GlueError(lost[0])
    if lost:
        raise GlueError(f"{plural(len(lost), 'run')} lost (lines above); run the same command "
                        "again to train what is missing")
    return entry


def plan_task(task, options, settings, folder, previous, keep_models=False):
    """The one decision for a task: which asked runs to train, from what the records of these
    settings (in `folder`) hold, and the line that says so. Returns `([(learning rate, seed,
    the chain recorded so far)], line)`.

    With `keep_models`, a chosen run recorded without its model is trained again, alone."""
    records, asked = read_records(folder), asked_runs(options)
    check_restart_seeds(records, asked, options.max_restarts)
    todo = []
    for learning_rate, seed in asked:
        chain = [] if options.overwrite else chain_of(records, learning_rate, seed)
        if chain and options.submission_directory and not options.limit and \
                "test_files" not in chain[-1]:
            chain = []  # recorded without a submission folder: no test predictions to submit
        if needs_run(chain, options.max_restarts):
            todo.append((learning_rate, seed, chain))
    done, for_its_model = len(asked) - len(todo), False
    chosen = summarized(records)["submitted_run"] if chains(records) and keep_models else None
    if chosen and chosen["learning_rate"] is not None and \
            not os.path.isfile(run_model(folder, chosen)):
        run = next(run for run in records if run_key(run) == run_key(chosen))
        asked_as = (run["learning_rate"], run.get("restart_of", run["seed"]))
        if asked_as not in [planned[:2] for planned in todo]:
            # The model a warm start or the save path needs: that run again, asked or not (a
            # restart with the chain before it, so that it takes the restart's seed).
            todo.append((*asked_as, chain_of(records, *asked_as)[:-1]))
            for_its_model = True
    if for_its_model and len(todo) == 1:
        line = (f"its chosen run ({describe_run(chosen)}) was recorded without its model, "
                "which the save path or a warm start needs: training that run again")
    elif not todo:
        line = (f"already complete with these settings ({plural(len(records), 'run')} "
                "recorded), skipped (--overwrite redoes it)")
    elif options.overwrite:
        line = f"--overwrite: training the {plural(len(todo), 'asked run')} again (other " \
               "recorded runs stay)"
    elif done:
        line = f"{done} of {len(asked)} asked runs recorded with these settings; training " \
               f"the other {len(todo)}"
    elif previous and previous.get("fingerprint_id", "") != fingerprint_id(settings):
        line = f"redone, {changed_settings(previous.get('fingerprint'), settings)}"
    else:
        line = f"training {plural(len(todo), 'run')}"
    return todo, f"{task.name}: {line}"


def check_restart_seeds(records, asked, max_restarts):
    """No asked run may share its folder (learning rate and seed) with a recorded restart, nor
    may its restarts share theirs with a recorded run of another seed: one would replace the
    other. check_runs checks the seeds of one command; this, those of earlier ones."""
    recorded = {run_key(run): run for run in records}
    for rate, seed in asked:
        restart = recorded.get((rate, seed), {}).get("restart_of")
        if restart is not None:
            raise GlueError(f"--seed={seed}: seed {seed} (lr {rate_label(rate)}) is recorded "
                            f"with these settings as a restart of seed {restart}; give another")
        if not needs_run(chain_of(records, rate, seed), max_restarts):
            continue  # done: it will not restart
        for k in range(1, max_restarts + 1):
            run = recorded.get((rate, seed + RESTART_SEED_STEP * k), {})
            if run and run.get("restart_of") != seed:
                raise GlueError(f"--max_restarts={max_restarts}: restart {k} of seed {seed} (lr "
                                f"{rate_label(rate)}) would take seed {run['seed']}, which is "
                                "recorded with these settings; give other seeds or fewer "
                                "restarts")


class Sweep:
    """Trains a task's asked runs, each with its restarts, as processes of their own,
    `--parallel_runs` at a time, each on its share of the devices, or as Slurm jobs. A run that
    ends without its record (it failed, crashed or was killed) is lost: the others go on, and
    the command ends naming it. SIGTERM or Ctrl-C to the command (`stopped_by`, the signals
    that stopped it, as they come) reaches the runs, which checkpoint and stop."""

    live = set()  # the sweeps training now, which a signal stops (`run_tasks`)

    def __init__(self, task, options, settings, folder, script, keep_models, stopped_by=()):
        self.task, self.options, self.settings, self.folder = task, options, settings, folder
        self.script, self.keep_models, self.command_stopped_by = script, keep_models, stopped_by
        self.several = len(asked_runs(options)) > 1 or options.max_restarts > 0
        self.slots = device_slots(options.parallel_runs, gpu_count(), available_cores())
        self.jobs = options.launcher == "slurm" and SlurmJobs(
            folder, options.slurm, options.parallel_runs, task.name)
        self.capacity = self.jobs.capacity if self.jobs else len(self.slots)
        self.running, self.lost, self.stopped_by, self.said_why = [], [], None, False

    def train(self, todo, record):
        """Runs `todo` ([(learning rate, seed, chain)]); `record(staged folder, run)` puts each
        finished run among the records. Returns the lost runs' lines."""
        waiting = collections.deque(todo)
        with self.stopping_runs_on_failure():
            while waiting or self.running:
                if self.stopped_by:
                    waiting.clear()  # no new run; the running ones checkpoint and stop
                with self.jobs.batch() if self.jobs else contextlib.nullcontext():
                    while waiting and len(self.running) < self.capacity:
                        self.start(*waiting.popleft())
                if not self.running:
                    break
                run = self.next_finished()
                self.running.remove(run)
                if self.finish(run, record) and needs_run(run.chain, self.options.max_restarts):
                    waiting.appendleft((run.learning_rate, run.seed, run.chain))
                elif self.said_why and waiting:  # the task's other runs would fail alike
                    say(f"{self.task.name}: {plural(len(waiting), 'asked run')} not started")
                    waiting.clear()
        if self.stopped_by:
            raise Preempted(f"stopped by {self.stopped_by}; the runs keep their checkpoints: run "
                            "the same command again to resume")
        return self.lost

    def start(self, learning_rate, seed, chain):
        options, task = self.options, self.task
        run_seed = seed + RESTART_SEED_STEP * len(chain)
        taken = self.jobs and self.jobs.take_over(self.folder, learning_rate, run_seed)
        if taken:  # its job, alive or with the run's record: not started twice
            staged, run, process = taken
            self.running.append(Started(learning_rate, seed, chain, run_seed, run["name"],
                                        staged, process, None, run["flags"]))
            return
        name = f"{task.name} lr {rate_label(learning_rate)} seed {run_seed}" if self.several \
            else task.name  # as progress lines name the run
        owner = "slurm" if self.jobs and self.jobs.outlive else \
            f"{socket.gethostname()}:{os.getpid()}"  # remove_abandoned reads it
        staged = os.path.join(self.folder, f"{STAGED}{owner}:{uuid.uuid4().hex[:12]}")
        os.makedirs(staged)
        trains = learning_rate is not None  # else it evaluates --finetuning_model_load_path
        values = {**vars(options), "task_name": [task.name], "seed": [str(run_seed)],
                  "learning_rate": [str(learning_rate)] if trains else options.learning_rate[:1]}
        extra = {"run_dir": staged, "run_label": name, "keep_model": self.keep_models and trains}
        if trains and options.checkpoint_dir:
            extra["run_checkpoints"] = checkpoint_folder(options.checkpoint_dir, task,
                                                         learning_rate, run_seed, self.settings)
        if trains and options.tensorboard_dir:  # as the records: TensorBoard's runs, the sweep
            extra["run_tensorboard"] = run_folder(records_folder(options.tensorboard_dir, task,
                                                                 fingerprint_id(self.settings)),
                                                  learning_rate, run_seed)
        flags = {key: values[key] for key in run_flag_names(values)}
        command = [sys.executable, os.path.abspath(self.script), *arguments(flags),
                   *arguments(extra)]
        log = os.path.join(staged, "log.txt")
        slot = None if self.jobs else min(set(range(len(self.slots))) -
                                          {run.slot for run in self.running})
        process = self.jobs.start(command, log, {
            "learning_rate": learning_rate, "run_seed": run_seed, "name": name, "flags": flags}) \
            if self.jobs else start_run(command, log, *self.slots[slot])
        self.running.append(Started(learning_rate, seed, chain, run_seed, name, staged,
                                    process, slot, flags))
        if self.stopped_by:  # the signal came while it started
            process.send_signal(signal.SIGTERM)

    def next_finished(self):
        while True:
            for run in self.running:
                if run.process.poll() is not None:
                    run.process.finish()
                    return run
            if self.jobs:
                self.jobs.watch(self.running)
            time.sleep(1 if self.jobs else 0.1)

    def finish(self, run, record):
        """Records a finished run, or names it lost; returns whether it was recorded."""
        path = os.path.join(run.staged, RUN_RECORD)
        if not os.path.isfile(path):  # written last, at once: the run is whole if it is there
            self.lose(run)
            return False
        # What its command line said, and the command that reruns it alone.
        result = {**read_json(path), "flags": run.flags, "recorded_at": round(time.time(), 3),
                  "command": shlex.join(["python", "glue.py", *arguments(run.flags)])}
        if run.chain:
            result.update(restart_of=run.seed, restarted_from=run.chain[-1]["run_id"])
        if self.jobs:  # the run's own line, which only its log has
            report_run(f"{run.name} (Slurm job {run.process.job.job_id})", result)
        run.chain.append(result)
        if result.get("collapsed"):
            then = (f"restarting with seed {result['seed'] + RESTART_SEED_STEP}"
                    if needs_run(run.chain, self.options.max_restarts) else
                    "counted as it is in the summary (--max_restarts gives it another try)")
            say(f"{run.name}: COLLAPSED: every dev prediction is the same; {then}")
        record(run.staged, result)
        return True

    def lose(self, run):
        """Keeps a lost run's log in its run folder, and says why it was lost in one line."""
        final = run_folder(self.folder, run.learning_rate, run.run_seed)
        os.makedirs(final, exist_ok=True)
        log = os.path.join(final, "lost.log")
        os.replace(os.path.join(run.staged, "log.txt"), log)
        shutil.rmtree(run.staged, ignore_errors=True)
        with open(log, encoding="utf-8", errors="replace") as file:
            tail = [line.rstrip() for line in file.readlines()[-6:] if line.strip()]
        code, job = run.process.returncode, self.jobs and run.process.job
        if tail and tail[-1].startswith("glue.py: "):  # bad input, no TPU, or stopped
            self.lost.append(tail[-1].removeprefix("glue.py: ").removeprefix("error: "))
            self.said_why |= tail[-1].startswith("glue.py: error: ")  # in its line, shown
            return
        if self.stopped_by:
            self.lost.append(f"{run.name}: stopped before its checkpoint; its log: {log}")
            return
        how = code if isinstance(code, str) else f"killed by {signal.Signals(-code).name}" \
            if code < 0 else f"exit status {code}" + (f": {tail[-1][:200]}" if tail else "")
        how = f"Slurm job {job.job_id}, {how}" if job else how
        line = f"{run.name}: LOST ({how}); its log: {log}"
        print("\n    ".join([line, *tail[-5:]]), file=sys.stderr, flush=True)
        self.lost.append(line)

    def stop(self, signal_name):
        """SIGTERM or Ctrl-C to the command passes SIGTERM on to its runs: they checkpoint and
        stop, and the command waits for them, then stops too."""
        self.stopped_by = self.stopped_by or signal_name
        jobs = [run for run in self.running if run.process.returncode is None]
        if self.jobs and jobs:
            say(f"{self.task.name}: {signal_name}: cancelling {plural(len(jobs), 'Slurm job')} "
                "(a run checkpoints as it stops)")
        for run in self.running:
            run.process.send_signal(signal.SIGTERM)  # nothing, once it has ended

    @contextlib.contextmanager
    def stopping_runs_on_failure(self):
        """A failure of the command itself (a record it cannot write, say) stops its running
        runs before it goes on: none trains unattended. While in it, the sweep is live."""
        Sweep.live.add(self)
        if self.command_stopped_by:  # a signal before it was live
            self.stop(self.command_stopped_by[0])
        try:
            yield
        except BaseException:
            self.stop("the command's failure")
            for run in self.running:
                run.process.wait()
                run.process.finish()
            raise
        finally:
            Sweep.live.discard(self)


# A run whose process is running: the asked (learning rate, seed), its chain so far, the seed it
# runs with (a restart's differs), its name, folder, process, device slot and run flags.
Started = collections.namedtuple(
    "Started", "learning_rate seed chain run_seed name staged process slot flags")


def start_run(command, log_path, environment=None, cores=None):
    """Starts one run's process. Its output reaches this process' stdout and stderr line by line
    as it comes, and its log file whole. `cores`: the CPU cores it may use (None: all). If this
    process dies first, the kernel sends the run SIGTERM, so no run outlives its command."""
    prctl = getattr(LIBC, "prctl", None)  # Linux: PR_SET_PDEATHSIG

    def between_fork_and_exec():  # the run never runs on other cores, nor outlives this process
        if prctl:
            prctl(1, signal.SIGTERM)
        if cores:
            os.sched_setaffinity(0, cores)

    log = open(log_path, "w", encoding="utf-8")  # noqa: SIM115 (closed by `finish`)
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, errors="replace",
        env={**os.environ, **(environment or {}), "PYTHONUNBUFFERED": "1"},
        preexec_fn=between_fork_and_exec)
    lock = threading.Lock()

    def copy(lines, terminal):
        for line in lines:
            with contextlib.suppress(OSError, ValueError):  # a terminal gone: the log goes on
                if not line.startswith("glue.py: error: ") and not any(  # the command says it
                        chatter in line for chatter in TENSORFLOW_CHATTER):
                    terminal.write(line)
                    terminal.flush()
            with lock:
                log.write(line)
                log.flush()

    copiers = [threading.Thread(target=copy, args=pair, daemon=True)
               for pair in ((process.stdout, sys.stdout), (process.stderr, sys.stderr))]
    for thread in copiers:
        thread.start()

    def finish():
        for thread in copiers:
            thread.join()
        log.close()

    process.finish = finish
    return process


LIBC = ctypes.CDLL("libc.so.6") if sys.platform == "linux" else None
# TensorFlow's and CUDA's lines as a run's process starts, and tf.data's notes on its pipelines:
# the run's log keeps them, the terminal is spared them. Every other warning and error shows.
TENSORFLOW_CHATTER = (
    "All log messages before absl::InitializeLog()", "oneDNN custom operations are on",
    "Could not find cuda drivers", "failed call to cuInit", "cpu_feature_guard.cc",
    "To enable the following instructions", "oneDNN supports DT_INT64 only",
    "not handled by the auto-shard rewrite", "will not be optimized because the dataset",
    "Local rendezvous is aborting with status: CANCELLED", "{{node MultiDeviceIteratorGetNext")


def device_slots(parallel_runs, gpus, cores):
    """`[(environment, cores)]` for each of `parallel_runs` runs at once: with GPUs, each run's
    share of them (CUDA_VISIBLE_DEVICES); on CPU, each run's share of the cores, which sets its
    TensorFlow thread pools. One run at a time sees everything."""
    if parallel_runs == 1:
        return [({}, None)]
    if gpus:
        share = gpus // parallel_runs
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")  # the command's own share, if any
        mine = visible.split(",") if visible else [str(gpu) for gpu in range(gpus)]
        return [({"CUDA_VISIBLE_DEVICES": ",".join(mine[i * share:(i + 1) * share])}, None)
                for i in range(parallel_runs)]
    share = cores // parallel_runs
    mine = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    return [({}, set(mine[i * share:(i + 1) * share]) or None) for i in range(parallel_runs)]


def run_flag_names(names):
    """The flags among `names` that a run's process gets."""
    not_for_runs = flags_with("command") + HELP_GROUPS[RUN_FLAGS]
    return [name for name in names if name not in not_for_runs]


def arguments(values):
    """Flag values as command-line arguments (None: left out, the flag's default). Spells the
    kinds of flag glue.py defines: booleans, comma lists and single values."""
    spelled = []
    for name, value in values.items():
        if isinstance(value, bool):
            spelled.append(f"--{'' if value else 'no'}{name}")
        elif isinstance(value, list):
            spelled.append(f"--{name}={','.join(map(str, value))}")
        elif value is not None:
            spelled.append(f"--{name}={value}")
    return spelled


def record_run(task, options, settings, staged, run, save_path):
    """Puts a finished run's folder in place among the records, and makes the task's results
    anew, under the results lock: nothing may read the folder half replaced. A model stays only
    in the folder of a run that may be chosen, the best of its learning rate."""
    folder = os.path.dirname(staged)
    write_json(os.path.join(staged, RUN_RECORD), run)
    with updating_results(options.results_path) as results:
        put_in_place(staged, run_folder(folder, run["learning_rate"], run["seed"]))
        records = read_records(folder)
        leaders = {run_key(best_run(rate_runs)) for rate_runs in runs_by_rate(records).values()}
        for other in records:
            if run_key(other) not in leaders:
                with contextlib.suppress(FileNotFoundError):
                    os.remove(run_model(folder, other))
        publish_into(results, task, options, settings, folder, save_path)
    if options.checkpoint_dir:  # never resumed now
        shutil.rmtree(checkpoint_folder(options.checkpoint_dir, task, run["learning_rate"],
                                        run["seed"], settings), ignore_errors=True)

# ================================================================================================
# Slurm (--launcher=slurm): each run a job, submitted through submitit. A job runs the run's own
# command line; the command waits for its jobs, and stays the only writer of records and results.


class SlurmJobs:
    """Starts a task's runs as Slurm jobs, those started together as one job array with at most
    `parallel_runs` jobs running at a time. Where there is no Slurm (no `srun`), submitit runs
    the jobs here, `parallel_runs` at a time. To the Sweep, a job looks like a run's process
    (`SlurmRun`); a line says when each starts, and every minute how many wait, run and ended."""

    def __init__(self, folder, slurm, parallel_runs, task_name):
        import submitit  # only here: a local command never needs it
        self.submitit, self.folder = submitit, os.path.join(folder, ".slurm", "%j")
        self.executor = submitit.AutoExecutor(folder=self.folder)
        self.executor.update_parameters(name=f"glue-{task_name}", slurm_array_parallelism=(
            parallel_runs), **slurm_parameters(slurm))
        self.capacity = parallel_runs if self.executor.cluster == "local" else math.inf
        self.outlive = self.executor.cluster == "slurm"  # jobs that outlive the command
        self.task_name, self.jobs, self.said_at = task_name, [], time.monotonic()

    @contextlib.contextmanager
    def batch(self):
        """The runs started in the block go as one job array, submitted as it ends."""
        self.submitted = []
        try:
            with self.executor.batch(allow_implicit_submissions=True):
                yield
        except self.submitit.core.utils.FailedJobError as error:  # sbatch said no
            for job in self.submitted:
                job.job, job.returncode = None, "not submitted"
                shutil.rmtree(os.path.dirname(job.log_path), ignore_errors=True)
            raise GlueError(f"Slurm refused {self.task_name}'s jobs: {first_line(error)}") from None
        for job in self.submitted:  # for a command that takes the job over if this one dies
            write_json(os.path.join(os.path.dirname(job.log_path), SLURM_JOB),
                       {**job.run, "job_id": job.job.job_id})
        if self.submitted:
            ids = sorted({job.job.job_id.split("_")[0] for job in self.submitted})
            say(f"{self.task_name}: {plural(len(self.submitted), 'run')} submitted as Slurm "
                f"job {', '.join(ids)} ({self.executor.cluster})")

    def start(self, command, log_path, run):
        """Submits a run's job; `run`, what a later command needs to take it over."""
        job = SlurmRun(self.executor.submit(slurm_job(command, log_path)), log_path)
        job.run = run
        self.jobs.append(job)
        self.submitted.append(job)
        return job

    def take_over(self, folder, learning_rate, run_seed):
        """The job of a run that a command which ended (a login node rebooted) submitted, if its
        staged folder is here: `(staged folder, what the run is, its job)`. A job that ended
        without the run's record is forgotten, and the run started again."""
        for path in glob.glob(os.path.join(glob.escape(folder), f"{STAGED}slurm:*", SLURM_JOB)):
            run, staged = read_json(path), os.path.dirname(path)
            if (run["learning_rate"], run["run_seed"]) != (learning_rate, run_seed):
                continue
            job = SlurmRun(self.submitit.SlurmJob(self.folder, run["job_id"]),
                           os.path.join(staged, "log.txt"), started=True)
            if job.poll() is not None and not os.path.isfile(os.path.join(staged, RUN_RECORD)):
                say(f"{run['name']}: Slurm job {run['job_id']}, of an earlier command, ended "
                    "without the run's record; starting it again")
                shutil.rmtree(staged, ignore_errors=True)
                return None
            say(f"{run['name']}: taking over Slurm job {run['job_id']}, of an earlier command")
            self.jobs.append(job)
            return staged, run, job
        return None

    def watch(self, running):
        """Says when a run's job starts (its log appears), and every minute the jobs' count."""
        for run in running:
            if not run.process.started and os.path.exists(run.process.log_path):
                run.process.started = True
                say(f"{run.name}: Slurm job {run.process.job.job_id} started")
        if time.monotonic() - self.said_at >= PROGRESS_SECONDS:
            self.said_at = time.monotonic()
            if self.outlive:  # submitit asks sacct less often as jobs age: up to every 10 min
                self.submitit.SlurmJob.watcher.update()
            ended = sum(job.returncode is not None for job in self.jobs)
            running = sum(job.started and job.returncode is None for job in self.jobs)
            say(f"{self.task_name}: Slurm jobs: {len(self.jobs) - running - ended} pending, "
                f"{running} running, {ended} ended")


SLURM_JOB = "slurm_job.json"  # in a run's staged folder: the id of the job that runs it
# --slurm's keys that are submitit's parameters, with their types; any other goes to sbatch.
SLURM_PARAMETERS = {"partition": ("slurm_partition", str), "time": ("timeout_min", int),
                    "gpus": ("gpus_per_node", int), "cpus": ("cpus_per_task", int),
                    "mem": ("mem_gb", float), "account": ("slurm_account", str),
                    "qos": ("slurm_qos", str)}


def slurm_parameters(items):
    """submitit's parameters from --slurm's `key=value` items: a day's time limit unless given
    (submitit's default is 5 minutes), every key not in SLURM_PARAMETERS as an sbatch option."""
    parameters = {"timeout_min": 1440, "slurm_additional_parameters": {}}
    # absl splits the flag at commas: a piece without `=` goes on the value before (exclude=a,b)
    for item in re.split(r",(?=[^,=]*=)", ",".join(items)) if items else ():
        key, _, value = item.partition("=")
        name, kind = SLURM_PARAMETERS.get(key, (None, str))
        try:
            typed = kind(value) if key and value else None
        except ValueError:
            typed = None
        if typed is None:
            raise GlueError(f"--slurm={item}: give key=value, such as partition=gpu or "
                            "time=240 (minutes)")
        (parameters if name else parameters["slurm_additional_parameters"])[name or key] = typed
    return parameters


class SlurmRun:
    """A run's Slurm job, as the Sweep sees a run's process. `returncode`: the run's exit status,
    or the job's Slurm state when the job itself died (OUT_OF_MEMORY, NODE_FAIL, CANCELLED, ...).
    `send_signal` cancels the job: Slurm sends the run SIGTERM, and it checkpoints and stops."""

    def __init__(self, job, log_path, started=False):
        self.job, self.log_path, self.started, self.returncode = job, log_path, started, None

    def poll(self):
        if self.returncode is None and self.job.done():
            try:
                self.returncode = self.job.result()
            except Exception:  # the job died: the reason is its state
                self.returncode = (self.job.state or "FAILED").split()[0]
        return self.returncode

    def send_signal(self, _):
        if self.returncode is None:
            self.job.cancel(check=False)

    def wait(self):
        while self.poll() is None:
            time.sleep(1)

    def finish(self):
        """A job that died adds its own output (Slurm's lines: an out-of-memory kill, say) to the
        run's log, without submitit's notes."""
        if isinstance(self.returncode, str) and self.job:
            with open(self.log_path, "a", encoding="utf-8") as log:
                for path in (self.job.paths.stdout, self.job.paths.stderr):
                    with contextlib.suppress(OSError), open(path, errors="replace") as output:
                        log.writelines(line for line in output
                                       if not line.startswith("submitit INFO"))


def slurm_job(command, log_path):
    """What a run's job calls on its node: the run's command line as a process, its output added
    to the run's log. On Slurm's USR2 before the time limit or a preemption, submitit calls
    `checkpoint`: the run gets SIGTERM, checkpoints and stops, and the job is requeued to run the
    same command, which resumes. The class is made in here so that submitit's cloudpickle sends
    it whole: the node needs submitit alone, not glue.py on its import path."""

    class RunCommand:
        def __call__(self):
            with open(log_path, "a", encoding="utf-8") as log:
                self.process = subprocess.Popen(  # USR2 is for submitit's process alone
                    command, stdout=log, stderr=subprocess.STDOUT,
                    env={**os.environ, "PYTHONUNBUFFERED": "1"},
                    preexec_fn=lambda: signal.signal(signal.SIGUSR2, signal.SIG_IGN))
                return self.ended()

        def ended(self):  # polled: a blocking wait would hold a lock `checkpoint` needs
            while self.process.poll() is None:
                time.sleep(0.5)
            return self.process.returncode

        def checkpoint(self):
            import submitit
            self.process.send_signal(signal.SIGTERM)
            self.ended()
            return submitit.helpers.DelayedSubmission(RunCommand())

    return RunCommand()

# ================================================================================================
# Checking the options before any work: one clear line, before anything is read or trained


flags.register_validator(
    "task_name", lambda names: bool(names) and all(
        name in ("all", "none") or name in TASKS for name in names),
    "each name must be all, none, or a GLUE task: cola, sst2, mrpc, stsb, qqp, mnli, "
    "mnli_matched, mnli_mismatched, qnli, rte, wnli, ax")


def check_options(options, task_names):
    """Fails on bad combinations and paths before any data is read or any minute spent."""
    for name in ("finetuning_model_save_path", "finetuning_model_load_path"):
        path = getattr(options, name)
        if path and not path.endswith(".keras"):
            raise GlueError(f"--{name}={path}: the path must end in `.keras`")
    if options.finetuning_model_load_path:
        if not os.path.isfile(options.finetuning_model_load_path):
            raise GlueError(f"--finetuning_model_load_path={options.finetuning_model_load_path}:"
                            " no such file")
        if len(task_names) != 1 or len(options.learning_rate) != 1 or len(options.seed) != 1:
            raise GlueError("--finetuning_model_load_path takes one task, one --seed and no "
                            "learning-rate sweep (nothing is trained)")
        if options.init_from_finetuned:
            raise GlueError("--init_from_finetuned starts a finetuning, and "
                            "--finetuning_model_load_path skips it: give one of them")
    if options.init_from_finetuned and (not options.init_from_finetuned.endswith(".keras") or
                                        not os.path.isfile(options.init_from_finetuned)):
        raise GlueError(f"--init_from_finetuned={options.init_from_finetuned}: no such `.keras` "
                        "file; give a model saved by --finetuning_model_save_path")
    check_runs(options, task_names)
    if options.data_dir and not os.path.isdir(options.data_dir):
        raise GlueError(f"--data_dir={options.data_dir}: no such folder")
    if looks_like_path(options.preset) and not os.path.isdir(os.path.expanduser(options.preset)):
        raise GlueError(f"--preset={options.preset}: no such folder; give a KerasHub preset "
                        "folder, a Hugging Face model folder, or a KerasHub preset id")
    if not (task_names or options.submission_directory or options.results_path):
        raise GlueError("--task_name=none makes the results anew from the runs recorded in a "
                        "folder: give its --submission_directory")
    if (options.make_submission_zip or options.fill_missing_from) and \
            not options.submission_directory:
        raise GlueError("--make_submission_zip and --fill_missing_from need --submission_directory")
    if options.fill_missing_from and not os.path.exists(options.fill_missing_from):
        raise GlueError(f"--fill_missing_from={options.fill_missing_from}: no such file or folder")
    check_output_paths(options)
    check_slurm(options)
    check_multi_worker(os.environ.get("TF_CONFIG"))
    limited = [name for name, entry in read_results(options.results_path).items()  # a bad
               if isinstance(entry, dict) and name not in task_names and  # file fails now
               entry.get("fingerprint", {}).get("limit")]
    if options.make_submission_zip and (options.limit or limited):
        raise GlueError(f"--make_submission_zip: {', '.join(limited) or 'this command'} ran with "
                        "--limit, which writes no leaderboard file; zip after runs without it")
    if task_names:
        check_downloads_possible(options, task_names)
    if options.data_dir and len(task_names) > 1:
        check_all_data_files(options, task_names)


def check_all_data_files(options, task_names):
    """Opens and checks every file the tasks will read (paths, headers, labels, indices),
    streaming, so that a bad file of the last task fails now, not hours in."""
    checked = set()
    for name in task_names:
        for dataset, split in task_splits(TASKS[name], not options.finetuning_model_load_path):
            if (dataset, split) not in checked:
                checked.add((dataset, split))
                try:  # as `read_local_split` will, keeping nothing
                    keys = read_local_keys(local_split_path(options.data_dir, dataset, split),
                                           TASKS[dataset], split)
                except GlueError as error:
                    raise GlueError(f"{name}: {error}") from None
                if not len(keys["idx"]):
                    raise GlueError(f"{name}: the {dataset} {split} split is empty")


def check_runs(options, task_names, where=""):
    """The runs asked for make sense: a sweep needs a dev set, and no seed may repeat or meet a
    restart seed. `where`: what set them, for the line (a recipe's task)."""
    if len(options.learning_rate) * len(options.seed) > 1 and any(
            not TASKS[name].eval_splits for name in task_names):
        raise GlueError(f"{where}ax has no dev set to choose a run by; give one --learning_rate "
                        "and one --seed, or run mnli, which also writes AX.tsv")
    seeds = [int(seed) for seed in options.seed]
    clashes = [(seed, other) for seed in seeds for other in seeds
               if 0 < (other - seed) / RESTART_SEED_STEP <= options.max_restarts and
               (other - seed) % RESTART_SEED_STEP == 0]
    if len(set(seeds)) < len(seeds) or clashes:
        clash = f"{clashes[0][1]} is a restart seed of {clashes[0][0]}" if clashes else \
            "a seed repeats"
        raise GlueError(f"{where}--seed={','.join(options.seed)}: {clash} under --max_restarts="
                        f"{options.max_restarts} (restart k of seed s uses s + 1000 k); give "
                        "other seeds")


def check_output_paths(options):
    """Every folder the run will write to exists or can be made, and takes a file."""
    folders = [(flag, getattr(options, flag)) for flag in flags_with("writes")]
    for flag in flags_with("writes_file"):
        path = getattr(options, flag)
        if path and os.path.isdir(path):
            raise GlueError(f"--{flag}={path} is a folder; give a file path")
        folders.append((flag, path and (os.path.dirname(os.path.abspath(path)))))
    for flag, folder in folders:  # it exists, or can be made, and takes files (none made yet)
        if not folder:
            continue
        existing = os.path.abspath(folder)
        while not os.path.exists(existing):
            existing = os.path.dirname(existing)
        if not os.path.isdir(existing):
            raise GlueError(f"--{flag}: {existing} is a file, not a folder; give a folder path "
                            "(it is made if missing)")
        if not os.access(existing, os.W_OK | os.X_OK):
            raise GlueError(f"--{flag}: cannot write in {existing}; give a writable folder")


def check_slurm(options):
    """--launcher=slurm can run: submitit is installed, --slurm reads, and every folder a job
    reads or writes is one the compute nodes can reach, not a machine's own /tmp."""
    if options.slurm and options.launcher != "slurm":
        raise GlueError("--slurm sets the resources of Slurm jobs: give --launcher=slurm too")
    if options.launcher != "slurm":
        return
    if not importlib.util.find_spec("submitit"):
        raise GlueError("--launcher=slurm needs submitit: pip install submitit")
    slurm_parameters(options.slurm)
    if not (options.submission_directory or options.results_path):
        raise GlueError("--launcher=slurm: give --submission_directory, on a filesystem the "
                        "compute nodes share; the runs write their records there")
    local = tuple(os.path.realpath(folder) + os.sep for folder in (
        "/tmp", "/var/tmp", "/dev/shm", tempfile.gettempdir()))
    for name in (*flags_with("writes", "writes_file", "folder", "file"), "data_dir"):
        path = getattr(options, name)  # a KerasHub preset id is no path, wherever it is run
        if path and (name != "preset" or looks_like_path(path)) and (os.path.realpath(
                os.path.expanduser(path)) + os.sep).startswith(local):
            raise GlueError(f"--launcher=slurm: --{name}={path} is in this machine's own "
                            "temporary folder, which compute nodes cannot reach; give a folder "
                            "on a shared filesystem")


def check_downloads_possible(options, task_names):
    """Offline, fails at once, naming everything that cannot be downloaded and the flags that
    fix it: tensorflow-datasets would retry for minutes first. Told without loading it or
    KerasHub: what they have downloaded before sits in their folders."""
    datasets = set() if options.data_dir else {
        TASKS[dataset].tfds_name for name in task_names for dataset, _ in task_splits(TASKS[name])}
    folder = os.path.expanduser(os.environ.get("TFDS_DATA_DIR", "~/tensorflow_datasets"))
    missing = sorted(dataset for dataset in datasets
                     if not glob.glob(os.path.join(folder, dataset, "*", "dataset_info.json")))
    problem = missing and download_problem(missing[0], GLUE_HOST)
    kaggle = os.path.expanduser(os.environ.get("KAGGLEHUB_CACHE", "~/.cache/kagglehub"))
    preset_missing = not looks_like_path(options.preset) and "://" not in options.preset and \
        not glob.glob(os.path.join(kaggle, "models", "*", "*", "*", options.preset, "*",
                                   "config.json"))  # a KerasHub id, from Kaggle
    if problem:
        raise GlueError(f"{problem}; and cannot load preset {options.preset!r} (not downloaded "
                        "before). Pass --data_dir=<folder in the glue_data/ layout> and "
                        "--preset=<local preset or model folder>" if preset_missing else
                        f"{problem}; pass --data_dir=<folder in the glue_data/ layout> to read "
                        "local GLUE files instead")
    if preset_missing and download_problem(options.preset, KAGGLE_HOST):
        raise GlueError(f"cannot load preset {options.preset!r} (not downloaded before, and "
                        f"{KAGGLE_HOST} is unreachable); download it where you have network and "
                        "pass --preset=<local dir>")


def explain_preset_failure(preset, error):
    try:  # A preset whose backbone loads but whose text classes do not is no text encoder.
        backbone = keras_hub.models.Backbone.from_preset(preset, load_weights=False)
    except Exception:
        backbone = None
    if backbone is not None and not is_text_backbone(backbone):
        return (f"preset {preset!r} holds a {type(backbone).__name__}, not a text encoder; "
                "GLUE needs one (BERT, RoBERTa, DistilBERT, DeBERTaV3, ...)")
    return (f"cannot load preset {preset!r} ({first_line(error)}); download it where you have "
            "network and pass --preset=<local dir>")


def looks_like_path(preset):
    return "://" not in preset and (os.sep in preset or preset.startswith((".", "~")))


def check_save_path(options, root, task_names):
    """A save path without `{task}` is one file, for one task's model: refused at start when
    several tasks would save theirs there (this command's, a folder's under --task_name=none,
    or one whose model the results say an earlier command saved there)."""
    path = options.finetuning_model_save_path
    if not path or "{task}" in path or options.finetuning_model_load_path:
        return
    there = [name for name, entry in read_results(options.results_path).items()
             if isinstance(entry, dict) and entry.get("saved_model") == os.path.abspath(path)]
    there = there if os.path.isfile(path) else []  # a model there now, not one moved away
    tasks = sorted({*(task_names or recorded_settings(root)), *there})
    if len(tasks) > 1:
        already = f"; {there[0]}'s is there already: move it away, or" if there else ";"
        raise GlueError(f"--finetuning_model_save_path={path} is one file for the models of "
                        f"{len(tasks)} tasks ({', '.join(tasks)}){already} put {{task}} in "
                        f"it for a file per task: {path.removesuffix('.keras')}_{{task}}.keras")


def check_multi_worker(tf_config):
    """Multi-worker training is retired; a TF_CONFIG of one task (what single-node platforms
    set) is no cluster, and runs as before."""
    with contextlib.suppress(ValueError, AttributeError, TypeError):
        cluster = json.loads(tf_config or "{}").get("cluster") or {}
        if sum(len(addresses) for addresses in cluster.values()) > 1:
            raise GlueError(f"TF_CONFIG names a cluster of several workers: {MULTI_WORKER}")


def check_devices_fit(options, task_names, settings):
    """What the devices cannot do, said before any work: accumulating gradients over several
    replicas (Keras 3.15 fails inside its update, keras-team/keras#20582), and more runs at once
    than there are GPUs or cores to share out."""
    gpus, cores = gpu_count(), available_cores()
    if options.parallel_runs > 1 and strategy_and_tpu(options.distribution_strategy)[0] == "tpu":
        raise GlueError("--parallel_runs: a TPU runs one run at a time; give 1")
    if options.parallel_runs > (gpus or cores):
        raise GlueError(f"--parallel_runs={options.parallel_runs}: there are "
                        f"{plural(gpus, 'GPU') if gpus else plural(cores, 'core')} to share out; "
                        f"give at most {gpus or cores}")
    replicas = run_devices(options)[1]
    for name in task_names:
        steps = task_options(options, settings[name]).gradient_accumulation_steps
        if steps > 1 and replicas != 1:
            raise GlueError(f"{name}: --gradient_accumulation_steps={steps} needs one replica "
                            f"(Keras cannot accumulate over {replicas}, keras-team/keras#20582); "
                            "give the replicas a larger --batch_size instead")


# The flags' own checks, which absl runs as it parses them.
STRATEGIES = ("auto", "one_device", "mirrored", "tpu")
MULTI_WORKER = ("multi-worker training is retired: every GLUE encoder fits on one machine; use "
                "--parallel_runs=N for several runs at once on one machine, or job arrays (one "
                "seed each) into one shared --submission_directory across machines")


def strategy_and_tpu(value):
    """`--distribution_strategy`'s strategy name, and the TPU named after `tpu:` (else None)."""
    name, _, tpu = value.partition(":")
    return name, tpu or None


def _valid_strategy(value):
    name, _ = strategy_and_tpu(value)
    if name == "multi_worker_mirrored":
        raise flags.ValidationError(MULTI_WORKER)
    return name in STRATEGIES and (name == "tpu" or ":" not in value)


flags.register_validator(
    "distribution_strategy", _valid_strategy,
    f"use {', '.join(STRATEGIES[:-1])} or tpu:<name or grpc://host:port>")

# The comma lists of numbers: (the kind of number, the bound each is above, whether each must
# be given once, what to give). A recipe's lists are judged by the same check
# (`recipe_value_problem`). A repeated seed is check_runs' to explain, with the restart seeds.
NUMBER_LISTS = {"learning_rate": (float, 0, True, "positive numbers"),
                "seed": (int, -1, False, "non-negative integers")}


def numbers_above(kind, above, once):
    def check(values):
        try:
            numbers = [kind(value) for value in values]
        except ValueError:
            return False
        return bool(numbers) and min(numbers) > above and (
            not once or len(set(numbers)) == len(numbers))
    return check


for _name, (_kind, _above, _once, _what) in NUMBER_LISTS.items():
    flags.register_validator(_name, numbers_above(_kind, _above, _once),
                             f"give {_what}{', each once' * _once}, comma-separated")

# ================================================================================================
# Recipes: the per-task settings of a published protocol, for --recipe. Each maps task names
# (and "defaults", for every task) to flags, spelled without dashes, and says in "source" where
# the settings come from. "init_from_task" starts a task from another task's chosen model, in a
# second round. The command line wins over a recipe, a task's entry over "defaults".


def read_recipe(name, flag_values):
    """The recipe `--recipe` names (None for none): a shipped one, or a JSON file. A bad one is
    one line naming its first wrong key."""
    if not name:
        return None
    if name in RECIPES:
        recipe = RECIPES[name]
    elif not os.path.isfile(name):
        raise GlueError(f"--recipe={name}: neither a shipped recipe ({', '.join(RECIPES)}) nor "
                        "a JSON file")
    else:
        try:
            recipe = read_json(name)
        except (OSError, ValueError) as error:
            raise GlueError(f"--recipe={name}: cannot be read as JSON ({error})") from None
    if not isinstance(recipe, dict):
        raise GlueError(f"--recipe={name}: give a JSON object whose keys are task names")
    for key, settings in recipe.items():
        if key == "source" and isinstance(settings, str):
            continue
        if key not in TASKS and key != "defaults":
            raise GlueError(f"--recipe={name}: unknown key {key!r}; the keys are task names "
                            f"({', '.join(TASKS)}), defaults and source (a string)")
        if not isinstance(settings, dict):
            raise GlueError(f"--recipe={name}: {key} must map settings to values")
        for setting, value in settings.items():
            problem = recipe_value_problem(setting, value, flag_values)
            if problem:
                raise GlueError(f"--recipe={name}: {key}.{setting}: {problem}")
    return recipe


RECIPES = {
    "bert": {
        "source": "BERT (Devlin et al. 2019, arXiv:1810.04805, sec. 4.1): batch 32, 3 epochs, "
                  "the best of learning rates {5e-5, 4e-5, 3e-5, 2e-5} on dev for each task",
        "defaults": {"batch_size": 32, "epochs": 3, "learning_rate": [5e-5, 4e-5, 3e-5, 2e-5],
                     "warmup_ratio": 0.1, "weight_decay": 0.01, "clip_norm": 1.0,
                     "max_sequence_length": 128},
    },
    "roberta": {
        "source": "RoBERTa (Liu et al. 2019, arXiv:1907.11692, appendix C): learning rates "
                  "{1e-5, 2e-5, 3e-5}, 10 epochs, 6% warmup, weight decay 0.1, the median of "
                  "5 seeds; RTE, STS-B and MRPC start from the MNLI model. Of the paper's batch "
                  "sizes {16, 32}, each task takes the one of fairseq's "
                  "examples/roberta/README.glue.md (16: RTE, MRPC, CoLA, STS-B; 32: the rest), "
                  "and QQP its 25% warmup; no clipping, as there. Adam's betas (0.9, 0.98) are "
                  "not reproduced",
        "defaults": {"learning_rate": [1e-5, 2e-5, 3e-5], "seed": [1, 2, 3, 4, 5],
                     "epochs": 10, "batch_size": 32, "warmup_ratio": 0.06,
                     "weight_decay": 0.1, "clip_norm": 0.0},
        "rte": {"batch_size": 16, "init_from_task": "mnli"},
        "mrpc": {"batch_size": 16, "init_from_task": "mnli"},
        "stsb": {"batch_size": 16, "init_from_task": "mnli"},
        "cola": {"batch_size": 16},
        "qqp": {"warmup_ratio": 0.25},
    },
    "modernbert": {
        "source": "ModernBERT (Warner et al. 2024, arXiv:2412.13663) and Mosaic BERT's GLUE "
                  "setup: two rounds, RTE, MRPC and STS-B from the MNLI checkpoint; MNLI lr "
                  "5e-5, 2 epochs, batch 64; MRPC lr 8e-5, 10 epochs; RTE lr 1e-5, 3 epochs, "
                  "batch 16; Mosaic's seed counts (5 for RTE, MRPC, STS-B; 4 for CoLA; 3 for "
                  "SST-2; 1 for the large tasks). Settings the sources do not give here keep "
                  "glue.py's defaults",
        "defaults": {"seed": [1]},
        "mnli": {"learning_rate": [5e-5], "epochs": 2, "batch_size": 64},
        "mrpc": {"learning_rate": [8e-5], "epochs": 10, "seed": [1, 2, 3, 4, 5],
                 "init_from_task": "mnli"},
        "rte": {"learning_rate": [1e-5], "epochs": 3, "batch_size": 16,
                "seed": [1, 2, 3, 4, 5], "init_from_task": "mnli"},
        "stsb": {"seed": [1, 2, 3, 4, 5], "init_from_task": "mnli"},
        "cola": {"seed": [1, 2, 3, 4]},
        "sst2": {"seed": [1, 2, 3]},
    },
}


def recipe_value_problem(setting, value, flag_values):
    """What is wrong with one recipe value (None: nothing), judged as its flag would be."""
    if setting == "init_from_task":
        return None if value in TASKS else f"{value!r} is not a task name"
    if setting not in flags_with("recipe"):
        return f"unknown setting; a recipe sets {', '.join(flags_with('recipe'))} and " \
            "init_from_task"
    if setting in NUMBER_LISTS:
        kind, above, _, what = NUMBER_LISTS[setting]
        return None if isinstance(value, list) and all(
            type(item) in (int, float) for item in value) and numbers_above(kind, above, True)(
            [str(item) for item in value]) else f"give a list of {what}, each once, got {value!r}"
    flag = flag_values[setting]
    kind, wanted = {"bool": (bool, "true or false"), "int": (int, "an integer"),
                    "float": ((int, float), "a number")}[flag.flag_type()]
    if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
        return f"give {wanted}, got {value!r}"
    try:
        flag.parser.parse(value)  # its bounds
    except ValueError as error:
        return str(error)
    return None


def recipe_values(recipe, task_name, given, flag_values):
    """The settings a recipe gives one task: its "defaults", then the task's own entry (else
    that of the task it trains on: mnli's for mnli_matched, mnli_mismatched and ax), less the
    flags given on the command line (`given`), which win (--init_from_finetuned wins over
    init_from_task); each as its flag holds it (a list of strings, 0 as 0.0 for a float)."""
    own = recipe and recipe.get(task_name, recipe.get(TASKS[task_name].training_data, {}))
    values = {**recipe.get("defaults", {}), **own} if recipe else {}
    if "init_from_finetuned" in given:
        values.pop("init_from_task", None)
    return {name: [str(item) for item in value] if isinstance(value, list) else
            value if name == "init_from_task" else flag_values[name].parser.parse(value)
            for name, value in values.items() if name not in given}


def in_rounds(task_names, settings):
    """The tasks in the order they can run: a task that starts from another task's chosen model
    comes after that task (in its second round); otherwise as asked. A recipe whose tasks start
    from each other is refused even if this command runs only some of them."""
    for name in settings:
        if settings[name].get("init_from_task") == name:
            raise GlueError(f"--recipe: {name} cannot start from its own model")
    for names in (list(settings), task_names):  # the whole recipe first, for its loops
        ordered, waiting = [], list(names)
        while waiting:
            ready = [name for name in waiting
                     if settings[name].get("init_from_task") not in waiting]
            if not ready:
                raise GlueError(f"--recipe: {', '.join(waiting)} start from each other's "
                                "models; give init_from_task a task that does not start from them")
            ordered += ready
            waiting = [name for name in waiting if name not in ready]
    return ordered


def check_task_settings(options, task_names, settings):
    """Each task's runs make sense with its recipe settings too (`check_runs`; check_options
    checked the command line's), a warm start is a finetuning, which
    --finetuning_model_load_path skips, and the devices can run them."""
    for name in task_names:
        if settings[name].get("init_from_task") and options.finetuning_model_load_path:
            raise GlueError(f"{name}: the recipe starts it from another task's model, and "
                            "--finetuning_model_load_path skips finetuning: give one of them")
        if settings[name]:
            check_runs(task_options(options, settings[name]), [name],
                       where=f"{name}, with the recipe: ")
    check_devices_fit(options, task_names, settings)


def check_recorded_runs(options, root, task_names, settings):
    """At start, each task whose settings are known now (not one that starts, directly or not,
    from a task of this command): the model it starts from is there, and no asked run meets a
    recorded restart (`check_restart_seeds`). Returns their settings, warm start in place."""
    known = {}
    for name in task_names:
        source = settings[name].get("init_from_task")
        while source and source not in task_names:
            source = settings[source].get("init_from_task")
        if source:
            continue
        try:
            task, values = TASKS[name], with_warm_start(options, root, name, settings)
            run_options = task_options(options, values)
            folder = records_folder(root, task, fingerprint_id(
                fingerprint(task, run_options, run_devices(options))))
            check_restart_seeds(read_records(folder), asked_runs(run_options),
                                run_options.max_restarts)
        except GlueError as error:
            raise GlueError(f"{name}: {error}") from None
        known[name] = values
    return known


def chosen_model(options, root, task_name, settings, for_task):
    """The model `for_task` starts from: that of `task_name`'s chosen run under the settings
    this command gives it (its recipe's), as its run folder kept it; a line if there is none."""
    task, values = TASKS[task_name], with_warm_start(options, root, task_name, settings)
    source = fingerprint(task, task_options(options, values), run_devices(options))
    folder = records_folder(root, task, fingerprint_id(source))
    records = read_records(folder)
    if not chains(records):
        raise GlueError(f"init_from_task: {task_name} has no recorded runs with this command's "
                        "settings for it to start from; run it in the same command (or before, "
                        "into the same folder)")
    chosen = summarized(records)["submitted_run"]
    path = run_model(folder, chosen)
    if not os.path.isfile(path):
        raise GlueError(f"init_from_task: {task_name}'s chosen run kept no model at {path}; add "
                        f"{task_name} to this command, which trains that run alone again")
    say(f"{for_task}: starts from {task_name}'s chosen run ({describe_run(chosen)}, settings "
        f"{fingerprint_id(source)})")
    return path


def with_warm_start(options, root, task_name, settings):
    """A task's recipe settings in this command, with the model its init_from_task names (that
    task's chosen run's) in place as --init_from_finetuned."""
    values = dict(settings[task_name])
    if values.get("init_from_task"):
        values["init_from_finetuned"] = chosen_model(options, root, values["init_from_task"],
                                                     settings, task_name)
    return values


def task_options(options, values):
    """The options of one task: `options`, with its recipe's `values` (parsed as their flags
    parse them, see `recipe_values`) in place."""
    return types.SimpleNamespace(**{**vars(options), **{
        name: value for name, value in values.items() if name != "init_from_task"}})

# ================================================================================================
# Runs and fingerprints. A run is one (learning rate, seed) pair inside a task. A task's
# fingerprint holds everything else that shapes its models and numbers: the settings, the
# code, the contents of the files it reads, the libraries and the devices. Runs are recorded,
# reused, resumed and summarized only under the same one.


def fingerprint(task, options, devices):
    """What a task's runs depend on, besides their learning rate and seed: every flag its runs
    get (a researcher's own flags too), except the uncounted ones (see `define`); the contents of
    the files they read; the code; the libraries; and `devices`, the (strategy, replicas)."""
    settings = {name: getattr(options, name) for name in run_flag_names(vars(options))
                if name not in flags_with("uncounted", "folder", "file")}
    settings.update({name: file_id(getattr(options, name))
                     for name in flags_with("folder", "file")})
    settings["data"] = {f"{dataset} {split}": contents_id(local_split_path(
        options.data_dir, dataset, split)) if options.data_dir else "tensorflow-datasets"
        for dataset, split in task_splits(task, not options.finetuning_model_load_path)}
    settings["code"] = code_ids()
    packages = installed_packages()  # versions read, not imported: keras-hub takes seconds
    settings["versions"] = {"python": ".".join(platform.python_version_tuple()[:2]), **{
        name: importlib.metadata.version(packages[name][0])
        for name in ("tensorflow", "keras", "keras_hub", "tensorflow_datasets")}}
    settings["strategy"], settings["replicas"] = devices
    return settings


# Which installed distribution gives each importable name: 0.1 s to find, once for a command.
installed_packages = functools.cache(importlib.metadata.packages_distributions)


def file_id(path):
    """A local file or folder by its contents; anything else (a preset id, None) as it is."""
    return contents_id(path) if path and os.path.exists(os.path.expanduser(path)) else path


@functools.cache
def code_ids():
    """`{name: id}` of every definition in CODE_ROOTS' reach, from this file's syntax tree
    written back as code (comments, docstrings, line breaks and line numbers do not count), and
    `{file: contents id}` of the researcher's own modules it imports (`own_modules`)."""
    path = os.path.abspath(__file__)
    with open(path, encoding="utf-8") as file:
        tree = ast.parse(file.read())
    definitions = {}
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            definitions[node.name] = node
        elif isinstance(node, ast.Assign):
            definitions.update({target.id: node for target in node.targets
                                if isinstance(target, ast.Name)})
    ids, todo = {}, list(CODE_ROOTS)
    while todo:
        name = todo.pop()
        if name in ids or name not in definitions or name in CODE_LEFT_OUT:
            continue
        node = definitions[name]
        for inner in ast.walk(node):  # docstrings do not count
            if isinstance(inner, (ast.FunctionDef, ast.ClassDef)) and \
                    ast.get_docstring(inner, clean=False) is not None:
                inner.body = inner.body[1:] or [ast.Pass()]
        ids[name] = hashlib.sha256(ast.unparse(node).encode()).hexdigest()[:12]
        todo += [used.id for used in ast.walk(node) if isinstance(used, ast.Name)]
    ids.update({file.removeprefix(os.path.dirname(path) + os.sep): contents_id(file)
                for file in own_modules(path)})
    return dict(sorted(ids.items()))


def contents_id(path):
    """`sha256:<hex>` of a file's bytes, or of a folder's file names and bytes (hidden files
    left out): a file replaced at the same path changes it, a folder moved does not."""
    path = os.path.abspath(os.path.expanduser(path))
    if not os.path.isdir(path):
        return f"sha256:{file_digest(path)[:16]}"
    digest = hashlib.sha256()
    for folder, subfolders, files in os.walk(path):
        subfolders[:] = sorted(name for name in subfolders if not name.startswith("."))
        for name in sorted(name for name in files if not name.startswith(".")):
            file = os.path.join(folder, name)
            digest.update(f"{os.path.relpath(file, path)}\0{file_digest(file)}\0".encode())
    return f"sha256:{digest.hexdigest()[:16]}"


def file_digest(path):
    stat = os.stat(path)
    return digest_of_file(path, stat.st_size, stat.st_mtime_ns)


@functools.cache
def digest_of_file(path, size, mtime_ns):
    """Each file is read once a process, however many tasks share it (a changed file has
    another size or modification time, and is read again)."""
    with open(path, "rb") as file:
        return hashlib.file_digest(file, "sha256").hexdigest()


# The code that shapes the numbers: the custom code blocks, how data is read and tokenized, and
# how a model is trained, evaluated and predicts test, with every definition of this file they
# use, followed name by name. Definitions that only print or explain are left out.
CODE_ROOTS = ("make_preprocess_fn", "load_pretrained_model", "make_finetuning_model",
              "load_task_data", "tokenize_task_data", "starting_model", "make_optimizer",
              "compile_for", "finetune", "DevEvaluations", "evaluate", "main",
              "predict_test", "make_strategy")
CODE_LEFT_OUT = ("say", "Progress", "TrainingProgress", "GlueError",
                 "explain_preset_failure", "first_line", "training_flops", "clock",
                 "seconds_since", "TensorBoardLogs", "Preempted", "run_sweep",
                 "HELP_GROUPS", "RUN_FLAGS", "report_run", "write_run")


def own_modules(script):
    """The files of the modules `script` imports, and those they import in turn, outside the
    Python installation (whose packages count by their versions): a researcher's own, beside
    glue.py, on PYTHONPATH or installed editable. Found by the standard library's modulefinder,
    which reads code without running it: a module named only at run time is not seen."""
    installed = tuple(os.path.realpath(folder) + os.sep for folder in (
        os.path.dirname(os.__file__), *site.getsitepackages(), site.getusersitepackages()))

    def own(path):
        return not (os.path.realpath(path) + os.sep).startswith(installed)

    search = [os.path.dirname(script), *filter(own, filter(os.path.isdir, sys.path))]
    while True:
        finder = modulefinder.ModuleFinder(search)
        finder.run_script(script)
        hooked = set()  # an editable install may be found through an import hook alone
        for name in (name for name in finder.badmodules if "." not in name):
            with contextlib.suppress(ImportError, ValueError):
                spec = importlib.util.find_spec(name)  # the package itself is not imported
                if spec and spec.has_location and own(spec.origin):
                    hooked.add(os.path.dirname(spec.submodule_search_locations[0] if
                                               spec.submodule_search_locations else spec.origin))
        if hooked <= set(search):
            return sorted({module.__file__ for module in finder.modules.values()
                           if module.__file__} - {script})
        search += sorted(hooked - set(search))


def changed_settings(old, new):
    """What differs between two fingerprints, in words: `the code of GlueClassifier changed`,
    `--preset folder contents changed`, `epochs 2 -> 3`."""
    if not old or "code" not in old:
        return "the recorded results were made by an older glue.py"
    changes = []
    for name in sorted(set(old) | set(new)):
        before, after = old.get(name), new.get(name)
        if before == after:
            continue
        parts = ", ".join(sorted(key for key in set(before) | set(after)
                                 if before.get(key) != after.get(key))) \
            if isinstance(before, dict) and isinstance(after, dict) else ""
        if name == "code":
            changes.append(f"the code of {parts} changed")
        elif name == "data":
            changes.append(f"--data_dir files changed ({parts})")
        elif name == "versions":
            changes.append(", ".join(f"{part} {before.get(part)} -> {after.get(part)}"
                                     for part in parts.split(", ")))
        elif name in flags_with("folder", "file") and all(
                str(value).startswith("sha256:") for value in (before, after)):
            changes.append(f"--{name} {FLAG_ROLES[name][0]} contents changed")
        else:
            changes.append(f"{name} {before!r} -> {after!r}")
    return "; ".join(changes)


def asked_runs(options):
    """The (learning rate, seed) pairs asked for, rate by rate; no learning rate when nothing
    is trained."""
    seeds = [int(seed) for seed in options.seed]
    if options.finetuning_model_load_path:
        return [(None, seeds[0])]
    return [(float(rate), seed) for rate in options.learning_rate for seed in seeds]


def run_key(run):
    return run["learning_rate"], run["seed"]


def needs_run(chain, max_restarts):
    """Whether an asked run has work left: not run yet, or collapsed with restarts left."""
    return not chain or (bool(chain[-1].get("collapsed")) and len(chain) - 1 < max_restarts)


RESTART_SEED_STEP = 1000  # the k-th restart of seed s uses s + 1000 k: no process repeats one


def describe_run(run):
    rate = "no training" if run["learning_rate"] is None else f"lr {run['learning_rate']:g}"
    return f"{rate}, seed {run['seed']}"


def fingerprint_id(settings):
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:10]

# ================================================================================================
# Devices: one tf.distribute strategy for a run. The custom code blocks and the optimizer run
# inside its scope; Keras splits each global batch across its replicas.


def make_strategy(value, tpu_timeout_seconds=600):
    """The strategy `--distribution_strategy=value` asks for, on the devices this process sees."""
    name, tpu = strategy_and_tpu(value)
    if name == "tpu":
        return tpu_strategy(tpu, tpu_timeout_seconds)
    gpus = [device.name for device in tf.config.list_logical_devices("GPU")]
    devices = gpus or [device.name for device in tf.config.list_logical_devices("CPU")]
    kind, _ = planned_strategy(value, len(gpus), len(devices))
    return {"_DefaultDistributionStrategy": tf.distribute.get_strategy,
            "OneDeviceStrategy": lambda: tf.distribute.OneDeviceStrategy(devices[0]),
            "MirroredStrategy": lambda: tf.distribute.MirroredStrategy(devices)}[kind]()


def planned_strategy(value, gpus, cpus):
    """`(the strategy's class, its replicas)` that --distribution_strategy=value makes with
    `gpus` GPUs, or else `cpus` CPU devices, in view: the one decision, which a run acts on and
    its command foresees for the fingerprint (`run_devices`)."""
    name, _ = strategy_and_tpu(value)
    if name == "tpu":
        return "TPUStrategy", "the TPU's"
    if name == "one_device":
        return "OneDeviceStrategy", 1
    if name == "auto" and gpus < 2:
        return "_DefaultDistributionStrategy", 1
    if name in ("auto", "mirrored"):
        return "MirroredStrategy", gpus or cpus
    raise GlueError(f"unknown distribution strategy {name!r}; use one of {', '.join(STRATEGIES)}")


def tpu_strategy(tpu, timeout_seconds):
    try:
        resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=tpu)
        with watchdog(timeout_seconds, f"the TPU {tpu or resolver.master()} did not answer "
                      f"within --tpu_timeout_seconds={timeout_seconds}; check the address in "
                      "--distribution_strategy=tpu:<address>"):
            tf.config.experimental_connect_to_cluster(resolver)
            tf.tpu.experimental.initialize_tpu_system(resolver)
    except (ValueError, RuntimeError, tf.errors.OpError) as error:
        raise GlueError(f"cannot reach the TPU {tpu or '(none given)'} ({first_line(error)}); "
                        "pass --distribution_strategy=tpu:<TPU name or grpc://host:port>, or "
                        "tpu:local on a TPU VM") from None
    return tf.distribute.TPUStrategy(resolver)


@contextlib.contextmanager
def watchdog(seconds, message):
    """Ends this process with `message` unless the block is done within `seconds`.

    For TensorFlow's wait for a TPU, which lasts forever by default, holds the GIL (so no
    Python thread could step in) and ignores SIGTERM: a separate process kills this one."""
    code = ("import os, select, signal, sys\n"
            "if not select.select([sys.stdin], [], [], float(sys.argv[2]))[0]:\n"
            "    print('glue.py: error: ' + sys.argv[3], file=sys.stderr, flush=True)\n"
            "    os.kill(int(sys.argv[1]), signal.SIGKILL)\n")
    guard = subprocess.Popen([sys.executable, "-c", code, str(os.getpid()), str(seconds),
                              message], stdin=subprocess.PIPE)
    try:
        yield
    finally:
        guard.stdin.close()  # the guard sees end-of-file and leaves quietly
        guard.wait()


def run_devices(options):
    """`(strategy, replicas)` as a run of this command will make them, for its fingerprint:
    foreseen from the devices' count alone, since the command itself sets up no device. On CPU
    one device, unless what runs glue.py set more up (tests/with_cpu_devices.py)."""
    gpus = slurm_parameters(options.slurm).get("gpus_per_node", 0) \
        if options.launcher == "slurm" else gpu_count() // options.parallel_runs  # a job's
    return planned_strategy(options.distribution_strategy, gpus,
                            len(tf.config.list_logical_devices("CPU"))
                            if "tensorflow" in sys.modules else 1)


def gpu_count():
    """The GPUs a run will see, as CUDA_VISIBLE_DEVICES or NVIDIA's driver lists them."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return 0 if visible.strip() in ("", "-1") else len(visible.split(","))
    return len(glob.glob("/proc/driver/nvidia/gpus/*"))

# ================================================================================================
# Checkpoints: resuming exactly after a crash or preemption


@keras_subclass("callbacks.Callback")
class TrainingCheckpoints:
    """Saves the whole training state every `every_steps` steps, at each epoch's end, and at the
    step boundary after SIGTERM or Ctrl-C, into `directory` (None: nowhere); `restore` returns
    the number of batches to resume after.

    The state is every model variable (dropout seeds included, which Keras' weight files leave
    out), every optimizer variable, the number of batches trained, the dev evaluations so far
    and the best one's weights: one file per checkpoint, written atomically, so a kill at any
    instant resumes to the same best evaluation. The count of batches, not the optimizer's
    step, says where to resume: under mixed_float16 the loss-scale optimizer does not count the
    steps it skips.
    """

    def __init__(self, directory, evaluations, every_steps=0):
        super().__init__()
        self.directory = directory
        self.evaluations = evaluations  # the run's dev evaluations and count, saved alongside
        self.every_steps = every_steps
        self.stopped_by = None  # the signal that asked training to stop

    def paths(self):
        return sorted(glob.glob(os.path.join(self.directory, "step-*.npz")))

    def state(self, model):
        return model.variables + model.optimizer.variables

    def restore(self, model):
        if not self.directory or not self.paths():
            return 0
        with np.load(self.paths()[-1]) as saved:
            arrays = [saved[f"arr_{i}"] for i in range(sum(  # np.savez's unnamed arrays, in order
                name.startswith("arr_") for name in saved.files))]
            batches = int(saved["batches"]) if "batches" in saved.files else None
            evaluations = json.loads(str(saved["evaluations"])) \
                if "evaluations" in saved.files else []
            best = [saved[name] for name in sorted(
                (name for name in saved.files if name.startswith("best_")),
                key=lambda name: int(name.removeprefix("best_")))]
        state = self.state(model)
        if batches is None or [a.shape for a in arrays] != [tuple(v.shape) for v in state]:
            raise GlueError(f"{self.paths()[-1]} is a checkpoint of another model or setting; "
                            "delete it or pass another --checkpoint_dir")
        for variable, array in zip(state, arrays):
            variable.assign(array)
        self.evaluations.resume(batches, evaluations, best or None)
        return batches

    def save(self):
        if not self.directory:
            return
        batches = self.evaluations.batches
        path = os.path.join(self.directory, f"step-{batches:09d}.npz")
        arrays = [np.asarray(variable) for variable in self.state(self.model)]
        evaluations = json.dumps(self.evaluations.records)
        best = self.evaluations.best_weights or []
        write_atomically(path, lambda temporary: np.savez(
            temporary, *arrays, batches=np.array(batches),
            evaluations=np.array(evaluations),
            **{f"best_{i}": weight for i, weight in enumerate(best)}))
        for older in self.paths():
            if older != path:
                os.remove(older)

    def on_train_batch_end(self, batch, logs=None):
        if self.stopped_by or (self.every_steps and
                               self.evaluations.batches % self.every_steps == 0):
            self.save()
        if self.stopped_by:
            self.model.stop_training = True

    def on_epoch_end(self, epoch, logs=None):
        if not self.stopped_by:
            self.save()

    def stopping_on_signals(self):
        """While active, SIGTERM (what preemption sends, and a command to its runs when it is
        stopped) or Ctrl-C asks training to stop at the next step boundary."""
        return on_stop_signals(lambda name: setattr(self, "stopped_by", self.stopped_by or name))


@contextlib.contextmanager
def on_stop_signals(stop):
    """While active, SIGTERM and SIGINT (Ctrl-C) call `stop(the signal's name)` instead of
    ending the process."""
    previous = {number: signal.signal(number, lambda number, frame: stop(
        signal.Signals(number).name)) for number in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)

# ================================================================================================
# Progress: lines that a person at a terminal, or tailing a log file, can follow; speed


@keras_subclass("callbacks.Callback")
class TrainingProgress:
    """A header per epoch, progress lines with the running loss, and a summary per epoch."""

    def __init__(self, label, epochs, steps_per_epoch, batch_size, num_examples):
        super().__init__()
        self.label, self.epochs, self.steps = label, epochs, steps_per_epoch
        self.batch_size, self.num_examples = batch_size, num_examples
        self.resumed_steps = 0  # steps of the coming epoch trained before a resume

    def on_epoch_begin(self, epoch, logs=None):
        self.progress = Progress(f"{self.label}  epoch {epoch + 1}/{self.epochs}", self.steps,
                                 start=self.resumed_steps, quiet_seconds=0)
        resumed = f", resuming after step {self.resumed_steps}" if self.resumed_steps else ""
        say(f"{self.progress.label}: {self.steps} steps of {self.batch_size} examples{resumed}")

    def on_train_batch_end(self, batch, logs=None):
        self.progress.update(self.resumed_steps + batch + 1, (batch + 1) * self.batch_size,
                             lambda: f"loss {float(logs['loss']):.4f}  ")

    def on_epoch_end(self, epoch, logs=None):
        loss = f", loss {float(logs['loss']):.4f}" if logs else ""
        if self.resumed_steps:  # a part of an epoch: count its steps, not its examples
            self.progress.summary(self.steps - self.resumed_steps, "steps", loss)
        else:
            self.progress.summary(self.num_examples, "ex", loss)
        self.resumed_steps = 0


@keras_subclass("callbacks.Callback")
class TensorBoardLogs:
    """One run's TensorBoard event files, laid out as Keras' own `TensorBoard` callback lays
    them out (`train/` and `validation/`; tags `batch_loss`, `epoch_loss`,
    `epoch_learning_rate`, ...), but with the step the number of batches trained, carried over
    a resume: the curves of a sweep's runs line up, and a resumed run continues its own. (Keras'
    callback restarts its step at every `fit`, logs epochs at `step=epoch`, and logs no
    learning rate per batch.)

    As a context manager, it closes (and flushes) its writers however the run ends: glue.py
    leaves through `os._exit`, which would lose unflushed events.
    """

    def __init__(self, folder, steps_per_epoch, batch_size, evaluations):
        super().__init__()
        self.every, self.batch_size = max(steps_per_epoch // 100, 1), batch_size
        self.evaluations = evaluations  # their records, and the count of batches trained
        self.logged = len(evaluations.records)  # those logged before the checkpoint
        resumed_batches = evaluations.batches
        kinds = ("train", "validation")
        for kind in kinds:
            if resumed_batches:
                drop_events_after(os.path.join(folder, kind), resumed_batches)
            else:
                shutil.rmtree(os.path.join(folder, kind), ignore_errors=True)
        self.writers = {kind: tf.summary.create_file_writer(os.path.join(folder, kind))
                        for kind in kinds}
        self.last_point = self.epoch_start = (time.perf_counter(), resumed_batches)

    def __enter__(self):
        return self

    def __exit__(self, *exception):
        for writer in self.writers.values():
            writer.close()

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch_start = (time.perf_counter(), self.evaluations.batches)

    def on_train_batch_end(self, batch, logs=None):
        if self.evaluations.batches % self.every == 0 or \
                time.perf_counter() - self.last_point[0] >= PROGRESS_SECONDS:
            self.log_training("batch", logs, self.last_point)
        for record in self.evaluations.records[self.logged:]:
            self.log_evaluation(record)
            self.logged += 1

    def on_epoch_end(self, epoch, logs=None):
        self.log_training("epoch", logs, self.epoch_start)

    def log_training(self, prefix, logs, since):
        now, batches = time.perf_counter(), self.evaluations.batches
        self.write("train", batches, {
            f"{prefix}_loss": float(logs["loss"]),
            f"{prefix}_learning_rate": float(self.model.optimizer.learning_rate),
            f"{prefix}_examples_per_second": Progress.per_second(
                (batches - since[1]) * self.batch_size, now - since[0], unit=None)})
        self.last_point = (now, batches)

    def log_evaluation(self, record):
        splits = dev_metrics(record)
        scalars = {f"epoch_{metric}" + (f"_{split.removeprefix('validation_')}"
                                        if len(splits) > 1 else ""): value
                   for split, metrics in splits.items() for metric, value in metrics.items()
                   if value is not None}
        self.write("validation", record["step"], {**scalars, "epoch_task_score": run_score(record)})

    def write(self, kind, step, scalars):
        # tf.summary.scalar is TensorBoard's, which TensorFlow no longer installs: this writes
        # what it writes, through TensorFlow's own tf.summary.write.
        metadata = tf.compat.v1.SummaryMetadata(
            plugin_data=tf.compat.v1.SummaryMetadata.PluginData(plugin_name="scalars"),
            data_class="DATA_CLASS_SCALAR").SerializeToString()
        with self.writers[kind].as_default(step=step):
            for tag, value in scalars.items():
                tf.summary.write(tag, tf.constant(value, tf.float32), metadata=metadata)
        self.writers[kind].flush()  # a killed run keeps what it logged


def drop_events_after(folder, last_step):
    """Rewrites a folder's event files without the events after `last_step`: what a killed run
    logged past its last checkpoint, and its resumed run will log again."""
    paths = sorted(glob.glob(os.path.join(folder, "events.out.tfevents.*")))
    kept = []
    for path in paths:
        with contextlib.suppress(tf.errors.DataLossError):  # a last record cut short by a kill
            for record in tf.data.TFRecordDataset(path):
                if tf.compat.v1.Event.FromString(record.numpy()).step <= last_step:
                    kept.append(record.numpy())
    if not paths:
        return

    def write(temporary):
        with tf.io.TFRecordWriter(temporary) as writer:
            for record in kept:
                writer.write(record)

    # Named after the oldest file, so that TensorBoard reads it before the new writer's.
    write_atomically(f"{paths[0]}.kept", write)
    for path in paths:
        os.remove(path)


def copy_encoder(source, target, source_path):
    """Sets the weights of `target`'s KerasHub backbone to those of `source`'s."""
    source_encoder, target_encoder = backbone_in(source), backbone_in(target)
    if source_encoder is None or target_encoder is None:
        holder = source_path if source_encoder is None else "the custom code blocks' model"
        raise GlueError(f"--init_from_finetuned: {holder} holds no KerasHub backbone to take "
                        "the encoder from")
    weights = source_encoder.get_weights()
    if [weight.shape for weight in weights] != [tuple(variable.shape)
                                                for variable in target_encoder.weights]:
        raise GlueError(f"--init_from_finetuned={source_path}: its encoder "
                        f"({type(source_encoder).__name__}) differs from the --preset's "
                        f"({type(target_encoder).__name__}); give the preset it was finetuned "
                        "from")
    target_encoder.set_weights(weights)


def training_flops(model, split, epochs):
    """The encoder's matmul arithmetic in finetuning on `split` for `epochs` (forward and
    backward: 3 times forward), at the shapes `batch_by_length` makes, each row padded to its
    bucket's width. Per token, 2 FLOPs per kernel weight of the encoder's dense layers
    (embeddings and pooler left out); per attention layer, 4 x hidden x width FLOPs for the
    scores and their sum. None for a model without a KerasHub backbone (or without
    `num_layers` and `hidden_dim`).
    """
    backbone = backbone_in(model)
    layers, hidden = getattr(backbone, "num_layers", None), getattr(backbone, "hidden_dim", None)
    if not layers or not hidden:
        return None
    dense_weights = sum(math.prod(weight.shape) for weight in backbone.trainable_weights
                        if weight.path.endswith("kernel") and not any(
                            part in weight.path for part in ("embedding", "pool")))
    if split.lengths is None:
        widths = np.full(len(split), split.padded_length, np.float64)
    else:
        all_widths = np.array(bucket_widths(split), np.float64)
        widths = all_widths[np.searchsorted(all_widths, split.lengths)]
    forward = 2 * dense_weights * widths.sum() + 4 * layers * hidden * (widths ** 2).sum()
    return 3 * epochs * float(forward)


def backbone_in(model):
    """The KerasHub backbone inside a model, however deep (None if there is none)."""
    for layer in model.layers:
        if isinstance(layer, keras_hub.models.Backbone):
            return layer
        if isinstance(layer, keras.Model) and backbone_in(layer) is not None:
            return backbone_in(layer)
    return None


def bf16_hint(flags):
    """One line for a CPU that computes bfloat16 fast (None for others)."""
    for flag, name, speedup in BF16_SPEEDUPS:
        if flag in flags:
            return (f"This CPU has {name}: --mixed_precision=mixed_bfloat16 would train about "
                    f"{speedup:g}x faster, with dev metrics within a point of float32 (the "
                    "default stays float32, so that numbers do not change with the hardware)")
    return None


# How much faster glue.py trains in --mixed_precision=mixed_bfloat16 than in float32, on CPUs
# with these instructions (whole MRPC, MiniLM-L6; benchmarks/RESULTS.md).
BF16_SPEEDUPS = (("amx_bf16", "AMX", 1.8), ("avx512_bf16", "avx512_bf16", 1.3))


def cpu_flags():
    """The CPU's feature flags, from /proc/cpuinfo (none where there is no such file)."""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as file:
        for line in file:
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    return set()


def first_line(error):
    lines = str(error).strip().splitlines()
    return lines[0][:200] if lines else type(error).__name__


def plural(count, noun):
    return f"{count} {noun}{'s' * (count != 1)}"


PROGRESS_SECONDS = 60  # a progress line at least this often,
PROGRESS_PARTS = 20  # and at least every 5% of a phase's steps,
QUIET_SECONDS = 10  # except in the first seconds of tokenizing or predicting


class Progress:
    """Prints `<label>  step N/M  <details>  R ex/s  elapsed T  ETA T` for a phase of `total`
    steps, as often as PROGRESS_* say. `start`: steps done before (resume)."""

    def __init__(self, label, total, *, start=0, quiet_seconds=QUIET_SECONDS, unit="ex"):
        self.label, self.total, self.start, self.unit = label, total, start, unit
        self.quiet_seconds = quiet_seconds
        self.started = self.last_time = time.perf_counter()
        self.last_step = start

    def update(self, step, examples, details=lambda: ""):
        now = time.perf_counter()
        due = (now - self.started >= self.quiet_seconds and
               step - self.last_step >= max(self.total / PROGRESS_PARTS, 1)
               or now - self.last_time >= PROGRESS_SECONDS)
        if not due or step >= self.total:
            return
        self.last_step, self.last_time = step, now
        elapsed = now - self.started
        remaining = elapsed / (step - self.start) * (self.total - step)
        say(f"{self.label}  step {step}/{self.total}  {details()}"
            f"{self.per_second(examples, elapsed, self.unit)}  elapsed {clock(elapsed)}  "
            f"ETA {clock(remaining)}")

    @staticmethod
    def per_second(amount, seconds, unit="ex"):
        """`12 ex/s`, the speed written the one way every line and log gives it; the bare
        number with `unit=None`."""
        speed = amount / max(seconds, 1e-9)
        return speed if unit is None else f"{speed:.0f} {unit}/s"

    def callback(self, batch_size):
        """A Keras callback that updates this progress as `predict` goes, batch by batch."""
        return keras.callbacks.LambdaCallback(on_predict_batch_end=lambda batch, logs: (
            self.update(batch + 1, (batch + 1) * batch_size)))

    def summary(self, amount, noun="rows", details=""):
        seconds = time.perf_counter() - self.started
        say(f"{self.label}: {amount} {noun} in {clock(seconds)} "
            f"({self.per_second(amount, seconds, noun)}){details}")


def clock(seconds):
    """`12.3s`, `8m18s` or `2h05m`."""
    if seconds < 60:
        return f"{max(seconds, 0):.1f}s"
    minutes, seconds = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    return f"{minutes // 60}h{minutes % 60:02d}m"

# ================================================================================================
# Tokenizing, inside: each split tokenized on a thread per core, kept without its padding, and
# gathered into padded batches as they are made. Then the GLUE files it reads: the local
# glue_data/ layout, read and checked, or tensorflow-datasets


def tokenize(examples, task, preprocess_fn, split_name=""):
    """Tokenizes a split once, before training, into a `TokenizedSplit`.

    `preprocess_fn` (a `tf.function`) runs eagerly on batches of 1024 rows, traced once for
    batches of any size, on a thread per core (TensorFlow releases the GIL while it runs).
    Inside a `tf.data` map every new pipeline would set the tokenizer up again (about 0.3 s);
    this way one setup serves every split. Rows stream in: no raw text is kept.
    """
    batches = examples.batch(TOKENIZE_BATCH).map(
        lambda example: (*features_and_label(task)(example), example["idx"]))
    preprocess_fn.get_concrete_function(*batches.element_spec[:2])
    progress = Progress(f"{task.name}  tokenize {split_name}".rstrip(),
                        int(batches.cardinality()), unit="rows")

    def tokenize_batch(batch):
        features, labels, idx = batch
        return without_padding(*preprocess_fn(features, labels), idx)

    pieces, rows = [], 0
    tokenized = map_in_threads(tokenize_batch, batches, TOKENIZE_THREADS)
    for step, piece in enumerate(tokenized, start=1):
        pieces.append(piece)
        rows += len(piece)
        progress.update(step, rows)
    split = joined(pieces)
    progress.summary(len(split))
    return split


TOKENIZE_BATCH = 1024


def features_and_label(task):
    """Maps a tfds-style example to `((text, ...), label)`, the input of `preprocess_fn`."""
    return lambda example: (tuple(example[name] for name in task.text_features), example["label"])


def without_padding(inputs, labels, idx):
    """A `TokenizedSplit` of one batch of `preprocess_fn`'s output."""
    inputs = tf.nest.map_structure(np.asarray, inputs)
    labels, idx = np.asarray(labels), np.asarray(idx)
    if not isinstance(inputs, dict) or "padding_mask" not in inputs or \
            inputs["padding_mask"].ndim != 2:
        return TokenizedSplit(inputs, labels, idx)
    mask = inputs["padding_mask"].astype(bool)
    lengths = mask.sum(axis=1).astype(np.int32)
    split = TokenizedSplit({}, labels, idx, lengths, mask.shape[1])
    for name, value in inputs.items():
        if name not in TOKEN_ALIGNED or value.shape != mask.shape:
            split.inputs[name] = value
            continue
        split.dtypes[name] = value.dtype
        if name != "padding_mask":
            split.tokens[name] = smallest_integers(value[mask])  # row by row, the real tokens
            padding = value[~mask][:1]  # padding as `preprocess_fn` pads
            split.pad_values[name] = padding[0] if len(padding) else value.dtype.type(0)
    return split


@dataclasses.dataclass
class TokenizedSplit:
    """A tokenized split, one row per example, in file order, in numpy arrays.

    The token-aligned inputs are kept without their padding: `tokens[name]` holds every row's
    real tokens one after the other (row i at `offsets[i]:offsets[i + 1]`), in the smallest
    integer type that holds them; `padding_mask` is not kept at all, since `lengths` say it.
    So memory follows the real tokens, and each batch is padded as it is made (`rows_of`).
    Inputs without a `padding_mask` (a custom preprocessing may give any) stay whole in `inputs`.
    """

    inputs: object  # the inputs that are not token-aligned: a dict of arrays, or one array
    labels: np.ndarray
    idx: np.ndarray
    lengths: np.ndarray = None  # real lengths; None when the inputs cannot be trimmed
    padded_length: int = None  # the length `preprocess_fn` padded to
    tokens: dict = dataclasses.field(default_factory=dict)
    offsets: np.ndarray = None
    pad_values: dict = dataclasses.field(default_factory=dict)  # the padding, per input
    dtypes: dict = dataclasses.field(default_factory=dict)  # each token input's own type

    def __len__(self):
        return len(self.labels)


def smallest_integers(values):
    """`values` in the smallest integer type that holds them (token ids fit in 32 bits)."""
    if values.dtype.kind not in "iu" or not len(values):
        return values
    low, high = values.min(), values.max()
    fits = [kind for kind in (np.int8, np.int16, np.int32)
            if np.iinfo(kind).min <= low and high <= np.iinfo(kind).max]
    return values.astype(fits[0]) if fits else values


def joined(pieces):
    """One `TokenizedSplit` of the pieces, freeing each piece's tokens once they are copied."""
    first = pieces[0]
    split = dataclasses.replace(first, inputs=tf.nest.map_structure(
        lambda *parts: np.concatenate(parts), *[piece.inputs for piece in pieces]),
        labels=np.concatenate([piece.labels for piece in pieces]),
        idx=np.concatenate([piece.idx for piece in pieces]), tokens={})
    if first.lengths is None:
        return split
    split.lengths = np.concatenate([piece.lengths for piece in pieces])
    split.offsets = np.concatenate([[0], np.cumsum(split.lengths, dtype=np.int64)])
    for name in list(first.tokens):
        split.tokens[name] = np.concatenate([piece.tokens.pop(name) for piece in pieces])
    split.pad_values = {name: next((piece.pad_values[name] for piece in pieces
                                    if piece.lengths.min() < piece.padded_length), value)
                        for name, value in first.pad_values.items()}
    return split


def map_in_threads(function, items, threads):
    """`map(function, items)` on a few threads, in order, with a bounded backlog."""
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        pending = collections.deque()
        for item in items:
            pending.append(pool.submit(function, item))
            if len(pending) > 2 * threads:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def gathered(split):
    """`rows_of` as a tf.data map over batches of row indices. The arrays stay in numpy, out of
    the tf.data graph, which would copy captured tensors into every pipeline it makes."""
    example = rows_of(split, np.arange(1))
    shapes = tf.nest.map_structure(
        lambda array: tf.TensorShape([None] + list(array.shape[1:])), example)
    if split.lengths is not None:  # token-aligned inputs vary in width from batch to batch
        for name in [*split.tokens, "padding_mask"]:
            shapes[0][name] = tf.TensorShape([None, None])

    def gather(indices):
        arrays = tf.numpy_function(
            lambda rows: tf.nest.flatten(rows_of(split, rows)), [indices],
            [tf.string if array.dtype == object else tf.as_dtype(array.dtype)
             for array in tf.nest.flatten(example)], stateful=False)
        for array, shape in zip(arrays, tf.nest.flatten(shapes)):
            array.set_shape(shape)
        return tf.nest.pack_sequence_as(example, arrays)

    return gather


def rows_of(split, indices):
    """Rows `indices` of a split as one batch, `(inputs, labels, idx)` in numpy arrays, each
    token-aligned input padded to the bucket width above the batch's longest row."""
    inputs = tf.nest.map_structure(lambda values: values[indices], split.inputs)
    if split.lengths is not None:
        lengths = split.lengths[indices]
        widths = bucket_widths(split)
        width = widths[np.searchsorted(widths, lengths.max())]
        real = np.arange(width) < lengths[:, None]
        where = split.offsets[indices][:, None] + np.minimum(np.arange(width), lengths[:, None] - 1)
        for name, values in split.tokens.items():
            inputs[name] = np.where(real, values[where], split.pad_values[name]).astype(
                split.dtypes[name])
        inputs["padding_mask"] = real.astype(split.dtypes["padding_mask"])
    return inputs, split.labels[indices], split.idx[indices]


def load_split(data_dir, dataset, split):
    if data_dir:
        examples = read_local_split(data_dir, dataset, split)
    else:
        examples = load_tfds_split(dataset, split)
    if count(examples) == 0:
        raise GlueError(f"the {dataset} {split} split is empty")
    return examples


def read_local_split(data_dir, dataset, split):
    """Reads one split of a GLUE dataset from the standard `glue_data/` layout.

    Labels and indices are read and checked at once, so a bad line fails before any work; the
    text columns (and only those: MNLI's parse trees are never read) stream in chunks while
    the split is tokenized, so no whole split of raw text is ever held in memory."""
    task = TASKS[dataset]
    path = local_split_path(data_dir, dataset, split)
    headerless_columns = () if split.startswith("test") else task.local.headerless_columns
    keys = read_local_keys(path, task, split)

    def chunks():
        start = 0
        for chunk in read_tsv(path, headerless_columns, usecols=list(task.local.columns),
                              chunksize=TEXT_CHUNK_ROWS):
            rows = slice(start, start + len(chunk))
            start += len(chunk)
            yield {**{feature: chunk[column].to_numpy(dtype=object)
                      for feature, column in zip(task.text_features, task.local.columns)},
                   **{name: values[rows] for name, values in keys.items()}}

    spec = {feature: tf.TensorSpec((None,), tf.string) for feature in task.text_features}
    spec.update({name: tf.TensorSpec((None,), values.dtype) for name, values in keys.items()})
    return (tf.data.Dataset.from_generator(chunks, output_signature=spec).unbatch()
            .apply(tf.data.experimental.assert_cardinality(len(keys["idx"]))))


def local_split_path(data_dir, dataset, split):
    task = TASKS[dataset]
    files = dict(task.local.files)
    if split not in files:
        raise GlueError(f"{dataset} has no {split!r} split in the glue_data layout")
    path = os.path.join(data_dir, task.local.folder, files[split])
    if not os.path.isfile(path):
        raise GlueError(f"--data_dir: expected the {dataset} {split} file at {path}; "
                        "point --data_dir at a folder in the standard glue_data/ layout")
    return path


def read_local_keys(path, task, split):
    """A local split's `label` and `idx` arrays, read in chunks and checked line by line: the
    field counts, the columns, every label (train and dev) or index (test)."""
    is_test = split.startswith("test")
    headerless_columns = () if is_test else task.local.headerless_columns
    key_column = task.local.index_column if is_test else task.local.label_column
    check_field_counts(path, len(headerless_columns) or None)
    columns = read_tsv(path, headerless_columns, nrows=0).columns
    for column in task.local.columns + (key_column,):
        if column not in columns:
            raise GlueError(f"{path}: malformed TSV: no column {column!r} "
                            f"(columns: {', '.join(map(str, columns))})")
    if is_test:  # the leaderboard keys rows by the file's index column
        convert, what = int, "bad index"
    else:  # tfds numbers train and dev rows in file order
        convert, what = functools.partial(parse_label, task), "bad label"
    values, line = [], 1 if headerless_columns else 2
    for chunk in read_tsv(path, headerless_columns, usecols=[key_column],
                          chunksize=TEXT_CHUNK_ROWS):
        for text in chunk[key_column]:
            try:
                values.append(convert(text))
            except ValueError:
                raise GlueError(f"{path}, line {line}: malformed TSV: {what} {text!r}") from None
            line += 1
    label_type = np.float32 if task.is_regression else np.int64
    if is_test:
        return {"label": np.full(len(values), -1, label_type), "idx": np.array(values, np.int32)}
    return {"label": np.array(values, label_type), "idx": np.arange(len(values), dtype=np.int32)}


TEXT_CHUNK_ROWS = 20_000


def read_tsv(path, headerless_columns=(), **read_options):
    """A GLUE TSV file as a table of strings; `headerless_columns` names a header-less file's.

    `read_options` go to `pandas.read_csv` (`usecols`, `chunksize`, `nrows`)."""
    try:
        # QUOTE_NONE: GLUE sentences contain bare quote characters. utf-8-sig drops MRPC's BOM.
        return pd.read_csv(
            path, sep="\t", quoting=csv.QUOTE_NONE, dtype=str, keep_default_na=False,
            encoding="utf-8-sig", header=None if headerless_columns else "infer",
            names=list(headerless_columns) or None, **read_options)
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


def load_tfds_split(dataset, split):
    builder = tfds.builder(TASKS[dataset].tfds_name)
    if not builder.is_prepared():
        problem = download_problem(TASKS[dataset].tfds_name, urllib.parse.urlparse(
            builder.builder_config.data_url or GLUE_HOST).hostname)
        if problem:
            raise GlueError(f"{problem}; pass --data_dir=<folder in the glue_data/ layout> to "
                            "read local GLUE files instead")
        builder.download_and_prepare()
    return builder.as_dataset(split=split)


GLUE_HOST = "dl.fbaipublicfiles.com"  # where tensorflow-datasets downloads every GLUE file from
KAGGLE_HOST = "api.kaggle.com"  # where KerasHub downloads its presets from


def download_problem(name, host):
    """Why tensorflow-datasets cannot download `name` from `host` (None: its host answers)."""
    try:
        socket.create_connection((host, 443), timeout=5).close()
    except OSError:
        return f"cannot download {name} ({host} is unreachable)"
    return None


def count(examples):
    known = int(examples.cardinality())
    return known if known >= 0 else int(examples.reduce(0, lambda total, _: total + 1))


def available_cores():
    """The cores this process may run on: its affinity mask on Linux, every core elsewhere."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


TOKENIZE_THREADS = available_cores()  # batches tokenized at once: one per core

# ================================================================================================
# Publishing: the results JSON, the submission files and the saved model, made anew from the
# records; the results table


def publish_recorded(options, root):
    """`--task_name=none`: every recorded task's results and submission files made anew from
    the records of its latest settings, those of its last recorded run (after a job array's
    runs have all ended, say), with a line for each other settings it has records of."""
    for name, entry in read_results(options.results_path).items():
        if name in TASKS and not os.path.isdir(os.path.join(root, name)) and \
                isinstance(entry, dict):
            say(f"{name}: recorded by an older glue.py, left as it is (run the task again to "
                "record its runs)")
    recorded = recorded_settings(root)
    if not recorded:
        say(f"{root}: no runs recorded, so no results to make (a task's command records them)")
    for name, (latest, *others) in recorded.items():
        task = TASKS[name]
        settings = read_json(os.path.join(records_folder(root, task, latest), "fingerprint.json"))
        publish(task, options, settings, records_folder(root, task, latest),
                model_save_path(options, task))
        for other in others:
            folder = records_folder(root, task, other)
            say(f"{name}: published from its latest settings ({latest}); also recorded: "
                f"{plural(len(counted_runs(read_records(folder))), 'run')} under {other} ("
                f"{changed_settings(settings, read_json(os.path.join(folder, 'fingerprint.json')))}"
                f"): to publish those instead, run one of their commands again (`command` in "
                f"{folder}/*/{RUN_RECORD})")


def publish(task, options, settings, folder, save_path=None):
    """Makes the task's entry in the results JSON, its top-level submission files and the
    saved model anew from the run records of `settings`, under the results lock, so that
    processes finishing at once agree. Returns the entry (None when no run is recorded)."""
    with updating_results(options.results_path) as results:
        return publish_into(results, task, options, settings, folder, save_path)


def publish_into(results, task, options, settings, folder, save_path):
    """`publish`, with the results JSON already open under its lock."""
    records = read_records(folder)
    if not chains(records):  # none, or only restarts whose run was redone (--overwrite)
        return results.get(task.name)
    entry = {**summarized(records), "fingerprint": settings,
             "fingerprint_id": fingerprint_id(settings)}
    submitted = entry["submitted_run"]
    chosen = run_folder(folder, submitted["learning_rate"], submitted["seed"])
    rows = options.submission_directory and not settings.get("limit") and submit_files(
        task, chosen, options.submission_directory)
    if rows:
        entry.update(submission_rows=rows, submission_files_run=dict(submitted))
    saved = (results.get(task.name) or {}).get("saved_model")  # an earlier command's
    if save_path and not options.finetuning_model_load_path:  # no copy of the loaded model
        saved = save_chosen_model(task, chosen, save_path) and os.path.abspath(save_path)
    if saved:
        entry["saved_model"] = saved
    results[task.name] = entry
    return entry


def recorded_settings(root):
    """`{task: its settings ids, latest first}` of the tasks with runs recorded under `root`:
    what --task_name=none publishes. The latest settings hold the run recorded last (by
    `recorded_at`, which a copy of the folder keeps; else by the record's file time)."""
    recorded = {}
    for path in glob.glob(os.path.join(glob.escape(root), "*", "*", "fingerprint.json")):
        folder = os.path.dirname(path)
        task_name, records = os.path.basename(os.path.dirname(folder)), read_records(folder)
        if task_name in TASKS and chains(records):
            recorded.setdefault(task_name, {})[os.path.basename(folder)] = max(
                run.get("recorded_at") or os.path.getmtime(run_folder(
                    folder, run["learning_rate"], run["seed"])) for run in records)
    return {name: sorted(ids, key=ids.get, reverse=True) for name, ids in sorted(recorded.items())}


def report_results(options):
    """The report of the results JSON, in the submission folder, made anew (it may fail only
    with a warning line: the results are recorded already)."""
    if not (options.report and options.submission_directory and options.results_path):
        return
    try:  # under the lock: a report is never older than the results beside it
        with updating_results(options.results_path) as results:
            write_report(results, options.submission_directory)
    except Exception as error:
        say(f"warning: {REPORT} not written ({type(error).__name__}: {first_line(error)})")


def report_and_package(options, results, comparison=None):
    """Prints the results table and the comparison, then fills and zips the submission if
    asked to."""
    table = format_results(read_results(options.results_path) or results)
    for text in (table, comparison and comparison_table(comparison)):
        if text:
            print(text)
    if options.fill_missing_from:
        copied = fill_missing_files(options.submission_directory, options.fill_missing_from)
        print(f"Copied from {options.fill_missing_from}: {', '.join(copied) or 'nothing'}")
    if options.make_submission_zip:
        print(f"Wrote {make_submission_zip(options.submission_directory)}")


SUBMISSION_FILES = {output.file: output for task in TASKS.values() for output in task.outputs}
SUBMISSION_HEADER = "index\tprediction"


def format_results(results):
    """A table of dev metrics, x100 as papers print them, and the GLUE average. Each metric is
    the median ± sample standard deviation over the chosen learning rate's runs."""
    lines = [f"{'task':<16} {'split':<22} metrics (median ± std over seeds)"]
    for task_name, entry in sorted(results.items()):
        if task_name not in TASKS:
            continue
        rate = rate_label(entry.get("submitted_run", {}).get("learning_rate"))
        summary = entry.get("seed_summary", {}).get(rate)
        limit = entry.get("fingerprint", {}).get("limit")
        for split, metrics in dev_metrics(entry).items():
            if summary:
                shown = "  ".join(f"{name} {spread_text(summary[split][name])}" for name in metrics)
                shown += f"  ({runs_text(summary)}" + (
                    f"; limited to the first {limit} rows)" if limit else ")")
            else:  # an entry of one run, as older versions wrote
                shown = "  ".join(f"{name} {percent(value)}" for name, value in metrics.items())
            lines.append(f"{task_name:<16} {split:<22} {shown}")
        for rate, (runs, most, seeds) in incomplete_rates(entry.get("runs", [])).items():
            lines.append(f"{task_name:<16} lr {rate} not chosen: {runs} of {most} runs "
                         f"(--learning_rate={rate} --seed={','.join(map(str, seeds))} "
                         "completes it)")
    score = glue_score(results)
    if not score:
        return ""  # no dev metrics to show (AX has none)
    lines.append(f"GLUE average over {len(score['tasks'])} tasks "
                 f"({', '.join(score['tasks'])}): {100 * score['average']:.2f}")
    recipes = sorted({entry.get("flags", {}).get("recipe") for name, entry in results.items()
                      if name in TASKS} - {None})
    if recipes:
        lines.append(f"Recipe: {', '.join(recipes)}")
    return "\n".join(lines)


def spread_text(values):
    return f"{percent(values['median'])} ± {percent(values['std'])}" if values["runs"] else "n/a"


def runs_text(summary):
    runs, collapsed = summary["task_score"]["runs"], summary["collapsed_runs"]
    text = f"{runs} run{'s' * (runs != 1)}"
    undefined = {values["runs"] for split, metrics in dev_metrics(summary).items()
                 for values in metrics.values()} - {runs}
    if undefined:
        text += f"; a metric is undefined in {runs - min(undefined)}"
    return text + (f", {collapsed} collapsed" if collapsed else "")

# ================================================================================================
# Submission files: validating, zipping. Every file is written to a temporary file
# beside it, then renamed, so an interrupted run never leaves a half-written file behind.


def fill_missing_files(directory, source):
    """Copies the submission files `directory` lacks from a sample submission; returns names."""
    available = read_submission(source)
    copied = []
    for name in sorted(SUBMISSION_FILES):
        target = os.path.join(directory, name)
        if not os.path.exists(target) and name in available:
            write_atomically(target, lambda temporary: pathlib.Path(temporary).write_bytes(
                available[name]))
            copied.append(name)
    return copied


def make_submission_zip(directory):
    """Validates `directory`'s 11 files and zips them; never writes a zip that would fail."""
    contents = read_submission(directory)
    errors, notices = validate_submission(contents)
    for line in notices + errors:
        print(line)
    if errors:
        raise GlueError(f"{len(errors)} problems in {directory} (listed above); no zip written. "
                        "Run the missing tasks, or pass --fill_missing_from=<sample submission>")
    path = os.path.join(directory, "submission.zip")

    def write(temporary):
        with zipfile.ZipFile(temporary, "w", zipfile.ZIP_DEFLATED) as archive:
            for name in sorted(SUBMISSION_FILES):
                archive.writestr(name, contents[name])

    write_atomically(path, write)
    return path


def read_submission(path):
    """`{file name: bytes}` of a submission folder (its .tsv files) or zip (every member)."""
    if os.path.isdir(path):
        return {file.name: file.read_bytes() for file in pathlib.Path(path).glob("*.tsv")}
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            return {name: archive.read(name) for name in archive.namelist()
                    if not name.endswith("/")}
    raise GlueError(f"{path}: not a submission folder or zip file")


def validate_submission(contents):
    """Checks what the GLUE server checks. Returns `(errors, notices)`, one line each; notices
    do not fail a submission."""
    errors, notices = [], []
    for name in sorted(contents):
        if name in SUBMISSION_FILES:
            continue
        if os.path.basename(name) in SUBMISSION_FILES:
            errors.append(f"{name}: must sit at the top level of the zip")
        else:
            notices.append(f"{name}: not a GLUE submission file; the server ignores it")
    for name, expected in sorted(SUBMISSION_FILES.items()):
        if name not in contents:
            errors.append(f"{name}: missing; all 11 files are needed")
            continue
        file_errors, file_notices = validate_submission_file(name, contents[name], expected)
        if len(file_errors) > SHOWN_PROBLEMS_PER_FILE:
            hidden = len(file_errors) - SHOWN_PROBLEMS_PER_FILE
            file_errors = file_errors[:SHOWN_PROBLEMS_PER_FILE] + [
                f"{name}: ... and {hidden} more problems"]
        errors += file_errors
        notices += file_notices
    return errors, notices


SHOWN_PROBLEMS_PER_FILE = 10


def validate_submission_file(name, data, expected):
    """Header, one row per test index 0..N-1, and every prediction in the task's label set."""
    task = TASKS[expected.dataset]
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return [f"{name}: not UTF-8 text"], []
    lines = [line.removesuffix("\r") for line in text.split("\n")]  # LF or CRLF
    while lines and not lines[-1].strip():
        lines.pop()
    if not lines:
        return [f"{name}: empty file"], []
    errors, out_of_range = [], []
    if lines[0] != SUBMISSION_HEADER:
        errors.append(f"{name}, line 1: the header must be 'index<TAB>prediction', "
                      f"not {lines[0][:40]!r}")
    first_line_of = {}
    for number, line in enumerate(lines[1:], start=2):
        fields = line.split("\t")
        if len(fields) != 2:
            errors.append(f"{name}, line {number}: {len(fields)} tab-separated fields, expected 2")
            continue
        index, prediction = fields
        if not index.strip().isdigit() or int(index) >= expected.rows:
            errors.append(f"{name}, line {number}: index {index!r} is not in "
                          f"0..{expected.rows - 1}")
        elif int(index) in first_line_of:
            errors.append(f"{name}, line {number}: index {int(index)} repeats line "
                          f"{first_line_of[int(index)]}")
        else:
            first_line_of[int(index)] = number
        problem = check_prediction(task, prediction.strip())
        if problem == "out of range":
            out_of_range.append(number)
        elif problem:
            errors.append(f"{name}, line {number}: {problem}")
    if len(lines) - 1 != expected.rows:
        errors.append(f"{name}: {len(lines) - 1} rows, the test set has {expected.rows}")
    notices = []
    if out_of_range:
        notices.append(f"{name}: {len(out_of_range)} scores outside [0, 5] (first on line "
                       f"{out_of_range[0]}); the server accepts them")
    return errors, notices


def check_prediction(task, prediction):
    """None if fine, "out of range" for an STS-B score outside [0, 5], else what is wrong."""
    if not task.is_regression:
        if prediction in task.submission_labels:
            return None
        return f"prediction {prediction!r} is not one of {', '.join(task.submission_labels)}"
    try:
        score = float(prediction)
    except ValueError:
        score = math.nan
    if not math.isfinite(score):
        return f"prediction {prediction!r} is not a finite number"
    return None if 0 <= score <= 5 else "out of range"

# ================================================================================================
# The results report: glue_report.md in the submission folder, its figures beside it in
# glue_report/, made from the results JSON alone whenever that changes. matplotlib is imported
# only to draw them, and a figure that cannot be drawn costs one warning line, never a result.


def write_report(results, directory):
    """Writes the report of `results` (a results JSON) into the submission folder."""
    entries = {name: entry for name, entry in sorted(results.items())
               if name in TASKS and isinstance(entry, dict) and entry.get("runs")}
    lines = ["# GLUE results", "",
             "Made by glue.py from `glue_results.json`. Dev metrics x100: the median ± sample "
             "standard deviation over the runs (seeds) of the chosen learning rate.", "",
             *report_table(entries), ""]
    score = glue_score(results)
    if score:
        lines += [f"GLUE average over {len(score['tasks'])} tasks: {percent(score['average'])}", ""]
    for name, entry in entries.items():
        if not dev_metrics(entry):
            continue  # AX: no dev set, nothing to draw
        lines += [f"## {name}", "", *sweep_table(entry)]
        lines += figure(directory, f"{name}_dev_score.png", draw_dev_scores, name, entry,
                        f"{name}: dev task score of every run against batches trained")
    if any(dev_metrics(entry) for entry in entries.values()):
        lines += ["## Spread over seeds", ""]
        lines += figure(directory, "seed_spread.png", draw_seed_spread, entries,
                        "every run's dev task score, per task and learning rate")
    lines += comparison_section(directory, results)
    text = "\n".join(lines)
    write_atomically(os.path.join(directory, REPORT),
                     lambda temporary: pathlib.Path(temporary).write_text(text, "utf-8"))


def report_table(entries):
    """Per task and dev metric: median ± std, runs (and any --limit), collapsed, submitted run."""
    lines = ["| task | split | metric | median ± std | runs | collapsed | submitted run |",
             "|---|---|---|---|---|---|---|"]
    for name, entry in entries.items():
        submitted = entry["submitted_run"]
        summary = entry["seed_summary"][rate_label(submitted["learning_rate"])]
        limit = entry.get("fingerprint", {}).get("limit")
        runs = f"{summary['task_score']['runs']}" + (f", first {limit} rows" if limit else "")
        for split, metrics in dev_metrics(summary).items():
            for metric, values in metrics.items():
                lines.append(f"| {name} | {split} | {metric} | {spread_text(values)} | {runs} | "
                             f"{summary['collapsed_runs']} | {describe_run(submitted)} |")
    return lines


def sweep_table(entry):
    """Each learning rate's medians, for a task with a sweep."""
    summaries = entry["seed_summary"]
    if len(summaries) < 2:
        return []
    chosen = rate_label(entry["submitted_run"]["learning_rate"])
    metrics = [(split, metric) for split, values in dev_metrics(summaries[chosen]).items()
               for metric in values]
    lines = ["| learning rate | runs | task score | " +
             " | ".join(f"{metric} ({split})" for split, metric in metrics) + " |",
             "|---|---|---|" + "---|" * len(metrics)]
    incomplete = incomplete_rates(entry["runs"])
    for rate, summary in summaries.items():
        medians = [percent(summary[split][metric].get("median")) for split, metric in metrics]
        label = f"**{rate}** (chosen)" if rate == chosen else rate
        if rate in incomplete:
            label += " (not chosen: {} of {} runs)".format(*incomplete[rate][:2])
        lines.append(f"| {label} | {summary['task_score']['runs']} | "
                     f"{percent(summary['task_score'].get('median'))} | " +
                     " | ".join(medians) + " |")
    return [*lines, ""]


def figure(directory, file, draw, *args_and_caption):
    """Draws one PNG into `<directory>/glue_report/<file>` and returns the report's lines for
    it: its link, or nothing after a warning line if it could not be drawn."""
    *args, caption = args_and_caption
    path = os.path.join(directory, REPORT_FIGURES, file)
    try:
        from matplotlib.figure import Figure  # noqa: PLC0415 (only when drawing)
        drawn = Figure(figsize=(7, 4), layout="constrained")
        draw(drawn, *args)
        write_atomically(path, lambda temporary: drawn.savefig(temporary, format="png", dpi=90))
    except Exception as error:  # a figure is never worth a run or a result
        say(f"warning: {REPORT}: could not draw {file} ({type(error).__name__}: "
            f"{first_line(error)}); the report goes without it")
        return []
    return [f"![{caption}]({REPORT_FIGURES}/{file})", ""]


REPORT, REPORT_FIGURES = "glue_report.md", "glue_report"


def draw_dev_scores(drawn, name, entry):
    """One line per run, coloured by learning rate; collapsed runs dashed, marked x."""
    axes, labelled = drawn.subplots(), set()
    rates = sorted({run_order(run)[0] for run in entry["runs"]})
    colors = {rate: f"C{index % 10}" for index, rate in enumerate(rates)}
    for run in entry["runs"]:
        evaluations = run.get("evaluations", [])
        rate = run_order(run)[0]
        collapsed = bool(run.get("collapsed"))
        axes.plot([evaluation["step"] for evaluation in evaluations],
                  [100 * run_score(evaluation) for evaluation in evaluations],
                  color=colors[rate], linestyle="--" if collapsed else "-",
                  marker="x" if collapsed else "o", markersize=4, alpha=0.8,
                  label=None if rate in labelled else f"lr {rate_label(rate)}")
        labelled.add(rate)
    axes.set(xlabel="batches trained", ylabel="dev task score (x100)",
             title=f"{name}: every run (dashed, x: collapsed)")
    axes.grid(alpha=0.3)
    axes.legend(fontsize="small")


def draw_seed_spread(drawn, entries):
    """Per task and learning rate, every counted run's task score as a dot, the median a bar."""
    axes, labels = drawn.subplots(), []
    for name, entry in entries.items():
        chosen = rate_label(entry["submitted_run"]["learning_rate"])
        for rate, runs in runs_by_rate(entry["runs"]).items():
            if not dev_metrics(runs[0]):
                continue
            x = len(labels)
            scores = [100 * run_score(run) for run in runs]
            offsets = np.linspace(-0.15, 0.15, len(runs)) if len(runs) > 1 else [0.0]
            for offset, score, run in zip(offsets, scores, runs):
                axes.plot(x + offset, score, "x" if run.get("collapsed") else "o",
                          color="C3" if run.get("collapsed") else "C0", alpha=0.8)
            axes.hlines(statistics.median(scores), x - 0.3, x + 0.3, color="black")
            labels.append(f"{name}\nlr {rate}" + (" *" if rate == chosen else ""))
    axes.set_xticks(range(len(labels)), labels, fontsize="small")
    axes.set(ylabel="dev task score (x100)",
             title="runs (o; x: collapsed) and their median (bar); * the chosen rate")
    axes.grid(axis="y", alpha=0.3)

# ================================================================================================
# Comparing with another folder (--compare_with): is this model better than that one? Each task
# both folders have gets the difference of their scores and a 95% interval from a bootstrap.
# A resample draws each side's runs (the seeds of its chosen learning rate) with replacement,
# and the dev examples, each example drawn for both sides at once (paired); a side's score in it
# is the median over its drawn runs of their task scores on the drawn examples, as the results
# give a task's score. The interval covers seeds and dev examples, not the hyperparameter search.


def other_results(options, task_names):
    """The results of the folder --compare_with names, as they are before this command, for
    the tasks they share with this folder or command; a line if they share none."""
    path = options.compare_with
    if not os.path.isdir(path):
        raise GlueError(f"--compare_with={path}: no such folder; give a submission folder with "
                        "its glue_results.json")
    other = scored_entries(read_results(os.path.join(path, "glue_results.json")))
    if not other:
        raise GlueError(f"--compare_with={path}: no dev results there (glue_results.json); give "
                        "the submission folder of runs with a dev set")
    ours = set(scored_entries(read_results(options.results_path))) | {
        name for name in task_names if TASKS[name].eval_splits}
    if not ours & set(other):
        raise GlueError(f"--compare_with={path}: no task in common (it has "
                        f"{', '.join(other)}; this one {', '.join(sorted(ours)) or 'none'})")
    own = options.submission_directory or (
        options.results_path and os.path.dirname(os.path.abspath(options.results_path)))
    if own and os.path.isdir(own) and os.path.samefile(path, own):
        say("--compare_with is this folder itself: each task as it is now, against itself as "
            "it was before this command (under other settings where this command changes them)")
    return other


def compare_and_record(options, results, root, other):
    """Compares this folder's results (this command's, when there is no results file) with
    the other folder's `other`, and writes glue_comparison.json into the submission folder."""
    try:  # the other folder's files are read only now; a bad one costs a line, not the results
        comparison = {"against": options.compare_with, **compare(
            read_results(options.results_path) or results, root, other,
            os.path.join(options.compare_with, "runs"))}
    except (OSError, ValueError, KeyError, pd.errors.ParserError) as error:
        say(f"warning: --compare_with={options.compare_with}: not compared ({type(error).__name__}"
            f": {first_line(error)})")
        return None
    if options.submission_directory:
        write_json(os.path.join(options.submission_directory, COMPARISON), comparison)
    return comparison


def compare(results, root, other, other_root):
    """The comparison of `results` (their run records under `root`) with `other` (under
    `other_root`): {"tasks": {task: row}, "glue_score": row}, each row the scores, their
    difference, its interval and verdict, the runs drawn from and the examples paired."""
    rows, differences = {}, {}
    for name in sorted(set(scored_entries(results)) & set(other)):
        task, entries = TASKS[name], (results[name], other[name])
        rng = np.random.default_rng([RESAMPLING_SEED, list(TASKS).index(name)])  # its own
        sides = [chosen_predictions(folder, task, entry)
                 for folder, entry in zip((root, other_root), entries)]
        unpaired = unpaired_because(task, entries, sides)
        draws = {} if unpaired else {file: example_draws(len(table), rng)
                                     for file, table in sides[0][1][0].items()}
        resampled = [side_resampled(task, runs, tables, draws, rng) for runs, tables in sides]
        differences[name] = resampled[0] - resampled[1]
        runs = [len(runs) for runs, _ in sides]
        rows[name] = {"metric": ", ".join(task.metrics),
                      "settings": [entry.get("fingerprint_id") for entry in entries],
                      "runs": runs,
                      "paired_examples": sum(map(len, sides[0][1][0].values())) if draws else 0,
                      **compared(*map(entry_score, entries), differences[name],
                                 judged=not unpaired or min(runs) >= 3)}
        if unpaired:
            rows[name]["note"] = f"runs resampled, not examples: {unpaired}" + (
                "; fewer than 3 runs a side: no verdict" if min(runs) < 3 else "")
        elif min(runs) == 1:
            rows[name]["note"] = "a side of one run: the interval leaves seeds out"
    comparison = {"resamples": RESAMPLES, "seed": RESAMPLING_SEED, "tasks": rows}
    if rows:
        comparison["glue_score"] = {
            "metric": f"the mean of {plural(len(by_dataset(rows)), 'task score')}",
            "runs": [sum(row["runs"][side] for row in rows.values()) for side in (0, 1)],
            "paired_examples": sum(row["paired_examples"] for row in rows.values()),
            **compared(*(float(mean_over_tasks({name: row[side] for name, row in rows.items()}))
                         for side in ("this", "other")), mean_over_tasks(differences),
                       judged=all(row["verdict"] != "no verdict" for row in rows.values()))}
    return comparison


def mean_over_tasks(values):
    """The GLUE score's mean over tasks of per-task values (numbers or arrays of resamples)."""
    return np.mean([np.mean(group, axis=0) for group in by_dataset(values).values()], axis=0)


def by_dataset(named):
    """Values by task, grouped by the dataset that trains them: MNLI's entries count once."""
    grouped = {}
    for name, value in named.items():
        grouped.setdefault(TASKS[name].training_data, []).append(value)
    return grouped


def chosen_predictions(root, task, entry):
    """The counted runs of an entry's chosen learning rate, and each one's dev predictions
    ({file: table}), or None if a run kept none (recorded by an older glue.py) or its folder
    now holds another run (trained again since the entry was read)."""
    runs = chosen_runs(entry["runs"])
    folder = records_folder(root, task, entry.get("fingerprint_id", ""))
    places = [run_folder(folder, run["learning_rate"], run["seed"]) for run in runs]
    paths = [{DEV_PREDICTIONS.format(split): os.path.join(place, DEV_PREDICTIONS.format(split))
              for split in dev_metrics(entry)} for place in places]
    if not all(os.path.isfile(path) for files in paths for path in files.values()) or any(
            read_json(os.path.join(place, RUN_RECORD)).get("run_id") != run.get("run_id")
            for place, run in zip(places, runs)):
        return runs, None
    return runs, [{file: pd.read_csv(path, sep="\t") for file, path in files.items()}
                  for files in paths]


def unpaired_because(task, entries, sides):
    """Why the two sides' dev examples cannot be paired (None: they can)."""
    if any(tables is None for _, tables in sides):
        return "runs without their dev predictions (an older glue.py, or trained again since)"
    dev_data = [{split: entry.get("fingerprint", {}).get("data", {}).get(
        f"{task.training_data} {split}") for split in task.eval_splits} for entry in entries]
    reference = sides[0][1][0]
    if dev_data[0] != dev_data[1] or any(
            not table[["index", "label"]].equals(reference[file][["index", "label"]])
            for _, tables in sides for run in tables for file, table in run.items()):
        return "the dev sets' files differ (or one came from tensorflow-datasets)"
    return None


def example_draws(examples, rng):
    """RESAMPLES draws of a dev split's examples with replacement: the drawn indices, and how
    often each example was drawn, one row per resample."""
    drawn = rng.integers(0, examples, (RESAMPLES, examples), dtype=np.int32)
    counts, chunk = np.empty(drawn.shape, np.float32), 200  # resamples counted at once:
    rows = np.arange(chunk)[:, None] * examples  # in chunks, 8x faster than all together
    for start in range(0, RESAMPLES, chunk):
        part = drawn[start:start + chunk]
        counts[start:start + chunk] = np.bincount(
            (part + rows[:len(part)]).ravel(), minlength=part.size).reshape(part.shape)
    return drawn, counts


def side_resampled(task, runs, tables, draws, rng):
    """One side's score in each resample: the median over its drawn runs of their task scores
    on the drawn examples (no `draws`: their recorded scores)."""
    if draws:
        scores = np.array([resampled_task_score(task, run, draws) for run in tables])
    else:
        scores = np.array([[run_score(run)] * RESAMPLES for run in runs])
    drawn = rng.integers(0, len(runs), (RESAMPLES, len(runs)))
    return np.median(np.take_along_axis(scores.T, drawn, axis=1), axis=1)


def resampled_task_score(task, tables, draws):
    """A run's task score on each resample of its dev examples (an undefined metric: 0)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", (scipy.stats.ConstantInputWarning, RuntimeWarning))
        values = [RESAMPLED_METRICS[metric](table["label"].to_numpy(np.float32),
                                            table["prediction"].to_numpy(np.float32),
                                            *draws[file])
                  for file, table in tables.items() for metric in task.metrics]
    return np.mean(np.nan_to_num(values), axis=0)


def compared(this, other, differences, judged=True):
    """A row's numbers. Not `judged`: too few runs for the interval to mean much."""
    low, high = np.percentile(differences, [2.5, 97.5])
    verdict = "no verdict" if not judged else "better" if low > 0 else "worse" if high < 0 \
        else "no difference shown"
    return {"this": this, "other": other, "difference": this - other,
            "interval": [float(low), float(high)], "verdict": verdict}


def comparison_section(directory, results):
    """The report's section on the folder's glue_comparison.json, if it has one and it is
    about these results: its table, and a figure of each difference with its interval."""
    path = os.path.join(directory, COMPARISON)
    if not os.path.isfile(path):
        return []
    comparison = read_json(path)
    lines = [f"## Compared with {comparison['against']}", ""]
    if any(name not in scored_entries(results) or
           results[name].get("fingerprint_id") != row["settings"][0] or
           entry_score(results[name]) != row["this"] or
           len(chosen_runs(results[name]["runs"])) != row["runs"][0]
           for name, row in comparison["tasks"].items()):
        return lines + [f"`{COMPARISON}` compares results that have since changed; run with "
                        "--compare_with again to compare these.", ""]
    lines += ["```", comparison_table(comparison), "```", ""]
    if not comparison["tasks"]:
        return lines
    return lines + figure(directory, "comparison.png", draw_comparison, comparison,
                          "each task's difference of dev scores and its 95% interval")


COMPARISON, RESAMPLES, RESAMPLING_SEED = "glue_comparison.json", 1000, 0


def scored_entries(results):
    """The entries of tasks with a dev score, as this glue.py records them."""
    return {name: entry for name, entry in results.items() if name in TASKS and
            isinstance(entry, dict) and dev_metrics(entry) and "submitted_run" in entry and
            entry.get("runs")}


def comparison_table(comparison):
    """The comparison as printed after the results, and shown in the report, x100."""
    lines = [f"Compared with {comparison['against']}: the difference and its 95% interval over "
             f"seeds and dev examples ({comparison['resamples']} resamples)",
             f"{'task':<16} {'this':>7} {'other':>7} {'difference':>10}  {'95% interval':<18} "
             "verdict"]
    if not comparison["tasks"]:
        return "\n".join([lines[0], "no task in common to compare"])
    for name, row in [*comparison["tasks"].items(), ("GLUE score", comparison["glue_score"])]:
        interval = "[{:+.2f}, {:+.2f}]".format(*(100 * value for value in row["interval"]))
        lines.append(f"{name:<16} {percent(row['this']):>7} {percent(row['other']):>7} "
                     f"{100 * row['difference']:>+10.2f}  {interval:<18} {row['verdict']}" +
                     (f" ({row['note']})" if "note" in row else ""))
    return "\n".join(lines)


def draw_comparison(drawn, comparison):
    """Each task's difference (a dot) and its interval (a bar), the GLUE score's at the
    bottom, on one axis with a line at 0."""
    axes = drawn.subplots()
    named = [*comparison["tasks"].items(), ("GLUE score", comparison["glue_score"])][::-1]
    for y, (name, row) in enumerate(named):
        color = {"better": "C2", "worse": "C3"}.get(row["verdict"], "C0")
        axes.hlines(y, *(100 * value for value in row["interval"]), color=color, linewidth=3)
        axes.plot(100 * row["difference"], y, "o", color="black")
    axes.axvline(0, color="black", linewidth=1)
    axes.set_yticks(range(len(named)), [name for name, _ in named])
    axes.set(xlabel="dev score, this - other (x100)",
             title="differences and 95% intervals (green: better, red: worse)")
    axes.grid(axis="x", alpha=0.3)


# The GLUE metrics on every resample at once, from a split's labels and predictions (float32),
# the drawn examples' indices (resamples, examples) and how often each example was drawn (the
# same shape): counted for accuracy and F1, the examples themselves for the correlations. For
# 0/1 labels Matthews' coefficient is Pearson's; Spearman's is Pearson's over ranks.
RESAMPLED_METRICS = {
    "accuracy": lambda labels, predictions, drawn, counts:
        counts @ (labels == predictions).astype(np.float32) / len(labels),
    "f1": lambda labels, predictions, drawn, counts:
        2 * (counts @ (labels * predictions)) / (counts @ labels + counts @ predictions),
    "pearson": lambda labels, predictions, drawn, counts:
        scipy.stats.pearsonr(labels[drawn], predictions[drawn], axis=1).statistic,
    "spearmanr": lambda labels, predictions, drawn, counts: scipy.stats.pearsonr(
        scipy.stats.rankdata(labels[drawn], axis=1),
        scipy.stats.rankdata(predictions[drawn], axis=1), axis=1).statistic,
}
RESAMPLED_METRICS["matthews_corrcoef"] = RESAMPLED_METRICS["pearson"]  # for 0/1 labels

# ================================================================================================
# Run records and the results JSON. Each run's folder is the record of that run, written once,
# by the run's process: runs/<task>/<fingerprint id>/lr<rate>_seed<seed>/ holds run.json, its
# log, its test predictions and, if asked for, its model; its checkpoints and TensorBoard logs
# have folders of their own. The results JSON, the top-level submission files and the saved
# model are made from the records, under a lock.


@contextlib.contextmanager
def records_root(options):
    """The folder of every task's run records: `runs/` in the submission folder, else beside the
    results JSON, else a temporary folder that lives as long as the command."""
    path = options.results_path
    if options.submission_directory or path:
        yield os.path.join(options.submission_directory or os.path.dirname(os.path.abspath(path)),
                           "runs")
        return
    with tempfile.TemporaryDirectory(prefix="glue-runs-") as folder:
        yield folder


def records_folder(root, task, settings_id):
    """Where the runs of one task under one fingerprint are recorded."""
    return os.path.join(root, task.name, settings_id)


def run_model(folder, run):
    """Where a run's folder keeps its model, if it kept one."""
    return os.path.join(run_folder(folder, run["learning_rate"], run["seed"]), "model.keras")


def run_folder(folder, learning_rate, seed):
    """One run's folder in its fingerprint's: `lr2e-05_seed3`."""
    return os.path.join(folder, f"lr{rate_label(learning_rate)}_seed{seed}")


def read_records(folder):
    """Every run record under one fingerprint, in run order ([] if there is none)."""
    records = []
    with contextlib.suppress(FileNotFoundError):
        for name in sorted(os.listdir(folder)):
            path = os.path.join(folder, name, RUN_RECORD)
            if not name.startswith(".") and os.path.isfile(path):
                records.append(read_json(path))
    return sorted(records, key=run_order)


def remove_abandoned(task_folder, max_age_seconds=24 * 3600):
    """Removes the staged run folders a killed command left, under any settings of a task: on
    this host, those of a process that is gone; from another host (whose processes cannot be
    seen), or from a glue.py that named them .tmp-*, those untouched for a day (a running run's
    log changes every minute). A Slurm job's, which may wait in the queue for days, stays: the
    command that asks for its run again takes it over (`SlurmJobs.take_over`)."""
    for path in glob.glob(os.path.join(glob.escape(task_folder), "*", ".*")):
        name = os.path.basename(path)
        if not os.path.isdir(path) or not name.startswith((STAGED, ".tmp-")) or \
                name.startswith(f"{STAGED}slurm:"):
            continue
        host, pid, *_ = name.removeprefix(STAGED).split(":") + ["", ""]
        if host == socket.gethostname():
            abandoned = not is_running(int(pid))
        else:
            touched = max(map(os.path.getmtime, [path, *glob.glob(os.path.join(
                glob.escape(path), "*"))]))
            abandoned = time.time() - touched > max_age_seconds
        if abandoned:
            shutil.rmtree(path, ignore_errors=True)


STAGED = ".staged:"  # a run folder being written: .staged:<host>:<pid of its command>:<id>


def is_running(pid):
    try:
        os.kill(pid, 0)  # no signal: only whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's
        pass
    return True


def put_in_place(staged, final):
    """Renames a staged run folder to its final name, replacing the same run's earlier folder
    (--overwrite)."""
    aside = f"{staged}-replaced"
    if os.path.exists(final):
        os.rename(final, aside)
    os.rename(staged, final)
    shutil.rmtree(aside, ignore_errors=True)


def submit_files(task, chosen, submission_directory):
    """Copies the chosen run's test predictions to the top of the submission folder. Returns
    their row counts (None if the run has none)."""
    sources = {output.file: os.path.join(chosen, output.file) for output in task.outputs}
    if not all(map(os.path.isfile, sources.values())):
        say(f"{task.name}: the chosen run ({os.path.basename(chosen)}) has no test predictions "
            "(it ran without --submission_directory); the submission files were not updated")
        return None
    for file, source in sources.items():
        copy_if_changed(source, os.path.join(submission_directory, file))
    return {file: max(sum(1 for line in pathlib.Path(source).read_bytes().splitlines()
                          if line.strip()) - 1, 0) for file, source in sources.items()}


def save_chosen_model(task, chosen, save_path):
    """Copies the chosen run's model to --finetuning_model_save_path; returns whether it is
    there. If that run kept none, a model already there (an earlier choice's) is moved aside,
    so that the path never holds a model that was not chosen."""
    source = os.path.join(chosen, "model.keras")
    if os.path.isfile(source):
        if copy_if_changed(source, save_path):
            say(f"{task.name}: {save_path} holds the chosen run's model "
                f"({os.path.basename(chosen)})")
        return True
    moved = ""
    if os.path.exists(save_path):
        earlier = f"{save_path.removesuffix('.keras')}.earlier.keras"
        os.replace(save_path, earlier)
        moved = f"; the model that was at {save_path} is now at {earlier}"
    say(f"{task.name}: the chosen run ({os.path.basename(chosen)}) kept no model (a run keeps "
        f"it only for a save path or a warm start){moved}; run the task with "
        "--finetuning_model_save_path to train that run again")


def copy_if_changed(source, target):
    """Copies `source` over `target` (atomically, with its modification time) unless `target`
    is that copy already, by size and time: a large model is not read to know. Returns whether
    it copied."""
    if os.path.isfile(target):
        copied, there = os.stat(source), os.stat(target)
        if (copied.st_size, copied.st_mtime_ns) == (there.st_size, there.st_mtime_ns):
            return False
    write_atomically(target, lambda temporary: shutil.copy2(source, temporary))
    return True


@contextlib.contextmanager
def updating_results(path):
    """The results JSON as a dict to change, under the results lock; written back, with the
    GLUE score, at the end (no path: a dict that is not kept)."""
    if not path:
        yield {}
        return
    folder, name = os.path.split(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    with results_lock(os.path.join(folder, f".{name}.lease")):
        results = read_results(path)
        yield results
        results["glue_score"] = glue_score(results)
        write_json(path, results)


def read_results(path):
    """The results JSON written by earlier runs ({} if none, or no path)."""
    if not path or not os.path.exists(path):
        return {}
    try:
        results = read_json(path)
    except (OSError, ValueError) as error:
        raise GlueError(f"{path}: cannot read the results JSON ({error}); fix or move it, or "
                        "pass another --results_path") from None
    if not isinstance(results, dict):
        raise GlueError(f"{path}: the results JSON is not an object keyed by task; fix or move "
                        "it, or pass another --results_path")
    return results


def read_json(path):
    with open(path, encoding="utf-8") as file:
        return json.load(file)


@contextlib.contextmanager
def results_lock(lease):
    """Holds the lease. filelock takes a dead holder's over by an atomic exchange of file
    names, which NFS refuses: so a lease file that waiting has seen unchanged for three lease
    lengths (a live holder renews it every third of one) is moved aside here, then taken."""
    lock = filelock.SoftFileLease(lease, lease_duration=LOCK_LEASE_SECONDS)
    started, seen = time.monotonic(), None
    while True:
        left = LOCK_TIMEOUT_SECONDS - (time.monotonic() - started)
        try:
            held = lock.acquire(timeout=max(0, min(LOCK_LEASE_SECONDS, left)))
            break
        except filelock.Timeout:
            if left <= LOCK_LEASE_SECONDS:  # it waited to the end
                raise GlueError(f"{lease}: the results lock was not free within "
                                f"{clock(LOCK_TIMEOUT_SECONDS)}; the file names its holder's "
                                "process and host: delete it if that process is gone") from None
            say(f"{lease}: waiting for the results lock ({clock(time.monotonic() - started)})")
            seen = move_aside_if_unchanged(lease, seen)
    with held:  # released however the body ends
        yield


def move_aside_if_unchanged(lease, seen):
    """`seen`: the lease file's (inode, time) and when waiting first saw them so. Moves the file
    aside once unchanged for three lease lengths; returns what is seen now."""
    try:
        stat, now = os.stat(lease), time.monotonic()
        key = (stat.st_ino, stat.st_mtime_ns)
        if not seen or seen[0] != key:
            return key, now
        if now - seen[1] < 3 * LOCK_LEASE_SECONDS:
            return seen
        aside = f"{lease}.gone-{socket.gethostname()}-{uuid.uuid4().hex[:12]}"
        os.rename(lease, aside)  # atomic on NFS too
        moved = os.stat(aside)
        if (moved.st_ino, moved.st_mtime_ns) != key:  # a live holder's, since: put it back
            with contextlib.suppress(FileExistsError):  # unless a third one is holding by now
                os.link(aside, lease)
        else:
            say(f"{lease}: unchanged for {clock(now - seen[1])}, its holder gone: moved aside")
        os.remove(aside)
    except OSError:  # gone meanwhile, or not this process' to move: wait on
        pass
    return None


# The results lock is a lease its holder renews while it lives: flock can fail silently on NFS,
# where job arrays share a folder. A dead holder's lease is taken at once on its own host, and
# after LOCK_LEASE_SECONDS from another; on NFS, where filelock cannot take it over, after
# three times that, from any host.
LOCK_LEASE_SECONDS, LOCK_TIMEOUT_SECONDS = 60, 1800


def model_save_path(options, task):
    """`--finetuning_model_save_path`, with `{task}` in it replaced by the task's name."""
    path = options.finetuning_model_save_path
    return path and path.replace("{task}", task.name)


def checkpoint_folder(checkpoint_dir, task, learning_rate, seed, settings):
    """Where one run keeps its training state; never shared with another run, nor with the same
    run under other settings or code."""
    return os.path.join(checkpoint_dir, f"{task.name}_lr{rate_label(learning_rate)}_seed{seed}_"
                                        f"{fingerprint_id(settings)}")

# ================================================================================================
# Summaries over runs. A run is one (learning rate, seed) pair of a task. Seeds are summarized
# per learning rate; the rate with the best median wins, and its best run is submitted.


def chain_of(runs, learning_rate, seed):
    """The recorded chain of an asked (learning rate, seed): the run, then its restarts."""
    return next((chain for chain in chains(runs) if run_key(chain[0]) == (learning_rate, seed)), [])


def summarized(runs):
    """A task's results entry made from its run records: every run of a live chain; the
    submitted run (the chosen rate's best) with its dev metrics and times, and its process's
    flags; the spread over seeds of every rate; and the task's GLUE score, the median of the
    chosen rate's task scores."""
    runs = [run for chain in chains(runs) for run in chain]
    rate_runs = chosen_runs(runs)
    submitted = best_run(rate_runs)
    entry = {"runs": sorted(({key: value for key, value in run.items() if key not in PROCESS_KEYS}
                             for run in runs), key=run_order),
             **dev_metrics(submitted),
             "submitted_run": {"learning_rate": submitted["learning_rate"],
                               "seed": submitted["seed"]}}
    entry.update({key: submitted[key] for key in (
        "learning_rate", "train_examples", "load_seconds", "train_seconds", *PROCESS_KEYS)
        if key in submitted})
    entry["predict_seconds"] = round(submitted.get("dev_predict_seconds", 0.0) +
                                     submitted.get("test_predict_seconds", 0.0), 2)
    by_rate = runs_by_rate(runs)
    entry["seed_summary"] = {rate: seed_summary(rate_runs) for rate, rate_runs in by_rate.items()}
    if dev_metrics(submitted):
        entry["glue_task_score"] = statistics.median(map(run_score, rate_runs))
    if len(by_rate) > 1:  # the sweep at a glance: each rate's medians
        entry["learning_rate_sweep"] = {
            rate: {split: {name: values.get("median") for name, values in metrics.items()}
                   for split, metrics in dev_metrics(summary).items()}
            for rate, summary in entry["seed_summary"].items()}
    return entry


def best_run(counted):
    """The counted run with the best task score on dev (the first of equals in run order)."""
    return max(sorted(counted, key=run_order), key=run_score)


def chosen_runs(runs):
    """The counted runs of the learning rate with the best median task score over its seeds
    (the smallest rate of equals), among the rates with as many runs as the best-covered one:
    a rate with one run left by an exploratory command never beats rates of five."""
    incomplete = incomplete_rates(runs)
    return max((rate_runs for rate, rate_runs in runs_by_rate(runs).items()
                if rate not in incomplete),
               key=lambda rate_runs: statistics.median(map(run_score, rate_runs)))


def incomplete_rates(runs):
    """`{rate: (its runs, the most runs of a rate, the seeds it lacks)}` for the learning rates
    with fewer runs than the best-covered one, which may not be chosen."""
    by_rate = runs_by_rate(runs)
    most = max(map(len, by_rate.values()), default=0)
    seeds = {rate: {run.get("restart_of", run["seed"]) for run in rate_runs}
             for rate, rate_runs in by_rate.items()}
    covered = set().union(*(seeds[rate] for rate, rate_runs in by_rate.items()
                            if len(rate_runs) == most))
    return {rate: (len(rate_runs), most, sorted(covered - seeds[rate]))
            for rate, rate_runs in by_rate.items() if len(rate_runs) < most}


def runs_by_rate(runs):
    by_rate = {}
    for run in counted_runs(runs):
        by_rate.setdefault(rate_label(run["learning_rate"]), []).append(run)
    return by_rate


def rate_label(learning_rate):
    return "none" if learning_rate is None else f"{learning_rate:g}"


def counted_runs(runs):
    """The runs that summaries count: a collapsed run that was restarted counts through its
    last restart instead."""
    return sorted((chain[-1] for chain in chains(runs)), key=run_order)


def chains(runs):
    """The runs as chains, in run order: each asked run, then the restarts that followed it
    while it collapsed. A restart names the run it followed (`restarted_from`), so one left by
    an earlier attempt that --overwrite redid follows nothing and is left out."""
    followers = {run["restarted_from"]: run for run in runs if "restarted_from" in run}
    found = []
    for head in sorted(runs, key=run_order):
        if "restart_of" in head:
            continue
        chain = [head]
        while chain[-1].get("collapsed") and chain[-1].get("run_id") in followers:
            chain.append(followers[chain[-1]["run_id"]])
        found.append(chain)
    return found


def run_order(run):
    """Runs sort by learning rate, then seed: choices never depend on the order of recording."""
    return run["learning_rate"] or 0.0, run["seed"]


def seed_summary(rate_runs):
    """Per dev split and metric, the spread over one learning rate's runs; the spread of their
    task scores; and how many of them collapsed."""
    summary = {split: {name: spread([run.get(split, {}).get(name) for run in rate_runs])
                       for name in metrics}
               for split, metrics in dev_metrics(rate_runs[0]).items()}
    return {**summary, "task_score": spread(map(run_score, rate_runs)),
            "collapsed_runs": sum(bool(run.get("collapsed")) for run in rate_runs)}


def spread(values):
    """Median, mean, sample standard deviation (0 for one value), min and max of the defined
    values, and how many there were."""
    values = [value for value in values if value is not None]
    if not values:
        return {"runs": 0}
    return {"median": statistics.median(values), "mean": statistics.fmean(values),
            "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values), "runs": len(values)}


PROCESS_KEYS = ("flags", "tokenize_seconds", "replicas")  # what a run's process adds to it


def glue_score(results):
    """The GLUE average over the tasks in `results`: each task's score (`entry_score`), then
    their mean. MNLI counts once, however its dev splits were run: the entry with both
    (`mnli`), else the mean of `mnli_matched`'s and `mnli_mismatched`'s."""
    entries_by_task = by_dataset({name: entry for name, entry in sorted(results.items())
                                  if name in TASKS and dev_metrics(entry)})
    scores = {}
    for name, entries in sorted(entries_by_task.items()):
        whole = [entry for entry in entries
                 if len(dev_metrics(entry)) == len(TASKS[name].eval_splits)]
        scores[name] = statistics.fmean(map(entry_score, whole[:1] or entries))
    if not scores:
        return None
    return {"average": sum(scores.values()) / len(scores), "tasks": scores}


def entry_score(entry):
    return entry.get("glue_task_score", task_score(dev_metrics(entry)))

# ================================================================================================
# Command line


def options_from_flags(own_flags):
    """glue.py's flags as a plain namespace, as a command reads them, with the places that
    default to the submission folder's filled in: the results JSON and TensorBoard's folder
    (None: no TensorBoard logs)."""
    options = types.SimpleNamespace(**{flag.name: flag.value for flag in own_flags})
    folder = options.submission_directory
    options.results_path = options.results_path or (
        folder and os.path.join(folder, "glue_results.json"))
    options.tensorboard_dir = options.tensorboard and (
        options.tensorboard_dir or (folder and os.path.join(folder, "tensorboard"))) or None
    return options


def flags_with(*wanted):
    return [name for name, roles in FLAG_ROLES.items() if set(wanted) & set(roles)]


def parse_flags(argv):
    """absl's flag parsing, except that --help shows glue.py's flags grouped by purpose."""
    if any(argument in ("--help", "-help", "-?", "--helpshort") for argument in argv[1:]):
        print(grouped_help(FLAGS))
        sys.exit(0)
    return app.parse_flags_with_usage(argv)


def grouped_help(flag_values):
    """The text of --help: the usage line, then every group of HELP_GROUPS and the flags a
    researcher defined with absl's own DEFINE_*, each with its help and default, wrapped as
    absl wraps them."""
    lines = ["\n\n".join(__doc__.strip().split("\n\n")[:2]), ""]
    own = [flag.name for flag in flag_values.get_key_flags_for_module(sys.modules[__name__])
           if flag.name not in FLAG_ROLES]
    for title, names in {**HELP_GROUPS, **({"Your own flags": own} if own else {})}.items():
        lines.append(f"{title}:")
        for name in names:
            flag = flag_values[name]
            default = "" if flag.default is None else f" (default: {flag.default_as_str})"
            lines.append(flags.text_wrap(f"--{name}: {flag.help}{default}", indent="      ",
                                         firstline_indent="  "))
        lines.append("")
    lines.append("absl's own flags: --helpfull.")
    return "\n".join(lines)


def main_then_exit(argv):
    """`main`, then the exit handlers (autograph's removes the code it wrote to /tmp) and an
    immediate exit, everything flushed: TensorFlow's native teardown would take another 1.5 s,
    5% of a short run (benchmarks/RESULTS.md). Failures leave through `sys.exit` as usual."""
    main(argv)
    atexit._run_exitfuncs()  # what a normal exit calls first
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    app.run(main_then_exit, flags_parser=parse_flags)
