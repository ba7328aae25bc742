#!/usr/bin/env python3
"""Capture the context of a command or function run, and reproduce it later.

One module, standard library only; copy it into a repository and run it as
``python capsula.py``. The sections, in dependency order
(``grep -n '^# ===' capsula.py`` prints them):

    Errors          CapsulaError and its subclasses, each with an exit code
    Utilities       clocks, JSON, atomic writes, hashing, redaction
    Configuration   capsula.toml / [tool.capsula]: discovery and validation
    Records         each capsule file's name and shape, statuses, builders, the one reader
    Processes       the one way programs start: explicit working directory and environment
    Collectors      platform, environment, git, CPU, packages; facts kept between runs
    Vault           capsule directories and the files stored in them
    Capture         the context of a run, written as context.json
    Monitor         running a command: live tee, signals, exit codes
    Decorator       @capsula.monitor for Python functions
    Reproduce       list, show, diff, verify, rerun and find capsules
    CLI             the argparse front end and main()

Start-up budget: `capsula monitor -- true` is held to 4x `python -c pass`. Each trick
below lives in one function, says why in a comment, and has a test of its behaviour:

    imports         modules only some commands need are imported where they are used
    spawn()         posix_spawn: no fork of this interpreter and no `subprocess` import
    start_process() git's output goes to memfd files: three git calls overlap, no threads
    HostCache       platform and CPU facts, once per boot, outside the vault
    collect_packages() the metadata headers read directly: no importlib.metadata import
    VaultIndex      list, latest and find read ended capsules' rows from a few files
    _monitor_args() `capsula monitor`'s usual arguments are parsed without argparse
    _Tee.pump()     output moves pipe -> file -> terminal inside the kernel
    cli()           the program exits without the interpreter's teardown
"""

from __future__ import annotations

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
from collections.abc import Callable, Hashable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, NamedTuple, cast, overload

if TYPE_CHECKING:
    import array
    import datetime
    from typing import NoReturn, ParamSpec, TypeAlias, TypedDict, TypeVar

    JSON: TypeAlias = "bool | int | float | str | list[JSON] | dict[str, JSON] | None"
    P = ParamSpec("P")
    R = TypeVar("R")
    T = TypeVar("T")

__all__ = ["CapsulaError", "CaptureError", "Config", "ConfigError", "FileSpec", "NotInRunError", "VaultError"]
__all__ += ["capture", "cli", "get_capsule_dir", "get_capsule_name", "load_config", "main", "monitor"]
__version__ = "0.2.0"


# === Errors ===================================================================


class CapsulaError(Exception):
    """A failure the user can act on: printed as one line, never a traceback."""

    exit_code = 1

    def __init__(self, message: str) -> None:
        # One line whatever a key, path or command's stderr holds.
        super().__init__(message.replace("\r", "\\r").replace("\n", "\\n"))


class ConfigError(CapsulaError, ValueError):
    """The configuration (or a command-line argument) is invalid. Also a ValueError, as
    the validation error 0.0.19 raised was."""

    exit_code = 2


class CaptureError(CapsulaError):
    """Capturing the context failed (for example a pre-capture command)."""


class VaultError(CapsulaError):
    """The vault or a capsule in it cannot be read or written, or a capsule is refused."""


class NotInRunError(CapsulaError, RuntimeError):
    """get_capsule_dir() outside a run. Also a RuntimeError, as in 0.0.19."""


class Interrupted(BaseException):
    """A signal (SIGINT, SIGTERM, SIGHUP) arrived while Capsula was working."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum

    def __str__(self) -> str:
        return f"interrupted by {signal_name(self.signum)}"


def signal_name(signum: int) -> str:
    """SIGTERM for 15; real-time signals have no name of their own."""
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


# === Utilities ================================================================

TEXT_LIMIT = 1 << 20  # bytes of stdout/stderr/command output kept inline in JSON
UNTRACKED_LIMIT = 10 << 20  # bytes: larger untracked files are listed with their hash, not diffed
UNTRACKED_TOTAL = 64 << 20  # bytes of untracked files one diff holds; the rest are listed likewise
REDACTED = "<redacted>"
# Names that look secret: a pattern of six characters or more anywhere in the name, a
# shorter one as a whole word (see is_secret_name); and files withheld from diffs by name.
DEFAULT_SECRET_PATTERNS = tuple(
    "PASSWORD PASSWD SECRET CREDENTIAL APIKEY API_KEY ACCESS_KEY PRIVATE_KEY TOKEN KEY PASS AUTH COOKIE".split()
)
DEFAULT_SECRET_FILES = tuple(
    ".env .env.* *.env *.pem *.key *.p12 *.pfx *.jks *.keystore *.kdbx id_rsa* id_dsa* id_ecdsa* id_ed25519* "
    "credentials credentials.json .netrc _netrc .pypirc .npmrc .git-credentials .pgpass .htpasswd "
    "secrets.json secrets.yaml secrets.yml secrets.toml .secrets".split()
)


LOG_LEVELS = {"DEBUG": 10, "INFO": 20, "WARNING": 30, "ERROR": 40, "CRITICAL": 50, "NOTSET": 0}
_log_level = 30  # what Capsula says on stderr: WARNING in Python (as a library's logger); the CLI sets it


def set_log_level(name: str) -> None:
    """-l/--log-level: at INFO and below, Capsula says what it ran, stored and wrote."""
    global _log_level
    if name.upper() not in LOG_LEVELS:
        raise ConfigError(f"unknown log level {name!r}; use one of {', '.join(LOG_LEVELS)} (any case)")
    _log_level = LOG_LEVELS[name.upper()]


def say(message: str, *, level: int = 20) -> None:
    """Tell the user on stderr, at INFO unless told otherwise, when the log level lets it."""
    if level >= _log_level:
        print(f"capsula: {message}", file=sys.stderr)


def warn(message: str, warnings: list[str] | None = None) -> None:
    """Tell the user on stderr, and keep the warning for the capsule."""
    say(f"warning: {message}", level=30)
    if warnings is not None:
        warnings.append(message)


def now() -> datetime.datetime:
    """The current time, aware, in the local time zone (as 0.0.19 did)."""
    import datetime

    return datetime.datetime.now(datetime.UTC).astimezone()


def iso_duration(seconds: float) -> str:
    """Format a duration as ISO 8601, as 0.0.19 did: ``PT2.486653S``."""
    days, rest = divmod(max(seconds, 0.0), 86400)
    text = f"{rest:.6f}".rstrip("0").rstrip(".")
    return f"P{int(days)}DT{text}S" if days else f"PT{text}S"


def jsonable(value: object, *, hide: Callable[[str], bool] | None = None, _seen: frozenset[int] = frozenset()) -> JSON:
    """Convert a value to something json.dumps accepts; what it cannot hold becomes repr,
    and the value of a mapping's key that ``hide`` says is secret becomes REDACTED."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if value == value and value not in (float("inf"), float("-inf")) else repr(value)
    if id(value) in _seen:
        return "<recursive reference>"
    seen = _seen | {id(value)}
    if isinstance(value, (list, tuple)):
        return [jsonable(v, hide=hide, _seen=seen) for v in value]
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return {k: REDACTED if hide and hide(k) else jsonable(v, hide=hide, _seen=seen) for k, v in value.items()}
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
        return cast("T", value)

    return join


def _write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while len(view):
        view = view[os.write(fd, view) :]


def _stat_key(path: str | os.PathLike[str], *, follow: bool = True) -> tuple[int, ...] | None:
    """What changes when a file is written, renamed over or has its mode changed: size,
    times, inode, mode (of a link itself when follow is false); None: it does not exist."""
    try:
        st = os.stat(path, follow_symlinks=follow)
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_mode


def walk_directories(root: str, *, skip: Callable[[str], bool] = lambda path: False) -> Iterator[str]:
    """root and each directory below it (not through links) that skip(path) does not refuse,
    each yielded before it is listed: what its stamp, taken then, covers is what is found in it."""
    stack = [root]
    while stack:
        directory = stack.pop()
        yield directory
        with os.scandir(directory) as entries:
            stack += [e.path for e in entries if e.is_dir(follow_symlinks=False) and not skip(e.path)]


def user_error_text(exc: OSError) -> str:
    return exc.strerror or str(exc)


def write_bytes_atomic(path: Path, data: bytes, *, room: Path | None = None, mode: int = 0o666) -> None:
    """Write a file so that readers see the old file or the whole new one, never a part.
    room: a file made ahead to write it in, its blocks already taken (see reserve_room);
    mode: before the umask."""
    import _thread  # the low-level module: threading costs an import for one thread id

    tmp = room or path.with_name(f".{path.name}.{os.getpid()}.{_thread.get_ident()}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY if room else os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        try:
            _write_all(fd, data)
            if room:
                os.ftruncate(fd, len(data))  # the room left over is free again
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException as exc:  # a signal mid-write too: never leave the temporary file
        with contextlib.suppress(OSError):
            tmp.unlink()
        if isinstance(exc, OSError):
            raise VaultError(f"cannot write {path}: {user_error_text(exc)}; check free space and permissions") from exc
        raise


def write_json(path: Path, data: object, *, room: Path | None = None, mode: int = 0o666) -> None:
    """Write JSON atomically, indented as 0.0.19 wrote it."""
    try:
        text = json.dumps(data, indent=4, ensure_ascii=False).encode()
    except UnicodeEncodeError:  # non-UTF-8 file names or values: escaped, so they round-trip
        text = json.dumps(data, indent=4).encode()
    write_bytes_atomic(path, text + b"\n", room=room, mode=mode)


JSON_READ_LIMIT = 64 << 20  # bytes: a larger capsule file is refused, not loaded


def read_json(path: Path, *, own: bool = False) -> JSON:
    """Read a JSON file; None when it is missing, too large or not valid JSON, or with own,
    when another user could have written it (not ours, or writable by others)."""
    try:
        with open(path, "rb") as f:
            st = os.fstat(f.fileno()) if own else None
            if st and (st.st_uid != getattr(os, "geteuid", lambda: -1)() or st.st_mode & 0o022):
                return None
            data = f.read(JSON_READ_LIMIT + 1)
        return None if len(data) > JSON_READ_LIMIT else cast("JSON", json.loads(data))
    except (OSError, ValueError, RecursionError):
        return None


COPY_CHUNK = 1 << 20


SMALL_FILE = 1 << 20  # bytes: a smaller input is hashed without loading OpenSSL


def new_hash(algorithm: str, size: int) -> Any:
    """hashlib.new(algorithm), for an input of about ``size`` bytes. Speed: loading OpenSSL
    costs 2-4 ms (a fifteenth of `capsula monitor -- true`), repaid only on large inputs (its
    SHA-256 is about 3x faster); a small one gets the interpreter's own SHA-256, the one
    hashlib itself falls back to. The same digest either way."""
    if algorithm == "sha256" and size < SMALL_FILE:
        with contextlib.suppress(ImportError):  # its name since Python 3.12, and before
            return __import__("_sha2" if sys.version_info >= (3, 12) else "_sha256").sha256()
    import hashlib

    return hashlib.new(algorithm)


def copy_and_hash(src: Path, dest: Path, algorithm: str | None) -> str | None:
    """Copy src to dest through a temporary file, hashing the bytes as they are written:
    the hash is that of the stored copy, and dest is whole or absent."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.part")
    digest = None
    try:
        with open(src, "rb") as fin, open(tmp, "xb") as fout:
            size = os.fstat(fin.fileno()).st_size
            if algorithm:  # a plain copy (git's index) makes no hash
                digest = new_hash(algorithm, size)
            buf = bytearray(COPY_CHUNK if size > 1 << 16 else 1 << 16)  # Speed: a small file, no 1 MiB to zero
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


def normalize_hash_name(name: str) -> str:
    """Map 0.0.19's names (``sha3`` is sha3-256) onto hashlib's."""
    name = name.lower().replace("-", "_")
    return "sha3_256" if name == "sha3" else name


def hash_file(path: Path, algorithm: str) -> str:
    """Hash a file in constant memory."""
    name = normalize_hash_name(algorithm)
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size >= SMALL_FILE:
            import hashlib

            return hashlib.file_digest(f, name).hexdigest()
        digest = new_hash(name, size)
        while chunk := f.read(COPY_CHUNK):
            digest.update(chunk)
        return str(digest.hexdigest())


def is_secret_name(name: str, patterns: Sequence[str]) -> bool:
    """Whether a variable, option or key name looks like it holds a credential. Case, ``-``,
    ``.`` and camelCase are folded into words; a pattern of six characters or more counts
    anywhere in the name (DB_PASSWORD, pgpassword), a shorter one only as a whole word
    (--key, SSH_KEY, HF_TOKEN; not KEYBOARD, MONKEY or TOKENIZERS_PARALLELISM)."""
    words = "_" + re.sub(r"[^A-Z0-9]+", "_", re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", name).upper()) + "_"
    for pattern in patterns:
        p = re.sub(r"[^A-Z0-9]+", "_", pattern.upper()).strip("_")
        if p and (p in words if len(p) >= 6 else f"_{p}_" in words):
            return True
    return False


def is_secret_file(path: str, patterns: Sequence[str]) -> bool:
    """Whether a file is withheld from diffs: its name (or, for a pattern with a ``/``, its
    path) matches a pattern of ``[redact] files``, case aside."""
    return secret_file_test(patterns)(path)


def secret_file_test(patterns: Sequence[str]) -> Callable[[str], bool]:
    """is_secret_file for one set of patterns, made once for a tree's many files."""
    by_name, by_path = _secret_file_matchers(tuple(patterns))
    return lambda path: bool(by_name(path.rpartition("/")[2]) or by_path(path))


@functools.cache
def _secret_file_matchers(patterns: tuple[str, ...]) -> tuple[Callable[[str], object], Callable[[str], object]]:
    """One regular expression for the name patterns and one for the path patterns. Speed: a
    tree with thousands of untracked files is matched once per file, not once per pattern."""
    import fnmatch

    def matcher(chosen: list[str]) -> Callable[[str], object]:
        if not chosen:
            return lambda text: None
        return re.compile("|".join(fnmatch.translate(p) for p in chosen), re.IGNORECASE).match

    return matcher([p for p in patterns if "/" not in p]), matcher([p for p in patterns if "/" in p])


def _userinfo_end(rest: str) -> int:
    """Where the ``user:password`` of a URL ends in what follows ``scheme://`` (-1: none).
    A password may hold ``@`` or ``/``; ``host:8080/a@b`` and ``host/pkg@v1`` hold none."""
    end = rest.rfind("@", 0, min(i for i in (rest.find("?"), rest.find("#"), len(rest)) if i >= 0))
    if end < 0 or "/" not in rest[:end]:
        return end
    head = rest[: rest.find("/")]
    _user, colon, password = head.partition("@")[0].partition(":")
    if colon and password and not password.isdigit():
        return end  # user:pa/ss@host: the password runs to the last @
    return head.rfind("@")


_URL = re.compile(r"\b([a-zA-Z][a-zA-Z0-9+.-]*://)([^\s'\"<>]*)")
_HEADER = re.compile(r"(?i)\b((?:proxy-)?authorization|x-api-key|x-auth-token|cookie)(\s*[:=]\s*)\S.*")


def strip_credentials(url: str) -> str:
    """A remote URL without password, token or query; the ssh user stays (``ssh://git@host``)."""
    url = url.strip()
    match = _URL.match(url)
    if not match:
        return url
    scheme, rest = match.groups()
    end = _userinfo_end(rest)
    keep = end >= 0 and scheme.startswith("ssh") and ":" not in rest[:end]
    rest = rest if keep or end < 0 else rest[end + 1 :]
    return scheme + rest.split("?", 1)[0].split("#", 1)[0] + url[match.end() :]


def redact_text(text: str, patterns: Sequence[str]) -> str:
    """Text Capsula records but did not choose (an environment value, an argument, a
    command's message) with the credentials in it redacted: the user:password of every
    URL, query parameters with secret names, and Authorization, Cookie and API-key headers."""

    def url(match: re.Match[str]) -> str:
        scheme, rest = match.groups()
        end = _userinfo_end(rest)
        if end >= 0 and not (scheme.startswith("ssh") and ":" not in rest[:end]):
            rest = f"{REDACTED}{rest[end:]}"
        query = re.sub(
            r"([?&;])([^=&;#]+)=([^&;#]*)",
            lambda q: f"{q[1]}{q[2]}={REDACTED}" if is_secret_name(q[2], patterns) else q[0],
            rest,
        )
        return scheme + query

    return _HEADER.sub(lambda m: f"{m[1]}{m[2]}{REDACTED}", _URL.sub(url, text))


def redact_args(args: Sequence[str], patterns: Sequence[str], allow: Sequence[str]) -> list[str]:
    """Arguments as recorded: the value of an option whose name looks secret (``--token X``,
    ``--password=X``, ``-p X``) redacted, unless the option is allowed, and credentials in
    any argument (URLs, headers) too. An option followed by another option takes no value:
    nothing is redacted for it."""
    out: list[str] = []
    redact_next = False
    for arg in args:
        if redact_next and not re.match(r"-[^\d.]", arg):
            out.append(REDACTED)
            redact_next = False
            continue
        name, eq, _ = arg.partition("=")
        secret = arg.startswith("-") and name not in allow and (name == "-p" or is_secret_name(name, patterns))
        out.append(f"{name}={REDACTED}" if secret and eq else redact_text(arg, patterns))
        redact_next = secret and not eq
    return out


_KIND_NAMES = {str: "a string", int: "an integer", float: "a number", bool: "true or false", dict: "a table"}
_KIND_NAMES |= {list: "an array", type(None): "null"}


def _fits(value: object, shape: object) -> bool:
    if shape is None or isinstance(shape, (dict, list)):
        return isinstance(value, type(shape))
    if isinstance(value, bool) and shape in (int, float):
        return False
    return isinstance(value, (int, float) if shape is float else cast("type", shape))


def conform(
    value: object, shape: object, *, where: str, problems: list[str], closed: bool = False, source: str = ""
) -> tuple[bool, object]:
    """Check a value read from a file against its shape, in a small grammar: a type (float
    takes ints too; int and float never take booleans), None for null, a tuple of
    alternatives, {key: shape} for a table ("*" for every key; other keys pass unchecked,
    or with closed are refused), [shape] for an array. Returns (True, the value less the
    parts that do not fit) or (False, None); each misfit is one line in problems."""
    alternatives = shape if isinstance(shape, tuple) else (shape,)
    alt = next((a for a in alternatives if _fits(value, a)), ...)
    if alt is ...:
        wanted = " or ".join(
            "a list of strings" if a == [str] else _KIND_NAMES[a if isinstance(a, type) else type(a)]
            for a in alternatives
        )
        got = f"{_KIND_NAMES.get(type(value), type(value).__name__)} ({safe_repr(value)[:60]})"
        problems.append(f"'{where}'{source} must be {wanted}, got {got}")
        return False, None
    if isinstance(alt, list):
        items = [
            conform(v, alt[0], where=f"{where}[{i}]", problems=problems, closed=closed, source=source)
            for i, v in enumerate(cast("list[object]", value))
        ]
        return True, [v for ok, v in items if ok]
    if not isinstance(alt, dict):
        return True, value
    table: dict[str, object] = {}
    for key, item in cast("dict[str, object]", value).items():
        sub = alt.get(key, alt.get("*", ...))
        if type(sub) is type and _fits(item, sub):  # the common case, without the recursion `list` would pay
            table[key] = item
            continue
        path = f"{where}.{key}" if where else key
        if sub is ... and closed:
            import difflib

            close = difflib.get_close_matches(key, [k for k in alt if k != "*"], n=1)
            hint = f"did you mean '{close[0]}'?" if close else f"allowed: {', '.join(alt)}"
            problems.append(f"unknown key '{path}'{source}; {hint}")
            continue
        ok, checked = (
            (True, item)
            if sub is ...
            else conform(item, sub, where=path, problems=problems, closed=closed, source=source)
        )
        if ok:
            table[key] = checked
    return True, table


def is_inside(path: str | os.PathLike[str], base: str | os.PathLike[str], *, real: bool = False) -> bool:
    """Whether path lies strictly inside base: by its text (normalized), or with real, by
    where it really is once every link is resolved."""
    norm = os.path.realpath if real else os.path.normpath
    inner, outer = norm(os.path.join(base, path)), norm(base)
    return inner.startswith(outer.rstrip(os.sep) + os.sep)


# === Configuration ============================================================

CONFIG_NAME = "capsula.toml"
# Contexts recorded without configuration, each turned off by its include-* key set to false.
ENVIRONMENT_CONTEXTS = ("gpus", "conda", "container", "cluster", "lock_files")


class FileSpec(NamedTuple):
    """One entry of ``[capture.files]`` or ``[monitor.item.NAME.files]``."""

    path: str
    hash: str | None = "sha256"
    copy: bool = False
    move: bool = False

    def as_dict(self) -> dict[str, JSON]:
        return {"hash": self.hash, "copy": self.copy, "move": self.move}


class Config(NamedTuple):
    """The effective configuration: every key has a default, 0.0.19's where it had one."""

    root: Path
    source: Path | None = None
    vault_directory: str = "vault"
    capsule_template: str = "%Y%m%d_%H%M%S"
    include_cpu: bool = True
    include_packages: bool = False
    include_environment: tuple[str, ...] = ENVIRONMENT_CONTEXTS  # which of them a capture records
    keep_commits: bool = False  # refs/capsula/<capsule> keeps each recorded commit
    git_bundle: bool = False  # a git bundle of each recorded commit goes into the capsule
    ro_crate: bool = False  # each capsule holds ro-crate-metadata.json: it is an RO-Crate as it stands
    pre_capture_commands: tuple[str, ...] = ()
    environment_variables: tuple[str, ...] = ()
    files: tuple[FileSpec, ...] = ()
    git_repositories: tuple[tuple[str, str], ...] | None = None  # None: the root's repository
    items: Mapping[str, tuple[FileSpec, ...]] = {}  # never mutated
    secret_patterns: tuple[str, ...] = DEFAULT_SECRET_PATTERNS
    secret_allow: tuple[str, ...] = ()
    secret_files: tuple[str, ...] = DEFAULT_SECRET_FILES
    redact_arguments: bool = True
    not_in_diff: tuple[str, ...] = ()  # paths (relative to the root) left out of git's state: a run's outputs
    recorded_root: Path | None = None  # the root a capsule names, when the run is elsewhere (a rerun's tree)
    tty: bool = True  # a command whose output goes to a terminal gets pseudo-terminals

    @property
    def vault(self) -> Path:
        return self.root / self.vault_directory

    def as_recorded(self, path: Path) -> Path:
        """A path under the root as a capsule names it: a rerun in a rebuilt tree records
        the project's root, so that it compares with the run it repeats, and can be rerun."""
        rel = os.path.relpath(path, self.root)
        return path if self.recorded_root is None or rel.startswith("..") else self.recorded_root / rel

    def as_dict(self) -> dict[str, JSON]:
        """The settings a capsule records, so that verify and rerun can use them later
        (the items are recorded with each run that names them)."""
        return {
            "source": str(self.source) if self.source else None,
            "vault_directory": self.vault_directory,
            "capsule_template": self.capsule_template,
            "include_cpu": self.include_cpu,
            "include_packages": self.include_packages,
            **{f"include_{name}": name in self.include_environment for name in ENVIRONMENT_CONTEXTS},
            "keep_commits": self.keep_commits,
            "git_bundle": self.git_bundle,
            "ro_crate": self.ro_crate,
            "pre_capture_commands": list(self.pre_capture_commands),
            "environment_variables": list(self.environment_variables),
            "files": {f.path: f.as_dict() for f in self.files},
            "git_repositories": None if self.git_repositories is None else dict(self.git_repositories),
            "secret_patterns": list(self.secret_patterns),
            "secret_allow": list(self.secret_allow),
            "secret_files": list(self.secret_files),
            "redact_arguments": self.redact_arguments,
        }


_FILE_OPTIONS = {"hash": str, "copy": bool, "move": bool}
_CONFIG_SHAPE = {  # in conform()'s grammar; every other key is refused
    "capture": {
        **{"vault-directory": str, "capsule-template": str, "include-cpu": bool, "include-packages": bool},
        **{f"include-{name.replace('_', '-')}": bool for name in ENVIRONMENT_CONTEXTS},
        "ro-crate": bool,
        **{"pre-capture-commands": [str], "environment-variables": [str], "files": {"*": _FILE_OPTIONS}},
        "git": {"repositories": {"*": str}, "keep-commits": bool, "bundle": bool},
    },
    "monitor": {"item": {"*": {"files": {"*": _FILE_OPTIONS}}}, "tty": bool},
    "redact": {"patterns": [str], "allow": [str], "files": [str], "arguments": bool},
}


def file_specs(raw: Mapping[str, Any], *, where: str, source: str, root: Path) -> tuple[FileSpec, ...]:
    """Validated file entries (a config's, or the items a capsule recorded for rerun)."""
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
        if (spec.copy or spec.move) and not is_inside(path, root):
            raise ConfigError(f"{key} lies outside the root {root}; only files inside it can be copied or moved")
        specs.append(spec)
    return tuple(specs)


# Always there, whatever OpenSSL allows (FIPS refuses md5): no need to load it to know.
ALWAYS_HASHES = frozenset("sha224 sha256 sha384 sha512 sha3_224 sha3_256 sha3_384 sha3_512 blake2b blake2s".split())


def _hash_usable(name: str) -> bool:
    if name in ALWAYS_HASHES:  # Speed: hashlib loads OpenSSL (2-4 ms), later, while git runs
        return True
    import hashlib

    if name not in hashlib.algorithms_available or name.startswith("shake"):
        return False
    try:
        hashlib.new(name)
    except ValueError:  # listed, but refused by this OpenSSL (e.g. ripemd160 on OpenSSL 3)
        return False
    return True


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


def find_git_top(path: Path) -> Path | None:
    """The work tree that contains path, found as git finds it (a .git file or directory)."""
    for d in (path, *path.parents):
        if (d / ".git").exists():
            return d
    return None


def parse_config(raw: Mapping[str, Any], *, root: Path, source: Path | None) -> Config:
    """Validate a parsed TOML table (the 0.0.19 format) and build the effective Config."""
    where = str(source) if source else "the configuration"
    problems: list[str] = []
    conform(dict(raw), _CONFIG_SHAPE, where="", problems=problems, closed=True, source=f" in {where}")
    if problems:
        raise ConfigError(problems[0])
    cap: Mapping[str, Any] = raw.get("capture", {})
    red: Mapping[str, Any] = raw.get("redact", {})
    template = cap.get("capsule-template", "%Y%m%d_%H%M%S")
    _check_template(template, source=where)
    vault = cap.get("vault-directory", "vault")
    if not vault or "\0" in vault:
        raise ConfigError(f"'capture.vault-directory' in {where} is empty; name a directory, e.g. 'vault'")
    repos = None
    if "repositories" in cap.get("git", {}):
        repos = tuple(cap["git"]["repositories"].items())
        for name, rel in repos:
            key = f"'capture.git.repositories.{name}' in {where}"
            if not name or name.startswith(".") or "/" in name or os.sep in name or "\0" in name + rel:
                raise ConfigError(f"{key}: the name must be a plain file name (it names {name}.diff)")
            if not (root / rel).is_dir() or find_git_top((root / rel).resolve()) is None:
                raise ConfigError(
                    f"{key}: '{rel}' is not a git repository; give a path (relative to {root}) inside one"
                )
    items = {
        name: file_specs(item.get("files", {}), where=f"monitor.item.{name}.files", source=where, root=root)
        for name, item in raw.get("monitor", {}).get("item", {}).items()
    }
    return Config(
        root=root,
        source=source,
        vault_directory=vault,
        capsule_template=template,
        include_cpu=cap.get("include-cpu", True),
        include_packages=cap.get("include-packages", False),
        include_environment=tuple(n for n in ENVIRONMENT_CONTEXTS if cap.get(f"include-{n.replace('_', '-')}", True)),
        keep_commits=cap.get("git", {}).get("keep-commits", False),
        git_bundle=cap.get("git", {}).get("bundle", False),
        ro_crate=cap.get("ro-crate", False),
        pre_capture_commands=tuple(cap.get("pre-capture-commands", ())),
        environment_variables=tuple(cap.get("environment-variables", ())),
        files=file_specs(cap.get("files", {}), where="capture.files", source=where, root=root),
        git_repositories=repos,
        items=items,
        secret_patterns=tuple(red.get("patterns", DEFAULT_SECRET_PATTERNS)),
        secret_allow=tuple(red.get("allow", ())),
        secret_files=tuple(red.get("files", DEFAULT_SECRET_FILES)),
        tty=raw.get("monitor", {}).get("tty", True),
        redact_arguments=red.get("arguments", True),
    )


def read_config_table(path: Path) -> dict[str, Any] | None:
    """A config file's Capsula tables, parsed from its text every time; None for a
    pyproject.toml without [tool.capsula]."""
    import tomllib

    pyproject = path.name == "pyproject.toml"
    try:
        text = path.read_bytes()
    except OSError as exc:
        if pyproject:
            return None
        raise ConfigError(f"cannot read {path}: {user_error_text(exc)}; check its permissions") from exc
    if pyproject and b"capsula" not in text:  # other projects' files, broken or not, are not ours
        return None
    try:
        table: Any = tomllib.loads(text.decode())
    except tomllib.TOMLDecodeError as exc:
        # tomllib says "... (at line 3, column 7)": keep it, it is where to look.
        raise ConfigError(f"invalid TOML in {path}: {exc}; fix the syntax there") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"invalid TOML in {path}: not UTF-8 ({exc.reason}); save it as UTF-8") from exc
    if pyproject:
        table = table.get("tool", {}).get("capsula")
        if table is not None and not isinstance(table, dict):
            raise ConfigError(f"'tool.capsula' in {path} must be a table; write [tool.capsula.capture] ...")
    return cast("dict[str, Any] | None", table)


def _config_in(folder: Path) -> tuple[Path, dict[str, Any]] | None:
    """The config file in one folder (capsula.toml first) and its Capsula tables."""
    for name in (CONFIG_NAME, "pyproject.toml"):
        candidate = folder / name
        if candidate.is_file():
            table = read_config_table(candidate)
            if table is not None:
                return candidate, table
    return None


def load_config(directory: str | os.PathLike[str] | None = None, *, cwd: Path | None = None) -> Config:
    """Find and load the configuration.

    With ``directory`` (``-C``): the config file in it (or the file itself), else defaults
    rooted there. Without: the nearest config upward from ``cwd``, else defaults rooted at
    the enclosing git work tree or ``cwd``. The root is recorded by its real path.
    """
    cwd = Path(cwd or os.getcwd()).absolute()
    found: tuple[Path, dict[str, Any]] | None = None
    if directory is not None:
        given = Path(os.path.realpath(cwd / directory))
        if given.is_file():
            found = (given, read_config_table(given) or {})
        elif given.is_dir():
            found = _config_in(given)
        else:
            raise ConfigError(f"no such directory: {cwd / directory}; pass -C the folder that holds {CONFIG_NAME}")
        root = found[0].parent if found else given
    else:
        real = Path(os.path.realpath(cwd))
        found = next(filter(None, map(_config_in, (real, *real.parents))), None)
        root = found[0].parent if found else (find_git_top(real) or real)
    if not found:
        return parse_config({}, root=root, source=None)
    return parse_config(found[1], root=root, source=found[0])


# === Records ==================================================================

# The files of a capsule. 0.0.19 wrote context.json, pre-run-info.json, post-run-info.json
# and NAME.diff: every key it wrote keeps its name, nesting and type; ours stand beside them.
CONTEXT = "context.json"
PRE_RUN = "pre-run-info.json"
POST_RUN = "post-run-info.json"
MANIFEST = "capsule.json"  # the small summary that `capsula list` reads
STDOUT = "stdout.txt"
STDERR = "stderr.txt"
RESERVED = frozenset({CONTEXT, PRE_RUN, POST_RUN, MANIFEST, STDOUT, STDERR})

# Statuses as a capsule records them, and (the last two) as `list` reads a capsule: one
# still "running" whose Capsula process is gone, and an old capsule that does not say.
RUNNING, COMPLETED, FAILED, INCOMPLETE, INTERRUPTED = "running", "completed", "failed", "incomplete", "interrupted"
DIED, UNKNOWN = "died", "unknown"  # and LOST, below
KINDS = ("capture", "command", "function")
INTERRUPT_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
# What a shell passes on to the command as well; these do not interrupt the run.
PASSED_SIGNALS = tuple(
    getattr(signal, n)
    for n in ("SIGUSR1", "SIGUSR2", "SIGWINCH", "SIGALRM", "SIGQUIT", "SIGCONT")
    if hasattr(signal, n)
)
LOST, HEARTBEAT_SECONDS = "lost", 30.0  # a run elsewhere whose capsule.json has not said it lives for 3 beats

