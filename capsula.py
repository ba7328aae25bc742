#!/usr/bin/env python3
"""Capture the context of a command or function run, and reproduce it later.

One module, standard library only; copy it into a repository and run it as
``python capsula.py``. The sections, in dependency order
(``grep -n '^# ===' capsula.py`` prints them):

    Errors          CapsulaError and its subclasses, each with an exit code
    Utilities       clocks, JSON helpers, atomic writes, hashing, redaction
    Configuration   capsula.toml / [tool.capsula]: discovery and validation
    Collectors      platform, environment, git, files, CPU, packages, commands
    Vault           capsule directories and the files inside them
    Capture         the context of a run, written as context.json
    Monitor         running a command: live tee, signals, exit codes
    Decorator       @capsula.monitor for Python functions
    Reproduce       list, show, diff, verify, rerun and find capsules
    CLI             the argparse front end and main()
"""

from __future__ import annotations

import collections
import contextlib
import contextvars
import errno
import functools
import json
import os
import re
import signal
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

# Modules that only some commands need (subprocess, hashlib, tomllib, platform, shutil,
# difflib, datetime, threading ...) are imported where they are used, and `typing` only
# by type checkers: `import capsula` stays cheap (benchmarks/run.py holds it to 25 ms
# above a bare interpreter start), and so does `capsula monitor` (at most 4x that start).
TYPE_CHECKING = False  # typing.TYPE_CHECKING, which type checkers read as True

if TYPE_CHECKING:
    import datetime
    from typing import Any, NamedTuple, NoReturn, TypeVar

    JSON = Any  # what json.loads returns; kept loose on purpose
    F = TypeVar("F", bound=Callable[..., Any])
    T = TypeVar("T")
else:

    class _NamedTupleMeta(type):
        """typing.NamedTuple's class syntax, built on collections.namedtuple."""

        def __new__(cls, name: str, bases: tuple[type, ...], body: dict[str, object]) -> type:
            if not bases:
                return super().__new__(cls, name, bases, body)
            fields = list(body.get("__annotations__", {}))
            base = collections.namedtuple(name, fields, defaults=[body[f] for f in fields if f in body])
            rest = {k: v for k, v in body.items() if k not in fields and k != "__annotations__"}
            return type(name, (base,), {**rest, "__slots__": ()})

    class NamedTuple(metaclass=_NamedTupleMeta):
        pass


__all__ = [
    "CapsulaError", "CaptureError", "Config", "ConfigError", "FileSpec", "VaultError",
    "capture", "cli", "get_capsule_dir", "load_config", "main", "monitor",
]  # fmt: skip
__version__ = "0.1.0"


# =============================================================================
# Errors
# =============================================================================


class CapsulaError(Exception):
    """A failure the user can act on: printed as one line, never a traceback."""

    exit_code = 1

    def __init__(self, message: str) -> None:
        # One line whatever a key, path or command's stderr holds.
        super().__init__(message.replace("\r", "\\r").replace("\n", "\\n"))


class ConfigError(CapsulaError):
    """The configuration (or a command-line argument) is invalid."""

    exit_code = 2


class CaptureError(CapsulaError):
    """Capturing the context failed (for example a pre-capture command)."""


class VaultError(CapsulaError):
    """The vault or a capsule in it cannot be read or written."""


class Interrupted(BaseException):
    """A signal (SIGINT, SIGTERM, SIGHUP) arrived while Capsula was working."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


# =============================================================================
# Utilities
# =============================================================================

TEXT_LIMIT = 1 << 20  # bytes of stdout/stderr/command output kept inline in JSON
UNTRACKED_LIMIT = 10 << 20  # bytes: larger untracked files are listed, not diffed
REDACTED = "<redacted>"
DEFAULT_SECRET_PATTERNS = (
    "TOKEN", "SECRET", "PASSWORD", "PASSWD", "API_KEY", "APIKEY", "ACCESS_KEY", "PRIVATE", "CREDENTIAL",
)  # fmt: skip


def now() -> datetime.datetime:
    """The current time, aware, in the local time zone (as 0.0.19 did)."""
    import datetime

    return datetime.datetime.now(datetime.UTC).astimezone()


def iso_duration(seconds: float) -> str:
    """Format a duration as ISO 8601, as 0.0.19 did: ``PT2.486653S``."""
    days, rest = divmod(max(seconds, 0.0), 86400)
    text = f"{rest:.6f}".rstrip("0").rstrip(".")
    return f"P{int(days)}DT{text}S" if days else f"PT{text}S"


def jsonable(value: object, *, _seen: frozenset[int] = frozenset()) -> JSON:
    """Convert a value to something json.dumps accepts; what it cannot hold becomes repr."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if value == value and value not in (float("inf"), float("-inf")) else repr(value)
    if id(value) in _seen:
        return "<recursive reference>"
    seen = _seen | {id(value)}
    if isinstance(value, (list, tuple)):
        return [jsonable(v, _seen=seen) for v in value]
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return {k: jsonable(v, _seen=seen) for k, v in value.items()}
    if isinstance(value, Path):
        return str(value)
    return safe_repr(value)


def safe_repr(value: object) -> str:
    """repr() that never raises and never grows without bound."""
    try:
        text = repr(value)
    except BaseException as exc:  # noqa: BLE001 - a broken __repr__ must not crash a run
        text = f"<{type(value).__name__} object; repr() raised {type(exc).__name__}>"
    return text if len(text) <= 10_000 else text[:10_000] + "...<cut>"


def in_background(fn: Callable[[], T]) -> Callable[[], T]:
    """Start fn in a thread now; the returned callable waits for it and gives its result
    (or raises its exception). For work that waits on a process or a disk."""
    import threading

    box: list[tuple[bool, Any]] = []

    def target() -> None:
        try:
            box.append((True, fn()))
        except BaseException as exc:  # noqa: BLE001 - handed to the caller by join()
            box.append((False, exc))

    thread = threading.Thread(target=target, daemon=True)
    thread.start()

    def join() -> T:
        thread.join()
        ok, value = box[0]
        if not ok:
            raise value
        return value  # type: ignore[no-any-return]

    return join


def _write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while len(view):
        view = view[os.write(fd, view) :]


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write a file so that readers see the old file or the whole new one, never a part."""
    import _thread  # the low-level module: threading costs an import for one thread id

    tmp = path.with_name(f".{path.name}.{os.getpid()}.{_thread.get_ident()}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the umask applies
        with open(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException as exc:  # a signal mid-write too: never leave the temporary file
        with contextlib.suppress(OSError):
            tmp.unlink()
        if isinstance(exc, OSError):
            raise VaultError(f"cannot write {path}: {user_error_text(exc)}; check free space and permissions") from exc
        raise


def write_json(path: Path, data: JSON) -> None:
    """Write JSON atomically, indented as 0.0.19 wrote it."""
    try:
        text = json.dumps(data, indent=4, ensure_ascii=False).encode()
    except UnicodeEncodeError:  # non-UTF-8 file names or values: escaped, so they round-trip
        text = json.dumps(data, indent=4).encode()
    write_bytes_atomic(path, text + b"\n")


def read_json(path: Path) -> JSON:
    """Read a JSON file; None when it is missing or not valid JSON (an old or broken capsule)."""
    try:
        return json.loads(path.read_bytes())
    except (OSError, ValueError):
        return None


def normalize_hash_name(name: str) -> str:
    """Map 0.0.19's names (``sha3`` is sha3-256) onto hashlib's."""
    name = name.lower().replace("-", "_")
    return "sha3_256" if name == "sha3" else name


def hash_file(path: Path, algorithm: str) -> str:
    """Hash a file in constant memory."""
    import hashlib

    with open(path, "rb") as f:
        return hashlib.file_digest(f, normalize_hash_name(algorithm)).hexdigest()


def is_secret_name(name: str, patterns: Sequence[str]) -> bool:
    """Whether a variable or option name looks like it holds a credential."""
    upper = name.upper().replace("-", "_")
    return any(p.upper().replace("-", "_") in upper for p in patterns)


def redact_args(args: Sequence[str], patterns: Sequence[str], allow: Sequence[str]) -> list[str]:
    """Redact the values of options whose names look secret (``--token X``, ``--password=X``)."""
    out: list[str] = []
    redact_next = False
    for arg in args:
        if redact_next:
            out.append(REDACTED)
            redact_next = False
            continue
        name, eq, _ = arg.partition("=")
        secret = arg.startswith("-") and name not in allow and is_secret_name(name.lstrip("-"), patterns)
        if secret and eq:
            out.append(f"{name}={REDACTED}")
        else:
            out.append(arg)
            redact_next = secret
    return out


_URL_USERINFO = re.compile(r"^(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)(?P<user>[^@/]*)@")


def strip_credentials(url: str) -> str:
    """Drop passwords and tokens from a remote URL; keep the ssh user (``ssh://git@host``)."""
    match = _URL_USERINFO.match(url)
    if match:
        user = match["user"].split(":", 1)[0]
        keep = match["scheme"].startswith("ssh") and ":" not in match["user"]
        url = match["scheme"] + (f"{user}@" if keep else "") + url[match.end() :]
    return url.split("?", 1)[0].split("#", 1)[0] if "://" in url else url


def user_error_text(exc: OSError) -> str:
    return exc.strerror or str(exc)


# =============================================================================
# Configuration
# =============================================================================

CONFIG_NAME = "capsula.toml"


class FileSpec(NamedTuple):
    """One entry of ``[capture.files]`` or ``[monitor.item.NAME.files]``."""

    path: str
    hash: str | None = "sha256"
    copy: bool = False
    move: bool = False

    def as_dict(self) -> dict[str, JSON]:
        return {"hash": self.hash, "copy": self.copy, "move": self.move}


class Config(NamedTuple):
    """The effective configuration: every key has a default."""

    root: Path
    source: Path | None = None
    vault_directory: str = "vault"
    capsule_template: str = "%Y%m%d_%H%M%S"
    include_cpu: bool = False
    include_packages: bool = False
    pre_capture_commands: tuple[str, ...] = ()
    environment_variables: tuple[str, ...] = ()
    files: tuple[FileSpec, ...] = ()
    git_repositories: tuple[tuple[str, str], ...] | None = None  # None: the root's repository
    items: Mapping[str, tuple[FileSpec, ...]] = {}  # never mutated
    secret_patterns: tuple[str, ...] = DEFAULT_SECRET_PATTERNS
    secret_allow: tuple[str, ...] = ()
    redact_arguments: bool = True

    @property
    def vault(self) -> Path:
        return self.root / self.vault_directory

    def as_dict(self) -> dict[str, JSON]:
        """The settings a capsule records, so that verify and rerun can use them later
        (the items are recorded with each run that names them)."""
        settings = {k: v for k, v in self._asdict().items() if k not in ("root", "items")}
        return {
            **settings,
            "source": str(self.source or "") or None,
            "files": {f.path: f.as_dict() for f in self.files},
        }


_STR_LIST = "list of strings"
_FILE_SCHEMA: dict[str, Any] = {"hash": str, "copy": bool, "move": bool}
_SCHEMA: dict[str, Any] = {
    "capture": {
        "vault-directory": str,
        "capsule-template": str,
        "include-cpu": bool,
        "include-packages": bool,
        "pre-capture-commands": _STR_LIST,
        "environment-variables": _STR_LIST,
        "files": {"*": _FILE_SCHEMA},
        "git": {"repositories": {"*": str}},
    },
    "monitor": {"item": {"*": {"files": {"*": _FILE_SCHEMA}}}},
    "redact": {"patterns": _STR_LIST, "allow": _STR_LIST, "arguments": bool},
}
_TYPE_NAMES = {str: "a string", bool: "true or false", _STR_LIST: "a list of strings"}


def _check_schema(raw: Mapping[str, Any], schema: Mapping[str, Any], *, where: str, source: str) -> None:
    """Reject unknown keys (with a "did you mean") and values of the wrong type."""
    for key, value in raw.items():
        path = f"{where}.{key}" if where else key
        expected = schema.get(key, schema.get("*"))
        if expected is None:
            import difflib

            close = difflib.get_close_matches(key, [k for k in schema if k != "*"], n=1)
            hint = f"did you mean '{close[0]}'?" if close else f"allowed: {', '.join(k for k in schema)}"
            raise ConfigError(f"unknown key '{path}' in {source}; {hint}")
        if isinstance(expected, dict):
            if not isinstance(value, dict):
                raise ConfigError(f"'{path}' in {source} must be a table, got {_describe(value)}")
            _check_schema(value, expected, where=path, source=source)
        elif expected == _STR_LIST:
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise ConfigError(f"'{path}' in {source} must be a list of strings, got {_describe(value)}")
        elif type(value) is not expected:
            raise ConfigError(f"'{path}' in {source} must be {_TYPE_NAMES[expected]}, got {_describe(value)}")


def _describe(value: object) -> str:
    kind = {bool: "a boolean", int: "an integer", float: "a float", str: "a string", list: "an array"}
    return f"{kind.get(type(value), type(value).__name__)} ({safe_repr(value)[:60]})"


def _file_specs(raw: Mapping[str, Any], *, where: str, source: str, root: Path) -> tuple[FileSpec, ...]:
    specs = []
    for path, entry in raw.items():
        spec = FileSpec(path=path, **{k: entry[k] for k in ("hash", "copy", "move") if k in entry})
        key = f"'{where}.\"{path}\"' in {source}"
        if spec.copy and spec.move:
            raise ConfigError(f"{key} sets both copy and move; choose one of them")
        if spec.hash is not None:
            name = normalize_hash_name(spec.hash)
            if not _hash_usable(name):
                allowed = "md5, sha1, sha256, sha3, sha512, blake2b, ..."
                raise ConfigError(f"{key} has unknown hash algorithm '{spec.hash}'; use one of {allowed}")
            spec = spec._replace(hash=name)
        if not path or "\0" in path:
            raise ConfigError(f"{key} is not a valid path; name a file relative to the root")
        if (spec.copy or spec.move) and not _is_inside(root / path, root):
            raise ConfigError(f"{key} lies outside the root {root}; only files inside it can be copied or moved")
        specs.append(spec)
    return tuple(specs)


def _hash_usable(name: str) -> bool:
    import hashlib

    if name not in hashlib.algorithms_available or name.startswith("shake"):
        return False
    try:
        hashlib.new(name)
    except ValueError:  # listed, but refused by this OpenSSL (e.g. ripemd160 on OpenSSL 3)
        return False
    return True


def _is_inside(path: Path, root: Path) -> bool:
    return os.path.normpath(root / path).startswith(os.path.normpath(root) + os.sep)


def _check_template(template: str, *, source: str) -> None:
    try:
        name = now().strftime(template)
    except ValueError as exc:
        raise ConfigError(f"'capture.capsule-template' in {source} is invalid: {exc}") from exc
    if not name or name in (".", "..") or "/" in name or os.sep in name or "\0" in name or name.startswith("."):
        raise ConfigError(
            f"'capture.capsule-template' in {source} makes the name {name!r}, which is not one directory "
            "name; use strftime codes without '/' or a leading '.', e.g. '%Y%m%d_%H%M%S'"
        )


def _find_git_top(path: Path) -> Path | None:
    """The work tree that contains path, found as git finds it (a .git file or directory)."""
    for d in (path, *path.parents):
        if (d / ".git").exists():
            return d
    return None


def parse_config(raw: Mapping[str, Any], *, root: Path, source: Path | None) -> Config:
    """Validate a parsed TOML table (the 0.0.19 format) and build the effective Config."""
    where = str(source) if source else "the configuration"
    _check_schema(raw, _SCHEMA, where="", source=where)
    cap: Mapping[str, Any] = raw.get("capture", {})
    red: Mapping[str, Any] = raw.get("redact", {})
    template = cap.get("capsule-template", "%Y%m%d_%H%M%S")
    _check_template(template, source=where)
    vault = cap.get("vault-directory", "vault")
    if not vault or "\0" in vault:
        raise ConfigError(f"'capture.vault-directory' in {where} is empty; name a directory, e.g. 'vault'")
    repos = None
    if "git" in cap:
        repos = tuple(cap["git"].get("repositories", {}).items())
        for name, rel in repos:
            key = f"'capture.git.repositories.{name}' in {where}"
            if not name or name.startswith(".") or "/" in name or os.sep in name or "\0" in name + rel:
                raise ConfigError(f"{key}: the name must be a plain file name (it names {name}.diff)")
            if not (root / rel).is_dir() or _find_git_top((root / rel).resolve()) is None:
                raise ConfigError(
                    f"{key}: '{rel}' is not a git repository; give a path (relative to {root}) inside one"
                )
    items = {
        name: _file_specs(item.get("files", {}), where=f"monitor.item.{name}.files", source=where, root=root)
        for name, item in raw.get("monitor", {}).get("item", {}).items()
    }
    return Config(
        root=root,
        source=source,
        vault_directory=vault,
        capsule_template=template,
        include_cpu=cap.get("include-cpu", False),
        include_packages=cap.get("include-packages", False),
        pre_capture_commands=tuple(cap.get("pre-capture-commands", ())),
        environment_variables=tuple(cap.get("environment-variables", ())),
        files=_file_specs(cap.get("files", {}), where="capture.files", source=where, root=root),
        git_repositories=repos,
        items=items,
        secret_patterns=tuple(red.get("patterns", DEFAULT_SECRET_PATTERNS)),
        secret_allow=tuple(red.get("allow", ())),
        redact_arguments=red.get("arguments", True),
    )


def _parse_toml(path: Path, text: bytes) -> dict[str, Any]:
    import tomllib

    try:
        return tomllib.loads(text.decode())
    except tomllib.TOMLDecodeError as exc:
        # tomllib says "... (at line 3, column 7)": keep it, it is where to look.
        raise ConfigError(f"invalid TOML in {path}: {exc}; fix the syntax there") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"invalid TOML in {path}: not UTF-8 ({exc.reason}); save it as UTF-8") from exc


