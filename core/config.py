"""Reading TOML config files into frozen dataclasses, with errors that name the file, the key and the reason."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

from core.errors import ConfigError

_MISSING: Any = object()
# Table's methods are named after the types they read; these names keep the builtins reachable.
_Str = str
_Bool = bool


class Table:
    """A TOML table that knows where it came from, so every error can say file + dotted key."""

    def __init__(self, data: dict[_Str, Any], file: _Str, prefix: _Str = "") -> None:
        self._data = data
        self.file = file
        self.prefix = prefix
        self._seen: set[_Str] = set()

    def _key(self, key: _Str) -> _Str:
        return f"{self.prefix}{key}"

    def error(self, key: _Str, reason: _Str) -> ConfigError:
        return ConfigError(self.file, self._key(key), reason)

    def has(self, key: _Str) -> _Bool:
        return key in self._data

    def _get(self, key: _Str, default: Any, kind: type | tuple[type, ...], kind_name: _Str) -> Any:
        self._seen.add(key)
        if key not in self._data:
            if default is _MISSING:
                raise self.error(key, "is required")
            return default
        value = self._data[key]
        if isinstance(value, bool) and kind is not bool:
            raise self.error(key, f"must be {kind_name}, not a boolean")
        if not isinstance(value, kind):
            raise self.error(key, f"must be {kind_name}, not {type(value).__name__} {value!r}")
        return value

    def str(self, key: _Str, default: Any = _MISSING, choices: tuple[_Str, ...] = ()) -> Any:
        value = self._get(key, default, _Str, "a string")
        if choices and value not in choices:
            raise self.error(key, f"must be one of {', '.join(choices)}, not {value!r}")
        if value is not None and isinstance(value, _Str) and not value and default is _MISSING:
            raise self.error(key, "must not be empty")
        return value

    def int(
        self, key: _Str, default: Any = _MISSING, min: int | None = None, max: int | None = None
    ) -> Any:
        value = self._get(key, default, int, "an integer")
        if isinstance(value, int):
            if min is not None and value < min:
                raise self.error(key, f"must be at least {min}, not {value}")
            if max is not None and value > max:
                raise self.error(key, f"must be at most {max}, not {value}")
        return value

    def float(self, key: _Str, default: Any = _MISSING, min: float | None = None) -> Any:
        value = self._get(key, default, (int, float), "a number")
        if isinstance(value, (int, float)) and min is not None and value < min:
            raise self.error(key, f"must be at least {min}, not {value}")
        return float(value) if isinstance(value, (int, float)) else value

    def bool(self, key: _Str, default: Any = _MISSING) -> Any:
        return self._get(key, default, bool, "true or false")

    def str_list(self, key: _Str, default: Any = _MISSING) -> Any:
        value = self._get(key, default, list, "a list of strings")
        if isinstance(value, list):
            for i, item in enumerate(value):
                if not isinstance(item, _Str):
                    raise self.error(f"{key}[{i}]", f"must be a string, not {item!r}")
        return value

    def path(self, key: _Str, default: Any = _MISSING, base: Path | None = None) -> Any:
        """A path; relative paths are taken relative to the config file's directory."""
        value = self.str(key, default)
        if not isinstance(value, _Str):
            return value
        p = Path(value)
        if not p.is_absolute():
            p = (base or Path(self.file).parent) / p
        return p

    def table(self, key: _Str, required: _Bool = False) -> Table:
        self._seen.add(key)
        value = self._data.get(key)
        if value is None:
            if required:
                raise self.error(key, "section is required")
            value = {}
        if not isinstance(value, dict):
            raise self.error(key, "must be a table ([section])")
        return Table(value, self.file, f"{self._key(key)}.")

    def tables(self, key: _Str) -> list[Table]:
        self._seen.add(key)
        value = self._data.get(key, [])
        if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
            raise self.error(key, "must be an array of tables ([[" + self._key(key) + "]])")
        return [Table(v, self.file, f"{self._key(key)}[{i}].") for i, v in enumerate(value)]

    def done(self) -> None:
        """Refuse keys nobody read: a typo must not be silently ignored."""
        for key in self._data:
            if key not in self._seen:
                raise self.error(key, "unknown key")


def load(path: str | Path) -> Table:
    p = Path(path)
    try:
        data = tomllib.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(str(p), "", "file does not exist") from None
    except PermissionError:
        raise ConfigError(str(p), "", "file is not readable") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(
            str(p), "", f"not UTF-8 text ({exc.reason} at byte {exc.start})"
        ) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(str(p), "", f"not valid TOML: {exc}") from None
    return Table(data, str(p))
