"""Batching by length: every example kept, in a known order, with the same predictions."""

import keras
import keras_hub
import numpy as np
import pandas as pd
import pytest
import tensorflow as tf

import glue


@pytest.fixture(scope="module")
def mrpc_tokenized(glue_data, tiny_preset):
    preprocessor = keras_hub.models.TextClassifierPreprocessor.from_preset(
        tiny_preset, sequence_length=64)
    examples = glue.read_local_split(glue_data[0], "mrpc", "train")
    return glue.tokenize(examples, glue.TASKS["mrpc"],
                         tf.function(lambda features, label: (preprocessor(x=features), label)))


@pytest.fixture(scope="module")
def mrpc_rows(mrpc_tokenized):
    return tf.data.Dataset.from_tensor_slices(mrpc_tokenized)


def collect(batches):
    idx, lengths, widths = [], [], []
    for inputs, label, batch_idx in batches.as_numpy_iterator():
        idx += batch_idx.tolist()
        lengths += inputs["padding_mask"].sum(axis=1).tolist()
        widths.append(inputs["token_ids"].shape[1])
    return idx, lengths, widths


def test_tokenizing_keeps_every_row_in_file_order(mrpc_tokenized, glue_data):
    inputs, labels, idx = mrpc_tokenized
    assert idx.numpy().tolist() == list(range(16))
    assert inputs["token_ids"].shape == (16, 64) and labels.shape == (16,)
    file_labels = pd.read_csv(f"{glue_data[0]}/MRPC/train.tsv", sep="\t", quoting=3)["Quality"]
    assert labels.numpy().tolist() == file_labels.tolist()


def test_batching_by_length_keeps_every_example_once(mrpc_rows):
    idx, lengths, widths = collect(glue.batch_by_length(mrpc_rows, batch_size=4))
    assert sorted(idx) == list(range(16))
    plain_idx, plain_lengths, plain_widths = collect(mrpc_rows.batch(4))
    assert sorted(zip(idx, lengths)) == sorted(zip(plain_idx, plain_lengths))  # no token lost
    assert all(width % 8 == 0 for width in widths) and max(widths) < 64 == plain_widths[0]


def test_each_batch_is_trimmed_to_the_multiple_of_8_above_its_longest_example(mrpc_rows):
    for inputs, _, _ in glue.batch_by_length(mrpc_rows, batch_size=3).as_numpy_iterator():
        width = inputs["token_ids"].shape[1]
        longest = inputs["padding_mask"].sum(axis=1).max()
        assert width - 8 < longest <= width
        assert {inputs[name].shape[1] for name in inputs} == {width}


def test_inputs_without_a_padding_mask_are_batched_as_they_are():
    plain = tf.data.Dataset.from_tensor_slices(({"x": np.ones((5, 8))}, np.zeros(5),
                                                np.arange(5)))
    assert [batch[0]["x"].shape for batch in glue.batch_by_length(plain, 2)] == [
        (2, 8), (2, 8), (1, 8)]


def test_same_predictions_as_fixed_padding(mrpc_tokenized, mrpc_rows, tiny_preset):
    keras.utils.set_random_seed(0)
    backbone = keras_hub.models.Backbone.from_preset(tiny_preset)
    for pooling in ("pooled", "cls", "mean"):
        model = glue.GlueClassifier(glue.sentence_encoder(backbone, pooling), num_classes=2)
        by_length = {}
        for inputs, _, idx in glue.batch_by_length(mrpc_rows, 4):
            by_length.update(zip(idx.numpy().tolist(), model(inputs).numpy()))
        fixed = {}
        for inputs, _, idx in mrpc_rows.batch(4):
            fixed.update(zip(idx.numpy().tolist(), model(inputs).numpy()))
        for row, logits in fixed.items():
            np.testing.assert_allclose(by_length[row], logits, rtol=1e-4, atol=1e-5)
        # What predict() does: shortest rows first, batches trimmed, labels and idx carried along.
        idx, labels, predictions = glue.predict(model, mrpc_tokenized, glue.TASKS["mrpc"], 4)
        assert sorted(idx.tolist()) == list(range(16))
        assert predictions.tolist() == [fixed[row].argmax() for row in idx.tolist()]
        assert labels.tolist() == [mrpc_tokenized[1].numpy()[row] for row in idx.tolist()]


def test_predictions_go_shortest_first_in_trimmed_batches(mrpc_tokenized):
    inputs, _, _ = mrpc_tokenized
    order = glue.shortest_first(inputs)
    lengths = inputs["padding_mask"].numpy().sum(axis=1)
    assert sorted(order.tolist()) == list(range(16))
    assert lengths[order].tolist() == sorted(lengths.tolist())
    sorted_inputs = {name: tf.gather(value, order) for name, value in inputs.items()}
    widths = [batch["token_ids"].shape[1]
              for batch in glue.prediction_batches(sorted_inputs, 4).as_numpy_iterator()]
    assert widths == [-(-lengths[order][i + 3] // 8) * 8 for i in range(0, 16, 4)]


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
