"""Every command that writes owns its output: a lock, an identity checked on rerun, atomic
publishing, and writability checked before any work starts.

An output is a directory (a training workdir, an SAE, a DATADIR, a tokenizer, an export) or a file
(the JSON Lines of translation, synthesis, completions and grades; a report). `Output` gives it:

* **a lock**: `.NAME.lock` beside it, held with `flock` for as long as the command runs. A second
  writer is refused in one line naming the holder (pid, host, command, since when). The kernel
  drops the lock when its process dies, so a lock left by a killed run is simply free; the file
  itself stays and is reused. (`flock` is advisory and may be unsupported on network file systems
  such as gcsfuse: there the lock is skipped with a warning.)
* **an identity**: the settings that define the output (architecture, tokenizer content hash,
  data, layer, seeds, prompt versions, judge model, ...), written when it is created
  (`identity.json` inside a directory, `NAME.identity.json` beside a file). A rerun compares:
  the same settings resume (or, for an output that is made whole, find it done); other settings
  are refused in one line naming what differs, and nothing on disk changes. `overwrite=True`
  (`--overwrite`) replaces the output instead. Nothing is ever moved aside or deleted because a
  rerun disagreed with it.
* **atomic publishing** (for outputs made whole): the command writes into a temporary sibling
  `.NAME.tmp-PID`, and `publish()` renames it into place, so the output appears complete or not
  at all. Leftovers of killed runs (temporary siblings whose process is gone) are removed by the
  next run that takes the lock.
* **writability first**: the output's folder is created and probed before the work starts, so a
  read-only or missing location, or a file where a folder is expected, is one line at once, not
  a traceback after an hour of work. A disk that fills (or turns read-only) later, while the
  output is being written, is one line naming the output too, not its temporary sibling.

A file written in place (`directory=False, mode="resume"`: the append-only JSON Lines of
translation, synthesis and grading) gets its identity beside it when it is created; the command
appends to it through `jaxlm.store.JsonlStore(path, lock=False)` while the `Output` holds the lock.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import shutil
import socket
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, Literal

from jaxlm.errors import UserError

log = logging.getLogger("jaxlm.outputs")

IDENTITY = "identity.json"
FORMAT = 1


def identity_path(path: Path, directory: bool) -> Path:
    """Where an output's identity lives: inside a directory, beside a file."""
    return path / IDENTITY if directory else path.with_name(path.name + ".identity.json")


