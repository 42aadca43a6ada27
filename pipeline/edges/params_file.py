"""params.yaml as a file: read as YAML 1.2 (as DVC reads it), then validated into ``Params``."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from pipeline.config.params import Params, load_params
from pipeline.errors import PipelineError


def read_params(path: Path) -> Params:
    """Parse and validate params.yaml."""
    return load_params(read_params_mapping(path))


def read_params_mapping(path: Path) -> Any:
    """params.yaml as parsed, before validation: as YAML 1.2 reads it, which DVC does."""
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"params file not found: {path}")
    try:
        return yaml.load(path.read_text(encoding="utf-8"), Loader=_Yaml12)  # noqa: S506 (safe)
    except UnicodeDecodeError as exc:
        where = f"{exc.reason} at byte {exc.start}"
        raise PipelineError(f"{path} is not UTF-8 text ({where})") from None
    except yaml.YAMLError as exc:
        raise PipelineError(f"{path} is not valid YAML: {str(exc).splitlines()[0]}") from None


_YAML11_ONLY = ("bool", "int", "float")  # their YAML 1.1 resolvers are replaced below


class _Yaml12(yaml.SafeLoader):
    """PyYAML's safe loader reading scalars as YAML 1.2's core schema (and so DVC, through
    ruamel) does, where YAML 1.1 differs: ``1e-1`` is a float (1.1 wants a dot), ``017`` is 17
    (1.1: octal 15), ``yes``/``on``/``4:16`` are strings (1.1: true / true / 256). A key given
    twice is an error (1.1 keeps the last silently; DVC refuses the file)."""

    yaml_implicit_resolvers = {
        first: [(tag, rx) for tag, rx in rules if tag.rpartition(":")[2] not in _YAML11_ONLY]
        for first, rules in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: set = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            try:
                duplicate = key in seen
            except TypeError:  # unhashable: the safe constructor says so itself
                break
            if duplicate:
                line = key_node.start_mark.line + 1
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} given twice (line {line})", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _yaml12_int(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> int:
    text = str(loader.construct_scalar(node)).replace("_", "")
    sign, digits = (-1, text[1:]) if text.startswith("-") else (1, text.lstrip("+"))
    base = {"0o": 8, "0x": 16}.get(digits[:2].lower(), 10)
    return sign * int(digits[2:] if base != 10 else digits, base)


_Yaml12.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)
_Yaml12.add_implicit_resolver(
    "tag:yaml.org,2002:int",
    re.compile(r"^(?:[-+]?[0-9][0-9_]*|0o[0-7_]+|0x[0-9a-fA-F_]+)$"),
    list("-+0123456789"),
)
_Yaml12.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?"
        r"|[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)"
        r"|[-+]?\.[0-9_]+(?:[eE][-+]?[0-9]+)?"
        r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"
    ),
    list("-+0123456789."),
)
_Yaml12.add_constructor("tag:yaml.org,2002:int", _yaml12_int)
