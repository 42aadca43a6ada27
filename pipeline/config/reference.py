"""The params reference, generated from the config dataclasses: each field's docstring is the
one home of the param's meaning, its annotation the type and its default the default.

``markdown()`` is the docs page (docs/reference/params.md); ``annotate(text)`` gives a
params file's text with each key's comment set to its meaning, so params.yaml and the presets
say what the dataclasses say. Both are pure; ``tools/params_reference.py`` writes the files
and a test checks that the committed ones agree.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import json
import re
import textwrap
from dataclasses import dataclass
from typing import Any

from pipeline.config.params import Params

COMMENT_COLUMN = 27  # where params.yaml's comments start, unless the key and value are longer
GENERATOR = "tools/params_reference.py"


@dataclass(frozen=True)
class ParamDoc:
    """One params.yaml key: ``key`` dotted (``profile.levels``), ``section`` True for a
    section's own entry (``profile``), ``type`` as annotated, ``default`` the value in
    ``Params()``, ``doc`` the field's docstring as one line."""

    key: str
    type: str
    default: Any
    doc: str
    section: bool = False


@functools.cache
def _field_docs(cls: type) -> dict[str, tuple[str, str]]:
    """``{field: (type as written, docstring as one line)}`` of a dataclass, from its source."""
    body = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0].body
    out = {}
    for node, after in zip(body, [*body[1:], None], strict=True):
        if not isinstance(node, ast.AnnAssign):
            continue
        name = node.target.id
        if not (isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)):
            raise ValueError(f"{cls.__name__}.{name} has no docstring: each param needs one")
        out[name] = (ast.unparse(node.annotation), " ".join(after.value.value.split()))
    return out


def param_docs() -> list[ParamDoc]:
    """Every params.yaml key in the dataclasses' field order, sections before their keys."""
    defaults = Params()
    docs = []
    for name, (kind, doc) in _field_docs(Params).items():
        value = getattr(defaults, name)
        if not dataclasses.is_dataclass(value):
            docs.append(ParamDoc(name, kind, value, doc))
            continue
        docs.append(ParamDoc(name, kind, None, doc, section=True))
        for field, (sub_kind, sub_doc) in _field_docs(type(value)).items():
            docs.append(ParamDoc(f"{name}.{field}", sub_kind, getattr(value, field), sub_doc))
    return docs


def yaml_value(value: Any) -> str:
    """A default as params.yaml writes it (YAML flow style)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value
    return json.dumps(value)


def _cell(text: str) -> str:
    """Text for a Markdown table cell: a pipe would end the cell, ``{...}`` would be read as
    attributes (attr_list) and ``<...>`` as HTML."""
    return text.replace("|", "\\|").replace("{", "&#123;").replace("<", "&lt;")


def _table(docs: list[ParamDoc]) -> list[str]:
    rows = ["| key | type | default | meaning |", "|---|---|---|---|"]
    for d in docs:
        default = yaml_value(d.default).replace("|", "\\|")  # in a code span: no entities
        # the type outside backticks: an escaped pipe inside a code span keeps its backslash
        rows.append(f"| `{d.key}` | {_cell(d.type)} | `{default}` | {_cell(d.doc)} |")
    return rows


def markdown() -> str:
    """The params reference page: the top-level keys, then one table per section."""
    docs = param_docs()
    out = [
        "# Params reference",
        "",
        "Every key of `params.yaml`, generated from the config dataclasses in `pipeline/config/`",
        f"(each field's docstring) by `python {GENERATOR}`; `params.yaml` and the presets carry",
        "the same text as comments, and a test fails when either disagrees. Keys left out of",
        "`params.yaml` take these defaults; an unknown key or a value outside what is allowed",
        "stops `validate` with one `error:` line naming the key.",
        "",
        "## Top level",
        "",
        *_table([d for d in docs if not d.section and "." not in d.key]),
    ]
    for section in (d for d in docs if d.section):
        keys = [d for d in docs if d.key.startswith(f"{section.key}.")]
        out += ["", f"## {section.key}", "", f"{section.doc[0].upper()}{section.doc[1:]}.", ""]
        out += _table(keys)
    return "\n".join(out) + "\n"


_KEY = re.compile(r"^(?P<indent> *)(?P<key>[A-Za-z_]\w*):(?P<rest>.*)$")


def _split_comment(rest: str) -> str:
    """The value part of ``rest`` (what follows ``key:``), without its comment."""
    quote = None
    for i, ch in enumerate(rest):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or rest[i - 1] in " \t"):
            return rest[:i].rstrip()
    return rest.rstrip()


def annotate(text: str) -> str:
    """``text`` (a params file) with each known key's comment replaced by its meaning; other
    lines (header comments, blank lines) as they are. Two-space indentation, as params.yaml."""
    docs = {d.key: d.doc for d in param_docs()}
    section = ""
    out = []
    for line in text.split("\n"):
        match = _KEY.match(line)
        if not match or len(match["indent"]) not in (0, 2):
            out.append(line)
            continue
        key = match["key"] if not match["indent"] else f"{section}.{match['key']}"
        if not match["indent"]:
            section = match["key"]
        if key not in docs:
            out.append(line)
            continue
        code = f"{match['indent']}{match['key']}:{_split_comment(match['rest'])}"
        pad = max(COMMENT_COLUMN - len(code), 2)
        out.append(f"{code}{' ' * pad}# {docs[key]}")
    return "\n".join(out)