if TYPE_CHECKING:

    class FileRecord(TypedDict, total=False):  # in ``files`` of context.json and post-run-info.json
        hash_algorithm: str | None
        file_hash: str | None
        size: int
        stored_as: str  # the copy, relative to the capsule
        copied: bool
        moved: bool
        symlink: str  # a link is recorded, and stored, as a link
        note: str
        error: str  # it exists, but could not be hashed or stored
        written_by_this_run: bool  # false: an output just as it was before the run

    class GitRecord(TypedDict, total=False):  # a repository in ``git`` of context.json
        path: str  # relative to the root
        sha: str | None
        branch: str | None
        remotes: list[dict[str, str]]
        root_in_repo: str
        untracked: list[str]
        untracked_not_in_diff: list[str]
        withheld: dict[str, dict[str, JSON]]  # path -> {size, sha256}: secrets by name, not in the diff
        too_large: dict[str, dict[str, JSON]]  # path -> {size, sha256}: over UNTRACKED_LIMIT or _TOTAL
        submodules: dict[str, GitRecord]  # by path in this repository, each with its own diff
        dirty: bool
        diff_file: str  # in the capsule
        kept_as: str  # the ref that keeps sha alive in the repository (keep-commits)
        bundle: str  # in the capsule: a git bundle of sha (bundle = true)
        error: str

    class CommandRecord(TypedDict):  # a pre-capture command
        command: str
        exit_code: int
        stdout: str
        stderr: str
        duration: float

    class ContextRecord(TypedDict, total=False):
        root_directory: str
        cwd: str
        platform: dict[str, JSON]
        environment_variables: dict[str, str | None]
        git: dict[str, GitRecord]
        files: dict[str, FileRecord | None]
        cpu: dict[str, JSON] | None
        packages: dict[str, JSON]
        capsula_version: str
        timestamp: str
        pre_capture_commands: list[CommandRecord]
        config: dict[str, JSON]
        status: str
        error: str
        warnings: list[str]
        gpus: dict[str, JSON]
        conda: dict[str, JSON] | None
        container: dict[str, JSON] | None
        cluster: dict[str, JSON]
        lock_files: dict[str, JSON]
        notebook: dict[str, JSON] | None

    class ExceptionRecord(TypedDict):
        error_type: str
        error_message: str
        error_details: str

    class Who(TypedDict, total=False):  # who wrote the capsule: see whoami()
        kind: str
        capsula_version: str
        host: str
        pid: int
        pid_start: int | None
        boot_id: str | None

    class PreRunRecord(Who, total=False):
        root_directory: str
        cwd: str
        timestamp: str
        items: dict[str, dict[str, dict[str, JSON]]]  # item -> path -> {hash, copy, move}
        args: list[JSON]  # a command's arguments (strings), or a function's
        args_redacted: bool
        rerun_of: str
        source_file: str
        source_line: int | None
        function_name: str
        function_source: str  # a function defined in a notebook cell
        kwargs: dict[str, JSON]

    class PostRunRecord(TypedDict, total=False):
        root_directory: str
        timestamp: str
        run_time: str  # ISO 8601, as 0.0.19
        run_time_seconds: float
        files: dict[str, FileRecord | None]
        status: str
        stdout: str  # the text of the last TEXT_LIMIT bytes; all of it is in stdout.txt
        stderr: str
        stdout_truncated: bool
        stderr_truncated: bool
        stdout_bytes: int
        stderr_bytes: int
        exit_code: int
        signal: str | None
        signal_number: int | None
        error: str | None
        resource_usage: dict[str, float] | None
        return_value: JSON
        exception_info: ExceptionRecord | None
        warnings: list[str]

    class Manifest(Who, total=False):
        status: str
        heartbeat: str  # while the run lasts: when its Capsula last said it lives
        heartbeat_seconds: float
        started: str
        finished: str
        git: dict[str, dict[str, JSON]]  # name -> {sha, dirty}
        command: list[str]
        function: str
        items: list[str]
        rerun_of: str | None
        exit_code: int | None
        run_time: float | None
        error: str | None


# What the reader checks of each file before anything uses it, in conform()'s grammar.
_FILE_SHAPE = {"hash_algorithm": (str, None), "file_hash": (str, None), "size": int, "stored_as": str}
_FILE_SHAPE |= {"copied": bool, "moved": bool, "symlink": str, "written_by_this_run": bool}
_GIT_SHAPE = {"path": str, "sha": (str, None), "branch": (str, None), "root_in_repo": str, "diff_file": str}
_GIT_SHAPE |= {"dirty": bool, "untracked": [str], "remotes": [{"name": str, "url": str}]}
_GIT_SHAPE |= {"kept_as": str, "bundle": str}
_GIT_SHAPE |= {"withheld": {"*": {"size": int, "sha256": (str, None)}}}
_GIT_SHAPE |= {"too_large": {"*": {"size": int, "sha256": (str, None)}}}
_GIT_SHAPE["submodules"] = {"*": _GIT_SHAPE}  # each as a repository of its own
_WHO_SHAPE = {"kind": str, "host": str, "pid": int, "pid_start": (int, None), "boot_id": (str, None)}
_WHO_SHAPE |= {"capsula_version": str}
_SHAPES: dict[str, Any] = {
    MANIFEST: {
        **_WHO_SHAPE,
        **{"status": str, "started": str, "finished": str, "exit_code": (int, None), "run_time": (float, None)},
        **{"command": [str], "function": str, "rerun_of": (str, None), "error": (str, None), "items": [str]},
        **{"heartbeat": str, "heartbeat_seconds": float},
        "git": {"*": {"sha": (str, None), "dirty": bool}},
    },
    CONTEXT: {
        **{"root_directory": str, "cwd": str, "platform": dict, "cpu": (dict, None), "packages": dict},
        **{"gpus": dict, "conda": (dict, None), "container": (dict, None), "cluster": dict, "notebook": (dict, None)},
        "lock_files": {"*": (None, _FILE_SHAPE)},
        "environment_variables": {"*": (str, None)},
        "git": {"*": _GIT_SHAPE},
        "files": {"*": (None, _FILE_SHAPE)},
        "config": {"environment_variables": [str], "secret_patterns": [str], "secret_allow": [str]},
    },
    PRE_RUN: {
        **_WHO_SHAPE,
        **{"root_directory": str, "cwd": str, "timestamp": str, "args": list, "args_redacted": bool},
        "items": ({"*": {"*": {"hash": (str, None), "copy": bool, "move": bool}}}, [str]),
        **{"rerun_of": str, "function_name": str, "source_file": str, "kwargs": dict, "function_source": str},
    },
    POST_RUN: {
        **{"timestamp": str, "run_time": str, "run_time_seconds": float, "exit_code": (int, None)},
        **{"status": str, "stdout": str, "stderr": str, "error": (str, None), "signal_number": (int, None)},
        "files": {"*": (None, _FILE_SHAPE)},
        "exception_info": (None, {"error_type": str, "error_message": str}),
    },
}


def confined(base: Path, rel: object, *, what: str) -> Path:
    """base / rel, once it is shown to stay inside base (base itself included) with every
    link resolved; anything else read from a capsule is refused with a VaultError."""
    if isinstance(rel, str) and rel and "\0" not in rel and not os.path.isabs(rel):
        inner, outer = os.path.realpath(base / rel), os.path.realpath(base)
        if inner == outer or inner.startswith(outer.rstrip(os.sep) + os.sep):
            return base / rel
    raise VaultError(
        f"{what} {safe_repr(rel)[:200]} leads outside {base}; refusing to use it (the capsule was edited?)"
    )


def settle(
    *,
    exit_code: int | None = None,
    signal: int | None = None,
    interrupted_by: int | None = None,
    raised: str | None = None,
    incomplete: bool = False,
) -> tuple[str, int]:
    """The one rule from what happened to a run to the status its capsule records and the
    exit code Capsula returns: interrupted, then failed, then incomplete, then completed.
    exit_code: the command's (128+N when signal N ended it) or a SystemExit's code; signal:
    what ended the command; interrupted_by: SIGINT, SIGTERM or SIGHUP that reached Capsula;
    raised: the type of a function's exception; incomplete: something was not recorded."""
    signum = interrupted_by or (signal if signal in INTERRUPT_SIGNALS else None)
    if signum is not None or raised == "KeyboardInterrupt":
        return INTERRUPTED, 128 + (signum or 2)
    if exit_code or raised not in (None, "SystemExit"):
        return FAILED, exit_code or 1
    return (INCOMPLETE, 1) if incomplete else (COMPLETED, 0)


def whoami() -> dict[str, JSON]:
    """Who writes this capsule: enough to tell later a run still going from one whose
    Capsula process died (same host and boot, pid gone or reused for another process).
    Read once per process (a forked child reads its own)."""
    pid = os.getpid()
    if pid not in _WHO:
        who: dict[str, JSON] = {"capsula_version": __version__, "host": hostname(), "pid": pid}
        _WHO[pid] = who | {"pid_start": process_start(pid), "boot_id": read_boot_id()}
    return dict(_WHO[pid])


_WHO: dict[int, dict[str, JSON]] = {}


def process_start(pid: int) -> int | None:
    """When a process started, in clock ticks since boot (Linux): with its pid, it names one
    process, never a later one that got the same pid."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return int(f.read().rsplit(b")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def hostname() -> str:
    """The node name, as platform.node() gives it, without importing platform."""
    return os.uname().nodename if hasattr(os, "uname") else os.environ.get("COMPUTERNAME", "")


@functools.cache
def read_boot_id() -> str | None:
    """An id that changes at every boot (Linux); None where there is none. Read once per
    process: it cannot change while the process lives."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


def new_manifest(kind: str, started: datetime.datetime) -> Manifest:
    return cast("Manifest", {"kind": kind, "status": RUNNING, "started": started.isoformat(), **whoami()})


def pre_run_record(
    kind: str, *, root: Path, cwd: Path, started: datetime.datetime, items: Mapping[str, Sequence[FileSpec]]
) -> PreRunRecord:
    """pre-run-info.json's common part; the command or function adds what it ran."""
    record = {"root_directory": str(root), "cwd": str(cwd), "timestamp": started.isoformat(), "kind": kind}
    listed = {name: {f.path: f.as_dict() for f in specs} for name, specs in items.items()}
    return cast("PreRunRecord", {**record, **whoami(), "items": listed})


def post_run_record(
    root: Path, run_time: float, *, files: dict[str, FileRecord | None], ended: Mapping[str, JSON], status: str
) -> PostRunRecord:
    """post-run-info.json: 0.0.19's keys in its order, how the run ended, then ours."""
    record: dict[str, object] = {"root_directory": str(root), "timestamp": now().isoformat()}
    record |= {"run_time": iso_duration(run_time), "files": files, **ended}
    return cast("PostRunRecord", record | {"status": status, "run_time_seconds": round(run_time, 6)})


class Record(NamedTuple):
    """A capsule read back by read_capsule(): untrusted input, checked. A value of the
    wrong type was dropped and named in problems; a path in it is used only through
    confined()."""

    path: Path
    manifest: Manifest
    context: ContextRecord
    pre: PreRunRecord
    post: PostRunRecord
    problems: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def kind(self) -> str:
        kind = self.manifest.get("kind") or self.pre.get("kind")
        if kind in KINDS:
            return str(kind)
        return "function" if "function_name" in self.pre else ("command" if "args" in self.pre else "capture")

    @property
    def legacy(self) -> bool:
        """Written by Capsula 0.0.19 (no capsule.json, no capsula_version)."""
        return not self.manifest and "capsula_version" not in self.context

    def inside(self, rel: object, *, what: str) -> Path:
        """A file of this capsule named by the capsule itself."""
        return confined(self.path, rel, what=f"{self.name}: {what}")

    def output(self, name: str) -> bytes:
        try:
            return self.inside(name, what=name).read_bytes()  # a link out of the capsule is refused
        except (OSError, VaultError):  # 0.0.19 kept the text only in post-run-info.json
            return str(self.post.get(name.split(".")[0], "")).encode()

    def output_file(self, name: str) -> Path | None:
        """The saved output file, when there is one (0.0.19 kept the text inline)."""
        with contextlib.suppress(VaultError):
            path = self.inside(name, what=name)
            return path if path.is_file() else None
        return None

    def diff_files(self) -> dict[str, bytes]:
        """The uncommitted changes of each recorded repository, by name."""
        out = {}
        for name, g in self.context.get("git", {}).items():
            with contextlib.suppress(OSError, VaultError):
                out[name] = self.inside(g.get("diff_file", f"{name}.diff"), what="diff_file").read_bytes()
        return out


def read_part(path: Path, name: str, problems: list[str]) -> dict[str, Any]:
    """One JSON file of a capsule, checked against its shape; {} when absent or unreadable."""
    data = None if os.path.islink(path / name) else read_json(path / name)  # never through a link
    if data is None:
        if os.path.lexists(path / name):
            problems.append(f"{name} is not valid JSON (or larger than {JSON_READ_LIMIT >> 20} MiB); ignored")
        return {}
    ok, checked = conform(data, _SHAPES[name], where=name, problems=problems)
    return cast("dict[str, Any]", checked) if ok else {}


def instant(timestamp: object) -> float:
    """When a recorded local time (with its UTC offset, as written) happened, in seconds since
    the epoch, so that hosts in other time zones and daylight-saving changes sort right."""
    import datetime

    try:
        return datetime.datetime.fromisoformat(str(timestamp)).timestamp()
    except ValueError:
        return float("-inf")


def read_capsule(path: Path) -> Record:
    """The one reader of a capsule: each file as far as it exists and is well formed (a
    0.0.19 capsule has no capsule.json). Raises VaultError when nothing in it is readable."""
    problems: list[str] = []
    parts = [read_part(path, name, problems) for name in (MANIFEST, CONTEXT, PRE_RUN, POST_RUN)]
    if not any(parts):
        raise VaultError(f"{path} is not a readable capsule (no valid {CONTEXT}, {PRE_RUN} or {MANIFEST})")
    manifest, context, pre, post = parts
    typed = cast("tuple[Manifest, ContextRecord, PreRunRecord, PostRunRecord]", (manifest, context, pre, post))
    return Record(path, *typed, problems=tuple(problems))


def manifest_of(record: Record) -> Manifest:
    """capsule.json as written, or what it would say for a 0.0.19 or incomplete capsule."""
    if record.manifest.get("status"):
        return record.manifest
    post, kind = record.post, record.kind
    if post:
        info = post.get("exception_info")
        raised = info.get("error_type", "Exception") if isinstance(info, dict) else None
        status: str = settle(exit_code=post.get("exit_code"), raised=raised)[0]
    else:
        status = COMPLETED if kind == "capture" and record.context else UNKNOWN
    git: dict[str, dict[str, JSON]] = {n: {"sha": g.get("sha")} for n, g in record.context.get("git", {}).items()}
    args = record.pre.get("args")
    manifest: Manifest = {"kind": kind, "status": status, "started": record.pre.get("timestamp", ""), "git": git}
    if kind == "command" and isinstance(args, list):
        manifest["command"] = [str(a) for a in args]
    if kind == "function":
        manifest["function"] = record.pre.get("function_name", "")
    manifest["exit_code"] = post.get("exit_code")
    manifest["run_time"] = post.get("run_time_seconds") or _seconds(post.get("run_time"))
    return manifest


def _seconds(duration: object) -> float | None:
    match = re.fullmatch(r"P(?:(\d+)D)?T?(?:(\d+)H)?(?:(\d+)M)?(?:([\d.]+)S)?", str(duration or ""))
    if not match or not duration:
        return None
    d, h, m, s = (float(g or 0) for g in match.groups())
    return d * 86400 + h * 3600 + m * 60 + s


def status_as_read(manifest: Manifest, *, host: str, boot_id: str | None, clock: float | None = None) -> str:
    """A capsule's status as `list` shows it. A run still "running" on this host "died" when
    it rebooted since or its Capsula process is gone (its pid free, or another process's);
    elsewhere, it is "lost" once its heartbeat is three beats old."""
    status = manifest.get("status") or UNKNOWN
    if status != RUNNING:
        return status
    if manifest.get("host") == host and manifest.get("boot_id") == boot_id:
        return RUNNING if _pid_alive(manifest.get("pid"), manifest.get("pid_start")) else DIED
    if manifest.get("host") == host and boot_id is not None:
        return DIED  # rebooted since
    beat = instant(manifest.get("heartbeat") or manifest.get("started"))
    interval = manifest.get("heartbeat_seconds") or HEARTBEAT_SECONDS
    return LOST if (time.time() if clock is None else clock) - beat > 3 * interval else RUNNING


def _pid_alive(pid: object, start: object = None) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    if isinstance(start, int) and process_start(pid) not in (None, start):
        return False  # the pid now names another process
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # exists, owned by someone else
    return True


# === Processes ================================================================


def spawn(
    args: Sequence[str], *, cwd: Path, env: Mapping[str, str], fds: Sequence[int | None], new_group: bool = False
) -> int:
    """Start a program in ``cwd`` with ``env``, searched on that environment's PATH, with
    ``fds`` as its stdin, stdout and stderr (None: ours); return its pid. SIGPIPE and
    SIGXFSZ are back to their defaults in it, and it inherits our other descriptors.

    Speed: posix_spawn neither forks this interpreter nor needs `subprocess`, whose import
    alone costs more than a git call; it cannot change directory, so a program that starts
    elsewhere than our own working directory is forked by subprocess instead."""
    if os.path.realpath(cwd) != os.path.realpath(os.getcwd()):
        import subprocess

        std = {k: fd for k, fd in zip(("stdin", "stdout", "stderr"), fds, strict=True) if fd is not None}
        group = {"process_group": 0} if new_group else {}
        proc = subprocess.Popen(list(args), cwd=cwd, env=dict(env), close_fds=False, **std, **group)  # type: ignore[call-overload]
        _POPENS[proc.pid] = proc  # kept, or subprocess reaps it behind our back when it is collected
        return cast("int", proc.pid)
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


_POPENS: dict[int, Any] = {}  # children spawn() started through subprocess, until reaped


def reap(pid: int, options: int = 0) -> tuple[int, int, Any]:
    """os.wait4 for a child spawn() started: (pid or 0, wait status, rusage). A child started
    through subprocess has its Popen told, so that subprocess never waits for it again."""
    done, status, usage = os.wait4(pid, options)
    if done and (proc := _POPENS.pop(pid, None)) is not None:
        proc.returncode = os.waitstatus_to_exitcode(status)
    return done, status, usage


def _read_back(fd: int, *, tail: int | None = None) -> bytes:
    size = os.fstat(fd).st_size
    offset = max(0, size - tail) if tail is not None else 0
    chunks = []
    while chunk := os.pread(fd, 1 << 24, offset):
        chunks.append(chunk)
        offset += len(chunk)
    return b"".join(chunks)


Finish = Callable[[], tuple[int, bytes, bytes]]  # waits for a started process: (exit code, stdout, stderr)
Runner = Callable[..., Finish]  # start_process, or what a test passes instead


def start_process(
    args: Sequence[str], *, cwd: Path, env: Mapping[str, str], stdin: bytes | None = None, tail: int | None = None
) -> Finish:
    """The one place a program whose output Capsula keeps is started (tests may pass
    another runner): it starts now, and the returned callable waits for it (call it: it
    reaps the program) and gives its exit code, stdout and stderr (their last ``tail``
    bytes with tail). The output goes to in-memory files, not pipes: nothing has to be
    read while the program runs, so independent programs overlap without threads."""
    if not hasattr(os, "memfd_create"):  # not Linux: subprocess's pipes, read while waiting
        import subprocess

        pipe = subprocess.PIPE
        proc = subprocess.Popen(
            args, cwd=cwd, env=env, stdin=pipe if stdin else subprocess.DEVNULL, stdout=pipe, stderr=pipe
        )

        def communicate() -> tuple[int, bytes, bytes]:
            out, err = proc.communicate(stdin)
            return proc.returncode, out[-tail:] if tail else out, err[-tail:] if tail else err

        return communicate
    files: list[int] = []
    try:
        files += [os.memfd_create("capsula-out"), os.memfd_create("capsula-err")]
        files.append(os.memfd_create("capsula-in") if stdin else os.open(os.devnull, os.O_RDONLY))
        if stdin:
            _write_all(files[2], stdin)
            os.lseek(files[2], 0, os.SEEK_SET)
        pid = spawn(args, cwd=cwd, env=env, fds=(files[2], files[0], files[1]))
    except BaseException:
        for fd in files:
            os.close(fd)
        raise
    os.close(files.pop())

    def finish() -> tuple[int, bytes, bytes]:
        try:
            _, status, _ = reap(pid)
            out, err = (_read_back(fd, tail=tail) for fd in files)
            return os.waitstatus_to_exitcode(status), out, err
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


# === Collectors ===============================================================


def collect_platform() -> dict[str, JSON]:
    """Platform and Python facts, under 0.0.19's keys and in its order. They do not change
    while the machine is up, so the host cache keeps them (platform.processor() spawns
    `uname -p`, and platform.architecture() `file`: the ELF magic tells the same)."""
    import platform

    uname, (build_no, build_date) = platform.uname(), platform.python_build()
    info: dict[str, JSON] = {"machine": uname.machine, "node": uname.node, "platform": platform.platform()}
    info |= {key: getattr(uname, key) for key in ("release", "version", "system", "processor")}
    elf = False
    with contextlib.suppress(OSError), open(sys.executable, "rb") as f:
        elf = f.read(4) == b"\x7fELF"
    linkage = "ELF" if elf else ("WindowsPE" if sys.platform == "win32" else "")
    python: dict[str, JSON] = {
        "executable_architecture": {"bits": f"{sys.maxsize.bit_length() + 1}bit", "linkage": linkage}
    }
    python |= {"build_no": build_no, "build_date": build_date}
    python |= {key: getattr(platform, f"python_{key}")() for key in ("compiler", "branch", "implementation", "version")}
    info["python"] = python | {"executable": sys.executable, "prefix": sys.prefix}
    return info


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
        out |= {key: redact_value(key, environ.get(key), patterns=patterns, allow=allow) for key in matched}
    return out


def redact_value(key: str, value: str | None, *, patterns: Sequence[str], allow: Sequence[str]) -> str | None:
    """An environment value as recorded: redacted when its name looks secret, else without
    the credentials in it (an allowed name keeps its value as it is)."""
    if value is None or key in allow:
        return value
    return REDACTED if is_secret_name(key, patterns) else redact_text(value, patterns)


def parse_git_status(out: bytes) -> tuple[str | None, str | None, int, list[str]]:
    """Parse ``git status --porcelain=v2 --branch -z``: (sha, branch, changes, untracked files)."""
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
    return sha, branch, changed, untracked


def git_environment(environ: Mapping[str, str], *, index: Path | None = None) -> dict[str, str]:
    """The environment git runs in: the given one, without GIT_DIR & co. (from a hook or a
    wrapper they would point git at another repository), in the C locale."""
    env = {k: v for k, v in environ.items() if not k.startswith("GIT_")}
    env.update(LC_ALL="C", GIT_OPTIONAL_LOCKS="0", GIT_LITERAL_PATHSPECS="1")
    if index is not None:
        env["GIT_INDEX_FILE"] = str(index)
    return env


def git_start(
    runner: Runner, repo: Path, *args: str, env: Mapping[str, str], stdin: bytes | None = None, ok: int = 0
) -> Callable[[], bytes]:
    """Start git in repo now; the returned callable waits for its stdout (CaptureError on failure)."""
    finish = runner(["git", *args], cwd=repo, env=env, stdin=stdin)

    def stdout() -> bytes:
        code, out, err = finish()
        if code not in (0, ok):
            msg = err.decode(errors="replace").strip().splitlines()
            why = redact_text(msg[-1], DEFAULT_SECRET_PATTERNS) if msg else code  # git quotes remote URLs
            raise CaptureError(f"git {args[0]} failed in {repo}: {why}")
        return out

    return stdout


def run_git(runner: Runner, repo: Path, *args: str, env: Mapping[str, str], stdin: bytes | None = None) -> bytes:
    return git_start(runner, repo, *args, env=env, stdin=stdin)()


EMPTY_TREE = "4b825dc642cb6eb9a060e54bf8d69288fbee4904"
# --ignore-submodules: each submodule is recorded as a repository of its own
GIT_DIFF = tuple("diff --binary --no-color --no-ext-diff --no-textconv --ignore-submodules=all".split())
GIT_DIFF += ("--src-prefix=a/", "--dst-prefix=b/")
GIT_ADD_INTENT = ("add", "--intent-to-add", "--pathspec-from-file=-", "--pathspec-file-nul")


_REPOSITORY_FACTS: dict[tuple[str, int], tuple[bytes, bytes]] = {}  # (path, pid): git's top level, remotes
GIT_STATUS = ("status", "--porcelain=v2", "--branch", "-z", "--untracked-files=all")


# A decorated function's calls skip `git status` while nothing git reads has changed.
WATCH_LIMIT = 20_000  # paths: lstat-ing more would cost about what git status does
WATCH_BUILDS = 3  # trees built in a row, none trusted: a tree that keeps changing is no longer watched
RACY = 2.0  # s: an entry changed this recently could change again within one tick of its file system's clock


class CleanTree:
    """A repository that ``git status`` found clean, as lstat sees it: git's own
    directories (an update of the index, HEAD, a ref or the config renames a file into
    one), the config and ignore files git reads, every tracked file and every directory
    of the work tree that git walks (POSIX changes a directory's times whenever an entry
    is added to it, removed or renamed; ignored ones are left out), and the .gitignore
    files in them. While every stamp is unchanged, git status would print what it did.

    It is trusted only after a later status, asked after the stamps were taken again and
    found equal, printed the same, with nothing changed for RACY seconds before: then no
    change made while it was built can hide, nor one within a tick of the clock.
    """

    __slots__ = ("paths", "stamps", "status", "trusted")

    def __init__(self, paths: list[str], stamps: list[tuple[int, ...] | None], status: bytes) -> None:
        self.paths, self.stamps, self.status, self.trusted = paths, stamps, status, False

    def stamps_now(self) -> list[tuple[int, ...] | None]:
        return [_stat_key(p, follow=False) for p in self.paths]


_CLEAN_TREES: dict[tuple[object, ...], CleanTree] = {}  # (path, pid, HOME, XDG_CONFIG_HOME): the tree
_TREE_BUILDS: dict[tuple[object, ...], int] = {}


def _settle_tree(
    path: Path,
    key: tuple[object, ...],
    tree: CleanTree | None,
    stamps: list[tuple[int, ...] | None] | None,
    asked: float,
    status_of: Callable[[], bytes],
    *,
    facts: bytes,
    environ: Mapping[str, str],
    runner: Runner,
) -> bytes:
    """git's status, waited for; on the way, the tree watched is trusted, watched anew or
    dropped. A failure to watch it only leaves git to be asked next time."""
    status = status_of()
    records = status.split(b"\0")
    if any(r[:2] in (b"1 ", b"2 ", b"u ", b"? ") for r in records):
        _CLEAN_TREES.pop(key, None)
    elif tree is not None and stamps == tree.stamps and status == tree.status:
        newest = max((max(s[1], s[2]) for s in stamps if s), default=0)
        tree.trusted = newest < (asked - RACY) * 1e9
        if tree.trusted:  # it served: a later change may be watched anew
            _TREE_BUILDS[key] = 0
    elif _TREE_BUILDS.get(key, 0) < WATCH_BUILDS:
        _TREE_BUILDS[key] = _TREE_BUILDS.get(key, 0) + 1
        _CLEAN_TREES.pop(key, None)
        try:
            built = watch_tree(path, facts, status, environ=environ, runner=runner)
        except (CaptureError, OSError, ValueError):
            built = None
        if built is not None:
            _CLEAN_TREES[key] = built
    return status


def watch_tree(
    path: Path, facts: bytes, status: bytes, *, environ: Mapping[str, str], runner: Runner
) -> CleanTree | None:
    """The CleanTree of the repository at path, whose status (with --ignored=matching)
    was clean; None for one with submodules (each is recorded by git calls of its own)
    or with more than WATCH_LIMIT paths to watch."""
    env = git_environment(environ)
    top_s, _, git_dir, common_s = os.fsdecode(facts).splitlines()[:4]
    top, common = Path(top_s), path / common_s
    listed, config = wait_all(
        [
            git_start(runner, top, "ls-files", "-z", "--stage", env=env),
            git_start(runner, top, "config", "-z", "--list", "--show-origin", env=env, ok=1),
        ]
    )
    home = Path(environ.get("HOME") or "~").expanduser()
    xdg = Path(environ.get("XDG_CONFIG_HOME") or home / ".config") / "git"
    files = [home / ".gitconfig", xdg / "config", xdg / "ignore", xdg / "attributes", Path("/etc/gitconfig")]
    files += [common / "info" / "exclude", common / "info" / "attributes", Path(git_dir) / "index"]
    records = iter(config.split(b"\0"))
    for origin, entry in zip(records, records, strict=False):
        name, _, value = os.fsdecode(entry).partition("\n")
        if origin.startswith(b"file:"):
            files.append(top / os.fsdecode(origin[5:]))
        if name.lower() in ("core.excludesfile", "core.attributesfile"):
            files.append(top / os.path.expanduser(value))
    paths: list[str] = []
    stamps: list[tuple[int, ...] | None] = []

    def watch(p: str | os.PathLike[str]) -> None:
        paths.append(os.fspath(p))
        stamps.append(_stat_key(p, follow=False))

    def walk(root: str, ignored: set[str]) -> None:
        """Watch root and each directory below it but .git and the ignored (relative to
        root), each before it is listed, and the .gitignore files in them."""
        skip = lambda path: path.endswith("/.git") or path[len(root) + 1 :] in ignored  # noqa: E731
        for directory in walk_directories(root, skip=skip):
            watch(directory)
            if os.path.lexists(ignore := os.path.join(directory, ".gitignore")):
                watch(ignore)
            if len(paths) > WATCH_LIMIT:
                return

    for f in dict.fromkeys([Path(git_dir), common, common / "info", common / "reftable", *files]):
        watch(f)
    walk(str(common / "refs"), set())
    walk(str(top), {os.fsdecode(r[2:-1]) for r in status.split(b"\0") if r[:2] == b"! " and r.endswith(b"/")})
    for record in filter(None, listed.split(b"\0")):
        mode, _, tracked = record.partition(b"\t")
        if mode.startswith(b"160000"):
            return None
        watch(top / os.fsdecode(tracked))
    return CleanTree(paths, stamps, status) if len(paths) <= WATCH_LIMIT else None


def start_git_reads(
    path: Path, *, environ: Mapping[str, str], runner: Runner, watch: bool = False
) -> list[Callable[[], bytes]]:
    """git's reads of a repository, started together so that they overlap: its status and,
    once per process (a decorated function's later calls make one call), its top level and
    remotes. collect_git waits for them. watch: the process will capture again (a
    decorated function): a clean tree is watched, and git is not asked again while
    nothing it reads has changed (see CleanTree)."""
    facts = _REPOSITORY_FACTS.get((str(path), os.getpid()))
    key = (str(path), os.getpid(), environ.get("HOME"), environ.get("XDG_CONFIG_HOME"))
    tree, asked = _CLEAN_TREES.get(key) if watch else None, time.time()
    stamps = tree.stamps_now() if tree else None
    if tree and tree.trusted:
        if stamps == tree.stamps:
            return [functools.partial(bytes, tree.status)]
        _CLEAN_TREES.pop(key, None)
        tree = None
    env = git_environment(environ)
    calls: list[tuple[str, ...]] = [(*GIT_STATUS, "--ignored=matching") if watch else GIT_STATUS]
    if facts is None:
        calls += [("rev-parse", "--show-toplevel", "--git-path", "index", "--absolute-git-dir", "--git-common-dir")]
        calls += [("config", "-z", "--get-regexp", r"^remote\..*\.url$")]  # exit code 1: no remote
    started: list[Callable[[], bytes]] = []
    try:
        for args in calls:
            started.append(git_start(runner, path, *args, env=env, ok=1 if args[0] == "config" else 0))
    except BaseException:  # git missing, or no process to spare: none is left running
        with contextlib.suppress(Exception):
            wait_all(started)
        raise
    if watch and facts is not None:  # the first call learns where git keeps its files
        settle = functools.partial(_settle_tree, path, key, tree, stamps, asked, facts=facts[0], environ=environ)
        started[0] = functools.partial(settle, started[0], runner=runner)
    return started


