"""Training objectives and loop (sslsim_jax.train) on a tiny model and a fixed batch.

Budget: all of it in well under a minute on 2 CPU cores (a 2-layer, 32-wide model; 0.6 s of
random audio; a handful of steps per objective).
"""

from __future__ import annotations

import dataclasses

import chex
import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sslsim_jax.models import ModelConfig
from sslsim_jax.models.modules import SpeechEncoder
from sslsim_jax.train import (
    build_vocab,
    character_error_rate,
    contrastive,
    ctc,
    encode,
    fit,
    fit_mfcc_clusters,
    kmeans,
    make_optimizer,
    make_step,
    masked_prediction,
    mfcc_targets,
    span_mask,
)
from sslsim_jax.train.text import greedy_decode
from tests.conftest import random_params

TINY = dict(
    model_type="hubert",
    conv_dim=(32, 32, 32),
    conv_kernel=(10, 8, 4),
    conv_stride=(5, 8, 8),
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=64,
    num_conv_pos_embeddings=8,
    num_conv_pos_embedding_groups=2,
    feat_extract_norm="layer",
    do_stable_layer_norm=True,
    conv_bias=True,
)


@pytest.fixture(scope="module")
def tiny():
    """Config, a fixed batch (4 clips of up to 0.6 s; one padded) with MFCC cluster ids, one
    masked-prediction objective shared by the tests (one compiled step) and its initial params."""
    config = ModelConfig.from_hf_config(TINY)
    rng = np.random.default_rng(0)
    t = np.arange(9600) / 16000
    tone = np.sin(2 * np.pi * rng.uniform(100, 400, (4, 1)) * t) * (t > 0.3)
    audio = (tone + 0.3 * rng.standard_normal((4, 9600))).astype(np.float32)
    lengths = np.array([9600, 9600, 8000, 9600], np.int32)
    clusters = fit_mfcc_clusters(jax.random.key(0), config, audio, lengths, num_clusters=8)
    targets = mfcc_targets(config, jnp.asarray(audio), clusters)
    batch = {"audio": audio, "lengths": lengths, "targets": np.asarray(targets)}
    objective = masked_prediction(config, num_clusters=8, projection_dim=16, mask_prob=0.2, span=2)
    # The loss is traced once for the step's one compilation, however many runs use it.
    objective = dataclasses.replace(objective, loss=chex.assert_max_traces(objective.loss, n=1))
    return config, batch, objective, _init(objective)


OPTIMIZER = make_optimizer(learning_rate=3e-3, steps=8, warmup_steps=1)
# Unoptimised XLA code compiles in half the time; these runs are a few steps long.
FAST = dict(progress=False, compiler_options={"xla_backend_optimization_level": 0})


def _init(objective):
    """Initial params of ``objective`` with the tree and shapes of ``objective.init`` (traced,
    not run), drawn with NumPy (no compilation; NumPy, so no run donates them)."""
    return random_params(jax.eval_shape(objective.init, jax.random.key(0)))


def _losses(objective, batch, steps, params=None):
    _, history = fit(
        objective, [batch] * steps, optimizer=OPTIMIZER, steps=steps, params=params, **FAST
    )
    return [h["loss"] for h in history]


def test_span_mask_spans_and_padding():
    lengths = jnp.array([100, 40])
    mask = np.asarray(span_mask(jax.random.key(1), lengths, 100, mask_prob=0.05, span=5))
    assert not mask[1, 40:].any()
    assert mask[0].sum() >= 5 and mask[1].sum() >= 5
    # Every masked run is at least one whole span long.
    runs = np.diff(np.concatenate([[0], mask[0].astype(int), [0]]))
    assert np.all(np.flatnonzero(runs == -1) - np.flatnonzero(runs == 1) >= 5)


def test_kmeans_finds_separated_clusters():
    rng = np.random.default_rng(0)
    centres = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    x = (centres[rng.integers(0, 3, 300)] + 0.1 * rng.standard_normal((300, 2))).astype(np.float32)
    found = np.asarray(kmeans(jax.random.key(0), jnp.asarray(x), num_clusters=3))
    found = found[np.lexsort(found.T[::-1])]
    np.testing.assert_allclose(found, centres[np.lexsort(centres.T[::-1])], atol=0.1)


