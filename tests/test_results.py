"""glow.evaluation.result_tables: one file per entry, merged on read; reuse only under the same settings."""

import json
import multiprocessing

from glow.evaluation.records import Result
from glow.evaluation.result_tables import add_entries, read_table, table_entry


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


def test_the_skip_rule_compares_every_setting(tmp_path):
    table = tmp_path / "bpd.json"
    settings = {"seed": 0, "data_root": "/d", "manifest_hash": "abc", "model_hash": "m", "step": 5}

    def result(wanted):
        return Result("bpd a/test", wanted, lambda: table_entry(table, "a/test"))

    assert not result(settings).done()
    add_entries(table, {"a/test": {"mean": 1.0, **settings}})
    assert result(settings).done()
    for field, other in (("seed", 1), ("data_root", "/e"), ("manifest_hash", "abd"), ("step", 6), ("model_hash", "n")):
        assert not result({**settings, field: other}).done()


def test_unreadable_entries_are_ignored_not_fatal(tmp_path):
    """A planted entry (a link to /dev/zero or to a colleague's file) is ignored: the result is
    recomputed and nothing is read through the link."""
    table = tmp_path / "bpd.json"
    add_entries(table, {"a/test": {"mean": 1.0}})
    (tmp_path / "bpd.d" / "b%2Ftest.json").symlink_to("/dev/zero")
    (tmp_path / "bpd.d" / "c%2Ftest.json").symlink_to(table)
    assert read_table(table) == {"a/test": {"mean": 1.0}}
