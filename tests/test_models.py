"""Parity of the Flax models with transformers' PyTorch models, and exact padded batches."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sslsim_jax
import sslsim_jax.intermediates as intermediates_module
from tests import hf_models
from tests.hf_models import GROUP_POST_LN, LAYER_PRE_LN, TINY

torch = pytest.importorskip("torch")

# Tolerances of the models issue: hidden states 1e-4 + 1e-4·max|h|, attention 1e-5,
# logits 1e-4 + 1e-4·max|logits|.
ATTN_ATOL = 1e-5


@pytest.fixture(autouse=True)
def exact_float32():
    """Parity is defined for exact float32 matmuls; GPUs default to TF32 and TPUs to bfloat16
    passes, so every test here sets the precision rather than inherit the backend's."""
    with jax.default_matmul_precision("float32"):
        yield


def assert_hidden_close(actual, expected, what="hidden states"):
    expected = np.asarray(expected)
    atol = 1e-4 + 1e-4 * np.abs(expected).max()
    np.testing.assert_allclose(np.asarray(actual), expected, atol=atol, rtol=0, err_msg=what)


CASES = {
    "wav2vec2-group-postln": ("wav2vec2", False, {**TINY, **GROUP_POST_LN}),
    "wav2vec2-layer-preln": ("wav2vec2", False, {**TINY, **LAYER_PRE_LN}),
    "wav2vec2-group-postln-ctc": ("wav2vec2", True, {**TINY, **GROUP_POST_LN, "vocab_size": 11}),
    "wav2vec2-layer-preln-ctc": ("wav2vec2", True, {**TINY, **LAYER_PRE_LN, "vocab_size": 7}),
    "hubert-group-postln": ("hubert", False, {**TINY, **GROUP_POST_LN}),
    "hubert-layer-preln-ctc": ("hubert", True, {**TINY, **LAYER_PRE_LN, "vocab_size": 9}),
    # Unusual sizes: two conv layers, odd positional kernel, relu, no projection LayerNorm.
    "hubert-odd-sizes": (
        "hubert",
        False,
        {
            **TINY,
            **GROUP_POST_LN,
            "conv_dim": (20, 12),
            "conv_kernel": (8, 4),
            "conv_stride": (4, 3),
            "num_conv_pos_embeddings": 5,
            "num_conv_pos_embedding_groups": 2,
            "hidden_size": 30,
            "num_attention_heads": 5,
            "hidden_act": "relu",
            "feat_proj_layer_norm": False,
            "num_hidden_layers": 3,
        },
    ),
    "wav2vec2-group-preln-tanh-gelu": (
        "wav2vec2",
        False,
        {**TINY, **GROUP_POST_LN, "do_stable_layer_norm": True, "hidden_act": "gelu_new"},
    ),
}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Each case's checkpoint directory and torch model, built once per module."""
    cache = {}

    def get(name):
        if name not in cache:
            model_type, ctc, cfg = CASES[name]
            path = tmp_path_factory.mktemp(name)
            cache[name] = (path, hf_models.build(path, model_type, ctc=ctc, **cfg))
        return cache[name]

    return get


@pytest.mark.parametrize("name", list(CASES))
def test_parity_with_transformers(built, name):
    path, torch_model = built(name)
    x = hf_models.waveform(3210, seed=1)
    ref = hf_models.torch_outputs(torch_model, x)
    model = sslsim_jax.load_model(path)
    with jax.default_matmul_precision("float32"):
        out = model.intermediates(x, attentions=True)
    cfg = model.config
    frames = cfg.num_frames(3210)
    assert out.hidden_states.shape == (cfg.num_hidden_layers + 1, 1, frames, cfg.hidden_size)
    for i in range(cfg.num_hidden_layers + 1):
        assert_hidden_close(out.hidden_states[i], ref["hidden_states"][i], f"hidden state {i}")
    assert out.attentions.dtype == jnp.float32
    np.testing.assert_allclose(out.attentions, ref["attentions"], atol=ATTN_ATOL, rtol=0)
    # Attention that is far from uniform, or the comparison above proves little.
    assert float(out.attentions.max()) > 0.5
    if ref["logits"] is not None:
        assert_hidden_close(out.logits, ref["logits"], "logits")
    else:
        assert out.logits is None
    if ref["last_hidden_state"] is not None:
        assert_hidden_close(out.final_hidden_state, ref["last_hidden_state"], "last hidden state")


