"""Batching by length from unpadded storage: every example kept, in a known order, with the
predictions of fixed padding."""

import keras
import keras_hub
import numpy as np
import pandas as pd
import pytest
import tensorflow as tf
from absl import flags

import glue


@pytest.fixture(scope="module")
def preprocessor(tiny_preset):
    return keras_hub.models.TextClassifierPreprocessor.from_preset(tiny_preset,
                                                                    sequence_length=64)


@pytest.fixture(scope="module")
def fixed_padding(glue_data, preprocessor):
    """MRPC's training split as the preprocessor pads it: every row 64 tokens long."""
    examples = glue.read_local_split(glue_data[0], "mrpc", "train").batch(100)
    (features, label), = [glue.features_and_label(glue.TASKS["mrpc"])(batch)
                          for batch in examples]
    return preprocessor(x=features)


@pytest.fixture(scope="module")
def mrpc_tokenized(glue_data, preprocessor):
    examples = glue.read_local_split(glue_data[0], "mrpc", "train")
    return glue.tokenize(examples, glue.TASKS["mrpc"],
                         tf.function(lambda features, label: (preprocessor(x=features), label)))


def in_file_order(split):
    return tf.data.Dataset.range(len(split))


def collect(batches):
    idx, lengths, widths = [], [], []
    for inputs, label, batch_idx in batches.as_numpy_iterator():
        idx += batch_idx.tolist()
        lengths += inputs["padding_mask"].sum(axis=1).tolist()
        widths.append(inputs["token_ids"].shape[1])
    return idx, lengths, widths


