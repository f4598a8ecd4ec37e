"""The Parquet contract: explicit columns, frozen per version; a change without a SCHEMA_VERSION bump fails here."""

import copy
import dataclasses

import pyarrow as pa

from results_schema import schema


def test_columns_equal_the_frozen_columns_of_schema_version():
    problems = schema.version_problems(schema.load_versions(), schema.SCHEMA_VERSION, schema.current_form())
    assert problems == []


def test_every_scalar_config_field_has_exactly_one_column():
    expected = []
    for section, cls in schema.CONFIG_SECTIONS.items():
        for f in dataclasses.fields(cls):
            if f.type in ("int", "float", "str", "bool"):
                expected.append(f"{section}.{f.name}")
    names = [n for n, _ in schema.CONFIG_FIELDS]
    assert sorted(names) == sorted(expected), (
        "a config field was added or removed: add/remove its column in results_schema.schema.CONFIG_FIELDS "
        "and bump SCHEMA_VERSION (see the module docstring)")
    assert len(set(schema.TRIAL_SCHEMA.names)) == len(schema.TRIAL_SCHEMA.names)


def test_config_column_types_match_the_field_types():
    pa_types = {"int": pa.int64(), "float": pa.float64(), "str": pa.string(), "bool": pa.bool_()}
    for name, pa_type in schema.CONFIG_FIELDS:
        section, field = name.split(".", 1)
        ftype = {f.name: f.type for f in dataclasses.fields(schema.CONFIG_SECTIONS[section])}[field]
        assert pa_types[ftype] == pa_type, name


def _planted(change):
    current = copy.deepcopy(schema.current_form())
    change(current)
    return schema.version_problems(schema.load_versions(), schema.SCHEMA_VERSION, current)


def test_an_added_column_without_a_bump_fails():
    problems = _planted(lambda c: c["trial"].append(["core.new_metric", "double"]))
    assert len(problems) == 1 and "core.new_metric:double" in problems[0] and "bump SCHEMA_VERSION" in problems[0]


def test_a_retyped_or_dropped_column_without_a_bump_fails():
    def retype(c):
        c["trial"] = [[n, "int64" if n == "trainer.lr" else t] for n, t in c["trial"]]

    assert any("trainer.lr" in p for p in _planted(retype))
    assert any("letter" in p for p in _planted(lambda c: c["per_letter"].pop(3)))


def _next(version, major_bump=False):
    major, minor = map(int, version.split("."))
    return f"{major + 1}.0" if major_bump else f"{major}.{minor + 1}"


def test_minor_bump_may_only_add_and_version_must_be_newest():
    versions = schema.load_versions()
    cur = schema.current_form()
    v, minor, new_major = schema.SCHEMA_VERSION, _next(schema.SCHEMA_VERSION), _next(schema.SCHEMA_VERSION, True)
    added = copy.deepcopy(cur)
    added["trial"].append(["core.x", "double"])
    assert schema.version_problems({**versions, minor: added}, minor, added) == []
    dropped = copy.deepcopy(cur)
    dropped["trial"].pop()
    problems = schema.version_problems({**versions, minor: dropped}, minor, dropped)
    assert any(f"minor bump of {v}" in p for p in problems)
    assert schema.version_problems({**versions, new_major: dropped}, new_major, dropped) == []
    assert any("older than the newest" in p for p in schema.version_problems({**versions, minor: added}, v, cur))
    assert any("not frozen" in p for p in schema.version_problems(versions, _next(minor), cur))


def test_every_frozen_minor_only_added_columns():
    versions = schema.load_versions()
    assert schema.version_problems(versions, schema.SCHEMA_VERSION, schema.current_form()) == []
    assert "1.0" in versions and schema.SCHEMA_VERSION in versions


def test_freeze_refuses_to_rewrite_a_frozen_version(tmp_path, monkeypatch):
    path = tmp_path / "versions.json"
    path.write_text(schema._dump(schema.load_versions()))
    assert schema._freeze(path) == 0  # unchanged: a no-op
    monkeypatch.setattr(schema, "PER_LETTER_COLUMNS", schema.PER_LETTER_COLUMNS + [schema.Column("x", pa.int64(), "x")])
    before = path.read_text()
    assert schema._freeze(path) == 2 and path.read_text() == before
    major_v, minor_v = schema.SCHEMA_VERSION.split(".")
    next_minor = f"{major_v}.{int(minor_v) + 1}"
    monkeypatch.setattr(schema, "SCHEMA_VERSION", next_minor)
    assert schema._freeze(path) == 0 and set(schema.load_versions(path)) == {*schema.load_versions(), next_minor}


def test_a_minor_bump_may_widen_int64_to_double_only():
    versions = schema.load_versions()
    base = copy.deepcopy(versions["1.0"])
    widened = copy.deepcopy(base)
    widened["trial"] = [[n, "double" if n == "sae.d_in" else t] for n, t in widened["trial"]]
    assert schema.version_problems({"1.0": base, "1.1": widened}, "1.1", widened) == []
    narrowed = copy.deepcopy(base)
    narrowed["trial"] = [[n, "int64" if n == "trainer.lr" else t] for n, t in narrowed["trial"]]
    assert any("trainer.lr" in p for p in schema.version_problems({"1.0": base, "1.1": narrowed}, "1.1", narrowed))
    assert dict(map(tuple, versions["1.0"]["trial"]))["sae.k"] == "int64"
    assert dict(map(tuple, versions["1.1"]["trial"]))["sae.k"] == "double"