def collect_git(
    name: str,
    rel: str,
    *,
    config: Config,
    into: Path,
    environ: Mapping[str, str],
    runner: Runner = start_process,
    reads: list[Callable[[], bytes]] | None = None,
    since: float | None = None,
) -> GitRecord:
    """The state of one repository, and every uncommitted change as a patch in
    ``<into>/<name>.diff``: staged and unstaged changes, binary files, and untracked files
    that are not ignored (each up to UNTRACKED_LIMIT), so that ``git apply --binary`` on a
    clean checkout of ``sha`` recreates the working tree. The user's index is not touched:
    untracked files are added with --intent-to-add to a copy of it. reads: start_git_reads(),
    when the capture started them before it made the capsule, at the time since."""
    root, diff_path = config.root, into / f"{name}.diff"
    path = root / rel
    entry: GitRecord = {"path": rel, "sha": None, "branch": None, "remotes": []}
    since = since if reads else time.time()
    try:
        status_out, *facts = wait_all(reads or start_git_reads(path, environ=environ, runner=runner))
        if facts:
            _REPOSITORY_FACTS[(str(path), os.getpid())] = rev_parse, remotes = facts[0], facts[1]
        else:
            rev_parse, remotes = _REPOSITORY_FACTS[(str(path), os.getpid())]
        sha, branch, changed, untracked_now = parse_git_status(status_out)
        top_s, index_s = rev_parse.decode().splitlines()[:2]
        top, index = Path(top_s), path / index_s
    except (CaptureError, OSError, ValueError) as exc:
        entry["error"] = str(exc)
        return entry
    entry["sha"], entry["branch"] = sha, branch
    entry["remotes"] = [
        {"name": key.split(".", 1)[1].rsplit(".", 1)[0], "url": strip_credentials(url)}
        for key, _, url in (rec.decode(errors="replace").partition("\n") for rec in remotes.split(b"\0") if rec)
    ]
    entry["root_in_repo"] = os.path.relpath(root, top)
    moved = [path for spec, path in expand_paths(config.files, root=root, env=environ) if spec.move]
    left_out = moved + list(config.not_in_diff)
    gone = {os.path.relpath(os.path.normpath(root / path), top) for path in left_out}
    in_vault = _vault_member(config.vault, top)
    listed = [u for u in untracked_now if u not in gone and not in_vault(u)]
    withheld = list(filter(secret_file_test(config.secret_files), listed)) if listed else []  # Speed: 1 ms to build
    secret, keep_out = set(withheld), [*withheld, *gone]
    if is_inside(config.vault, top):
        keep_out.append(os.path.relpath(config.vault, top))
    elif is_inside(top, config.vault):  # a tree in the vault: every file by name
        since = None
    candidates = [u for u in listed if u not in secret]
    whole = _whole_directories(str(top), candidates, keep_out, since) if since and candidates else None
    # Speed: git adds the files while they are sized; if one is too large, it is done again
    adding = None
    with contextlib.suppress(CaptureError, OSError):  # a full disk, say: met again, and recorded, below
        adding = _start_adding(runner, top, index, diff_path, whole[0], environ=environ) if whole else None
    try:
        untracked, too_large = _within_budget(top, candidates)
    except BaseException:  # a signal: no git left running, no copy of the index left behind
        with contextlib.suppress(Exception):
            wait_all([adding] if adding else [])
        _diff_index(diff_path).unlink(missing_ok=True)
        raise
    if too_large and whole and since:
        with contextlib.suppress(CaptureError):
            wait_all([adding] if adding else [])
        adding, whole = None, _whole_directories(str(top), untracked, keep_out + list(too_large), since)
    entry["untracked"] = listed
    if too_large:
        entry["too_large"] = too_large
    if withheld:  # listed with size and hash, never their content
        entry["withheld"] = {u: {"size": _untracked_size(top / u), "sha256": _sha256(top / u)} for u in withheld}
    entry["untracked_not_in_diff"] = sorted(set(listed) - set(untracked))
    entry["dirty"] = bool(changed or listed)
    try:
        if entry["dirty"]:  # a clean tree has nothing to diff: no git call, no file
            entry["diff_file"] = diff_path.name
            base = sha or EMPTY_TREE
            _write_git_diff(
                runner,
                top,
                index,
                diff_path,
                base=base,
                untracked=untracked,
                whole=whole,
                adding=adding,
                environ=environ,
            )
    except (CaptureError, OSError) as exc:
        entry["error"] = f"cannot write {diff_path.name}: {exc}"
    if sha and (config.keep_commits or config.git_bundle):
        try:
            entry |= keep_commit(runner, top, sha, config=config, capsule=into, name=name, environ=environ)
        except (CaptureError, OSError) as exc:
            entry["error"] = f"cannot keep commit {sha[:12]}: {exc}"
    if (top / ".gitmodules").is_file():
        entry["submodules"] = _collect_submodules(name, top, config=config, into=into, environ=environ, runner=runner)
    return entry


def capsule_ref(capsule: str) -> str:
    """The ref that keeps a capsule's commit: refs/capsula/<capsule name, as a ref allows it>."""
    return "refs/capsula/" + (re.sub(r"[^A-Za-z0-9_-]+", "_", capsule).strip("_") or "capsule")


def keep_commit(
    runner: Runner, top: Path, sha: str, *, config: Config, capsule: Path, name: str, environ: Mapping[str, str]
) -> GitRecord:
    """Keep a recorded commit reachable, so that a rebase, a squash or `git gc` cannot delete
    what a rerun needs: a ref (keep-commits), and/or a bundle of it in the capsule (bundle),
    which a rerun fetches from when the repository lacks the commit."""
    env, ref, kept = git_environment(environ), capsule_ref(capsule.name), cast("GitRecord", {})
    try:  # created, never moved: a capsule of the same name in another vault keeps its own commit
        run_git(runner, top, "update-ref", ref, sha, "", env=env)
    except CaptureError:
        if run_git(runner, top, "rev-parse", "--verify", "--quiet", ref, env=env).strip() != sha.encode():
            ref = f"{ref}-{sha[:12]}"
            run_git(runner, top, "update-ref", ref, sha, env=env)
    try:
        if config.git_bundle:
            run_git(runner, top, "bundle", "create", "--quiet", str(capsule / f"{name}.bundle"), ref, env=env)
            kept["bundle"] = f"{name}.bundle"
    finally:
        if not config.keep_commits:  # the ref only carried the commit into the bundle
            run_git(runner, top, "update-ref", "-d", ref, sha, env=env)
    if config.keep_commits:
        kept["kept_as"] = ref
    return kept


def _collect_submodules(
    name: str, top: Path, *, config: Config, into: Path, environ: Mapping[str, str], runner: Runner
) -> dict[str, GitRecord]:
    """Each initialised submodule of the repository at top, by its path there, recorded as a
    repository of its own: its sha, and its own diff with its untracked files (the parent's
    diff would only say ``Subproject commit ...-dirty``)."""
    try:
        listed = run_git(
            runner,
            top,
            "config",
            "-f",
            ".gitmodules",
            "-z",
            "--get-regexp",
            r"^submodule\..*\.path$",
            env=git_environment(environ),
        )
    except CaptureError:
        return {}
    found: dict[str, GitRecord] = {}
    for record in filter(None, listed.split(b"\0")):
        sub = os.fsdecode(record.partition(b"\n")[2])
        if sub and is_inside(sub, top) and (top / sub / ".git").exists():
            label = name + "." + re.sub(r"[^\w.-]", "_", sub)
            rel = os.path.relpath(top / sub, config.root)
            found[sub] = collect_git(label, rel, config=config, into=into, environ=environ, runner=runner)
    return found


def _vault_member(vault: Path, top: Path) -> Callable[[str], bool]:
    """Whether a path relative to ``top`` belongs to the vault, never to a diff: anything in a
    vault inside the work tree; in a vault that is the work tree or holds it, the capsules."""
    if is_inside(vault, top):
        prefix = os.path.relpath(vault, top)
        return lambda rel: rel == prefix or rel.startswith(prefix + "/")

    def in_a_capsule(rel: str) -> bool:
        inner = os.path.relpath(top / rel, vault)
        if inner.startswith(".."):
            return False
        return any((vault / inner.split(os.sep, 1)[0] / name).is_file() for name in (MANIFEST, CONTEXT))

    return in_a_capsule


def _sha256(path: Path) -> str | None:
    try:
        return hash_file(path, "sha256")
    except OSError:
        return None


def _untracked_size(path: str | os.PathLike[str]) -> int:
    try:
        return os.lstat(path).st_size
    except OSError:
        return 0


WHOLE_LIMIT = 1000  # directories under one that git add takes whole: a larger tree is taken file by file
TICK = 0.05  # s: how far a file system's clock may lag time.time() (a coarse tick, a little skew)


def _whole_directories(
    top: str, untracked: Sequence[str], keep_out: Iterable[str], since: float
) -> tuple[list[str], list[tuple[str, tuple[int, ...] | None]]]:
    """git add's paths for the untracked files: in place of the files under a directory, the
    topmost directory that holds none of keep_out (files left out, the vault), and stamps of
    every directory under those. Speed: git matches each path against each path given, so
    1,000 files cost it twice what one directory does, and 10,000 a hundred times.

    A directory is given whole only when none under it has changed since ``since`` (before
    git status listed the files): git then adds what status listed. The caller checks the
    stamps again after git add and, if one changed, adds the files one by one instead."""
    blocked: set[str] = set()
    for path in keep_out:
        parts = path.split("/")
        blocked.update("/".join(parts[:i]) for i in range(1, len(parts) + 1))
    groups: dict[str, list[str]] = {}
    for u in untracked:
        head = u.partition("/")[0]
        if head in blocked or head == u or u.endswith("/"):  # deeper; a file at the top; a nested repository
            parts = u.split("/")
            heads = ("/".join(parts[:i]) for i in range(2, len(parts)) if not u.endswith("/"))
            head = next((h for h in heads if h not in blocked), u)
        groups.setdefault(head, []).append(u)
    specs: list[str] = []
    stamps: list[tuple[str, tuple[int, ...] | None]] = []
    for head, files in groups.items():
        found = _quiet_directories(f"{top}/{head}", since) if files != [head] else None
        if found:
            specs.append(head)
            stamps += found
        else:
            specs += files
    return specs, stamps


def _quiet_directories(root: str, since: float) -> list[tuple[str, tuple[int, ...] | None]] | None:
    """Each directory under root with its stamp; None if one has changed since ``since``, or
    there are more than WHOLE_LIMIT."""
    found: list[tuple[str, tuple[int, ...] | None]] = []
    try:
        for directory in walk_directories(root):
            stamp = _stat_key(directory, follow=False)
            if stamp is None or max(stamp[1], stamp[2]) >= (since - TICK) * 1e9 or len(found) >= WHOLE_LIMIT:
                return None
            found.append((directory, stamp))
    except OSError:
        return None
    return found


def _within_budget(top: Path, untracked: Sequence[str]) -> tuple[list[str], dict[str, dict[str, JSON]]]:
    """The untracked files a diff takes, in order, and those it cannot (over UNTRACKED_LIMIT,
    or beyond UNTRACKED_TOTAL for all) with their size and hash."""
    taken, budget, too_large = [], UNTRACKED_TOTAL, {}
    for u in untracked:
        size = _untracked_size(f"{top}/{u}")  # Speed: a str path, no Path per file
        if size <= min(UNTRACKED_LIMIT, budget):
            taken.append(u)
            budget -= size
        else:
            too_large[u] = {"size": size, "sha256": cast("JSON", _sha256(top / u))}
    return taken, too_large


def _diff_index(diff_path: Path) -> Path:
    """The copy of git's index that a diff's untracked files are added to."""
    return diff_path.with_name(f".{diff_path.name}.index")


def _fresh_index(index: Path, copy: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        copy.unlink()
    if index.exists():  # none yet in a repository without a commit
        copy_and_hash(index, copy, None)


def _start_adding(
    runner: Runner, top: Path, index: Path, diff_path: Path, paths: Sequence[str], *, environ: Mapping[str, str]
) -> Callable[[], bytes]:
    """git add --intent-to-add of paths to a fresh copy of the index, started now; the
    returned callable waits for it (_write_git_diff takes it)."""
    copy = _diff_index(diff_path)
    _fresh_index(index, copy)
    stdin = b"".join(os.fsencode(p) + b"\0" for p in paths)
    return git_start(runner, top, *GIT_ADD_INTENT, env=git_environment(environ, index=copy), stdin=stdin)


def _add_intent(runner: Runner, top: Path, untracked: Sequence[str], *, env: Mapping[str, str]) -> None:
    """git add --intent-to-add of the untracked files that are still there: one deleted since
    git status listed it (another program's temporary file) is no longer part of the tree,
    and git refuses a path that matches nothing. Asked again while files keep vanishing."""
    present, base = list(untracked), f"{top}/"  # Speed: str paths, looked up only after a refusal
    for attempt in range(3):
        try:
            run_git(runner, top, *GIT_ADD_INTENT, env=env, stdin=b"".join(os.fsencode(u) + b"\0" for u in present))
            return
        except CaptureError:
            still = [u for u in present if os.path.lexists(base + u)]
            if attempt == 2 or len(still) == len(present):
                raise  # not a vanished file
            present = still


def _write_git_diff(
    runner: Runner,
    top: Path,
    index: Path,
    diff_path: Path,
    *,
    base: str,
    untracked: list[str],
    whole: tuple[list[str], list[tuple[str, tuple[int, ...] | None]]] | None = None,
    adding: Callable[[], bytes] | None = None,
    environ: Mapping[str, str],
) -> None:
    """The diff of the working tree against base, with the untracked files given; whole:
    _whole_directories() of them, tried first; adding: _start_adding() of whole's paths."""
    tmp_index, tmp_diff = _diff_index(diff_path), diff_path.with_name(f".{diff_path.name}.part")
    specs, stamps = whole or (untracked, [])
    env = git_environment(environ, index=tmp_index if untracked else None)
    try:
        for attempt in [specs, untracked] if untracked else []:  # directories whole, else file by file
            started, adding = adding, None
            try:
                if started is None:
                    raise CaptureError("not started")
                started()
            except CaptureError:  # not started, or refused (a file vanished): added here, asked again
                _fresh_index(index, tmp_index)
                _add_intent(runner, top, attempt, env=env)
            if all(_stat_key(d, follow=False) == stamp for d, stamp in stamps):
                break  # no directory added whole has changed since before status listed its files
        run_git(runner, top, *GIT_DIFF, f"--output={tmp_diff}", base, env=env)  # git writes it: no copy in memory
        os.replace(tmp_diff, diff_path)
    finally:
        if adding is not None:  # started, never waited for: reaped
            with contextlib.suppress(Exception):
                adding()
        for path in (tmp_index, tmp_diff):
            with contextlib.suppress(OSError):
                path.unlink()


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
        info["flags"] = cast("list[JSON]", sorted(flags.split()))
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
    names = {("1", "Data"): "l1_data", ("1", "Instruction"): "l1_instruction", ("2", "Unified"): "l2"}
    names[("3", "Unified")] = "l3"
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
        return int(cast("int", hz[0])) if isinstance(hz, list) else None
    return None


CACHE_DIR = ".capsula_cache"  # in the root, unless CAPSULA_CACHE_DIR names another folder


def cache_directory(root: Path, environ: Mapping[str, str]) -> Path | None:
    """Where facts kept between runs live: outside the vault, ignoring itself as
    .pytest_cache does (a .gitignore holding ``*``); None when it cannot be made.
    Deleting it loses nothing."""
    path = Path(environ.get("CAPSULA_CACHE_DIR") or root / CACHE_DIR)
    ignore = b"*\n# made by capsula: facts kept between runs\n"
    try:
        if not (path / ".gitignore").exists():
            # made whole beside it, then renamed into place: git never sees it without its .gitignore
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{os.getpid()}.{time.monotonic_ns()}")
            os.mkdir(tmp)
            try:
                (tmp / ".gitignore").write_bytes(ignore)
                os.rename(tmp, path)
            except OSError:  # made meanwhile by another process, or by hand without one
                with contextlib.suppress(OSError):
                    os.unlink(tmp / ".gitignore")
                os.rmdir(tmp)
                if not (path / ".gitignore").exists():
                    write_bytes_atomic(path / ".gitignore", ignore)
    except (OSError, CapsulaError):
        return None
    return path


def scratch_directory(root: Path) -> Path:
    """The cache directory, where rerun and verify keep their temporary files."""
    path = cache_directory(root, os.environ)
    if path is None:
        raise VaultError(f"cannot make {root / CACHE_DIR}; set CAPSULA_CACHE_DIR to a folder you can write")
    return path


_HOST_FACTS: dict[str, dict[str, JSON]] = {}


class HostCache:
    """Facts that do not change while the machine is up (platform, CPU), kept in the cache
    directory under a key of host, boot id, interpreter, py-cpuinfo install and user: a
    reboot, another host or an upgrade reads them afresh, and no user reads a file another
    could have written (a shared CAPSULA_CACHE_DIR). Speed: py-cpuinfo's probe takes 1 s."""

    def __init__(self, directory: Path | None, cpuinfo_stamp: str | None) -> None:
        import zlib  # a checksum is enough for a file name, and cheaper to import than hashlib

        boot = read_boot_id()
        raw = f"{hostname()}|{boot}|{sys.executable}|{sys.version}|{cpuinfo_stamp}|{getattr(os, 'geteuid', int)()}"
        self.path = directory / f"host-{zlib.crc32(raw.encode()):08x}.json" if boot and directory else None
        cached = _HOST_FACTS.get(raw) or (read_json(self.path, own=True) if self.path else None)
        self.data: dict[str, JSON] = cached if isinstance(cached, dict) and cached.get("key") == raw else {"key": raw}
        _HOST_FACTS[raw] = self.data  # read once per process

    def get(self, key: str, compute: Callable[[], JSON]) -> JSON:
        if key not in self.data:
            self.data[key] = compute()
            if self.path is not None:
                with contextlib.suppress(CapsulaError):
                    write_json(self.path, self.data, mode=0o600)  # facts recorded: only this user's
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
        info = dict(cast("dict[str, JSON]", cache.get("cpu", _cpuinfo_dict))) if has_cpuinfo else cpu_from_system()
    except Exception as exc:  # noqa: BLE001 - CPU facts are optional; record why they are missing
        return {"error": f"{type(exc).__name__}: {exc}"}
    hz = current_hz()
    if hz is not None:
        info.update(hz_fields("actual", hz))
    return info


def _cpuinfo_dict() -> JSON:
    import cpuinfo  # type: ignore[import-not-found,import-untyped,unused-ignore]  # optional: capsula[cpu]

    return dict(cpuinfo.get_cpu_info())


def collect_packages(path: Sequence[str] | None = None) -> dict[str, JSON]:
    """Installed distributions, found as importlib.metadata finds them (the .dist-info and
    .egg-info entries of each folder on sys.path, the first of a name winning, as at import
    time): name -> version, and the source of direct-URL and editable installs. Speed:
    importlib.metadata's import (email, zipfile, csv) costs more than reading the headers."""
    out: dict[str, JSON] = {}
    for folder in sys.path if path is None else path:
        try:
            with os.scandir(folder or ".") as it:
                found = sorted(e.path for e in it if e.name.lower().endswith((".dist-info", ".egg-info")))
        except OSError:  # missing, not a folder, or a zip file: importlib reads no metadata there either
            continue
        for info in found:
            name, version = _name_and_version(_read_head(info))
            key = re.sub(r"[-_.]+", "-", name).lower()
            if not name or key in out:
                continue
            entry: dict[str, JSON] = {"name": name, "version": version}
            with contextlib.suppress(OSError, ValueError, AttributeError):
                with open(os.path.join(info, "direct_url.json"), "rb") as f:
                    data = json.loads(f.read())
                entry["source"] = strip_credentials(str(data.get("url", "")))
                entry["editable"] = bool(data.get("dir_info", {}).get("editable", False))
                if "vcs_info" in data:
                    entry["commit"] = data["vcs_info"].get("commit_id")
            out[key] = entry
    return dict(sorted(out.items()))


def _read_head(info: str) -> str:
    """The start of a distribution's metadata, where its headers are: METADATA of a
    .dist-info, PKG-INFO of an .egg-info folder, or the .egg-info file itself."""
    for candidate in (os.path.join(info, "METADATA"), os.path.join(info, "PKG-INFO"), info):
        with contextlib.suppress(OSError):
            with open(candidate, "rb") as f:
                return f.read(1 << 16).decode("utf-8", "replace")
    return ""


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


def run_pre_capture_command(
    command: str, *, cwd: Path, env: Mapping[str, str], patterns: Sequence[str]
) -> CommandRecord:
    """Run one pre-capture command through the shell and record how it ended, with the
    text of the last TEXT_LIMIT bytes of its output (credentials in it redacted)."""
    start = time.perf_counter()
    code, out, err = start_process(["/bin/sh", "-c", command], cwd=cwd, env=env, tail=TEXT_LIMIT)()
    stdout, stderr = (redact_text(data.decode(errors="replace"), patterns) for data in (out, err))
    duration = time.perf_counter() - start
    return {"command": command, "exit_code": code, "stdout": stdout, "stderr": stderr, "duration": round(duration, 6)}


# --- Where a run happens: GPUs, conda, containers, clusters, lock files ------------------
# Each is read without configuration, never fails a capture (what cannot be read is
# recorded as {"unavailable": why}), and is parsed from a program's output or a file by a
# pure function, tested on real sample output.

PROBE_SECONDS = 10.0  # the time limit of a program asked for facts (nvidia-smi, rocm-smi, scontrol)


_PROCESS_FACTS: dict[tuple[object, ...], Any] = {}  # facts that cannot change within one process


def per_process(key: tuple[object, ...], compute: Callable[[], T]) -> T:
    """compute(), once per process for this key (a forked child computes its own). Speed:
    a decorated function's every call would otherwise look them up again."""
    key = (os.getpid(), *key)
    if key not in _PROCESS_FACTS:
        _PROCESS_FACTS[key] = compute()
    return cast("T", _PROCESS_FACTS[key])


def on_path(name: str, environ: Mapping[str, str]) -> str | None:
    """The program ``name`` as the run's PATH finds it, or None (looked up once per process)."""
    return per_process(("on_path", name, environ.get("PATH")), functools.partial(_on_path, name, environ))


def _on_path(name: str, environ: Mapping[str, str]) -> str | None:
    for directory in os.get_exec_path(environ):
        path = os.path.join(directory, name)
        if os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    return None


def run_probe(args: Sequence[str], *, cwd: Path, env: Mapping[str, str]) -> str:
    """Run a program that reports facts, within PROBE_SECONDS, and return its stdout;
    OSError says why not (missing, failed, too slow)."""
    import subprocess

    try:
        done = subprocess.run(
            list(args), cwd=cwd, env=dict(env), stdin=subprocess.DEVNULL, capture_output=True, timeout=PROBE_SECONDS
        )
    except subprocess.TimeoutExpired:
        raise OSError(f"{os.path.basename(args[0])} did not answer within {PROBE_SECONDS:g} s") from None
    if done.returncode != 0:
        said = " ".join(done.stderr.decode(errors="replace").split())[:200] or "no message"
        raise OSError(f"{os.path.basename(args[0])} exited with code {done.returncode}: {said}")
    return done.stdout.decode(errors="replace")


GPU_VISIBILITY = ("CUDA_VISIBLE_DEVICES", "NVIDIA_VISIBLE_DEVICES", "HIP_VISIBLE_DEVICES", "ROCR_VISIBLE_DEVICES")


def parse_nvidia_smi(xml: str, compute_caps: str = "") -> dict[str, JSON]:
    """`nvidia-smi -q -x`: the driver and CUDA versions and, per GPU (in nvidia-smi's index
    order), what tells it apart; compute_caps: `--query-gpu=uuid,compute_cap --format=csv,noheader`."""
    from xml.etree import ElementTree  # expat: a DOCTYPE is not fetched, no entity expanded

    root = ElementTree.fromstring(xml)
    caps = dict(line.split(", ", 1) for line in compute_caps.splitlines() if line.count(", ") == 1)

    def text(element: Any, path: str) -> str | None:
        value = (element.findtext(path) or "").strip()
        return None if value in ("", "N/A") else value

    devices: list[JSON] = []
    for index, gpu in enumerate(root.findall("gpu")):
        total = (text(gpu, "fb_memory_usage/total") or "").split()
        uuid = text(gpu, "uuid")
        devices.append(
            {
                "index": index,
                "name": text(gpu, "product_name"),
                "uuid": uuid,
                "memory_total_mib": int(total[0]) if total and total[0].isdigit() else None,
                "compute_capability": caps.get(uuid or "", "").strip() or None,
                "pci_bus_id": gpu.get("id") or text(gpu, "pci/pci_bus_id"),
            }
        )
    return {
        "driver_version": text(root, "driver_version"),
        "cuda_version": text(root, "cuda_version"),
        "devices": devices,
    }


def parse_rocm_smi(text: str) -> dict[str, JSON]:
    """`rocm-smi --showproductname --showuniqueid --showmeminfo vram --showdriverversion --json`."""
    data = json.loads(text)
    if not isinstance(data, dict):
        raise ValueError("rocm-smi's JSON is not an object")
    cards = sorted((int(k[4:]), v) for k, v in data.items() if re.fullmatch(r"card\d+", k) and isinstance(v, dict))
    system: dict[str, Any] = data["system"] if isinstance(data.get("system"), dict) else {}
    driver = system.get("Driver version") or next(
        (c.get("Driver version") for _, c in cards if c.get("Driver version")), None
    )
    devices: list[JSON] = []
    for index, card in cards:
        total = str(card.get("VRAM Total Memory (B)", ""))
        devices.append(
            {
                "index": index,
                "name": card.get("Card series") or card.get("Card Series"),
                "model": card.get("Card model") or card.get("Card Model"),
                "sku": card.get("Card SKU"),
                "unique_id": card.get("Unique ID"),
                "gfx_version": card.get("GFX Version"),
                "memory_total_bytes": int(total) if total.isdigit() else None,
            }
        )
    return {"driver_version": driver, "devices": devices}


def _nvidia_facts(path: str, *, cwd: Path, env: Mapping[str, str]) -> dict[str, JSON]:
    xml = run_probe([path, "-q", "-x"], cwd=cwd, env=env)
    try:  # compute_cap: drivers from 510 on; an older one still gives the rest
        caps = run_probe([path, "--query-gpu=uuid,compute_cap", "--format=csv,noheader"], cwd=cwd, env=env)
    except OSError:
        caps = ""
    return parse_nvidia_smi(xml, caps)


def _rocm_facts(path: str, *, cwd: Path, env: Mapping[str, str]) -> dict[str, JSON]:
    args = [path, "--showproductname", "--showuniqueid", "--showmeminfo", "vram", "--showdriverversion", "--json"]
    return parse_rocm_smi(run_probe(args, cwd=cwd, env=env))


def collect_gpus(cache: HostCache, environ: Mapping[str, str], *, cwd: Path) -> dict[str, JSON]:
    """NVIDIA and AMD GPUs as their tools report them (cached per boot, as CPU facts are),
    and which of them this run may use (the visibility variables, never cached)."""
    gpus: dict[str, JSON] = {"visible_devices": {name: environ.get(name) for name in GPU_VISIBILITY}}
    for vendor, tool, facts in (("nvidia", "nvidia-smi", _nvidia_facts), ("amd", "rocm-smi", _rocm_facts)):
        path = on_path(tool, environ)
        if path is None:
            gpus[vendor] = {"unavailable": f"{tool} is not on PATH"}
            continue
        try:
            gpus[vendor] = cache.get(f"gpus {path}", functools.partial(facts, path, cwd=cwd, env=environ))
        except OSError as exc:
            gpus[vendor] = {"unavailable": str(exc)}
        except (ValueError, SyntaxError) as exc:  # SyntaxError: ElementTree's ParseError
            gpus[vendor] = {"unavailable": f"{tool} printed what Capsula cannot read: {exc}"}
    return gpus


def parse_conda_meta(records: Iterable[Mapping[str, Any]]) -> dict[str, JSON]:
    """The packages of a conda environment, by name, from its conda-meta/*.json records:
    version, build and channel, and what remakes the exact build (its URL and md5)."""
    packages: dict[str, JSON] = {}
    for r in records:
        if isinstance(r.get("name"), str):
            channel, subdir = str(r.get("channel") or ""), str(r.get("subdir") or "")
            if subdir and channel.rstrip("/").endswith("/" + subdir):  # older conda: the channel's subdir URL
                channel = channel.rstrip("/")[: -len(subdir) - 1]
            facts = {"version": r.get("version"), "build": r.get("build"), "channel": channel or None}
            packages[r["name"]] = facts | {"url": r.get("url"), "md5": r.get("md5")}
    return dict(sorted(packages.items()))


def explicit_spec(packages: Mapping[str, JSON], platform: str | None) -> list[str]:
    """The environment as `conda list --explicit --md5` writes it: `conda create --file` remakes it."""
    lines = [
        "# This file may be used to create an environment using:",
        "# $ conda create --name <env> --file <this file>",
    ]
    lines += [f"# platform: {platform}"] if platform else []
    lines.append("@EXPLICIT")
    for p in cast("Mapping[str, dict[str, JSON]]", packages).values():
        if p.get("url"):
            lines.append(f"{p['url']}#{p['md5']}" if p.get("md5") else str(p["url"]))
    return lines


def collect_conda(prefix: str, environ: Mapping[str, str], cache: HostCache) -> dict[str, JSON] | None:
    """The conda, mamba or pixi environment the interpreter runs in (None outside one),
    read from its conda-meta directory in-process: no `conda` call, which is slow and may
    prompt. Cached while conda-meta is unchanged (installing or removing a package changes it)."""
    meta = Path(prefix) / "conda-meta"
    try:
        stamp = meta.stat().st_mtime_ns
    except OSError:
        return None
    base = Path(environ.get("CONDA_PREFIX_1") or environ.get("CONDA_ROOT") or "")
    name = (
        environ.get("CONDA_DEFAULT_ENV")
        if os.path.realpath(environ.get("CONDA_PREFIX", "")) == os.path.realpath(prefix)
        else None
    )
    if not name:
        name = "base" if (Path(prefix) / "condabin").is_dir() else Path(prefix).name

    def read() -> JSON:
        records, platform = [], None
        for entry in sorted(meta.glob("*.json")):
            with contextlib.suppress(OSError, ValueError):
                record = json.loads(entry.read_bytes())
                if isinstance(record, dict):
                    records.append(record)
                    if record.get("subdir") not in (None, "noarch"):
                        platform = platform or str(record["subdir"])
        version = None
        with contextlib.suppress(OSError):  # the conda that last changed it, as its history says
            versions = re.findall(r"^# conda version: (\S+)", (meta / "history").read_text(errors="replace"), re.M)
            version = versions[-1] if versions else None
        packages = parse_conda_meta(records)
        return {
            "conda_version": version,
            "platform": platform,
            "packages": packages,
            "explicit": cast("JSON", explicit_spec(packages, platform)),
        }

    facts = cast("dict[str, JSON]", cache.get(f"conda {prefix} {stamp}", read))
    return {"name": name, "prefix": prefix, "base": str(base) if str(base) not in ("", ".") else None, **facts}


def parse_containerenv(text: str) -> dict[str, str]:
    """Podman's /run/.containerenv: key="value" lines."""
    return {m[1]: m[2] for m in re.finditer(r'^(\w+)="(.*)"$', text, re.M)}


# What collect_container reads of the environment: the key of its facts within one process.
CONTAINER_KEYS: tuple[str, ...] = ("APPTAINER_CONTAINER", "SINGULARITY_CONTAINER", "APPTAINER_NAME")
CONTAINER_KEYS += ("SINGULARITY_NAME", "KUBERNETES_SERVICE_HOST", "HOSTNAME", "container")


def collect_container(environ: Mapping[str, str], root: Path = Path("/")) -> dict[str, JSON] | None:
    """Whether the run is inside a container, which kind, and its image and digest where the
    container shows them; None outside one. root: the file system to look at (tests)."""

    def read(rel: str) -> str | None:
        with contextlib.suppress(OSError, UnicodeDecodeError):
            return (root / rel).read_text()
        return None

    if environ.get("APPTAINER_CONTAINER") or environ.get("SINGULARITY_CONTAINER"):
        labels: dict[str, Any] = {}
        with contextlib.suppress(ValueError, TypeError):
            labels = dict(json.loads(read(".singularity.d/labels.json") or "{}"))
        image = environ.get("APPTAINER_CONTAINER") or environ.get("SINGULARITY_CONTAINER")
        digest = labels.get("org.opencontainers.image.digest") or labels.get(
            "org.label-schema.usage.singularity.deffile.from"
        )
        return {
            "runtime": "apptainer" if environ.get("APPTAINER_CONTAINER") else "singularity",
            "image": image,
            "name": environ.get("APPTAINER_NAME") or environ.get("SINGULARITY_NAME"),
            "image_digest": labels.get("org.opencontainers.image.digest"),
            "built_from": digest if digest != labels.get("org.opencontainers.image.digest") else None,
            "labels": {str(k): str(v) for k, v in labels.items()},
        }
    if (env_file := read("run/.containerenv")) is not None:
        fields = parse_containerenv(env_file)
        return {
            "runtime": "podman" if "podman" in fields.get("engine", "podman") else fields.get("engine", "podman"),
            "image": fields.get("image"),
            "image_digest": fields.get("imageid"),
            "name": fields.get("name"),
            "id": fields.get("id"),
            "engine": fields.get("engine"),
        }
    if environ.get("KUBERNETES_SERVICE_HOST"):
        namespace = read("var/run/secrets/kubernetes.io/serviceaccount/namespace")
        return {
            "runtime": "kubernetes",
            "pod": environ.get("HOSTNAME") or hostname(),
            "namespace": namespace and namespace.strip(),
            "image": None,
            "image_digest": None,
        }
    cgroup = read("proc/self/cgroup") or ""
    docker = (root / ".dockerenv").exists() or "docker" in cgroup
    if docker or environ.get("container"):
        found = re.search(r"[0-9a-f]{64}", cgroup + (read("proc/self/mountinfo") or ""))
        runtime = "docker" if docker else environ.get("container")
        return {"runtime": runtime, "id": found[0] if found else None, "image": None, "image_digest": None}
    return None


SCHEDULER_VARIABLES: dict[str, dict[str, str]] = {  # a block's field: the variable it comes from
    "slurm": {
        **{"job_id": "SLURM_JOB_ID", "array_job_id": "SLURM_ARRAY_JOB_ID", "array_task_id": "SLURM_ARRAY_TASK_ID"},
        **{"cluster": "SLURM_CLUSTER_NAME", "partition": "SLURM_JOB_PARTITION", "node_list": "SLURM_JOB_NODELIST"},
        **{"cpus_on_node": "SLURM_CPUS_ON_NODE", "cpus_per_task": "SLURM_CPUS_PER_TASK", "ntasks": "SLURM_NTASKS"},
        **{"mem_per_node_mb": "SLURM_MEM_PER_NODE", "mem_per_cpu_mb": "SLURM_MEM_PER_CPU"},
        **{"gpus": "SLURM_GPUS", "restart_count": "SLURM_RESTART_COUNT", "account": "SLURM_JOB_ACCOUNT"},
        **{"qos": "SLURM_JOB_QOS", "step_id": "SLURM_STEP_ID", "job_name": "SLURM_JOB_NAME"},
    },
    "pbs": {"job_id": "PBS_JOBID", "array_index": "PBS_ARRAY_INDEX", "array_id": "PBS_ARRAYID", "queue": "PBS_QUEUE"},
    "lsf": {"job_id": "LSB_JOBID", "array_index": "LSB_JOBINDEX", "queue": "LSB_QUEUE"},
}


def parse_scontrol_job(text: str) -> dict[str, str]:
    """`scontrol show job --oneliner ID`: its Key=Value fields (a value may hold spaces only
    in the last field, which this keeps whole)."""
    return {m[1]: m[2] for m in re.finditer(r"(?:^|\s)(\w+)=(\S*)", text)}


def collect_cluster(environ: Mapping[str, str], *, cwd: Path) -> dict[str, JSON]:
    """The batch job the run is part of, from the scheduler's variables: SLURM (with the
    batch script's hash and the time limit when `scontrol` answers in time), PBS/Torque, LSF."""
    blocks: dict[str, JSON] = {}
    for scheduler, fields in SCHEDULER_VARIABLES.items():
        found = {field: environ[var] for field, var in fields.items() if environ.get(var)}
        if found:
            blocks[scheduler] = cast("JSON", found)
    slurm = cast("dict[str, JSON] | None", blocks.get("slurm"))
    if slurm and (scontrol := on_path("scontrol", environ)):
        job = str(slurm["job_id"])
        try:
            fields = parse_scontrol_job(run_probe([scontrol, "show", "job", "--oneliner", job], cwd=cwd, env=environ))
            slurm |= {"time_limit": fields.get("TimeLimit"), "batch_host": fields.get("BatchHost")}
        except OSError as exc:
            slurm["time_limit"] = {"unavailable": str(exc)}
        try:
            import hashlib

            script = run_probe([scontrol, "write", "batch_script", job, "-"], cwd=cwd, env=environ)
            slurm["batch_script_sha256"] = hashlib.sha256(script.encode()).hexdigest()
        except OSError as exc:  # not a batch job (srun, salloc), or not allowed to read it
            slurm["batch_script_sha256"] = {"unavailable": str(exc)}
    elif slurm:
        slurm["time_limit"] = {"unavailable": "scontrol is not on PATH"}
    return blocks


def in_notebook() -> bool:
    """Whether this interpreter is a Jupyter kernel (IPython's, through ipykernel)."""
    return "ipykernel" in sys.modules


def notebook_path(environ: Mapping[str, str]) -> Path | None:
    """The notebook a kernel runs, where the kernel knows it: Jupyter Server gives its path in
    JPY_SESSION_NAME (relative to the server's root: the kernel runs in its folder), VS Code in
    ``__vsc_ipynb_file__``."""
    path = environ.get("JPY_SESSION_NAME")
    if not path:
        with contextlib.suppress(Exception):
            path = sys.modules["IPython"].get_ipython().user_ns.get("__vsc_ipynb_file__")
    if not path or not isinstance(path, str):
        return None
    return Path(path) if os.path.isabs(path) else Path.cwd() / os.path.basename(path)


def collect_notebook(capsule: Path, environ: Mapping[str, str]) -> dict[str, JSON]:
    """The notebook of the kernel this runs in: its path, and the hash and a copy of its saved
    content (what is on disk: cells run but not saved are not in it)."""
    path = notebook_path(environ)
    if path is None:
        why = "the kernel does not know its notebook (Jupyter Server sets JPY_SESSION_NAME, VS Code __vsc_ipynb_file__)"
        return {"path": None, "unavailable": why}
    stored = f"notebook/{path.name}"
    try:
        digest = copy_and_hash(path, capsule / stored, "sha256")
    except (OSError, ValueError) as exc:
        return {"path": str(path), "unavailable": f"cannot read {path}: {exc}"}
    return {"path": str(path), "hash_algorithm": "sha256", "file_hash": digest, "stored_as": stored}


LOCK_FILES = ("uv.lock", "poetry.lock", "pdm.lock", "Pipfile.lock", "pixi.lock", "conda-lock.yml", "environment.yml")


def collect_lock_files(root: Path) -> dict[str, JSON]:
    """The hashes of the lock and requirement files at the root (no configuration needed)."""
    found: dict[str, JSON] = {}
    with contextlib.suppress(OSError):
        names = sorted(n for n in os.listdir(root) if n in LOCK_FILES or re.fullmatch(r"requirements.*\.txt", n))
        for name in names:
            with contextlib.suppress(OSError):
                digest = hash_file(root / name, "sha256")  # hashlib loads OpenSSL (2-4 ms): only for a file
                found[name] = {"hash_algorithm": "sha256", "file_hash": digest, "size": (root / name).stat().st_size}
    return found


# === Vault ====================================================================


def expand_paths(specs: Sequence[FileSpec], *, root: Path, env: Mapping[str, str]) -> list[tuple[FileSpec, str]]:
    """Each listed file with its path's ``${VAR}`` taken from the run's environment
    (``results/out_${SLURM_ARRAY_TASK_ID}.txt``), and a glob expanded to what it matches."""

    def variable(match: re.Match[str]) -> str:
        return env.get(match[1] or match[2], match[0])

    found = []
    for spec in specs:
        path = re.sub(r"\$\{(\w+)\}|\$(\w+)", variable, spec.path) if "$" in spec.path else spec.path
        if any(c in path for c in "*?["):
            import glob

            matches = sorted(glob.glob(path, root_dir=root, recursive=True))
            found += [(spec, m) for m in matches] or [(spec, path)]
        else:
            found.append((spec, path))
    return found


_TAKEN: dict[tuple[str, str], int] = {}  # (vault, name): the suffix this process last took


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
    first = _TAKEN.get((str(vault), base), 0) + 1  # many capsules in one second: no probe from 1 each time
    for n in range(first, 1_000_000):
        path = vault / (base if n == 1 else f"{base}_{n}")
        try:
            path.mkdir()
            _TAKEN.clear()  # one name remembered: the newest
            _TAKEN[(str(vault), base)] = n
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
) -> FileRecord | None:
    """Hash (and copy or move) one listed file; a missing file is None and a warning. A
    file whose real path is outside the root (through a linked folder) is never moved: it
    is copied instead, and the user is told."""
    src = root / spec.path
    if not os.path.lexists(src) or src.is_dir():
        warn(f"{spec.path}: {'is a directory' if src.is_dir() else 'no such file'}; recorded as null", warnings)
        return None
    entry: FileRecord = {"hash_algorithm": spec.hash, "file_hash": None}
    move, where = spec.move, os.path.realpath(src.parent)
    if move and not is_inside(os.path.join(where, src.name), os.path.realpath(root)):
        warn(f"{spec.path}: not moved: it lies in {where}, outside the root, so it is copied instead", warnings)
        move = False
    try:
        if src.is_symlink():
            # Recorded as a link and kept as one: never followed out of the root.
            entry["symlink"] = target = os.readlink(src)
            if spec.hash and src.exists() and is_inside(src, root, real=True):
                entry["file_hash"] = hash_file(src, spec.hash)
            elif spec.hash:
                entry["note"] = "the link points outside the root or nowhere; not hashed"
            if spec.copy or spec.move:
                entry["stored_as"] = name = stored_name(spec.path, reserved)
                (capsule / name).parent.mkdir(parents=True, exist_ok=True)
                os.symlink(target, capsule / name)
                if move:
                    src.unlink()
            return entry
        entry["size"] = src.stat().st_size
        if spec.copy or spec.move:
            name = stored_name(spec.path, reserved)
            entry["file_hash"] = (move_file if move else copy_and_hash)(src, capsule / name, spec.hash)
            entry["stored_as"] = name
            entry["moved" if move else "copied"] = True
        elif spec.hash:
            entry["file_hash"] = hash_file(src, spec.hash)
        how = "moved" if entry.get("moved") else "copied" if entry.get("copied") else "hashed"
        say(f"stored {spec.path}: {how}, {spec.hash} {entry.get('file_hash')}")
    except OSError as exc:  # the file exists but could not be stored: the caller fails the capsule
        entry["error"] = user_error_text(exc)
    return entry


