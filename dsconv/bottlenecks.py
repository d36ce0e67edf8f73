"""Bottlenecks: each image through the frozen network once, cached on disk.

    feats, failed = extract(paths, net, "pooled", cache_dir)
    both, failed = extract(paths, net, ("pooled", "logits"), cache_dir)   # {kind: feats}, one forward pass
    feats, failed = extract(paths, net, "pooled", cache_dir, tta="flip")
    [a, b], failed = extract(paths, [net_a, net_b], "pooled", cache_dir)   # an ensemble: concatenate a, b

A bottleneck is the pooled 1024*alpha vector (``pooled``) or the 1000
ImageNet logits (``logits``, retrain.py's choice; needs the with-top weights).
With test-time augmentation ``tta="flip"`` it is the mean of the image's and
its mirror image's (left-right) bottlenecks, cached on their own.
An ensemble concatenates the bottlenecks of several networks, in order.

The cache is one folder per ``attrs`` under ``cache_dir``, named by alpha,
resolution, bottleneck kind, the sha256 of the network tensors the
bottleneck depends on (the backbone for ``pooled``, backbone and head for
``logits``: the with-top and no-top weight files of one alpha share pooled
bottlenecks) and that of the preprocessing description; rows are keyed by
the sha256 of the image file's bytes, so renamed or copied images hit and an
edited image misses. Each
batch is written as its own small HDF5 file (written to a temporary name,
then renamed), so Ctrl-C or a killed process loses at most the batch in
flight; at the end the parts are merged into ``bottlenecks.h5``. Every file
carries the attrs and a sha256 of its rows: a file that does not open, or
whose attrs, shapes or checksum disagree, is reported, deleted and
recomputed, never trusted.

Several processes may share a cache: the merge holds an fcntl lock on the
cache folder's ``.lock`` and folds in every part present, so no run
deletes rows another has not merged; readers take the lock shared. A cache
that cannot be written (read-only, full) is used for what it holds, with one
warning, and the rest is kept in memory.
"""
import contextlib
import hashlib
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from dsconv import DsconvError, files, hdf5, images, warn

KINDS = ("pooled", "logits")
TTAS = ("none", "flip")
BATCH = 32
WORKERS = 2  # image decoding threads
MERGED = "bottlenecks.h5"
_warned = set()  # cache folders already reported as unwritable in this process
FORMAT = "dsconv-bottlenecks-v1"


def default_cache_dir():
    """$DSCONV_CACHE, else the repository's cache/, else ~/.cache/dsconv."""
    return files.default_dir("DSCONV_CACHE", "cache", Path(".cache", "dsconv"))


def attrs(net, kind, tta="none", form=None, blur=0.0):
    """The attributes that decide a bottleneck, besides the image; every cache file carries them.

    ``form``: a dsconv.forms.Form applied to each image file first, or None;
    ``blur``: see dsconv.images.resized.
    """
    if kind not in KINDS:
        raise DsconvError(f"bottleneck must be one of {KINDS}, got {kind!r}")
    if tta not in TTAS:
        raise DsconvError(f"test-time augmentation must be one of {TTAS}, got {tta!r}")
    if kind == "logits" and not net.has_head:
        raise DsconvError("the logits bottleneck needs the network with its ImageNet head "
                         "(dsconv.weights.load(..., head=True))")
    a = {"alpha": float(net.alpha), "resolution": int(net.resolution), "kind": kind,
         "tensors_sha256": net.tensors_sha256(head=kind == "logits"), "preprocessing": images.preprocessing(blur)}
    if tta != "none":  # absent for plain bottlenecks, so that their caches keep their names
        a["tta"] = tta
    if form is not None:
        a["form"] = form.description
    return a


def folder(cache_dir, a):
    """The cache folder of the bottlenecks with attrs ``a``."""
    prep = hashlib.sha256(a["preprocessing"].encode()).hexdigest()[:8]
    tta = f"-{a['tta']}" if "tta" in a else ""
    form = f"-form-{hashlib.sha256(a['form'].encode()).hexdigest()[:8]}" if "form" in a else ""
    return Path(cache_dir) / (f"mobilenet-{a['alpha']:g}-{a['resolution']}-{a['kind']}{tta}{form}-"
                              f"{a['tensors_sha256'][:16]}-{prep}")


