"""Config reading: every error names the file, the dotted key and the reason."""

from __future__ import annotations

import pytest

from core import config
from core.errors import ConfigError


def _load(tmp_path, text: str) -> config.Table:
    p = tmp_path / "c.toml"
    p.write_text(text)
    return config.load(p)


def test_errors_name_file_key_reason(tmp_path) -> None:
    t = _load(tmp_path, '[a]\nn = "x"\nflag = 1\n[[src]]\nname = 3\n')
    a = t.table("a")
    with pytest.raises(ConfigError) as e:
        a.int("n")
    assert e.value.file.endswith("c.toml") and e.value.key == "a.n" and "integer" in e.value.reason
    with pytest.raises(ConfigError, match=r"a\.flag: must be true or false"):
        a.bool("flag")
    with pytest.raises(ConfigError, match=r"src\[0\]\.name: must be a string"):
        t.tables("src")[0].str("name")
    with pytest.raises(ConfigError, match=r"a\.missing: is required"):
        a.str("missing")


def test_unknown_keys_are_refused(tmp_path) -> None:
    t = _load(tmp_path, "[a]\nknown = 1\ntypo = 2\n")
    a = t.table("a")
    a.int("known")
    with pytest.raises(ConfigError, match=r"a\.typo: unknown key"):
        a.done()


def test_bounds_and_choices(tmp_path) -> None:
    t = _load(tmp_path, 'n = 0\nmode = "fast"\n')
    with pytest.raises(ConfigError, match="at least 1"):
        t.int("n", min=1)
    with pytest.raises(ConfigError, match="one of"):
        t.str("mode", choices=("safe",))


def test_unparseable_missing_and_binary_files(tmp_path) -> None:
    with pytest.raises(ConfigError, match="not valid TOML"):
        _load(tmp_path, "[a\n")
    with pytest.raises(ConfigError, match="does not exist"):
        config.load(tmp_path / "none.toml")
    p = tmp_path / "bin.toml"
    p.write_bytes(b"\xff\xfe")
    with pytest.raises(ConfigError, match="UTF-8"):
        config.load(p)


def test_relative_paths_are_relative_to_the_file(tmp_path) -> None:
    t = _load(tmp_path, 'p = "sub/file"\nq = "/abs"\n')
    assert t.path("p") == tmp_path / "sub" / "file"
    assert str(t.path("q")) == "/abs"
