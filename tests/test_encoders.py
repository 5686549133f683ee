"""Any KerasHub text encoder through the default custom blocks, and the pooling choices."""

import json
import warnings

import keras
import keras_hub
import numpy as np
import pytest
import tensorflow as tf

import glue
from conftest import VOCAB

TINY = ("--epochs=1", "--batch_size=4", "--max_sequence_length=32")
SIZE = dict(num_layers=1, num_heads=2, hidden_dim=8, intermediate_dim=16, max_sequence_length=64)


def roberta_vocabulary():
    """A tiny byte-level BPE vocabulary: special tokens, characters, and whole fixture words."""
    vocabulary = {token: i for i, token in enumerate(["<s>", "<pad>", "</s>", "<unk>", "<mask>"])}
    for token in list("abcdefghijklmnopqrstuvwxyz.?,'\"") + ["Ġ", "Ġt", "th"]:
        vocabulary.setdefault(token, len(vocabulary))
    return vocabulary


def save_preset(directory, backbone, preprocessor):
    backbone.save_to_preset(directory)
    preprocessor.save_to_preset(directory)
    return directory


@pytest.fixture(scope="module")
def family_presets(tmp_path_factory, tiny_preset):
    """Tiny random presets of three families, each with its own tokenizer and pair packing."""
    roberta_tokenizer = keras_hub.models.RobertaTokenizer(
        vocabulary=roberta_vocabulary(), merges=["Ġ t", "t h"])
    roberta = save_preset(
        str(tmp_path_factory.mktemp("roberta")),
        keras_hub.models.RobertaBackbone(vocabulary_size=roberta_tokenizer.vocabulary_size(),
                                         **SIZE),
        keras_hub.models.RobertaTextClassifierPreprocessor(roberta_tokenizer, sequence_length=32))
    distil_tokenizer = keras_hub.models.DistilBertTokenizer(vocabulary=VOCAB, lowercase=True)
    distilbert = save_preset(
        str(tmp_path_factory.mktemp("distilbert")),
        keras_hub.models.DistilBertBackbone(vocabulary_size=len(VOCAB), **SIZE),
        keras_hub.models.DistilBertTextClassifierPreprocessor(distil_tokenizer,
                                                              sequence_length=32))
    return {"bert": tiny_preset, "roberta": roberta, "distilbert": distilbert}


@pytest.mark.parametrize("family", ["bert", "roberta", "distilbert"])
@pytest.mark.slow
def test_each_family_finetunes_end_to_end_through_the_default_blocks(
        family, family_presets, glue_data, tmp_path, run_glue):
    data_dir, counts = glue_data
    run_glue("--task_name=mrpc", f"--preset={family_presets[family]}", f"--data_dir={data_dir}",
             f"--submission_directory={tmp_path}", *TINY)
    rows = (tmp_path / "MRPC.tsv").read_text().splitlines()
    assert rows[0] == "index\tprediction" and len(rows) == counts["mrpc"]["test"] + 1
    entry = json.loads((tmp_path / "glue_results.json").read_text())["mrpc"]
    assert set(entry["validation"]) == {"f1", "accuracy"}


@pytest.mark.parametrize("pooling", ["pooled", "cls", "mean"])
def test_pooling_flag_end_to_end(pooling, tiny_preset, glue_data, tmp_path, run_glue, recwarn):
    model_path = tmp_path / "model.keras"
    run_glue("--task_name=stsb", f"--pooling={pooling}", f"--preset={tiny_preset}",
             f"--data_dir={glue_data[0]}", f"--finetuning_model_save_path={model_path}", *TINY)
    model = keras.models.load_model(model_path, compile=False)
    assert model.get_layer(f"{pooling}_encoder") is not None
    # cls and mean leave BERT's pooler without a gradient: expected, so glue.py keeps it quiet.
    assert not [warning for warning in recwarn if "Gradients do not exist" in str(warning.message)]


def test_only_the_unused_pooler_s_missing_gradients_are_quiet():
    def warned(names):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("default")
            glue.quiet_expected_warnings()
            warnings.warn(f"Gradients do not exist for variables {names} when minimizing the "
                          "loss. If using `model.compile()`, did you forget to provide a `loss` "
                          "argument?", UserWarning)
        return len(caught)
    assert warned(['pooled_dense/kernel', 'pooled_dense/bias']) == 0
    assert warned(['pooled_dense/kernel', 'head/kernel']) == 1  # a real mistake still shows


def encode(preset, pairs):
    preprocessor = keras_hub.models.TextClassifierPreprocessor.from_preset(
        preset, sequence_length=16)
    return preprocessor(x=tuple(tf.constant(texts) for texts in zip(*pairs)))


def test_pooling_vectors_are_what_they_claim(family_presets):
    backbone = keras_hub.models.Backbone.from_preset(family_presets["bert"])
    inputs = encode(family_presets["bert"], [("the cat sat", "a dog"), ("good", "the mat")])
    outputs = backbone(inputs)
    sequence = outputs["sequence_output"].numpy()
    mask = inputs["padding_mask"].numpy().astype("float32")[..., None]
    expected = {
        "pooled": outputs["pooled_output"].numpy(),
        "cls": sequence[:, 0, :],
        "mean": (sequence * mask).sum(axis=1) / mask.sum(axis=1),  # padding left out
    }
    for pooling, vectors in expected.items():
        encoder = glue.sentence_encoder(backbone, pooling)
        np.testing.assert_allclose(encoder(inputs), vectors, rtol=1e-5, atol=1e-6)
    assert not np.allclose(expected["mean"], sequence.mean(axis=1))  # the mask mattered


def test_default_pooling_follows_the_backbone(family_presets):
    bert = keras_hub.models.Backbone.from_preset(family_presets["bert"])
    roberta = keras_hub.models.Backbone.from_preset(family_presets["roberta"])
    assert glue.sentence_encoder(bert).name == "pooled_encoder"
    assert glue.sentence_encoder(roberta).name == "cls_encoder"
    with pytest.raises(glue.GlueError, match="RobertaBackbone has no pooled output"):
        glue.sentence_encoder(roberta, "pooled")


def test_pairs_are_packed_the_family_way(family_presets):
    pair = [("the cat", "a dog")]
    bert = encode(family_presets["bert"], pair)
    roberta = encode(family_presets["roberta"], pair)
    assert "segment_ids" in bert and bert["segment_ids"].numpy().max() == 1
    assert "segment_ids" not in roberta
    ids = roberta["token_ids"].numpy()[0].tolist()
    start, end = 0, 2  # <s> and </s> in the tiny vocabulary
    assert ids[0] == start and ids.count(end) == 3  # <s> a </s></s> b </s>


def test_an_image_preset_is_refused_clearly(tmp_path, glue_data, run_glue):
    image_backbone = keras_hub.models.ResNetBackbone(
        input_conv_filters=[64], input_conv_kernel_sizes=[3], stackwise_num_filters=[64],
        stackwise_num_blocks=[1], stackwise_num_strides=[1], block_type="basic_block",
        image_shape=(32, 32, 3))
    image_backbone.save_to_preset(str(tmp_path))
    with pytest.raises(SystemExit) as exit_info:
        run_glue(f"--preset={tmp_path}", f"--data_dir={glue_data[0]}")
    assert exit_info.value.code == (
        f"glue.py: error: preset '{tmp_path}' holds a ResNetBackbone, not a text encoder; "
        "GLUE needs one (BERT, RoBERTa, DistilBERT, DeBERTaV3, ...)")