def forward(net, x, tta="none"):
    """(pooled, logits or None) of a batch x (N, r, r, 3); with tta="flip" the mean of x's and its mirror's."""
    if tta == "none":
        return net.forward(x)
    n = len(x)
    pooled, logits = net.forward(np.concatenate([x, x[:, :, ::-1]]))
    return (pooled[:n] + pooled[n:]) / 2, None if logits is None else (logits[:n] + logits[n:]) / 2


def _checksum(keys, feats):
    h = hashlib.sha256(np.ascontiguousarray(keys).tobytes())
    h.update(np.ascontiguousarray(feats, np.float32).tobytes())
    return h.hexdigest()


def _write(path, a, keys, feats):
    """Write rows atomically: a temporary name, then rename."""
    keys = np.asarray(keys, "S64")

    def fill(f):
        f.attrs.update(format=FORMAT, checksum=_checksum(keys, feats), **a)
        f["keys"] = keys
        f["features"] = np.asarray(feats, np.float32)
    files.write_hdf5(path, fill)


def _read(path, a):
    """{key: row} of one cache file; raises ValueError saying what is wrong."""
    try:
        file_attrs, tensors = hdf5.read(path)
        attrs, keys, feats = file_attrs["/"], tensors["keys"], tensors["features"]
    except (hdf5.Damaged, KeyError) as e:
        raise ValueError(f"cannot be read ({str(e).removeprefix(f'{path}: ')})") from None
    for k, want in a.items():
        got = attrs.get(k)
        if got is None or (got.item() if hasattr(got, "item") else got) != want:
            raise ValueError(f"holds {k} {got!r}, not {want!r}")
    keys, feats = np.asarray(keys), np.asarray(feats)
    if (attrs.get("format") != FORMAT or keys.ndim != 1 or keys.dtype.kind != "S" or feats.ndim != 2
            or feats.dtype.kind != "f" or len(keys) != len(feats)):
        raise ValueError(f"has shapes keys {keys.shape}, features {feats.shape}")
    if attrs.get("checksum") != _checksum(keys, feats):
        raise ValueError("fails its checksum")
    return dict(zip(keys.astype(str), feats))


class Cache:
    """The bottlenecks of one ``attrs`` on disk: ``get``, ``put`` a batch, ``merge``."""

    def __init__(self, cache_dir, a, width):
        self.attrs, self.width = a, width
        self.dir = folder(cache_dir, a)
        self.rows = {}
        self.parts = 0
        self.writable = True
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            self._read_only(e.strerror or e)
        else:
            reason = files.unwritable(self.dir)
            if reason:
                self._read_only(reason)
            else:
                files.remove_strays(self.dir)
        if not self.dir.is_dir():
            return
        with self._lock(shared=True):
            for path in sorted(self.dir.glob("*.h5")):
                try:
                    self.rows.update(self._load(path))
                except ValueError as e:
                    warn(f"bottleneck cache {path} {e}; deleting it, its images will be computed again")
                    if self.writable:
                        path.unlink(missing_ok=True)
        self.parts = len(list(self.dir.glob("part-*.h5")))

    def _read_only(self, reason):
        if self.writable and self.dir not in _warned:  # predict opens a cache per chunk: one warning, not eight
            _warned.add(self.dir)
            warn(f"cannot write the bottleneck cache {self.dir} ({reason}); running without saving bottlenecks")
        self.writable = False

    def _lock(self, shared=False):
        lock = self.dir / ".lock"
        if not self.writable and not lock.exists():
            return contextlib.nullcontext()
        return files.lock(lock, shared=shared)

    def _load(self, path):
        rows = _read(path, self.attrs)
        if any(r.shape != (self.width,) for r in rows.values()):
            raise ValueError(f"holds vectors of another size than {self.width}")
        return rows

    def put(self, keys, feats):
        self.rows.update(zip(keys, np.asarray(feats, np.float32)))
        if not self.writable:
            return
        name = f"part-{time.time_ns()}-{os.getpid()}.h5"
        try:
            _write(self.dir / name, self.attrs, keys, feats)
        except OSError as e:
            self._read_only(e.strerror or e)
            return
        self.parts += 1

    def merge(self):
        """All rows into one file, then the parts it took in removed (a crash in between only duplicates rows).

        Under the folder's lock, the parts are read again: another process's
        parts written since this one started are merged too, not lost.
        """
        if not self.writable or not self.parts:
            return
        try:
            with self._lock():
                parts = sorted(self.dir.glob("part-*.h5"))
                merged = self.dir / MERGED
                rows = {}
                for path in ([merged] if merged.exists() else []) + parts:
                    try:
                        rows.update(self._load(path))
                    except ValueError:
                        continue
                rows.update(self.rows)
                keys = sorted(rows)
                _write(merged, self.attrs, keys, np.stack([rows[k] for k in keys]))
                for p in parts:
                    p.unlink(missing_ok=True)
        except OSError as e:
            self._read_only(e.strerror or e)
            return
        self.rows.update(rows)
        self.parts = 0


