"""Checkpoint conversion, converted (orbax) round trips, hub ids and loading errors."""

from __future__ import annotations

import json
import os
import shutil

import flax
import jax
import numpy as np
import pytest
from sslsim_jax.convert.hf import (
    DROPPED_PREFIXES,
    CheckpointError,
    convert_state_dict,
    read_state_dict,
)

import sslsim_jax
from sslsim_jax.checkpoints import convert_directory, param_shapes
from sslsim_jax.models import ModelConfig
from tests import hf_models
from tests.hf_models import GROUP_POST_LN, LAYER_PRE_LN, TINY

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def ctc_dir(tmp_path_factory):
    """A CTC checkpoint saved by transformers (``wav2vec2.`` prefix, parametrized weight norm)."""
    path = tmp_path_factory.mktemp("ctc")
    hf_models.build(path, "wav2vec2", ctc=True, vocab_size=13, **TINY, **LAYER_PRE_LN)
    return path


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("base")
    hf_models.build(path, "hubert", **TINY, **GROUP_POST_LN)
    return path


def outputs(model_or_path, x):
    model = model_or_path
    if not isinstance(model, sslsim_jax.SpeechModel):
        model = sslsim_jax.load_model(model_or_path)
    return model.intermediates(x, attentions=True)


def assert_same_outputs(a, b):
    np.testing.assert_array_equal(a.hidden_states, b.hidden_states)
    np.testing.assert_array_equal(a.attentions, b.attentions)
    if a.logits is not None or b.logits is not None:
        np.testing.assert_array_equal(a.logits, b.logits)


def copy_config(src, dst):
    os.makedirs(dst, exist_ok=True)
    shutil.copyfile(os.path.join(src, "config.json"), os.path.join(dst, "config.json"))


def test_saved_names_are_prefixed_and_parametrized(ctc_dir):
    keys = set(read_state_dict(ctc_dir))
    assert "wav2vec2.encoder.pos_conv_embed.conv.parametrizations.weight.original0" in keys
    assert "lm_head.weight" in keys


def test_orbax_round_trip_is_bit_identical(ctc_dir, tmp_path):
    x = hf_models.waveform(2400, batch=2)
    dst = convert_directory(ctc_dir, tmp_path / "converted")
    assert sorted(os.listdir(dst)) == ["config.json", "params", "sslsim_jax.json"]
    hf, converted = sslsim_jax.load_model(ctc_dir), sslsim_jax.load_model(dst)
    assert converted.config == hf.config
    jax.tree.map(np.testing.assert_array_equal, hf.params, converted.params)
    assert_same_outputs(outputs(hf, x), outputs(converted, x))


def test_convert_command_line(base_dir, tmp_path, capsys):
    from sslsim_jax.cli import main

    dst = tmp_path / "cli"
    assert main(["convert", str(base_dir), str(dst)]) == 0
    assert (dst / "sslsim_jax.json").is_file()
    capsys.readouterr()
    assert main(["convert", str(base_dir), str(dst)]) == 1
    err = capsys.readouterr().err
    assert "already holds converted params" in err
    assert "Traceback" not in err and err.count("\n") == 1


def test_legacy_bin_with_weight_g_v_and_no_prefix(ctc_dir, tmp_path):
    """An old-style pytorch_model.bin: weight_g/weight_v names, no model prefix."""
    state = {}
    for key, value in read_state_dict(ctc_dir).items():
        key = key.removeprefix("wav2vec2.")
        key = key.replace("parametrizations.weight.original0", "weight_g")
        key = key.replace("parametrizations.weight.original1", "weight_v")
        state[key] = torch.from_numpy(np.array(value))
    copy_config(ctc_dir, tmp_path)
    torch.save(state, tmp_path / "pytorch_model.bin")
    x = hf_models.waveform(2400)
    assert_same_outputs(outputs(ctc_dir, x), outputs(tmp_path, x))


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_sharded_checkpoints_with_index(ctc_dir, tmp_path, fmt):
    from safetensors.numpy import save_file

    state = read_state_dict(ctc_dir)
    keys = sorted(state)
    shards = {f"model-0000{i + 1}-of-00003.{fmt}": keys[i::3] for i in range(3)}
    weight_map = {}
    for name, names in shards.items():
        part = {k: state[k] for k in names}
        if fmt == "safetensors":
            save_file(part, str(tmp_path / name))
        else:
            torch.save({k: torch.from_numpy(np.array(v)) for k, v in part.items()}, tmp_path / name)
        weight_map.update(dict.fromkeys(names, name))
    index = {"safetensors": "model.safetensors", "bin": "pytorch_model.bin"}[fmt] + ".index.json"
    (tmp_path / index).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    copy_config(ctc_dir, tmp_path)
    x = hf_models.waveform(2400)
    assert_same_outputs(outputs(ctc_dir, x), outputs(tmp_path, x))


