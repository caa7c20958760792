"""Default sampling parameters from a checkpoint's ``generation_config.json``: what a request
that leaves a field unset gets, as vLLM and SGLang do. ``override_generation_config`` changes
or adds to them; ``generation_config = "none"`` ignores the checkpoint's file."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from streamvlm.contract.sampling import SamplingParams

# generation_config.json key -> SamplingParams field. Other keys (do_sample, eos_token_id, ...)
# are not sampling defaults.
GENERATION_FIELDS: dict[str, str] = {
    "temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
    "repetition_penalty": "repetition_penalty", "max_new_tokens": "max_tokens",
}


def check_override(override: Mapping[str, Any]) -> None:
    """ValueError unless every key is a generation_config sampling key with a valid value."""
    unknown = sorted(set(override) - set(GENERATION_FIELDS))
    if unknown:
        raise ValueError(f"override_generation_config: unknown keys {unknown}; expected some of "
                         f"{sorted(GENERATION_FIELDS)}")
    _as_params(dict(override), "override_generation_config")


def sampling_defaults(generation_config: Mapping[str, Any], override: Mapping[str, Any] | None
                      ) -> dict[str, Any]:
    """SamplingParams fields from the checkpoint's generation config (its sampling keys that are
    set), with ``override`` on top; ValueError if the result is not valid sampling."""
    merged = {key: value for key, value in generation_config.items()
              if key in GENERATION_FIELDS and value is not None}
    merged.update(override or {})
    return _as_params(merged, "generation_config.json")


def _as_params(generation: dict[str, Any], source: str) -> dict[str, Any]:
    fields = {GENERATION_FIELDS[key]: value for key, value in generation.items()
              if key in GENERATION_FIELDS}
    try:
        SamplingParams(**fields)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{source}: {exc}") from exc
    return fields
