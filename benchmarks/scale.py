"""Full-size GLUE runs with a tiny model: does memory follow the model or the data?

    python benchmarks/scale.py                         # MNLI and QQP at 10% and 100%, ~20 min
    python benchmarks/scale.py --tasks=mnli --fractions=0.1

Writes synthetic MNLI and QQP in GLUE's column layout (MNLI with its parse-tree columns, so that
the files are as large as the real ones) at a fraction of the official row counts, then runs
`glue.py` on each in a child process for 1 epoch with a tiny random BERT. It reports, per
run: rows/s of each phase (tokenizing every split, training, predicting dev and test), the
child's peak resident memory (`wait4`), and the longest silence on its output. It also measures
how fast the default preprocessing tokenizes sentence pairs, WordPiece (BERT) and byte-level
BPE (RoBERTa), on one thread and on every core.
"""

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchmark import machine  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The official row counts.
SIZES = {
    "mnli": {"train.tsv": 392702, "dev_matched.tsv": 9815, "dev_mismatched.tsv": 9832,
             "test_matched.tsv": 9796, "test_mismatched.tsv": 9847},
    "qqp": {"train.tsv": 363846, "dev.tsv": 40430, "test.tsv": 390965},
}
AX_ROWS = 1104
MNLI_COLUMNS = ["index", "promptID", "pairID", "genre", "sentence1_binary_parse",
                "sentence2_binary_parse", "sentence1_parse", "sentence2_parse", "sentence1",
                "sentence2"]
LABELS = ["entailment", "neutral", "contradiction"]


# ------------------------------------------------------------------------------------------------
# Synthetic data and a tiny model
# ------------------------------------------------------------------------------------------------

def make_words(count=5000, seed=0):
    rng = random.Random(seed)
    words = set()
    while len(words) < count:
        words.add("".join(rng.choices("abcdefghijklmnopqrstuvwxyz", k=rng.randint(2, 10))))
    return sorted(words)


class Sentences:
    def __init__(self, words, seed):
        self.words, self.rng = words, random.Random(seed)

    def __call__(self, low, high):
        return " ".join(self.rng.choices(self.words, k=self.rng.randint(low, high))) + " ."


def parse_tree(sentence):
    """A stand-in for MNLI's parse columns: about as long as the real ones."""
    words = sentence.split()
    return "(ROOT (S " + " ".join(f"(NN {word})" for word in words) + "))"


def write_rows(path, header, rows):
    with open(path, "w", encoding="utf-8") as file:
        file.write("\t".join(header) + "\n")
        for row in rows:
            file.write("\t".join(map(str, row)) + "\n")


def write_mnli(root, fraction, words):
    sentence = Sentences(words, seed=1)
    folder = os.path.join(root, "MNLI")
    os.makedirs(folder, exist_ok=True)
    rng = random.Random(2)

    def rows(count, labelled, extra_labels):
        for index in range(count):
            premise, hypothesis = sentence(5, 40), sentence(3, 20)
            label = rng.choice(LABELS)
            row = [index, index, f"{index}e", "fiction", parse_tree(premise),
                   parse_tree(hypothesis), parse_tree(premise), parse_tree(hypothesis), premise,
                   hypothesis]
            yield row + ([label] * extra_labels + [label] if labelled else [])

    for name, official in SIZES["mnli"].items():
        count = max(1, round(official * fraction))
        if name == "train.tsv":
            header, labelled, extra = MNLI_COLUMNS + ["label1", "gold_label"], True, 1
        elif name.startswith("dev"):
            header = MNLI_COLUMNS + ["label1", "label2", "label3", "label4", "label5",
                                     "gold_label"]
            labelled, extra = True, 5
        else:
            header, labelled, extra = MNLI_COLUMNS, False, 0
        write_rows(os.path.join(folder, name), header, rows(count, labelled, extra))
    os.makedirs(os.path.join(root, "diagnostic"), exist_ok=True)
    write_rows(os.path.join(root, "diagnostic", "diagnostic.tsv"),
               ["index", "sentence1", "sentence2"],
               ([index, sentence(5, 30), sentence(3, 15)] for index in range(AX_ROWS)))


def write_qqp(root, fraction, words):
    sentence = Sentences(words, seed=3)
    folder = os.path.join(root, "QQP")
    os.makedirs(folder, exist_ok=True)
    rng = random.Random(4)
    for name, official in SIZES["qqp"].items():
        count = max(1, round(official * fraction))
        if name == "test.tsv":
            write_rows(os.path.join(folder, name), ["id", "question1", "question2"],
                       ([index, sentence(3, 25), sentence(3, 25)] for index in range(count)))
        else:
            write_rows(os.path.join(folder, name),
                       ["id", "qid1", "qid2", "question1", "question2", "is_duplicate"],
                       ([index, 2 * index, 2 * index + 1, sentence(3, 25), sentence(3, 25),
                         rng.randint(0, 1)] for index in range(count)))


