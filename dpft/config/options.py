"""Option dataclasses of the command-line tools (`dpft audit`'s `AuditConfig`, `dpft evaluate`'s
`EvalConfig`): each field declared with `option` carries a `dpft.config.fields.Field` record, which
checks it (`dataclass_problems`) and gives its command-line option (`add_arguments`), as the run
config's schema does for the run config. A dataclass, not a ConfigDict: these options are typed
keyword arguments of one command, never saved and upgraded.
"""
from __future__ import annotations

import dataclasses
from typing import Any

from dpft.config.fields import FLOAT, INT, STR, Field, Kind


def option(default: Any, kind: Kind, doc: str, **spec: Any) -> Any:
    """A dataclass field with `Field(default, kind, doc, **spec)` as its metadata."""
    return dataclasses.field(default=default, metadata={"field": Field(default, kind, doc, **spec)})


def dataclass_fields(cls: Any) -> dict[str, Field]:
    """{name: Field} of the fields of dataclass `cls` declared with `option`."""
    return {f.name: f.metadata["field"] for f in dataclasses.fields(cls) if "field" in f.metadata}


def dataclass_problems(obj: Any) -> list[tuple[str, Any, str]]:
    """(name, value, problem) of every field of dataclass instance `obj` its `Field` refuses."""
    out = []
    for name, spec in dataclass_fields(type(obj)).items():
        value = getattr(obj, name)
        problem = spec.problem(value)
        if problem:
            out.append((name, value, problem))
    return out


_ARG_TYPES = {INT.name: int, FLOAT.name: float, STR.name: str}


def add_arguments(parser: Any, cls: Any, flags: dict[str, str]) -> None:
    """A command-line option `--FLAG` (an argparse parser or group) for each field of option dataclass
    `cls` named in `flags` ({field: flag}), its value in `args.<field>`: type, default, choices and
    help from the field's record."""
    specs = dataclass_fields(cls)
    for name, flag in flags.items():
        spec = specs[name]
        parser.add_argument(f"--{flag}", dest=name, type=_ARG_TYPES[spec.kind.name], default=spec.default,
                            choices=spec.choice_names() if spec.choices is not None else None,
                            metavar=None if spec.choices is not None else name.upper(),
                            help=f"{spec.doc} (default %(default)s)")