def test_text_vocab_decode_and_cer():
    vocab = build_vocab()
    assert list(vocab)[:5] == ["<pad>", "<s>", "</s>", "<unk>", "|"] and vocab["<pad>"] == 0
    ids = encode("Hi  there", vocab)
    assert ids[2] == vocab["|"]
    # A CTC path with blanks and repeats: "h h <blank> i | t".
    path = [vocab["h"], vocab["h"], 0, vocab["i"], vocab["|"], vocab["t"]]
    assert greedy_decode(path, vocab) == "hi t"
    assert character_error_rate(["abcd"], ["abxd"]) == pytest.approx(0.25)
    with pytest.raises(ValueError, match="as many hypotheses"):
        character_error_rate(["a"], [])


def test_masked_prediction_learns_and_compiles_once(tiny):
    config, batch, objective, params = tiny
    losses = _losses(objective, batch, 5, params)
    assert losses[-1] < losses[0]
    # The encoder subtree is exactly SpeechEncoder's params (shapes only: no second init).
    expected = jax.eval_shape(SpeechEncoder(config).init, jax.random.key(0), jnp.zeros((1, 400)))
    chex.assert_trees_all_equal_shapes(params["encoder"], expected["params"])


def test_contrastive_learns(tiny):
    config, batch, _, _ = tiny
    objective = contrastive(
        config,
        groups=2,
        entries=8,
        codevector_dim=16,
        projection_dim=16,
        distractors=5,
        mask_prob=0.2,
        span=2,
    )
    losses = _losses(objective, batch, 5, _init(objective))
    assert losses[-1] < losses[0]


def test_ctc_learns_with_frozen_feature_encoder(tiny):
    config, batch, _, _ = tiny
    vocab = build_vocab()
    ctc_config = ModelConfig.from_hf_config(
        {**TINY, "architectures": ["HubertForCTC"], "vocab_size": len(vocab)}
    )
    texts = ["ab", "ba", "a b", "bb"]
    labels = [encode(t, vocab) for t in texts]
    batch = {
        "audio": batch["audio"],
        "lengths": batch["lengths"],
        "labels": np.array([ids + [0] * (3 - len(ids)) for ids in labels], np.int32),
        "label_lengths": np.array([len(ids) for ids in labels], np.int32),
    }
    objective = ctc(ctc_config)
    start = _init(objective)
    state, history = fit(objective, [batch] * 5, optimizer=OPTIMIZER, steps=5, params=start, **FAST)
    assert history[-1]["loss"] < history[0]["loss"]
    chex.assert_trees_all_equal(
        state.params["encoder"]["feature_extractor"], start["encoder"]["feature_extractor"]
    )


def test_resume_reproduces_uninterrupted_run(tiny, tmp_path):
    _, batch, objective, params = tiny
    data = {k: np.concatenate([v[:2], v[:2]]) for k, v in batch.items()}  # 4 rows: batches of 4
    run = dict(optimizer=OPTIMIZER, batch_size=4, seed=3, params=params, **FAST)
    whole, _ = fit(objective, data, steps=4, **run)
    fit(objective, data, steps=2, checkpoint_dir=tmp_path, checkpoint_every=2, **run)
    resumed, history = fit(objective, data, steps=4, checkpoint_dir=tmp_path, **run)
    assert len(history) == 2  # only steps 3 and 4 ran
    # The restored state ran the step compiled for the first run (orbax's arrays are committed
    # to a device: passed as they are, they would compile the step again, without a retrace).
    options = tuple(sorted(FAST["compiler_options"].items()))
    assert make_step(objective, OPTIMIZER, options)._cache_size() == 1
    chex.assert_trees_all_close(resumed.params, whole.params, atol=1e-6, rtol=0)
    flat = flax.traverse_util.flatten_dict(resumed.params)
    assert all(np.isfinite(np.asarray(v)).all() for v in flat.values())


def test_contrastive_distractors_are_other_masked_frames():
    from sslsim_jax.train.objectives import masked_distractors

    mask = np.zeros((2, 30), bool)
    mask[0, [3, 4, 5, 20, 21]] = True
    mask[1, 10:20] = True
    other = np.asarray(masked_distractors(jax.random.key(0), jnp.asarray(mask), 50))
    for b in range(2):
        for t in np.flatnonzero(mask[b]):
            assert mask[b, other[b, t]].all() and (other[b, t] != t).all()
        # Every other masked frame gets drawn.
        t = np.flatnonzero(mask[b])[0]
        assert set(other[b, t]) == set(np.flatnonzero(mask[b])) - {t}