def file_errors(files: Mapping[str, FileRecord | None]) -> str | None:
    """One line naming the listed files that exist but could not be hashed or stored."""
    bad = [f"{path} ({e['error']})" for path, e in files.items() if e and e.get("error")]
    return f"could not store {', '.join(bad)}" if bad else None


def list_capsule_names(vault: Path) -> list[str]:
    """The vault's capsules: its directories (not links to one) but hidden ones."""
    try:
        with os.scandir(vault) as it:
            return [e.name for e in it if not e.name.startswith(".") and e.is_dir(follow_symlinks=False)]
    except OSError as exc:
        raise _unreadable_vault(vault, exc) from exc


def _unreadable_vault(vault: Path, exc: OSError) -> VaultError:
    return VaultError(f"cannot read the vault {vault}: {user_error_text(exc)}; pass --vault or -C")


def vault_entries(vault: Path) -> list[str]:
    """The names in the vault that may be capsules, unchecked (see _is_capsule). Speed: a
    listing without a DirEntry per name, for the index, which checks each name anyway."""
    try:
        return [name for name in os.listdir(vault) if not name.startswith(".")]
    except OSError as exc:
        raise _unreadable_vault(vault, exc) from exc


def _vault_names(vault: Path) -> Iterator[str]:
    """vault_entries as they are read: memory does not grow with the vault."""
    import itertools
    import operator

    try:
        entries = os.scandir(vault)
    except OSError as exc:
        raise _unreadable_vault(vault, exc) from exc
    with entries:  # Speed: names filtered by loops that run in C
        yield from itertools.filterfalse(
            operator.methodcaller("startswith", "."), map(operator.attrgetter("name"), entries)
        )


def _is_capsule(path: Path) -> bool:
    """Whether a vault entry is a capsule, as list_capsule_names takes it."""
    return os.path.isdir(path) and not os.path.islink(path)


# === Capture ==================================================================


class Capsule:
    """A capsule being written: its directory, settings and what is known so far."""

    __slots__ = ("config", "context", "manifest", "missing", "path", "room", "warnings")

    def __init__(self, *, path: Path, config: Config, manifest: Manifest | None = None) -> None:
        self.path = path
        self.config = config
        self.context: ContextRecord = {}
        self.manifest: Manifest = manifest if manifest is not None else {}
        self.warnings: list[str] = []
        self.missing: list[str] = []  # what the context could not record
        self.room: Path | None = None  # reserve_room()'s file, once it holds its blocks

    def write(self, name: str, record: object) -> None:
        write_json(self.path / name, record)

    def write_manifest(self, **updates: Any) -> None:
        """capsule.json: the small summary that `capsula list` reads, kept current."""
        self.manifest.update(cast("Manifest", updates))
        self.write(MANIFEST, self.manifest)

    @property
    def reserved(self) -> frozenset[str]:
        return RESERVED | {f"{name}.diff" for name in self.context.get("git", {})}


def default_repositories(root: Path) -> tuple[tuple[str, str], ...]:
    """Without a [capture.git] table: the repository that holds the root, if any."""
    top = find_git_top(root)
    return ((re.sub(r"[^\w.-]", "_", top.name).lstrip(".") or "repo", "."),) if top else ()


def _collector(fn: Callable[[], T], *, thread: bool) -> Callable[[], T | dict[str, JSON]]:
    """Run a collector (in a thread, to overlap with others); a failure is recorded as
    {"error": ...}: one collector failing never aborts the others."""

    def recorded() -> T | dict[str, JSON]:
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001
            return {"error": f"{type(exc).__name__}: {exc}"}

    if thread:
        return in_background(recorded)
    value = recorded()
    return lambda: value


def repositories(config: Config) -> tuple[tuple[str, str], ...]:
    """The repositories a capture records: (name, path relative to the root)."""
    return config.git_repositories if config.git_repositories is not None else default_repositories(config.root)


def collect_context(
    capsule: Capsule,
    environ: Mapping[str, str],
    *,
    cwd: Path,
    runner: Runner = start_process,
    in_place: bool = False,
    reads: dict[str, list[Callable[[], bytes]]] | None = None,
    since: float | None = None,
) -> ContextRecord:
    """Everything context.json holds but what the capture adds, with independent
    collectors running concurrently. With in_place (verify), listed files are only
    hashed, never copied or moved; the files stored so far are in capsule.context.
    reads: git's, by repository, when the capture started them early (each is taken), at
    the time since."""
    config, reads = capsule.config, {} if reads is None else reads
    repos = repositories(config)
    stamp = _cpuinfo_stamp() if config.include_cpu else None
    cache = HostCache(cache_directory(config.root, environ), stamp)
    # Threads overlap what waits on git and the disk with the rest; a decorated function's
    # calls, in a tree that stays clean, leave git nothing to do, and pay no thread for it.
    thread = len(repos) + config.include_cpu + config.include_packages > 1
    git = functools.partial(collect_git, config=config, into=capsule.path, environ=environ, runner=runner, since=since)
    pending = {
        name: _collector(functools.partial(git, name, rel, reads=reads.pop(name, None)), thread=thread)
        for name, rel in repos
    }
    cpu_facts = functools.partial(collect_cpu, cache, has_cpuinfo=stamp is not None)
    cpu = _collector(cpu_facts, thread=thread) if config.include_cpu else None
    packages = _collector(collect_packages, thread=thread) if config.include_packages else None
    wanted, slow = config.include_environment, {}  # slow: programs asked, overlapped with the rest
    if "gpus" in wanted:
        probe = any(on_path(tool, environ) for tool in ("nvidia-smi", "rocm-smi"))
        slow["gpus"] = _collector(functools.partial(collect_gpus, cache, environ, cwd=config.root), thread=probe)
    if "cluster" in wanted:
        probe = "SLURM_JOB_ID" in environ
        slow["cluster"] = _collector(functools.partial(collect_cluster, environ, cwd=config.root), thread=probe)
    context = capsule.context
    context["root_directory"], context["cwd"] = str(config.as_recorded(config.root)), str(config.as_recorded(cwd))
    context["platform"] = cast("dict[str, JSON]", cache.get("platform", collect_platform))
    context["environment_variables"] = collect_environment(
        config.environment_variables, environ, patterns=config.secret_patterns, allow=config.secret_allow
    )
    quick: dict[str, Callable[[], Any]] = {
        "conda": functools.partial(collect_conda, sys.prefix, environ, cache),
        "container": functools.partial(
            per_process, ("container", *map(environ.get, CONTAINER_KEYS)), functools.partial(collect_container, environ)
        ),
        "lock_files": functools.partial(collect_lock_files, config.root),
    }
    for name, collect in quick.items():  # while git runs
        if name in wanted:
            slow[name] = _collector(collect, thread=False)
    if in_notebook() and not in_place:
        context["notebook"] = collect_notebook(capsule.path, environ)
    listed = expand_paths(config.files, root=config.root, env=environ)
    moves = any(spec.move for spec, _ in listed)
    if not moves:  # Speed: copied and hashed while git reads the tree, which a move would change
        try:
            _collect_files(capsule, listed, in_place=in_place)
        except BaseException:
            for join in pending.values():  # no git left unreaped
                join()
            raise
    context["git"] = {name: cast("GitRecord", join()) for name, join in pending.items()}
    for name, entry in context["git"].items():
        if entry.get("withheld"):
            listed_names = ", ".join(entry.get("withheld", {}))
            warn(f"{name}: not in {name}.diff, as secrets by name ([redact] files): {listed_names}", capsule.warnings)
        if entry.get("too_large"):
            listed_names = ", ".join(entry.get("too_large", {}))
            warn(
                f"{name}: untracked files too large for {name}.diff, recorded by hash: {listed_names}", capsule.warnings
            )
    if moves:
        _collect_files(capsule, listed, in_place=in_place)
    context["cpu"] = cpu() if cpu else None
    if packages:
        context["packages"] = packages()
    for name, join in sorted(slow.items()):  # a failure is unavailable, never a missing record
        value = cast("dict[str, JSON] | None", join())
        error = value.pop("error", None) if isinstance(value, dict) and len(value) == 1 else None
        context[name] = {"unavailable": error} if error else value  # type: ignore[literal-required]
    return context


def _collect_files(capsule: Capsule, listed: Sequence[tuple[FileSpec, str]], *, in_place: bool) -> None:
    """[capture.files] into the context, each hashed, and copied or moved into the capsule as
    its spec says (with in_place, for verify, only hashed where it is). Each file is in the
    context as soon as it is stored, so that an interrupted capture still records it."""
    config = capsule.config
    capsule.context["files"] = files = {}
    for spec, path in listed:
        if in_place:
            files[path] = _hash_in_place(config.root / path, spec.hash)
        elif (spec.copy or spec.move) and not is_inside(path, config.root):
            warn(f"{path}: outside the root {config.root}; not stored", capsule.warnings)
            files[path] = None
        else:
            files[path] = capture_file(
                spec._replace(path=path),
                root=config.root,
                capsule=capsule.path,
                reserved=capsule.reserved,
                warnings=capsule.warnings,
            )


def _hash_in_place(path: Path, algorithm: str | None) -> FileRecord | None:
    try:
        return {"hash_algorithm": algorithm, "file_hash": hash_file(path, algorithm) if algorithm else None}
    except OSError:
        return None


def capture(
    config: Config | None = None,
    *,
    kind: str = "capture",
    environ: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    runner: Runner = start_process,
    manifest: Mapping[str, Any] | None = None,
) -> Capsule:
    """Create a capsule and write context.json into it; manifest: what capsule.json says
    from the start besides (the command or function, its items, its first heartbeat).

    Pre-capture commands run first, in the root; the first failure stops the capture with
    a CaptureError, and the capsule keeps what was recorded, marked as failed. A file that
    exists but cannot be stored makes the capsule incomplete (a CaptureError too).
    """
    config = config or load_config()
    environ = os.environ if environ is None else environ
    cwd = Path(cwd or os.getcwd())
    started = now()
    reads = {}
    for name, rel in () if config.pre_capture_commands else repositories(config):
        # nothing to change the tree first: git reads it while the capsule is made; a
        # failure to start is met again, and recorded, by collect_git
        with contextlib.suppress(OSError):
            reads[name] = start_git_reads(config.root / rel, environ=environ, runner=runner, watch=kind == "function")
    try:
        return _capture(
            config, kind=kind, environ=environ, cwd=cwd, runner=runner, manifest=manifest, started=started, reads=reads
        )
    finally:
        for waits in reads.values():  # not taken: the capture failed before it read them
            with contextlib.suppress(Exception):
                wait_all(waits)


def _capture(
    config: Config,
    *,
    kind: str,
    environ: Mapping[str, str],
    cwd: Path,
    runner: Runner,
    manifest: Mapping[str, Any] | None,
    started: datetime.datetime,
    reads: dict[str, list[Callable[[], bytes]]],
) -> Capsule:
    path = create_capsule_dir(config.vault, config.capsule_template, started)
    capsule = Capsule(
        path=path, config=config, manifest=cast("Manifest", new_manifest(kind, started) | dict(manifest or {}))
    )
    capsule.write_manifest()
    commands: list[CommandRecord] = []
    context = capsule.context
    context.update({"capsula_version": __version__, "timestamp": started.isoformat(), "pre_capture_commands": commands})
    try:
        for command in config.pre_capture_commands:
            child_env = {**environ, "CAPSULE_DIR": str(path)}
            record = run_pre_capture_command(command, cwd=config.root, env=child_env, patterns=config.secret_patterns)
            commands.append(record)
            say(f"pre-capture command {command!r} ended with exit code {record['exit_code']}")
            if record["exit_code"] != 0:
                stderr = " ".join(record["stderr"].split())[-300:] or "(no stderr)"
                raise CaptureError(
                    f"pre-capture command {command!r} failed with exit code {record['exit_code']}: {stderr}; "
                    f"fix it and run again (what was captured is in {path})"
                )
        collect_context(capsule, environ, cwd=cwd, runner=runner, reads=reads, since=started.timestamp())
        error = file_errors(context.get("files", {}))
        capsule.missing = missing_from(context)
    except BaseException as exc:
        status = INTERRUPTED if isinstance(exc, (Interrupted, KeyboardInterrupt)) else FAILED
        _close_context(capsule, status=status, error=str(exc) or type(exc).__name__)
        raise
    for what in capsule.missing:  # said at once; the run goes on, and its capsule says what is missing
        warn(f"the record is incomplete: {what}")
    status, _ = settle(incomplete=bool(error or capsule.missing))
    _close_context(capsule, status=status, error=error or "; ".join(capsule.missing) or None)
    if error:
        raise CaptureError(f"{error}; check free space and permissions (the capsule {path} is marked {status})")
    git = {n: {"sha": g.get("sha"), "dirty": g.get("dirty")} for n, g in context.get("git", {}).items()}
    capsule.manifest["git"] = cast("dict[str, dict[str, JSON]]", git)
    if kind == "capture":
        capsule.write_manifest(status=status, finished=now().isoformat(), error="; ".join(capsule.missing) or None)
        if config.ro_crate:
            write_capsule_crate(capsule)
    return capsule


def missing_from(context: ContextRecord) -> list[str]:
    """What a collector could not record (git missing, an unreadable repository, a diff
    that could not be written, CPU facts or packages that failed), one line each."""
    missing = [f"git {name}: {entry['error']}" for name, entry in context.get("git", {}).items() if "error" in entry]
    for key in ("cpu", "packages"):
        value = context.get(key)
        if isinstance(value, dict) and "error" in value:
            missing.append(f"{key}: {value['error']}")
    return missing


def _close_context(capsule: Capsule, *, status: str, error: str | None) -> None:
    """Write context.json as far as it got, with its status; a failed capture's capsule.json too."""
    context = capsule.context
    context.update({"config": capsule.config.as_dict(), "status": status})
    if error:
        context["error"] = error
    if capsule.warnings:
        context["warnings"] = list(capsule.warnings)
    first = ("root_directory", "cwd", "platform", "environment_variables", "git", "files", "cpu")  # 0.0.19's order
    capsule.write(CONTEXT, {k: context.get(k) for k in first if k in context} | dict(context))
    if status != COMPLETED:
        capsule.write_manifest(status=status, finished=now().isoformat(), error=error)


# === Monitor ==================================================================

DRAIN_IDLE = 1.0  # s: after the command exits, stop reading pipes that stay silent this long
DRAIN_MAX = 10.0  # s: ... or that a background child keeps busy this long


SUPERVISORS = ("slurmstepd", "systemd")  # they signal every process of a job themselves


def supervised() -> bool:
    """Whether Capsula was started by a supervisor that signals every process of the job
    itself (SLURM's slurmstepd with proctrack linuxproc or cgroup, systemd's default
    KillMode=control-group): the command then stays in Capsula's process group and the
    INT, TERM and HUP it gets are not passed on again, so that it gets each signal once."""
    try:
        return Path(f"/proc/{os.getppid()}/comm").read_text().strip() in SUPERVISORS
    except OSError:
        return False


class SignalRouter:
    """Signals while Capsula works: forwarded to the running command's process group, as a
    shell passes them on (INT, TERM, HUP, USR1, USR2, WINCH, ALRM, QUIT, CONT), and noted.
    Only INT, TERM and HUP interrupt the run: with no command running, inside
    ``interruptible()`` (a capture, storing files) one is raised once as Interrupted, so that
    the work stops and is recorded as interrupted."""

    def __init__(self) -> None:
        self.supervised = supervised()
        self.received: int | None = None  # the first that interrupts the run
        self.all: list[int] = []  # every one, in order
        self.child_pgid: int | None = None  # the running command: its process group, or with group False, its pid
        self.group = True
        self.pass_interrupts = True  # False: a supervisor signals the command itself (see supervised())
        self.raising = False
        self.on_winch: Callable[[], object] | None = None  # the command's terminals follow the window

    def _handle(self, signum: int, frame: object) -> None:
        self.all.append(signum)
        if signum == getattr(signal, "SIGWINCH", None) and self.on_winch is not None:
            self.on_winch()
        if signum not in INTERRUPT_SIGNALS:
            self._pass_on(signum)
            return
        self.received = self.received or signum
        if self.child_pgid is not None:
            if self.pass_interrupts:
                self._pass_on(signum)
        elif self.raising:
            self.raising = False  # once: what handles it must be able to write its record
            raise Interrupted(signum)

    def _pass_on(self, signum: int) -> None:
        if self.child_pgid is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                (os.killpg if self.group else os.kill)(self.child_pgid, signum)

    @contextlib.contextmanager
    def interruptible(self) -> Iterator[None]:
        self.raising = True
        try:
            yield
        finally:
            self.raising = False

    @contextlib.contextmanager
    def installed(self) -> Iterator[SignalRouter]:
        try:
            old = {s: signal.signal(s, self._handle) for s in (*INTERRUPT_SIGNALS, *PASSED_SIGNALS)}
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
        self.reader_gone = False  # what read our own fd closed it (`| head`): so is the command's
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
                return 0 if self.reader_gone else n
        try:
            n = os.readv(self.src, [buffer])
        except OSError as exc:
            if exc.errno != errno.EIO:
                raise
            n = 0  # a pseudo-terminal whose command side is closed: its end
        if n:
            self.feed(buffer[:n])
        return 0 if self.reader_gone else n

    def _lost(self, exc: OSError) -> None:
        """Our own fd failed: stop showing; a closed reader ends the stream, as the command
        would see without Capsula."""
        self.show = False
        self.reader_gone = exc.errno == errno.EPIPE

    def _show_saved(self, offset: int, count: int) -> None:
        assert self.file_fd is not None
        try:
            while count:
                sent = os.sendfile(self.out_fd, self.file_fd, offset, count)
                offset, count = offset + sent, count - sent
        except OSError:  # an O_APPEND or closed stdout: copy through memory, or stop showing
            try:
                _write_all(self.out_fd, os.pread(self.file_fd, count, offset))
            except OSError as exc:
                self._lost(exc)

    def feed(self, data: memoryview) -> None:
        self.size += len(data)
        if self.show:
            try:
                _write_all(self.out_fd, data)
            except OSError as exc:
                self._lost(exc)
        if self.file_fd is not None:
            try:
                _write_all(self.file_fd, data)
            except OSError as exc:
                self.error = (
                    f"{self.path.name} is incomplete after {self.size - len(data)} bytes: {user_error_text(exc)}"
                )
                self.close_file()

    def close_file(self) -> None:
        if self.file_fd is not None:
            os.close(self.file_fd)
            self.file_fd = None

    def close(self) -> None:
        self.close_file()
        if self.src >= 0:  # the command's next write then fails with SIGPIPE, as without us
            os.close(self.src)
            self.src = -1

    def text(self) -> tuple[str, bool]:
        """The saved output as text (its last TEXT_LIMIT bytes) and whether it was cut."""
        try:
            with open(self.path, "rb") as f:
                f.seek(max(0, self.size - TEXT_LIMIT))
                data = f.read(TEXT_LIMIT)
        except OSError:
            data = b""
        return data.decode(errors="replace"), self.size > TEXT_LIMIT


class Terminal:
    """The terminal Capsula runs in, if it owns it: handed to the command's process group as
    a shell does (Ctrl-C and Ctrl-Z reach the command, which can read the keyboard), taken
    back after with its modes restored however the run ends. When the command stops
    (Ctrl-Z), Capsula stops too, so that the shell takes over; `fg` continues both."""

    def __init__(self, pgid: int) -> None:
        self.pgid, self.fd = pgid, -1
        self.modes: list[Any] | None = None
        self.ttou: Any = None
        self.window = b""
        self.on_resize: Callable[[], object] | None = None  # the command's own terminals follow the window
        with contextlib.suppress(OSError, ValueError, AttributeError):
            fd = sys.stdin.fileno()
            if pgid > 0 and os.isatty(fd) and os.tcgetpgrp(fd) == os.getpgrp():
                self.fd = fd

    def __enter__(self) -> Terminal:
        if self.fd >= 0:
            import termios

            with contextlib.suppress(termios.error):
                self.modes = termios.tcgetattr(self.fd)
            self.ttou = signal.signal(signal.SIGTTOU, signal.SIG_IGN)
            self.window = self._window()
            self._hand_over()
        return self

    def _window(self) -> bytes:
        import fcntl
        import termios

        try:
            return fcntl.ioctl(self.fd, termios.TIOCGWINSZ, b"\0" * 8)
        except OSError:
            return b""

    def _hand_over(self) -> None:
        with contextlib.suppress(OSError):
            os.tcsetpgrp(self.fd, self.pgid)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pgid, signal.SIGCONT)  # in case it touched the terminal before it was its own

    def _take_back(self) -> None:
        import termios

        with contextlib.suppress(OSError):
            os.tcsetpgrp(self.fd, os.getpgrp())
        if self.modes is not None:
            with contextlib.suppress(termios.error):
                termios.tcsetattr(self.fd, termios.TCSADRAIN, self.modes)

    def __exit__(self, *exc: object) -> None:
        if self.fd >= 0:
            self._take_back()
            signal.signal(signal.SIGTTOU, self.ttou)

    def follow(self, pid: int) -> None:
        """If the command stopped (Ctrl-Z): take the terminal back and stop, as the shell
        expects of its job; once continued (`fg`), hand it over and continue the command.
        If the window was resized: resize the command's terminals and tell it again. The
        terminal's own SIGWINCH goes to its foreground group, the command, alone; Capsula
        sees the new size only here, so the command may have read the old one."""
        if self.fd < 0:
            return
        if self.on_resize is not None and (window := self._window()) != self.window:
            self.window = window
            self.on_resize()
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pgid, signal.SIGWINCH)
        try:
            info = os.waitid(os.P_PID, pid, os.WSTOPPED | os.WNOHANG)  # stops only: exits stay to be reaped
        except ChildProcessError:
            return
        if info is not None and info.si_code == os.CLD_STOPPED:
            self._take_back()
            os.kill(os.getpid(), signal.SIGTSTP)  # Capsula stops here until `fg`
            self._hand_over()


def _like_terminal(pty: int, of: int) -> None:
    """Give a pseudo-terminal the size of the terminal at ``of``; and no output processing,
    so that the bytes saved are the bytes the command wrote (the real terminal adds its own)."""
    import fcntl
    import termios

    with contextlib.suppress(OSError):
        fcntl.ioctl(pty, termios.TIOCSWINSZ, fcntl.ioctl(of, termios.TIOCGWINSZ, b"\0" * 8))
    with contextlib.suppress(termios.error):
        attrs = termios.tcgetattr(pty)
        attrs[1] &= ~termios.OPOST
        termios.tcsetattr(pty, termios.TCSANOW, attrs)