def test_pre_ln_last_index_is_before_final_layer_norm(built):
    """hidden_states[L] is transformers 5.x's (pre final LayerNorm); final_hidden_state is 4.x's."""
    path, torch_model = built("wav2vec2-layer-preln")
    x = hf_models.waveform(2000)
    out = sslsim_jax.load_model(path).intermediates(x)
    h_last = np.asarray(out.hidden_states[-1])
    final = np.asarray(out.final_hidden_state)
    assert np.abs(h_last - final).max() > 0.1
    # final LayerNorm output: zero mean over features before the affine map.
    params = torch_model.encoder.layer_norm
    w, b = params.weight.detach().numpy(), params.bias.detach().numpy()
    mu, sd = h_last.mean(-1, keepdims=True), h_last.std(-1, keepdims=True)
    np.testing.assert_allclose(final, (h_last - mu) / np.sqrt(sd**2 + 1e-5) * w + b, atol=1e-4)


@pytest.mark.parametrize(
    "name", ["wav2vec2-group-postln", "wav2vec2-layer-preln-ctc", "hubert-odd-sizes"]
)
def test_padded_batch_equals_each_utterance_alone(built, name):
    path, _ = built(name)
    model = sslsim_jax.load_model(path)
    lengths = np.array([4000, 1234, 2777, 4000])
    x = hf_models.waveform(4000, batch=4, seed=3)
    # Garbage (not zeros) in the padding: it must not matter.
    for i, n in enumerate(lengths):
        x[i, n:] = 50.0
    with jax.default_matmul_precision("float32"):
        batch = model.intermediates(x, lengths, attentions=True)
        for i, n in enumerate(lengths):
            alone = model.intermediates(x[i : i + 1, :n], attentions=True)
            t = model.config.num_frames(n)
            assert int(batch.frame_lengths[i]) == t
            assert np.asarray(batch.frame_mask[i]).sum() == t
            assert_hidden_close(batch.hidden_states[:, i, :t], alone.hidden_states[:, 0])
            np.testing.assert_allclose(
                batch.attentions[:, i, :, :t, :t], alone.attentions[:, 0], atol=ATTN_ATOL
            )
            # Padded keys get exactly zero probability.
            assert not np.asarray(batch.attentions[:, i, :, :, t:]).any()
            if alone.logits is not None:
                assert_hidden_close(batch.logits[i, :t], alone.logits[0], "logits")


def test_group_norm_batching_differs_in_transformers_but_not_here(built):
    """Why we normalise over valid samples: transformers' own padded batch is not exact."""
    path, torch_model = built("wav2vec2-group-postln")
    x = hf_models.waveform(4000, batch=2, seed=4)
    x[1, 1500:] = 0.0
    mask = np.ones_like(x, dtype=np.int64)
    mask[1, 1500:] = 0
    with torch.no_grad():
        hf_batch = torch_model(
            torch.from_numpy(x), attention_mask=torch.from_numpy(mask)
        ).last_hidden_state.numpy()
        hf_alone = torch_model(torch.from_numpy(x[1:, :1500])).last_hidden_state.numpy()
    t = hf_alone.shape[1]
    assert np.abs(hf_batch[1, :t] - hf_alone[0]).max() > 1e-3
    ours = sslsim_jax.load_model(path).intermediates(x, np.array([4000, 1500]))
    assert_hidden_close(ours.final_hidden_state[1, :t], hf_alone[0])


