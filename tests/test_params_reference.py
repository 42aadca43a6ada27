"""The params reference is generated from the config dataclasses (each field's docstring is
the one home of a param's meaning): the docs page and the comments of params.yaml and the
presets must say exactly what the dataclasses say."""

from pathlib import Path

import pytest

from pipeline.config import reference
from pipeline.config.params import Params, flatten
from pipeline.config.reference import annotate, markdown, param_docs, yaml_value

REPO = Path(__file__).resolve().parents[1]
PARAM_FILES = [REPO / "params.yaml", *sorted((REPO / "presets").glob("*.yaml"))]


def test_every_param_has_a_documented_meaning_type_and_default():
    docs = {d.key: d for d in param_docs()}
    flat = flatten(Params())
    assert {k for k, d in docs.items() if not d.section} == set(flat)
    for key, value in flat.items():
        assert docs[key].default == value and len(docs[key].doc.split()) >= 2, key
    assert docs["profile.levels"].type == "int" and docs["profile.levels"].default == 41
    assert docs["finetune.epochs"].default != docs["baseline.epochs"].default  # per section


def test_the_docs_page_is_the_generated_one():
    page = (REPO / "docs" / "reference" / "params.md").read_text()
    assert page == markdown(), "run: python tools/params_reference.py"
    assert "| `prune.ratio` | float | `0.8` |" in page


@pytest.mark.parametrize("path", PARAM_FILES, ids=lambda p: p.name)
def test_params_files_comment_each_key_as_the_dataclasses_do(path):
    text = path.read_text()
    assert annotate(text) == text, f"{path.name}: run python tools/params_reference.py"


def test_a_changed_meaning_shows_in_every_generated_file(monkeypatch):
    """The check can fail: a docstring edited in the dataclass disagrees with the files."""
    original = reference._field_docs
    wrapped = {}

    def edited(cls):
        if cls not in wrapped:
            docs = dict(original(cls))
            if "levels" in docs:
                docs["levels"] = (docs["levels"][0], "an edited meaning")
            wrapped[cls] = docs
        return wrapped[cls]

    monkeypatch.setattr(reference, "_field_docs", edited)
    text = (REPO / "params.yaml").read_text()
    assert annotate(text) != text
    assert "# an edited meaning" in annotate(text)
    assert "an edited meaning" in markdown()


def test_annotate_replaces_only_comments_and_keeps_values_and_other_lines():
    text = "# header\nseed: 7  # old words\n\nprofile:\n  levels: 5\n  unknown_key: 1  # kept\n"
    out = annotate(text).splitlines()
    assert out[0] == "# header" and out[2] == ""
    assert out[1].startswith("seed: 7 ") and "# training init/shuffling and calib" in out[1]
    assert out[4].startswith("  levels: 5 ") and "sparsity grid points" in out[4]
    assert out[5] == "  unknown_key: 1  # kept"  # not a param: validate reports it, not this


def test_yaml_value_writes_defaults_as_params_yaml_does():
    assert [yaml_value(v) for v in (None, True, "auto", [0.5, 1], {})] == [
        "null",
        "true",
        "auto",
        "[0.5, 1]",
        "{}",
    ]


# Other params a bound is only valid with (cross-section rules, checked by validate)
CONTEXT = {
    "data.image_size": {"data": {"name": "cifar10"}},  # digits' 8x8 arrays are never resized
    "prune.bn_recalibration": {"profile": {"bn_correction": False}},  # 0: nothing to model
}


def _bounds(doc: str):
    """(lo, lo_open, hi, hi_open) of a documented numeric range, or None."""
    import re

    allowed = doc.rpartition("; allowed: ")[2]
    if m := re.search(r"in ([\[(])([-\d.e*]+), ([-\d.e*]+)([\])])", allowed):
        lo, hi = (float(eval(x, {})) for x in (m[2], m[3]))  # "2**32 - 1" style bounds only
        return lo, m[1] == "(", hi, m[4] == ")"
    if m := re.search(r"(>=|>) ([-\d.]+)", allowed):
        return float(m[2]), m[1] == ">", None, False
    return None


def test_documented_ranges_are_the_ones_validation_enforces():
    """Each documented numeric range is exact: its bounds pass (where closed) and the values
    just outside them are refused with one error naming the key."""
    from pipeline.config.params import load_params
    from pipeline.errors import PipelineError

    checked = 0
    for d in param_docs():
        bounds = None if d.section else _bounds(d.doc)
        if bounds is None or "list" in d.type or "both" in d.doc.rpartition("allowed")[2]:
            continue
        lo, lo_open, hi, hi_open = bounds
        step = 1 if "int" in d.type else 1e-9

        def mapping(value, key=d.key):
            section, _, name = key.rpartition(".")
            if not section:
                return {name: value}
            out = {section: {name: value}}
            for where, extra in CONTEXT.get(key, {}).items():  # what the bound needs beside it
                out.setdefault(where, {}).update(extra)
            return out

        def cast(x, kind=d.type):
            return int(x) if "int" in kind else x

        for value, ok in [(lo, not lo_open), (lo - step, False)] + (
            [(hi, not hi_open), (hi + step, False)] if hi is not None else []
        ):
            if ok:
                load_params(mapping(cast(value)))
            else:
                with pytest.raises(PipelineError, match=d.key.replace(".", r"\.")):
                    load_params(mapping(cast(value)))
        checked += 1
    assert checked >= 25