def test_missing_shard_is_named(ctc_dir, tmp_path):
    copy_config(ctc_dir, tmp_path)
    weight_map = {"lm_head.weight": "model-00001-of-00002.safetensors"}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(FileNotFoundError, match="model-00001-of-00002.safetensors: shard listed"):
        sslsim_jax.load_model(tmp_path)


def test_pretraining_keys_are_dropped(tmp_path):
    """Wav2Vec2ForPreTraining checkpoints carry quantizer/project_q/project_hid: dropped."""
    from transformers import Wav2Vec2ForPreTraining

    config = hf_models.make_config("wav2vec2", **TINY, **GROUP_POST_LN, mask_time_prob=0.05)
    pre = Wav2Vec2ForPreTraining(config).eval()
    hf_models.randomise(pre)
    pre.save_pretrained(tmp_path)
    names = set(read_state_dict(tmp_path))
    dropped = {n for n in names if n.removeprefix("wav2vec2.").startswith(DROPPED_PREFIXES)}
    assert {"wav2vec2.masked_spec_embed", "project_q.weight", "project_hid.weight"} <= dropped
    assert any(n.startswith("quantizer.") for n in dropped)
    x = hf_models.waveform(2400)
    with torch.no_grad():
        ref = pre.wav2vec2(torch.from_numpy(x)).last_hidden_state.numpy()
    out = sslsim_jax.load_model(tmp_path).intermediates(x)
    np.testing.assert_allclose(out.final_hidden_state, ref, atol=1e-4 + 1e-4 * np.abs(ref).max())


@pytest.fixture(scope="module")
def state_and_config(ctc_dir):
    state = read_state_dict(ctc_dir)
    config = ModelConfig.from_json_file(ctc_dir / "config.json")
    return state, config, param_shapes(config)


def test_convert_state_dict_is_pure_and_complete(state_and_config):
    state, config, shapes = state_and_config
    params = convert_state_dict(state, config, expected_shapes=shapes)
    flat = flax.traverse_util.flatten_dict(params)
    assert set(flat) == set(shapes)
    assert all(flat[k].shape == shapes[k] for k in shapes)
    # Linear weights are transposed, conv weights reversed: [out, in, k] -> [k, in, out].
    np.testing.assert_array_equal(
        flat["encoder", "layers", "attention", "q_proj", "kernel"][0],
        state["wav2vec2.encoder.layers.0.attention.q_proj.weight"].T,
    )
    np.testing.assert_array_equal(
        flat["feature_extractor", "conv_layers_1_conv", "kernel"],
        state["wav2vec2.feature_extractor.conv_layers.1.conv.weight"].transpose(2, 1, 0),
    )


def test_weight_norm_is_folded_like_torch(state_and_config):
    state, config, shapes = state_and_config
    stem = "wav2vec2.encoder.pos_conv_embed.conv.parametrizations.weight"
    g, v = (torch.from_numpy(np.array(state[f"{stem}.original{i}"])) for i in (0, 1))
    expected = torch._weight_norm(v, g, 2).numpy()
    kernel = convert_state_dict(state, config, expected_shapes=shapes)["encoder"]["pos_conv_embed"]
    np.testing.assert_allclose(kernel["conv"]["kernel"], expected.transpose(2, 1, 0), rtol=1e-6)


