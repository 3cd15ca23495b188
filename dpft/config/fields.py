"""One record per option: its default, kind, range or choices and a one-line doc.

The run config's schema (`dpft.config.schema.FIELDS`) is a table of `Field`s; `dpft audit`'s and
`dpft evaluate`'s option dataclasses carry them as field metadata (`dpft.config.options`).
Validation, the command-line parser and the generated documentation read these records, so a
range or a list of choices is written once, where the thing it describes is implemented.
"""
from __future__ import annotations

import ast
import dataclasses
import math
from typing import Any, Callable, Sequence

_TRUE = {"true", "1", "yes", "y", "on", "t"}
_FALSE = {"false", "0", "no", "n", "off", "f"}


def _literal(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


# --------------------------------------------------------------------------- kinds


@dataclasses.dataclass(frozen=True)
class Kind:
    """What a field holds. `accepts(value)`; `parse(text)` reads a command-line string (ValueError
    when it cannot); `problem` is the complaint about a value it does not accept; `text`: a string
    kind, which takes the command-line text verbatim ("None" included)."""

    name: str
    accepts: Callable[[Any], bool]
    parse: Callable[[str], Any]
    problem: str
    text: bool = False


def _parse_bool(text: str) -> bool:
    low = text.strip().lower()
    if low in _TRUE:
        return True
    if low in _FALSE:
        return False
    raise ValueError("expected true/false")


def _parse_int(text: str) -> int:
    value = _literal(text.strip())
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not is_int(value):
        raise ValueError("expected an integer")
    return value


def _items(text: str) -> list[Any]:
    """'a,b' -> ['a', 'b']; '(1, 2)' or '[1, 2]' -> [1, 2]; '' -> []."""
    stripped = text.strip()
    if stripped.startswith(("(", "[")):
        value = _literal(stripped)
        return list(value) if isinstance(value, (tuple, list)) else [value]
    return [s.strip() for s in stripped.split(",") if s.strip()] if stripped else []


def tuple_of(element: Kind | None) -> Kind:
    """A tuple whose elements are of kind `element` (None: kept as parsed)."""
    def parse(text: str) -> tuple:
        items = _items(text)
        if element is not None and element.text:
            items = [str(i) for i in items]
        elif element is not None:
            items = [element.parse(i) if isinstance(i, str) else i for i in items]
        return tuple(items)

    return Kind(f"tuple[{element.name if element else 'Any'}]", lambda v: isinstance(v, (tuple, list)), parse,
                "must be a tuple")


BOOL = Kind("bool", lambda v: isinstance(v, bool), _parse_bool, "must be true or false")
INT = Kind("int", is_int, _parse_int, "must be an integer")
FLOAT = Kind("float", is_number, lambda t: float(t.strip()), "must be a number")
STR = Kind("str", lambda v: isinstance(v, str), str, "must be a string", text=True)
PATH = Kind("path", lambda v: isinstance(v, str), str, "must be a path or ''", text=True)
SPLIT = Kind("split", lambda v: isinstance(v, str) and bool(v), str, "must be a split name", text=True)
SPLITS = Kind("tuple[split]", lambda v: isinstance(v, (tuple, list)) and bool(v)
              and all(isinstance(s, str) and s for s in v), tuple_of(STR).parse,
              "must be a non-empty tuple of split names")
NAMES = Kind("None | 'a,b' | tuple[str]", lambda v: v is None or isinstance(v, str) or (
    isinstance(v, (tuple, list)) and all(isinstance(a, str) for a in v)), _literal,
    "must be None, 'a,b' or a tuple of attribute names")
ANY = Kind("Any", lambda v: True, _literal, "")


def _no_text(text: str) -> Any:
    raise ValueError("a group of fields is set through its members")


#: A group of fields (a ConfigDict): set its members, not the group.
GROUP = Kind("group", lambda v: hasattr(v, "keys"), _no_text, "must be a group of fields")
_SCALARS = {bool: BOOL, int: INT, float: FLOAT, str: STR}


def kind_of(value: Any) -> Kind | None:
    """The kind of a field known only by its current value (a data set's loader option); None when
    a value of its type cannot be set from the command line."""
    if value is None:
        return ANY
    if isinstance(value, (tuple, list)):
        return tuple_of(kind_of(value[0]) if len(value) else None)
    return _SCALARS.get(type(value))


def parse(kind: Kind, text: str) -> Any:
    """`text` read as a value of `kind`; "None"/"null" is None for every kind but a string."""
    if kind.text:
        return text
    if text.strip().lower() in ("none", "null"):
        return None
    return kind.parse(text)


# --------------------------------------------------------------------------- ranges and fields


def _num(x: float) -> str:
    return f"{x:g}" if isinstance(x, float) else str(x)


@dataclasses.dataclass(frozen=True)
class Range:
    """An interval of numbers: `contains(x)`; `text()` says it ("in [0, 1)", ">= 1", "> 0")."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def contains(self, x: float) -> bool:
        above = self.low is None or (x > self.low if self.low_open else x >= self.low)
        below = self.high is None or (x < self.high if self.high_open else x <= self.high)
        return above and below

    def text(self) -> str:
        if self.high is None:
            return f"{'>' if self.low_open else '>='} {_num(self.low)}"
        if self.low is None:
            return f"{'<' if self.high_open else '<='} {_num(self.high)}"
        return f"in {'(' if self.low_open else '['}{_num(self.low)}, {_num(self.high)}{')' if self.high_open else ']'}"


Choices = Sequence[str] | Callable[[], Sequence[str]]


@dataclasses.dataclass(frozen=True)
class Field:
    """One option: `default`, `kind`, a one-line `doc`, and what values it allows.

    range / choices: the allowed numbers / names (`choices` may be a function of a registry,
      called when checked; `choices_doc` then says where they come from in the documentation).
    nullable: None is allowed too. note: appended to a range problem, e.g. "(0 = off)".
    problem_text: replaces every problem ("{choices}" lists the choices).
    Run config only: only_if (checked only when that boolean field is True), resumable (may change
    when a run resumes), added (when it was added: older saved configs get the default on
    `dpft.config.upgrade`), was (where older configs kept it; moved there by upgrade).
    """

    default: Any
    kind: Kind
    doc: str
    range: Range | None = None
    choices: Choices | None = None
    choices_doc: str = ""
    nullable: bool = False
    note: str = ""
    problem_text: str | None = None
    only_if: str | None = None
    resumable: bool = False
    added: str | None = None
    was: str | None = None

    def choice_names(self) -> tuple[str, ...]:
        names = self.choices() if callable(self.choices) else self.choices
        return tuple(names or ())

    def problem(self, value: Any) -> str | None:
        """What is wrong with `value` ("must be >= 1", "is not one of a, b"), or None."""
        if value is None and self.nullable:
            return None
        if not self.kind.accepts(value):
            problem = self.kind.problem
        elif isinstance(value, float) and not math.isfinite(value):
            problem = "must be a finite number"
        elif self.choices is not None and value not in self.choice_names():
            problem = f"is not one of {', '.join(self.choice_names())}"
        elif self.range is not None and not self.range.contains(value):
            problem = f"must be {self.range.text()}" + (f" ({self.note})" if self.note else "")
        else:
            problem = None
        if problem and self.problem_text:
            return self.problem_text.format(choices=", ".join(self.choice_names()))
        return problem

    def allowed(self) -> str:
        """The allowed values in words (documentation)."""
        if self.choices is not None:
            return self.choices_doc or " | ".join(f'"{c}"' for c in self.choice_names())
        text = self.kind.name
        if self.range is not None:
            text += f" {self.range.text()}"
        return text + (" or None" if self.nullable else "")
