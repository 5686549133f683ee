"""Shared fixtures: a tiny random BERT preset and tiny GLUE files in the real layouts.

Nothing here touches the network, so the whole suite runs offline in a few minutes.
"""

import json
import os
import random
import sys
import traceback

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import keras_hub  # noqa: E402
import pytest  # noqa: E402
from absl import flags  # noqa: E402

import glue  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REAL_GLUE_DATA = os.path.join(REPO, "..", "shared", "glue_data")
REAL_SUBMISSION = os.path.join(REPO, "..", "shared", "glue_reference_submission")

WORDS = ["the", "a", "cat", "dog", "sat", "on", "mat", "is", "good", "bad", "not", "it",
         "was", "very", "movie", "film", "man", "woman", "said", "what", "who", "big"]
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", '"', "'", ".", ",", "?"] + WORDS


@pytest.fixture(scope="session")
def tiny_preset(tmp_path_factory):
    """A randomly initialised one-layer BERT saved as a local KerasHub preset."""
    directory = str(tmp_path_factory.mktemp("tiny_bert_preset"))
    tokenizer = keras_hub.models.BertTokenizer(vocabulary=VOCAB, lowercase=True)
    backbone = keras_hub.models.BertBackbone(
        vocabulary_size=len(VOCAB), num_layers=1, num_heads=2, hidden_dim=8,
        intermediate_dim=16, max_sequence_length=64)
    preprocessor = keras_hub.models.BertTextClassifierPreprocessor(
        tokenizer=tokenizer, sequence_length=32)
    backbone.save_to_preset(directory)
    preprocessor.save_to_preset(directory)
    return directory


def sentence(rng):
    words = rng.choices(WORDS, k=rng.randint(3, 9))
    if rng.random() < 0.3:  # GLUE sentences carry bare quotes; readers must not parse them
        words.insert(1, '"')
    return " ".join(words) + rng.choice([" .", " ?", ""])


def write_tsv(path, header, rows, *, bom=False, trailing_newline=True):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    lines = (["\t".join(header)] if header else []) + ["\t".join(map(str, r)) for r in rows]
    text = "\n".join(lines) + ("\n" if trailing_newline else "")
    with open(path, "w", encoding="utf-8") as file:
        file.write(("\ufeff" if bom else "") + text)


