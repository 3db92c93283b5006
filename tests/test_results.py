"""glow.evaluation.result_tables: one file per entry, merged on read; reuse only under the same settings."""

import json
import multiprocessing

from glow.evaluation.result_tables import add_entries, is_done, read_table


def _add(args):
    table, i = args
    add_entries(table, {f"set{i}/test@T=1.0": {"value": i}})


def test_concurrent_writers_lose_nothing(tmp_path):
    table = tmp_path / "fid.json"
    with multiprocessing.get_context("spawn").Pool(4) as pool:
        pool.map(_add, [(table, i) for i in range(16)])
    merged = read_table(table)
    assert merged == {f"set{i}/test@T=1.0": {"value": i} for i in range(16)}
    assert sorted(p.name for p in (tmp_path / "fid.d").iterdir())[0] == "set0%2Ftest%40T%3D1.0.json"
    assert json.loads(table.read_text()).keys() <= merged.keys()


def test_legacy_table_file_is_read(tmp_path):
    table = tmp_path / "bpd.json"
    table.write_text(json.dumps({"a/test": {"mean": 1.0}}))
    add_entries(table, {"b/test": {"mean": 2.0}})
    assert read_table(table) == {"a/test": {"mean": 1.0}, "b/test": {"mean": 2.0}}
    assert json.loads(table.read_text()) == read_table(table)


def test_is_done_compares_settings(tmp_path):
    table = tmp_path / "bpd.json"
    settings = {"seed": 0, "data_root": "/d", "manifest_hash": "abc", "model_hash": "m", "step": 5}
    assert not is_done(table, "a/test", settings)
    add_entries(table, {"a/test": {"mean": 1.0, **settings}})
    assert is_done(table, "a/test", settings)
    for field, other in (("seed", 1), ("data_root", "/e"), ("manifest_hash", "abd"), ("step", 6)):
        assert not is_done(table, "a/test", {**settings, field: other})