def _parsed_cache_path(path: Path, text: bytes) -> Path:
    """Where the tables parsed from a config file are kept: in the .cache of the vault
    the text names (found by a plain search; a wrong guess only costs a parse)."""
    import zlib

    named = re.search(rb'^[ \t]*vault-directory[ \t]*=[ \t]*"([^"\\\n]+)"', text, re.MULTILINE)
    vault = path.parent / (os.fsdecode(named[1]) if named else "vault")
    return vault / ".cache" / f"config-{zlib.crc32(os.fsencode(path)):08x}.json"


class ConfigText(NamedTuple):
    """A config file's Capsula tables (None: a pyproject.toml without [tool.capsula]), and
    its text when it had to be parsed (None when the vault's cache had the same text)."""

    table: dict[str, Any] | None
    parsed: bytes | None = None

    @classmethod
    def read(cls, path: Path) -> ConfigText:
        """Importing tomllib costs more than all the rest `capsula monitor` does before the
        command starts, so the parse of a config is kept in the vault next to the exact
        text it came from, and used only while the file holds that same text."""
        pyproject = path.name == "pyproject.toml"
        try:
            text = path.read_bytes()
        except OSError as exc:
            if pyproject:
                return cls(None)
            raise ConfigError(f"cannot read {path}: {user_error_text(exc)}") from exc
        if pyproject and b"capsula" not in text:  # skip other projects' files, broken or not
            return cls(None)
        cached = read_json(_parsed_cache_path(path, text))
        with contextlib.suppress(UnicodeDecodeError, TypeError, KeyError):
            if cached["path"] == str(path) and cached["text"] == text.decode():
                return cls(cached["table"])
        table: Any = _parse_toml(path, text)
        if pyproject:
            table = table.get("tool", {}).get("capsula")
            if table is not None and not isinstance(table, dict):
                raise ConfigError(f"'tool.capsula' in {path} must be a table")
        return cls(table, text)

    def keep(self, path: Path, vault: Path) -> None:
        """Keep a fresh parse, once the config proved valid and its vault exists."""
        if self.parsed is None or not vault.is_dir():
            return
        cache = _parsed_cache_path(path, self.parsed)
        if cache.parent.parent != vault:  # the text names its vault in a way the search missed
            return
        with contextlib.suppress(OSError, CapsulaError, TypeError, ValueError):  # TOML dates: not JSON
            cache.parent.mkdir(exist_ok=True)
            write_json(cache, {"path": str(path), "text": self.parsed.decode(), "table": self.table})


def _config_in(folder: Path) -> tuple[Path, ConfigText] | None:
    """The config file in one folder (capsula.toml first) and its Capsula tables."""
    for name in (CONFIG_NAME, "pyproject.toml"):
        candidate = folder / name
        if candidate.is_file():
            found = ConfigText.read(candidate)
            if found.table is not None:
                return candidate, found
    return None


def find_config(start: Path) -> tuple[Path, ConfigText] | None:
    """The nearest capsula.toml, or pyproject.toml with [tool.capsula], from start upward."""
    for folder in (start, *start.parents):
        found = _config_in(folder)
        if found:
            return found
    return None


def load_config(directory: str | os.PathLike[str] | None = None, *, cwd: Path | None = None) -> Config:
    """Find and load the configuration.

    With ``directory`` (``-C``): the config file in it (or the file itself), else defaults
    rooted there. Without: the nearest config upward from ``cwd``, else defaults rooted at
    the enclosing git work tree or ``cwd``.
    """
    cwd = Path(cwd or os.getcwd()).absolute()
    if directory is not None:
        given = (cwd / directory).absolute()
        if given.is_file():
            found: tuple[Path, ConfigText] | None = (given, ConfigText.read(given))
        elif given.is_dir():
            found = _config_in(given)
        else:
            raise ConfigError(f"no such directory: {given}; pass -C the folder that holds {CONFIG_NAME}")
        root = found[0].parent if found else given
    else:
        found = find_config(cwd)
        root = found[0].parent if found else (_find_git_top(cwd) or cwd)
    if not found:
        return parse_config({}, root=root, source=None)
    source, text = found
    config = parse_config(text.table or {}, root=root, source=source)
    text.keep(source, config.vault)
    return config


# =============================================================================
# Collectors
# =============================================================================


def spawn(args: Sequence[str], *, env: Mapping[str, str], fds: Sequence[int | None], new_group: bool = False) -> int:
    """Start a program, searched on the PATH of ``env`` as subprocess does, with ``fds`` as
    its stdin, stdout and stderr (None: ours); return its pid. posix_spawn neither forks
    this process nor needs `subprocess`, whose import alone costs more than a git call.
    SIGPIPE and SIGXFSZ are back to their defaults in the program, as subprocess does."""
    name = args[0]
    paths = [name] if os.sep in name else [os.path.join(d, name) for d in os.get_exec_path(env)]
    actions = [(os.POSIX_SPAWN_DUP2, fd, target) for target, fd in enumerate(fds) if fd is not None]
    options: dict[str, Any] = {"file_actions": actions, "setsigdef": (signal.SIGPIPE, signal.SIGXFSZ)}
    if new_group:
        options["setpgroup"] = 0
    error: OSError | None = None
    for path in paths:
        if not os.path.exists(path):
            continue
        try:
            return os.posix_spawn(path, list(args), env, **options)
        except (FileNotFoundError, NotADirectoryError):
            continue
        except OSError as exc:  # e.g. not executable: as execvp, try the rest of PATH first
            error = error or exc
    raise error or FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), name)


def _read_back(fd: int) -> bytes:
    chunks, offset = [], 0
    while chunk := os.pread(fd, 1 << 24, offset):
        chunks.append(chunk)
        offset += len(chunk)
    return b"".join(chunks)


Finish = Callable[[], tuple[int, bytes, bytes]]  # waits for a started process: (exit code, stdout, stderr)
Runner = Callable[..., Finish]  # start_process, or what a test passes instead


def start_process(args: Sequence[str], *, env: Mapping[str, str], stdin: bytes | None = None) -> Finish:
    """The one place collectors start a program (tests may pass another runner): it starts
    now, and the returned callable waits for it (call it: it reaps the program). The output
    goes to in-memory files, not pipes: nothing has to be read while the program runs, so
    independent programs overlap without threads."""
    if not hasattr(os, "memfd_create"):  # not Linux: subprocess's pipes, read while waiting
        import subprocess

        pipe = subprocess.PIPE
        proc = subprocess.Popen(args, env=env, stdin=pipe if stdin else subprocess.DEVNULL, stdout=pipe, stderr=pipe)

        def communicate() -> tuple[int, bytes, bytes]:
            out, err = proc.communicate(stdin)
            return proc.returncode, out, err

        return communicate
    files: list[int] = []
    try:
        files += [os.memfd_create("capsula-out"), os.memfd_create("capsula-err")]
        files.append(os.memfd_create("capsula-in") if stdin else os.open(os.devnull, os.O_RDONLY))
        if stdin:
            _write_all(files[2], stdin)
            os.lseek(files[2], 0, os.SEEK_SET)
        pid = spawn(args, env=env, fds=(files[2], files[0], files[1]))
    except BaseException:
        for fd in files:
            os.close(fd)
        raise
    os.close(files.pop())

    def finish() -> tuple[int, bytes, bytes]:
        try:
            _, status = os.waitpid(pid, 0)
            return os.waitstatus_to_exitcode(status), _read_back(files[0]), _read_back(files[1])
        finally:
            for fd in files:
                os.close(fd)
            files.clear()

    return finish


def wait_all(waits: Sequence[Callable[[], bytes]]) -> list[bytes]:
    """Wait for every started program, then raise the first failure, if any."""
    results, errors = [], []
    for wait in waits:
        try:
            results.append(wait())
        except Exception as exc:  # noqa: BLE001 - raised below, once all are reaped
            errors.append(exc)
    if errors:
        raise errors[0]
    return results


def warn(message: str, warnings: list[str] | None = None) -> None:
    """Tell the user on stderr, and keep the warning for the capsule."""
    print(f"capsula: warning: {message}", file=sys.stderr)
    if warnings is not None:
        warnings.append(message)


def hostname() -> str:
    """The node name, as platform.node() gives it, without importing platform."""
    return os.uname().nodename if hasattr(os, "uname") else os.environ.get("COMPUTERNAME", "")


