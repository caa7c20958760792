"""Settings from the environment: ``STREAMVLM_<NAME>`` for the option ``--<name>`` of
``streamvlm serve`` / ``generate`` (``STREAMVLM_MAX_NUM_SEQS=8`` is ``--max-num-seqs 8``), each
value parsed as its flag parses it. The CLI takes them as its defaults, so a flag wins over the
environment, which wins over a ``--config`` TOML file."""

from __future__ import annotations

import difflib
import json
import logging
import types
import typing
from collections.abc import Iterable, Mapping
from typing import Any

import msgspec

PREFIX = "STREAMVLM_"
# Variables read elsewhere (benchmarks, kernel tuning), not settings: never typos.
INTERNAL_VARIABLES = frozenset({"STREAMVLM_WORKER_PROFILE", "STREAMVLM_GEMV_CONFIG",
                                "STREAMVLM_DISABLE_PDL"})
_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})

logger = logging.getLogger(__name__)


def variable_name(setting: str) -> str:
    """``max_num_seqs`` (or ``--max-num-seqs``) -> ``STREAMVLM_MAX_NUM_SEQS``."""
    return PREFIX + setting.removeprefix("--").replace("-", "_").upper()


def split_list(text: str) -> list[str]:
    """A list setting as text: comma-separated, empty items dropped."""
    return [item.strip() for item in text.split(",") if item.strip()]


def parse_bool(text: str) -> bool:
    word = text.strip().lower()
    if word in _TRUE:
        return True
    if word in _FALSE:
        return False
    raise ValueError(f"expected one of {sorted(_TRUE | _FALSE)}, got {text!r}")


def _members(kind: Any) -> tuple[Any, ...]:
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        return typing.get_args(kind)
    return (kind,)


def is_bool(kind: Any) -> bool:
    return bool in _members(kind)


def _origins(kind: Any) -> set[Any]:
    return {typing.get_origin(member) or member for member in _members(kind)}


def is_list(kind: Any) -> bool:
    return bool(_origins(kind) & {list, tuple})


def parse_value(text: str, kind: Any) -> Any:
    """``text`` as a value of type ``kind``: bools by word, lists comma-separated, objects as JSON,
    the rest converted from the text (numbers, strings, Literal choices); ValueError says why."""
    if is_bool(kind):
        return parse_bool(text)
    if is_list(kind):
        raw: Any = split_list(text)
    elif dict in _origins(kind):
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"expected a JSON object: {exc}") from exc
    else:
        raw = text
    try:
        return msgspec.convert(raw, kind, strict=False)
    except msgspec.ValidationError as exc:
        raise ValueError(str(exc)) from exc


def environment_values(kinds: Mapping[str, Any], environ: Mapping[str, str]) -> dict[str, Any]:
    """Setting name -> parsed value, for each setting of ``kinds`` (name -> type) whose variable
    is set; a bad value is a ValueError naming the variable."""
    values = {}
    for name, kind in kinds.items():
        variable = variable_name(name)
        if variable not in environ:
            continue
        try:
            values[name] = parse_value(environ[variable], kind)
        except ValueError as exc:
            raise ValueError(f"{variable}={environ[variable]!r}: {exc}") from exc
    return values


def likely_typos(known: Iterable[str], environ: Iterable[str]) -> dict[str, str]:
    """Unknown ``STREAMVLM_*`` variables that are close to a known one -> that one."""
    known = set(known) | INTERNAL_VARIABLES
    typos = {}
    for variable in environ:
        if variable.startswith(PREFIX) and variable not in known:
            close = difflib.get_close_matches(variable, known, n=1, cutoff=0.8)
            if close:
                typos[variable] = close[0]
    return typos


def warn_typos(known: Iterable[str], environ: Iterable[str]) -> None:
    for variable, close in likely_typos(known, environ).items():
        logger.warning("%s is not a streamvlm setting (ignored); did you mean %s?", variable, close)
