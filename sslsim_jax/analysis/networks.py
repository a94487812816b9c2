"""The networks of an analysis: which models, which of their layers, in which column order.

A network is one layer of one model, named ``model:layer``; the joint statistics hold the
networks side by side in the order of `network_names`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from sslsim_jax import audio
from sslsim_jax.analysis.settings import FINAL, AnalysisError, Settings
from sslsim_jax.intermediates import SpeechModel, load_model
from sslsim_jax.models import ModelConfig


@dataclasses.dataclass
class ModelEntry:
    """A model in the analysis: its name, the loaded model and the layers kept."""

    name: str
    model: SpeechModel
    normalize: bool
    layers: list[str]
    source: str
    config_hash: str
    weights_digest: str

    def hidden(self, out, label: str) -> jax.Array:
        """[B, T, D] hidden state of layer ``label`` from the model's intermediates."""
        return out.final_hidden_state if label == FINAL else out.hidden_states[int(label)]


def model_name(source: str) -> str:
    """A short display name: the directory's or hub id's last component."""
    return os.path.basename(os.path.normpath(os.fspath(source))) or os.fspath(source)


def _config_hash(model: SpeechModel) -> str:
    data = json.dumps(dataclasses.asdict(model.config), sort_keys=True).encode()
    return hashlib.sha256(data).hexdigest()[:16]


def weights_digest(params) -> str:
    """A digest of every parameter's bytes, shape and dtype (in tree order): two models with
    the same digest compute the same function, so statistics keyed on it are never stale.
    SHA-256: CPUs hash it in hardware, twice as fast as BLAKE2b on the 2-core test VM (0.25 s
    against 0.53 s for a base model's 380 MB)."""
    digest = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        array = np.asarray(leaf)
        digest.update(f"{jax.tree_util.keystr(path)}:{array.dtype}:{array.shape};".encode())
        digest.update(np.ascontiguousarray(array).view(np.uint8).data)
    return digest.hexdigest()[:32]


def layers_for(config: ModelConfig, name: str, layers: Sequence[int | str] | None) -> list[str]:
    """The layer labels kept of a model (``settings.layers``); errors name ``layers``."""
    top = config.num_hidden_layers
    final = [FINAL] if config.do_stable_layer_norm else []
    if layers is None:
        return [str(i) for i in range(top + 1)] + final
    out = []
    for layer in layers:
        if str(layer) == FINAL:
            if not final:
                raise AnalysisError(
                    f"'final' is only defined for pre-LN models; {name} is post-LN "
                    f"(its layer {top} is already the encoder output)",
                    argument="layers",
                )
            out.append(FINAL)
            continue
        index = int(layer)
        if not 0 <= index <= top:
            raise AnalysisError(
                f"layer {index} is out of range for model {name} (layers 0..{top})",
                argument="layers",
            )
        out.append(str(index))
    return out


def prepare_models(
    models: Sequence[str | tuple[str, SpeechModel]], settings: Settings
) -> list[ModelEntry]:
    """Loads the models (paths, hub ids, or ``(name, SpeechModel)`` pairs)."""
    if not models:
        raise AnalysisError("expected at least one MODEL")
    entries: list[ModelEntry] = []
    names: set[str] = set()
    for item in models:
        if isinstance(item, tuple):
            name, model = item
            source, normalize = model.path or name, True
        else:
            source = os.fspath(item)
            model = load_model(source, dtype=jnp.dtype(settings.dtype))
            name = model_name(source)
            normalize = audio.feature_extractor_settings(model.path)["do_normalize"]
        base, k = name, 2
        while name in names:
            name, k = f"{base}-{k}", k + 1
        names.add(name)
        entries.append(
            ModelEntry(
                name=name,
                model=model,
                normalize=bool(normalize),
                layers=layers_for(model.config, name, settings.layers),
                source=source,
                config_hash=_config_hash(model),
                weights_digest=weights_digest(model.params),
            )
        )
    strides = {e.name: e.model.config.frame_stride for e in entries}
    if len(set(strides.values())) > 1:
        raise AnalysisError(
            "models have different frame rates, so frames do not align: "
            + ", ".join(f"{n} ({s} samples/frame)" for n, s in strides.items())
        )
    return entries


def finetune_pairs(entries: Sequence[ModelEntry]) -> list[tuple[str, str]]:
    """(pre-trained, fine-tuned) pairs: same architecture, one with a CTC head, one without."""

    def arch(e: ModelEntry):
        c = e.model.config
        return (c.model_type, c.hidden_size, c.num_hidden_layers, c.do_stable_layer_norm)

    pairs = []
    for pre in entries:
        for ft in entries:
            if not pre.model.config.ctc_head and ft.model.config.ctc_head and arch(pre) == arch(ft):
                pairs.append((pre.name, ft.name))
    return pairs


def network_sizes(entries: Sequence[ModelEntry]) -> tuple[int, ...]:
    """The width of each network (model layer) in the joint statistics, in column order."""
    return tuple(e.model.config.hidden_size for e in entries for _ in e.layers)


def network_names(entries: Sequence[ModelEntry]) -> list[str]:
    """``"model:layer"`` of each network, in column order."""
    return [f"{e.name}:{label}" for e in entries for label in e.layers]