def read_boot_id() -> str | None:
    """An id that changes at every boot (Linux); None where there is none."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


def _executable_architecture() -> dict[str, str]:
    # platform.architecture() spawns `file`; the ELF magic and the pointer size give
    # the same answer for the running interpreter without a subprocess.
    bits = f"{8 * (sys.maxsize.bit_length() + 1) // 8}bit"
    linkage = ""
    try:
        with open(sys.executable, "rb") as f:
            magic = f.read(4)
        linkage = "ELF" if magic == b"\x7fELF" else ("WindowsPE" if sys.platform == "win32" else "")
    except OSError:
        pass
    return {"bits": bits, "linkage": linkage}


def collect_platform() -> dict[str, JSON]:
    """Platform and Python facts, under 0.0.19's keys. They do not change while the machine
    is up, so the host cache keeps them (platform.processor() spawns `uname -p`)."""
    import platform

    uname = platform.uname()
    build_no, build_date = platform.python_build()
    return {
        "machine": uname.machine,
        "node": uname.node,
        "platform": platform.platform(),
        "release": uname.release,
        "version": uname.version,
        "system": uname.system,
        "processor": uname.processor,
        "python": {
            "executable_architecture": _executable_architecture(),
            "build_no": build_no,
            "build_date": build_date,
            "compiler": platform.python_compiler(),
            "branch": platform.python_branch(),
            "implementation": platform.python_implementation(),
            "version": platform.python_version(),
            "executable": sys.executable,
            "prefix": sys.prefix,
        },
    }


def collect_environment(
    names: Sequence[str], environ: Mapping[str, str], *, patterns: Sequence[str], allow: Sequence[str]
) -> dict[str, str | None]:
    """Chosen variables by name or glob; unset names are null, secret-looking ones redacted."""
    import fnmatch

    out: dict[str, str | None] = {}
    for name in names:
        if any(c in name for c in "*?["):
            matched = sorted(k for k in environ if fnmatch.fnmatchcase(k, name))
        else:
            matched = [name]
        for key in matched:
            value = environ.get(key)
            secret = value is not None and key not in allow and is_secret_name(key, patterns)
            out[key] = REDACTED if secret else value
    return out


def parse_git_status(out: bytes) -> dict[str, JSON]:
    """Parse ``git status --porcelain=v2 --branch -z``: sha, branch, changes, untracked files."""
    sha: str | None = None
    branch: str | None = None
    changed = 0
    untracked: list[str] = []
    records = iter(out.split(b"\0"))
    for rec in records:
        if rec.startswith(b"# branch.oid "):
            sha = None if rec[13:] == b"(initial)" else rec[13:].decode()
        elif rec.startswith(b"# branch.head "):
            branch = None if rec[14:] == b"(detached)" else os.fsdecode(rec[14:])
        elif rec.startswith(b"? "):
            untracked.append(os.fsdecode(rec[2:]))
        elif rec[:2] in (b"1 ", b"2 ", b"u "):
            changed += 1
            if rec.startswith(b"2 "):
                next(records, None)  # a rename carries its original path as one more record
    return {"sha": sha, "branch": branch, "changed": changed, "untracked": untracked}


def _git_start(
    runner: Runner, cwd: Path, *args: str, stdin: bytes | None = None, ok: int = 0, index: Path | None = None
) -> Callable[[], bytes]:
    """Start git now; the returned callable waits for its stdout (CaptureError on failure)."""
    # GIT_DIR & co. from a hook or a wrapper would point git at another repository.
    env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}
    env.update(LC_ALL="C", GIT_OPTIONAL_LOCKS="0", GIT_LITERAL_PATHSPECS="1")
    if index is not None:
        env["GIT_INDEX_FILE"] = str(index)
    finish = runner(["git", "-C", str(cwd), *args], env=env, stdin=stdin)

    def stdout() -> bytes:
        code, out, err = finish()
        if code not in (0, ok):
            msg = err.decode(errors="replace").strip().splitlines()
            raise CaptureError(f"git {args[0]} failed in {cwd}: {msg[-1] if msg else code}")
        return out

    return stdout


def _git(runner: Runner, cwd: Path, *args: str, **options: Any) -> bytes:
    return _git_start(runner, cwd, *args, **options)()


EMPTY_TREE = "4b825dc642cb6eb9a060e54bf8d69288fbee4904"
GIT_DIFF = ("diff", "--binary", "--no-color", "--no-ext-diff", "--no-textconv", "--src-prefix=a/", "--dst-prefix=b/")
GIT_ADD_INTENT = ("add", "--intent-to-add", "--pathspec-from-file=-", "--pathspec-file-nul")


def collect_git(
    name: str, rel: str, *, config: Config, capsule_dir: Path, runner: Runner = start_process
) -> dict[str, JSON]:
    """The state of one repository, and (into ``<capsule_dir>/<name>.diff``) every
    uncommitted change as a patch.

    The patch holds staged and unstaged changes, binary files, and untracked files that are
    not ignored (each up to UNTRACKED_LIMIT), so that ``git apply --binary`` of it on a
    clean checkout of ``sha`` recreates the working tree. The user's index is not touched:
    untracked files are added with --intent-to-add to a copy of it.
    """
    root, diff_path = config.root, capsule_dir / f"{name}.diff"
    path = root / rel
    entry: dict[str, JSON] = {"path": rel, "sha": None, "branch": None, "remotes": []}
    try:
        # Three independent git calls: started together, they overlap.
        status_out, rev_parse, remotes = wait_all(
            [
                _git_start(runner, path, "status", "--porcelain=v2", "--branch", "-z", "--untracked-files=all"),
                _git_start(runner, path, "rev-parse", "--show-toplevel", "--git-path", "index"),
                _git_start(runner, path, "config", "-z", "--get-regexp", r"^remote\..*\.url$", ok=1),  # 1: none
            ]
        )
        status = parse_git_status(status_out)
        top_s, index_s = rev_parse.decode().splitlines()
        top, index = Path(top_s), path / index_s
    except (CaptureError, OSError, ValueError) as exc:
        entry["error"] = str(exc)
        return entry
    entry["sha"], entry["branch"] = status["sha"], status["branch"]
    entry["remotes"] = [
        {"name": key.split(".", 1)[1].rsplit(".", 1)[0], "url": strip_credentials(url)}
        for key, _, url in (rec.decode(errors="replace").partition("\n") for rec in remotes.split(b"\0") if rec)
    ]
    entry["root_in_repo"] = os.path.relpath(root, top)
    inside = os.path.relpath(config.vault, top) + "/"
    gone = {os.path.relpath(os.path.normpath(root / f.path), top) for f in config.files if f.move}
    status["untracked"] = [u for u in status["untracked"] if not (u + "/").startswith(inside) and u not in gone]
    untracked = [u for u in status["untracked"] if _untracked_size(top / u) <= UNTRACKED_LIMIT]
    entry["untracked"] = status["untracked"]
    entry["untracked_not_in_diff"] = sorted(set(status["untracked"]) - set(untracked))
    entry["dirty"] = bool(status["changed"] or status["untracked"])
    entry["diff_file"] = diff_path.name
    try:
        if entry["dirty"]:
            _write_git_diff(runner, top, index, diff_path, base=status["sha"] or EMPTY_TREE, untracked=untracked)
        else:  # nothing to diff: no need to ask git
            write_bytes_atomic(diff_path, b"")
    except (CaptureError, OSError) as exc:
        entry["error"] = f"cannot write {diff_path.name}: {exc}"
    return entry


def _untracked_size(path: Path) -> int:
    try:
        return path.lstat().st_size
    except OSError:
        return 0


def _write_git_diff(
    runner: Runner, top: Path, index: Path, diff_path: Path, *, base: str, untracked: list[str]
) -> None:
    tmp_index = diff_path.with_name(f".{diff_path.name}.index")
    try:
        if untracked:
            if index.exists():
                copy_and_hash(index, tmp_index, None)
            paths = b"\0".join(os.fsencode(u) for u in untracked) + b"\0"
            _git(runner, top, *GIT_ADD_INTENT, stdin=paths, index=tmp_index)
        patch = _git(runner, top, *GIT_DIFF, base, index=tmp_index if untracked else None)
        write_bytes_atomic(diff_path, patch)
    finally:
        with contextlib.suppress(OSError):
            tmp_index.unlink()


def parse_proc_cpuinfo(text: str) -> dict[str, JSON]:
    """py-cpuinfo's keys from /proc/cpuinfo text (the first processor's block)."""
    fields: dict[str, str] = {}
    for line in text.split("\n\n", 1)[0].splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields.setdefault(key.strip(), value.strip())
    info: dict[str, JSON] = {}
    for key, src in (("vendor_id_raw", "vendor_id"), ("brand_raw", "model name")):
        if src in fields:
            info[key] = fields[src]
    for key in ("stepping", "model", "family"):
        src = "cpu family" if key == "family" else key
        if fields.get(src, "").isdigit():
            info[key] = int(fields[src])
    flags = fields.get("flags") or fields.get("Features")
    if flags is not None:
        info["flags"] = sorted(flags.split())
    mhz = float(fields["cpu MHz"]) if re.fullmatch(r"\d+(\.\d+)?", fields.get("cpu MHz", "")) else None
    if mhz is not None:
        info.update(hz_fields("actual", int(mhz * 1e6)))
        advertised = re.search(r"@\s*([\d.]+)\s*GHz", fields.get("model name", ""))
        info.update(hz_fields("advertised", int(float(advertised[1]) * 1e9) if advertised else int(mhz * 1e6)))
    return info


def hz_fields(kind: str, hz: int) -> dict[str, JSON]:
    return {f"hz_{kind}_friendly": f"{hz / 1e9:.4f} GHz", f"hz_{kind}": [hz, 0]}


def read_sysfs_caches(cpu_dir: Path) -> dict[str, JSON]:
    """Cache sizes of one CPU from /sys/devices/system/cpu/cpuN/cache, under py-cpuinfo's keys."""
    info: dict[str, JSON] = {}
    names = {
        ("1", "Data"): "l1_data",
        ("1", "Instruction"): "l1_instruction",
        ("2", "Unified"): "l2",
        ("3", "Unified"): "l3",
    }
    for index in sorted(cpu_dir.glob("index*")):
        try:
            level, kind = (index / "level").read_text().strip(), (index / "type").read_text().strip()
            size = (index / "size").read_text().strip()
        except OSError:
            continue
        prefix = names.get((level, kind))
        if prefix is None:
            continue
        scale = {"K": 1024, "M": 1 << 20, "G": 1 << 30}.get(size[-1:], 1)
        info[f"{prefix}_cache_size"] = int(size.rstrip("KMG")) * scale
        if prefix == "l2":
            for key, src in (("line_size", "coherency_line_size"), ("associativity", "ways_of_associativity")):
                with contextlib.suppress(OSError, ValueError):
                    info[f"l2_cache_{key}"] = int((index / src).read_text())
    return info


_ARCH_NAMES = {"x86_64": "X86_64", "amd64": "X86_64", "i386": "X86_32", "i686": "X86_32", "aarch64": "ARM_8"}
_ARCH_NAMES |= {"arm64": "ARM_8", "ppc64le": "PPC_64", "ppc64": "PPC_64", "riscv64": "RISCV_64", "s390x": "S390X"}


def cpu_from_system() -> dict[str, JSON]:
    """The standard-library fallback for py-cpuinfo: its keys wherever they can be had."""
    import platform

    bits = 8 * (sys.maxsize.bit_length() + 1) // 8
    machine = platform.machine()
    info: dict[str, JSON] = {
        "python_version": f"{'.'.join(map(str, sys.version_info))} ({bits} bit)",
        "cpuinfo_version": None,  # every key py-cpuinfo writes is there; these cannot be had
        "cpuinfo_version_string": None,
        "source": "capsula",
        "arch": _ARCH_NAMES.get(machine.lower(), machine.upper()),
        "bits": bits,
        "count": os.cpu_count(),
        "arch_string_raw": machine,
    }
    with contextlib.suppress(OSError):
        info.update(parse_proc_cpuinfo(Path("/proc/cpuinfo").read_text(errors="replace")))
    info.update(read_sysfs_caches(Path("/sys/devices/system/cpu/cpu0/cache")))
    return info


def current_hz() -> int | None:
    """The current clock of the first CPU, read fresh: it changes while the machine is up."""
    with contextlib.suppress(OSError, ValueError):
        return int(Path("/sys/devices/system/cpu/cpu0/cpufreq/scaling_cur_freq").read_text()) * 1000
    with contextlib.suppress(OSError):
        hz = parse_proc_cpuinfo(Path("/proc/cpuinfo").read_text(errors="replace")).get("hz_actual")
        return int(hz[0]) if isinstance(hz, list) else None
    return None


