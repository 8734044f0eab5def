"""Options declared once: a config field carries its flag, Make variable, choices and help.

The CLI generates its flags from these declarations, `make help` lists them, and
`build_config` turns flag values into the frozen configs of `pipeline.config`.
"""

from __future__ import annotations

import dataclasses
import re
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pipeline.errors import ConfigError


@dataclass(frozen=True)
class Option:
    """How a config field is set from outside: one declaration, read by the CLI, Make and checks.

    The flag is `--<name>` (lower case, `_` -> `-`) and the Make variable `<NAME>`; `name`
    defaults to the field's own. `choices` are validated by the config itself (one layer,
    one message) and listed in `--help` and `make help`. `parse` turns a flag's text into the
    value (default: the field's type); `invert` makes a boolean field the negation of its
    flag (`download` <- `--no-download`).
    """

    help: str
    name: str = ""
    choices: tuple[Any, ...] | None = None
    parse: Callable[[str], Any] | None = None
    invert: bool = False

    @property
    def flag(self) -> str:
        return "--" + self.name.lower().replace("_", "-")

    @property
    def make_variable(self) -> str:
        return self.name.upper()


def option(
    default: Any = dataclasses.MISSING,
    help: str = "",
    *,
    name: str = "",
    choices: Sequence[Any] | None = None,
    parse: Callable[[str], Any] | None = None,
    invert: bool = False,
    default_factory: Any = dataclasses.MISSING,
) -> Any:
    """A dataclass field that is a user option (see `Option`)."""
    meta = {
        "option": Option(
            help=help, name=name, choices=None if choices is None else tuple(choices), parse=parse, invert=invert
        )
    }
    if default_factory is not dataclasses.MISSING:
        return field(default_factory=default_factory, metadata=meta)
    return field(default=default, metadata=meta)


def derived(source: str, default: Any) -> Any:
    """A field set from the option named `source` of another section (one option, several readers).

    The seed, for example, is one option (`SEED`) that the features' key, the head, the views,
    fine-tuning and the audit all record; it is declared once and copied here by `build_config`.
    """
    return field(default=default, metadata={"derived": source})


def options(cls: type) -> dict[str, Option]:
    """`{field name: Option}` of a config class, with every option's public name resolved."""
    found = {}
    for f in dataclasses.fields(cls):
        declared = f.metadata.get("option")
        if declared is not None:
            found[f.name] = declared if declared.name else dataclasses.replace(declared, name=f.name)
    return found


def derived_fields(cls: type) -> dict[str, str]:
    """`{field name: source option name}` of a config class."""
    return {f.name: f.metadata["derived"] for f in dataclasses.fields(cls) if "derived" in f.metadata}


def nested_fields(cls: type) -> dict[str, type]:
    """Fields holding another config section (`FeaturesConfig.data`, `...augment`)."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if _is_section(hints[f.name])}


def _is_section(kind: Any) -> bool:
    """A config section is a dataclass that declares options."""
    return dataclasses.is_dataclass(kind) and isinstance(kind, type) and bool(options(kind))


def build_config(cls: type, values: Mapping[str, Any]):
    """A config of `cls` from option values by public name (None: not given, so the default).

    Nested sections are built from the same values, and derived fields copy the option
    they name, so every option given once reaches every field that records it.
    """
    kwargs: dict[str, Any] = {}
    for name, opt in options(cls).items():
        if values.get(opt.name) is not None:
            value = values[opt.name]
            kwargs[name] = (not value) if opt.invert else value
    for name, source in derived_fields(cls).items():
        if values.get(source) is not None:
            kwargs[name] = values[source]
    for name, section in nested_fields(cls).items():
        kwargs[name] = build_config(section, values)
    return cls(**kwargs)


def check_choices(config: Any) -> None:
    """The one check of every option's `choices` (the CLI lists them but does not check)."""
    for name, opt in options(type(config)).items():
        value = getattr(config, name)
        if opt.choices is not None and value not in opt.choices:
            shown = ", ".join(str(c) for c in opt.choices)
            raise ConfigError(
                f"{opt.name} must be one of {shown}. Received: {opt.name}={value!r} ({opt.make_variable})."
            )


_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}


def parse_size(text: str, name: str = "size") -> int:
    """'2GB' -> 2_000_000_000 bytes, '512MiB' -> 536_870_912, '1e9' -> 1_000_000_000."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-z]*)\s*", str(text).lower())
    if not match or match.group(2) not in _SIZE_UNITS or float(match.group(1)) <= 0:
        raise ConfigError(f"{name} must be a positive size such as 2GB, 512MB or 1.5GiB. Received: {name}={text!r}.")
    return int(float(match.group(1)) * _SIZE_UNITS[match.group(2)])