def _enlarge_pipe(fd: int) -> None:
    with contextlib.suppress(ImportError, OSError):
        import fcntl

        fcntl.fcntl(fd, 1031, 1 << 20)  # F_SETPIPE_SZ: fewer wake-ups for chatty commands


def _pump(
    pid: int,
    tees: Sequence[_Tee],
    *,
    beat: Callable[[], None] | None = None,
    every: float = HEARTBEAT_SECONDS,
    terminal: Terminal | None = None,
) -> tuple[int, Any]:
    """Copy the command's output as it comes until it exits and its pipes close (or stay
    silent DRAIN_IDLE seconds after it exits), calling ``beat`` every ``every`` seconds
    while it runs; return its wait status and rusage."""
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
    next_beat = time.monotonic() + every
    try:
        while True:
            if status is not None and (not open_streams or time.monotonic() - exited_at > DRAIN_MAX):
                break
            if status is None and not open_streams and pidfd is None:
                _, status, rusage = reap(pid)
                continue
            timeout = DRAIN_IDLE if status is not None else (None if pidfd is not None else 0.05)
            if beat is not None and status is None:
                wait = max(next_beat - time.monotonic(), 0.0)
                timeout = wait if timeout is None else min(timeout, wait)
            if terminal is not None and terminal.fd >= 0 and status is None:  # a stop is not on the pidfd
                timeout = 0.2 if timeout is None else min(timeout, 0.2)
            events = poller.poll(None if timeout is None else timeout * 1000)
            if terminal is not None and status is None:
                terminal.follow(pid)
            if beat is not None and status is None and time.monotonic() >= next_beat:
                beat()
                next_beat = time.monotonic() + every
            if status is not None and not events:
                break
            for fd, _ in events:
                if fd == pidfd:
                    poller.unregister(fd)
                    _, status, rusage = reap(pid)
                    exited_at = time.monotonic()
                elif not open_streams[fd].pump(view):  # the end of that stream
                    poller.unregister(fd)
                    if (ended := open_streams.pop(fd)).reader_gone:
                        ended.close()
            if status is None and pidfd is None:
                done, st, ru = reap(pid, os.WNOHANG)
                if done:
                    status, rusage, exited_at = st, ru, time.monotonic()
    finally:
        if pidfd is not None:
            os.close(pidfd)
    assert status is not None
    return status, rusage


class RunResult(NamedTuple):
    """How a command ended, as run_command saw it."""

    exit_code: int | None = None  # None: it never started
    signal_number: int | None = None  # the signal that ended it
    run_time: float = 0.0
    error: str | None = None  # why it could not run, or what of its output could not be saved
    resource_usage: dict[str, float] | None = None
    streams: tuple[tuple[str, bool, int, bool], ...] = ()  # stdout, stderr: (end text, cut, bytes, reader gone)
    out_of_memory: bool = False  # the kernel killed it for memory
    terminal: bool = False  # it wrote to pseudo-terminals, Capsula's own output being a terminal

    def fields(self) -> dict[str, JSON]:
        """post-run-info.json's keys for the run (after 0.0.19's stdout, stderr, exit_code)."""
        out: dict[str, JSON] = {}
        for key, (text, cut, size, gone) in zip(
            ("stdout", "stderr"), self.streams or (("", False, 0, False),) * 2, strict=True
        ):
            out[key], out[f"{key}_truncated"], out[f"{key}_bytes"] = text, cut, size
            if gone:  # `capsula monitor CMD | head`: the reader closed it, and so the command saw it closed
                out[f"{key}_closed_by_reader"] = True
        signal = None if self.signal_number is None else signal_name(self.signal_number)
        usage = cast("dict[str, JSON] | None", self.resource_usage)
        out.update(signal=signal, signal_number=self.signal_number, error=self.error, resource_usage=usage)
        if self.out_of_memory:
            out["out_of_memory"] = True
        if self.terminal:
            out["terminal"] = True
        return out


def oom_kills(*, cgroups: Path = Path("/proc/self/cgroup"), root: Path = Path("/sys/fs/cgroup")) -> int | None:
    """How many processes the kernel has killed for memory in Capsula's cgroup (the command's
    too): ``oom_kill`` of memory.events (cgroup v2) or memory.oom_control (v1); None where
    no cgroup says."""
    try:
        lines = cgroups.read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if not controllers:
            where = root / path.lstrip("/") / "memory.events"
        elif "memory" in controllers.split(","):
            where = root / "memory" / path.lstrip("/") / "memory.oom_control"
        else:
            continue
        with contextlib.suppress(OSError):
            if found := re.search(r"^oom_kill (\d+)$", where.read_text(), re.MULTILINE):
                return int(found[1])
    return None


def run_command(
    args: Sequence[str],
    *,
    cwd: Path,
    env: Mapping[str, str],
    capsule: Path,
    router: SignalRouter,
    beat: Callable[[], None] | None = None,
    every: float = HEARTBEAT_SECONDS,
    tty: bool = True,
) -> RunResult:
    """Run a command in its own process group, teeing its output live into the capsule. Where
    Capsula's stdout (or stderr) is a terminal, and ``tty``, the command gets a pseudo-terminal
    for it, of the terminal's size and kept so; elsewhere (pipes, files), a pipe."""
    tees: list[_Tee] = []
    oom_before = oom_kills()
    start = time.perf_counter()
    ptys = [fd for fd in (1, 2) if tty and os.isatty(fd)]
    (out_r, out_w), (err_r, err_w) = (os.openpty() if fd in ptys else os.pipe() for fd in (1, 2))
    for fd, slave in zip((1, 2), (out_w, err_w), strict=True):
        if fd in ptys:
            _like_terminal(slave, fd)
    try:
        pid = spawn(args, cwd=cwd, env=env, fds=(None, out_w, err_w), new_group=not router.supervised)
    except OSError as exc:
        os.close(out_r)
        os.close(err_r)
        code = 127 if isinstance(exc, FileNotFoundError) else 126
        what = "command not found" if code == 127 else f"cannot run the command ({user_error_text(exc)})"
        for name in (STDOUT, STDERR):
            write_bytes_atomic(capsule / name, b"")
        return RunResult(exit_code=code, error=f"{what}: {args[0]}", run_time=time.perf_counter() - start)
    finally:
        os.close(out_w)
        os.close(err_w)
    router.child_pgid, router.group, router.pass_interrupts = pid, not router.supervised, not router.supervised
    status: int | None = None
    try:
        tees = [_Tee(out_r, 1, capsule / STDOUT), _Tee(err_r, 2, capsule / STDERR)]
        for tee in tees:
            _enlarge_pipe(tee.src)
        if ptys:  # a resized window resizes the command's terminals (it gets the SIGWINCH too)

            def follow_window() -> None:
                for master, fd in ((out_r, 1), (err_r, 2)):
                    if fd in ptys:
                        _like_terminal(master, fd)

            router.on_winch = follow_window
        with Terminal(pid if router.group else -1) as terminal:
            terminal.on_resize = router.on_winch
            status, rusage = _pump(pid, tees, beat=beat, every=every, terminal=terminal)
    finally:
        if status is None:  # could not open the capsule files, or interrupted: not left behind
            with contextlib.suppress(ProcessLookupError):
                (os.killpg if router.group else os.kill)(pid, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):  # already reaped, before the failure
                reap(pid)
        router.child_pgid, router.on_winch = None, None
        for fd in (out_r, err_r)[len(tees) :]:  # a tee, once made, closes its own
            os.close(fd)
        for tee in tees:
            tee.close()
    code = os.waitstatus_to_exitcode(status)
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss is in KiB on Linux, bytes on macOS
    usage = {"user_time": round(rusage.ru_utime, 6), "system_time": round(rusage.ru_stime, 6)}
    usage["max_rss_bytes"] = rusage.ru_maxrss * scale
    oom_after = oom_kills()
    return RunResult(
        out_of_memory=code < 0 and oom_before is not None and oom_after is not None and oom_after > oom_before,
        exit_code=128 - code if code < 0 else code,
        signal_number=-code if code < 0 else None,
        run_time=time.perf_counter() - start,
        error=" ".join(tee.error for tee in tees if tee.error) or None,
        resource_usage=usage,
        streams=tuple((*tee.text(), tee.size, tee.reader_gone) for tee in tees),
        terminal=bool(ptys),
    )


def heartbeat_interval() -> float:
    """Seconds between a run's heartbeats: CAPSULA_HEARTBEAT_SECONDS, 30 by default."""
    try:
        return max(float(os.environ.get("CAPSULA_HEARTBEAT_SECONDS") or HEARTBEAT_SECONDS), 0.01)
    except ValueError:
        return HEARTBEAT_SECONDS


def first_beat(every: float) -> dict[str, JSON]:
    """capsule.json's heartbeat fields when a run starts: alive now, and beating every so often."""
    return {"heartbeat": now().isoformat(), "heartbeat_seconds": every}


class Heartbeats:
    """While decorated functions run, each capsule.json says every heartbeat_interval()
    that its run still does (a command's beats come from the pump's wait instead): a host
    that cannot see the process (a login node reading a compute node's capsule) tells a live
    run from a lost one. One thread per process beats for every running call; a call's last
    beat is written before ``beating()`` returns, never after, as the last records follow."""

    def __init__(self) -> None:
        import threading

        self.wake = threading.Condition()
        self.running: dict[int, tuple[Capsule, float, float]] = {}  # id: capsule, interval, next beat
        self.waking_at = 0.0  # when the thread wakes by itself
        threading.Thread(target=self._beat, name="capsula-heartbeat", daemon=True).start()

    def _beat(self) -> None:
        with self.wake:
            while True:
                # Idle, it still wakes now and then: a call that starts then need not wake it
                idle = time.monotonic() + HEARTBEAT_SECONDS
                self.waking_at = min((next_beat for *_, next_beat in self.running.values()), default=idle)
                self.wake.wait(max(self.waking_at - time.monotonic(), 0))
                for key, (capsule, every, next_beat) in list(self.running.items()):
                    if next_beat <= time.monotonic():
                        with contextlib.suppress(CapsulaError):
                            capsule.write_manifest(heartbeat=now().isoformat())
                        self.running[key] = (capsule, every, time.monotonic() + every)

    @contextlib.contextmanager
    def beating(self, capsule: Capsule) -> Iterator[None]:
        """Beat for capsule while the block runs, from its first_beat() on."""
        every = capsule.manifest.get("heartbeat_seconds") or heartbeat_interval()
        with self.wake:
            first = time.monotonic() + every
            self.running[id(capsule)] = (capsule, every, first)
            if first < self.waking_at:  # Speed: else the thread, awake by then, finds it (a wake: 0.06 ms)
                self.wake.notify()
        try:
            yield
        finally:
            with self.wake:
                del self.running[id(capsule)]

    _each: ClassVar[dict[int, Heartbeats]] = {}

    @classmethod
    def here(cls) -> Heartbeats:
        """This process's (a forked child starts its own: the parent's thread is not in it)."""
        return cls._each.get(os.getpid()) or cls._each.setdefault(os.getpid(), cls())


def check_items(config: Config, items: Sequence[str]) -> None:
    unknown = [i for i in items if i not in config.items]
    if unknown:
        import difflib

        where = config.source or "the configuration (none was found)"
        known = ", ".join(config.items) or "none"
        close = difflib.get_close_matches(unknown[0], list(config.items), n=1)
        hint = f"did you mean '{close[0]}'?" if close else f"known items: {known}"
        raise ConfigError(f"unknown item '{unknown[0]}': no [monitor.item.{unknown[0]}] in {where}; {hint}")


def item_paths(capsule: Capsule, items: Sequence[str], env: Mapping[str, str]) -> list[tuple[FileSpec, str]]:
    """Each file of the named items, as expand_paths() finds them."""
    return expand_paths(
        [spec for name in items for spec in capsule.config.items[name]], root=capsule.config.root, env=env
    )


def capture_items(
    capsule: Capsule,
    items: Sequence[str],
    *,
    into: dict[str, FileRecord | None],
    env: Mapping[str, str],
    before: Mapping[str, tuple[int, ...] | None],
) -> dict[str, FileRecord | None]:
    """Record the files of the named items after the run, each into ``into`` once stored; a
    file just as it was before the run (``before``) is recorded as not written by it."""
    config, warnings = capsule.config, capsule.warnings
    for spec, path in item_paths(capsule, items, env):
        if (spec.copy or spec.move) and not is_inside(path, config.root):
            warn(f"{path}: outside the root {config.root}; hashed, not stored", warnings)
            spec = spec._replace(copy=False, move=False)
        unchanged = before.get(path) is not None and before.get(path) == _stat_key(config.root / path)
        entry = capture_file(
            spec._replace(path=path),
            root=config.root,
            capsule=capsule.path,
            reserved=capsule.reserved,
            warnings=warnings,
        )
        if entry is not None and unchanged:
            entry["written_by_this_run"] = False
            warn(f"{path}: not written by this run (the same size, times and inode as before it)", warnings)
        into[path] = entry
    return into


def items_before(capsule: Capsule, items: Sequence[str], env: Mapping[str, str]) -> dict[str, tuple[int, ...] | None]:
    return {path: _stat_key(capsule.config.root / path) for _, path in item_paths(capsule, items, env)}


def monitor_command(
    args: Sequence[str],
    *,
    config: Config,
    items: Sequence[str] = (),
    cwd: Path | None = None,
    environ: Mapping[str, str] | None = None,
    rerun_of: str | None = None,
) -> tuple[int, Capsule | None]:
    """Capture the context, run the command in cwd and record the run; returns (exit
    code, capsule), the capsule None when a signal stopped the capture."""
    check_items(config, items)
    cwd = Path(cwd or os.getcwd())
    environ = dict(os.environ if environ is None else environ)
    router = SignalRouter()
    shown = redact_args(args, config.secret_patterns, config.secret_allow) if config.redact_arguments else args
    every = heartbeat_interval()
    started = {"command": list(shown), "items": list(items), "rerun_of": rerun_of} | first_beat(every)
    with router.installed():
        try:
            with router.interruptible():
                capsule = capture(config, kind="command", environ=environ, cwd=cwd, manifest=started)
        except Interrupted as exc:
            return settle(interrupted_by=exc.signum)[1], None
        root, shown_cwd = config.as_recorded(config.root), config.as_recorded(cwd)
        pre = pre_run_record("command", root=root, cwd=shown_cwd, started=now(), items=_items(config, items))
        pre["args"] = list(shown)
        if list(shown) != list(args):
            pre["args_redacted"] = True
        if rerun_of:
            pre["rerun_of"] = rerun_of
        capsule.write(PRE_RUN, pre)
        reserve_room(capsule)
        env = {**environ, "CAPSULE_DIR": str(capsule.path), "CAPSULA_CAPSULE_NAME": capsule.path.name}
        before = items_before(capsule, items, env)
        if router.received is None:

            def beat() -> None:  # the pump's wait does the waiting: no thread
                with contextlib.suppress(CapsulaError):
                    capsule.write_manifest(heartbeat=now().isoformat())

            run = run_command(
                args, cwd=cwd, env=env, capsule=capsule.path, router=router, beat=beat, every=every, tty=config.tty
            )
        else:
            run = RunResult(error="interrupted before the command started")
        files: dict[str, FileRecord | None] = {}
        with contextlib.suppress(Interrupted), router.interruptible():  # what is stored so far is recorded
            capture_items(capsule, items, into=files, env=env, before=before)
        killed = "killed for memory: the cgroup's oom_kill count rose" if run.out_of_memory else None
        error = "; ".join(filter(None, [run.error, killed, file_errors(files), *capsule.missing])) or None
        status, code = settle(
            exit_code=run.exit_code, signal=run.signal_number, interrupted_by=router.received, incomplete=bool(error)
        )
        ended = {**run.fields(), "exit_code": code if run.exit_code is None else run.exit_code, "error": error}
        ended = {k: ended[k] for k in ("stdout", "stderr", "exit_code")} | ended  # 0.0.19's order first
        if router.all:  # every signal Capsula passed on or noted, in order (TERM, then the KILL that ended it)
            ended["signals_received"] = [signal_name(n) for n in router.all]
        finish_run(capsule, run_time=run.run_time, files=files, ended=ended, status=status)
        return code, capsule


def _items(config: Config, items: Sequence[str]) -> dict[str, Sequence[FileSpec]]:
    return {name: config.items[name] for name in items}


RESERVE = f".{POST_RUN}.reserve"  # room kept in a capsule during a run, for its last records on a full disk
RESERVED_BYTES = 256 << 10


