"""What an analysis computes: `Settings`, the one declaration of every option.

Each field carries its help text in its metadata; the command line's flags are generated from
these fields (`sslsim_jax.cli`), so an option is declared once. Errors raised here name the
library argument (``max_seconds``); the CLI rewrites that to the flag (``--max-seconds``).
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Any

from sslsim_jax.metrics import registry

# Values of ``jax.default_matmul_precision`` offered by ``precision``, most exact first.
PRECISIONS = ("highest", "float32", "high", "tensorfloat32", "bfloat16", "default")
DTYPES = ("float32", "bfloat16")
POOLS = ("networks", "models")
# The statistics' metrics, and RBF CKA on a stated subsample of frames (``rbf_frames``).
ANALYSIS_METRICS = registry.LAYER_METRICS + registry.names("frames")
FINAL = "final"


class AnalysisError(ValueError):
    """Bad input to the analysis (arguments, models or audio); the message names it.

    Attributes:
        argument: the `Settings` field (or `analyze` argument) at fault, or None; the CLI
            shows it as its flag.
        detail: the message without the argument's name.
    """

    def __init__(self, message: str, *, argument: str | None = None):
        self.argument = argument
        self.detail = message
        super().__init__(f"{argument}: {message}" if argument else message)


def option(default: Any, help: str, **cli: Any) -> Any:
    """A `Settings` field with its help text (and argparse extras: metavar, choices, flag)."""
    return dataclasses.field(default=default, metadata={"help": help, **cli})


@dataclasses.dataclass(frozen=True)
class Settings:
    """What to compute. Defaults are the paper's measures over all layers.

    Every field's help text is in its metadata (``dataclasses.fields(Settings)``); ``sslsim
    analyze --help`` shows them all.
    """

    metrics: tuple[str, ...] = option(
        registry.DEFAULT_METRICS,
        f"layer metrics among {', '.join(ANALYSIS_METRICS)}",
        metavar="METRIC",
    )
    layers: tuple[int | str, ...] | None = option(
        None,
        "layer indices to keep for every model (0 = transformer input; 'final' = final "
        "LayerNorm of pre-LN models); default: all, with 'final' for pre-LN models",
        metavar="LAYER",
    )
    attention: bool = option(
        False, "also compare attention heads (Frobenius, Pearson, Jensen-Shannon)"
    )
    attention_methods: tuple[str, ...] = option(
        registry.ATTENTION_METHODS,
        "attention comparisons with --attention: head pairs by "
        f"{', '.join(registry.HEAD_METHODS)}; layers by {', '.join(registry.MAP_METHODS)} of "
        "the maps (heads as neurons, (query, key) cells as samples)",
        metavar="METHOD",
    )
    max_utterances: int | None = option(
        None, "use at most N utterances (in list order)", metavar="N"
    )
    max_seconds: float | None = option(None, "crop each utterance to S seconds", metavar="S")
    batch_seconds: float = option(40.0, "padded audio per batch, in seconds", metavar="S")
    bootstrap: int = option(
        0,
        "confidence intervals from B Poisson-bootstrap replicates over utterances (0: none); "
        "each replicate keeps its own statistics (rbf_cka gets no interval)",
        metavar="B",
    )
    seed: int = option(0, "seed of the bootstrap draws", metavar="SEED")
    checkpoint_seconds: float = option(
        120.0, "minimum seconds between checkpoints of the statistics (0: every batch)", metavar="S"
    )
    devices: int | None = option(
        None,
        "split batches over the first N local devices (default: all); results do not depend on N",
        metavar="N",
    )
    precision: str = option(
        "highest",
        "matmul precision of models and metrics: 'highest' is exact float32 on every device; "
        "'tensorfloat32' (GPU) or 'bfloat16' (TPU) is faster and less exact",
        choices=PRECISIONS,
    )
    dtype: str = option(
        "float32",
        "the models' compute dtype; statistics are float32 either way",
        choices=DTYPES,
    )
    rbf_frames: int = option(
        4096,
        "rbf_cka: frames drawn (seeded, uniformly over the run's frames) and kept for its N×N "
        "kernels; memory N·ΣD floats, time N²·ΣD",
        metavar="N",
    )
    svcca_variance: float = option(
        0.99,
        "SVCCA and PWCCA keep the leading principal directions that explain less than this "
        "fraction of each network's variance (Raghu et al.'s rule)",
        metavar="F",
    )
    neuron_pool: str = option(
        "networks",
        "which networks a network's neurons are ranked against (neuron_rankings.csv) and "
        "averaged over (localization.csv): every other network of the run (Wu et al.), or only "
        "other models' networks",
        choices=POOLS,
    )
    max_memory: str | None = option(
        None,
        "memory budget per device for the joint statistics, e.g. 16G or 500M; when all "
        "networks' statistics exceed it, the analysis runs in passes over pairs of network "
        "groups (the tables are the same); default: what the device holds",
        metavar="SIZE",
    )
    stat_shards: int = option(
        1,
        "split the joint statistics over S devices (a divisor of --devices), for more networks "
        "than one device's memory holds (1: a copy per device)",
        metavar="S",
    )

    def __post_init__(self):
        def fail(field: str, message: str):
            raise AnalysisError(message, argument=field)

        try:
            metrics = registry.check_names(
                self.metrics, allowed=ANALYSIS_METRICS, argument="metrics"
            )
            methods = registry.check_names(
                self.attention_methods,
                allowed=registry.ATTENTION_METHODS,
                argument="attention_methods",
            )
        except ValueError as e:
            field, _, message = str(e).partition(": ")
            fail(field, message)
        # Repeats are dropped (``--metrics svcca svcca`` computes SVCCA once).
        object.__setattr__(self, "metrics", metrics)
        object.__setattr__(self, "attention_methods", methods)
        if self.layers is not None:
            layers = tuple(dict.fromkeys(_layer(x) for x in self.layers))
            if not layers:
                fail("layers", "expected at least one layer")
            object.__setattr__(self, "layers", layers)
        for field, low, optional in (
            ("max_utterances", 1, True),
            ("max_seconds", 0, True),
            ("batch_seconds", 0, False),
            ("checkpoint_seconds", -1, False),
            ("devices", 1, True),
            ("bootstrap", -1, False),
            ("seed", -1, False),
            ("stat_shards", 1, False),
            ("rbf_frames", 1, False),
        ):
            value = getattr(self, field)
            if value is None and optional:
                continue
            if isinstance(value, bool) or not isinstance(value, int | float):
                fail(field, f"expected a number, got {value!r}")
            if not math.isfinite(value):
                fail(field, f"expected a finite number, got {value}")
            if low == -1 and value < 0:
                fail(field, f"expected >= 0, got {value}")
            if low == 0 and value <= 0:
                fail(field, f"expected > 0, got {value}")
            if low == 1 and value < 1:
                fail(field, f"expected >= 1, got {value}")
        if self.precision not in PRECISIONS:
            fail("precision", f"expected one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if not (isinstance(self.svcca_variance, int | float) and 0 < self.svcca_variance <= 1):
            fail("svcca_variance", f"expected 0 < F <= 1, got {self.svcca_variance!r}")
        if self.neuron_pool not in POOLS:
            fail("neuron_pool", f"expected one of {', '.join(POOLS)}, got {self.neuron_pool!r}")
        if self.max_memory is not None:
            from sslsim_jax.analysis.plan import parse_size

            parse_size(self.max_memory)
        if self.dtype not in DTYPES:
            fail("dtype", f"expected one of {', '.join(DTYPES)}, got {self.dtype!r}")

    def extraction_key(self) -> dict[str, Any]:
        """The settings that change the statistics (what a resumed run must share): not the
        metrics computed from them, except that rbf_cka keeps a frame subsample."""
        ignored = (
            "metrics",
            "checkpoint_seconds",
            "devices",
            "svcca_variance",
            "neuron_pool",
            "max_memory",
        )
        key = {k: v for k, v in dataclasses.asdict(self).items() if k not in ignored}
        key["rbf_frames"] = self.rbf_frames if "rbf_cka" in self.metrics else None
        return key


def _layer(value: int | str) -> int | str:
    if isinstance(value, str) and value == FINAL:
        return FINAL
    try:
        index = int(value)
    except (TypeError, ValueError):
        raise AnalysisError(
            f"expected layer indices or '{FINAL}', got {value!r}", argument="layers"
        ) from None
    if isinstance(value, float) and value != index:
        raise AnalysisError(
            f"expected layer indices or '{FINAL}', got {value!r}", argument="layers"
        )
    return index


def field_type(field: dataclasses.Field) -> tuple[type, bool, bool]:
    """(element type, is a sequence, may be None) of a `Settings` field, from its annotation."""
    hint = typing.get_type_hints(Settings)[field.name]
    optional = False
    args = typing.get_args(hint)
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        optional = type(None) in args
        rest = [a for a in args if a is not type(None)]
        hint = rest[0] if len(rest) == 1 else str
    if typing.get_origin(hint) is tuple:
        element = typing.get_args(hint)[0]
        return (element if isinstance(element, type) else str), True, optional
    return hint, False, optional