class HostCache:
    """Facts that do not change while the machine is up, cached in the vault.

    The key holds the host name, the boot id, the interpreter and the py-cpuinfo install,
    so a reboot, another host (on a shared vault) or an upgrade reads them afresh.
    """

    def __init__(self, vault: Path, cpuinfo_stamp: str | None) -> None:
        import zlib  # a checksum is enough for a file name, and cheaper to import than hashlib

        boot = read_boot_id()
        raw = f"{hostname()}|{boot}|{sys.executable}|{sys.version}|{cpuinfo_stamp}"
        self.path = vault / ".cache" / f"host-{zlib.crc32(raw.encode()):08x}.json" if boot else None
        cached = read_json(self.path) if self.path else None
        self.data: dict[str, JSON] = cached if isinstance(cached, dict) and cached.get("key") == raw else {"key": raw}

    def get(self, key: str, compute: Callable[[], JSON]) -> JSON:
        if key not in self.data:
            self.data[key] = compute()
            if self.path is not None:
                with contextlib.suppress(OSError, CapsulaError):
                    self.path.parent.mkdir(exist_ok=True)
                    write_json(self.path, self.data)
        return self.data[key]


def _cpuinfo_stamp() -> str | None:
    """Which py-cpuinfo is installed (its file and mtime: an upgrade changes it), without
    importing it or importlib.metadata; None when it is not."""
    from importlib.util import find_spec

    with contextlib.suppress(ImportError, ValueError, OSError):
        spec = find_spec("cpuinfo")
        if spec is not None and spec.origin:
            return f"{spec.origin}@{os.stat(spec.origin).st_mtime_ns}"
    return None


def collect_cpu(cache: HostCache, *, has_cpuinfo: bool) -> dict[str, JSON]:
    """py-cpuinfo's dict when it is installed (cached per boot), else the fallback; never raises."""
    try:
        info = dict(cache.get("cpu", _cpuinfo_dict)) if has_cpuinfo else cpu_from_system()
    except Exception as exc:  # noqa: BLE001 - CPU facts are optional; record why they are missing
        return {"error": f"{type(exc).__name__}: {exc}"}
    hz = current_hz()
    if hz is not None:
        info.update(hz_fields("actual", hz))
    return info


def _cpuinfo_dict() -> JSON:
    import cpuinfo  # type: ignore[import-not-found,import-untyped,unused-ignore]  # optional: capsula[cpu]

    return dict(cpuinfo.get_cpu_info())


def collect_packages() -> dict[str, JSON]:
    """Installed distributions read in-process: name -> version, and the source of
    direct-URL and editable installs."""
    from importlib import metadata

    out: dict[str, JSON] = {}
    for dist in metadata.distributions():
        name, version = _name_and_version(dist.read_text("METADATA") or dist.read_text("PKG-INFO") or "")
        key = re.sub(r"[-_.]+", "-", name).lower()
        if not name or key in out:  # the first on sys.path wins, as at import time
            continue
        entry: dict[str, JSON] = {"name": name, "version": version}
        direct = dist.read_text("direct_url.json")
        if direct:
            with contextlib.suppress(ValueError, AttributeError):
                data = json.loads(direct)
                entry["source"] = strip_credentials(str(data.get("url", "")))
                entry["editable"] = bool(data.get("dir_info", {}).get("editable", False))
                if "vcs_info" in data:
                    entry["commit"] = data["vcs_info"].get("commit_id")
        out[key] = entry
    return dict(sorted(out.items()))


def _name_and_version(metadata_text: str) -> tuple[str, str]:
    """Name and Version from a METADATA header; dist.metadata would run the email parser
    over every file, the slowest part of an inventory."""
    fields: dict[str, str] = {}
    for line in metadata_text.splitlines():
        if not line:
            break
        key, sep, value = line.partition(": ")
        if sep and key in ("Name", "Version"):
            fields.setdefault(key, value.strip())
    return fields.get("Name", ""), fields.get("Version", "")


def run_pre_capture_command(command: str, *, cwd: Path, env: Mapping[str, str]) -> dict[str, JSON]:
    """Run one pre-capture command through the shell and record all of it."""
    import subprocess

    start = time.perf_counter()
    result = subprocess.run(command, shell=True, cwd=cwd, env=env, capture_output=True, check=False)
    return {
        "command": command,
        "exit_code": result.returncode,
        "stdout": _clip_text(result.stdout),
        "stderr": _clip_text(result.stderr),
        "duration": round(time.perf_counter() - start, 6),
    }


def _clip_text(data: bytes) -> str:
    return data[-TEXT_LIMIT:].decode(errors="replace")


# =============================================================================
# Vault
# =============================================================================

CONTEXT = "context.json"
PRE_RUN = "pre-run-info.json"
POST_RUN = "post-run-info.json"
MANIFEST = "capsule.json"
STDOUT = "stdout.txt"
STDERR = "stderr.txt"
RESERVED = frozenset({CONTEXT, PRE_RUN, POST_RUN, MANIFEST, STDOUT, STDERR})
COPY_CHUNK = 1 << 20


def create_capsule_dir(vault: Path, template: str, when: datetime.datetime) -> Path:
    """Make a new capsule directory; a taken name (same second, another process or host)
    gets a suffix. mkdir is atomic, so two writers never share a capsule."""
    try:
        vault.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise VaultError(
            f"cannot create the vault {vault}: {user_error_text(exc)}; check the path and permissions"
        ) from exc
    base = when.strftime(template)
    for n in range(1, 1_000_000):
        path = vault / (base if n == 1 else f"{base}_{n}")
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue
        except OSError as exc:
            raise VaultError(
                f"cannot create a capsule in {vault}: {user_error_text(exc)}; check permissions and free space"
            ) from exc
    raise VaultError(f"no free capsule name for {base!r} in {vault}")


def stored_name(rel: str, reserved: frozenset[str]) -> str:
    """Where a copied or moved file lives in the capsule: its path relative to the root,
    under _files/ when that would collide with one of Capsula's own files."""
    rel = os.path.normpath(rel)
    return f"_files/{rel}" if rel.split(os.sep, 1)[0] in reserved else rel


def copy_and_hash(src: Path, dest: Path, algorithm: str | None) -> str | None:
    """Copy src to dest through a temporary file, hashing the bytes as they are written:
    the hash is that of the stored copy, and dest is whole or absent."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.part")
    digest = None
    if algorithm:  # a plain copy (git's index) need not load OpenSSL
        import hashlib

        digest = hashlib.new(algorithm)
    try:
        with open(src, "rb") as fin, open(tmp, "xb") as fout:
            buf = bytearray(COPY_CHUNK)
            view = memoryview(buf)
            while n := fin.readinto(buf):
                if digest:
                    digest.update(view[:n])
                fout.write(view[:n])
        st = os.stat(src)
        os.utime(tmp, ns=(st.st_atime_ns, st.st_mtime_ns))  # mode: the user's umask, not the source's
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    return digest.hexdigest() if digest else None


def move_file(src: Path, dest: Path, algorithm: str | None) -> str | None:
    """Move src to dest: a rename on one filesystem; across filesystems a complete copy
    first, and only then the source removed. Never both lost."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.rename(src, dest)
    except OSError as exc:
        if exc.errno != errno.EXDEV:  # another filesystem: copy, then remove
            raise
        file_hash = copy_and_hash(src, dest, algorithm)
        src.unlink()
        return file_hash
    return hash_file(dest, algorithm) if algorithm else None


def capture_file(
    spec: FileSpec, *, root: Path, capsule: Path, reserved: frozenset[str], warnings: list[str]
) -> dict[str, JSON] | None:
    """Hash (and copy or move) one listed file; a missing file is None and a warning."""
    src = root / spec.path
    if not os.path.lexists(src) or src.is_dir():
        warn(f"{spec.path}: {'is a directory' if src.is_dir() else 'no such file'}; recorded as null", warnings)
        return None
    entry: dict[str, JSON] = {"hash_algorithm": spec.hash, "file_hash": None}
    try:
        if src.is_symlink():
            # Recorded as a link and kept as one: never followed out of the root.
            entry["symlink"] = target = os.readlink(src)
            if spec.hash and src.exists() and _is_inside(src.resolve(), root.resolve()):
                entry["file_hash"] = hash_file(src, spec.hash)
            elif spec.hash:
                entry["note"] = "the link points outside the root or nowhere; not hashed"
            if spec.copy or spec.move:
                entry["stored_as"] = name = stored_name(spec.path, reserved)
                (capsule / name).parent.mkdir(parents=True, exist_ok=True)
                os.symlink(target, capsule / name)
                if spec.move:
                    src.unlink()
            return entry
        entry["size"] = src.stat().st_size
        if spec.copy or spec.move:
            name = stored_name(spec.path, reserved)
            entry["file_hash"] = (move_file if spec.move else copy_and_hash)(src, capsule / name, spec.hash)
            entry["stored_as"] = name
            entry["moved" if spec.move else "copied"] = True
        elif spec.hash:
            entry["file_hash"] = hash_file(src, spec.hash)
    except OSError as exc:  # the file exists but could not be stored: the caller fails the capsule
        entry["error"] = user_error_text(exc)
    return entry


def file_errors(files: Mapping[str, JSON]) -> str | None:
    """One line naming the listed files that exist but could not be hashed or stored."""
    bad = [f"{path} ({e['error']})" for path, e in files.items() if isinstance(e, dict) and e.get("error")]
    return f"could not store {', '.join(bad)}" if bad else None


def capture_files(
    specs: Sequence[FileSpec], *, root: Path, capsule: Path, reserved: frozenset[str], warnings: list[str]
) -> dict[str, JSON]:
    return {s.path: capture_file(s, root=root, capsule=capsule, reserved=reserved, warnings=warnings) for s in specs}


def list_capsule_names(vault: Path) -> list[str]:
    try:
        with os.scandir(vault) as it:
            return [e.name for e in it if not e.name.startswith(".") and e.is_dir()]
    except OSError as exc:
        raise VaultError(f"cannot read the vault {vault}: {user_error_text(exc)}; pass --vault or -C") from exc


# =============================================================================
# Capture
# =============================================================================


class Capsule:
    """A capsule being written: its directory, settings and what is known so far."""

    __slots__ = ("config", "context", "manifest", "path", "warnings")

    def __init__(self, *, path: Path, config: Config, manifest: dict[str, JSON] | None = None) -> None:
        self.path = path
        self.config = config
        self.context: dict[str, JSON] = {}
        self.manifest: dict[str, JSON] = manifest or {}
        self.warnings: list[str] = []

    def write_manifest(self, **updates: JSON) -> None:
        """capsule.json: the small summary that `capsula list` reads, kept current."""
        self.manifest.update(updates)
        write_json(self.path / MANIFEST, self.manifest)

    @property
    def reserved(self) -> frozenset[str]:
        git = self.context.get("git") or {}
        return RESERVED | {f"{name}.diff" for name in git}


def default_repositories(root: Path) -> tuple[tuple[str, str], ...]:
    """Without a [capture.git] table: the repository that holds the root, if any."""
    top = _find_git_top(root)
    return ((re.sub(r"[^\w.-]", "_", top.name).lstrip(".") or "repo", "."),) if top else ()


def _collector(fn: Callable[[], JSON], *, thread: bool) -> Callable[[], JSON]:
    """Run a collector (in a thread, to overlap with others); a failure is recorded as
    {"error": ...}: one collector failing never aborts the others."""

    def recorded() -> JSON:
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001
            return {"error": f"{type(exc).__name__}: {exc}"}

    if thread:
        return in_background(recorded)
    value = recorded()
    return lambda: value


def collect_context(
    capsule: Capsule, environ: Mapping[str, str], *, runner: Runner = start_process, in_place: bool = False
) -> dict[str, JSON]:
    """Everything context.json holds, with independent collectors running concurrently.
    With in_place (verify), listed files are only hashed, never copied or moved."""
    config = capsule.config
    repos = config.git_repositories if config.git_repositories is not None else default_repositories(config.root)
    stamp = _cpuinfo_stamp() if config.include_cpu else None
    cache = HostCache(config.vault, stamp)
    thread = len(repos) + config.include_cpu + config.include_packages > 1  # else nothing to overlap
    git = functools.partial(collect_git, config=config, capsule_dir=capsule.path, runner=runner)
    pending = {name: _collector(functools.partial(git, name, rel), thread=thread) for name, rel in repos}
    cpu_facts = functools.partial(collect_cpu, cache, has_cpuinfo=stamp is not None)
    cpu = _collector(cpu_facts, thread=thread) if config.include_cpu else None
    packages = _collector(collect_packages, thread=thread) if config.include_packages else None
    context: dict[str, JSON] = {
        "root_directory": str(config.root),
        "cwd": os.getcwd(),
        "platform": cache.get("platform", collect_platform),
        "environment_variables": collect_environment(
            config.environment_variables, environ, patterns=config.secret_patterns, allow=config.secret_allow
        ),
        "git": {name: join() for name, join in pending.items()},
    }
    capsule.context.update(context)
    if not in_place:
        context["files"] = capture_files(
            config.files, root=config.root, capsule=capsule.path, reserved=capsule.reserved, warnings=capsule.warnings
        )
    else:  # verify: hash in place, nothing copied or moved
        context["files"] = {f.path: _hash_in_place(config.root / f.path, f.hash) for f in config.files}
    context["cpu"] = cpu() if cpu else None
    if packages:
        context["packages"] = packages()
    return context