def reserve_room(capsule: Capsule) -> None:
    """Take room for the run's last records now: post-run-info.json is written into it, and
    what it leaves is free for capsule.json, so that they say how the run ended even when
    the run filled the disk."""
    try:
        fd = os.open(capsule.path / RESERVE, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    except OSError:
        return
    try:
        os.posix_fallocate(fd, 0, RESERVED_BYTES)  # real blocks, not a sparse file
        capsule.room = capsule.path / RESERVE
    except OSError:
        pass  # no room to keep: post-run-info.json is written as any file is
    finally:
        os.close(fd)


def finish_run(
    capsule: Capsule, *, run_time: float, files: dict[str, FileRecord | None], ended: dict[str, JSON], status: str
) -> None:
    """Write post-run-info.json and close capsule.json. On a full disk the reserved room is
    freed, and the record is kept without the inline output text (all of it that could be
    saved is in stdout.txt and stderr.txt)."""
    root = capsule.config.as_recorded(capsule.config.root)
    post = post_run_record(root, run_time, files=files, ended=ended, status=status)
    if capsule.warnings:
        post["warnings"] = list(capsule.warnings)
    try:
        write_json(capsule.path / POST_RUN, post, room=capsule.room)
    except VaultError as exc:  # too large for the room: freed, then the record without its output
        with contextlib.suppress(OSError):
            (capsule.path / RESERVE).unlink()
        post.update({"stdout": "", "stderr": "", "error": f"{post.get('error') or ''} {exc}".strip()})
        capsule.write(POST_RUN, post)
    try:
        capsule.write_manifest(
            status=status,
            finished=post["timestamp"],
            exit_code=post.get("exit_code"),
            run_time=post["run_time_seconds"],
            error=post.get("error") or (post.get("exception_info") or {"error_type": None}).get("error_type"),
        )
    finally:
        with contextlib.suppress(OSError):
            (capsule.path / RESERVE).unlink()
    if capsule.config.ro_crate:
        write_capsule_crate(capsule)


# === Decorator ================================================================

_CURRENT_CAPSULE: contextvars.ContextVar[Path | None] = contextvars.ContextVar("capsula_capsule", default=None)


def get_capsule_dir() -> Path:
    """The capsule of the run this code is part of: the innermost @capsula.monitor call,
    or the command run by `capsula monitor` (CAPSULE_DIR)."""
    current = _CURRENT_CAPSULE.get()
    if current is not None:
        return current
    if os.environ.get("CAPSULE_DIR"):
        return Path(os.environ["CAPSULE_DIR"])
    raise NotInRunError(
        "get_capsule_dir() was called outside a monitored run; call it inside a function decorated "
        "with @capsula.monitor or a command run by 'capsula monitor'"
    )


def get_capsule_name() -> str:
    """The name of the capsule of the run this code is part of (CAPSULA_CAPSULE_NAME)."""
    return get_capsule_dir().name


def _exception_info(exc: BaseException) -> ExceptionRecord:
    import traceback

    try:
        message = str(exc)
    except BaseException:  # noqa: BLE001 - a broken __str__ must not hide the exception itself
        message = safe_repr(exc)
    details = "".join(traceback.format_exception(exc))
    return {"error_type": type(exc).__name__, "error_message": message, "error_details": details}


@overload
def monitor(directory: Callable[P, R], /) -> Callable[P, R]: ...
@overload
def monitor(
    directory: str | os.PathLike[str] | None = None, *, items: Sequence[str] = (), include_return_value: bool = False
) -> Callable[[Callable[P, R]], Callable[P, R]]: ...
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

    def decorate(fn: Callable[P, R]) -> Callable[P, R]:
        import inspect

        source = Path(inspect.getsourcefile(fn) or inspect.getfile(fn)).absolute()
        line = fn.__code__.co_firstlineno if hasattr(fn, "__code__") else None
        where = {"source_file": str(source), "source_line": line, "function_name": fn.__name__}
        if in_notebook() and (source.parent.name.startswith("ipykernel_") or not source.is_file()):
            # defined in a cell: the notebook and the function's own text, not a kernel's scratch file
            notebook = notebook_path(os.environ)
            where["source_file"] = str(notebook) if notebook else f"{source} (a notebook cell)"
            with contextlib.suppress(OSError, TypeError):
                where["function_source"] = inspect.getsource(fn)
        config = load_config(root) if root is not None else load_config(cwd=source.parent)
        check_items(config, items)
        positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
        names = [p.name for p in inspect.signature(fn).parameters.values() if p.kind in positional]

        def hide(key: str) -> bool:
            return (
                config.redact_arguments
                and key not in config.secret_allow
                and is_secret_name(key, config.secret_patterns)
            )

        function = f"{fn.__module__}.{fn.__qualname__}"

        @functools.wraps(fn)
        def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
            started = {"function": function, "items": list(items)} | first_beat(heartbeat_interval())
            capsule = capture(config, kind="function", manifest=started)
            pre = pre_run_record(
                "function", root=config.root, cwd=Path.cwd(), started=now(), items=_items(config, items)
            )
            pre.update(cast("PreRunRecord", where))
            shown = [REDACTED if hide(name) else jsonable(a, hide=hide) for a, name in zip(args, names, strict=False)]
            shown += [jsonable(a, hide=hide) for a in args[len(shown) :]]
            pre.update({"args": shown, "kwargs": cast("dict[str, JSON]", jsonable(kwargs, hide=hide))})
            capsule.write(PRE_RUN, pre)
            reserve_room(capsule)
            before = items_before(capsule, items, os.environ)
            token = _CURRENT_CAPSULE.set(capsule.path)
            start = time.perf_counter()
            outcome: BaseException | None = None
            result: Any = None
            try:
                with Heartbeats.here().beating(capsule):
                    result = fn(*args, **kwargs)
            except BaseException as exc:  # noqa: BLE001 - recorded, then re-raised below
                outcome = exc
            finally:
                run_time = time.perf_counter() - start
                _CURRENT_CAPSULE.reset(token)
            try:
                value = jsonable(result, hide=hide) if include_return_value else None
                _finish_function(capsule, run_time, items, outcome, value, before)
            except CapsulaError as exc:  # the function's own outcome still reaches the caller
                warn(f"the run was not fully recorded: {exc}")
            if outcome is not None:
                raise outcome.with_traceback(outcome.__traceback__)
            return cast("R", result)

        return wrapper

    return decorate(func) if func is not None else decorate


def _finish_function(
    capsule: Capsule,
    run_time: float,
    items: Sequence[str],
    outcome: BaseException | None,
    value: JSON,
    before: Mapping[str, tuple[int, ...] | None],
) -> None:
    files = capture_items(capsule, items, into={}, env=os.environ, before=before)
    error = file_errors(files)
    if error:  # the function's own outcome reaches the caller; the record says what is missing
        warn(f"{error} (capsule {capsule.path})", capsule.warnings)
    code = outcome.code if isinstance(outcome, SystemExit) else None
    exit_code = code if isinstance(code, int) else (0 if code is None else 1)
    raised = type(outcome).__name__ if outcome is not None else None
    missing = "; ".join(filter(None, [error, *capsule.missing])) or None
    status, _ = settle(exit_code=exit_code, raised=raised, incomplete=missing is not None)
    info = _exception_info(outcome) if outcome is not None else None
    ended = {"return_value": value, "exception_info": cast("JSON", info), "error": missing}
    finish_run(capsule, run_time=run_time, files=files, ended=ended, status=status)


# === Reproduce ================================================================

# Fields that differ between any two runs; `capsula diff` leaves them out.
DEFAULT_IGNORES = (
    *("*timestamp", "pre.pid", "pre.pid_start", "pre.boot_id", "pre.rerun_of", "post.run_time_seconds"),
    "post.resource_usage",
    *("post.stdout", "post.stderr"),  # compared as stdout.txt / stderr.txt, with a unified diff
    *("context.cpu.hz_actual*", "context.pre_capture_commands.*.duration", "context.config", "context.git.*.diff_file"),
    *(
        "context.cluster.*.job_id",
        "context.cluster.*.array_job_id",
        "context.cluster.*.step_id",
        "context.conda.explicit",
    ),
)


def summarize(path: Path, *, host: str, boot_id: str | None) -> dict[str, JSON]:
    """One row of `capsula list`, read from capsule.json alone when it is there."""
    try:
        manifest: Manifest = cast("Manifest", read_part(path, MANIFEST, []))
        if not manifest.get("status"):
            manifest = manifest_of(read_capsule(path))
    except VaultError:
        manifest = {"status": "unreadable"}
    return _row(path.name, manifest, host=host, boot_id=boot_id)


def _row(name: str, manifest: Manifest, *, host: str, boot_id: str | None) -> dict[str, JSON]:
    what = manifest.get("command") or manifest.get("function") or ""
    row: dict[str, JSON] = {"name": name, "started": manifest.get("started"), "kind": manifest.get("kind")}
    row |= {"status": status_as_read(manifest, host=host, boot_id=boot_id), "exit_code": manifest.get("exit_code")}
    row |= {"run_time": manifest.get("run_time"), "git": cast("dict[str, JSON]", manifest.get("git") or {})}
    return row | {"command": " ".join(what) if isinstance(what, list) else what, "rerun_of": manifest.get("rerun_of")}


def printable(text: str) -> str:
    """Text from a capsule, safe to print on a terminal: control characters (an escape
    sequence in a hand-made capsule's command) are shown as '?'."""
    return text if text.isprintable() else re.sub(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]", "?", text)


def table_cells(r: Mapping[str, JSON]) -> tuple[str, ...]:
    """A row of `capsula list` as the cells of its table."""
    started, run_time, git = str(r["started"] or "-")[:19].replace("T", " "), r["run_time"], r["git"]
    seconds = f"{run_time:.2f}s" if isinstance(run_time, (int, float)) else "-"
    repos = cast("dict[str, dict[str, JSON]]", git).values()
    shas = ",".join(f"{str(g['sha'])[:8]}{'*' if g.get('dirty') else ''}" for g in repos if g.get("sha"))
    code = "-" if r["exit_code"] is None else r["exit_code"]
    row = (r["name"], started, r["kind"] or "-", r["status"] or "-", code, seconds, shas or "-", r["command"] or "")
    return tuple(printable(str(c)) for c in row)


def print_table(columns: Sequence[Sequence[str]]) -> None:
    """Print the 8 columns of `capsula list` as aligned lines, the command last. Speed: the
    widths come from whole columns, and one format string lays out every line."""
    head = ("NAME", "STARTED", "KIND", "STATUS", "EXIT", "TIME", "GIT", "COMMAND")
    widths = [max(len(head[i]), max(map(len, column), default=0)) for i, column in enumerate(columns[:7])]
    line = "  ".join(f"{{:<{w}}}" for w in widths) + "  {}\n"
    sys.stdout.write(line.format(*head))
    sys.stdout.writelines(map(line.format, *columns))


# The fields `list`, `latest` and `find` keep of each capsule, by the part of the index that
# holds them: a command reads only the parts it prints.
INDEX_PARTS = {
    "keys": ("name", "instant"),
    "signatures": ("signature",),  # capsule.json's inode.size.mtime_ns when the row was made
    "cells": tuple(f"cell{i}" for i in range(1, 8)),  # the columns of `capsula list`'s table after the name
    "rows": ("row",),  # the row of `capsula list --json`, as JSON text
    "files": ("algorithms", "files"),  # the hash algorithms used, and [[role, path, algorithm, hash, written], ...]
}


class Listing:
    """Capsules as `list`, `latest` and `find` see them, column by column: for each field
    read, a list with an item per capsule. Speed: 100,000 rows are matched, ordered and
    printed by loops that run in C (map, zip, join, slices), not by Python steps per cell."""

    def __init__(self, parts: Iterable[str]) -> None:
        self.parts = ("keys", *(p for p in parts if p != "keys"))
        self.columns: dict[str, list[Any]] = {c: [] for p in self.parts for c in INDEX_PARTS[p]}

    def __len__(self) -> int:
        return len(self.columns["name"])

    def __getitem__(self, column: str) -> list[Any]:
        return self.columns[column]

    def append(self, fields: Mapping[str, object]) -> None:
        for column, values in self.columns.items():
            values.append(fields[column])

    def extend(self, other: Listing) -> None:
        for column, values in self.columns.items():
            values.extend(other.columns[column])

    def positions(self) -> dict[str, int]:
        """Each name's row; the last, for a name read twice (the later segment's)."""
        return dict(zip(self["name"], range(len(self)), strict=True))

    def take(self, order: Sequence[int]) -> Listing:
        """These rows, in this order."""
        taken = Listing(self.parts)
        taken.columns = {c: list(map(values.__getitem__, order)) for c, values in self.columns.items()}
        return taken

    def newest_first(self) -> Listing:
        """Ordered by start, then name, newest first."""
        keys = list(zip(self["instant"], self["name"], strict=True))
        return self.take(sorted(range(len(keys)), key=keys.__getitem__, reverse=True))

    def cells(self) -> list[list[str]]:
        """The 8 columns of `capsula list`'s table."""
        names = self["name"]  # only a name read afresh can need printable(), so it is rarely called
        names = names if all(map(str.isprintable, names)) else list(map(printable, names))
        return [names, *(self.columns[c] for c in INDEX_PARTS["cells"])]


def _signatures(vault: Path, names: Iterable[str]) -> Iterator[str]:
    """For each capsule, what tells that it changed: capsule.json's inode, size and mtime
    (Capsula rewrites it whole, by rename, whenever the run's state changes); "" without
    one. Speed: each stat is relative to the open vault."""
    try:
        fd = os.open(vault, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        yield from ("" for _ in names)
        return
    try:
        for name in names:
            try:
                st = os.lstat(f"{name}/{MANIFEST}", dir_fd=fd)
            except OSError:
                yield ""
                continue
            yield f"{st.st_ino}.{st.st_size}.{st.st_mtime_ns}"
    finally:
        os.close(fd)


def _signed(vault: Path, names: Callable[[], Iterable[str]]) -> Iterator[tuple[str, str]]:
    """Each of these names with its capsule's signature (see _signatures), in no set order.
    Speed: the lstat of each capsule.json is most of what `list` and `find` take over a
    large vault. On Linux, in a process that runs no other thread and may use more than one
    CPU, a child process stats the names of odd hash while this one stats the others, and
    hands them over in a memory file: 1.6x as fast on two CPUs. ``names`` is called in each
    process. If the child fails, its half is stat'ed here."""
    import itertools
    import operator

    def stat(chosen: Iterable[str]) -> Iterator[tuple[str, str]]:
        chosen, named = itertools.tee(chosen)
        return zip(chosen, _signatures(vault, named), strict=True)

    try:
        alone = len(os.listdir("/proc/self/task")) == 1 and len(os.sched_getaffinity(0)) > 1
        handoff = os.memfd_create("capsula-signatures") if alone else -1
    except (OSError, AttributeError):
        handoff = -1
    if handoff < 0:
        yield from stat(names())
        return
    pid = -1
    try:
        if (pid := os.fork()) == 0:  # the child: a name and signature a record, then exit at once
            code = 1
            try:
                with open(handoff, "w", encoding="utf-8", errors="surrogateescape", closefd=False) as out:
                    out.writelines(
                        f"{name}/{signature}\0" for name, signature in stat(n for n in names() if hash(n) & 1)
                    )
                code = 0
            finally:
                os._exit(code)
        yield from stat(n for n in names() if not hash(n) & 1)
        status, pid = os.waitpid(pid, 0)[1], -1
        if status:
            yield from stat(n for n in names() if hash(n) & 1)
            return
        rest, offset = b"", 0  # a name holds no "/" and no NUL
        while block := os.pread(handoff, INDEX_BLOCK, offset):
            offset, block = offset + len(block), rest + block
            cut = block.rfind(b"\0") + 1
            rest, records = block[cut:], block[: cut - 1].decode("utf-8", "surrogateescape").split("\0") if cut else []
            yield from (
                (name, signature) for name, _, signature in map(operator.methodcaller("partition", "/"), records)
            )
    finally:
        os.close(handoff)
        if pid > 0:  # left before the child was waited for
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)


def _listed(path: Path, signature: str, *, host: str, boot_id: str | None) -> dict[str, object]:
    """Read one capsule for `list`, `latest` and `find`: every field of INDEX_PARTS."""
    files: list[JSON] = []
    try:
        record = read_capsule(path)
        manifest = manifest_of(record)
        for role, recorded in (("input", record.context.get("files", {})), ("output", record.post.get("files", {}))):
            for name, e in recorded.items():
                algorithm, file_hash = (e.get("hash_algorithm"), e.get("file_hash")) if e else (None, None)
                if (
                    e
                    and isinstance(algorithm, str)
                    and re.fullmatch(r"[\w-]+", algorithm)
                    and isinstance(file_hash, str)
                ):
                    files.append([role, name, algorithm, file_hash, e.get("written_by_this_run")])
    except VaultError:
        manifest = {"status": "unreadable"}
    row = _row(path.name, manifest, host=host, boot_id=boot_id)
    fields: dict[str, object] = {"name": path.name, "instant": instant(row["started"]), "signature": signature}
    fields |= zip(INDEX_PARTS["cells"], table_cells(row)[1:], strict=True)
    fields |= {"row": json.dumps(row, ensure_ascii=False), "files": json.dumps(files, ensure_ascii=False)}
    return fields | {"algorithms": " ".join(sorted({str(f[2]) for f in files}))}  # type: ignore[index]


INDEX_SEGMENTS_MAX = 16  # more segments than this are merged into one
INDEX_MAGIC = b"capsula-index 3"
INDEX_COLUMNS = tuple(column for names in INDEX_PARTS.values() for column in names)
INDEX_BLOCK = 1 << 16  # bytes read, or lines written, at a time


def _segment_head(count: int, spans: Sequence[tuple[int, int]]) -> bytes:
    """A segment's first line: the magic, the row count, each column's byte size and CRC-32.
    Fixed widths, so that a merge can write the columns first and the line they need last."""
    cells = ",".join(f"{size:015d}:{crc:010d}" for size, crc in spans)
    return b"%s %012d,%s\n" % (INDEX_MAGIC, count, cells.encode())


class Segment:
    """One file of the index, open, and believed only as far as it was written whole: after
    its first line (see _segment_head), each column of INDEX_COLUMNS, a line per row, newest
    row first. A column is read only once its size and CRC-32 are found as written. The file
    never changes once in place, so what was checked holds while it is open (a merge that
    deletes it meanwhile does not take it from a reader)."""

    def __init__(self, path: Path) -> None:
        """Raises OSError or ValueError for a file that is not one this version wrote whole."""
        self.fd = os.open(path, os.O_RDONLY)
        self.checked: set[str] = set()
        try:
            head = os.pread(self.fd, len(_segment_head(0, [(0, 0)] * len(INDEX_COLUMNS))), 0)
            magic, _, numbers = head.rstrip(b"\n").rpartition(b" ")
            count, *cells = numbers.split(b",")
            if magic != INDEX_MAGIC or len(cells) != len(INDEX_COLUMNS) or not head.endswith(b"\n"):
                raise ValueError(f"{path.name}: not an index segment of this version")
            self.count, offset, self.spans = int(count), len(head), {}
            for column, cell in zip(INDEX_COLUMNS, cells, strict=True):
                size, crc = map(int, cell.split(b":"))
                self.spans[column] = (offset, size, crc)
                offset += size
            if offset != os.fstat(self.fd).st_size:
                raise ValueError(f"{path.name}: cut short or grown")
        except BaseException:
            os.close(self.fd)
            raise

    def close(self) -> None:
        os.close(self.fd)

    def verify(self, columns: Iterable[str]) -> bool:
        """Whether these columns are as written, a line a row (each is read once for it)."""
        import zlib

        for column in set(columns) - self.checked:
            crc = lines = 0
            for block in self._bytes(column):
                crc, lines = zlib.crc32(block, crc), lines + block.count(b"\n")
            if crc != self.spans[column][2] or lines != self.count:
                return False
            self.checked.add(column)
        return True

    def _bytes(self, column: str) -> Iterator[bytes]:
        offset, size, _ = self.spans[column]
        while size > 0:
            block = os.pread(self.fd, min(size, INDEX_BLOCK), offset)
            if not block:
                raise ValueError("an index segment was cut short")
            offset, size = offset + len(block), size - len(block)
            yield block

    def text(self, column: str) -> str:
        """A column whole (for `list`, which prints it whole)."""
        offset, size, _ = self.spans[column]
        return os.pread(self.fd, size, offset).decode("utf-8", "surrogateescape")

    def blocks(self, column: str) -> Iterator[str]:
        """A column a block of whole lines at a time: memory does not grow with the vault."""
        rest = b""
        for block in self._bytes(column):
            block = rest + block if rest else block
            cut = block.rfind(b"\n") + 1
            rest = block[cut:]
            if cut:
                yield block[:cut].decode("utf-8", "surrogateescape")

    def lines(self, column: str) -> Iterator[str]:
        """A column's values, a row at a time."""
        import itertools

        return itertools.chain.from_iterable(block[:-1].split("\n") for block in self.blocks(column))


class NameSet:
    """A set of strings (or tuples of them) held as their 64-bit hashes in one open-addressed table, 8 to 16
    bytes an item where a set of str takes about a hundred: a vault-wide command holds no
    name of the vault. Two strings of one hash count as one; Python keys its hash anew in
    each process, so the odds are n²/2⁶⁵ for n items (3e-10 for 100,000), per command, and
    never for the same two strings again. Each slot has a mark, for the caller's use."""

    def __init__(self, capacity: int) -> None:
        import array

        size = 1 << (capacity + capacity // 2 + 1).bit_length()  # at most two thirds full
        self.mask = size - 1
        self.hashes = array.array("q", bytes(8 * size))  # 0: an empty slot
        self.marks = bytearray(size)

    def add(self, items: Iterable[Hashable], slots: array.array[int] | None = None) -> None:
        """Add these items; append the slot of each to ``slots``."""
        hashes, mask = self.hashes, self.mask
        for h in map(hash, items):
            h = h or 1
            i = h & mask
            while (held := hashes[i]) != h:
                if not held:
                    hashes[i] = h
                    break
                i = (i + 1) & mask
            if slots is not None:
                slots.append(i)

    def slots(self, items: Iterable[T]) -> Iterator[tuple[T, int]]:
        """Each item with its slot, or -1 for one not in the set."""
        hashes, mask = self.hashes, self.mask
        for item in items:
            h = hash(item) or 1
            i = h & mask
            while (held := hashes[i]) != h:
                if not held:
                    i = -1
                    break
                i = (i + 1) & mask
            yield item, i


class VaultIndex:
    """What `list`, `latest` and `find` need of each capsule whose run has ended, kept so
    that a vault of 100,000 capsules is not read whole every time. It lives in the cache
    directory, never in the vault, and deleting it loses nothing. Processes on any number
    of hosts may share it on a network filesystem without locks: it is a set of immutable
    segment files, each written whole and renamed into place, and a row is used only while
    the capsule's capsule.json has the inode, size and mtime it had when the row was made;
    a capsule made or changed since is read afresh. Used as a context manager: it holds
    its segments open, each checked for the columns the command reads."""

    def __init__(self, vault: Path, cache: Path | None, columns: Iterable[str] = ()) -> None:
        import zlib

        key = zlib.crc32(os.fsencode(os.path.realpath(vault)))
        self.dir = cache / f"index-{key:08x}" if cache else None
        self.segments: list[str] = []
        self.outdated: list[str] = []  # an earlier version's files, deleted by the next merge
        with contextlib.suppress(OSError):
            for name in os.listdir(self.dir or ""):
                if name.endswith((".seg", ".keys", ".tsv")):
                    (self.segments if name.endswith(".seg") else self.outdated).append(name)
        self.segments.sort()
        self.merge_due = len(self.segments) >= INDEX_SEGMENTS_MAX
        self.opened: list[Segment] = []  # the segments this version wrote whole, oldest first
        self.slots: list[array.array[int]] = []  # for each, the slot of each row in match()'s set
        for name in self.segments:
            with contextlib.suppress(OSError, ValueError):
                segment = Segment(self.dir / name)  # type: ignore[operator]
                if segment.verify(INDEX_COLUMNS if self.merge_due else columns):
                    self.opened.append(segment)
                else:
                    segment.close()

    def __enter__(self) -> VaultIndex:
        return self

    def __exit__(self, *exc: object) -> None:
        for segment in self.opened:
            segment.close()

    def size(self) -> int:
        return sum(segment.count for segment in self.opened)

    def read(self, parts: Iterable[str]) -> Listing:
        """Every segment's rows, whole (a capsule indexed twice appears twice, the later last)."""
        listing = Listing(parts)
        for segment in self.opened:
            for column, values in listing.columns.items():
                lines = segment.text(column).split("\n")
                lines.pop()  # after the last line's end
                values.extend(map(float, lines) if column == "instant" else lines)
        return listing

    def match(self, vault: Path) -> tuple[NameSet, list[tuple[str, str]]]:
        """The rows that hold a capsule of the vault as it is, as a set of (name, signature)
        in which each such row's slot is marked; and the capsules no row holds as they are,
        with their signatures (to be read afresh). Memory: a slot per row, whatever the
        vault holds."""
        import array

        current = NameSet(self.size())
        self.slots = [array.array("i") for _ in self.opened]
        for segment, slots in zip(self.opened, self.slots, strict=True):
            current.add(zip(segment.lines("name"), segment.lines("signature"), strict=True), slots)
        unheld = []
        for key, slot in current.slots(_signed(vault, lambda: _vault_names(vault))):
            if slot >= 0:
                current.marks[slot] = 1
            elif _is_capsule(vault / key[0]):
                unheld.append(key)
        return current, unheld

    def add(self, fresh: Listing, *, merge_with: Listing | None = None) -> None:
        """Keep the rows of capsules read afresh whose run has ended, in a new segment, or,
        when a merge is due, in one segment with ``merge_with`` that replaces them all."""
        rows = fresh.take(self.keepable(fresh))
        if merge_with is not None:
            rows.extend(merge_with)
        if not len(rows):
            return
        rows = rows.newest_first()
        instants = list(map(repr, rows["instant"]))
        self._write(len(rows), lambda column: instants if column == "instant" else rows[column], merge_with is not None)

    def merge(self, current: NameSet, fresh: Listing) -> None:
        """Replace every segment by one holding, newest first, the rows marked in ``current``
        (see match; each capsule once, from the later segment) and the rows of capsules read
        afresh. Memory: each segment is read a column at a time, as it comes; what is held
        is a byte a row."""
        import array
        import heapq
        import itertools

        keeps: list[bytearray] = []
        for slots in reversed(self.slots):  # a capsule's row in the later segment is kept
            keep = bytearray()
            for slot in slots:
                kept = current.marks[slot] == 1
                keep.append(kept)
                if kept:  # 3: in the vault as the row holds it, and taken
                    current.marks[slot] = 3
            keeps.insert(0, keep)
        rows = fresh.take(self.keepable(fresh)).newest_first()
        rows.columns["instant"] = list(map(repr, rows["instant"]))
        streams: list[Iterator[tuple[float, str, int]]] = [
            itertools.compress(zip(map(float, s.lines("instant")), s.lines("name"), itertools.repeat(i)), keep)
            for i, (s, keep) in enumerate(zip(self.opened, keeps, strict=True))
        ]
        streams.append(zip(map(float, rows["instant"]), rows["name"], itertools.repeat(len(keeps))))
        order = array.array("H", (source for _, _, source in heapq.merge(*streams, reverse=True)))

        def column(name: str) -> Iterator[str]:
            sources: list[Iterator[str]] = [
                itertools.compress(s.lines(name), keep) for s, keep in zip(self.opened, keeps, strict=True)
            ]
            sources.append(iter(rows[name]))
            return map(next, map(sources.__getitem__, order))

        self._write(len(order), column, True)

    @staticmethod
    def keepable(fresh: Listing) -> list[int]:
        """The rows of ``fresh`` to keep: runs that have ended, whose fields a line can hold
        (others are read afresh each time)."""
        return [
            i
            for i, name in enumerate(fresh["name"])
            if fresh["cell3"][i] in FINAL_STATUSES
            and fresh["signature"][i]
            and name.isprintable()
            and not any("\n" in values[i] for column, values in fresh.columns.items() if column != "instant")
        ]

    def _write(self, count: int, column: Callable[[str], Iterable[str]], replacing: bool) -> None:
        """Write a segment of ``count`` rows, a column at a time, and rename it into place;
        when ``replacing``, delete the segments there were. Nothing is written where the
        cache cannot be (the index is only ever a shortcut)."""
        import itertools
        import uuid
        import zlib

        if self.dir is None:
            return
        with contextlib.suppress(OSError):
            self.dir.mkdir(exist_ok=True)
            name = f"{time.time_ns():020d}-{uuid.uuid4().hex}.seg"
            tmp = self.dir / f".{name}.tmp"
            try:
                with open(tmp, "wb") as f:
                    f.seek(len(_segment_head(count, [(0, 0)] * len(INDEX_COLUMNS))))
                    spans = []
                    for names in INDEX_COLUMNS:
                        size = crc = lines = 0
                        values = iter(column(names))
                        while block := list(itertools.islice(values, INDEX_BLOCK)):
                            data = ("\n".join(block) + "\n").encode("utf-8", "surrogateescape")
                            f.write(data)
                            size, crc, lines = size + len(data), zlib.crc32(data, crc), lines + len(block)
                        if lines != count:
                            raise OSError(f"an index column of {lines} rows, not {count}")
                        spans.append((size, crc))
                    f.seek(0)
                    f.write(_segment_head(count, spans))
                os.replace(tmp, self.dir / name)
            finally:
                with contextlib.suppress(OSError):
                    tmp.unlink()
            for old in self.segments + self.outdated if replacing else ():
                with contextlib.suppress(OSError):
                    os.unlink(self.dir / old)


# A run with one of these has ended: its row no longer changes ("running" depends on who looks, and when).
FINAL_STATUSES = (COMPLETED, FAILED, INCOMPLETE, INTERRUPTED)


def _without_gc(fn: Callable[P, R]) -> Callable[P, R]:
    """Run ``fn`` with the cycle collector paused. Speed: a vault-wide command makes a few
    hundred thousand tuples and lists, none in a cycle, and the collector would scan them
    again and again for nothing (a tenth of `capsula list` over 100,000 capsules)."""

    @functools.wraps(fn)
    def paused(*args: P.args, **kwargs: P.kwargs) -> R:
        import gc

        enabled = gc.isenabled()
        gc.disable()
        try:
            return fn(*args, **kwargs)
        finally:
            if enabled:
                gc.enable()

    return paused


def _read_afresh(vault: Path, names: Iterable[tuple[str, str]]) -> Listing:
    """These capsules (name, signature) read whole, as rows for the index."""
    host, boot = hostname(), read_boot_id()
    fresh = Listing(INDEX_PARTS)
    for name, signature in names:
        fresh.append(_listed(vault / name, signature, host=host, boot_id=boot))
    return fresh


@_without_gc
def list_capsules(
    vault: Path, cache: Path | None = None, parts: Iterable[str] = ("cells",), *, ordered: bool = True
) -> Listing:
    """Every capsule in the vault (newest first when ``ordered``), with the parts of
    INDEX_PARTS asked for: from the index where it holds the capsule as it is, read afresh
    (and then indexed) where not. Memory: all of it, as all of it is printed."""
    import itertools
    import operator

    parts = ("signatures", *parts)
    with VaultIndex(vault, cache, [c for p in ("keys", *parts) for c in INDEX_PARTS[p]]) as index:
        stored = index.read(INDEX_PARTS if index.merge_due else parts)
        listed = vault_entries(vault)
        signed = list(_signed(vault, lambda: listed))
        names, signatures = list(map(operator.itemgetter(0), signed)), list(map(operator.itemgetter(1), signed))
        # A row is used only while capsule.json is as it was when the row was made. Speed: the
        # rows are matched by loops that run in C; a name's last row is its newest.
        position = stored.positions()
        rows = list(map(position.get, names, itertools.repeat(len(stored))))  # len(stored): no row
        same = list(map(str.__eq__, map([*stored["signature"], "\n"].__getitem__, rows), signatures))
        kept = sorted(itertools.compress(rows, same))  # segment by segment, each newest first:
        unheld = itertools.compress(zip(names, signatures, strict=True), map(operator.not_, same))
        fresh = _read_afresh(vault, [(n, s) for n, s in unheld if _is_capsule(vault / n)])
        listing = stored.take(kept)  # the sort below meets long ordered runs
        index.add(fresh, merge_with=listing if index.merge_due else None)
    listing.extend(fresh)
    return listing.newest_first() if ordered else listing


def _holds_just(vault: Path, index: VaultIndex) -> bool:
    """Whether the vault's names are just the index's, once each: the same count and the
    same sum of hashes (odds as NameSet's). Speed: counted and summed in C, where matching
    the names one by one takes a Python loop per capsule; a name starting with a dot (no
    capsule) makes them differ, for _unindexed to tell."""
    import itertools
    import operator

    names = sum(segment.count for segment in index.opened)
    total = sum(sum(map(hash, segment.lines("name"))) for segment in index.opened)
    counter = itertools.count()  # zip takes one number per name: what is left is the count
    try:
        with os.scandir(vault) as entries:
            listed = zip(map(operator.attrgetter("name"), entries), counter, strict=False)
            total -= sum(map(hash, map(operator.itemgetter(0), listed)))
    except OSError as exc:
        raise _unreadable_vault(vault, exc) from exc
    return names == next(counter) and total == 0


def _unindexed(vault: Path, index: VaultIndex) -> list[str]:
    """The capsules in the vault that the index does not hold."""
    indexed = NameSet(index.size())
    for segment in index.opened:
        indexed.add(segment.lines("name"))
    return [n for n, slot in indexed.slots(_vault_names(vault)) if slot < 0 and _is_capsule(vault / n)]


@_without_gc
def latest_capsules(vault: Path, cache: Path | None, count: int) -> list[str]:
    """The names of the ``count`` newest capsules, newest first. Speed: only the names of
    the index are read whole, and the start instants of its newest rows; the capsules it
    lacks are read whole, and so are the newest indexed ones, until the rest are older (a
    capsule whose start was changed by hand since it was indexed is placed by its start
    now, if the one it had then was among the newest). Memory: a slot per capsule."""
    import heapq

    with VaultIndex(vault, cache, ("name", "instant")) as index:
        if index.merge_due:
            current, unheld = index.match(vault)
            fresh = _read_afresh(vault, unheld)
            index.merge(current, fresh)
        else:
            unindexed = [] if _holds_just(vault, index) else _unindexed(vault, index)
            fresh = _read_afresh(vault, zip(unindexed, _signatures(vault, unindexed), strict=True))
            index.add(fresh)
        best = list(zip(fresh["instant"], fresh["name"], strict=True))
        checked = set(fresh["name"])
        newest = [zip(map(float, s.lines("instant")), s.lines("name"), strict=True) for s in index.opened]
        for when, name in heapq.merge(*newest, reverse=True):
            top = heapq.nlargest(count, best)
            if len(top) >= count and (when, name) < top[-1]:
                break
            if name not in checked and _is_capsule(vault / name):
                checked.add(name)
                best.append((_read_afresh(vault, [(name, "")])["instant"][0], name))
    return [name for _, name in heapq.nlargest(count, best)]


def resolve_capsule(spec: str, vault: Path, cache: Path | None = None) -> Path:
    """A capsule named by path, name, unique name prefix, or ``latest`` / ``latest~N``."""
    if any((Path(spec) / name).is_file() for name in (MANIFEST, CONTEXT, PRE_RUN)):
        return Path(spec).absolute()
    if match := re.fullmatch(r"latest(?:~(\d+))?", spec):
        ordered = latest_capsules(vault, cache, int(match[1] or 0) + 1)  # newest first
        if int(match[1] or 0) >= len(ordered):
            raise VaultError(f"{spec}: the vault {vault} holds {len(ordered)} capsule(s)")
        return vault / ordered[int(match[1] or 0)]
    names = list_capsule_names(vault)
    found = [spec] if spec in names else [n for n in names if n.startswith(spec)]
    if len(found) == 1:
        return vault / found[0]
    if not found:
        raise VaultError(f"no capsule {spec!r} in {vault}; run 'capsula list' to see the names")
    shown = ", ".join(sorted(found)[:3])
    raise VaultError(f"{spec!r} matches {len(found)} capsules in {vault} ({shown}, ...); give more of the name")


Key = tuple[str, ...]  # a field: the keys that lead to it
ABSENT = "<absent>"


class Finding(NamedTuple):
    """One difference: a field, its value in the first capsule and in the second (or now),
    and for files compared as text, the lines of a unified diff."""

    field: str
    old: object = None
    new: object = None
    detail: tuple[str, ...] = ()


def format_findings(findings: Sequence[Finding], *, old: str = "", new: str = "") -> list[str]:
    """The findings as lines, each value labelled (``(capsule)``, ``(now)``) when asked."""

    def shown(value: object) -> str:
        return ABSENT if value is ABSENT else json.dumps(value, ensure_ascii=False)

    return [line for f in findings for line in f.detail or [f"{f.field}: {shown(f.old)}{old} -> {shown(f.new)}{new}"]]


def flatten(data: object, prefix: Key) -> dict[Key, object]:
    """Nested tables as fields; other values (lists included) are leaves, but for lists
    of tables, whose items are fields of their own."""
    if isinstance(data, dict) and data:
        return {k: v for key, value in data.items() for k, v in flatten(value, (*prefix, str(key))).items()}
    if isinstance(data, list) and data and all(isinstance(v, dict) for v in data):
        return {k: v for i, item in enumerate(data) for k, v in flatten(item, (*prefix, str(i))).items()}
    return {prefix: data}


def _ignored(key: Key | str, patterns: Sequence[str]) -> bool:
    """Whether a field is left out: named by a pattern, whole or without its first key."""
    import fnmatch

    path = key if isinstance(key, str) else ".".join(key)
    names = (path, path.split(".", 1)[-1])
    return any(n == p or n.startswith(p + ".") or fnmatch.fnmatchcase(n, p) for p in patterns for n in names)


def compare_fields(a: Mapping[Key, object], b: Mapping[Key, object], ignore: Sequence[str] = ()) -> list[Finding]:
    """A finding for every differing field that is not ignored, the context's first."""
    keys = sorted(set(a) | set(b), key=lambda k: (k[0] != "context", k))
    pairs = [(key, a.get(key, ABSENT), b.get(key, ABSENT)) for key in keys if not _ignored(key, ignore)]
    return [Finding(".".join(key), old, new) for key, old, new in pairs if old != new]


def text_diff(a: bytes, b: bytes, label: str, *, limit: int = 200) -> list[Finding]:
    import difflib

    if a == b:
        return []
    old, new = a.decode(errors="replace").splitlines(), b.decode(errors="replace").splitlines()
    lines = list(difflib.unified_diff(old, new, f"A/{label}", f"B/{label}", lineterm=""))
    lines = lines or [f"{label}: the bytes differ ({len(a)} vs {len(b)} bytes)"]  # line endings, invalid UTF-8
    cut = [f"... {len(lines) - limit} more lines"] if len(lines) > limit else []
    return [Finding(label, len(a), len(b), tuple(lines[:limit] + cut))]


def as_redacted(record: Record) -> ContextRecord:
    """A recorded context with its environment values redacted as Capsula records them now
    (with the capsule's own [redact] settings): a value 0.0.19 kept in clear is compared as
    redacted, not reported as changed."""
    recorded = record.context.get("config", {})
    patterns = cast("list[str]", recorded.get("secret_patterns", DEFAULT_SECRET_PATTERNS))
    allow = cast("list[str]", recorded.get("secret_allow", []))
    env = record.context.get("environment_variables", {})
    kept = {k: redact_value(k, v, patterns=patterns, allow=allow) for k, v in env.items()}
    return {**record.context, "environment_variables": kept}


BIG_OUTPUT = 8 << 20  # bytes: above this, outputs are compared by a bounded, streamed report


def compare_outputs(a: Record, b: Record, name: str, *, limit: int = 200) -> list[Finding]:
    """stdout.txt or stderr.txt of two capsules: a unified diff, or above BIG_OUTPUT, in
    bounded memory, sizes and sha256 (equal: no finding), the first line that differs and
    how many lines changed (GNU diff counts them where it is installed)."""
    fa, fb = a.output_file(name), b.output_file(name)
    sizes = [f.stat().st_size if f else 0 for f in (fa, fb)]
    if fa is None or fb is None or max(sizes) <= BIG_OUTPUT:
        return text_diff(a.output(name), b.output(name), name, limit=limit)
    counted = _count_changed_lines(fa, fb)  # GNU diff runs on the other core meanwhile
    ha, hb, first = _hashes_and_first_difference(fa, fb)
    changed = counted()
    if ha == hb:
        return []
    lines = [f"{name}: {sizes[0]} bytes (sha256 {ha[:16]}...) -> {sizes[1]} bytes (sha256 {hb[:16]}...)"]
    lines.append(f"{name}: first difference at line {first}; {changed}")
    return [Finding(name, sizes[0], sizes[1], tuple(lines))]


def _hashes_and_first_difference(fa: Path, fb: Path) -> tuple[str, str, int]:
    """The sha256 of two files and the line where they first differ, in one pass by chunks
    (a line may be long)."""
    import hashlib

    da, db, first, found = hashlib.sha256(), hashlib.sha256(), 1, False
    with open(fa, "rb") as ra, open(fb, "rb") as rb:
        while (ca := ra.read(1 << 20)) + (cb := rb.read(1 << 20)):
            da.update(ca)
            db.update(cb)
            if not found and ca == cb:
                first += ca.count(b"\n")
            elif not found:  # where in these chunks: a binary search of equal prefixes
                lo, hi, va, vb = 0, min(len(ca), len(cb)), memoryview(ca), memoryview(cb)
                while lo < hi:
                    mid = (lo + hi) // 2
                    lo, hi = (mid + 1, hi) if va[: mid + 1] == vb[: mid + 1] else (lo, mid)
                first, found = first + ca[:lo].count(b"\n"), True
    return da.hexdigest(), db.hexdigest(), first


def _count_changed_lines(fa: Path, fb: Path) -> Callable[[], str]:
    """Start GNU diff on two large files; the returned callable says how many lines it
    removed and added (diff's memory, not ours)."""
    import shutil

    tool = shutil.which("diff")
    if tool is None:
        return lambda: "changed lines: not counted (no diff program on PATH)"
    formats = ("--unchanged-line-format=", "--old-line-format=-\n", "--new-line-format=+\n")
    finish = start_process([tool, "-a", *formats, str(fa), str(fb)], cwd=Path.cwd(), env=os.environ)

    def said() -> str:
        code, out, err = finish()
        if code not in (0, 1):
            return f"changed lines: not counted ({err.decode(errors='replace').strip()[:100]})"
        return f"{out.count(b'-')} lines removed, {out.count(b'+')} added"

    return said


def diff_capsules(a: Record, b: Record, *, ignore: Sequence[str] = ()) -> list[Finding]:
    """Every difference between two capsules that is not ignored; empty when they match."""
    ignore = (*DEFAULT_IGNORES, *ignore)

    def fields(r: Record) -> dict[Key, object]:
        return {**flatten(as_redacted(r), ("context",)), **flatten(r.pre, ("pre",)), **flatten(r.post, ("post",))}

    findings = compare_fields(fields(a), fields(b), ignore)
    da, db = a.diff_files(), b.diff_files()
    for name in sorted(set(da) | set(db)):
        if not _ignored(f"git.{name}.diff", ignore):
            findings += text_diff(da.get(name, b""), db.get(name, b""), f"{name}.diff")
    for name in (STDOUT, STDERR) if "command" in (a.kind, b.kind) else ():
        if not _ignored(name, ignore):
            findings += compare_outputs(a, b, name)
    return findings


def _config_from_record(record: Record, root: Path) -> Config:
    """The capsule's own capture settings (0.0.19 capsules: what its context.json names),
    each path it names checked to lie in root. The files it moved are gone: not listed."""
    recorded, context = record.context.get("config", {}), record.context
    files = tuple((p, e) for p, e in context.get("files", {}).items() if not (e and e.get("moved")))
    repos = tuple((n, g.get("path", ".")) for n, g in context.get("git", {}).items())
    for key, rel in (*((f"files.{p}", p) for p, _ in files), *((f"git.{n}.path", rel) for n, rel in repos)):
        confined(root, rel, what=f"{record.name}: {key}")
    names = recorded.get("environment_variables") or list(context.get("environment_variables", {}))
    patterns, allow = recorded.get("secret_patterns", DEFAULT_SECRET_PATTERNS), recorded.get("secret_allow", ())
    return Config(
        root,
        not_in_diff=tuple(record.post.get("files", {})),  # the run's outputs are not drift
        environment_variables=tuple(cast("list[str]", names)),
        files=tuple(FileSpec(path, (entry or {}).get("hash_algorithm")) for path, entry in files),
        git_repositories=repos,
        include_packages="packages" in context,
        secret_patterns=tuple(cast("list[str]", patterns)),
        secret_allow=tuple(cast("list[str]", allow)),
    )


# What verify compares of the GPUs: the hardware and driver a run gets.
GPU_FACTS = {"driver_version", "cuda_version", "name", "uuid", "compute_capability", "memory_total_mib"}
GPU_FACTS |= {"memory_total_bytes"}


def _verified(key: Key) -> bool:
    """Whether verify compares a field: what could change a result (not the host name,
    not timestamps, not the interpreter's path)."""
    section, rest = (key[1], key[2:]) if len(key) > 1 else ("", ())
    if section == "platform":
        return rest in (("system",), ("machine",), ("release",), ("python", "implementation"), ("python", "version"))
    if section in ("git", "files", "packages", "lock_files"):
        keep = ("sha", "branch", "dirty", "untracked", "file_hash", "version", "source", "sha256")
        return len(rest) > 1 and rest[-1] in keep
    if section == "gpus":
        return rest[:1] == ("visible_devices",) or rest[-1] in GPU_FACTS
    if section == "conda":  # each package's exact build
        return rest[:1] == ("packages",) and rest[-1] in ("version", "build", "channel")
    if section == "container":
        return rest in (("runtime",), ("image",), ("image_digest",))
    return section == "environment_variables"


def verify_capsule(record: Record, *, root: Path, scratch: Path, runner: Runner = start_process) -> list[Finding]:
    """Differences between the capsule and the current environment of the project at root
    that could change a result. Writes nothing but its scratch files, in scratch."""
    import tempfile

    config = _config_from_record(record, root)
    with tempfile.TemporaryDirectory(prefix="verify-", dir=scratch) as tmp:
        now_ctx = Capsule(path=Path(tmp), config=config)
        collect_context(now_ctx, os.environ, cwd=root, runner=runner, in_place=True)
        now_diffs = Record(Path(tmp), {}, now_ctx.context, {}, {}).diff_files()
    fa, fb = flatten(as_redacted(record), ("context",)), flatten(now_ctx.context, ("context",))
    moved = {p for p, e in record.context.get("files", {}).items() if e and e.get("moved")}
    outputs = set(config.not_in_diff)  # what the run wrote is not drift
    wanted = [k for k in set(fa) | set(fb) if _verified(k) and not (k[1] == "files" and k[2] in moved | outputs)]
    if record.legacy:  # what 0.0.19 did not record cannot have changed
        wanted = [k for k in wanted if k in fa]
    wanted = [k for k in wanted if k[1] in record.context]  # a context it did not record (turned off, older)
    findings = compare_fields({k: fa.get(k, ABSENT) for k in wanted}, {k: fb.get(k, ABSENT) for k in wanted})
    for name, patch in record.diff_files().items():
        now_patch = now_diffs.get(name, b"")
        if record.legacy:  # 0.0.19 kept the unstaged changes alone, without the final newline
            path = confined(root, record.context.get("git", {}).get(name, {}).get("path", "."), what="git path")
            now_patch = run_git(runner, path, "diff", "--no-color", "--no-ext-diff", env=git_environment(os.environ))
        if patch.rstrip(b"\n") != now_patch.rstrip(b"\n"):
            what = f"git.{name}: the uncommitted changes differ from the capsule's {name}.diff"
            findings.append(Finding(f"git.{name}.diff", detail=(what,)))
    return findings


def _code_repo(record: Record) -> tuple[str, GitRecord]:
    """The recorded repository that holds the root: the code state a rerun rebuilds."""
    for name, g in record.context.get("git", {}).items():
        if g.get("sha") and not g.get("root_in_repo", ".").startswith(".."):
            return name, g
    raise CapsulaError(
        f"{record.name} records no git commit for its root, so its code cannot be rebuilt; "
        "use 'capsula rerun --here' to rerun it in the current working tree"
    )


def rerun_args(record: Record) -> list[str]:
    args = record.pre.get("args")
    if record.kind != "command" or not args or not all(isinstance(a, str) for a in args):
        raise CapsulaError(f"{record.name} is a {record.kind} capsule; only a command capsule can be rerun")
    if record.pre.get("args_redacted") or REDACTED in args:
        raise CapsulaError(
            f"{record.name} recorded its arguments redacted ({' '.join(map(str, args))}); "
            "rerun it by hand with the real values"
        )
    return [str(a) for a in args]


def _apply(
    record: Record, repo: GitRecord, name: str, tree: Path, *, tmp: Path, env: Mapping[str, str], runner: Runner
) -> None:
    """Apply a repository's recorded changes to its rebuilt tree."""
    patch = record.inside(repo.get("diff_file", f"{name}.diff"), what=f"git.{name}.diff_file")
    text = patch.read_bytes() if patch.is_file() else b""
    if text and not text.endswith(b"\n"):  # 0.0.19 wrote its diffs without the last newline
        patch = tmp / f"{name}.diff"
        patch.write_bytes(text + b"\n")
    if text:
        run_git(runner, tree, "apply", "--binary", "--whitespace=nowarn", str(patch), env=env)


def _rebuild_submodules(
    record: Record, repo: GitRecord, top: Path, tree: Path, *, tmp: Path, env: Mapping[str, str], runner: Runner
) -> list[Path]:
    """Check each recorded submodule out in the rebuilt tree at its sha, from the user's own
    clone of it (no network), and apply its changes; returns the clones made."""
    clones = []
    for sub, entry in repo.get("submodules", {}).items():
        origin, dest = (
            confined(top, sub, what=f"{record.name}: submodule"),
            confined(tree, sub, what=f"{record.name}: submodule"),
        )
        if not entry.get("sha") or not (origin / ".git").exists():
            warn(
                f"submodule {sub}: not rebuilt ({'no sha recorded' if not entry.get('sha') else f'no clone in {origin}'})"
            )
            continue
        run_git(runner, tree, "clone", "--quiet", "--no-checkout", "--shared", str(origin), str(dest), env=env)
        clones.append(dest)
        run_git(runner, dest, "checkout", "--quiet", "--detach", str(entry.get("sha")), env=env)
        label = Path(entry.get("diff_file", "sub.diff")).stem
        _apply(record, entry, label, dest, tmp=tmp, env=env, runner=runner)
        clones += _rebuild_submodules(record, entry, origin, dest, tmp=tmp, env=env, runner=runner)
    return clones


@contextlib.contextmanager
def rebuilt_worktree(record: Record, *, source: Path, scratch: Path, runner: Runner = start_process) -> Iterator[Path]:
    """A temporary git worktree (in scratch) of the repository at source, at the recorded
    sha with the capsule's diff applied, untracked files included; yields the root in it.
    Removed afterwards, also on Ctrl-C: only that worktree, never another one's record.
    The user's own working tree, index and branches are not touched."""
    import shutil
    import tempfile

    name, repo = _code_repo(record)
    env = git_environment(os.environ)
    tmp = Path(tempfile.mkdtemp(prefix="rerun-", dir=scratch))
    tree, clones = tmp / "tree", []
    try:
        _have_commit(record, repo, name, source, env=env, runner=runner)
        run_git(runner, source, "worktree", "add", "--detach", "--quiet", str(tree), str(repo.get("sha")), env=env)
        _apply(record, repo, name, tree, tmp=tmp, env=env, runner=runner)
        top = Path(run_git(runner, source, "rev-parse", "--show-toplevel", env=env).decode().strip())
        clones += _rebuild_submodules(record, repo, top, tree, tmp=tmp, env=env, runner=runner)
        yield confined(tree, repo.get("root_in_repo", "."), what=f"{record.name}: git.{name}.root_in_repo")
    finally:
        for clone in reversed(clones):  # git will not remove a worktree that holds submodules
            shutil.rmtree(clone, ignore_errors=True)
        with contextlib.suppress(CapsulaError, OSError):
            run_git(runner, source, "worktree", "remove", "--force", str(tree), env=env)
        shutil.rmtree(tmp, ignore_errors=True)


def _have_commit(
    record: Record, repo: GitRecord, name: str, source: Path, *, env: Mapping[str, str], runner: Runner
) -> None:
    """Make sure the repository at source has the recorded commit: fetched from the capsule's
    bundle when it lacks it, and a plain message when it cannot be had."""
    sha = str(repo.get("sha"))
    if runner(["git", "cat-file", "-e", f"{sha}^{{commit}}"], cwd=source, env=env)()[0] == 0:
        return
    if repo.get("bundle"):
        bundle = record.inside(repo.get("bundle"), what=f"git.{name}.bundle")
        run_git(runner, source, "fetch", "--quiet", "--no-tags", "--no-write-fetch-head", str(bundle), sha, env=env)
        return
    raise CapsulaError(
        f"{record.name}: its commit {sha[:12]} is gone from {source} (a rebase, a squash or git gc removed it), "
        "so its code cannot be rebuilt; set keep-commits = true (and bundle = true, to carry the commit in each "
        "capsule) under [capture.git] so that later capsules keep theirs"
    )


NOISE = ("__pycache__", ".pytest_cache", ".mypy_cache", ".ruff_cache", ".ipynb_checkpoints", ".DS_Store", CACHE_DIR)


def ignored_here(project: Config, rebuilt: Path, *, runner: Runner = start_process) -> list[str]:
    """What git ignores in the project (``data/`` in .gitignore) that the rebuilt tree lacks,
    relative to the root; not the vault, the cache or tools' leftovers."""
    env = git_environment(os.environ)
    try:
        top = Path(run_git(runner, project.root, "rev-parse", "--show-toplevel", env=env).decode().strip())
        out = run_git(
            runner, project.root, "status", "--porcelain=v1", "-z", "--ignored", "--untracked-files=normal", env=env
        )
    except (CapsulaError, OSError):
        return []
    lacking = []
    for entry in out.split(b"\0"):
        if entry.startswith(b"!! "):
            path = os.path.relpath(top / os.fsdecode(entry[3:]), project.root) + ("/" if entry.endswith(b"/") else "")
            name = path.rstrip("/").rsplit("/", 1)[-1]
            if (
                path.startswith("..")
                or name in NOISE
                or name.endswith(".egg-info")
                or _vault_member(project.vault, project.root)(path.rstrip("/"))
            ):
                continue
            if not os.path.lexists(rebuilt / path):
                lacking.append(path)
    return lacking


def _restore_inputs(record: Record, root: Path) -> None:
    """Put the copied input files back in the rebuilt root, as they were when the capsule
    was made; each source inside the capsule, each destination inside the root."""
    import shutil

    for path, entry in record.context.get("files", {}).items():
        if entry and entry.get("copied") and entry.get("stored_as"):
            src = record.inside(entry.get("stored_as"), what=f"files.{path}.stored_as")
            dest = confined(root, path, what=f"{record.name}: files")  # links resolved: never outside
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dest, follow_symlinks=False)


def recorded_environ(record: Record) -> dict[str, str]:
    env = dict(os.environ)
    for key, value in record.context.get("environment_variables", {}).items():
        if value is None:
            env.pop(key, None)
        elif value != REDACTED:  # a redacted value cannot be restored: the current one stays
            env[key] = value
    return env


def compare_runs(old: Record, new: Record) -> list[Finding]:
    """What a rerun changed in the result: exit code, output files, stdout."""
    findings = []
    if old.post.get("exit_code") != new.post.get("exit_code"):
        findings.append(Finding("exit code", old.post.get("exit_code"), new.post.get("exit_code")))
    fa, fb = old.post.get("files", {}), new.post.get("files", {})
    for path in sorted(set(fa) | set(fb)):
        ha, hb = ((e or {}).get("file_hash") for e in (fa.get(path), fb.get(path)))
        if ha != hb:
            findings.append(Finding(f"output file {path}", ha or "missing", hb or "missing"))
    return findings + compare_outputs(old, new, STDOUT, limit=40)


def rerun_capsule(record: Record, *, project: Config, here: bool = False) -> tuple[int, Record | None, list[Finding]]:
    """Run a command capsule again as a new monitored run; (exit code, new capsule,
    differences). Every path the capsule names is checked before it is used, and what
    runs where is said before it does."""
    args = rerun_args(record)
    old_root = Path(record.context.get("root_directory", str(project.root)))
    rel_cwd = os.path.relpath(record.pre.get("cwd", str(old_root)), old_root)
    recorded_items = record.pre.get("items")
    if recorded_items is None:  # 0.0.19 did not say which items ran: record the outputs it kept
        outputs: dict[str, dict[str, JSON]] = {
            path: {"hash": (e or {}).get("hash_algorithm")} for path, e in record.post.get("files", {}).items()
        }
        recorded_items = {"outputs": outputs} if outputs else {}
    items = {
        name: file_specs(files, where=f"pre.items.{name}", source=record.name, root=project.root)
        for name, files in cast("dict[str, dict[str, Any]]", recorded_items).items()
        if isinstance(files, dict)
    }
    with contextlib.ExitStack() as stack:
        if here:
            root = project.root
        else:
            name, repo = _code_repo(record)
            # The code is rebuilt from this project's repository, never one the capsule names.
            source = confined(project.root, repo.get("path", "."), what=f"{record.name}: git.{name}.path")
            scratch = scratch_directory(project.root)
            root = stack.enter_context(rebuilt_worktree(record, source=source, scratch=scratch))
            _restore_inputs(record, root)
            if lacking := ignored_here(project, root):
                more = f" and {len(lacking) - 8} more" if len(lacking) > 8 else ""
                warn(
                    f"the rebuilt tree lacks what git ignores here: {', '.join(lacking[:8])}{more}; if the "
                    "command needs them, list them in [capture.files] with copy = true, or rerun with --here"
                )
            if withheld := [path for g in record.context.get("git", {}).values() for path in g.get("withheld", {})]:
                warn(f"not restored, withheld as secrets: {', '.join(withheld)}; --here reruns with yours")
        for specs in items.values():
            for spec in specs:
                confined(root, spec.path, what=f"{record.name}: pre.items")
        if rel_cwd.startswith("..") and not here:
            raise CapsulaError(
                f"{record.name} ran in {record.pre.get('cwd')}, outside its root {old_root}; "
                "rerun it with --here to run it in the current directory"
            )
        cwd = Path.cwd() if rel_cwd.startswith("..") else confined(root, rel_cwd, what=f"{record.name}: pre.cwd")
        if not here and not cwd.is_dir():  # a folder git does not keep (empty, or ignored files only)
            cwd.mkdir(parents=True)
        if not cwd.is_dir():
            raise CapsulaError(f"the recorded working directory {cwd} does not exist; create it, then rerun")
        repos = tuple((n, g.get("path", ".")) for n, g in record.context.get("git", {}).items())  # the names it had
        for name, rel in repos:
            confined(root, rel, what=f"{record.name}: git.{name}.path")
        vault = str(record.path.parent)
        config = load_config(root)._replace(vault_directory=vault, items=items, git_repositories=repos or None)
        config = config._replace(recorded_root=None if here else project.root)
        for command in config.pre_capture_commands:
            say(f"pre-capture command (from the rebuilt tree's config): {command}", level=30)
        say(f"rerunning {record.name}: {' '.join(args)}  (in {cwd})", level=30)
        environ, name = recorded_environ(record), record.name
        code, capsule = monitor_command(args, config=config, items=list(items), rerun_of=name, cwd=cwd, environ=environ)
    if capsule is None:
        return code, None, [Finding("rerun", detail=("the rerun was interrupted before the command ran",))]
    new = read_capsule(capsule.path)
    return code, new, compare_runs(record, new)


@_without_gc
def find_file(path: Path, vault: Path, cache: Path | None = None) -> list[tuple[str, str, str]]:
    """(capsule, "input" or "output", recorded path) for every capsule that recorded a file
    with this content. Memory: a slot per capsule, and what is printed."""
    import itertools
    import operator

    @functools.cache
    def digest(algorithm: str) -> str | None:
        try:
            return hash_file(path, algorithm)
        except (OSError, ValueError):
            return None

    columns = ("name", "instant", "files", "signature", "algorithms")
    with VaultIndex(vault, cache, columns) as index:
        current, unheld = index.match(vault)
        fresh = _read_afresh(vault, unheld)
        if index.merge_due:
            index.merge(current, fresh)
        else:
            index.add(fresh)
        algorithms = set(fresh["algorithms"]).union(*(set(s.lines("algorithms")) for s in index.opened))
        digests = {a: d for text in algorithms for a in text.split() if (d := digest(a))}
        if not digests:
            return []
        anywhere = re.compile("|".join(map(re.escape, set(digests.values()))))
        rows: list[Iterable[tuple[str, Any, str]]] = [
            [
                row
                for row in zip(fresh["name"], fresh["instant"], fresh["files"], strict=True)
                if anywhere.search(row[2])
            ]
        ]
        for segment, slots in zip(index.opened, index.slots, strict=True):
            hits, files = bytearray(), list[str]()  # a byte a row: whether it holds one of the hashes; and
            for block in segment.blocks("files"):  # those rows. Speed: searched a block at a time, in C
                lines = block[:-1].split("\n") if anywhere.search(block) else ()
                hit = bytes(map(bool, map(anywhere.search, lines))) if lines else bytes(block.count("\n"))
                hits.extend(hit)
                files.extend(itertools.compress(lines, hit))
            if files:  # of the rows that hit, those of capsules as they are now
                now = list(map(current.marks.__getitem__, itertools.compress(slots, hits)))
                hits = bytearray(map(operator.and_, hits, map(current.marks.__getitem__, slots)))
                names, instants = (list(itertools.compress(segment.lines(c), hits)) for c in columns[:2])
                rows.append(zip(names, map(float, instants), itertools.compress(files, now), strict=True))
    found, parse, seen = [], json.JSONDecoder().raw_decode, set()
    for name, when, text in itertools.chain.from_iterable(rows):
        if name in seen:  # a capsule indexed twice is told once
            continue
        seen.add(name)
        for role, recorded, algorithm, file_hash, written in parse(text)[0]:
            if file_hash == digests.get(algorithm):
                kept = written is False
                found.append((kept, -when, name, "output (not written by it)" if kept else role, recorded))
    found.sort()  # the runs that wrote it first, each group newest first
    return [hit[2:] for hit in found]


class Lineage:
    """How files came about, from content alone: a capsule's inputs (files recorded before
    its run, and listed outputs it did not write) are matched by hash to earlier capsules'
    outputs, back to inputs no capsule produced. Speed: built from the vault index."""

    def __init__(self, vault: Path, cache: Path | None) -> None:
        listing = list_capsules(vault, cache, parts=("files", "rows"), ordered=False)
        self.rows = dict(zip(listing["name"], listing["row"], strict=True))
        self.started = dict(zip(listing["name"], listing["instant"], strict=True))
        self.inputs: dict[str, list[tuple[str, str, str]]] = {}  # capsule -> [(path, algorithm, hash)]
        self.outputs: dict[str, list[tuple[str, str, str]]] = {}
        self.made: dict[
            tuple[str, str], list[tuple[float, str, str]]
        ] = {}  # (algorithm, hash) -> [(started, capsule, path)]
        for name, text in zip(listing["name"], listing["files"], strict=True):
            if text == "[]":
                continue
            with contextlib.suppress(ValueError, TypeError):  # a row the index cannot hold is skipped
                for role, path, algorithm, file_hash, written in json.loads(text):
                    if role == "output" and written is not False:
                        self.outputs.setdefault(name, []).append((path, algorithm, file_hash))
                        self.made.setdefault((algorithm, file_hash), []).append((self.started[name], name, path))
                    else:
                        self.inputs.setdefault(name, []).append((path, algorithm, file_hash))

    def producer(self, algorithm: str, file_hash: str, *, before: float = float("inf")) -> str | None:
        """The newest capsule that wrote this content and started before ``before``."""
        made = [m for m in self.made.get((algorithm, file_hash), []) if m[0] < before]
        return max(made)[1] if made else None

    def of_file(self, path: Path) -> tuple[str | None, str, str]:
        """(the capsule that made the file's current content, algorithm, hash)."""
        algorithms = sorted({a for a, _ in self.made})
        for algorithm in algorithms:
            with contextlib.suppress(OSError, ValueError):
                digest = hash_file(path, algorithm)
                if (found := self.producer(algorithm, digest)) is not None:
                    return found, algorithm, digest
        return None, "sha256", hash_file(path, "sha256")

    def step(self, name: str, seen: set[str] | None = None) -> dict[str, JSON]:
        """A capsule with what made each of its inputs, recursively (a capsule met again is
        named, not expanded)."""
        seen = set() if seen is None else seen
        row = json.loads(self.rows.get(name, "{}"))
        git = row.get("git") if isinstance(row.get("git"), dict) else {}
        node: dict[str, JSON] = {
            "capsule": name,
            "started": row.get("started"),
            "status": row.get("status"),
            "command": row.get("command"),
            "git": {repo: (g or {}).get("sha") for repo, g in git.items() if isinstance(g, dict)},
        }
        if name in seen:
            return node | {"repeated": True}
        seen.add(name)
        inputs: list[JSON] = []
        for path, algorithm, file_hash in self.inputs.get(name, []):
            source = self.producer(algorithm, file_hash, before=self.started.get(name, float("inf")))
            made_by = self.step(source, seen) if source else None
            inputs.append({"path": path, "hash_algorithm": algorithm, "file_hash": file_hash, "produced_by": made_by})
        return node | {"inputs": inputs}

    def near(self, rel: str) -> list[tuple[str, str, str]]:
        """Capsules that recorded a file at this path, or with this name: (capsule, path, hash), newest first."""
        base = os.path.basename(rel)
        found = [
            (self.started[name], name, path, file_hash)
            for kind in (self.outputs, self.inputs)
            for name, files in kind.items()
            for path, _, file_hash in files
            if path == rel or os.path.basename(path) == base
        ]
        return [(name, path, file_hash) for _, name, path, file_hash in sorted(found, reverse=True)[:5]]


def lineage_steps(node: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """Every capsule in a lineage once, the oldest first: the order a rerun repeats them."""
    found: dict[str, Mapping[str, Any]] = {}

    def walk(n: Mapping[str, Any]) -> None:
        for i in n.get("inputs", []):
            if i.get("produced_by"):
                walk(i["produced_by"])
        if not n.get("repeated"):
            found.setdefault(str(n["capsule"]), n)

    walk(node)
    return sorted(found.values(), key=lambda n: instant(n.get("started")))


def lineage_text(node: Mapping[str, Any], link: str | None = None) -> list[str]:
    """A lineage as an indented tree: each capsule with its status, git sha and command, and
    under it the file that links each earlier capsule to it."""

    def described(n: Mapping[str, Any]) -> str:
        shas = ",".join(str(s)[:8] for s in (n.get("git") or {}).values() if s) or "-"
        again = "  (as above)" if n.get("repeated") else ""
        return f"{n['capsule']}  {n.get('status')}  git {shas}  {n.get('command') or '-'}{again}"

    lines = [f"{link}  <- {described(node)}" if link else described(node)]
    inputs = list(node.get("inputs", []))
    for k, i in enumerate(inputs):
        last = k == len(inputs) - 1
        made = i.get("produced_by")
        sub = lineage_text(made, i["path"]) if made else [f"{i['path']}  (no capsule produced it)"]
        lines.append(("└── " if last else "├── ") + sub[0])
        lines += [("    " if last else "│   ") + line for line in sub[1:]]
    return lines


def lineage_dot(node: Mapping[str, Any]) -> str:
    """A lineage for Graphviz: capsules as boxes, files as ellipses, arrows as data flows."""
    edges: list[str] = []
    nodes: dict[str, str] = {}

    def quoted(text: object) -> str:
        return json.dumps(str(text), ensure_ascii=False)

    def walk(n: Mapping[str, Any]) -> None:
        capsule = f"capsule:{n['capsule']}"
        nodes[capsule] = (
            f"{quoted(capsule)} [shape=box, label={quoted(str(n['capsule']) + chr(10) + str(n.get('command') or ''))}]"
        )
        for i in [] if n.get("repeated") else n.get("inputs", []):
            file = f"file:{i['path']}@{str(i['file_hash'])[:12]}"
            nodes.setdefault(file, f"{quoted(file)} [shape=ellipse, label={quoted(i['path'])}]")
            edges.append(f"  {quoted(file)} -> {quoted(capsule)};")
            if i.get("produced_by"):
                edges.append(f"  {quoted('capsule:' + str(i['produced_by']['capsule']))} -> {quoted(file)};")
                walk(i["produced_by"])

    walk(node)
    return "\n".join(
        ["digraph lineage {", "  rankdir=LR;", *(f"  {v};" for v in nodes.values()), *dict.fromkeys(edges), "}"]
    )


RO_CRATE = "https://w3id.org/ro/crate/1.1"
PROCESS_RUN_CRATE = "https://w3id.org/ro/wfrun/process/0.5"
CRATE_METADATA = "ro-crate-metadata.json"
MEDIA_TYPES = {
    ".json": "application/json",
    ".txt": "text/plain",
    ".diff": "text/x-diff",
    ".bundle": "application/x-git",
}


def ro_crate(record: Record, files: Sequence[str]) -> dict[str, JSON]:
    """A capsule as an RO-Crate 1.1 that conforms to the Process Run Crate profile 0.5: the
    run as a CreateAction of its command or function, with its inputs as ``object`` and its
    outputs as ``result`` (each with its hash), the git commits and the recorded environment
    variables as properties. files: the capsule's files, relative to it, as the crate holds them."""
    manifest, pre, post, context = manifest_of(record), record.pre, record.post, record.context
    status = str(manifest.get("status") or UNKNOWN)
    what = " ".join(manifest.get("command") or []) or str(manifest.get("function") or "") or "a capture"
    stored = {
        str((e or {}).get("stored_as")): p
        for p, e in (*context.get("files", {}).items(), *post.get("files", {}).items())
    }

    def entity(path: str, entry: Mapping[str, Any] | None, role: str) -> dict[str, JSON]:
        where = str(entry.get("stored_as")) if entry and entry.get("stored_as") in files else None
        found: dict[str, JSON] = {"@id": where or f"#{role}:{path}", "@type": "File" if where else "CreativeWork"}
        found["name"] = path
        if entry and entry.get("file_hash"):
            algorithm = str(entry.get("hash_algorithm"))
            found |= (
                {"sha256": entry["file_hash"]}
                if algorithm == "sha256"
                else {"identifier": f"{algorithm}:{entry['file_hash']}"}
            )
        if entry and isinstance(entry.get("size"), int):
            found["contentSize"] = str(entry["size"])
        return found

    inputs = [entity(p, e, "input") for p, e in context.get("files", {}).items()]
    inputs += [
        entity(p, e, "input") for p, e in post.get("files", {}).items() if (e or {}).get("written_by_this_run") is False
    ]
    outputs = [
        entity(p, e, "output")
        for p, e in post.get("files", {}).items()
        if (e or {}).get("written_by_this_run") is not False
    ]
    git = context.get("git", {})
    code = [
        {
            "@id": f"#git:{name}",
            "@type": "SoftwareSourceCode",
            "name": f"{name} at {g.get('sha')}" + (" with uncommitted changes" if g.get("dirty") else ""),
            "version": g.get("sha"),
            **({"codeRepository": g["remotes"][0]["url"]} if g.get("remotes") else {}),
        }
        for name, g in git.items()
        if g.get("sha")
    ]
    environment = [
        {"@id": f"#env:{k}", "@type": "PropertyValue", "name": k, "value": v}
        for k, v in context.get("environment_variables", {}).items()
        if v is not None
    ]
    if record.kind == "function":  # the function at the recorded commit
        tool: dict[str, JSON] = {"@id": "#function", "@type": "SoftwareApplication", "name": what}
        tool["softwareVersion"] = next((str(c["version"]) for c in code), "unknown")
    else:
        program = (pre.get("args") or ["capsula"])[0] if record.kind == "command" else "capsula"
        tool = {"@id": "#application", "@type": "SoftwareApplication", "name": str(program)}
        tool["softwareVersion"] = __version__ if program == "capsula" else "unknown"
    action: dict[str, JSON] = {
        "@id": "#run",
        "@type": "CreateAction",
        "name": f"Run of {what}",
        "description": f"{record.kind} run of `{what}`, recorded by Capsula in capsule {record.name}: {status}",
        "instrument": {"@id": str(tool["@id"])},
        "agent": {"@id": "#agent"},
        "object": [{"@id": str(e["@id"])} for e in inputs],
        "result": [{"@id": str(e["@id"])} for e in outputs],
        "environment": [{"@id": str(e["@id"])} for e in environment],
    }
    if started := _crate_time(manifest.get("started") or pre.get("timestamp") or context.get("timestamp")):
        action["startTime"] = started
    if ended := _crate_time(manifest.get("finished") or post.get("timestamp")):
        action["endTime"] = ended
    if status in (COMPLETED, FAILED, INTERRUPTED, INCOMPLETE):
        failed = status != COMPLETED
        action["actionStatus"] = f"http://schema.org/{'Failed' if failed else 'Completed'}ActionStatus"
        if failed:
            info: Mapping[str, Any] = post.get("exception_info") or {}
            why = post.get("error") or manifest.get("error") or info.get("error_message")
            action["error"] = str(why or f"{status}, exit code {manifest.get('exit_code')}")
    host = str(pre.get("host") or manifest.get("host") or (context.get("platform") or {}).get("node") or "unknown host")
    agent = {"@id": "#agent", "@type": "Person", "name": f"the user who ran it on {host}"}
    parts: list[dict[str, JSON]] = [
        {
            "@id": f,
            "@type": "File",
            "name": stored.get(f, f),
            "encodingFormat": MEDIA_TYPES.get(Path(f).suffix, "application/octet-stream"),
        }
        for f in files
    ]
    for part in parts:
        for e in (*inputs, *outputs):
            if e["@id"] == part["@id"]:
                part |= {k: v for k, v in e.items() if k in ("sha256", "identifier", "contentSize")}
    root: dict[str, JSON] = {
        "@id": "./",
        "@type": "Dataset",
        "name": f"Capsule {record.name}",
        "description": f"What Capsula recorded of {what}: the context it ran in, the run, and its outputs",
        "datePublished": ended or started or now().isoformat(timespec="milliseconds"),
        "conformsTo": {"@id": PROCESS_RUN_CRATE},
        "license": {"@id": "#license"},
        "hasPart": [{"@id": str(p["@id"])} for p in parts],
        "mentions": cast("JSON", [{"@id": "#run"}, *[{"@id": str(c["@id"])} for c in code]]),
    }
    metadata = {"@id": CRATE_METADATA, "@type": "CreativeWork", "conformsTo": {"@id": RO_CRATE}, "about": {"@id": "./"}}
    profile = {"@id": PROCESS_RUN_CRATE, "@type": "CreativeWork", "name": "Process Run Crate", "version": "0.5"}
    license = {"@id": "#license", "@type": "CreativeWork", "name": "License not stated"}
    license["description"] = "Capsula recorded this run; whoever ran it has not stated terms for this record"
    extra = [e for e in (*inputs, *outputs) if not any(e["@id"] == p["@id"] for p in parts)]
    graph: list[dict[str, Any]] = [metadata, root, profile, license, action, tool, agent, *parts, *extra, *code]
    graph += environment
    for e in graph:  # RO-Crate 1.1 writes a list of one as that one value
        e.update({k: v[0] for k, v in e.items() if isinstance(v, list) and len(v) == 1})
    terms = {"environment": "https://w3id.org/ro/terms/workflow-run#environment"}  # Workflow Run Crate's term
    return {"@context": cast("JSON", [f"{RO_CRATE}/context", terms]), "@graph": cast("JSON", graph)}


def _crate_time(timestamp: object) -> str | None:
    """A recorded time as RO-Crate validators read ISO 8601: milliseconds and a +HH:MM offset."""
    import datetime

    try:
        when = datetime.datetime.fromisoformat(str(timestamp))
    except ValueError:
        return None
    return (
        when.astimezone().isoformat(timespec="milliseconds")
        if when.tzinfo is None
        else when.isoformat(timespec="milliseconds")
    )


def export_ro_crate(record: Record, dest: Path) -> Path:
    """Write the capsule as an RO-Crate: a folder (which must not exist, or be empty) holding
    its files and ro-crate-metadata.json, or a .zip of them. Links in the capsule are left out."""
    files = sorted(
        str(p.relative_to(record.path))
        for p in record.path.rglob("*")
        if p.is_file() and not p.is_symlink() and p.name != CRATE_METADATA and not p.name.startswith(".")
    )
    metadata = json.dumps(ro_crate(record, files), indent=2, ensure_ascii=False).encode()
    if dest.suffix.lower() == ".zip":
        import zipfile

        tmp = dest.with_name(f".{dest.name}.{os.getpid()}.part")
        try:
            with zipfile.ZipFile(tmp, "x", zipfile.ZIP_DEFLATED) as z:
                z.writestr(CRATE_METADATA, metadata)
                for f in files:
                    z.write(record.path / f, f)
            os.replace(tmp, dest)
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
        return dest
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise ConfigError(f"{dest} exists and is not an empty folder; give a new folder or a .zip path")
    for f in files:
        copy_and_hash(record.path / f, dest / f, None)
    write_bytes_atomic(dest / CRATE_METADATA, metadata)
    return dest


def write_capsule_crate(capsule: Capsule) -> None:
    """ro-crate-metadata.json in the capsule itself (ro-crate = true): the capsule is then an
    RO-Crate as it stands. A failure is said, and the run's record stays as it is."""
    try:
        record = read_capsule(capsule.path)
        files = sorted(
            str(p.relative_to(capsule.path))
            for p in capsule.path.rglob("*")
            if p.is_file() and not p.name.startswith(".")
        )
        crate = ro_crate(record, [f for f in files if f != CRATE_METADATA])
        write_bytes_atomic(capsule.path / CRATE_METADATA, json.dumps(crate, indent=2, ensure_ascii=False).encode())
    except (CapsulaError, OSError) as exc:
        warn(f"{capsule.path}: no {CRATE_METADATA}: {exc}")


REPORT_TAIL = 4096  # bytes of stdout and stderr a report shows per capsule
REPORT_ROWS = 1000  # rows the report's table shows at once (the filter narrows the rest)


def _tail(record: Record, name: str) -> str:
    path = record.output_file(name)
    if path is None:
        return record.output(name).decode(errors="replace")[-REPORT_TAIL:]
    with contextlib.suppress(OSError), open(path, "rb") as f:
        f.seek(max(0, os.fstat(f.fileno()).st_size - REPORT_TAIL))
        return f.read().decode(errors="replace")
    return ""


def report_entry(record: Record, *, host: str, boot_id: str | None) -> dict[str, JSON]:
    """What the report shows of one capsule: its row, and the details of its page."""
    manifest, context, post = manifest_of(record), record.context, record.post
    row = _row(record.name, manifest, host=host, boot_id=boot_id)
    usage = post.get("resource_usage")
    rss = usage.get("max_rss_bytes") if isinstance(usage, dict) else None
    platform: dict[str, Any] = context.get("platform") or {}
    files = {p: (e or {}).get("file_hash") for p, e in context.get("files", {}).items()}
    outputs = {p: (e or {}).get("file_hash") for p, e in post.get("files", {}).items()}
    details: dict[str, JSON] = {
        "context": {
            "root": context.get("root_directory"),
            "cwd": record.pre.get("cwd") or context.get("cwd"),
            "platform": platform.get("platform"),
            "host": platform.get("node"),
            "python": cast("dict[str, JSON]", platform.get("python") or {}).get("version"),
            "git": {
                n: {"sha": g.get("sha"), "branch": g.get("branch"), "dirty": g.get("dirty")}
                for n, g in context.get("git", {}).items()
            },
            "environment": cast("JSON", context.get("environment_variables", {})),
            "inputs": cast("JSON", files),
        },
        "run": {
            "args": record.pre.get("args"),
            "exit_code": post.get("exit_code"),
            "run_time_seconds": post.get("run_time_seconds"),
            "max_rss_bytes": rss,
            "error": post.get("error") or manifest.get("error"),
            "exception": cast("JSON", post.get("exception_info")),
        },
        "outputs": cast("JSON", outputs),
        "stdout": _tail(record, STDOUT) if record.kind == "command" else "",
        "stderr": _tail(record, STDERR) if record.kind == "command" else "",
    }
    items = manifest.get("items") or list(cast("dict[str, JSON]", record.pre.get("items") or {}))
    return row | {"items": cast("JSON", items), "max_rss": rss if isinstance(rss, int) else None, "details": details}


def _svg_plot(points: Sequence[tuple[float, float, str]], *, title: str, unit: str) -> str:
    """A scatter plot of (time, value, label) as inline SVG: no script, no font, no network."""
    import html

    width, height, pad = 640, 200, 40
    if not points:
        return f'<svg class="plot" width="{width}" height="40" role="img"><title>{html.escape(title)}</title><text x="4" y="24">{html.escape(title)}: nothing to plot</text></svg>'
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    x0, x1, y1 = min(xs), max(xs), max(ys) or 1.0
    dots = "".join(
        f'<circle cx="{pad + (x - x0) / ((x1 - x0) or 1) * (width - 2 * pad):.1f}" '
        f'cy="{height - pad - y / y1 * (height - 2 * pad):.1f}" r="2.5"><title>{html.escape(label)}: {y:g} {unit}</title></circle>'
        for x, y, label in points
    )
    axes = f'<line x1="{pad}" y1="{height - pad}" x2="{width - pad}" y2="{height - pad}"/><line x1="{pad}" y1="{pad}" x2="{pad}" y2="{height - pad}"/>'
    import datetime

    day = [datetime.datetime.fromtimestamp(x).strftime("%Y-%m-%d %H:%M") for x in (x0, x1)]
    labels = f'<text x="{pad}" y="{pad - 8}">{html.escape(title)} (max {y1:g} {unit})</text>'
    labels += f'<text x="{pad}" y="{height - pad + 16}">{day[0]}</text>'
    labels += f'<text x="{width - pad}" y="{height - pad + 16}" text-anchor="end">{day[1]}</text>'
    return f'<svg class="plot" width="{width}" height="{height}" role="img">{axes}{labels}{dots}</svg>'


def report_html(entries: Sequence[Mapping[str, Any]], *, vault: Path) -> str:
    """The whole report: one HTML file that needs nothing but itself."""
    import html

    when = [(t, e) for e in entries if abs(t := instant(e["started"])) != float("inf")]
    times = [(t, float(e["run_time"]), str(e["name"])) for t, e in when if isinstance(e.get("run_time"), (int, float))]
    memory = [(t, e["max_rss"] / 2**20, str(e["name"])) for t, e in when if isinstance(e.get("max_rss"), int)]
    plots = _svg_plot(times, title="run time", unit="s") + _svg_plot(memory, title="peak memory", unit="MiB")
    data = json.dumps(entries, ensure_ascii=False).replace("</", "<\\/").replace("<!--", "<\\!--")
    page = _REPORT_PAGE.replace("{title}", html.escape(f"Capsula report: {vault}"))
    return page.replace("{plots}", plots).replace("{rows}", str(REPORT_ROWS)).replace("{data}", data)


_REPORT_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body{font:14px system-ui,sans-serif;margin:1.5em;color:#222}
table{border-collapse:collapse;width:100%}td,th{border-bottom:1px solid #ddd;padding:3px 6px;text-align:left;vertical-align:top}
th{cursor:pointer;background:#f4f4f4;user-select:none}tr.completed td.status{color:#070}tr.failed td.status,tr.died td.status{color:#b00}
td.name a{font-family:monospace}pre{background:#f7f7f7;padding:6px;overflow:auto;max-height:24em;white-space:pre-wrap}
.differs td{background:#fff3c4}.plot line{stroke:#888}.plot circle{fill:#36c;fill-opacity:.6}.plot text{font-size:12px}
#filters input,#filters select{margin-right:1em}.hidden{display:none}
</style></head><body>
<h1>{title}</h1>
<nav><a href="#">all capsules</a></nav>
<section id="overview"><div id="plots">{plots}</div>
<p id="filters">status <select id="status"><option value="">any</option></select>
search <input id="q" size="40" placeholder="name, command, item or git sha">
<button id="compare">compare the two ticked</button> <span id="count"></span></p>
<table id="capsules"><thead><tr><th></th><th data-key="name">capsule</th><th data-key="started">started</th>
<th data-key="kind">kind</th><th data-key="status">status</th><th data-key="exit_code">exit</th>
<th data-key="run_time">time (s)</th><th data-key="max_rss">peak memory (MiB)</th><th data-key="git">git</th>
<th data-key="command">command</th></tr></thead><tbody></tbody></table></section>
<section id="page" class="hidden"></section>
<script type="application/json" id="data">{data}</script>
<script>
"use strict";
const capsules = JSON.parse(document.getElementById("data").textContent);
const byName = new Map(capsules.map(c => [c.name, c]));
const ROWS = {rows};
const state = {status: "", q: "", sort: "-started", capsule: "", compare: ""};
function el(tag, text, cls) { const e = document.createElement(tag); if (text !== undefined && text !== null) e.textContent = String(text); if (cls) e.className = cls; return e; }
function shas(c) { return Object.values(c.git || {}).map(g => (g && g.sha ? String(g.sha).slice(0, 8) : "")).join(","); }
function value(c, key) { return key === "git" ? shas(c) : key === "started" ? String(c.started || "") : c[key]; }
function readHash() {
  const p = new URLSearchParams(location.hash.slice(1));
  for (const k of Object.keys(state)) state[k] = p.get(k) || (k === "sort" ? "-started" : "");
}
function writeHash() {
  const p = new URLSearchParams(); for (const [k, v] of Object.entries(state)) if (v && !(k === "sort" && v === "-started")) p.set(k, v);
  const h = p.toString(); if (location.hash.slice(1) !== h) history.replaceState(null, "", h ? "#" + h : location.pathname);
}
function matches(c) {
  if (state.status && c.status !== state.status) return false;
  if (!state.q) return true;
  const q = state.q.toLowerCase();
  return [c.name, c.command, shas(c), ...(c.items || [])].some(s => String(s || "").toLowerCase().includes(q));
}
function renderTable() {
  const key = state.sort.replace(/^-/, ""), dir = state.sort.startsWith("-") ? -1 : 1;
  const rows = capsules.filter(matches).sort((a, b) => { const x = value(a, key), y = value(b, key);
    return (x === y ? 0 : x === null || x === undefined ? 1 : y === null || y === undefined ? -1 : x < y ? -1 : 1) * dir; });
  const body = document.querySelector("#capsules tbody"); body.replaceChildren();
  for (const c of rows.slice(0, ROWS)) {
    const tr = el("tr", undefined, c.status); const box = el("input"); box.type = "checkbox"; box.value = c.name;
    const td = el("td"); td.append(box); tr.append(td);
    const name = el("td", undefined, "name"); const a = el("a", c.name); a.href = "#capsule=" + encodeURIComponent(c.name); name.append(a); tr.append(name);
    tr.append(el("td", String(c.started || "").slice(0, 19).replace("T", " ")), el("td", c.kind), el("td", c.status, "status"),
      el("td", c.exit_code), el("td", typeof c.run_time === "number" ? c.run_time.toFixed(2) : ""),
      el("td", typeof c.max_rss === "number" ? (c.max_rss / 1048576).toFixed(1) : ""), el("td", shas(c)), el("td", c.command));
    body.append(tr);
  }
  document.getElementById("count").textContent = rows.length > ROWS ? `${rows.length} match; the first ${ROWS} are shown: narrow the search` : `${rows.length} of ${capsules.length} capsules`;
}
function table(obj) {
  const t = el("table");
  for (const [k, v] of Object.entries(obj || {})) { const tr = el("tr"); tr.append(el("th", k), el("td", typeof v === "object" && v !== null ? JSON.stringify(v) : v)); t.append(tr); }
  return t;
}
function renderCapsule(c) {
  const page = document.getElementById("page"); page.replaceChildren();
  page.append(el("h2", "capsule " + c.name), table({kind: c.kind, status: c.status, started: c.started, command: c.command, items: (c.items || []).join(", "), "rerun of": c.rerun_of}));
  for (const part of ["context", "run"]) { page.append(el("h3", part), table(c.details[part])); }
  page.append(el("h3", "outputs"), table(c.details.outputs), el("h3", "stdout (tail)"), el("pre", c.details.stdout), el("h3", "stderr (tail)"), el("pre", c.details.stderr));
}
function flat(obj, prefix, out) {
  for (const [k, v] of Object.entries(obj || {})) { const key = prefix ? prefix + "." + k : k;
    if (v && typeof v === "object" && !Array.isArray(v)) flat(v, key, out); else out[key] = JSON.stringify(v); }
  return out;
}
function renderCompare(a, b) {
  const page = document.getElementById("page"); page.replaceChildren();
  page.append(el("h2", `${a.name} and ${b.name} side by side`));
  const fa = flat({status: a.status, command: a.command, ...a.details}, "", {}), fb = flat({status: b.status, command: b.command, ...b.details}, "", {});
  const t = el("table"); const head = el("tr"); head.append(el("th", "field"), el("th", a.name), el("th", b.name)); t.append(head);
  let differ = 0;
  for (const k of [...new Set([...Object.keys(fa), ...Object.keys(fb)])].sort()) {
    const tr = el("tr", undefined, fa[k] === fb[k] ? "same" : "differs"); if (fa[k] !== fb[k]) differ++;
    tr.append(el("td", k), el("td", fa[k] ?? "(absent)"), el("td", fb[k] ?? "(absent)")); t.append(tr);
  }
  page.append(el("p", `${differ} fields differ`, "summary"), t);
}
function render() {
  readHash();
  document.getElementById("status").value = state.status; document.getElementById("q").value = state.q;
  const pair = state.compare.split(",").map(n => byName.get(n));
  const one = byName.get(state.capsule);
  document.getElementById("overview").classList.toggle("hidden", Boolean(one || (pair.length === 2 && pair[0] && pair[1])));
  document.getElementById("page").classList.toggle("hidden", !(one || (pair.length === 2 && pair[0] && pair[1])));
  if (one) renderCapsule(one); else if (pair.length === 2 && pair[0] && pair[1]) renderCompare(pair[0], pair[1]); else renderTable();
}
for (const s of [...new Set(capsules.map(c => c.status))].sort()) { const o = el("option", s); o.value = s; document.getElementById("status").append(o); }
document.getElementById("status").onchange = e => { state.status = e.target.value; writeHash(); renderTable(); };
document.getElementById("q").oninput = e => { state.q = e.target.value; writeHash(); renderTable(); };
document.querySelectorAll("#capsules th[data-key]").forEach(th => th.onclick = () => {
  const k = th.dataset.key; state.sort = state.sort === k ? "-" + k : k; writeHash(); renderTable(); });
document.getElementById("compare").onclick = () => {
  const ticked = [...document.querySelectorAll("#capsules tbody input:checked")].map(b => b.value);
  if (ticked.length === 2) location.hash = "compare=" + ticked.map(encodeURIComponent).join(",");
  else alert("tick two capsules to compare them");
};
window.addEventListener("hashchange", render);
render();
</script></body></html>
"""


def write_report(vault: Path, cache: Path | None, out: Path) -> int:
    """Write the report of every capsule in the vault; the number of capsules in it."""
    host, boot = hostname(), read_boot_id()
    entries = []
    for name in list_capsules(vault, cache, parts=())["name"]:
        with contextlib.suppress(VaultError):
            entries.append(report_entry(read_capsule(vault / name), host=host, boot_id=boot))
    write_bytes_atomic(out, report_html(entries, vault=vault).encode())
    return len(entries)


# === CLI ======================================================================

if TYPE_CHECKING:
    import argparse


def _cmd_capture(args: argparse.Namespace) -> int:
    config = load_config(args.directory)
    router = SignalRouter()
    with router.installed():
        try:
            with router.interruptible():
                capsule = capture(config)
        except Interrupted as exc:
            return settle(interrupted_by=exc.signum)[1]
    print(capsule.path)
    say(f"capsule {capsule.path}")
    if capsule.missing:
        print(f"capsula: error: the record is incomplete ({'; '.join(capsule.missing)})", file=sys.stderr)
    return 1 if capsule.missing else 0


def _cmd_monitor(args: argparse.Namespace) -> int:
    command = args.command[1:] if args.command[:1] == ["--"] else list(args.command)
    if not command:
        raise ConfigError("no command to monitor; usage: capsula monitor [-i ITEM]... [--] COMMAND [ARGS...]")
    config = load_config(args.directory)
    if getattr(args, "no_tty", False):
        config = config._replace(tty=False)
    code, capsule = monitor_command(command, config=config, items=args.item)
    if capsule is not None:
        error = capsule.manifest.get("error")
        if error:
            hint = "check the spelling and PATH" if code in (126, 127) else "check free space and permissions"
            print(f"capsula: error: {error}; {hint} (recorded in {capsule.path})", file=sys.stderr)
        else:
            say(f"capsule {capsule.path}")
    return code


def _project_and_vault(args: argparse.Namespace) -> tuple[Config, Path]:
    config = load_config(args.directory)
    return config, Path(args.vault).absolute() if getattr(args, "vault", None) else config.vault


def _vault_and_cache(args: argparse.Namespace) -> tuple[Path, Path | None]:
    """The vault, and the cache directory that keeps its index (None: no index)."""
    config, vault = _project_and_vault(args)
    return vault, cache_directory(config.root, os.environ)


def _record(args: argparse.Namespace, spec: str) -> Record:
    """A capsule named on the command line, read; what in it had to be ignored is said."""
    record = read_capsule(resolve_capsule(spec, *_vault_and_cache(args)))
    for problem in record.problems[:5]:
        warn(f"capsule {record.name}: {problem}; ignored")
    if len(record.problems) > 5:
        warn(f"capsule {record.name}: {len(record.problems) - 5} more values ignored")
    return record


def _cmd_list(args: argparse.Namespace) -> int:
    listing = list_capsules(*_vault_and_cache(args), parts=("rows",) if args.json else ("cells",))
    if args.json:
        print("[\n" + ",\n".join(listing["row"]) + "\n]")
    else:
        print_table(listing.cells())
    return 0


def _cmd_show(args: argparse.Namespace) -> int:
    r = _record(args, args.capsule)
    if args.json:
        data = {"path": str(r.path), "capsule": r.manifest, "context": r.context, "pre_run": r.pre, "post_run": r.post}
        print(json.dumps(data, indent=2, ensure_ascii=False))
        return 0
    row = summarize(r.path, host=hostname(), boot_id=read_boot_id())
    plat = r.context.get("platform", {})
    py = plat.get("python") if isinstance(plat.get("python"), dict) else {}
    out = [
        f"capsule   {r.path}",
        f"kind      {row['kind']}   status {row['status']}   exit {row['exit_code']}",
        f"started   {row['started']}   run time {r.post.get('run_time', '-')}",
        f"root      {r.context.get('root_directory')}   cwd {r.pre.get('cwd') or r.context.get('cwd')}",
        f"platform  {plat.get('platform')} on {plat.get('node')}",
        f"python    {py.get('implementation')} {py.get('version')} ({py.get('executable', '?')})",  # type: ignore[union-attr]
    ]
    if row["command"]:
        out.append(f"run       {row['command']}" + (f"   rerun of {row['rerun_of']}" if row["rerun_of"] else ""))
    for name, g in r.context.get("git", {}).items():
        dirty = f" (dirty, {len(g.get('untracked', []))} untracked)" if g.get("dirty") else ""
        out.append(f"git       {name}: {g.get('sha')} on {g.get('branch')}{dirty}")
    out += [f"env       {key} = {value}" for key, value in r.context.get("environment_variables", {}).items()]
    out += environment_lines(r.context)
    for title, files in (("input", r.context.get("files", {})), ("output", r.post.get("files", {}))):
        out += [f"{title:<9} {path} = {(e or {}).get('file_hash')}" for path, e in files.items()]
    if error := r.post.get("exception_info"):
        out.append(f"exception {error.get('error_type')}: {error.get('error_message')}")
    for name in (STDOUT, STDERR):
        tail = r.output(name).decode(errors="replace").splitlines()[-5:] if r.kind == "command" else []
        out += [f"{name:<9} {line}" for line in tail]
    print("\n".join(map(printable, out)))
    return 0


def environment_lines(context: Mapping[str, Any]) -> list[str]:
    """What `capsula show` says of the GPUs, conda, the container, the batch job and the
    lock files (values from a capsule: each checked for its type before it is used)."""

    def table(value: object) -> dict[str, Any]:
        return value if isinstance(value, dict) else {}

    out, gpus = [], table(context.get("gpus"))
    for vendor in ("nvidia", "amd"):
        facts = table(gpus.get(vendor))
        devices = facts.get("devices")
        for d in map(table, devices if isinstance(devices, list) else []):
            memory = f"{d['memory_total_mib']} MiB" if d.get("memory_total_mib") else d.get("memory_total_bytes")
            cap = f", compute capability {d['compute_capability']}" if d.get("compute_capability") else ""
            out.append(
                f"gpu       {d.get('index')}: {d.get('name')} ({d.get('uuid') or d.get('unique_id')}, {memory}{cap})"
            )
        if facts.get("devices"):
            cuda = f", CUDA {facts['cuda_version']}" if facts.get("cuda_version") else ""
            out.append(f"gpu       {vendor} driver {facts.get('driver_version')}{cuda}")
    visible = [f"{k}={v}" for k, v in table(gpus.get("visible_devices")).items() if v is not None]
    out += [f"gpu       visible: {' '.join(visible)}"] if visible else []
    if conda := table(context.get("conda")):
        count = len(table(conda.get("packages")))
        out.append(
            f"conda     {conda.get('name')} ({conda.get('prefix')}), {count} packages, conda {conda.get('conda_version')}"
        )
    if container := table(context.get("container")):
        what = container.get("image") or container.get("pod") or container.get("id") or "image unknown"
        digest = f" {container['image_digest']}" if container.get("image_digest") else ""
        out.append(f"container {container.get('runtime')}: {what}{digest}")
    for scheduler, job in table(context.get("cluster")).items():
        shown = " ".join(f"{k}={v}" for k, v in table(job).items() if not isinstance(v, dict))
        out.append(f"{scheduler:<9} {shown}")
    out += [f"lock      {name} = {table(e).get('file_hash')}" for name, e in table(context.get("lock_files")).items()]
    if notebook := table(context.get("notebook")):
        out.append(f"notebook  {notebook.get('path')} = {notebook.get('file_hash') or notebook.get('unavailable')}")
    return out


def _cmd_diff(args: argparse.Namespace) -> int:
    findings = diff_capsules(_record(args, args.a), _record(args, args.b), ignore=args.ignore)
    print("\n".join(format_findings(findings)) if findings else "no differences")
    return 1 if findings else 0


def _verify(args: argparse.Namespace, record: Record) -> list[Finding]:
    """verify_capsule() on the current project, never a folder the capsule names."""
    project = _project_and_vault(args)[0]
    root = project.root
    if record.context.get("root_directory", str(root)) != str(root):
        warn(f"{record.name} was made in {record.context.get('root_directory')}; comparing with {root}")
    moved = [p for p, e in record.context.get("files", {}).items() if e and e.get("moved")]
    for path in moved:
        print(f"capsula: note: {path}: moved into the capsule when captured; not compared", file=sys.stderr)
    for path in (path for g in record.context.get("git", {}).values() for path in g.get("withheld", {})):
        print(f"capsula: note: {path}: withheld as a secret when captured; compared by its hash", file=sys.stderr)
    return verify_capsule(record, root=root, scratch=scratch_directory(project.root))


def _cmd_verify(args: argparse.Namespace) -> int:
    record = _record(args, args.capsule)
    findings = _verify(args, record)
    lines = format_findings(findings, old=" (capsule)", new=" (now)")
    print("\n".join(lines) if lines else f"the environment matches {record.name}")
    return 1 if lines else 0


def _cmd_rerun(args: argparse.Namespace) -> int:
    record = _record(args, args.capsule)
    if args.upstream:
        return _rerun_upstream(args, record)
    if args.here:
        lines = format_findings(_verify(args, record), old=" (capsule)", new=" (now)")
        said = ["the current environment differs from the capsule:", *lines] if lines else []
        print("\n".join(said or [f"the environment matches {record.name}"]), file=sys.stderr)
    code, new, findings = rerun_capsule(record, project=_project_and_vault(args)[0], here=args.here)
    name = new.name if new else "-"
    if not findings:
        print(f"reproduced identically: {name} matches {record.name} (exit code, output files, stdout)")
        return 0
    print("\n".join([f"not reproduced: {name} differs from {record.name}", *format_findings(findings)]))
    return code if code > 128 else 1


def _rerun_upstream(args: argparse.Namespace, record: Record) -> int:
    """Rerun every capsule of a lineage, the oldest first; stop at the first that does not reproduce."""
    steps = lineage_steps(Lineage(*_vault_and_cache(args)).step(record.name))
    project, skipped = _project_and_vault(args)[0], []
    for k, step in enumerate(steps, 1):
        old = _record(args, str(step["capsule"]))
        where = f"step {k}/{len(steps)} {old.name} ({step.get('command') or old.kind})"
        try:
            code, new, findings = rerun_capsule(old, project=project)
        except CapsulaError as exc:
            print(printable(f"{where}: not rerun: {exc}"))
            skipped.append(old.name)
            continue
        if findings:
            print(printable(f"{where}: not reproduced by {new.name if new else '-'}"))
            print("\n".join(map(printable, format_findings(findings))))
            print(printable(f"the lineage of {record.name} first failed to reproduce at step {k}: {old.name}"))
            return code if code > 128 else 1
        print(printable(f"{where}: reproduced identically by {new.name if new else '-'}"))
    rest = f"; not rerun: {', '.join(skipped)}" if skipped else ""
    print(
        printable(f"the lineage of {record.name} reproduced ({len(steps) - len(skipped)} of {len(steps)} steps){rest}")
    )
    return 1 if skipped else 0


def _cmd_lineage(args: argparse.Namespace) -> int:
    config, vault = _project_and_vault(args)
    lineage = Lineage(vault, cache_directory(config.root, os.environ))
    target = Path(args.target)
    if target.is_file():
        found, algorithm, digest = lineage.of_file(target)
        if found is None:
            rel = os.path.relpath(target.absolute(), config.root)
            print(printable(f"no capsule produced {target} as it is now ({algorithm} {digest[:16]})"), file=sys.stderr)
            for name, path, file_hash in lineage.near(rel):
                print(printable(f"  {name} recorded {path} with {str(file_hash)[:16]}"), file=sys.stderr)
            return 1
        node, link = lineage.step(found), str(target)
        data: dict[str, JSON] = {"file": link, "hash_algorithm": algorithm, "file_hash": digest, "produced_by": node}
    else:
        capsule = resolve_capsule(args.target, vault, cache_directory(config.root, os.environ))
        node, link = lineage.step(capsule.name), None
        data = node
    if args.json:
        print(json.dumps(data, indent=2, ensure_ascii=False))
    elif args.dot:
        print(lineage_dot(node))
    else:
        print("\n".join(map(printable, lineage_text(node, link))))
    return 0


def _args_lineage(p: argparse.ArgumentParser) -> None:
    p.add_argument("target", metavar="FILE|CAPSULE", help="a file, or a capsule (name, prefix, latest)")
    shape = p.add_mutually_exclusive_group()
    shape.add_argument("--json", action="store_true", help="print JSON")
    shape.add_argument("--dot", action="store_true", help="print a Graphviz graph")


def _cmd_export(args: argparse.Namespace) -> int:
    record = _record(args, args.capsule)
    dest = Path(args.ro_crate or f"{record.name}-ro-crate.zip")
    print(export_ro_crate(record, dest))
    return 0


def _args_export(p: argparse.ArgumentParser) -> None:
    p.add_argument("capsule", help="a path, a name, a unique prefix, latest or latest~N")
    p.add_argument("--ro-crate", metavar="DIR|ZIP", help="where the RO-Crate goes (default: ./NAME-ro-crate.zip)")


def _cmd_report(args: argparse.Namespace) -> int:
    vault, cache = _vault_and_cache(args)
    out = Path(args.output)
    count = write_report(vault, cache, out)
    print(out)
    say(f"{count} capsules in {out}")
    return 0


def _cmd_find(args: argparse.Namespace) -> int:
    path = Path(args.file)
    if not path.is_file():
        raise ConfigError(f"no such file: {path}; give the file whose origin you look for")
    hits = find_file(path, *_vault_and_cache(args))
    lines = [f"{name}  {role}  {recorded}" for name, role, recorded in hits]
    sys.stdout.writelines(map("{}\n".format, lines if all(map(str.isprintable, lines)) else map(printable, lines)))
    if not hits:
        print(f"no capsule recorded a file with the content of {path}", file=sys.stderr)
    return 0 if hits else 1


def _args_monitor(p: argparse.ArgumentParser) -> None:
    p.add_argument("-i", "--item", action="append", default=[], metavar="NAME", help="a [monitor.item.NAME] to record")
    p.add_argument("-q", "--quiet", action="store_true", help="do not print the capsule's path on stderr")
    p.add_argument("--no-tty", action="store_true", help="pipes, never a pseudo-terminal, for the command's output")
    p.add_argument("command", nargs="...", metavar="COMMAND", help="the command and its arguments")


def _args_show(p: argparse.ArgumentParser) -> None:
    p.add_argument("capsule", help="a path, a name, a unique prefix, latest or latest~N")
    p.add_argument("--json", action="store_true", help="print JSON")


def _args_diff(p: argparse.ArgumentParser) -> None:
    p.add_argument("a", help="the first capsule")
    p.add_argument("b", help="the second capsule")
    always = ", ".join(DEFAULT_IGNORES)
    help_text = f"a dotted field (or glob) to leave out; always left out: {always}"
    p.add_argument("--ignore", action="append", default=[], metavar="FIELD", help=help_text)


def _args_rerun(p: argparse.ArgumentParser) -> None:
    p.add_argument("capsule")
    p.add_argument("--here", action="store_true", help="rerun in the current working tree (after a verify)")
    p.add_argument("--upstream", action="store_true", help="rerun the capsules that made its inputs too, oldest first")


class Command(NamedTuple):
    help: str
    handler: Callable[[argparse.Namespace], int]
    reads_vault: bool
    arguments: Callable[[argparse.ArgumentParser], object] | None = None


_COMMANDS = {
    "capture": Command("capture the context into a new capsule", _cmd_capture, False),
    "monitor": Command("run a command and record it in a new capsule", _cmd_monitor, False, _args_monitor),
    "list": Command(
        "list the capsules in the vault, newest first",
        _cmd_list,
        True,
        lambda p: p.add_argument("--json", action="store_true"),
    ),
    "show": Command("summarize one capsule", _cmd_show, True, _args_show),
    "diff": Command("compare two capsules (exit 1 when they differ)", _cmd_diff, True, _args_diff),
    "verify": Command(
        "compare the current environment with a capsule", _cmd_verify, True, lambda p: p.add_argument("capsule")
    ),
    "rerun": Command("run a command capsule again and compare the result", _cmd_rerun, True, _args_rerun),
    "find": Command(
        "which capsules recorded a file with this content", _cmd_find, True, lambda p: p.add_argument("file")
    ),
    "export": Command("write a capsule as an RO-Crate (Process Run Crate)", _cmd_export, True, _args_export),
    "report": Command(
        "write the vault as one self-contained HTML page",
        _cmd_report,
        True,
        lambda p: p.add_argument("-o", "--output", default="capsula-report.html", metavar="FILE.html"),
    ),
    "lineage": Command(
        "the chain of capsules that produced a file or a capsule's inputs", _cmd_lineage, True, _args_lineage
    ),
}


_GLOBAL_OPTIONS = {"-C": "directory", "--directory": "directory", "-l": "log_level", "--log-level": "log_level"}


def _build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The argument parser; with ``only``, just that subcommand's (argparse is slow to build,
    and `capsula monitor` should cost little more than the command it runs). -C and -l are
    taken before the subcommand, as 0.0.19 takes them, and after it."""
    import argparse

    def formatter(prog: str) -> argparse.HelpFormatter:
        # HelpFormatter would import shutil (and bz2, lzma ...) just for the terminal width.
        try:
            columns = int(os.environ.get("COLUMNS") or os.get_terminal_size().columns)
        except (OSError, ValueError):
            columns = 80
        return argparse.HelpFormatter(prog, width=columns - 2)

    def add_global_options(p: argparse.ArgumentParser) -> None:
        # default=SUPPRESS: one given before the subcommand is not undone by the subcommand's parser
        help_c, levels = "the folder holding capsula.toml (default: upward)", ", ".join(LOG_LEVELS)
        p.add_argument("-C", "--directory", metavar="DIR", help=help_c, default=argparse.SUPPRESS)
        help_l = f"how much to say on stderr: {levels} (any case; default INFO)"
        p.add_argument("-l", "--log-level", metavar="LEVEL", help=help_l, default=argparse.SUPPRESS)

    description = __doc__.splitlines()[0] if __doc__ else None
    parser = argparse.ArgumentParser(prog="capsula", description=description, formatter_class=formatter)
    parser.add_argument("--version", action="version", version=f"capsula {__version__}")
    add_global_options(parser)
    sub = parser.add_subparsers(dest="command_name", required=True, metavar="COMMAND") if only is None else None
    for name, command in _COMMANDS.items():
        if only is not None and name != only:
            continue
        if sub is not None:
            p = sub.add_parser(name, help=command.help, description=command.help, formatter_class=formatter)
        else:  # alone: the same parser as `capsula NAME ...` would reach, without building the rest
            p = argparse.ArgumentParser(prog=f"capsula {name}", description=command.help, formatter_class=formatter)
        add_global_options(p)
        if command.reads_vault:
            p.add_argument("--vault", metavar="DIR", help="the vault to read (default: the config's)")
        if command.arguments:
            command.arguments(p)
        p.set_defaults(handler=command.handler)
        if sub is None:
            return p
    return parser


def _leading_options(argv: list[str], names: Mapping[str, str]) -> tuple[dict[str, list[str]], list[str]]:
    """The options at the front of argv that take a value (``-C DIR``, ``--directory=DIR``),
    by their destination, and what follows them."""
    given: dict[str, list[str]] = {}
    while argv:
        name, eq, value = argv[0].partition("=")
        if name not in names or (not eq and len(argv) < 2):
            break
        given.setdefault(names[name], []).append(value if eq else argv[1])
        argv = argv[1 if eq else 2 :]
    return given, argv


def _monitor_args(argv: list[str]) -> argparse.Namespace | None:
    """`capsula monitor`'s usual arguments, parsed without argparse: it is slow to import
    and build, and this is the command whose overhead matters. Anything unusual (help,
    ``-iNAME``, a typo) returns None, for argparse to parse and explain."""
    import types

    names = {**_GLOBAL_OPTIONS, "-i": "item", "--item": "item"}
    given: dict[str, list[str]] = {}
    flags = {"-q": "quiet", "--quiet": "quiet", "--no-tty": "no_tty"}
    seen, rest = set(), argv
    while True:
        more, rest = _leading_options(rest, names)
        for key, values in more.items():
            given.setdefault(key, []).extend(values)
        if not rest or rest[0] not in flags:
            break
        seen.add(flags[rest[0]])
        rest = rest[1:]
    if not rest or (rest[0].startswith("-") and rest[0] != "--"):
        return None
    last: dict[str, str | None] = {key: given[key][-1] if key in given else None for key in ("directory", "log_level")}
    # argparse's Namespace is a plain attribute bag; argparse itself costs more to import
    flags_seen = {"quiet": "quiet" in seen, "no_tty": "no_tty" in seen}
    args = types.SimpleNamespace(command=rest, item=given.get("item", []), handler=_cmd_monitor, **flags_seen, **last)
    return cast("argparse.Namespace", args)


def _bare_args(name: str, argv: list[str]) -> argparse.Namespace | None:
    """The arguments of a command that takes none of its own (`capsula capture -C DIR`),
    parsed without argparse, as _monitor_args does; anything else returns None."""
    import types

    command = _COMMANDS[name]
    given, rest = _leading_options(argv, _GLOBAL_OPTIONS)
    if command.arguments or command.reads_vault or rest:
        return None
    last = {key: given[key][-1] if key in given else None for key in ("directory", "log_level")}
    return cast("argparse.Namespace", types.SimpleNamespace(handler=command.handler, **last))


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        before, argv = _leading_options(argv, _GLOBAL_OPTIONS)  # `capsula -C DIR -l INFO capture`, as 0.0.19
        command = argv[0] if argv and argv[0] in _COMMANDS else None
        fast = _monitor_args(argv[1:]) if command == "monitor" else command and _bare_args(command, argv[1:])
        args = fast or _build_parser(command).parse_args(argv[1:] if command else argv)
        for key in ("directory", "log_level"):  # what follows the subcommand wins
            if getattr(args, key, None) is None:
                setattr(args, key, before.get(key, [None])[-1])
        set_log_level(args.log_level or ("WARNING" if getattr(args, "quiet", False) else "INFO"))
        code = int(args.handler(args))
        sys.stdout.flush()
        return code
    except CapsulaError as exc:
        print(f"capsula: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except BrokenPipeError:  # `capsula list | head`: the reader has what it wanted, as with `ls | head`
        with contextlib.suppress(OSError, ValueError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nothing left to flush at exit
        return 128 + signal.SIGPIPE
    except OSError as exc:  # `capsula list > /dev/full`
        if exc.filename is not None:
            raise
        print(f"capsula: error: cannot write the output: {user_error_text(exc)}", file=sys.stderr)
        return 1
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
    except (OSError, ValueError):  # main() said what failed; a closed stderr cannot be told
        code = code or 120
    os._exit(code)


if __name__ == "__main__":
    cli()
