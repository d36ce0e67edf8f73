"""Numba's cache across the files of dsconv.kernels: a change in one file recompiles the cached code of another."""
import importlib.util
import json
import os
import shutil
import subprocess
import sys

import pytest


# Run in a fresh process on a copy of the package (as the top-level package kcopy): relu6 of
# 3 x 4 through a pointwise layer, and whether the matrix product's C function was read from the cache.
CHILD = """
import json
import numpy as np
import kcopy
y = kcopy.pointwise(np.full((1, 2, 2, 4), 3, np.float32), np.ones((4, 4), np.float32), np.zeros(4, np.float32))
print(json.dumps({"top": float(y.max()), "from_cache": kcopy.product._product.cache_hits}))
"""


@pytest.mark.slow  # three processes, two of which compile the package: a minute
def test_cached_caller_recompiles_when_a_helper_in_another_file_changes(tmp_path):
    # product.py's cached C function _product inlines the micro-kernel that vector.py's LLVM IR
    # builder writes, whose ReLU6 clamps at 6. Change the clamp to 5 in vector.py only: the
    # next process must compute with 5, not load the product compiled with 6 (numba issue 1833).
    package = tmp_path / "kcopy"
    source = importlib.util.find_spec("dsconv.kernels").submodule_search_locations[0]  # (without importing it)
    shutil.copytree(source, package,
                    ignore=shutil.ignore_patterns("__pycache__"))
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path / "numba-cache"), PYTHONPATH=str(tmp_path))
    env.pop("DSCONV_MR", None)  # (which turns the cache off)

    def run():
        out = subprocess.run([sys.executable, "-c", CHILD], env=env, cwd=tmp_path, capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout.strip().splitlines()[-1])

    assert run() == {"top": 6.0, "from_cache": 0}  # compiled, and cached
    assert run() == {"top": 6.0, "from_cache": 1}  # the cache is used when nothing changed
    product = (package / "product.py").read_bytes()
    vector = package / "vector.py"
    text = vector.read_text()
    six = "ir.Constant(vec, [6.0] * lanes)"
    assert text.count(six) == 1
    vector.write_text(text.replace(six, six.replace("6.0", "5.0")))
    assert run() == {"top": 5.0, "from_cache": 0}  # recompiled with the new helper
    assert (package / "product.py").read_bytes() == product