def _hash_in_place(path: Path, algorithm: str | None) -> dict[str, JSON] | None:
    try:
        return {"hash_algorithm": algorithm, "file_hash": hash_file(path, algorithm) if algorithm else None}
    except OSError:
        return None


def _whoami() -> dict[str, JSON]:
    """Who is writing this capsule: enough to tell later a run still going from one whose
    Capsula process died (same host and boot, pid gone)."""
    return {"capsula_version": __version__, "host": hostname(), "pid": os.getpid(), "boot_id": read_boot_id()}


def _base_manifest(kind: str, started: datetime.datetime) -> dict[str, JSON]:
    return {"kind": kind, "status": "running", "started": started.isoformat(), **_whoami()}


def capture(
    config: Config | None = None,
    *,
    kind: str = "capture",
    environ: Mapping[str, str] | None = None,
    runner: Runner = start_process,
) -> Capsule:
    """Create a capsule and write context.json into it.

    Pre-capture commands run first, in the root; the first failure stops the capture with
    a CaptureError, and the capsule keeps what was recorded, marked as failed.
    """
    config = config or load_config()
    environ = os.environ if environ is None else environ
    started = now()
    path = create_capsule_dir(config.vault, config.capsule_template, started)
    capsule = Capsule(path=path, config=config, manifest=_base_manifest(kind, started))
    capsule.write_manifest()
    commands: list[JSON] = []
    extra: dict[str, JSON] = {
        "capsula_version": __version__,
        "timestamp": started.isoformat(),
        "pre_capture_commands": commands,
    }
    try:
        child_env = {**environ, "CAPSULE_DIR": str(path)}
        for command in config.pre_capture_commands:
            record = run_pre_capture_command(command, cwd=config.root, env=child_env)
            commands.append(record)
            if record["exit_code"] != 0:
                stderr = " ".join(str(record["stderr"]).split())[-300:] or "(no stderr)"
                raise CaptureError(
                    f"pre-capture command {command!r} failed with exit code {record['exit_code']}: {stderr}; "
                    f"fix it and run again (what was captured is in {path})"
                )
        context = collect_context(capsule, environ, runner=runner)
    except BaseException as exc:
        status = "interrupted" if isinstance(exc, (Interrupted, KeyboardInterrupt)) else "failed"
        capsule.context.update(extra, status=status, error=str(exc) or type(exc).__name__, config=config.as_dict())
        write_json(path / CONTEXT, capsule.context)
        capsule.write_manifest(status=status, finished=now().isoformat(), error=str(exc) or type(exc).__name__)
        raise
    error = file_errors(context["files"])
    capsule.context = {**context, **extra, "config": config.as_dict(), "status": "failed" if error else "completed"}
    if capsule.warnings:
        capsule.context["warnings"] = list(capsule.warnings)
    if error:
        capsule.context["error"] = error
    write_json(path / CONTEXT, capsule.context)
    if error:
        capsule.write_manifest(status="failed", finished=now().isoformat(), error=error)
        raise CaptureError(f"{error}; check free space and permissions (the capsule {path} is marked failed)")
    git = {n: {"sha": g.get("sha"), "dirty": g.get("dirty")} for n, g in context["git"].items() if isinstance(g, dict)}
    if kind == "capture":
        capsule.write_manifest(git=git, status="completed", finished=now().isoformat())
    else:  # written with the run's own fields, next
        capsule.manifest["git"] = git
    return capsule


# =============================================================================
# Monitor
# =============================================================================

DRAIN_IDLE = 1.0  # s: after the command exits, stop reading pipes that stay silent this long
DRAIN_MAX = 10.0  # s: ... or that a background child keeps busy this long
INTERRUPT_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class SignalRouter:
    """SIGINT, SIGTERM and SIGHUP while Capsula works: forwarded to the running command's
    process group, or (before and after it runs) raised as Interrupted so that the capsule
    is closed with the status "interrupted". Once `hold` is set, signals are only noted."""

    def __init__(self) -> None:
        self.received: int | None = None
        self.child_pgid: int | None = None
        self.hold = False

    def _handle(self, signum: int, frame: object) -> None:
        first = self.received is None
        if first:
            self.received = signum
        if self.child_pgid is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.child_pgid, signum)
        elif first and not self.hold:
            raise Interrupted(signum)

    @contextlib.contextmanager
    def installed(self) -> Iterator[SignalRouter]:
        try:
            old = {s: signal.signal(s, self._handle) for s in INTERRUPT_SIGNALS}
        except ValueError:  # not the main thread: signals stay with the program that runs us
            yield self
            return
        try:
            yield self
        finally:
            for s, handler in old.items():
                signal.signal(s, handler)


class _Tee:
    """One output stream of the command: shown live on Capsula's own fd and saved whole to
    a file in the capsule. Holds no output in memory."""

    def __init__(self, src: int, out_fd: int, path: Path) -> None:
        self.src, self.out_fd, self.path = src, out_fd, path
        self.file_fd: int | None = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666)
        self.size = 0
        self.error: str | None = None
        self.show = True
        self.in_kernel = hasattr(os, "splice") and hasattr(os, "sendfile")

    def pump(self, buffer: memoryview) -> int:
        """Move what the pipe holds (0 at its end). On Linux the bytes go pipe -> file ->
        our own fd inside the kernel (splice, then sendfile from the page cache); where that
        is refused, through one reused buffer."""
        if self.in_kernel and self.file_fd is not None:
            try:
                n = os.splice(self.src, self.file_fd, len(buffer))
            except OSError:  # unsupported here, or the file is full: the bytes are still in the pipe
                self.in_kernel = False
            else:
                if n and self.show:
                    self._show_saved(self.size, n)
                self.size += n
                return n
        n = os.readv(self.src, [buffer])
        if n:
            self.feed(buffer[:n])
        return n

    def _show_saved(self, offset: int, count: int) -> None:
        assert self.file_fd is not None
        try:
            while count:
                sent = os.sendfile(self.out_fd, self.file_fd, offset, count)
                offset, count = offset + sent, count - sent
        except OSError:  # an O_APPEND or closed stdout: copy through memory, or stop showing
            try:
                _write_all(self.out_fd, os.pread(self.file_fd, count, offset))
            except OSError:
                self.show = False

    def feed(self, data: memoryview) -> None:
        self.size += len(data)
        if self.show:
            try:
                _write_all(self.out_fd, data)
            except OSError:  # our own stdout went away (a closed pipe): keep saving
                self.show = False
        if self.file_fd is not None:
            try:
                _write_all(self.file_fd, data)
            except OSError as exc:
                self.error = (
                    f"{self.path.name} is incomplete after {self.size - len(data)} bytes: {user_error_text(exc)}"
                )
                self.close()

    def close(self) -> None:
        if self.file_fd is not None:
            os.close(self.file_fd)
            self.file_fd = None

    def text(self) -> tuple[str, bool]:
        """The saved output as text (its last TEXT_LIMIT bytes) and whether it was cut."""
        try:
            with open(self.path, "rb") as f:
                f.seek(max(0, self.size - TEXT_LIMIT))
                data = f.read(TEXT_LIMIT)
        except OSError:
            data = b""
        return data.decode(errors="replace"), self.size > TEXT_LIMIT


@contextlib.contextmanager
def _terminal_given_to(pgid: int) -> Iterator[None]:
    """Make the command's process group the terminal's foreground group, as a shell does,
    so that Ctrl-C reaches it once and it can read the terminal; take it back after."""
    try:
        fd = sys.stdin.fileno()
        ours = os.isatty(fd) and os.tcgetpgrp(fd) == os.getpgrp()
    except (OSError, ValueError, AttributeError):
        ours = False
    if not ours:
        yield
        return
    old = signal.signal(signal.SIGTTOU, signal.SIG_IGN)
    try:
        os.tcsetpgrp(fd, pgid)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGCONT)  # in case it touched the terminal before it was its own
        yield
    finally:
        with contextlib.suppress(OSError):
            os.tcsetpgrp(fd, os.getpgrp())
        signal.signal(signal.SIGTTOU, old)


def _enlarge_pipe(fd: int) -> None:
    with contextlib.suppress(ImportError, OSError):
        import fcntl

        fcntl.fcntl(fd, 1031, 1 << 20)  # F_SETPIPE_SZ: fewer wake-ups for chatty commands


def _pump(pid: int, tees: Sequence[_Tee]) -> tuple[int, Any]:
    """Copy the command's output as it comes until it exits and its pipes close (or stay
    silent DRAIN_IDLE seconds after it exits); return its wait status and rusage."""
    import select

    poller = select.poll()
    open_streams = {tee.src: tee for tee in tees}
    for fd in open_streams:
        poller.register(fd, select.POLLIN)
    pidfd: int | None = None
    with contextlib.suppress(AttributeError, OSError):  # Linux >= 5.3; elsewhere: poll
        pidfd = os.pidfd_open(pid)
        poller.register(pidfd, select.POLLIN)
    status: int | None = None
    rusage: Any = None
    exited_at = 0.0
    view = memoryview(bytearray(1 << 20))  # reused: no fresh pages for every read
    try:
        while True:
            if status is not None and (not open_streams or time.monotonic() - exited_at > DRAIN_MAX):
                break
            if status is None and not open_streams and pidfd is None:
                _, status, rusage = os.wait4(pid, 0)
                continue
            timeout = DRAIN_IDLE if status is not None else (None if pidfd is not None else 0.05)
            events = poller.poll(None if timeout is None else timeout * 1000)
            if status is not None and not events:
                break
            for fd, _ in events:
                if fd == pidfd:
                    poller.unregister(fd)
                    _, status, rusage = os.wait4(pid, 0)
                    exited_at = time.monotonic()
                elif not open_streams[fd].pump(view):  # the end of that stream
                    poller.unregister(fd)
                    del open_streams[fd]
            if status is None and pidfd is None:
                done, st, ru = os.wait4(pid, os.WNOHANG)
                if done:
                    status, rusage, exited_at = st, ru, time.monotonic()
    finally:
        if pidfd is not None:
            os.close(pidfd)
    assert status is not None
    return status, rusage


def run_command(args: Sequence[str], *, env: Mapping[str, str], capsule: Path, router: SignalRouter) -> dict[str, JSON]:
    """Run a command in its own process group, teeing its output live into the capsule;
    record how it ended."""
    tees: list[_Tee] = []
    record: dict[str, JSON] = {"signal": None, "signal_number": None, "error": None, "resource_usage": None}
    start = time.perf_counter()
    (out_r, out_w), (err_r, err_w) = os.pipe(), os.pipe()
    try:
        pid = spawn(args, env=env, fds=(None, out_w, err_w), new_group=True)
    except OSError as exc:
        os.close(out_r)
        os.close(err_r)
        code = 127 if isinstance(exc, FileNotFoundError) else 126
        what = "command not found" if code == 127 else f"cannot run the command ({user_error_text(exc)})"
        for name in (STDOUT, STDERR):
            write_bytes_atomic(capsule / name, b"")
        record.update(exit_code=code, error=f"{what}: {args[0]}", run_time=time.perf_counter() - start)
        return record
    finally:
        os.close(out_w)
        os.close(err_w)
    router.child_pgid = pid
    status: int | None = None
    try:
        tees = [_Tee(out_r, 1, capsule / STDOUT), _Tee(err_r, 2, capsule / STDERR)]
        for tee in tees:
            _enlarge_pipe(tee.src)
        with _terminal_given_to(pid):
            status, rusage = _pump(pid, tees)
    finally:
        if status is None:  # could not open the capsule files, or interrupted: not left behind
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):  # already reaped, before the failure
                os.waitpid(pid, 0)
        router.child_pgid = None
        os.close(out_r)
        os.close(err_r)
        for tee in tees:
            tee.close()
    run_time = time.perf_counter() - start
    code = os.waitstatus_to_exitcode(status)
    if code < 0:
        with contextlib.suppress(ValueError):  # real-time signals have no name
            record["signal"] = signal.Signals(-code).name
        record["signal_number"], code = -code, 128 - code
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss is in KiB on Linux, bytes on macOS
    user, system, peak = round(rusage.ru_utime, 6), round(rusage.ru_stime, 6), rusage.ru_maxrss * scale
    record["resource_usage"] = {"user_time": user, "system_time": system, "max_rss_bytes": peak}
    record.update(exit_code=code, run_time=run_time)
    for tee, key in zip(tees, ("stdout", "stderr"), strict=True):
        record[key], record[f"{key}_truncated"] = tee.text()
        record[f"{key}_bytes"] = tee.size
        if tee.error:
            record["error"] = tee.error
    return record


def run_status(exit_code: int, *, signum: int | None, interrupted_by: int | None) -> str:
    """completed / failed / interrupted: what a reader of the capsule wants to know first."""
    if interrupted_by is not None or signum in INTERRUPT_SIGNALS:
        return "interrupted"
    return "completed" if exit_code == 0 else "failed"


def _pre_run_base(capsule: Capsule, started: datetime.datetime, kind: str) -> dict[str, JSON]:
    root = str(capsule.config.root)
    return {"root_directory": root, "cwd": os.getcwd(), "timestamp": started.isoformat(), "kind": kind, **_whoami()}


