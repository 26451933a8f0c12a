"""Connection profiles: the researcher's settings the fx CLI reads.

A profile is the file ``fx experiment --profile FILE`` (or ``FX_PROFILE``)
reads, holding flat ``key: value`` lines (YAML, without nesting)::

    director: director.example.org:50051
    server_name: director.example.org
    cert: alice.crt
    key: alice.key
    ca: ca.crt
    timeout: 10s

``fx quickstart --keep-running`` writes one for its federation
(``fx-quickstart/profile.yaml``). :func:`load_profile` finds and reads it
the way the CLI does, so a notebook and a terminal reach the same director
with the same certificate:

* the file: the ``path`` given, else ``$FX_PROFILE``, else
  ``~/.config/fx/config.yaml`` (``$XDG_CONFIG_HOME/fx/config.yaml``) if it
  exists, else none;
* each setting: the ``FX_*`` environment variable (``FX_DIRECTOR``,
  ``FX_SERVER_NAME``, ``FX_CERT``, ``FX_KEY``, ``FX_CA``, ``FX_TIMEOUT``),
  else the profile, else the default: ``localhost:50051`` and
  ``pki/researcher/{researcher.crt,researcher.key,ca.crt}``, the layout
  ``scripts/pki-bootstrap.sh`` writes;
* relative paths in the profile are relative to the profile's directory;
  those from the environment and the defaults to the working directory.

It needs no YAML library: the form is parsed here, and anything else (a
nested key, a list, an unknown key, a duration without its unit) is an
:class:`fx.FXError` naming the file, the line and what to write instead.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

from .errors import FXError

PROFILE_ENV = "FX_PROFILE"

# The keys a profile may hold, and the environment variable of each.
KEYS = {
    "director": "FX_DIRECTOR",
    "server_name": "FX_SERVER_NAME",
    "cert": "FX_CERT",
    "key": "FX_KEY",
    "ca": "FX_CA",
    "timeout": "FX_TIMEOUT",
}

DEFAULTS = {
    "director": "localhost:50051",
    "server_name": "",
    "cert": os.path.join("pki", "researcher", "researcher.crt"),
    "key": os.path.join("pki", "researcher", "researcher.key"),
    "ca": os.path.join("pki", "researcher", "ca.crt"),
    "timeout": "10s",
}


@dataclass
class Profile:
    """The settings a :class:`fx.Federation` needs, and where they came from.

    ``path`` is the profile file read, or ``None`` when there was none.
    ``timeout`` is in seconds.
    """

    director: str
    server_name: Optional[str]
    cert: str
    key: str
    ca: str
    timeout: float
    path: Optional[str] = None


def default_profile_path() -> str:
    """``$XDG_CONFIG_HOME/fx/config.yaml``, else ``~/.config/fx/config.yaml``."""
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return os.path.join(base, "fx", "config.yaml")


def profile_path(path: Optional[os.PathLike] = None) -> Optional[str]:
    """The profile to read: ``path``, else ``$FX_PROFILE`` (either must
    exist), else the default one if it exists, else ``None``."""
    named = os.fspath(path) if path is not None else os.environ.get(PROFILE_ENV) or None
    if named is not None:
        if not os.path.isfile(named):
            how = "given" if path is not None else f"named by ${PROFILE_ENV}"
            raise FXError(f"profile {named} ({how}) does not exist"
                          + (" (fx quickstart --keep-running writes WORKDIR/profile.yaml)" if named.endswith("profile.yaml") else ""))
        return named
    default = default_profile_path()
    return default if os.path.isfile(default) else None


def load_profile(path: Optional[os.PathLike] = None) -> Profile:
    """Finds and reads the connection settings as the CLI does (see the
    module's documentation)."""
    found = profile_path(path)
    given: Dict[str, str] = {}
    lines: Dict[str, int] = {}
    if found is not None:
        given, lines = _parse(found)
    settings: Dict[str, str] = {}
    source: Dict[str, str] = {}
    for key, env in KEYS.items():
        if os.environ.get(env):
            settings[key], source[key] = os.environ[env], env
        elif key in given:
            value = given[key]
            if key in ("cert", "key", "ca") and value and not os.path.isabs(value):
                value = os.path.join(os.path.dirname(os.path.abspath(found)), value)
            settings[key], source[key] = value, f"profile {found}, line {lines[key]}"
        else:
            settings[key], source[key] = DEFAULTS[key], "the default"
    return Profile(
        director=settings["director"],
        server_name=settings["server_name"] or None,
        cert=settings["cert"],
        key=settings["key"],
        ca=settings["ca"],
        timeout=parse_duration(settings["timeout"], source["timeout"]),
        path=found,
    )


_LINE = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)[ \t]*:(?:[ \t]+(.*?))?[ \t]*$")