def read_identity(path: str | Path, directory: bool | None = None) -> dict | None:
    """The identity record of an output ({"kind", "identity", ...}), or None if it has none."""
    path = Path(path)
    directory = path.is_dir() if directory is None else directory
    p = identity_path(path, directory)
    try:
        return json.loads(p.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise UserError(f"{p}: unreadable identity ({e}); delete it or use --overwrite") from None


def flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}, for naming what differs."""
    if not isinstance(d, Mapping):
        return {prefix: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def differences(saved: Mapping, now: Mapping) -> list[str]:
    """The keys whose values differ, as `key: old -> new`: shallow keys first (the setting a user
    changed, e.g. `model.path`, before what is derived from it, e.g. `model.params.mtime`, which
    a one-line error may cut off), then by name."""
    a, b = flatten(saved), flatten(json.loads(json.dumps(now)))  # JSON types on both sides
    keys = sorted((k for k in set(a) | set(b) if a.get(k) != b.get(k)),
                  key=lambda k: (k.count("."), k))  # fmt: skip
    return [f"{k} {_short(a.get(k))} -> {_short(b.get(k))}" for k in keys]


def _short(v: Any) -> str:
    text = json.dumps(v, ensure_ascii=False) if v is not None else "(none)"
    return text if len(text) <= 60 else text[:28] + "..." + text[-28:]


def say_done(path: str | Path) -> None:
    """What a command says (on stderr) when it finds its output already made with the same
    settings (`Output.done`) and skips the work: one line."""
    print(f"{Path(path).resolve()} is already made with these settings; nothing to do (pass "
          "--overwrite to make it again)", file=sys.stderr)  # fmt: skip


# --- locks -----------------------------------------------------------------------------------


class Lock:
    """An exclusive `flock` on `.NAME.lock` beside `target`, with who holds it written inside."""

    def __init__(self, target: Path):
        self.target = target
        self.path = target.parent / f".{target.name}.lock"
        self._f: Any = None

    def acquire(self) -> Lock:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            f = open(self.path, "a+")  # noqa: SIM115  (held open while the lock is)
        except OSError as e:  # a read-only or forbidden place: the output's, say so
            raise UserError(f"{self.target}: cannot write there ({e.strerror or e})") from None
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = _describe(f.read())
            f.close()
            raise UserError(
                f"{self.target} is being written by {holder}; wait for it to finish, or write "
                "to another output"
            ) from None
        except OSError as e:  # no flock here (some network file systems): go on unlocked
            if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                f.close()
                raise
            log.warning("%s: cannot lock (%s); two writers would not be stopped", self.path, e)
        f.seek(0)
        f.truncate()
        f.write(json.dumps(_me()) + "\n")
        f.flush()
        self._f = f
        return self

    def release(self) -> None:
        if self._f is not None:
            self._f.close()  # closing drops the flock
            self._f = None

    def __enter__(self) -> Lock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def refuse_if_being_written(target: Path) -> None:
    """One line naming the writer when `target` (an input about to be read whole, e.g. a
    translation shard being merged) is held by a running command. Only a probe: it takes no lock
    (a reader cannot name itself in the lock file, so a writer would name the wrong holder)."""
    path = Lock(target).path
    try:
        f = open(path)  # noqa: SIM115
    except OSError:
        return  # never locked (or unreadable): nobody is writing it through jaxlm
    with f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(
                f"{target} is being written by {_describe(f.read())}; wait for it to finish"
            ) from None
        except OSError:
            return  # no flock here


def _me() -> dict:
    return {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%F %T"),
            "command": " ".join(sys.argv[:6])[:200]}  # fmt: skip


def _describe(text: str) -> str:
    try:
        h = json.loads(text)
        return f"pid {h['pid']} on {h['host']} since {h['since']} ({h['command']})"
    except (ValueError, KeyError, TypeError):
        return "another process"


# --- writability -----------------------------------------------------------------------------


def check_writable(path: Path, directory: bool) -> None:
    """The output can be made at `path`: its folder exists or can be created, is a folder, and
    takes a file. One line naming the path otherwise (read-only, no permission, full, a file
    where a folder is expected, or a folder where a file is)."""
    probe = path.parent / f".{path.name}.probe-{os.getpid()}"
    try:
        _check_kinds(path, directory)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(probe, "wb") as f:
            f.write(b"\0" * 4096)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:  # a folder we may not enter counts too
        raise UserError(f"{path}: cannot write there ({e.strerror or e})") from None
    finally:
        with contextlib.suppress(OSError):
            probe.unlink()


def _check_kinds(path: Path, directory: bool) -> None:
    parent = path.parent
    for p in (parent, *parent.parents):
        if p.exists():
            if not p.is_dir():
                raise UserError(f"{path}: {p} is a file, not a folder")
            break
    if path.exists() and path.is_dir() != directory:
        want = "a folder" if directory else "a file"
        raise UserError(f"{path} exists and is not {want}")


# --- outputs ---------------------------------------------------------------------------------


class Output:
    """One output of a command: `with Output(...) as out:` holds its lock for the block.

    `mode="resume"`: a directory written in place (a training workdir): a rerun with the same
    identity continues in it; with another, refused. `mode="atomic"`: written into `out.tmp` and
    made visible whole by `out.publish()`; a finished output with the same identity is `done`
    (the caller skips the work), one with another is refused. Either way `overwrite=True`
    replaces what is there. `adopt(path)` may accept an output made before identities existed
    (it then gets this run's identity recorded).
    """

    def __init__(
        self,
        path: str | Path,
        *,
        kind: str,
        identity: Mapping[str, Any],
        mode: Literal["resume", "atomic"] = "atomic",
        directory: bool = True,
        overwrite: bool = False,
        flag: str = "--out",
        adopt: Callable[[Path], bool] | None = None,
    ):
        if "://" in str(path):  # Path() would make gs://B/x a local folder gs:/B/x
            raise UserError(f"{flag} {path}: a file-system path, e.g. a gcsfuse mount")
        self.path = Path(path).resolve()
        self.kind, self.mode, self.directory = kind, mode, directory
        self.identity = json.loads(json.dumps(dict(identity)))  # JSON types, a copy
        self.overwrite, self.flag, self.adopt = overwrite, flag, adopt
        self.tmp = self.path.parent / f".{self.path.name}.tmp-{os.getpid()}"
        self.done = False  # atomic: already made with this identity
        self._lock = Lock(self.path)

    def __enter__(self) -> Output:
        check_writable(self.path, self.directory)
        self._lock.acquire()
        try:
            self._clean_leftovers()
            self._check_existing()
            if self.mode == "atomic" and not self.done:
                _remove(self.tmp)
                if self.directory:
                    self.tmp.mkdir(parents=True)
        except BaseException:
            self._lock.release()
            raise
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.mode == "atomic":
            _remove(self.tmp)
        self._lock.release()
        if isinstance(exc, OSError) and self._is_ours(exc):
            # the disk, not the code: one line naming the output, not its temporary sibling
            raise UserError(f"{self.path}: cannot write ({exc.strerror or exc})") from None

    def _is_ours(self, e: OSError) -> bool:
        """A write error of this output: a full disk (whatever file it names), or a read-only,
        forbidden or failing file of the output or its temporary siblings."""
        if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            return True
        name = str(Path(e.filename).resolve()) if e.filename else ""
        mine = (str(self.path), str(self.path.parent / f".{self.path.name}."))
        return e.errno in (errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO) and (
            name.startswith(mine)
        )

    @property
    def record(self) -> dict:
        return {"format": FORMAT, "kind": self.kind, "identity": self.identity,
                "created": time.strftime("%F %T")}  # fmt: skip

    def _check_existing(self) -> None:
        if not self.path.exists():
            if self.mode == "resume":
                self._start_fresh()
            return
        saved = read_identity(self.path, self.directory)
        if self.overwrite:
            if self.mode == "resume":
                _remove(self.path)
                self._start_fresh()
            return  # atomic: replaced at publish
        if saved is None:
            if self.adopt is not None and self.adopt(self.path):  # made before identities
                log.info("%s: recording its identity (made by an earlier jaxlm)", self.path)
                self.write_identity()
                return
            if _empty(self.path):
                if self.mode == "resume":
                    self._start_fresh()
                return  # an empty folder is no output yet
            raise UserError(
                f"{self.path} exists and was not made by `jaxlm` with a recorded identity; "
                f"pass --overwrite to replace it, or choose another {self.flag}"
            )
        if saved.get("kind") != self.kind:
            raise UserError(
                f"{self.path} holds a {saved.get('kind')} output, not a {self.kind}; choose "
                f"another {self.flag} (or --overwrite to replace it)"
            )
        diff = differences(saved.get("identity", {}), self.identity)
        if diff:
            what = "; ".join(diff[:4]) + (f"; and {len(diff) - 4} more" if len(diff) > 4 else "")
            raise UserError(
                f"{self.path} was made with other settings ({what}): rerun with those settings "
                f"to {'resume' if self.mode == 'resume' else 'keep'} it, or pass --overwrite to "
                f"replace it, or choose another {self.flag}"
            )
        if self.mode == "atomic":
            self.done = True

    def _start_fresh(self) -> None:
        if self.directory:
            self.path.mkdir(parents=True, exist_ok=True)
        _write_json(identity_path(self.path, self.directory), self.record)

    def add_history(self, entry: Mapping[str, Any]) -> None:
        """Append `entry` to the identity record's `history` (resume mode): for a run that the
        output's own command lets differ from its identity (e.g. `translate --retry-rejected`
        with a bigger beam), so what wrote the output stays on record. The identity itself, what
        reruns are compared with, does not change."""
        p = identity_path(self.path, self.directory)
        saved = read_identity(self.path, self.directory) or self.record
        saved.setdefault("history", []).append({"at": time.strftime("%F %T"), **entry})
        _write_json(p, json.loads(json.dumps(saved)))

    def write_identity(self, where: Path | None = None) -> None:
        """Record the identity (resume mode: done on creation; atomic: done by `publish`)."""
        target = where if where is not None else self.path
        _write_json(identity_path(target, self.directory), self.record)

    def publish(self) -> Path:
        """Make the output visible whole: identity into the temporary copy, then a rename over
        the old one (with --overwrite) or into a free name."""
        if self.mode != "atomic":
            raise ValueError("publish() is for atomic outputs")
        if self.directory:
            _write_json(self.tmp / IDENTITY, self.record)
        _fsync_tree(self.tmp)
        old = self.path.parent / f".{self.path.name}.old-{os.getpid()}"
        if self.path.exists():  # only with overwrite (else __enter__ refused or found it done)
            os.replace(self.path, old)
        if not self.directory:  # before the file: a file without its identity would be refused
            self.write_identity()
        os.replace(self.tmp, self.path)
        _fsync_dir(self.path.parent)
        _remove(old)
        return self.path

    def _clean_leftovers(self) -> None:
        """Temporary siblings of killed runs: ours to remove, now that we hold the lock."""
        for pattern in (f".{self.path.name}.tmp-*", f".{self.path.name}.old-*"):
            for p in self.path.parent.glob(pattern):
                pid = p.name.rsplit("-", 1)[-1]
                if pid.isdigit() and int(pid) != os.getpid():
                    log.info("removing %s, left by a run that did not finish", p)
                    _remove(p)


def _empty(p: Path) -> bool:
    """An empty folder or file: no output yet (e.g. made by `mkdir` or `touch`)."""
    if p.is_dir():
        return not any(p.iterdir())
    return p.is_file() and p.stat().st_size == 0


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    elif p.exists() or p.is_symlink():
        p.unlink()


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def _fsync_tree(root: Path) -> None:
    paths: Iterator[Path] = root.rglob("*") if root.is_dir() else iter([root])
    for p in paths:
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())


def _fsync_dir(d: Path) -> None:
    fd = os.open(d, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_STRERRORS = {os.strerror(c): c for c in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES,
                                          errno.EPERM, errno.EIO, errno.EFBIG)}  # fmt: skip


@contextlib.contextmanager
def disk_errors(path: str | Path) -> Iterator[None]:
    """Inside the block, a writer library's exception that reports a disk error in its message
    (ArrayRecord's RuntimeError, safetensors' SafetensorError, Orbax's ValueError: "No space left
    on device", "Read-only file system", ...) is raised as that `OSError` on `path`, so the output
    (`Output.__exit__`) or the CLI says it in one line; other exceptions pass unchanged."""
    try:
        yield
    except (OSError, UserError):
        raise
    except Exception as e:
        for text, code in _STRERRORS.items():
            if text in str(e):
                raise OSError(code, text, str(path)) from None
        raise


def file_fingerprint(path: str | Path) -> dict:
    """What identifies an input file cheaply: its resolved path, size and modification time."""
    p = Path(path).resolve()
    try:
        st = p.stat()
    except OSError:
        return {"path": str(p)}
    return {"path": str(p), "bytes": st.st_size, "mtime": int(st.st_mtime)}


def tree_fingerprint(path: str | Path) -> dict:
    """What identifies an input folder cheaply (an SAE, a DATADIR, a model's parameters): its
    resolved path, and the number, total size and newest modification time of the files in it.
    A file: `file_fingerprint`."""
    p = Path(path).resolve()
    if not p.is_dir():
        return file_fingerprint(p)
    files = [f.stat() for f in p.rglob("*") if f.is_file()]
    return {"path": str(p), "files": len(files), "bytes": sum(f.st_size for f in files),
            "mtime": int(max((f.st_mtime for f in files), default=0))}  # fmt: skip
