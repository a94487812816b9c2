"""ModelConfig: built from transformers config dicts, validated, errors that name the field."""

from __future__ import annotations

import dataclasses
import json

import pytest

from sslsim_jax.models import ConfigError, ModelConfig

transformers = pytest.importorskip("transformers")


def hf(model_type="wav2vec2", **kw) -> dict:
    cls = {"wav2vec2": transformers.Wav2Vec2Config, "hubert": transformers.HubertConfig}
    return cls[model_type](**kw).to_dict()


def test_base_defaults():
    cfg = ModelConfig.from_hf_config(hf())
    assert cfg.feat_extract_norm == "group" and not cfg.do_stable_layer_norm
    assert cfg.conv_dim == (512,) * 7 and cfg.conv_kernel == (10, 3, 3, 3, 3, 2, 2)
    assert cfg.receptive_field == 400 and cfg.frame_stride == 320
    assert (cfg.num_conv_pos_embeddings, cfg.num_conv_pos_embedding_groups) == (128, 16)
    assert cfg.layer_norm_eps == 1e-5 and not cfg.ctc_head


def test_layout_comes_from_fields_not_size():
    # wav2vec2-large-960h: large sizes, but group norm and post-LN.
    cfg = ModelConfig.from_hf_config(
        hf(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096)
    )
    assert cfg.feat_extract_norm == "group" and not cfg.do_stable_layer_norm
    # hubert-large-ls960-ft: layer norm, pre-LN, conv bias, CTC head.
    cfg = ModelConfig.from_hf_config(
        {
            **hf("hubert", feat_extract_norm="layer", do_stable_layer_norm=True, conv_bias=True),
            "architectures": ["HubertForCTC"],
        }
    )
    assert cfg.feat_extract_norm == "layer" and cfg.do_stable_layer_norm and cfg.conv_bias
    assert cfg.ctc_head and cfg.vocab_size == 32


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("hidden_act", "mish", r"'hidden_act' = 'mish': unsupported activation"),
        ("feat_extract_activation", "elu", r"'feat_extract_activation' = 'elu'"),
        ("feat_extract_norm", "batch", r"'feat_extract_norm' = 'batch': expected one of"),
        ("model_type", "whisper", r"'model_type' = 'whisper': expected one of"),
        ("num_attention_heads", 7, r"'num_attention_heads' = 7: must divide hidden_size = 768"),
        ("add_adapter", True, r"'add_adapter' = True: not supported"),
        ("conv_pos_batch_norm", True, r"'conv_pos_batch_norm' = True: not supported"),
        ("conv_kernel", [10, 3], r"conv_dim/conv_kernel/conv_stride"),
        ("layer_norm_eps", 0.0, r"'layer_norm_eps' = 0.0: must be positive"),
    ],
)
def test_unsupported_values_name_field_and_value(field, value, message):
    with pytest.raises(ConfigError, match=message):
        ModelConfig.from_hf_config({**hf(), field: value})


def test_missing_field_is_named():
    config = hf()
    del config["hidden_size"]
    with pytest.raises(ConfigError, match="missing required field.*hidden_size"):
        ModelConfig.from_hf_config(config)


def test_json_file_errors_name_the_file(tmp_path):
    path = tmp_path / "config.json"
    path.write_text("{not json")
    with pytest.raises(ConfigError, match=rf"{path}: not valid JSON"):
        ModelConfig.from_json_file(path)
    path.write_text(json.dumps({**hf(), "hidden_act": "mish"}))
    with pytest.raises(ConfigError, match=rf"{path}: config field 'hidden_act'"):
        ModelConfig.from_json_file(path)
    with pytest.raises(FileNotFoundError, match="no such file"):
        ModelConfig.from_json_file(tmp_path / "missing.json")


def test_frozen_and_frame_counts():
    cfg = ModelConfig.from_hf_config(hf())
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.hidden_size = 3
    # transformers: floor((L - k) / s) + 1 per conv; 1 s at 16 kHz -> 49 frames.
    assert cfg.num_frames(16000) == 49
    assert cfg.num_frames(399) == 0 and cfg.num_frames(400) == 1