def _post_run_base(capsule: Capsule, run_time: float, files: dict[str, JSON]) -> dict[str, JSON]:
    root, ended = str(capsule.config.root), now().isoformat()
    return {"root_directory": root, "timestamp": ended, "run_time": iso_duration(run_time), "files": files}


def _capture_items(capsule: Capsule, items: Sequence[str]) -> dict[str, JSON]:
    specs = [spec for name in items for spec in capsule.config.items[name]]
    return capture_files(
        specs, root=capsule.config.root, capsule=capsule.path, reserved=capsule.reserved, warnings=capsule.warnings
    )


def check_items(config: Config, items: Sequence[str]) -> None:
    unknown = [i for i in items if i not in config.items]
    if unknown:
        import difflib

        where = config.source or "the configuration (none was found)"
        known = ", ".join(config.items) or "none"
        close = difflib.get_close_matches(unknown[0], list(config.items), n=1)
        hint = f"did you mean '{close[0]}'?" if close else f"known items: {known}"
        raise ConfigError(f"unknown item '{unknown[0]}': no [monitor.item.{unknown[0]}] in {where}; {hint}")


def monitor_command(
    args: Sequence[str], *, config: Config, items: Sequence[str] = (), rerun_of: str | None = None,
    cwd: Path | None = None, environ: Mapping[str, str] | None = None,
) -> tuple[int, Capsule | None]:  # fmt: skip
    """Capture the context, run the command and record the run; returns (exit code, capsule)."""
    check_items(config, items)
    environ = dict(os.environ if environ is None else environ)
    router = SignalRouter()
    with router.installed(), contextlib.chdir(cwd or os.getcwd()):
        try:
            capsule = capture(config, kind="command", environ=environ)
        except Interrupted as exc:
            return 128 + exc.signum, None
        shown = (
            redact_args(args, config.secret_patterns, config.secret_allow) if config.redact_arguments else list(args)
        )
        started = now()
        pre = {
            **_pre_run_base(capsule, started, "command"),
            "args": shown,
            "items": {name: {f.path: f.as_dict() for f in config.items[name]} for name in items},
        }
        if shown != list(args):
            pre["args_redacted"] = True
        if rerun_of:
            pre["rerun_of"] = rerun_of
        try:
            write_json(capsule.path / PRE_RUN, pre)
            capsule.write_manifest(command=shown, items=list(items), rerun_of=rerun_of)
            env = {**environ, "CAPSULE_DIR": str(capsule.path)}
            run = run_command(args, env=env, capsule=capsule.path, router=router)
        except Interrupted as exc:  # before the command started
            run = {
                "exit_code": 128 + exc.signum, "run_time": 0.0, "signal": None, "signal_number": None,
                "error": "interrupted before the command started", "resource_usage": None,
            }  # fmt: skip
        files: dict[str, JSON] = {}
        try:
            files = _capture_items(capsule, items)
        except Interrupted:
            pass  # the file being moved is still at its source, or complete in the capsule
        run["error"] = " ".join(filter(None, [run["error"], file_errors(files)])) or None
        router.hold = True
        code = int(run["exit_code"])
        status = run_status(code, signum=run["signal_number"], interrupted_by=router.received)
        if router.received is not None:
            code = 128 + router.received
        elif run["error"] and code == 0:  # the run went well but its record is incomplete
            code = 1
        return code, _finish_command(capsule, run, files, status=status)


def _finish_command(capsule: Capsule, run: dict[str, JSON], files: dict[str, JSON], *, status: str) -> Capsule:
    run_time = float(run.pop("run_time"))
    post = _post_run_base(capsule, run_time, files)
    post.update(stdout=run.pop("stdout", ""), stderr=run.pop("stderr", ""), exit_code=run.pop("exit_code"))
    post.update(status=status, run_time_seconds=round(run_time, 6), **run)
    if capsule.warnings:
        post["warnings"] = capsule.warnings
    try:
        write_json(capsule.path / POST_RUN, post)
    except VaultError as exc:  # a full disk: keep the record, without the inline output text
        post.update(stdout="", stderr="", error=f"{post['error'] or ''} {exc}".strip())
        write_json(capsule.path / POST_RUN, post)
    ended = {"finished": post["timestamp"], "exit_code": post["exit_code"], "run_time": post["run_time_seconds"]}
    capsule.write_manifest(status=status, error=post["error"], **ended)
    return capsule


# =============================================================================
# Decorator
# =============================================================================

_CURRENT_CAPSULE: contextvars.ContextVar[Path | None] = contextvars.ContextVar("capsula_capsule", default=None)


def get_capsule_dir() -> Path:
    """The capsule of the run this code is part of: the innermost @capsula.monitor call,
    or the command run by `capsula monitor` (CAPSULE_DIR)."""
    current = _CURRENT_CAPSULE.get()
    if current is not None:
        return current
    if os.environ.get("CAPSULE_DIR"):
        return Path(os.environ["CAPSULE_DIR"])
    raise CapsulaError(
        "get_capsule_dir() was called outside a monitored run; call it inside a function decorated "
        "with @capsula.monitor or a command run by 'capsula monitor'"
    )


def _exception_info(exc: BaseException) -> dict[str, JSON]:
    import traceback

    try:
        message = str(exc)
    except BaseException:  # noqa: BLE001 - a broken __str__ must not hide the exception itself
        message = safe_repr(exc)
    details = "".join(traceback.format_exception(exc))
    return {"error_type": type(exc).__name__, "error_message": message, "error_details": details}


def monitor(
    directory: Callable[..., Any] | str | os.PathLike[str] | None = None,
    *,
    items: Sequence[str] = (),
    include_return_value: bool = False,
) -> Any:
    """Monitor each call of a function: every call makes its own capsule with context.json,
    pre-run-info.json and post-run-info.json. Use as ``@monitor`` or ``@monitor(...)``.

    ``directory`` is the project root; by default the config is searched for upward from
    the function's source file. Config errors raise here, when decorating.
    """
    func = directory if callable(directory) else None
    root = None if callable(directory) else directory

    def decorate(fn: F) -> F:
        import inspect

        source = inspect.getsourcefile(fn) or inspect.getfile(fn)
        line = fn.__code__.co_firstlineno if hasattr(fn, "__code__") else None
        if root is not None:
            config = load_config(root)
        else:
            config = load_config(cwd=Path(source).absolute().parent)
        check_items(config, items)

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            capsule = capture(config, kind="function")
            started = now()
            pre = {
                **_pre_run_base(capsule, started, "function"),
                "source_file": str(Path(source).absolute()),
                "source_line": line,
                "function_name": fn.__name__,
                "args": jsonable(args),
                "kwargs": jsonable(kwargs),
                "items": list(items),
            }
            write_json(capsule.path / PRE_RUN, pre)
            capsule.write_manifest(function=f"{fn.__module__}.{fn.__qualname__}")
            token = _CURRENT_CAPSULE.set(capsule.path)
            start = time.perf_counter()
            outcome: BaseException | None = None
            result: Any = None
            try:
                result = fn(*args, **kwargs)
            except BaseException as exc:  # noqa: BLE001 - recorded, then re-raised below
                outcome = exc
            finally:
                run_time = time.perf_counter() - start
                _CURRENT_CAPSULE.reset(token)
            try:
                _finish_function(capsule, run_time, items, outcome, result if include_return_value else None)
            except CapsulaError as exc:  # the function's own outcome still reaches the caller
                warn(f"the run was not fully recorded: {exc}")
            if outcome is not None:
                raise outcome.with_traceback(outcome.__traceback__)
            return result

        return wrapper  # type: ignore[return-value]

    return decorate(func) if func is not None else decorate


def _finish_function(
    capsule: Capsule, run_time: float, items: Sequence[str], outcome: BaseException | None, value: Any
) -> None:
    files = _capture_items(capsule, items)
    error = file_errors(files)
    if error:  # the function's own outcome reaches the caller; the record says what is missing
        warn(f"{error} (capsule {capsule.path})", capsule.warnings)
    post = _post_run_base(capsule, run_time, files)
    post["return_value"] = jsonable(value)
    post["exception_info"] = _exception_info(outcome) if outcome is not None else None
    if isinstance(outcome, KeyboardInterrupt):
        status = "interrupted"
    elif outcome is None or (isinstance(outcome, SystemExit) and outcome.code in (0, None)):
        status = "completed"
    else:
        status = "failed"
    post["status"] = status
    post["run_time_seconds"] = round(run_time, 6)
    if capsule.warnings:
        post["warnings"] = capsule.warnings
    write_json(capsule.path / POST_RUN, post)
    capsule.write_manifest(status=status, finished=post["timestamp"], run_time=post["run_time_seconds"])


# =============================================================================
# Reproduce
# =============================================================================

# Fields that differ between any two runs; `capsula diff` leaves them out.
DEFAULT_IGNORES = (
    "*timestamp", "pre.pid", "pre.boot_id", "pre.rerun_of", "post.run_time_seconds", "post.resource_usage",
    "post.stdout", "post.stderr",  # compared as stdout.txt / stderr.txt, with a unified diff
    "context.cpu.hz_actual*", "context.pre_capture_commands.*.duration",
)  # fmt: skip


class Record(NamedTuple):
    """A capsule read back: each file as far as it exists (a 0.0.19 capsule has no manifest)."""

    path: Path
    manifest: dict[str, JSON]
    context: dict[str, JSON]
    pre: dict[str, JSON]
    post: dict[str, JSON]

    @classmethod
    def read(cls, path: Path) -> Record:
        def part(name: str) -> dict[str, JSON]:
            data = read_json(path / name)
            return data if isinstance(data, dict) else {}

        return cls(path=path, manifest=part(MANIFEST), context=part(CONTEXT), pre=part(PRE_RUN), post=part(POST_RUN))

    @property
    def kind(self) -> str:
        kind = self.manifest.get("kind") or self.pre.get("kind")
        if kind:
            return str(kind)
        return "function" if "function_name" in self.pre else ("command" if "args" in self.pre else "capture")

    def output(self, name: str) -> bytes:
        try:
            return (self.path / name).read_bytes()
        except OSError:  # 0.0.19 kept the text only in post-run-info.json
            return str(self.post.get(name.split(".")[0], "")).encode()


def _manifest_from_files(path: Path) -> dict[str, JSON]:
    """What capsule.json would say, for a 0.0.19 or incomplete capsule that has none."""
    r = Record.read(path)
    if not r.context and not r.pre:
        return {"status": "unreadable"}
    ended = r.post.get("exit_code", 0 if r.post.get("exception_info", 1) is None else 1)
    status = (
        ("completed" if ended == 0 else "failed") if r.post else ("completed" if r.kind == "capture" else "unknown")
    )
    git = {n: {"sha": g.get("sha")} for n, g in (r.context.get("git") or {}).items() if isinstance(g, dict)}
    what = r.pre.get("function_name") if r.kind == "function" else r.pre.get("args")
    return {"kind": r.kind, "status": status, "started": r.pre.get("timestamp"), "exit_code": r.post.get("exit_code"),
            "run_time": _seconds(r.post.get("run_time")), "git": git, "command": what}  # fmt: skip


def summarize(path: Path, *, host: str, boot_id: str | None) -> dict[str, JSON]:
    """One row of `capsula list`, read from capsule.json alone when it is there."""
    m = read_json(path / MANIFEST)
    if not isinstance(m, dict):
        m = _manifest_from_files(path)
    status = m.get("status")
    if status == "running" and m.get("host") == host and (m.get("boot_id") != boot_id or not _pid_alive(m.get("pid"))):
        status = "died"
    what = m.get("command") or m.get("function") or ""
    return {
        "name": path.name,
        "started": m.get("started"),
        "kind": m.get("kind"),
        "status": status,
        "exit_code": m.get("exit_code"),
        "run_time": m.get("run_time"),
        "git": dict(m.get("git") or {}),
        "command": " ".join(map(str, what)) if isinstance(what, list) else what,
        "rerun_of": m.get("rerun_of"),
    }


def _pid_alive(pid: object) -> bool:
    if not isinstance(pid, int):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # exists, owned by someone else
    return True


def _seconds(duration: object) -> float | None:
    match = re.fullmatch(r"P(?:(\d+)D)?T?(?:(\d+)H)?(?:(\d+)M)?(?:([\d.]+)S)?", str(duration or ""))
    if not match or not duration:
        return None
    d, h, m, s = (float(g or 0) for g in match.groups())
    return d * 86400 + h * 3600 + m * 60 + s


def list_capsules(vault: Path) -> list[dict[str, JSON]]:
    """Every capsule in the vault, newest first."""
    host, boot = hostname(), read_boot_id()
    rows = [summarize(vault / name, host=host, boot_id=boot) for name in list_capsule_names(vault)]
    rows.sort(key=lambda r: (str(r["started"] or ""), str(r["name"])), reverse=True)
    return rows