def test_frame_counts_follow_transformers(built):
    path, torch_model = built("hubert-odd-sizes")
    model = sslsim_jax.load_model(path)
    for n in [model.config.receptive_field, 999, 1000, 1001, 4321]:
        expected = int(torch_model._get_feat_extract_output_lengths(torch.tensor(n)))
        assert model.config.num_frames(n) == expected
        assert model.intermediates(np.zeros((1, n), np.float32)).hidden_states.shape[2] == expected


def test_no_recompile_for_same_padded_shape(built, monkeypatch):
    path, _ = built("wav2vec2-group-postln")
    model = sslsim_jax.load_model(path)
    # The jitted forward calls the module's `forward` each time it traces: at most 2 traces.
    traced = chex.assert_max_traces(intermediates_module.forward, n=2)
    monkeypatch.setattr(intermediates_module, "forward", traced)
    intermediates_module._forward.clear_cache()  # shared by every model: other tests filled it
    model.intermediates(hf_models.waveform(2000, 2, seed=0), np.array([2000, 1500]))
    model.intermediates(hf_models.waveform(2000, 2, seed=1), np.array([1200, 2000]))  # same shape
    model.intermediates(hf_models.waveform(2000, 2, seed=1), attentions=True)  # a new program
    with pytest.raises(AssertionError, match="traced > 2 times"):
        model.intermediates(hf_models.waveform(3000, 2, seed=1))


def test_models_of_one_layout_share_the_compiled_encoder(built):
    """wav2vec2 with a CTC head and HuBERT without one, same layout, other weights: with
    ``logits=False`` the second runs the first's compiled encoder (the analysis's path), and
    its hidden states are those of its own full forward."""
    from sslsim_jax.compile_log import compile_log

    a = sslsim_jax.load_model(built("wav2vec2-group-postln-ctc")[0])
    b = sslsim_jax.load_model(built("hubert-group-postln")[0])  # built with a's seed: new weights
    b = sslsim_jax.SpeechModel(b.config, jax.tree.map(lambda p: 0.9 * p, b.params))
    other = sslsim_jax.load_model(built("hubert-odd-sizes")[0])
    assert a.config != b.config and a.config.encoder() == b.config.encoder()
    x, lens = hf_models.waveform(2345, 2, seed=3), np.array([2345, 1700])
    first = a.intermediates(x, lens, logits=False)
    assert first.logits is None
    with compile_log() as compiled:
        out = b.intermediates(x, lens, logits=False)
    assert compiled["compilations"] == 0
    with compile_log() as compiled:  # another layout compiles its own
        other.intermediates(x, lens, logits=False)
    assert compiled["compilations"] >= 1
    for model, encoder in ((a, first), (b, out)):
        full = model.intermediates(x, lens)
        np.testing.assert_array_equal(np.asarray(encoder.hidden_states), full.hidden_states)
        np.testing.assert_array_equal(np.asarray(encoder.frame_mask), full.frame_mask)
        np.testing.assert_array_equal(
            np.asarray(encoder.final_hidden_state), full.final_hidden_state
        )
    assert full.logits is None and a.intermediates(x, lens).logits.shape[-1] == 11
    # The same frames, other weights: not one program's output reused.
    assert not np.allclose(first.hidden_states[-1], out.hidden_states[-1])


