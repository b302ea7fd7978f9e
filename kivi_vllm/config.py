"""KIVI configuration: parsing and start-up validation."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any

ALLOWED_BITS = (2, 4)
ALLOWED_GROUP_SIZES = (32, 64, 128)
CONFIG_KEY = "kivi"


class KiviConfigError(ValueError):
    """A KIVI option (or a model/engine feature) the backend cannot serve."""


FASTGEN_DEFAULT_RATIO = 0.3
_INT_OPTIONS = {  # the allowed values of the integer options, for type errors
    "bits": f"one of {ALLOWED_BITS}",
    "group_size": f"one of {ALLOWED_GROUP_SIZES}",
    "residual": "a positive multiple of group_size (e.g. 32, 64, 128)",
    "sink_groups": "an integer >= 0",
}


def _reject_unknown(raw: dict, cls: type, label: str) -> None:
    """Fail on keys that are not fields of the config dataclass ``cls``."""
    allowed = set(cls.__dataclass_fields__)
    unknown = sorted(set(raw) - allowed)
    if unknown:
        raise KiviConfigError(
            f"unknown {label} option(s) {unknown}; allowed options: {sorted(allowed)}"
        )


@dataclass(frozen=True)
class FastGenConfig:
    """``kivi.fastgen``: FastGen per-head compression (see docs/fastgen.md).

    recovery: attention mass a head's kept tokens must recover (0 < T <= 1).
    frequent_ratio / local_ratio: heavy hitters kept and local window, as fractions of
    the prompt (0 < r <= 1).
    profile_rows: profile on the last ``profile_rows`` prompt positions only (SnapKV
    style: the end of the prompt, e.g. a question, ranks the heavy hitters); 0 = every
    query row of the step that completes the prompt.
    special_ids / punct_ids: the token classes as id lists, for engines without a
    tokenizer (``skip_tokenizer_init``); when either is given, both replace the classes
    read from the tokenizer (its special ids; tokens that decode to punctuation).
    """

    recovery: float = 0.97
    frequent_ratio: float = FASTGEN_DEFAULT_RATIO
    local_ratio: float = FASTGEN_DEFAULT_RATIO
    profile_rows: int = 0
    special_ids: tuple[int, ...] = ()
    punct_ids: tuple[int, ...] = ()

    @property
    def token_ids_given(self) -> bool:
        return bool(self.special_ids or self.punct_ids)

    def require_token_classes(self, skip_tokenizer_init: bool) -> None:
        """An engine without a tokenizer must name the token classes."""
        if skip_tokenizer_init and not self.token_ids_given:
            raise KiviConfigError(
                "kivi.fastgen needs the token classes and this engine has no tokenizer "
                "(skip_tokenizer_init): set kivi.fastgen.special_ids and punct_ids"
            )

    def __post_init__(self) -> None:
        for name in ("special_ids", "punct_ids"):
            ids = getattr(self, name)
            if not isinstance(ids, (list, tuple)) or not all(
                isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids
            ):
                raise KiviConfigError(
                    f"kivi.fastgen.{name}={ids!r} must be a list of token ids (integers >= 0)"
                )
            object.__setattr__(self, name, tuple(ids))
        if isinstance(self.profile_rows, bool) or not isinstance(self.profile_rows, int) or (
            self.profile_rows < 0
        ):
            raise KiviConfigError(
                f"kivi.fastgen.profile_rows={self.profile_rows!r} must be an integer >= 0 "
                "(0 = all prompt rows of the completing step)"
            )
        for name in ("recovery", "frequent_ratio", "local_ratio"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise KiviConfigError(f"kivi.fastgen.{name} must be a number, got {value!r}")
            if not 0 < value <= 1:
                raise KiviConfigError(
                    f"kivi.fastgen.{name}={value} is out of range; allowed: 0 < value <= 1 "
                    "(e.g. recovery 0.9 to 0.99)"
                )

    @classmethod
    def from_dict(cls, raw: Any) -> FastGenConfig:
        if not isinstance(raw, dict):
            raise KiviConfigError(
                f'kivi.fastgen must be a JSON object such as {{"recovery": 0.97}}, got {raw!r}'
            )
        _reject_unknown(raw, cls, "kivi.fastgen")
        return cls(**raw)


@dataclass(frozen=True)
class KiviConfig:
    """Per-engine KIVI settings, read from ``--additional-config '{"kivi": {...}}'``.

    bits: code width (2 or 4; 4 is the quality-safe default). group_size: tokens per key
    group and channels per value group; also the KV block size. residual: full-precision
    window in tokens (a multiple of group_size). fastgen: optional FastGen settings.
    sink_groups: the first groups of every sequence kept in full precision for its
    lifetime (attention sinks); they take ``sink_groups * group_size`` of the residual's
    rows, the rest stays the sliding window.
    rotate_keys: multiply queries and keys by a normalized Hadamard matrix before
    attention and before storing (q . k unchanged; keys quantized in the rotated basis;
    needs a power-of-two head size).
    layer_key_bits: key code width per decoder layer index, e.g. ``{"0": 4, "18": 4}``
    (the other layers' keys, and every layer's values, use ``bits``); kept as sorted
    ``(layer, bits)`` pairs.
    fp8_scales: store the key and value scales as float8 e4m3 (rounded to nearest; the
    codes are computed against the stored scale and clamped) instead of float16: one byte
    less per scale, mins stay float16.
    """

    bits: int = 4
    group_size: int = 32
    residual: int = 32
    fastgen: FastGenConfig | None = None
    sink_groups: int = 0
    rotate_keys: bool = False
    layer_key_bits: tuple[tuple[int, int], ...] = ()
    fp8_scales: bool = False

    def __post_init__(self) -> None:
        if self.fastgen is not None and not isinstance(self.fastgen, FastGenConfig):
            object.__setattr__(self, "fastgen", FastGenConfig.from_dict(self.fastgen))
        object.__setattr__(self, "layer_key_bits", _parse_layer_key_bits(self.layer_key_bits))
        for name in ("bits", "group_size", "residual", "sink_groups"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise KiviConfigError(
                    f"kivi.{name} must be an integer, got {value!r}; allowed: "
                    f"{_INT_OPTIONS[name]}"
                )
        for name in ("rotate_keys", "fp8_scales"):
            if not isinstance(getattr(self, name), bool):
                raise KiviConfigError(
                    f"kivi.{name} must be true or false, got {getattr(self, name)!r}"
                )
        if self.bits not in ALLOWED_BITS:
            raise KiviConfigError(
                f"kivi.bits={self.bits} is not supported; allowed values: {ALLOWED_BITS}"
            )
        if self.group_size not in ALLOWED_GROUP_SIZES:
            raise KiviConfigError(
                f"kivi.group_size={self.group_size} is not supported; "
                f"allowed values: {ALLOWED_GROUP_SIZES}"
            )
        if self.residual < self.group_size or self.residual % self.group_size:
            raise KiviConfigError(
                f"kivi.residual={self.residual} must be a positive multiple of "
                f"kivi.group_size={self.group_size} (e.g. {self.group_size}, "
                f"{2 * self.group_size}, {4 * self.group_size})"
            )
        if self.sink_groups < 0:
            raise KiviConfigError(
                f"kivi.sink_groups={self.sink_groups} must be >= 0 (0 = no sinks)"
            )
        if self.layer_key_bits and self.fastgen is not None:
            raise KiviConfigError(
                "kivi.layer_key_bits cannot be combined with kivi.fastgen yet (FastGen's "
                "head-pages share one format across layers); remove one of them"
            )
        if self.fp8_scales and self.fastgen is not None:
            raise KiviConfigError(
                "kivi.fp8_scales cannot be combined with kivi.fastgen yet (FastGen's "
                "head-pages use float16 scales); remove one of them"
            )
        if self.residual < (self.sink_groups + 1) * self.group_size:
            raise KiviConfigError(
                f"kivi.residual={self.residual} must hold kivi.sink_groups="
                f"{self.sink_groups} sink group(s) plus at least one sliding group: use "
                f"residual >= {(self.sink_groups + 1) * self.group_size}"
            )

    @classmethod
    def from_dict(cls, raw: Any) -> KiviConfig:
        """Build from the ``kivi`` entry of ``additional_config``; unknown keys fail."""
        if raw is True or raw == {}:
            return cls()
        if not isinstance(raw, dict):
            raise KiviConfigError(
                f"additional_config['kivi'] must be a JSON object, got {raw!r}; allowed: "
                'an object such as {"bits": 2}, true (defaults) or false (KIVI off)'
            )
        _reject_unknown(raw, cls, "kivi")
        return cls(**raw)

    def check_head_size(self, head_size: int) -> None:
        """Fail unless the group divides the head size (values are grouped by channel)."""
        if head_size % self.group_size:
            allowed = [g for g in ALLOWED_GROUP_SIZES if head_size % g == 0]
            raise KiviConfigError(
                f"kivi.group_size={self.group_size} does not divide the model's "
                f"head size {head_size}; allowed group sizes for this model: {allowed}"
            )
        if self.rotate_keys and head_size & (head_size - 1):
            raise KiviConfigError(
                f"kivi.rotate_keys=true needs a power-of-two head size (Hadamard "
                f"rotation), the model's is {head_size}; allowed: false for this model"
            )

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        if self.fastgen is None:
            del out["fastgen"]
        if not self.sink_groups:
            del out["sink_groups"]
        if not self.rotate_keys:
            del out["rotate_keys"]
        if not self.fp8_scales:
            del out["fp8_scales"]
        if self.layer_key_bits:
            out["layer_key_bits"] = {str(layer): b for layer, b in self.layer_key_bits}
        else:
            del out["layer_key_bits"]
        return out

    def key_bits_of(self, layer: int) -> int:
        """Key code width of decoder layer ``layer``."""
        return dict(self.layer_key_bits).get(layer, self.bits)

    def check_num_layers(self, num_layers: int) -> None:
        """Fail if ``layer_key_bits`` names a layer the model does not have."""
        bad = [layer for layer, _ in self.layer_key_bits if layer >= num_layers]
        if bad:
            raise KiviConfigError(
                f"kivi.layer_key_bits names layer(s) {bad}, but the model has "
                f"{num_layers} decoder layers; allowed layer indices: 0 to {num_layers - 1}"
            )

    @property
    def sink_tokens(self) -> int:
        """Full-precision sink positions at the start of every sequence."""
        return self.sink_groups * self.group_size

    @property
    def levers(self) -> dict[str, int | bool | str]:
        """Options beyond plain KIVI that are switched on (CPU and GPU: ``GPU_LEVERS``)."""
        out: dict[str, int | bool | str] = {}
        if self.sink_groups:
            out["sink_groups"] = self.sink_groups
        if self.rotate_keys:
            out["rotate_keys"] = True
        if self.layer_key_bits:
            out["layer_key_bits"] = _layer_bits_name(self.layer_key_bits)
        if self.fp8_scales:
            out["fp8_scales"] = True
        return out

    @property
    def name(self) -> str:
        name = f"kivi{self.bits}-g{self.group_size}-r{self.residual}"
        if self.sink_groups:
            name += f"-s{self.sink_groups}"
        if self.rotate_keys:
            name += "-rot"
        if self.layer_key_bits:
            name += f"-k{_layer_bits_name(self.layer_key_bits)}"
        if self.fp8_scales:
            name += "-fp8s"
        return name if self.fastgen is None else f"{name}-fastgen{self.fastgen.recovery}"


def _layer_bits_name(pairs: tuple[tuple[int, int], ...]) -> str:
    """``((0, 4), (18, 4))`` -> ``"0:4.18:4"`` (for names and records)."""
    return ".".join(f"{layer}:{b}" for layer, b in pairs)


def _parse_layer_key_bits(raw: Any) -> tuple[tuple[int, int], ...]:
    """``{"0": 4, "18": 4}`` (or already-parsed pairs) -> sorted ``((0, 4), (18, 4))``."""
    allowed = (
        f'an object mapping decoder layer indices to key bits in {ALLOWED_BITS}, e.g. '
        '{"0": 4, "18": 4}'
    )
    if isinstance(raw, dict):
        items = list(raw.items())
    elif isinstance(raw, (tuple, list)) and all(
        isinstance(p, (tuple, list)) and len(p) == 2 for p in raw
    ):
        items = [tuple(p) for p in raw]
    else:
        raise KiviConfigError(f"kivi.layer_key_bits={raw!r} is not valid; allowed: {allowed}")
    out: dict[int, int] = {}
    for layer, bits in items:
        text = str(layer)
        if isinstance(layer, bool) or not text.isdigit():
            raise KiviConfigError(
                f"kivi.layer_key_bits has layer {layer!r}; allowed: layer indices >= 0 "
                f"({allowed})"
            )
        if isinstance(bits, bool) or bits not in ALLOWED_BITS:
            raise KiviConfigError(
                f"kivi.layer_key_bits[{text}]={bits!r} is not supported; allowed key bits: "
                f"{ALLOWED_BITS}"
            )
        out[int(text)] = bits
    return tuple(sorted(out.items()))


def kivi_config_from_vllm(vllm_config: Any) -> KiviConfig | None:
    """The engine's KIVI config, or None when KIVI is not switched on."""
    additional = getattr(vllm_config, "additional_config", None) or {}
    if not isinstance(additional, dict) or CONFIG_KEY not in additional:
        return None
    raw = additional[CONFIG_KEY]
    if raw is False:
        return None
    if raw is None:  # e.g. a config dump that lost the value: never fall back silently
        raise KiviConfigError(
            "additional_config['kivi'] is null; allowed: a JSON object such as "
            '{"bits": 2} (KIVI on), true (KIVI with defaults) or false (KIVI off)'
        )
    return KiviConfig.from_dict(raw)


def config_fingerprint(cfg: KiviConfig) -> str:
    """Canonical JSON of every option of ``cfg`` (equal iff the configs are equal)."""
    return json.dumps(asdict(cfg), sort_keys=True, separators=(",", ":"))
