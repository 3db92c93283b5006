"""glow.names: names that become paths are single, safe components; specs parse into two."""

import pytest

from glow.names import check_name, newest_step_dir, parse_spec, step_dir_name, step_of


@pytest.mark.parametrize("name", ["celeba", "fashion-mnist", "gaussian-smooth", "demo_cycle", "run.2", "A1"])
def test_good_names_pass(name):
    assert check_name(name, "run.name") == name


@pytest.mark.parametrize("name", ["", ".", "..", "../x", "/abs", "a/b", "a b", "-flag", ".hidden", "x\n", "a" * 129,
                                  "a;rm", "$HOME", "*"])
def test_hostile_names_refused(name):
    with pytest.raises(ValueError, match="run.name"):
        check_name(name, "run.name")


def test_parse_spec():
    assert parse_spec("svhn/test") == ("svhn", "test")
    for bad in ("svhn", "svhn/", "/test", "a/b/c", "../x/test", "svhn/te st", "svhn/.."):
        with pytest.raises(ValueError):
            parse_spec(bad)


def test_step_dirs(tmp_path):
    assert step_dir_name(12) == "step-00000012" and step_of(tmp_path / "step-00000012") == 12
    assert step_of("step-12") is None and newest_step_dir(tmp_path / "none") is None
    for s in (3, 120, 7):
        (tmp_path / step_dir_name(s)).mkdir()
    (tmp_path / "step-99999999.tmp").mkdir()
    assert newest_step_dir(tmp_path) == tmp_path / "step-00000120"