def write_glue_data(root, sizes=(16, 8, 8), seed=0, shuffle_test=True):
    """Writes every GLUE dataset in the standard glue_data/ layout, with the real files' traps.

    With `shuffle_test`, test rows are out of `index` order, a guard on submission order.
    Returns {dataset: {split: row count}}.
    """
    rng = random.Random(seed)

    def shuffled_test_rows(rng, count, make_row):
        rows = [[index] + make_row() for index in range(count)]
        if shuffle_test:
            rng.shuffle(rows)
        return rows

    train, dev, test = sizes
    counts = {}

    def pair():
        return [sentence(rng), sentence(rng)]

    # CoLA: train/dev have no header; test has `index<TAB>sentence`.
    for split, n in (("train", train), ("dev", dev)):
        write_tsv(f"{root}/CoLA/{split}.tsv", None,
                  [["gj04", rng.randint(0, 1), rng.choice(["", "*"]), sentence(rng)]
                   for _ in range(n)], trailing_newline=split == "train")
    write_tsv(f"{root}/CoLA/test.tsv", ["index", "sentence"],
              shuffled_test_rows(rng, test, lambda: [sentence(rng)]))
    counts["cola"] = {"train": train, "validation": dev, "test": test}

    for split, n in (("train", train), ("dev", dev)):
        write_tsv(f"{root}/SST-2/{split}.tsv", ["sentence", "label"],
                  [[sentence(rng), rng.randint(0, 1)] for _ in range(n)])
    write_tsv(f"{root}/SST-2/test.tsv", ["index", "sentence"],
              shuffled_test_rows(rng, test, lambda: [sentence(rng)]))
    counts["sst2"] = {"train": train, "validation": dev, "test": test}

    # MRPC: train/dev start with a byte-order mark.
    for split, n in (("train", train), ("dev", dev)):
        write_tsv(f"{root}/MRPC/{split}.tsv", ["Quality", "#1 ID", "#2 ID", "#1 String",
                                               "#2 String"],
                  [[rng.randint(0, 1), rng.randint(1, 10**6), rng.randint(1, 10**6)] + pair()
                   for _ in range(n)], bom=True)
    write_tsv(f"{root}/MRPC/test.tsv", ["index", "#1 ID", "#2 ID", "#1 String", "#2 String"],
              shuffled_test_rows(rng, test, lambda: [1, 2] + pair()))
    counts["mrpc"] = {"train": train, "validation": dev, "test": test}

    stsb_header = ["index", "genre", "filename", "year", "old_index", "source1", "source2",
                   "sentence1", "sentence2"]
    for split, n in (("train", train), ("dev", dev)):
        write_tsv(f"{root}/STS-B/{split}.tsv", stsb_header + ["score"],
                  [[i, "main-news", "f", "2012", i, "none", "none"] + pair() +
                   [f"{rng.uniform(0, 5):.3f}"] for i in range(n)])
    write_tsv(f"{root}/STS-B/test.tsv", stsb_header,
              shuffled_test_rows(rng, test, lambda: ["g", "f", "2016", 0, "s", "s"] + pair()))
    counts["stsb"] = {"train": train, "validation": dev, "test": test}

    for split, n in (("train", train), ("dev", dev)):
        write_tsv(f"{root}/QQP/{split}.tsv", ["id", "qid1", "qid2", "question1", "question2",
                                              "is_duplicate"],
                  [[i, 2 * i, 2 * i + 1] + pair() + [rng.randint(0, 1)] for i in range(n)])
    write_tsv(f"{root}/QQP/test.tsv", ["id", "question1", "question2"],
              shuffled_test_rows(rng, test, pair))
    counts["qqp"] = {"train": train, "validation": dev, "test": test}

    mnli_head = ["index", "promptID", "pairID", "genre", "sentence1_binary_parse",
                 "sentence2_binary_parse", "sentence1_parse", "sentence2_parse", "sentence1",
                 "sentence2"]
    labels3 = ["entailment", "neutral", "contradiction"]

    def mnli_row(i, extra):
        return [i, i, f"{i}e", "fiction", "( a )", "( b )", "(ROOT a)", "(ROOT b)"] + pair() + \
            extra

    write_tsv(f"{root}/MNLI/train.tsv", mnli_head + ["label1", "gold_label"],
              [mnli_row(i, [label, label]) for i in range(train)
               for label in [rng.choice(labels3)]])
    for kind in ("matched", "mismatched"):
        write_tsv(f"{root}/MNLI/dev_{kind}.tsv",
                  mnli_head + ["label1", "label2", "label3", "label4", "label5", "gold_label"],
                  [mnli_row(i, [label] * 6) for i in range(dev)
                   for label in [rng.choice(labels3)]])
        write_tsv(f"{root}/MNLI/test_{kind}.tsv", mnli_head,
                  shuffled_test_rows(rng, test, lambda: mnli_row(0, [])[1:]))
    counts["mnli"] = {"train": train, "validation_matched": dev, "validation_mismatched": dev,
                      "test_matched": test, "test_mismatched": test}

    two_class = {"QNLI": ["question", "sentence"], "RTE": ["sentence1", "sentence2"],
                 "WNLI": ["sentence1", "sentence2"]}
    for folder, columns in two_class.items():
        spelled = [0, 1] if folder == "WNLI" else ["entailment", "not_entailment"]
        for split, n in (("train", train), ("dev", dev)):
            write_tsv(f"{root}/{folder}/{split}.tsv", ["index"] + columns + ["label"],
                      [[i] + pair() + [rng.choice(spelled)] for i in range(n)])
        write_tsv(f"{root}/{folder}/test.tsv", ["index"] + columns,
                  shuffled_test_rows(rng, test, pair))
        counts[folder.lower()] = {"train": train, "validation": dev, "test": test}

    write_tsv(f"{root}/diagnostic/diagnostic.tsv", ["index", "sentence1", "sentence2"],
              shuffled_test_rows(rng, test, pair))
    counts["ax"] = {"test": test}
    return counts


@pytest.fixture(scope="session")
def glue_data(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("glue_data"))
    return root, write_glue_data(root)


def entry_of(folder, task="rte"):
    """A task's entry in the results JSON of a submission folder."""
    return json.loads((folder / "glue_results.json").read_text())[task]


def options_for(*args):
    """glue.py's options for the given flags, as a command reads them."""
    flags.FLAGS(["glue.py", *args])
    try:
        return glue.options_from_flags(glue.FLAGS.get_key_flags_for_module(glue))
    finally:
        flags.FLAGS.unparse_flags()