def test_sow_exposes_intermediates_to_direct_module_users(built):
    path, _ = built("hubert-layer-preln-ctc")
    model = sslsim_jax.load_model(path)
    x = jnp.asarray(hf_models.waveform(2500))
    _, state = model.module.apply(
        {"params": model.params}, x, output_attentions=True, mutable=["intermediates"]
    )
    sown = state["intermediates"]["encoder"]
    (hidden,), (attentions,) = sown["hidden_states"], sown["attentions"]
    cfg = model.config
    assert hidden.shape[0] == cfg.num_hidden_layers + 1
    assert attentions.shape[:3] == (cfg.num_hidden_layers, 1, cfg.num_attention_heads)
    out = model.intermediates(x, attentions=True)
    assert_hidden_close(hidden, out.hidden_states)
    np.testing.assert_allclose(attentions, out.attentions, atol=ATTN_ATOL)
    # capture_intermediates works too (every submodule's output).
    _, captured = model.module.apply(
        {"params": model.params}, x, capture_intermediates=True, mutable=["intermediates"]
    )
    captured = captured["intermediates"]["encoder"]
    assert "pos_conv_embed" in captured
    # Inside the scanned blocks, captures are stacked over the L blocks.
    (ff_out,) = captured["layers"]["feed_forward"]["__call__"]
    assert ff_out.shape[:2] == (model.config.num_hidden_layers, 1)


def test_bfloat16_compute_keeps_softmax_and_norms_in_float32(built):
    path, _ = built("wav2vec2-layer-preln")
    x = hf_models.waveform(3000)
    ref = sslsim_jax.load_model(path).intermediates(x, attentions=True)
    bf = sslsim_jax.load_model(path, dtype=jnp.bfloat16).intermediates(x, attentions=True)
    assert bf.hidden_states.dtype == jnp.bfloat16
    assert bf.attentions.dtype == jnp.float32
    assert bool(jnp.isfinite(bf.hidden_states.astype(jnp.float32)).all())
    np.testing.assert_allclose(np.asarray(bf.attentions.sum(-1)), 1.0, atol=1e-5)
    h, h_ref = np.asarray(bf.hidden_states, np.float32), np.asarray(ref.hidden_states)
    assert np.abs(h - h_ref).max() < 0.1 * np.abs(h_ref).max()
    bf_params = sslsim_jax.load_model(path, param_dtype=jnp.bfloat16)
    assert jax.tree.leaves(bf_params.params)[0].dtype == jnp.bfloat16


def test_input_errors(built):
    path, _ = built("wav2vec2-group-postln")
    model = sslsim_jax.load_model(path)
    with pytest.raises(ValueError, match=r"expected waveforms of shape \[B, S\], got \(100,\)"):
        model.intermediates(np.zeros(100, np.float32))
    with pytest.raises(ValueError, match=r"lengths\[1\] = 3000 exceeds"):
        model.intermediates(np.zeros((2, 2000), np.float32), np.array([2000, 3000]))
    with pytest.raises(ValueError, match="utterance 0 has 30 samples, fewer than the model's"):
        model.intermediates(np.zeros((2, 2000), np.float32), np.array([30, 2000]))
    with pytest.raises(ValueError, match="expected lengths of shape"):
        model.intermediates(np.zeros((2, 2000), np.float32), np.array([2000]))


