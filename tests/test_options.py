"""One source of truth for the options: MonitorOptions. The callback's signature, its docstring, the Hydra schema, the
YAML and the README's tables are derived from it or pinned to it here."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import re
from pathlib import Path

import pytest

from lightning_curvature import CurvatureMonitor
from lightning_curvature.options import MonitorOptions
from lightning_curvature.plan import METRIC_KEYS

ROOT = Path(__file__).resolve().parents[1]
FIELDS = dataclasses.fields(MonitorOptions)


def _readme_table(heading: str) -> dict[str, str]:
    """First column (without backticks) -> second column of the first table under ``heading``."""
    text = (ROOT / "README.md").read_text()
    section = text.split(heading, 1)[1]
    rows = {}
    lines = [line for line in section.splitlines()[1:] if line.startswith(("|", "#"))]
    for line in lines[1:]:  # past the header row
        if line.startswith("#"):
            break
        if line.startswith("|") and not set(line) <= set("|-: "):
            cells = [c.strip() for c in line.strip("|").split("|")]
            rows[cells[0].strip("`")] = cells[1]
    return rows


def test_signature_is_the_options():
    params = [p for p in inspect.signature(CurvatureMonitor.__init__).parameters.values() if p.name != "self"]
    assert [p.name for p in params] == [f.name for f in FIELDS]
    for p, f in zip(params, FIELDS):
        assert MonitorOptions(**{f.name: p.default}) == MonitorOptions(), f"default of {f.name}"
        assert (tuple(p.default) if isinstance(p.default, (list, tuple)) else p.default) == f.default, f.name


def test_docstring_documents_every_option_with_its_default_and_every_key():
    doc = inspect.getdoc(CurvatureMonitor)
    args = " ".join(doc.split("Args:", 1)[1].split())
    for f in FIELDS:
        assert re.search(rf"\b{f.name}: [^:]*?.*?Default: ``{re.escape(repr(f.default))}``", args), f.name
    for key, _, _ in METRIC_KEYS:
        assert f"``curvature/{key}``" in doc, key
    assert "<ARGS>" not in doc and "<KEYS>" not in doc


def test_readme_option_table_is_the_options():
    rows = _readme_table("## Options")
    assert list(rows) == [f.name for f in FIELDS]
    for f in FIELDS:
        written = ast.literal_eval(rows[f.name].strip("`"))
        expected = list(f.default) if isinstance(f.default, tuple) else f.default
        assert written == expected and type(written) is type(expected), (f.name, written, expected)


def test_readme_metric_table_is_the_keys():
    rows = _readme_table("## Logged metrics")
    keys = [k.replace("` ... `curvature/", " ... ").replace("curvature/", "", 1) for k in rows]
    assert keys == [k for k, _, _ in METRIC_KEYS]


@pytest.mark.parametrize("field", FIELDS, ids=[f.name for f in FIELDS])
def test_every_option_has_a_documented_check(field):
    assert field.metadata["doc"].strip()
    assert callable(field.metadata["check"])