class InProcessRun:
    """A run that a sweep starts, run at once in the test's own process by `glue.main`, the
    function a run's process runs: the test's patches reach it, and it pays no TensorFlow
    import. Its log holds its error line, as a run process' would."""

    def __init__(self, command, log_path, environment=None, cores=None):
        self.returncode = 0
        open(log_path, "a").close()
        flags.FLAGS.unparse_flags()
        flags.FLAGS(["glue.py", *command[2:]])
        try:
            glue.main([])
        except SystemExit as stop:
            self.returncode = 1 if isinstance(stop.code, str) else stop.code or 0
            if isinstance(stop.code, str):
                print(stop.code, file=sys.stderr)
                with open(log_path, "a", encoding="utf-8") as log:
                    log.write(stop.code + "\n")
        except Exception:
            self.returncode = 1
            with open(log_path, "a", encoding="utf-8") as log:
                log.write(traceback.format_exc())
        finally:
            flags.FLAGS.unparse_flags()

    def poll(self):
        return self.returncode

    wait = poll

    def send_signal(self, number):
        pass  # it has ended already

    def finish(self):
        pass


@pytest.fixture(autouse=True)
def runs_in_process(monkeypatch):
    """Sweeps started in a test's process run their runs in it too (`InProcessRun`); a test
    that starts glue.py as a process gets real run processes."""
    monkeypatch.setattr(glue, "start_run", InProcessRun)


@pytest.fixture(scope="session")
def learnable_data(tmp_path_factory):
    """SST-2 files whose label is whether the sentence says `good` or `bad`: a task the tiny
    model learns, so that its predictions depend on each row and its seeds differ."""
    root = tmp_path_factory.mktemp("learnable_glue_data")
    rng = random.Random(0)
    filler = [word for word in WORDS if word not in ("good", "bad", "not")]

    def example():
        label = rng.randint(0, 1)
        words = rng.choices(filler, k=rng.randint(2, 10))
        words.insert(rng.randint(0, len(words)), "good" if label else "bad")
        return " ".join(words), label

    write_tsv(root / "SST-2" / "train.tsv", ["sentence", "label"],
              [example() for _ in range(96)])
    write_tsv(root / "SST-2" / "dev.tsv", ["sentence", "label"], [example() for _ in range(33)])
    test_rows = [[index, example()[0]] for index in range(33)]
    rng.shuffle(test_rows)
    write_tsv(root / "SST-2" / "test.tsv", ["index", "sentence"], test_rows)
    return str(root)


def imported_modules(stderr):
    """The modules `python -X importtime` says a process imported, by their dotted names."""
    return {line.split("|")[-1].strip() for line in stderr.splitlines()
            if line.startswith("import time:")}


def error_of(run_glue, *args):
    """Runs glue.py in process and returns its one-line error message."""
    with pytest.raises(SystemExit) as exit_info:
        run_glue(*args)
    message = exit_info.value.code
    assert isinstance(message, str) and message.startswith("glue.py: error: "), message
    assert "\n" not in message
    return message


def glue_main(*args):
    """Runs glue.main in this process with the given flags, as `python glue.py ...` would."""
    flags.FLAGS.unparse_flags()
    flags.FLAGS(["glue.py", *args])
    try:
        glue.main([])
    finally:
        flags.FLAGS.unparse_flags()


def crash_runs(monkeypatch, crashes, error):
    """Makes finetuning raise `error` in the runs whose progress label `crashes(label)` picks
    (`rte`, or `rte lr 5e-05 seed 2` in a sweep)."""
    real = glue.finetune

    def finetune(model, split, checkpoints, **kwargs):
        if crashes(kwargs["label"]):
            raise error
        return real(model, split, checkpoints, **kwargs)

    monkeypatch.setattr(glue, "finetune", finetune)


@pytest.fixture
def run_glue():
    return glue_main


def grow_test_files_to_official_size(root):
    """Rewrites each fixture test file with the official GLUE test size, so that a run over the
    fixture gives submission files the leaderboard (and our validator) would accept."""
    for output in glue.SUBMISSION_FILES.values():
        local = glue.TASKS[output.dataset].local
        path = os.path.join(root, local.folder, dict(local.files)[output.split])
        with open(path, encoding="utf-8") as file:
            header, *rows = file.read().splitlines()
        grown = [f"{index}\t{rows[index % len(rows)].split(chr(9), 1)[1]}"
                 for index in range(output.rows)]
        with open(path, "w", encoding="utf-8") as file:
            file.write("\n".join([header] + grown) + "\n")