class Progress:
    """A one-line progress bar on stderr: done/total, images/s, time left."""

    def __init__(self, total, label, stream=sys.stderr):
        self.total, self.label, self.stream = total, label, stream
        self.start = self.last = time.perf_counter()
        self.tty = hasattr(stream, "isatty") and stream.isatty()

    def update(self, done, final=False):
        now = time.perf_counter()
        if not final and now - self.last < (0.5 if self.tty else 15):
            return
        self.last = now
        rate = done / max(now - self.start, 1e-9)
        left = (self.total - done) / rate if rate > 0 else float("inf")
        width = 30
        bar = "#" * int(width * done / max(self.total, 1))
        eta = f"{int(left) // 60}:{int(left) % 60:02d} left" if left != float("inf") else "--:-- left"
        line = f"{self.label} [{bar:{width}s}] {done}/{self.total}  {rate:.1f} images/s  {eta}"
        if final:
            line = f"{self.label} {done} images in {now - self.start:.1f} s, {rate:.1f} images/s"
        self.stream.write(("\r" + line + ("\n" if final else "")) if self.tty else line + "\n")
        self.stream.flush()


def _decode(path, sizes, key=None, form=None, blur=0.0):
    """({size: network input (r, r, 3) float32} or None, error message or None) of one file.

    Scaled here, in the decoding threads, so that the thread running the
    network only stacks the batch. ``form``: applied to the file's bytes
    (content ``key``) first.
    """
    try:
        source = path if form is None else form.apply(images.read_bytes(path), key)
        return {r: images.scale(px) for r, px in images.decode_sizes(source, sizes, path, blur).items()}, None
    except images.ImageError as e:
        return None, str(e)