def test_missing_key_is_named(state_and_config):
    state, config, shapes = state_and_config
    broken = {k: v for k, v in state.items() if k != "wav2vec2.encoder.layers.1.layer_norm.bias"}
    with pytest.raises(CheckpointError, match=r"missing key\(s\): encoder.layers.1.layer_norm.b"):
        convert_state_dict(broken, config, expected_shapes=shapes)


def test_missing_weight_norm_half_is_named(state_and_config):
    state, config, shapes = state_and_config
    key = "wav2vec2.encoder.pos_conv_embed.conv.parametrizations.weight.original1"
    broken = {k: v for k, v in state.items() if k != key}
    with pytest.raises(CheckpointError, match="missing key.*encoder.pos_conv_embed.conv.weight_v"):
        convert_state_dict(broken, config, expected_shapes=shapes)


def test_unexpected_key_is_named(state_and_config):
    state, config, shapes = state_and_config
    extra = {**state, "wav2vec2.encoder.layers.7.attention.q_proj.weight": np.zeros((36, 36))}
    with pytest.raises(CheckpointError, match="unexpected key.*encoder.layers.7.attention.q_proj"):
        convert_state_dict(extra, config, expected_shapes=shapes)


def test_shape_mismatch_names_key_and_both_shapes(state_and_config):
    state, config, shapes = state_and_config
    key = "wav2vec2.encoder.layers.0.feed_forward.intermediate_dense.weight"
    bad = {**state, key: np.zeros((41, 36), np.float32)}
    with pytest.raises(
        CheckpointError,
        match=r"intermediate_dense.weight: checkpoint shape \(41, 36\) does not match shape "
        r"\(40, 36\) expected from config",
    ):
        convert_state_dict(bad, config, expected_shapes=shapes)


def test_config_mismatch_through_load_model_names_directory(ctc_dir, tmp_path):
    copy_config(ctc_dir, tmp_path)
    shutil.copyfile(ctc_dir / "model.safetensors", tmp_path / "model.safetensors")
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["intermediate_size"] = 48
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=rf"{tmp_path}: .*checkpoint shape \(40, 36\)"):
        sslsim_jax.load_model(tmp_path)


def test_ctc_head_inferred_from_weights_when_config_lacks_architectures(ctc_dir, tmp_path):
    copy_config(ctc_dir, tmp_path)
    shutil.copyfile(ctc_dir / "model.safetensors", tmp_path / "model.safetensors")
    cfg = json.loads((tmp_path / "config.json").read_text())
    del cfg["architectures"]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    model = sslsim_jax.load_model(tmp_path)
    assert model.config.ctc_head and model.config.vocab_size == 13
    converted = convert_directory(tmp_path, tmp_path / "converted")
    assert sslsim_jax.load_model(converted).config.ctc_head


def test_directory_errors(tmp_path, ctc_dir):
    with pytest.raises(FileNotFoundError, match="no such model directory"):
        sslsim_jax.load_model(tmp_path / "nope")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json; expected a transformers"):
        sslsim_jax.load_model(empty)
    only_config = tmp_path / "only_config"
    copy_config(ctc_dir, only_config)
    with pytest.raises(FileNotFoundError, match="has config.json but no weights"):
        sslsim_jax.load_model(only_config)
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    with pytest.raises(NotADirectoryError, match="expected a model directory"):
        sslsim_jax.load_model(a_file)


def test_hub_id_resolves_through_the_huggingface_cache(ctc_dir, tmp_path):
    """A stand-in for the hub: the cache layout huggingface_hub reads offline."""
    repo = tmp_path / "models--sslsim--tiny-ctc"
    snapshot = repo / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    for name in ("config.json", "model.safetensors"):
        shutil.copyfile(ctc_dir / name, snapshot / name)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    model = sslsim_jax.load_model("sslsim/tiny-ctc", cache_dir=tmp_path, local_files_only=True)
    x = hf_models.waveform(2400)
    assert_same_outputs(outputs(ctc_dir, x), outputs(model, x))
    with pytest.raises(FileNotFoundError, match="sslsim/not-there: not a local directory"):
        sslsim_jax.load_model("sslsim/not-there", cache_dir=tmp_path, local_files_only=True)