def test_tokenizing_keeps_every_row_in_file_order_without_padding(mrpc_tokenized, glue_data,
                                                                  fixed_padding):
    split = mrpc_tokenized
    assert split.idx.tolist() == list(range(16)) and len(split) == 16
    file_labels = pd.read_csv(f"{glue_data[0]}/MRPC/train.tsv", sep="\t", quoting=3)["Quality"]
    assert split.labels.tolist() == file_labels.tolist()
    lengths = fixed_padding["padding_mask"].numpy().sum(axis=1)
    assert split.lengths.tolist() == lengths.tolist() and split.padded_length == 64
    assert sorted(split.tokens) == ["segment_ids", "token_ids"]  # the mask is its lengths
    assert split.tokens["segment_ids"].dtype == np.int8  # 0 and 1 need one byte
    for name, values in split.tokens.items():  # real tokens only, one row after the other
        assert len(values) == lengths.sum()
        for row, length in enumerate(lengths):
            np.testing.assert_array_equal(
                values[split.offsets[row]:split.offsets[row + 1]],
                fixed_padding[name].numpy()[row, :length])
    inputs, labels, idx = glue.rows_of(split, np.arange(16))  # padded back: the same rows
    width = inputs["token_ids"].shape[1]
    assert width == -(-lengths.max() // 8) * 8 and idx.tolist() == list(range(16))
    for name in glue.TOKEN_ALIGNED:
        assert inputs[name].dtype == fixed_padding[name].numpy().dtype
        np.testing.assert_array_equal(inputs[name], fixed_padding[name].numpy()[:, :width])


def test_batching_by_length_keeps_every_example_once(mrpc_tokenized, fixed_padding):
    idx, lengths, widths = collect(glue.batch_by_length(mrpc_tokenized,
                                                        in_file_order(mrpc_tokenized), 4))
    assert sorted(idx) == list(range(16))
    expected = fixed_padding["padding_mask"].numpy().sum(axis=1)
    assert sorted(zip(idx, lengths)) == list(enumerate(expected))  # no token lost
    assert all(width % 8 == 0 for width in widths) and max(widths) < 64
    assert len(widths) == glue.steps_per_epoch(mrpc_tokenized, 4)


def test_each_batch_is_padded_to_the_multiple_of_8_above_its_longest_example(mrpc_tokenized):
    batches = glue.batch_by_length(mrpc_tokenized, in_file_order(mrpc_tokenized), 3)
    for inputs, _, _ in batches.as_numpy_iterator():
        width = inputs["token_ids"].shape[1]
        longest = inputs["padding_mask"].sum(axis=1).max()
        assert width - 8 < longest <= width
        assert {inputs[name].shape[1] for name in inputs} == {width}


def test_steps_per_epoch_holds_for_any_order(mrpc_tokenized):
    for seed in range(3):
        order = in_file_order(mrpc_tokenized).shuffle(16, seed=seed)
        batches = glue.batch_by_length(mrpc_tokenized, order, 3)
        assert sum(1 for _ in batches) == glue.steps_per_epoch(mrpc_tokenized, 3)


def test_inputs_without_a_padding_mask_are_batched_as_they_are():
    plain = glue.without_padding({"x": tf.ones((5, 8))}, np.zeros(5), np.arange(5))
    assert plain.lengths is None
    batches = glue.batch_by_length(plain, in_file_order(plain), 2)
    assert [batch[0]["x"].shape for batch in batches] == [(2, 8), (2, 8), (1, 8)]
    assert glue.steps_per_epoch(plain, 2) == 3


def test_same_predictions_as_fixed_padding(mrpc_tokenized, fixed_padding, tiny_preset):
    keras.utils.set_random_seed(0)
    backbone = keras_hub.models.Backbone.from_preset(tiny_preset)
    for pooling in ("pooled", "cls", "mean"):
        model = glue.GlueClassifier(glue.sentence_encoder(backbone, pooling), num_classes=2)
        fixed = model(fixed_padding).numpy()
        by_length = {}
        for inputs, _, idx in glue.batch_by_length(mrpc_tokenized,
                                                   in_file_order(mrpc_tokenized), 4):
            by_length.update(zip(idx.numpy().tolist(), model(inputs).numpy()))
        for row, logits in enumerate(fixed):
            np.testing.assert_allclose(by_length[row], logits, rtol=1e-4, atol=1e-5)
        # What predict() does: shortest rows first, batches padded, labels and idx carried along.
        idx, labels, predictions = glue.predict(model, mrpc_tokenized, glue.TASKS["mrpc"], 4)
        assert sorted(idx.tolist()) == list(range(16))
        assert predictions.tolist() == [fixed[row].argmax() for row in idx.tolist()]
        assert labels.tolist() == [mrpc_tokenized.labels[row] for row in idx.tolist()]


def test_predictions_go_shortest_first_in_padded_batches(mrpc_tokenized):
    order = glue.shortest_first(mrpc_tokenized)
    lengths = mrpc_tokenized.lengths
    assert sorted(order.tolist()) == list(range(16))
    assert lengths[order].tolist() == sorted(lengths.tolist())
    batches = glue.prediction_batches(mrpc_tokenized, order, 4)
    widths = [inputs["token_ids"].shape[1] for inputs, _, _ in batches.as_numpy_iterator()]
    assert widths == [-(-lengths[order][i + 3] // 8) * 8 for i in range(0, 16, 4)]


@pytest.mark.slow
def test_mixed_precision_keeps_float32_logits_and_jit_compile_runs(glue_data, tiny_preset,
                                                                   tmp_path, run_glue):
    model_path = tmp_path / "model.keras"
    try:
        run_glue("--task_name=rte", "--mixed_precision=mixed_bfloat16", "--jit_compile",
                 f"--preset={tiny_preset}", f"--data_dir={glue_data[0]}", "--epochs=1",
                 "--batch_size=4", "--max_sequence_length=32",
                 f"--finetuning_model_save_path={model_path}")
    finally:
        keras.mixed_precision.set_global_policy("float32")
    model = keras.models.load_model(model_path, compile=False)
    assert model.get_layer("logits").dtype_policy.compute_dtype == "float32"
    assert any(layer.dtype_policy.name == "mixed_bfloat16" for layer in model.layers)


def test_the_prediction_step_is_traced_once_for_every_shape(mrpc_tokenized, tiny_preset):
    backbone = keras_hub.models.Backbone.from_preset(tiny_preset)
    model = glue.GlueClassifier(glue.sentence_encoder(backbone, "pooled"), num_classes=2)
    glue.predict(model, mrpc_tokenized, glue.TASKS["mrpc"], batch_size=3)  # widths vary, last is 1
    glue.predict(model, mrpc_tokenized, glue.TASKS["mrpc"], batch_size=5)
    assert model.predict_function.experimental_get_tracing_count() == 1


@pytest.mark.parametrize("default_classifier", [True, False])
def test_bfloat16_computes_the_encoder_in_bfloat16_and_logits_and_loss_in_float32(
        mrpc_tokenized, tiny_preset, default_classifier):
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    flags.FLAGS(["glue.py", f"--preset={tiny_preset}",
                 f"--use_default_classifier={default_classifier}"])
    try:
        model = glue.make_finetuning_model(glue.load_pretrained_model(), 2)
        glue.compile_for(model, glue.TASKS["mrpc"], glue.make_optimizer(1e-3, 10, 0.1, 0.01))
        inputs, labels, _ = next(iter(glue.batch_by_length(
            mrpc_tokenized, in_file_order(mrpc_tokenized), 4)))
        encoded = glue.backbone_in(model)(inputs)["sequence_output"]
        logits = model(inputs)
        loss = model.compute_loss(x=inputs, y=labels, y_pred=logits)
    finally:
        flags.FLAGS.unparse_flags()
        keras.mixed_precision.set_global_policy("float32")
    assert encoded.dtype == tf.bfloat16
    assert logits.dtype == tf.float32 and loss.dtype == tf.float32
    assert all(weight.dtype == "float32" for weight in model.trainable_weights)


def test_the_bfloat16_hint_names_the_instructions_and_the_measured_gain():
    assert "AMX" in glue.bf16_hint({"avx512f", "avx512_bf16", "amx_bf16"})
    assert "1.8x" in glue.bf16_hint({"amx_bf16"})
    assert "1.3x" in glue.bf16_hint({"avx512_bf16"})
    assert glue.bf16_hint({"avx2", "avx512f"}) is None


@pytest.mark.slow
def test_a_float32_run_on_a_bfloat16_cpu_says_so_once(glue_data, tiny_preset, run_glue,
                                                      monkeypatch, capsys):
    monkeypatch.setattr(glue, "cpu_flags", lambda: {"avx512_bf16"})
    args = ("--task_name=wnli", f"--preset={tiny_preset}", f"--data_dir={glue_data[0]}",
            "--epochs=1", "--batch_size=4", "--max_sequence_length=32")
    run_glue(*args)
    assert capsys.readouterr().out.count("--mixed_precision=mixed_bfloat16 would train") == 1
    try:
        run_glue(*args, "--mixed_precision=mixed_bfloat16")
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert "would train" not in capsys.readouterr().out


def test_training_flops_count_the_encoder_matmuls_at_the_batch_widths(mrpc_tokenized,
                                                                      tiny_preset):
    backbone = keras_hub.models.Backbone.from_preset(tiny_preset)  # 1 layer, hidden 8, ffn 16
    model = glue.GlueClassifier(glue.sentence_encoder(backbone, "pooled"), num_classes=2)
    # Per token: q, k, v and output projections (4 x 8 x 8) and the feedforward (2 x 8 x 16).
    dense_weights = 4 * 8 * 8 + 2 * 8 * 16
    widths = [-(-int(length) // 8) * 8 for length in mrpc_tokenized.lengths]
    forward = sum(2 * dense_weights * width + 4 * 1 * 8 * width ** 2 for width in widths)
    assert glue.training_flops(model, mrpc_tokenized, epochs=2) == pytest.approx(
        3 * 2 * forward)


@pytest.mark.parametrize("accumulation", [1, 2])
def test_the_fused_adamw_takes_keras_own_steps(accumulation):
    """One kernel a variable (`FusedAdamW`) against Keras' AdamW: the same weights, to a float32
    rounding, with the schedule, clipping, decay on the kernels alone, and accumulation."""
    def trained(optimizer):
        keras.utils.set_random_seed(3)
        model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(5, activation="gelu"),
                                  keras.layers.LayerNormalization(), keras.layers.Dense(2)])
        model.compile(optimizer=optimizer, loss=keras.losses.SparseCategoricalCrossentropy(
            from_logits=True))
        rng = np.random.default_rng(0)
        for _ in range(6):
            model.train_on_batch(rng.normal(size=(8, 6)), rng.integers(0, 2, 8))
        return [weight.numpy() for weight in model.weights]

    fused = glue.make_optimizer(1e-2, 6, 0.3, 0.1, clip_norm=0.5, accumulation=accumulation)
    assert type(fused).__mro__[1] is glue.FusedAdamW
    own = keras.optimizers.AdamW(
        learning_rate=glue.WarmupLinearDecay(1e-2, int(6 // accumulation * 0.3),
                                             6 // accumulation, accumulation),
        weight_decay=0.1, global_clipnorm=0.5,
        gradient_accumulation_steps=accumulation if accumulation > 1 else None)
    own.exclude_from_weight_decay(var_names=["bias", "gamma", "beta"])
    for ours, keras_own in zip(trained(fused), trained(own)):
        np.testing.assert_allclose(ours, keras_own, atol=1e-6)
