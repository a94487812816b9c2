"""The training loop: a pure jitted step and a thin driver (batches, checkpoints, progress).

``make_step(objective, optimizer)`` returns ``step(state, batch) -> (state, metrics)``, jitted,
compiled once per batch shape. ``fit`` feeds it from arrays (seeded minibatches, a function of
the step number) or from an iterable of batches, saves orbax checkpoints every
``checkpoint_every`` steps and resumes from the latest one: a resumed run reproduces the
uninterrupted run's parameters, because the data order and every random draw are functions of
the seed and the step number only.
"""

from __future__ import annotations

import functools
import itertools
import os
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from sslsim_jax.train.objectives import Objective


@flax.struct.dataclass
class TrainState:
    """Everything a resumed run needs: step, params, optimiser state and the base PRNG key
    (raw uint32 key data, so orbax can save it)."""

    step: jax.Array
    params: Any
    opt_state: Any
    key: jax.Array


def make_optimizer(
    *,
    learning_rate: float,
    steps: int,
    warmup_steps: int = 0,
    end_fraction: float = 0.05,
    weight_decay: float = 0.01,
    clip_norm: float = 1.0,
) -> optax.GradientTransformation:
    """AdamW with global-norm clipping; learning rate warms up linearly over ``warmup_steps``
    and decays on a cosine to ``end_fraction`` of its peak at ``steps``."""
    if steps < 1 or not 0 <= warmup_steps < steps:
        raise ValueError(f"expected 0 <= warmup_steps < steps, got {warmup_steps} and {steps}")
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, learning_rate, warmup_steps, steps, learning_rate * end_fraction
    )
    # Flattened: one update of a single vector compiles several times faster on CPU than one
    # per param leaf, and computes the same thing.
    return optax.flatten(
        optax.chain(
            optax.clip_by_global_norm(clip_norm), optax.adamw(schedule, weight_decay=weight_decay)
        )
    )


def with_frozen(
    objective: Objective, optimizer: optax.GradientTransformation
) -> optax.GradientTransformation:
    """``optimizer`` on every param except ``params["encoder"][name]`` for the names in
    ``objective.frozen``, which get zero updates (no weight decay either)."""
    if not objective.frozen:
        return optimizer

    def labels(params):
        def label(path, _):
            keys = [getattr(p, "key", None) for p in path]
            return "frozen" if keys[0] == "encoder" and keys[1] in objective.frozen else "train"

        return jax.tree_util.tree_map_with_path(label, params)

    return optax.multi_transform({"train": optimizer, "frozen": optax.set_to_zero()}, labels)


def init_state(
    objective: Objective, optimizer: optax.GradientTransformation, *, seed: int, params=None
) -> TrainState:
    """The initial state: params from ``objective.init`` unless given, optimiser state of
    `with_frozen` ``optimizer``."""
    key = jax.random.key(seed)
    init_key, base = jax.random.split(key)
    params = objective.init(init_key) if params is None else params
    params = jax.tree.map(jnp.asarray, params)
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=with_frozen(objective, optimizer).init(params),
        key=jax.random.key_data(base),
    )


@functools.lru_cache(maxsize=8)
def make_step(
    objective: Objective,
    optimizer: optax.GradientTransformation,
    compiler_options: tuple[tuple[str, Any], ...] = (),
) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
    """The jitted training step ``(state, batch) -> (state, metrics)``; the step's PRNG key is
    ``fold_in(state.key, state.step)``. The input state's buffers are donated. Cached: the same
    (objective, optimizer, compiler_options) gets the same compiled step (a resumed run
    compiles nothing new). ``compiler_options``: XLA options as (name, value) pairs, e.g.
    ``(("xla_backend_optimization_level", 0),)`` halves CPU compile time for short runs.
    """
    optimizer = with_frozen(objective, optimizer)

    def step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        key = jax.random.fold_in(jax.random.wrap_key_data(state.key), state.step)
        grads, metrics = jax.grad(objective.loss, has_aux=True)(
            state.params, batch, key, state.step
        )
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {**metrics, "grad_norm": optax.tree.norm(grads)}
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

    return jax.jit(step, donate_argnums=0, compiler_options=dict(compiler_options) or None)