def _parse(path: str) -> Tuple[Dict[str, str], Dict[str, int]]:
    """Reads a profile's ``key: value`` lines; returns the values and the
    line each was on."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise FXError(f"cannot read the profile {path}: {e.strerror or e}") from None
    values: Dict[str, str] = {}
    lines: Dict[str, int] = {}
    for n, raw in enumerate(text.splitlines(), 1):
        line = _strip_comment(raw, path, n).rstrip()
        if not line.strip() or line.strip() == "---":
            continue
        if line[0] in " \t":
            raise FXError(f"profile {path}, line {n}: {raw.strip()!r} is indented: a profile holds flat 'key: value' lines only")
        m = _LINE.match(line)
        if not m:
            raise FXError(f"profile {path}, line {n}: {raw.strip()!r} is not 'key: value'")
        key, value = m.group(1), _unquote(m.group(2) or "", path, n)
        if key not in KEYS:
            raise FXError(f"profile {path}, line {n}: unknown key {key!r} (a profile takes {', '.join(KEYS)})")
        if key in values:
            raise FXError(f"profile {path}, line {n}: {key} is given twice (first on line {lines[key]})")
        if value[:1] in ("[", "{", "&", "*", "|", ">", "!"):
            raise FXError(f"profile {path}, line {n}: {key}: {value!r} is not a plain value (write it as a string)")
        values[key], lines[key] = value, n
    return values, lines


def _strip_comment(line: str, path: str, n: int) -> str:
    """The line without a '#' comment outside quotes."""
    quote = None
    for i, c in enumerate(line):
        if quote:
            if c == quote:
                quote = None
        elif c in "'\"":
            quote = c
        elif c == "#" and (i == 0 or line[i - 1] in " \t"):
            return line[:i]
    if quote:
        raise FXError(f"profile {path}, line {n}: a {quote} quote is not closed")
    return line


def _unquote(value: str, path: str, n: int) -> str:
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
        inner = value[1:-1]
        if value[0] == '"' and "\\" in inner:
            raise FXError(f"profile {path}, line {n}: escapes in double quotes are not supported: use single quotes")
        return inner.replace("''", "'") if value[0] == "'" else inner
    return value


_DURATION = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_UNIT = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(text: str, where: str = "duration") -> float:
    """Seconds in a Go duration such as ``10s``, ``1m30s`` or ``500ms``, as
    the CLI writes and reads them. A number without a unit is refused: the
    CLI refuses it too, as ``10`` could mean seconds or nanoseconds."""
    s = str(text).strip()
    if re.fullmatch(r"[0-9.]+", s):
        raise FXError(f"{where}: timeout {s!r} has no unit: write it as {s}s")
    pos, total = 0, 0.0
    for m in _DURATION.finditer(s):
        if m.start() != pos:
            break
        total += float(m.group(1)) * _UNIT[m.group(2)]
        pos = m.end()
    if pos != len(s) or not s:
        raise FXError(f"{where}: timeout {s!r} is not a duration such as 10s, 1m30s or 500ms")
    if total <= 0:
        raise FXError(f"{where}: timeout {s!r} must be positive")
    return total