def bpe_vocabulary(words):
    """Byte-level BPE as RoBERTa's: characters, then merges that build every word."""
    vocabulary = {token: i for i, token in enumerate(["<s>", "<pad>", "</s>", "<unk>", "<mask>"])}
    merges = []
    for token in list("abcdefghijklmnopqrstuvwxyz.") + ["Ġ"]:
        vocabulary.setdefault(token, len(vocabulary))
    for word in words:
        built = "Ġ"
        for character in word:
            merge = f"{built} {character}"
            built += character
            if built not in vocabulary:
                vocabulary[built] = len(vocabulary)
                merges.append(merge)
    return vocabulary, merges


def save_tiny_presets(folder, words):
    """A tiny random BERT (WordPiece over the synthetic words) and a RoBERTa preprocessor."""
    import keras_hub
    bert = os.path.join(folder, "tiny_bert")
    vocabulary = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "."] + words
    keras_hub.models.BertBackbone(
        vocabulary_size=len(vocabulary), num_layers=2, num_heads=2, hidden_dim=32,
        intermediate_dim=64, max_sequence_length=128).save_to_preset(bert)
    keras_hub.models.BertTextClassifierPreprocessor(
        keras_hub.models.BertTokenizer(vocabulary=vocabulary, lowercase=True),
        sequence_length=128).save_to_preset(bert)
    roberta = os.path.join(folder, "tiny_roberta")
    bpe, merges = bpe_vocabulary(words)
    tokenizer = keras_hub.models.RobertaTokenizer(vocabulary=bpe, merges=merges)
    keras_hub.models.RobertaBackbone(
        vocabulary_size=tokenizer.vocabulary_size(), num_layers=2, num_heads=2, hidden_dim=32,
        intermediate_dim=64, max_sequence_length=130).save_to_preset(roberta)
    keras_hub.models.RobertaTextClassifierPreprocessor(
        tokenizer, sequence_length=128).save_to_preset(roberta)
    return bert, roberta


# ------------------------------------------------------------------------------------------------
# Measuring
# ------------------------------------------------------------------------------------------------

def run_glue(task, data_dir, preset, out):
    """glue.py for one epoch in a child process: its results entry, peak memory, wall time and
    the longest wait between two lines of its output."""
    results_path = os.path.join(out, "results.json")
    command = [sys.executable, os.path.join(REPO, "glue.py"), f"--task_name={task}",
               f"--data_dir={data_dir}", f"--preset={preset}", "--epochs=1",
               f"--submission_directory={out}", f"--results_path={results_path}"]
    start = last = time.perf_counter()
    longest_silence = 0.0
    with open(os.path.join(out, "log.txt"), "w") as log:
        child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                 text=True, env=dict(os.environ, KERAS_BACKEND="tensorflow"))
        for line in child.stdout:
            now = time.perf_counter()
            longest_silence = max(longest_silence, now - last)
            last = now
            log.write(line)
        _, status, usage = os.wait4(child.pid, 0)
    wall = time.perf_counter() - start
    if status != 0:
        raise SystemExit(f"glue.py failed on {task}; see {out}/log.txt")
    with open(results_path) as file:
        entry = json.load(file)[task]
    return entry, usage.ru_maxrss / 1024, wall, max(longest_silence, time.perf_counter() - last)


def scale_row(task, fraction, data_dir, preset, scratch, logs):
    out = tempfile.mkdtemp(dir=scratch)
    entry, peak_mb, wall, silence = run_glue(task, data_dir, preset, out)
    os.makedirs(logs, exist_ok=True)
    shutil.copy(os.path.join(out, "log.txt"), os.path.join(logs, f"{task}-{fraction:g}.log"))
    rows = {name: max(1, round(count * fraction)) for name, count in SIZES[task].items()}
    dev = sum(count for name, count in rows.items() if name.startswith("dev"))
    test = sum(count for name, count in rows.items() if name.startswith("test")) + \
        (AX_ROWS if task == "mnli" else 0)
    train = rows["train.tsv"]
    return {"task": task, "fraction": fraction, "train_rows": train, "dev_rows": dev,
            "test_rows": test, "tokenize_seconds": entry["tokenize_seconds"],
            "tokenize_rows_per_second": (train + dev + test) / entry["tokenize_seconds"],
            "train_seconds": entry["train_seconds"],
            "train_rows_per_second": train / entry["train_seconds"],
            "predict_seconds": entry["predict_seconds"],
            "predict_rows_per_second": (dev + test) / entry["predict_seconds"],
            "wall_seconds": wall, "peak_memory_mb": peak_mb, "longest_silence_seconds": silence,
            "validation": {split: metrics for split, metrics in entry.items()
                           if split.startswith("validation")}}


