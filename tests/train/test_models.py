"""`train.models`: every way a model is built (train.run, train.ntk, the benchmarks) refuses a config that
HF Flax would run wrong, in one line, before any weights are read."""

import pytest
import transformers as tf

from train import models
from train.errors import ModelError

YARN = dict(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=1,
    num_attention_heads=4,
    rope_scaling={"rope_type": "yarn", "factor": 4.0},
)


def test_random_models_of_a_config_dir_are_checked(tmp_path):
    """The benchmarks' path: `preset_config` of a config dir, then `random_model_fast`."""
    tf.LlamaConfig(**YARN).save_pretrained(tmp_path)
    with pytest.raises(ModelError, match="rope_scaling=") as err:
        models.random_model_fast(models.preset_config(str(tmp_path)), "causal-lm")
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("head", ["base", "masked-lm", "sequence-classification"])  # train.ntk's and GLUE's heads
def test_pretrained_loading_checks_the_config_before_the_weights(tmp_path, head):
    tf.BertConfig(position_embedding_type="relative_key").save_pretrained(tmp_path)  # no weights in the dir
    with pytest.raises(ModelError, match="position_embedding_type='relative_key'"):
        models.load_pretrained(str(tmp_path), head)
