"""docs/config.md, the run config's field reference, generated from the schema (`dpft.config.schema`).

    python -m dpft.config.docs > docs/config.md

tests/test_configs.py checks that the file is up to date.
"""
from __future__ import annotations

from dpft.config.fields import GROUP, Field
from dpft.config.schema import FIELDS

HEADER = """# The run config

Generated from `dpft/config/schema.py` by `python -m dpft.config.docs > docs/config.md`; do not edit.

Every field of a run config, with its default, the values it allows and what it does. Set any of
them as `--config.FIELD=VALUE` (`dpft train --config C --workdir W --print-config` prints a resolved
config). Values: bool true/false/1/0/yes/no; int (2e3 is 2000); float; a tuple as `a,b` or
`('a', 'b')`; `None` for None in every non-string field. A resumed run may change the fields marked
"may change"; every other field must equal the checkpoint's. A config saved by an older
dpft is brought to this schema when it is read (`dpft.config.upgrade`).
"""


def _values(field: Field) -> str:
    text = field.allowed() + (f" ({field.note})" if field.note else "")
    return text + (f"; checked when {field.only_if}" if field.only_if else "")


def _row(path: str, field: Field) -> str:
    default = "{}" if field.kind is GROUP else repr(field.default)
    cells = (f"`{path}`", f"`{default}`", _values(field), "may change" if field.resumable else "", field.doc)
    return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"


def markdown() -> str:
    """The field reference: one table per section (model, data, privacy, train, eval, individual)."""
    lines = [HEADER]
    section = None
    for path, field in FIELDS.items():
        top = path.split(".")[0] if "." in path else ""
        if top != section:
            section = top
            lines += ["", f"## {top or 'top level'}", "", "| field | default | values | on resume | meaning |",
                      "|---|---|---|---|---|"]
        lines.append(_row(path, field))
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(markdown(), end="")
