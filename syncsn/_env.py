"""syncsn's environment variables, read on every layer call.

``os.environ.get`` of a variable that is not set costs about a microsecond in CPython (it
raises and catches a ``KeyError`` inside), and a small layer call reads several, which is a
measurable share of its time. ``os.environ`` keeps its values in a dict keyed by the encoded
names; :func:`get` looks there directly, so a change made through ``os.environ`` (or
pytest's ``monkeypatch.setenv``) is seen at the next call, as with ``os.environ.get``. Where
the mapping is not CPython's, it falls back to ``os.environ.get``.
"""

from __future__ import annotations

import os

__all__ = ["get"]

_environ = os.environ
_data = getattr(_environ, "_data", None)
_encode = getattr(_environ, "encodekey", None)
_decode = getattr(_environ, "decodevalue", None)
_FAST = isinstance(_data, dict) and callable(_encode) and callable(_decode)
_keys: dict[str, object] = {}


def get(name: str, default: str | None = None) -> str | None:
    """``os.environ.get(name, default)``."""
    if not _FAST:
        return _environ.get(name, default)
    key = _keys.get(name)
    if key is None:
        key = _keys[name] = _encode(name)  # type: ignore[misc]
    raw = _data.get(key)  # type: ignore[union-attr]
    return default if raw is None else _decode(raw)  # type: ignore[misc]
