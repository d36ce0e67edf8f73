"""Writing files so that nothing is half-written, and locks where two processes can meet.

Every file dsconv writes goes to a temporary name in the destination's folder
(``.NAME.PID.K.tmp``), is flushed to disk (fsync) and renamed over the final
name: a full disk, a kill or Ctrl-C leaves the old file or none, never a
partial one. HDF5 files are built in memory first, because HDF5 writing
straight to a full disk can crash the process. ``remove_strays`` deletes the
temporary files of processes that no longer run; ``lock`` is an fcntl lock on
a file; ``check_writable`` tells before long work starts that an output
cannot be written; ``checksum`` is the integrity check of model and weight
files.
"""
import fcntl
import hashlib
import io
import itertools
import os
import re
import signal
import sys
from contextlib import contextmanager
from pathlib import Path

import h5py
import numpy as np

from dsconv import DsconvError

STRAY = re.compile(r"^\..+\.(\d+)\.\d+\.tmp$")
_counter = itertools.count()


class Busy(DsconvError):
    """Another process holds the lock."""


def temp_name(path):
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}.{next(_counter)}.tmp")


def _fsync_dir(folder):
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_all(contents):
    """Write {path: bytes} all or nothing: every file to its temporary name first, then all renamed.

    If any write fails (a full disk), the temporary files are removed and no
    final name is touched. The renames go in the order given.
    """
    temps = {}
    try:
        for path, data in contents.items():
            tmp = temps[Path(path)] = temp_name(path)
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
    except BaseException:
        for tmp in temps.values():
            tmp.unlink(missing_ok=True)
        raise
    for path, tmp in temps.items():
        os.replace(tmp, path)
    for folder in {p.parent for p in temps}:
        _fsync_dir(folder)


def write_bytes(path, data):
    write_all({path: data})


def write_text(path, text):
    write_bytes(path, text.encode())


def write_output(path, text):
    """Write ``text`` where the user asked: "-" is standard output, never anything replaced but a regular file.

    A FIFO, a device (/dev/null) or anything else not a regular file is
    written through, as a shell's ``>`` would; a symlink is followed and the
    file it points to written atomically; stale temporary files of that
    folder are removed first. On a full standard output, stdout is pointed
    at /dev/null so that Python's own flush at exit does not fail again.
    """
    if str(path) == "-":
        try:
            sys.stdout.write(text)
            sys.stdout.flush()
        except OSError:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            raise
        return
    target = Path(os.path.realpath(path))
    if target.exists() and not target.is_file():
        with open(target, "w") as f:
            f.write(text)
        return
    remove_strays(target.parent)
    write_text(target, text)


def hdf5_bytes(fill):
    """The bytes of an HDF5 file that ``fill(h5py.File)`` writes, built in memory."""
    buf = io.BytesIO()
    with h5py.File(buf, "w") as f:
        fill(f)
    return buf.getvalue()


def write_hdf5(path, fill):
    write_all({path: hdf5_bytes(fill)})


def default_dir(env, repo_folder, home_folder):
    """$env if set, else repo_folder in the source checkout (where setup.cfg is), else ~/home_folder."""
    if os.environ.get(env):
        return Path(os.environ[env])
    repo = Path(__file__).resolve().parent.parent
    return repo / repo_folder if (repo / "setup.cfg").exists() else Path.home() / home_folder


def file_key(path):
    """sha256 of a file's bytes, hex."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def file_key_or_error(path):
    """file_key, None for an empty file, or the OSError (for a thread pool's map, which stops at a raise)."""
    try:
        if path.stat().st_size == 0:
            return None
        return file_key(path)
    except OSError as e:
        return e


def checksum(attrs, tensors):
    """sha256 over the attributes (as text) and the tensors (name, dtype, shape, bytes)."""
    h = hashlib.sha256()
    for k in sorted(attrs):
        v = attrs[k]
        h.update(f"{k}={v.item() if hasattr(v, 'item') else v!r}\n".encode())
    for k in sorted(tensors):
        a = np.ascontiguousarray(tensors[k])
        h.update(f"{k}:{a.dtype.str}:{a.shape}\n".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


def remove_strays(folder):
    """Delete the temporary files in ``folder`` left by processes that no longer run; returns them."""
    removed = []
    try:
        entries = list(Path(folder).iterdir())
    except OSError:
        return removed
    for p in entries:
        m = STRAY.match(p.name)
        if m and p.is_file() and not alive(int(m.group(1))):
            try:
                p.unlink()
                removed.append(p)
            except OSError:
                pass
    return removed


def unwritable(folder):
    """None if files can be created in the existing ``folder``, else the reason."""
    tmp = temp_name(Path(folder) / "write-check")
    try:
        tmp.touch()
        tmp.unlink()
    except OSError as e:
        return e.strerror or str(e)
    return None


def check_writable(folder, advice):
    """Raise OSError naming ``folder`` (or its first existing ancestor) if files cannot be created there.

    A missing folder counts as writable when it can be created, without
    creating it.
    """
    folder = Path(folder)
    probe = folder
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if not probe.is_dir():
        raise OSError(f"{probe} is not a folder, so {folder} cannot be written; {advice}")
    reason = unwritable(probe)
    if reason:
        raise OSError(f"{probe}: cannot write here ({reason}); {advice}")


def check_output_file(path, advice):
    """Raise OSError if ``path`` cannot be written: its folder must exist and be writable.

    A symlink is judged by what it points to; a FIFO or device needs only to
    be writable, as write_output writes through it.
    """
    target = Path(os.path.realpath(path))
    if target.is_dir():
        raise OSError(f"{path} is a folder; {advice}")
    if target.exists() and not target.is_file():
        if not os.access(target, os.W_OK):
            raise OSError(f"{path}: cannot write to it; {advice}")
        return
    folder = target.parent
    if not folder.is_dir():
        raise OSError(f"{path}: the folder {folder} does not exist; {advice}")
    check_writable(folder, advice)


@contextmanager
def lock(path, shared=False, wait=True):
    """An fcntl lock on the file ``path`` (created if missing) for the duration of the block.

    ``wait=False`` raises Busy instead of waiting for another holder.
    """
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError:
        fd = os.open(path, os.O_RDONLY)  # a read-only folder: the lock file, if there, still locks
    try:
        flags = (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | (0 if wait else fcntl.LOCK_NB)
        try:
            fcntl.flock(fd, flags)
        except BlockingIOError:
            raise Busy(str(path)) from None
        yield
    finally:
        os.close(fd)


@contextmanager
def interrupts_deferred():
    """Hold Ctrl-C back during the block and raise it (KeyboardInterrupt) at its end.

    Files written together, such as a model and its results, then land all
    or none. Outside the main thread, where no signal handler can be set, the
    block runs as it is.
    """
    caught = []
    try:
        previous = signal.signal(signal.SIGINT, lambda *_: caught.append(True))
    except ValueError:
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if caught:
        raise KeyboardInterrupt
