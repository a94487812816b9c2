"""Export of converted checkpoints to transformers directories (sslsim_jax.convert.export):
the exported directory loads in PyTorch with no missing or unexpected keys and its forward
pass matches ours within the parity tolerances of tests/test_models.py."""

from __future__ import annotations

import functools
import json

import jax
import numpy as np
import pytest

from sslsim_jax.checkpoints import save_converted
from sslsim_jax.intermediates import SpeechModel
from sslsim_jax.models import ModelConfig
from sslsim_jax.train.objectives import init_encoder
from tests import hf_models
from tests.conftest import random_params
from tests.hf_models import GROUP_POST_LN, LAYER_PRE_LN, TINY

torch = pytest.importorskip("torch")


@pytest.mark.parametrize(
    ("model_type", "layout", "ctc"),
    [("wav2vec2", GROUP_POST_LN, True), ("hubert", LAYER_PRE_LN, False)],
)
def test_exported_directory_matches_in_pytorch(tmp_path, model_type, layout, ctc):
    from transformers import AutoConfig, HubertForCTC, HubertModel, Wav2Vec2ForCTC, Wav2Vec2Model

    config_dict = hf_models.make_config(model_type, **TINY, **layout).to_dict()
    if ctc:
        config_dict.update(architectures=["Wav2Vec2ForCTC"], vocab_size=11)
    (tmp_path / "config.json").write_text(json.dumps(config_dict))
    config = ModelConfig.from_hf_config(config_dict)
    # Random values of every param (norms and biases too, so a wrong or missing name changes
    # the output), drawn with NumPy: flax's eager init would compile every op.
    params = random_params(
        jax.eval_shape(functools.partial(init_encoder, config), jax.random.key(0))
    )
    src = save_converted(tmp_path / "config.json", params, tmp_path / "converted", ctc_head=ctc)
    if ctc:
        (tmp_path / "converted" / "vocab.json").write_text(json.dumps({"<pad>": 0, "a": 1}))

    from sslsim_jax.cli import main

    assert main(["convert", "--to-transformers", str(src), str(tmp_path / "hf")]) == 0
    assert (
        AutoConfig.from_pretrained(tmp_path / "hf")
        .architectures[0]
        .endswith("ForCTC" if ctc else "Model")
    )
    cls = {
        ("wav2vec2", True): Wav2Vec2ForCTC,
        ("wav2vec2", False): Wav2Vec2Model,
        ("hubert", True): HubertForCTC,
        ("hubert", False): HubertModel,
    }[model_type, ctc]
    model, info = cls.from_pretrained(
        tmp_path / "hf", output_loading_info=True, attn_implementation="eager"
    )
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    if ctc:
        assert (tmp_path / "hf" / "vocab.json").is_file()
    x = hf_models.waveform(3200, batch=2)
    ref = hf_models.torch_outputs(model.eval(), x)
    ours = SpeechModel(config, params).intermediates(x)
    for i, expected in enumerate(ref["hidden_states"]):
        atol = 1e-4 + 1e-4 * np.abs(expected).max()  # tests/test_models.py's tolerance
        np.testing.assert_allclose(ours.hidden_states[i], expected, atol=atol, rtol=0)
    if ctc:
        np.testing.assert_allclose(ours.logits, ref["logits"], atol=1e-4, rtol=0)


def test_export_error_names_the_missing_source(tmp_path):
    from sslsim_jax.convert.export import export_directory

    with pytest.raises(FileNotFoundError, match="missing: no such model directory"):
        export_directory(tmp_path / "missing", tmp_path / "out")
