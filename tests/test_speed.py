"""Batching by length: every example kept, in a known order, with the same predictions."""

import keras
import keras_hub
import numpy as np
import pytest
import tensorflow as tf

import glue


@pytest.fixture(scope="module")
def mrpc_tokenized(glue_data, tiny_preset):
    preprocessor = keras_hub.models.TextClassifierPreprocessor.from_preset(
        tiny_preset, sequence_length=64)
    examples = glue.read_local_split(glue_data[0], "mrpc", "train")
    return glue.tokenize(examples, glue.TASKS["mrpc"],
                         lambda features, label: (preprocessor(x=features), label))


def collect(batches):
    idx, lengths, widths = [], [], []
    for inputs, label, batch_idx in batches.as_numpy_iterator():
        idx += batch_idx.tolist()
        lengths += inputs["padding_mask"].sum(axis=1).tolist()
        widths.append(inputs["token_ids"].shape[1])
    return idx, lengths, widths


def test_batching_by_length_keeps_every_example_once(mrpc_tokenized):
    idx, lengths, widths = collect(glue.batch_by_length(mrpc_tokenized, batch_size=4))
    assert sorted(idx) == list(range(16))
    plain_idx, plain_lengths, plain_widths = collect(mrpc_tokenized.batch(4))
    assert sorted(zip(idx, lengths)) == sorted(zip(plain_idx, plain_lengths))  # no token lost
    assert all(width % 8 == 0 for width in widths) and max(widths) < 64 == plain_widths[0]


def test_each_batch_is_trimmed_to_the_multiple_of_8_above_its_longest_example(mrpc_tokenized):
    for inputs, _, _ in glue.batch_by_length(mrpc_tokenized, batch_size=3).as_numpy_iterator():
        width = inputs["token_ids"].shape[1]
        longest = inputs["padding_mask"].sum(axis=1).max()
        assert width - 8 < longest <= width
        assert {inputs[name].shape[1] for name in inputs} == {width}


def test_inputs_without_a_padding_mask_are_batched_as_they_are():
    plain = tf.data.Dataset.from_tensor_slices(({"x": np.ones((5, 8))}, np.zeros(5),
                                                np.arange(5)))
    assert [batch[0]["x"].shape for batch in glue.batch_by_length(plain, 2)] == [
        (2, 8), (2, 8), (1, 8)]


def test_same_predictions_as_fixed_padding(mrpc_tokenized, tiny_preset):
    keras.utils.set_random_seed(0)
    backbone = keras_hub.models.Backbone.from_preset(tiny_preset)
    for pooling in ("pooled", "cls", "mean"):
        model = glue.GlueClassifier(glue.sentence_encoder(backbone, pooling), num_classes=2)
        by_length = {}
        for inputs, _, idx in glue.batch_by_length(mrpc_tokenized, 4):
            by_length.update(zip(idx.numpy().tolist(), model(inputs).numpy()))
        for inputs, _, idx in mrpc_tokenized.batch(4):
            for row, logits in zip(idx.numpy().tolist(), model(inputs).numpy()):
                np.testing.assert_allclose(by_length[row], logits, rtol=1e-4, atol=1e-5)


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
