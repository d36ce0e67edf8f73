"""Numba kernels of the MobileNet v1 forward pass.

Every array is NHWC float32. A public function checks shapes and allocates;
a private ``@njit`` function does the work in explicit loops. Batch norm is
folded into the kernels and biases at conversion time (dsconv.weights), so
each convolution is conv + bias + ReLU6.

The public API, where a reader starts:

    layers.py    one layer on a batch: stem, depthwise, pointwise, global_avg_pool, dense, softmax
    forward.py   the fused pass: pack_network packs a network's weights once, network_buffers
                 allocates its activations once per thread count, network runs the whole
                 network (whole images per thread, or one image shared by the threads layer
                 by layer); threads(), the thread count it runs on

Below them, each file importing only those after it:

    crew.py      the fused pass's threads: the caller's and helpers, claiming work by atomic counters
    fused.py     a layer of the fused pass, a stack of images through the network; the weights' table
    conv.py      rows of the stem and of the depthwise layers; same_padding, pack_depthwise
    product.py   the matrix product (pointwise layers, the stem's patches): pack, gemm, the tiles
    entry.py     C functions called by a name registered with LLVM: the seam between the pieces
    vector.py    the two innermost loops in LLVM IR: the product's micro-kernel, a depthwise row
    config.py    the CPU (MR, NV), JIT flags, tuning constants, vector widths
    cache.py     Numba's cache keyed by all of this package's sources

Compiled once each: a Numba function that calls another links a copy of
the callee's code into its own and optimises and compiles it again, and
Numba's inliner copies every variable of the callee once per block. So the
product, the stem's rows, the depthwise row, a layer of the fused pass and
a thread's part of it are C functions (``numba.cfunc``, cached, compiled as
the package is imported) that the others call by name (entry.py); small
helpers with one caller are inlined into it. Code that is still inlined
across files (the LLVM IR of vector.py, small helpers, constants) is why
the cache is salted with the whole package's sources (cache.py).

The names below are what dsconv, its tests and benchmarks use.
"""
from .layers import dense, depthwise, global_avg_pool, pointwise, softmax, stem
from .forward import Buffers, Packed, network, network_buffers, pack_network, threads
from .config import DW_LANES, JIT, MR, NR, NV, SKEW, tile_rows
from .conv import pack_depthwise, same_padding, stem_rows, _depthwise_row
from .product import PLAN, MR_SHORT, gemm, pack, tile_plan
from .vector import F32, I32, I64, _IR
from .fused import _block_weights, _stem_weights
from .crew import MAIL, _passes, _post
from .forward import _NO_MAPS
from .layers import _pointwise

# the public API, then the internals the tests and benchmarks reach
__all__ = ["stem", "depthwise", "pointwise", "global_avg_pool", "dense", "softmax",
           "Packed", "Buffers", "pack_network", "network_buffers", "network", "threads",
           "MR", "NV", "NR", "DW_LANES", "SKEW", "JIT", "tile_rows", "same_padding", "pack", "pack_depthwise",
           "gemm", "MR_SHORT", "PLAN", "tile_plan", "stem_rows", "_depthwise_row", "_pointwise", "F32", "I32", "I64",
           "_IR", "_stem_weights", "_block_weights", "MAIL", "_post", "_passes", "_NO_MAPS"]