def extract(paths, nets, kinds="pooled", cache_dir=None, *, batch=BATCH, workers=WORKERS, progress=True, tta="none",
            form=None, blur=0.0, seconds=None):
    """Bottlenecks of image files, computing only those not in the cache.

    Returns (features, failed): ``failed`` maps each path that could not be
    read or decoded to the reason (empty, corrupt and non-image files); each
    features array is (N, D) float32, one row per path not in ``failed``, in
    the order of ``paths``.

    ``nets``: a network, or a list of networks (an ensemble, or an alpha at
    several resolutions), each image decoded once for all of them; ``kinds``:
    a bottleneck kind, or several from one forward pass per image (each kind
    has its own cache). ``features`` follows their shapes: an array for one
    network and one kind, {kind: array} for several kinds, and a list of
    those, one per network, for a list. An image missing from any cache goes
    through every network once for all kinds.

    ``cache_dir=None`` uses default_cache_dir(); ``cache_dir=False`` keeps
    nothing on disk. Decoding runs in ``workers`` threads ahead of the
    forward pass. ``tta``: see the module docstring; ``form``: a
    dsconv.forms.Form applied to every file first, cached as its own
    variant; ``blur``: see dsconv.images.resized; ``seconds``, a list with
    one number per net, accumulates each network's forward time.
    """
    one_net, one_kind = not isinstance(nets, (list, tuple)), isinstance(kinds, str)
    nets, kinds = [nets] if one_net else list(nets), tuple(dict.fromkeys((kinds,) if one_kind else kinds))
    per_net = [{kind: attrs(net, kind, tta, form, blur) for kind in kinds} for net in nets]
    sizes = [{kind: net.pooled_width if kind == "pooled" else net.params["conv_preds"]["bias"].shape[0]
              for kind in kinds} for net in nets]
    paths = [Path(p) for p in paths]
    failed, keys = {}, {}
    pool = ThreadPoolExecutor(max(1, workers))
    try:
        for path, key in zip(paths, pool.map(files.file_key_or_error, paths)):
            if isinstance(key, Exception):
                failed[path] = f"{path}: cannot be read ({key})"
            elif key is None:
                failed[path] = f"{path}: the file is empty"
            else:
                keys[path] = key
        root = default_cache_dir() if cache_dir is None else cache_dir
        caches = [{kind: Cache(root, a[kind], size[kind]) for kind in kinds} if cache_dir is not False else {}
                  for a, size in zip(per_net, sizes)]
        known = [{kind: c[kind].rows if c else {} for kind in kinds} for c in caches]
        todo = list({keys[p]: p for p in paths
                     if p in keys and any(keys[p] not in k[kind] for k in known for kind in kinds)}.items())
        computed = [{kind: {} for kind in kinds} for _ in nets]
        if todo:
            label = "+".join(f"{net.alpha:g}-{net.resolution}" for net in nets)
            _run(todo, nets, tta, caches, computed, failed, pool, batch,
                 Progress(len(todo), f"bottlenecks {label} {'+'.join(kinds)}" + (f" {tta}" if tta != "none" else "")
                          + (f" {form.name}" if form else "")) if progress else None,
                 seconds if seconds is not None else [0.0] * len(nets), form, blur)
        for c in caches:
            for cache in c.values():
                if cache.parts:
                    cache.merge()
    finally:
        pool.shutdown(cancel_futures=True)
    for p in paths:  # a key's first path failing to decode fails its duplicates too
        if p in keys and p not in failed and any(keys[p] not in kn[k] and keys[p] not in co[k]
                                                 for kn, co in zip(known, computed) for k in kinds):
            failed[p] = f"{p}: cannot be read as an image (same content as another file that failed)"
    out = []
    for kn, co, size in zip(known, computed, sizes):
        out.append({})
        for kind in kinds:
            rows = [kn[kind].get(keys[p], co[kind].get(keys[p])) for p in paths if p not in failed]
            out[-1][kind] = np.stack(rows).astype(np.float32) if rows else np.zeros((0, size[kind]), np.float32)
    if failed:
        for msg in failed.values():
            warn(f"skipped {msg}")
    if one_kind:
        out = [f[kinds[0]] for f in out]
    return out[0] if one_net else out, failed


def _run(todo, nets, tta, caches, computed, failed, pool, batch, bar, seconds, form=None, blur=0.0):
    """Forward (key, path) pairs in batches through every net, decoding the next batch while this one runs."""
    batches = [todo[i:i + batch] for i in range(0, len(todo), batch)]
    resolutions = [net.resolution for net in nets]

    def submit(chunk):
        return [pool.submit(_decode, p, resolutions, k, form, blur) for k, p in chunk]

    ahead = submit(batches[0])
    done = 0
    try:
        for i, chunk in enumerate(batches):
            decoded = [f.result() for f in ahead]
            ahead = submit(batches[i + 1]) if i + 1 < len(batches) else []
            good = []
            for (k, p), (px, err) in zip(chunk, decoded):
                if err is None:
                    good.append((k, px))
                else:
                    failed[p] = err
            if good:
                ks = [k for k, _ in good]
                for n, net in enumerate(nets):
                    t = time.perf_counter()
                    pooled, logits = forward(net, np.stack([px[net.resolution] for _, px in good]), tta)
                    seconds[n] += time.perf_counter() - t
                    for kind in computed[n]:
                        out = pooled if kind == "pooled" else logits
                        if kind in caches[n]:
                            caches[n][kind].put(ks, out)
                        computed[n][kind].update(zip(ks, np.asarray(out, np.float32)))
            done += len(chunk)
            if bar:
                bar.update(done)
    finally:
        if bar:
            bar.update(done, final=True)
        for c in caches:
            for cache in c.values():
                cache.merge()
