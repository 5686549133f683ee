"""Times `--compare_with` at full GLUE size: two submission folders, each with 9 tasks of 5
runs, every run with its dev predictions at the official dev sizes (MNLI's two dev sets of
9,815 and 9,832 rows, QQP's 40,430), then `glue.py --task_name=none --compare_with=...`,
timed as a whole and, in process, the comparison alone.

    python benchmarks/compare.py [--folder=/tmp/glue_compare]

No training: the runs' predictions are drawn at random around a set accuracy (the two folders
1.5 points apart), so that some tasks differ and some do not. Used for benchmarks/RESULTS.md
("Comparing two folders").
"""

import argparse
import os
import platform
import subprocess
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import glue  # noqa: E402

DEV_SIZES = {("cola", "validation"): 1043, ("sst2", "validation"): 872,
             ("mrpc", "validation"): 408, ("stsb", "validation"): 1500,
             ("qqp", "validation"): 40430, ("mnli", "validation_matched"): 9815,
             ("mnli", "validation_mismatched"): 9832, ("qnli", "validation"): 5463,
             ("rte", "validation"): 277, ("wnli", "validation"): 71}
SEEDS, RATE = (1, 2, 3, 4, 5), 2e-5


def fabricate(folder, accuracy, rng):
    """A submission folder whose runs predicted right with about `accuracy`."""
    results = {}
    for name in glue.ALL_TASKS:  # the 9 tasks of `all` (MNLI with its two dev sets)
        task = glue.TASKS[name]
        settings = {"data": {f"{name} {split}": "same" for split in task.eval_splits}}
        settings_id, records = glue.fingerprint_id(settings), []
        labels = {split: np.random.default_rng(len(name)).integers(
            0, max(task.num_outputs, 2), DEV_SIZES[name, split]) for split in task.eval_splits}
        for seed in SEEDS:
            run = {"learning_rate": RATE, "seed": seed, "run_id": f"{name}{seed}"}
            tables = {}
            for split, gold in labels.items():
                if task.is_regression:
                    gold = gold * 2.5
                    predicted = np.clip(gold + rng.normal(0, 2 * (1 - accuracy), len(gold)), 0, 5)
                else:
                    right = rng.random(len(gold)) < accuracy
                    predicted = np.where(right, gold, (gold + 1) % task.num_outputs)
                run[split] = glue.compute_metrics(task, gold, predicted)
                tables[glue.DEV_PREDICTIONS.format(split)] = glue.pd.DataFrame(
                    {"index": np.arange(len(gold)), "label": gold, "prediction": predicted})
            run_folder = glue.run_folder(os.path.join(folder, "runs", name, settings_id),
                                         RATE, seed)
            glue.write_run(run_folder, run, tables)
            records.append(run)
        results[name] = {**glue.summarized(records), "fingerprint_id": settings_id,
                         "fingerprint": settings}
    glue.write_json(os.path.join(folder, "glue_results.json"), results)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--folder", default="/tmp/glue_compare")
    folder = parser.parse_args().folder
    this, other = os.path.join(folder, "this"), os.path.join(folder, "other")
    rng = np.random.default_rng(0)
    fabricate(this, 0.85, rng)
    fabricate(other, 0.835, rng)
    start = time.perf_counter()
    comparison = glue.compare(glue.read_results(os.path.join(this, "glue_results.json")),
                              os.path.join(this, "runs"),
                              glue.read_results(os.path.join(other, "glue_results.json")),
                              os.path.join(other, "runs"))
    in_process = time.perf_counter() - start
    start = time.perf_counter()
    subprocess.run([sys.executable, glue.__file__, "--task_name=none",
                    f"--submission_directory={this}", f"--compare_with={other}"], check=True)
    command = time.perf_counter() - start
    cpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    model = [line.split(":", 1)[1].strip() for line in cpu.splitlines()
             if line.startswith(("Model name", "CPU family", "Model:"))]
    print(f"CPU: {', '.join(model)}; {os.cpu_count()} cores; Python {platform.python_version()}")
    print(f"compare() in process: {in_process:.2f} s for {len(comparison['tasks'])} tasks, "
          f"{comparison['glue_score']['paired_examples']} paired dev examples per run")
    print(f"the whole command (TensorFlow import, publish, report, comparison): {command:.2f} s")


if __name__ == "__main__":
    main()
