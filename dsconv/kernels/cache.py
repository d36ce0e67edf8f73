"""Numba's cache (cache=True) made safe across the files of this package.

Promises: a function of this package read from Numba's cache was compiled
from the package's current sources, every file of it, not only the file
that defines the function. Nothing here is compiled.

    salt           a hash of every .py file of this package
    SaltedLocator  Numba's own cache locator for a function of this package, its source stamp salted
    salted         whether the locator is in place (when not, config.JIT turns the cache off)

Numba keys a cached function by the file that defines it (the file's stamp:
a hash of its contents, or its time and size in older Numba). Code compiled
into a function from another file is not in that key: an intrinsic's LLVM
IR (vector.py's micro-kernels), an inline="always" helper, a global constant.
After that other file changes, the cached function would keep running the
old code (numba issue 1833). So the stamp of every function defined in this
package also holds `salt`: editing any of its files recompiles the whole
package at the next import, as editing the single kernels.py did.
(tests/test_kernel_cache.py edits one file's helper in a copy of the package
and sees the cached caller in another file recompiled.)

Numba picks a locator per cached function (njit and cfunc alike) from
numba.core.caching.CacheImpl._locator_classes (_CacheImpl in older Numba),
the first one that accepts the function's file: SaltedLocator goes first,
accepts this package's files only, and wraps the locator Numba would have
picked (same folder, same file names), salting its source stamp. Numba
compares the stamp stored in a function's cache index with the current one
and recompiles when they differ.
"""
import hashlib
import os

from numba.core import caching, config

from dsconv import warn

HERE = os.path.dirname(os.path.abspath(__file__))


def package_salt(folder):
    """A hash of the names and contents of the .py files in folder."""
    digest = hashlib.sha256()
    for name in sorted(os.listdir(folder)):
        if name.endswith(".py"):
            with open(os.path.join(folder, name), "rb") as f:
                data = f.read()
            digest.update(f"{name}\0{len(data)}\0".encode() + data)
    return digest.hexdigest()


salt = package_salt(HERE)


class SaltedLocator(caching._CacheLocator):
    """The locator Numba would pick for a function of this package, with the package's salt in its source stamp."""

    def __init__(self, inner):
        self._inner = inner

    def ensure_cache_path(self):
        self._inner.ensure_cache_path()

    def get_cache_path(self):
        return self._inner.get_cache_path()

    def get_disambiguator(self):
        return self._inner.get_disambiguator()

    def get_source_stamp(self):
        return self._inner.get_source_stamp(), salt

    @classmethod
    def from_function(cls, py_func, py_file):
        if os.path.dirname(os.path.abspath(py_file)) != HERE:
            return None  # another module's function: Numba's own locators
        for other in _locators:
            if other is not cls:
                inner = other.from_function(py_func, py_file)
                if inner is not None:
                    return cls(inner)
        return None


# Numba's locator list is not public API: if a Numba release moves it, or the
# user names the locators (NUMBA_CACHE_LOCATOR_CLASSES, which bypasses the
# list), the package compiles afresh in every process rather than risk stale code.
_impl = getattr(caching, "CacheImpl", None) or getattr(caching, "_CacheImpl", None)
_locators = getattr(_impl, "_locator_classes", None)
salted = isinstance(_locators, list) and not getattr(config, "CACHE_LOCATOR_CLASSES", "")
if salted:
    _locators.insert(0, SaltedLocator)
else:
    warn("this Numba's cache cannot be keyed by all of dsconv.kernels' sources; the kernels compile afresh in "
         "every process (about 10-20 s)")