def resolve_capsule(spec: str, vault: Path) -> Path:
    """A capsule named by path, name, unique name prefix, or ``latest`` / ``latest~N``."""
    direct = Path(spec)
    if (direct / CONTEXT).exists() or (direct / MANIFEST).exists():
        return direct.absolute()
    match = re.fullmatch(r"latest(?:~(\d+))?", spec)
    if match:
        ordered = [str(row["name"]) for row in list_capsules(vault)]  # newest first
        n = int(match[1] or 0)
        if n >= len(ordered):
            raise VaultError(f"{spec}: the vault {vault} holds {len(ordered)} capsule(s)")
        return vault / ordered[n]
    names = list_capsule_names(vault)
    if spec in names:
        return vault / spec
    found = [n for n in names if n.startswith(spec)]
    if len(found) == 1:
        return vault / found[0]
    if not found:
        raise VaultError(f"no capsule {spec!r} in {vault}; run 'capsula list' to see the names")
    raise VaultError(
        f"{spec!r} matches {len(found)} capsules in {vault} ({', '.join(sorted(found)[:3])}, ...); give more of the name"
    )


def _short_git(git: Mapping[str, JSON]) -> str:
    parts = []
    for g in git.values():
        if isinstance(g, dict) and g.get("sha"):
            parts.append(str(g["sha"])[:8] + ("*" if g.get("dirty") else ""))
    return ",".join(parts) or "-"


def format_table(rows: Sequence[dict[str, JSON]]) -> str:
    def cells(r: Mapping[str, JSON]) -> tuple[str, ...]:
        started, run_time = str(r["started"] or "-")[:19].replace("T", " "), r["run_time"]
        seconds = "-" if run_time is None else f"{float(str(run_time)):.2f}s"
        code = "-" if r["exit_code"] is None else str(r["exit_code"])
        return (str(r["name"]), started, str(r["kind"] or "-"), str(r["status"] or "-"), code, seconds,
                _short_git(r["git"] or {}), str(r["command"] or ""))  # fmt: skip

    lines = [("NAME", "STARTED", "KIND", "STATUS", "EXIT", "TIME", "GIT", "COMMAND"), *map(cells, rows)]
    widths = [max(len(line[i]) for line in lines) for i in range(7)]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(line, widths, strict=False)) + "  " + line[-1] for line in lines
    )


def flatten(data: JSON, prefix: str) -> dict[str, JSON]:
    """Nested dicts as dotted paths; other values (lists included) are leaves."""
    if isinstance(data, dict) and data:
        out: dict[str, JSON] = {}
        for key, value in data.items():
            out.update(flatten(value, f"{prefix}.{key}"))
        return out
    if isinstance(data, list) and data and all(isinstance(v, dict) for v in data):
        return {k: v for i, item in enumerate(data) for k, v in flatten(item, f"{prefix}.{i}").items()}
    return {prefix: data}


def _ignored(path: str, patterns: Sequence[str]) -> bool:
    import fnmatch

    short = path.split(".", 1)[1] if "." in path else path
    return any(
        p in (path, short)
        or path.startswith(p + ".")
        or short.startswith(p + ".")
        or fnmatch.fnmatchcase(path, p)
        or fnmatch.fnmatchcase(short, p)
        for p in patterns
    )


def compare_fields(a: Mapping[str, JSON], b: Mapping[str, JSON], ignore: Sequence[str]) -> list[str]:
    """'path: A -> B' for every differing leaf not ignored."""
    lines = []
    for key in sorted(set(a) | set(b), key=lambda k: (k.split(".")[0] != "context", k)):
        if _ignored(key, ignore):
            continue
        va, vb = a.get(key, "<absent>"), b.get(key, "<absent>")
        if va != vb:
            lines.append(f"{key}: {json.dumps(va, ensure_ascii=False)} -> {json.dumps(vb, ensure_ascii=False)}")
    return lines


def text_diff(a: bytes, b: bytes, label: str, *, limit: int = 200) -> list[str]:
    import difflib

    if a == b:
        return []
    lines = list(
        difflib.unified_diff(
            a.decode(errors="replace").splitlines(),
            b.decode(errors="replace").splitlines(),
            f"A/{label}",
            f"B/{label}",
            lineterm="",
        )
    )
    if not lines:  # differ in bytes only (line endings, invalid UTF-8)
        return [f"{label}: the bytes differ ({len(a)} vs {len(b)} bytes)"]
    cut = [f"... {len(lines) - limit} more lines"] if len(lines) > limit else []
    return lines[:limit] + cut


def _diff_files(record: Record) -> dict[str, bytes]:
    out = {}
    for name, g in (record.context.get("git") or {}).items():
        with contextlib.suppress(OSError):
            out[f"{name}.diff"] = (
                record.path / str((g.get("diff_file") if isinstance(g, dict) else None) or f"{name}.diff")
            ).read_bytes()
    return out


def diff_capsules(a: Record, b: Record, *, ignore: Sequence[str] = ()) -> list[str]:
    """Every difference between two capsules that is not ignored; empty when they match."""
    ignore = (*DEFAULT_IGNORES, *ignore, "context.config", "context.git.*.diff_file")
    fa = {**flatten(a.context, "context"), **flatten(a.pre, "pre"), **flatten(a.post, "post")}
    fb = {**flatten(b.context, "context"), **flatten(b.pre, "pre"), **flatten(b.post, "post")}
    lines = compare_fields(fa, fb, ignore)
    da, db = _diff_files(a), _diff_files(b)
    for name in sorted(set(da) | set(db)):
        if not _ignored(f"git.{name}", ignore):
            lines += text_diff(da.get(name, b""), db.get(name, b""), name)
    if a.kind == "command" or b.kind == "command":
        for name in (STDOUT, STDERR):
            if not _ignored(name, ignore):
                lines += text_diff(a.output(name), b.output(name), name)
    return lines


def _config_from_record(record: Record, root: Path) -> Config:
    """The capsule's own capture settings (0.0.19 capsules: what its context.json names)."""
    recorded: dict[str, JSON] = record.context.get("config") or {}
    ctx_files = record.context.get("files") or {}
    specs = tuple(
        FileSpec(path=p, hash=(e or {}).get("hash_algorithm"))
        for p, e in ctx_files.items()
        if not (isinstance(e, dict) and e.get("moved"))
    )
    repos = tuple(
        (n, str(g.get("path", "."))) for n, g in (record.context.get("git") or {}).items() if isinstance(g, dict)
    )
    return Config(
        root=root,
        vault_directory=str(record.path.parent),
        environment_variables=tuple(
            recorded.get("environment_variables") or record.context.get("environment_variables") or ()
        ),
        files=specs,
        git_repositories=repos,
        include_packages="packages" in record.context,
        secret_patterns=tuple(recorded.get("secret_patterns", DEFAULT_SECRET_PATTERNS)),
        secret_allow=tuple(recorded.get("secret_allow", ())),
    )


# What verify compares: what could change a result (not the host name, not timestamps).
VERIFY_FIELDS = (
    *(f"context.platform.{k}" for k in ("system", "machine", "release", "python.implementation", "python.version")),
    *(f"context.{k}." for k in ("platform.python.executable", "environment_variables", "git", "files", "packages")),
)


def verify_capsule(record: Record, *, runner: Runner = start_process) -> tuple[list[str], list[str]]:
    """Differences between the capsule and the current environment that could change a
    result, and notes on what could not be compared."""
    import tempfile

    root = Path(str(record.context.get("root_directory") or os.getcwd()))
    config = _config_from_record(record, root)
    # The temporary index and patches live in the vault (nothing is written outside it).
    with tempfile.TemporaryDirectory(prefix=".verify-", dir=record.path.parent) as tmp:
        now_ctx = Capsule(path=Path(tmp), config=config)
        current = collect_context(now_ctx, os.environ, runner=runner, in_place=True)
        now_diffs = {
            n: (Path(tmp) / f"{n}.diff").read_bytes() for n in current["git"] if (Path(tmp) / f"{n}.diff").exists()
        }
    keep = ("sha", "branch", "dirty", "untracked", "file_hash", "version", "source")
    fa, fb = flatten(record.context, "context"), flatten(current, "context")
    wanted = [k for k in set(fa) | set(fb) if k.startswith(VERIFY_FIELDS) or k in VERIFY_FIELDS]
    wanted = [
        k
        for k in wanted
        if not k.startswith(("context.git.", "context.files.", "context.packages.")) or k.rsplit(".", 1)[1] in keep
    ]
    moved = [
        f"context.files.{p}."
        for p, e in (record.context.get("files") or {}).items()
        if isinstance(e, dict) and e.get("moved")
    ]
    wanted = [k for k in wanted if not k.startswith(tuple(moved))]
    lines = compare_fields({k: fa.get(k, "<absent>") for k in wanted}, {k: fb.get(k, "<absent>") for k in wanted}, ())
    for name, patch in _diff_files(record).items():
        if patch != now_diffs.get(name[: -len(".diff")], b""):
            lines.append(f"git.{name[:-5]}: the uncommitted changes differ from the capsule's {name}")
    notes = [
        f"{path}: moved into the capsule when captured; not compared"
        for path, e in (record.context.get("files") or {}).items()
        if isinstance(e, dict) and e.get("moved")
    ]
    return [line.replace(" -> ", " (capsule) -> ") + " (now)" if " -> " in line else line for line in lines], notes


def _code_repo(record: Record) -> tuple[str, dict[str, JSON]]:
    """The recorded repository that holds the root: the code state a rerun rebuilds."""
    for name, g in (record.context.get("git") or {}).items():
        if isinstance(g, dict) and g.get("sha") and not str(g.get("root_in_repo", ".")).startswith(".."):
            return name, g
    raise CapsulaError(
        f"{record.path.name} records no git commit for its root, so its code cannot be rebuilt; "
        "use 'capsula rerun --here' to rerun it in the current working tree"
    )


def _rerun_args(record: Record) -> list[str]:
    if record.kind != "command" or not isinstance(record.pre.get("args"), list):
        raise CapsulaError(f"{record.path.name} is a {record.kind} capsule; only a command capsule can be rerun")
    if record.pre.get("args_redacted") or REDACTED in record.pre["args"]:
        raise CapsulaError(
            f"{record.path.name} recorded its arguments redacted ({' '.join(record.pre['args'])}); "
            "rerun it by hand with the real values"
        )
    return [str(a) for a in record.pre["args"]]


@contextlib.contextmanager
def rebuilt_worktree(record: Record, *, runner: Runner = start_process) -> Iterator[Path]:
    """A temporary git worktree (in the vault) at the recorded sha with the capsule's diff
    applied, untracked files included; removed afterwards, also on Ctrl-C. The user's own
    working tree, index and branches are not touched."""
    import shutil
    import tempfile

    name, repo = _code_repo(record)
    root = Path(str(record.context.get("root_directory")))
    source = root / str(repo.get("path", "."))
    if not source.is_dir():
        raise CapsulaError(f"the recorded repository {source} is gone; rerun from a clone with 'capsula rerun --here'")
    tmp = Path(tempfile.mkdtemp(prefix=".rerun-", dir=record.path.parent))
    tree = tmp / "tree"
    try:
        _git(runner, source, "worktree", "add", "--detach", "--quiet", str(tree), str(repo["sha"]))
        patch = _diff_files(record).get(f"{name}.diff", b"")
        if patch.strip():
            _git(runner, tree, "apply", "--binary", "--whitespace=nowarn", str(record.path / f"{name}.diff"))
        yield tree / str(repo.get("root_in_repo", "."))
    finally:
        with contextlib.suppress(CapsulaError, OSError):
            _git(runner, source, "worktree", "remove", "--force", str(tree))
        shutil.rmtree(tmp, ignore_errors=True)
        with contextlib.suppress(CapsulaError, OSError):
            _git(runner, source, "worktree", "prune")


def _restore_inputs(record: Record, root: Path) -> None:
    """Put the copied input files back, as they were when the capsule was made."""
    import shutil

    for path, entry in (record.context.get("files") or {}).items():
        if isinstance(entry, dict) and entry.get("copied") and entry.get("stored_as"):
            dest = root / path
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(record.path / str(entry["stored_as"]), dest)


def _recorded_environ(record: Record) -> dict[str, str]:
    env = dict(os.environ)
    for key, value in (record.context.get("environment_variables") or {}).items():
        if value is None:
            env.pop(key, None)
        elif value != REDACTED:  # a redacted value cannot be restored: the current one stays
            env[key] = str(value)
    return env


def compare_runs(old: Record, new: Record) -> list[str]:
    """What a rerun changed in the result: exit code, output files, stdout."""
    lines = []
    if old.post.get("exit_code") != new.post.get("exit_code"):
        lines.append(f"exit code: {old.post.get('exit_code')} -> {new.post.get('exit_code')}")
    fa, fb = old.post.get("files") or {}, new.post.get("files") or {}
    for path in sorted(set(fa) | set(fb)):
        ha, hb = ((e or {}).get("file_hash") if isinstance(e, dict) else None for e in (fa.get(path), fb.get(path)))
        if ha != hb:
            lines.append(f"output file {path}: {ha or 'missing'} -> {hb or 'missing'}")
    lines += text_diff(old.output(STDOUT), new.output(STDOUT), STDOUT, limit=40)
    return lines