def array_batches(arrays: Mapping[str, np.ndarray], *, batch_size: int, seed: int):
    """Batches drawn from ``arrays`` (same leading size N): batch i is a seeded random subset
    of ``batch_size`` rows, a function of (seed, i) only. Returns ``batch(i) -> dict``."""
    arrays = {k: np.asarray(v) for k, v in arrays.items()}
    sizes = {k: v.shape[0] for k, v in arrays.items()}
    if len(set(sizes.values())) != 1:
        raise ValueError(f"expected arrays with the same leading size, got {sizes}")
    rows = next(iter(sizes.values()))
    if not 0 < batch_size <= rows:
        raise ValueError(f"expected 0 < batch_size <= {rows} rows, got {batch_size}")

    def batch(i: int) -> dict:
        pick = np.random.default_rng([seed, i]).choice(rows, batch_size, replace=False)
        return {k: v[np.sort(pick)] for k, v in arrays.items()}

    return batch


def _checkpoint_manager(directory: str | os.PathLike, keep: int):
    import orbax.checkpoint as ocp

    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
    return ocp.CheckpointManager(os.path.abspath(directory), options=options)


def fit(
    objective: Objective,
    data: Mapping[str, np.ndarray] | Iterable[dict],
    *,
    optimizer: optax.GradientTransformation,
    steps: int,
    seed: int = 0,
    batch_size: int | None = None,
    params: Any = None,
    checkpoint_dir: str | os.PathLike | None = None,
    checkpoint_every: int = 100,
    keep_checkpoints: int = 2,
    progress: bool = True,
    on_step: Callable[[int, dict, TrainState], None] | None = None,
    compiler_options: Mapping[str, Any] | None = None,
) -> tuple[TrainState, list[dict]]:
    """Trains ``objective`` for ``steps`` steps and returns the final state and the metrics of
    every step run (floats).

    Args:
        objective: from `sslsim_jax.train.objectives`.
        data: a dict of arrays (batches drawn by `array_batches` with ``batch_size``) or an
            iterable of batch dicts (on resume, the batches of finished steps are skipped).
        optimizer: e.g. `make_optimizer`.
        steps: total steps (a resumed run stops at the same step).
        seed: seeds the params, every random draw and the data order.
        params: initial params (default: ``objective.init``).
        checkpoint_dir: where to save and resume orbax checkpoints (None: no checkpoints).
        checkpoint_every: steps between checkpoints (the last step is always saved).
        on_step: called after each step with (step number, metrics, state) — e.g. to save
            intermediate models.
        compiler_options: XLA compiler options of the step (see `make_step`).
    """
    from tqdm.auto import tqdm

    state = init_state(objective, optimizer, seed=seed, params=params)
    manager = None
    if checkpoint_dir is not None:
        import orbax.checkpoint as ocp

        manager = _checkpoint_manager(checkpoint_dir, keep_checkpoints)
        latest = manager.latest_step()
        if latest is not None:
            state = manager.restore(latest, args=ocp.args.StandardRestore(state))
            # orbax returns arrays committed to a device; the step was compiled for
            # uncommitted ones and would compile again for these: hand it host copies.
            state = jax.tree.map(lambda x: jnp.asarray(np.asarray(x)), state)
    start = int(state.step)
    if isinstance(data, Mapping):
        if batch_size is None:
            raise ValueError("batch_size is required when data is a dict of arrays")
        draw = array_batches(data, batch_size=batch_size, seed=seed)
        batches = (draw(i) for i in itertools.count(start))
    else:
        batches = itertools.islice(iter(data), start, None)
    step = make_step(objective, optimizer, tuple(sorted((compiler_options or {}).items())))
    history: list[dict] = []
    bar = tqdm(total=steps, initial=start, disable=not progress, desc="train")
    for i in range(start, steps):
        try:
            batch = next(batches)
        except StopIteration:
            raise ValueError(f"data ran out after {i} batches; expected {steps}") from None
        state, metrics = step(state, {k: jnp.asarray(v) for k, v in batch.items()})
        metrics = {k: float(v) for k, v in metrics.items()}
        history.append(metrics)
        bar.update(1)
        bar.set_postfix({k: f"{v:.3g}" for k, v in metrics.items() if k != "grad_norm"})
        if on_step is not None:
            on_step(i + 1, metrics, state)
        if manager is not None and ((i + 1) % checkpoint_every == 0 or i + 1 == steps):
            import orbax.checkpoint as ocp

            manager.save(i + 1, args=ocp.args.StandardSave(state))
    bar.close()
    if manager is not None:
        manager.wait_until_finished()
        manager.close()
    return state, history