def tokenize_speed(args):
    """Child: tokenizes the synthetic MNLI training pairs with glue.tokenize; prints pairs/s."""
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    import keras_hub
    import tensorflow as tf
    sys.path.insert(0, REPO)
    import glue
    glue.TOKENIZE_THREADS = args.threads
    preprocessor = keras_hub.models.TextClassifierPreprocessor.from_preset(
        args.preset, sequence_length=128)
    examples = glue.read_local_split(args.data, "mnli", "train")
    preprocess_fn = tf.function(lambda features, label: (preprocessor(x=features), label))
    glue.tokenize(examples.take(2048), glue.TASKS["mnli"], preprocess_fn)  # set up, warm up
    start = time.perf_counter()
    split = glue.tokenize(examples, glue.TASKS["mnli"], preprocess_fn)
    seconds = time.perf_counter() - start
    print(json.dumps({"pairs": len(split), "seconds": seconds,
                      "pairs_per_second": len(split) / seconds}))


def measure_tokenizing(data_dir, preset, threads):
    command = [sys.executable, os.path.abspath(__file__), "--run=tokenize",
               f"--data={data_dir}", f"--preset={preset}", f"--threads={threads}"]
    result = subprocess.run(command, capture_output=True, text=True, check=True,
                            env=dict(os.environ, KERAS_BACKEND="tensorflow"))
    return json.loads(result.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------------
# Report
# ------------------------------------------------------------------------------------------------

def markdown(rows, tokenizing):
    lines = ["| task | rows (train / dev / test) | tokenize rows/s | train rows/s | "
             "predict rows/s | wall s | peak MB | longest silence s |",
             "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(
            f"| {row['task']} {100 * row['fraction']:g}% | {row['train_rows']} / "
            f"{row['dev_rows']} / {row['test_rows']} | {row['tokenize_rows_per_second']:.0f} | "
            f"{row['train_rows_per_second']:.0f} | {row['predict_rows_per_second']:.0f} | "
            f"{row['wall_seconds']:.0f} | {row['peak_memory_mb']:.0f} | "
            f"{row['longest_silence_seconds']:.0f} |")
    by_task = {}
    for row in rows:
        by_task.setdefault(row["task"], {})[row["fraction"]] = row["peak_memory_mb"]
    for task, peaks in by_task.items():
        if 0.1 in peaks and 1.0 in peaks:
            lines.append(f"\n{task}: peak memory at 100% / at 10%: "
                         f"{peaks[1.0] / peaks[0.1]:.2f}x")
    if tokenizing:
        lines += ["", "| tokenizer | threads | pairs/s |", "|---|---|---|"]
        for (name, threads), result in tokenizing.items():
            lines.append(f"| {name} | {threads} | {result['pairs_per_second']:.0f} |")
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default="mnli,qqp")
    parser.add_argument("--fractions", default="0.1,1.0")
    parser.add_argument("--no_tokenizer_speed", action="store_true")
    parser.add_argument("--out", default=os.path.join(REPO, "benchmarks"))
    # Used by the children:
    parser.add_argument("--run", choices=["tokenize"])
    parser.add_argument("--data")
    parser.add_argument("--preset")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    args = parser.parse_args()
    if args.run:
        tokenize_speed(args)
        return

    words = make_words()
    results, tokenizing = [], {}
    with tempfile.TemporaryDirectory() as scratch:
        bert, roberta = save_tiny_presets(scratch, words)
        for fraction in map(float, args.fractions.split(",")):
            data_dir = os.path.join(scratch, f"glue_data_{fraction:g}")
            for task in args.tasks.split(","):
                {"mnli": write_mnli, "qqp": write_qqp}[task](data_dir, fraction, words)
                row = scale_row(task, fraction, data_dir, bert, scratch,
                                os.path.join(args.out, "scale_logs"))
                print(json.dumps(row), flush=True)
                results.append(row)
            if not args.no_tokenizer_speed and fraction == 0.1 and "mnli" in args.tasks:
                for name, preset in (("WordPiece (BERT)", bert), ("BPE (RoBERTa)", roberta)):
                    for threads in sorted({1, os.cpu_count()}):
                        tokenizing[name, threads] = measure_tokenizing(data_dir, preset,
                                                                       threads)
                        print(name, threads, json.dumps(tokenizing[name, threads]), flush=True)
    report = f"Machine: {machine()}\n\n" + markdown(results, tokenizing)
    print(report)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "scale_results.json"), "w") as file:
        json.dump({"machine": machine(), "runs": results,
                   "tokenizing": [{"tokenizer": name, "threads": threads, **result}
                                  for (name, threads), result in tokenizing.items()]},
                  file, indent=2)
    with open(os.path.join(args.out, "scale_results.md"), "w") as file:
        file.write(report)


if __name__ == "__main__":
    main()