def rerun_capsule(record: Record, *, here: bool = False) -> tuple[int, Record | None, list[str]]:
    """Run a command capsule again as a new monitored run; (exit code, new capsule, differences)."""
    args = _rerun_args(record)
    old_root = Path(str(record.context.get("root_directory") or os.getcwd()))
    rel_cwd = os.path.relpath(str(record.pre.get("cwd") or old_root), old_root)
    items = {
        n: tuple(FileSpec(path=p, **spec) for p, spec in files.items())
        for n, files in (record.pre.get("items") or {}).items()
    }
    with contextlib.ExitStack() as stack:
        root = old_root if here else stack.enter_context(rebuilt_worktree(record))
        if not here:
            _restore_inputs(record, root)
        config = load_config(root)
        config = config._replace(vault_directory=str(record.path.parent), items={**config.items, **items})
        cwd = root / rel_cwd if not rel_cwd.startswith("..") else Path(str(record.pre.get("cwd")))
        if not here and _is_inside(cwd, root):  # a folder git does not keep (empty, or ignored files only)
            cwd.mkdir(parents=True, exist_ok=True)
        if not cwd.is_dir():
            raise CapsulaError(f"the recorded working directory {cwd} does not exist; create it, then rerun")
        environ, name = _recorded_environ(record), record.path.name
        code, capsule = monitor_command(args, config=config, items=list(items), rerun_of=name, cwd=cwd, environ=environ)
    if capsule is None:
        return code, None, ["the rerun was interrupted before the command ran"]
    new = Record.read(capsule.path)
    return code, new, compare_runs(record, new)


def find_file(path: Path, vault: Path) -> list[tuple[str, str, str]]:
    """(capsule, "input" or "output", recorded path) for every capsule that recorded a file
    with this content."""
    digests: dict[str, str | None] = {}

    def digest(algorithm: str) -> str | None:
        if algorithm not in digests:
            try:
                digests[algorithm] = hash_file(path, algorithm)
            except (OSError, ValueError):
                digests[algorithm] = None
        return digests[algorithm]

    found = []
    for row in list_capsules(vault):
        record = Record.read(vault / str(row["name"]))
        for role, files in (("input", record.context.get("files")), ("output", record.post.get("files"))):
            for recorded, e in (files or {}).items():
                if isinstance(e, dict) and e.get("file_hash") and e.get("hash_algorithm"):
                    if e["file_hash"] == digest(str(e["hash_algorithm"])):
                        found.append((str(row["name"]), role, recorded))
    return found


# =============================================================================
# CLI
# =============================================================================


def _cmd_capture(args: Any) -> int:
    config = load_config(args.directory)
    router = SignalRouter()
    with router.installed():
        try:
            capsule = capture(config)
        except Interrupted as exc:
            return 128 + exc.signum
    print(capsule.path)
    return 0


def _cmd_monitor(args: Any) -> int:
    command = list(args.command)
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        raise ConfigError("no command to monitor; usage: capsula monitor [-i ITEM]... [--] COMMAND [ARGS...]")
    config = load_config(args.directory)
    code, capsule = monitor_command(command, config=config, items=args.item)
    if capsule is not None:
        error = capsule.manifest.get("error")
        if error:
            hint = "check the spelling and PATH" if code in (126, 127) else "check free space and permissions"
            print(f"capsula: error: {error}; {hint} (recorded in {capsule.path})", file=sys.stderr)
        elif not args.quiet:
            print(f"capsula: capsule {capsule.path}", file=sys.stderr)
    return code


def _vault_of(args: Any) -> Path:
    if getattr(args, "vault", None):
        return Path(args.vault).absolute()
    return load_config(args.directory).vault


def _record(args: Any, spec: str) -> Record:
    return Record.read(resolve_capsule(spec, _vault_of(args)))


def _cmd_list(args: Any) -> int:
    rows = list_capsules(_vault_of(args))
    print(json.dumps(rows, indent=2, ensure_ascii=False) if args.json else format_table(rows))
    return 0


def _cmd_show(args: Any) -> int:
    r = _record(args, args.capsule)
    if args.json:
        data = {"path": str(r.path), "capsule": r.manifest, "context": r.context, "pre_run": r.pre, "post_run": r.post}
        print(json.dumps(data, indent=2, ensure_ascii=False))
        return 0
    row = summarize(r.path, host=hostname(), boot_id=read_boot_id())
    plat, py = r.context.get("platform") or {}, (r.context.get("platform") or {}).get("python") or {}
    out = [
        f"capsule   {r.path}",
        f"kind      {row['kind']}   status {row['status']}   exit {row['exit_code']}",
        f"started   {row['started']}   run time {r.post.get('run_time', '-')}",
        f"root      {r.context.get('root_directory')}   cwd {r.pre.get('cwd') or r.context.get('cwd')}",
        f"platform  {plat.get('platform')} on {plat.get('node')}",
        f"python    {py.get('implementation')} {py.get('version')} ({py.get('executable', '?')})",
    ]
    if row["command"]:
        out.append(f"run       {row['command']}" + (f"   rerun of {row['rerun_of']}" if row["rerun_of"] else ""))
    for name, g in (r.context.get("git") or {}).items():
        if isinstance(g, dict):
            dirty = f" (dirty, {len(g.get('untracked') or [])} untracked)" if g.get("dirty") else ""
            out.append(f"git       {name}: {g.get('sha')} on {g.get('branch')}{dirty}")
    sections = {
        "env": r.context.get("environment_variables"),
        "input": r.context.get("files"),
        "output": r.post.get("files"),
    }
    for title, mapping in sections.items():
        for key, value in (mapping or {}).items():
            out.append(f"{title:<9} {key} = {value.get('file_hash') if isinstance(value, dict) else value}")
    if isinstance(error := r.post.get("exception_info"), dict):
        out.append(f"exception {error.get('error_type')}: {error.get('error_message')}")
    for name in (STDOUT, STDERR):
        tail = r.output(name).decode(errors="replace").splitlines()[-5:] if r.kind == "command" else []
        out += [f"{name:<9} {line}" for line in tail]
    print("\n".join(out))
    return 0


def _cmd_diff(args: Any) -> int:
    lines = diff_capsules(_record(args, args.a), _record(args, args.b), ignore=args.ignore)
    print("\n".join(lines) if lines else "no differences")
    return 1 if lines else 0


def _cmd_verify(args: Any) -> int:
    record = _record(args, args.capsule)
    lines, notes = verify_capsule(record)
    for note in notes:
        print(f"capsula: note: {note}", file=sys.stderr)
    print("\n".join(lines) if lines else f"the environment matches {record.path.name}")
    return 1 if lines else 0


def _cmd_rerun(args: Any) -> int:
    record = _record(args, args.capsule)
    if args.here:
        lines, _ = verify_capsule(record)
        print(
            "\n".join(["the current environment differs from the capsule:", *lines])
            if lines
            else f"the environment matches {record.path.name}",
            file=sys.stderr,
        )
    code, new, diffs = rerun_capsule(record, here=args.here)
    name = new.path.name if new else "-"
    if not diffs:
        print(f"reproduced identically: {name} matches {record.path.name} (exit code, output files, stdout)")
        return 0
    print("\n".join([f"not reproduced: {name} differs from {record.path.name}", *diffs]))
    return code if code > 128 else 1


def _cmd_find(args: Any) -> int:
    path = Path(args.file)
    if not path.is_file():
        raise ConfigError(f"no such file: {path}; give the file whose origin you look for")
    hits = find_file(path, _vault_of(args))
    for name, role, recorded in hits:
        print(f"{name}  {role}  {recorded}")
    if not hits:
        print(f"no capsule recorded a file with the content of {path}", file=sys.stderr)
    return 0 if hits else 1


def _args_monitor(p: Any) -> None:
    p.add_argument("-i", "--item", action="append", default=[], metavar="NAME", help="a [monitor.item.NAME] to record")
    p.add_argument("-q", "--quiet", action="store_true", help="do not print the capsule's path on stderr")
    p.add_argument("command", nargs="...", metavar="COMMAND", help="the command and its arguments")


def _args_show(p: Any) -> None:
    p.add_argument("capsule", help="a path, a name, a unique prefix, latest or latest~N")
    p.add_argument("--json", action="store_true", help="print JSON")


def _args_diff(p: Any) -> None:
    p.add_argument("a", help="the first capsule")
    p.add_argument("b", help="the second capsule")
    always = ", ".join(DEFAULT_IGNORES)
    p.add_argument(
        "--ignore",
        action="append",
        default=[],
        metavar="FIELD",
        help=f"a dotted field (or glob) to leave out; always left out: {always}",
    )


def _args_rerun(p: Any) -> None:
    p.add_argument("capsule")
    p.add_argument("--here", action="store_true", help="rerun in the current working tree (after a verify)")


# name: (help, handler, reads the vault, arguments)
_COMMANDS: dict[str, tuple[str, Callable[[Any], int], bool, Callable[[Any], object] | None]] = {
    "capture": ("capture the context into a new capsule", _cmd_capture, False, None),
    "monitor": ("run a command and record it in a new capsule", _cmd_monitor, False, _args_monitor),
    "list": ("list the capsules in the vault, newest first", _cmd_list, True, lambda p: p.add_argument("--json", action="store_true")),
    "show": ("summarize one capsule", _cmd_show, True, _args_show),
    "diff": ("compare two capsules (exit 1 when they differ)", _cmd_diff, True, _args_diff),
    "verify": ("compare the current environment with a capsule", _cmd_verify, True, lambda p: p.add_argument("capsule")),
    "rerun": ("run a command capsule again and compare the result", _cmd_rerun, True, _args_rerun),
    "find": ("which capsules recorded a file with this content", _cmd_find, True, lambda p: p.add_argument("file")),
}  # fmt: skip


def _build_parser(only: str | None = None) -> Any:
    """The argument parser; with ``only``, just that subcommand's (argparse is slow to build,
    and `capsula monitor` should cost little more than the command it runs)."""
    import argparse

    def formatter(prog: str) -> argparse.HelpFormatter:
        # HelpFormatter would import shutil (and bz2, lzma ...) just for the terminal width.
        try:
            columns = (
                int(os.environ.get("COLUMNS", "")) if os.environ.get("COLUMNS") else os.get_terminal_size().columns
            )
        except (OSError, ValueError):
            columns = 80
        return argparse.HelpFormatter(prog, width=columns - 2)

    description = __doc__.splitlines()[0] if __doc__ else None
    parser = argparse.ArgumentParser(prog="capsula", description=description, formatter_class=formatter)
    parser.add_argument("--version", action="version", version=f"capsula {__version__}")
    sub = parser.add_subparsers(dest="command_name", required=True, metavar="COMMAND") if only is None else None
    for name, (text, handler, reads_vault, add_arguments) in _COMMANDS.items():
        if only is not None and name != only:
            continue
        if sub is not None:
            p = sub.add_parser(name, help=text, description=text, formatter_class=formatter)
        else:  # alone: the same parser as `capsula NAME ...` would reach, without building the rest
            p = argparse.ArgumentParser(prog=f"capsula {name}", description=text, formatter_class=formatter)
        p.add_argument("-C", "--directory", metavar="DIR", help="the folder holding capsula.toml (default: upward)")
        if reads_vault:
            p.add_argument("--vault", metavar="DIR", help="the vault to read (default: the config's)")
        if add_arguments:
            add_arguments(p)
        p.set_defaults(handler=handler)
        if sub is None:
            return p
    return parser


def _monitor_args(argv: list[str]) -> Any:
    """`capsula monitor`'s usual arguments, parsed without argparse: it is slow to import
    and build, and this is the command whose overhead matters. Anything unusual (help,
    ``-iNAME``, a typo) returns None, for argparse to parse and explain."""
    import types

    args = types.SimpleNamespace(directory=None, item=[], quiet=False, command=[], handler=_cmd_monitor)
    rest = iter(enumerate(argv))
    for i, arg in rest:
        name, eq, value = arg.partition("=")
        if name in ("-C", "--directory", "-i", "--item") and (eq or i + 1 < len(argv)):
            value = value if eq else next(rest)[1]
            if name in ("-C", "--directory"):
                args.directory = value
            else:
                args.item.append(value)
        elif arg in ("-q", "--quiet"):
            args.quiet = True
        elif arg.startswith("-") and arg != "--":
            return None
        else:
            args.command = argv[i:]
            return args
    return None


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv[0] if argv and argv[0] in _COMMANDS else None
    args = _monitor_args(argv[1:]) if command == "monitor" else None
    if args is None:
        args = _build_parser(command).parse_args(argv[1:] if command else argv)
    try:
        return int(args.handler(args))
    except CapsulaError as exc:
        print(f"capsula: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except (Interrupted, KeyboardInterrupt) as exc:  # Ctrl-C in list, show, diff ...: no traceback
        return 128 + (exc.signum if isinstance(exc, Interrupted) else signal.SIGINT)


def cli() -> NoReturn:
    """The `capsula` program (the console script and ``python -m capsula``): main(), then an
    exit that skips the interpreter's teardown. By then every file is written and closed
    and no thread runs; tearing down the ~100 imported modules would cost a tenth of a
    `capsula monitor -- true`."""
    code = main()
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except (OSError, ValueError):  # a closed pipe: what the interpreter itself would exit with
        code = code or 120
    os._exit(code)


if __name__ == "__main__":
    cli()
