"""Reading HDF5 files (models, converted weights, bottleneck caches, Keras files) so that damage is a refusal.

    attrs, tensors = hdf5.read(path)              # Damaged if the file cannot be read
    attrs, _ = hdf5.read(path, datasets=False)    # the file's own attributes only

Our checksums cover tensors and attributes, but a flipped bit in the file's
own structure (superblock, object headers, heaps, B-trees) reaches the HDF5
library first, and the library then raises any kind of exception (h5py
turns some of its errors into RuntimeError), crashes the process, or loops
forever. So the file is read in a forked child process that walks it and
sends back plain NumPy values, and the parent waits for it at most
``TIMEOUT`` seconds plus one per ``BYTES_PER_SECOND`` bytes of the file,
then kills it. An exception, a crash or the bound passed: the caller gets
one ``Damaged`` naming the file. The parent never opens the file itself, so
nothing it holds (a cache lock) waits on a damaged file beyond the bound.
A fork costs a few milliseconds; these files are read once per run.
"""
import faulthandler
import os
import pickle
import select
import signal
import time

import h5py

from dsconv import DsconvError

TIMEOUT = 15.0                # seconds for any file: a sound one takes well under one
BYTES_PER_SECOND = 10 * 2 ** 20


class Damaged(DsconvError):
    """An HDF5 file that cannot be read: the message names the file and what happened; callers add what to do."""


def read(path, datasets=True):
    """(attrs, tensors) of an HDF5 file, read in a child process within a time bound.

    attrs: {object name: {attribute: value}}, "/" for the file's own;
    tensors: {dataset name ("group/name"): array}. ``datasets=False`` reads
    the file's own attributes only (tensors is then empty).
    """
    try:
        size = os.path.getsize(path)
    except OSError as e:
        raise Damaged(f"{path}: cannot be read ({e.strerror or e})") from None
    try:
        return in_child(lambda: _walk(path, datasets), TIMEOUT + size / BYTES_PER_SECOND)
    except Damaged as e:
        raise Damaged(f"{path}: damaged HDF5 file ({e})") from None


def _walk(path, datasets):
    with h5py.File(path, "r") as f:
        attrs, tensors = {"/": {k: f.attrs[k] for k in f.attrs}}, {}
        if datasets:
            def visit(name, obj):
                attrs[name] = {k: obj.attrs[k] for k in obj.attrs}
                if isinstance(obj, h5py.Dataset):
                    tensors[name] = obj[()]
            f.visititems(visit)
    return attrs, tensors


def in_child(work, timeout):
    """work() run in a forked child, its (picklable) result returned; Damaged if it raises, dies or overruns."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into the caller's code
        try:
            os.close(r)
            signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
            faulthandler.disable()  # a crash is reported by the parent, in one line
            try:
                out = pickle.dumps(("ok", work()), protocol=pickle.HIGHEST_PROTOCOL)
            except BaseException as e:
                out = pickle.dumps(("error", f"{type(e).__name__}: {e}"))
            with os.fdopen(w, "wb") as f:
                f.write(out)
        finally:
            os._exit(0)
    os.close(w)
    chunks, deadline = [], time.monotonic() + timeout
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([r], [], [], left)[0]:
                raise Damaged(f"the HDF5 library did not finish reading it within {timeout:.0f} s")
            chunk = os.read(r, 1 << 20)
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(r)
        try:
            os.kill(pid, signal.SIGKILL)  # a no-op on a child that finished: it stays a zombie until reaped
        except ProcessLookupError:
            pass
        _, status = os.waitpid(pid, 0)
    try:
        kind, value = pickle.loads(b"".join(chunks))
    except Exception:
        raise Damaged(f"the HDF5 library crashed reading it ({_death(status)})") from None
    if kind != "ok":
        raise Damaged(value)
    return value


def _death(status):
    if os.WIFSIGNALED(status):
        return f"signal {signal.Signals(os.WTERMSIG(status)).name}"
    return f"exit status {os.waitstatus_to_exitcode(status)}"