FULL_SIZE = {
    # wav2vec2-base / hubert-base layout and sizes (transformers' defaults).
    "base": ("wav2vec2", dict(GROUP_POST_LN)),
    # hubert-large / wav2vec2-large-lv60 layout and sizes.
    "large": (
        "hubert",
        dict(
            **LAYER_PRE_LN,
            hidden_size=1024,
            num_hidden_layers=24,
            num_attention_heads=16,
            intermediate_size=4096,
        ),
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("size", list(FULL_SIZE))
def test_full_size_parity(tmp_path, size):
    model_type, cfg = FULL_SIZE[size]
    # Plain 1/fan_in weights: with peakier random attention, float32 summation-order noise over
    # 768-1024 features moves probabilities by ~1.3e-5, above the 1e-5 tolerance.
    torch_model = hf_models.build(tmp_path, model_type, qk_gain=1.0, **cfg)
    x = hf_models.waveform(8000, seed=5)  # 0.5 s
    ref = hf_models.torch_outputs(torch_model, x)
    del torch_model
    with jax.default_matmul_precision("float32"):
        out = sslsim_jax.load_model(tmp_path).intermediates(x, attentions=True)
    for i in range(out.hidden_states.shape[0]):
        assert_hidden_close(out.hidden_states[i], ref["hidden_states"][i], f"hidden state {i}")
    np.testing.assert_allclose(out.attentions, ref["attentions"], atol=ATTN_ATOL, rtol=0)
    assert float(out.attentions.max()) > 0.2


@pytest.mark.parametrize("frames", [1, 7, 8, 33])
def test_blocked_attention_equals_one_block(frames):
    from sslsim_jax.models.modules import attention_probs, blocked_attention

    rng = np.random.default_rng(frames)
    q, k, v = (jnp.asarray(rng.standard_normal((2, frames, 3, 5)), jnp.float32) for _ in "qkv")
    # The second utterance has padded frames at the end (at least one valid key).
    mask = jnp.arange(frames)[None, :] < jnp.array([[frames], [max(frames // 2, 1)]])
    probs = attention_probs(q, k, mask)
    expected = jnp.einsum("bhts,bshd->bthd", probs, v)
    actual = jax.jit(lambda q, k, v, m: blocked_attention(q, k, v, m, block=8))(q, k, v, mask)
    assert actual.shape == (2, frames, 3, 5)
    np.testing.assert_allclose(actual, expected, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("name", ["wav2vec2-group-postln", "wav2vec2-layer-preln"])
def test_blocked_model_equals_plain_model_and_transformers(built, name):
    """Blocks of 8 queries (T = 49 and 129 frames, neither a multiple of 8; padded frames in the
    batch) give the hidden states of the plain path and of PyTorch."""
    path, torch_model = built(name)
    plain = sslsim_jax.load_model(path)
    blocked = sslsim_jax.intermediates.SpeechModel(plain.config, plain.params, attention_block=8)
    for samples in (1000, 2600):
        x = hf_models.waveform(samples, 2, seed=samples)
        lengths = np.array([samples, samples * 2 // 3])
        a, b = blocked.intermediates(x, lengths), plain.intermediates(x, lengths)
        assert a.attentions is None
        mask = np.asarray(a.frame_mask)
        assert mask.shape[1] > 8 and not mask.all()
        hb, hp = np.asarray(a.hidden_states)[:, mask], np.asarray(b.hidden_states)[:, mask]
        np.testing.assert_allclose(hb, hp, atol=1e-5 * np.abs(hp).max(), rtol=0)
        with torch.no_grad():
            ref = torch_model(torch.from_numpy(x[:1]), output_hidden_states=True)
        theirs = np.stack([h[0].numpy() for h in ref.hidden_states])  # [L+1, T, D]
        assert_hidden_close(np.asarray(a.hidden_states)[:, 0], theirs)


def test_exact_gelu_and_heads_first_values_match_float64():
    """The erf-form GELU and the heads-first attention product against float64 NumPy."""
    import math

    from sslsim_jax.models.modules import exact_gelu, weighted_values

    x = np.linspace(-12.0, 12.0, 4001)
    expected = x * 0.5 * (1 + np.vectorize(math.erf)(x / math.sqrt(2)))
    actual = np.asarray(jax.jit(exact_gelu)(jnp.asarray(x, jnp.float32)), np.float64)
    scaled_error = np.abs(actual - expected) / np.maximum(np.abs(x), 1)
    assert scaled_error.max() < 3e-7, scaled_error.max()
    assert actual[0] == 0 and actual[-1] == np.float32(12.0)  # tails: 0 and the identity

    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(7), size=(2, 3, 5))  # [B, H, Q, T], rows sum to 1
    v = rng.standard_normal((2, 7, 3, 4))  # [B, T, H, D/H]
    actual = weighted_values(jnp.asarray(probs, jnp.float32), jnp.asarray(v, jnp.float32))
    assert actual.shape == (2, 5, 3, 4)
    np.testing.assert_allclose(actual, np.einsum("bhqt,bthd->bqhd", probs, v), atol=1e-6)
