"""The CPU the kernels are compiled for, their JIT flags and their tuning constants.

Promises: MR and NV (the matrix-product tile), the vector widths LANES and
DW_LANES, NR (a packed panel's columns), JIT (the flags of every @njit
function; cache=True is safe across the package's files: dsconv.kernels.cache),
and every size, grain and spin count the kernels are tuned with, each with
the measurement that chose it. Nothing here is compiled.

    tile_rows             MR for a CPU (and DSCONV_MR)
    MR, NV                the micro-kernel's tile: MR rows x NV vectors
    JIT                   the flags of every @njit function
    TILE ... IDLE         tuning constants of the fused pass and the one-layer kernels
    LANES, DW_LANES, NR   vector widths, and the columns of a packed panel
"""
import os

from llvmlite import binding

from dsconv import warn
from . import cache

# (For the one-layer kernels; the fused pass does not use OpenMP.) Numba's
# OpenMP threads wait at the end of every parallel loop. By default
# GNU OpenMP spins there for ~300000 iterations: when another process holds a
# core, the waiting thread burns its time slice and a 7 ms forward pass took
# 110 ms. Spinning 10000 iterations costs nothing measurable on an idle
# machine. Set before Numba starts its threads; a user's own setting wins. (No
# effect if GNU OpenMP is already loaded: PyTorch, imported first, brings one.)
if "OMP_WAIT_POLICY" not in os.environ:
    os.environ.setdefault("GOMP_SPINCOUNT", "10000")


# ---------------------------------------------------------------------------
# The CPU and the tile


def tile_rows(env, host_features):
    """Rows MR of the matrix-product micro-kernel, whose tile is MR x NV vectors of accumulators.

    With AVX-512, 14 x 2: 28 of the 32 registers. Elsewhere a vector of
    LANES floats is two registers of 8 (AVX2, 16 of them) or four of 4
    (NEON, 32): 6 x 1 vector, AVX2's classic 6 x 16 tile, 12 registers of
    accumulators, two for the panel's row and one broadcast. (3 x 2 needed
    17 registers: the spills cost a third of the speed.) NV is 2 from 8
    rows up, else 1. The CPU is the one Numba compiles for (NUMBA_CPU_NAME
    and NUMBA_CPU_FEATURES when set, else the host's). DSCONV_MR overrides
    it (2 to 16), so that tests run either tile on any machine.
    """
    name = env.get("NUMBA_CPU_NAME", "host")
    features = host_features if name == "host" else env.get("NUMBA_CPU_FEATURES", "")
    mr = 14 if "+avx512f" in features else 6
    text = env.get("DSCONV_MR", "")
    if text:
        if text.isdigit() and 2 <= int(text) <= 16:
            return int(text)
        warn(f"DSCONV_MR={text} is not a whole number from 2 to 16; using {mr}")
    return mr


MR = tile_rows(os.environ, binding.get_host_cpu_features().flatten())
NV = 2 if MR >= 8 else 1

# One place for the JIT flags. fastmath stays off: the forward pass must match
# Keras to 1e-4, and reassociated sums would trade that for little speed. (The
# vector micro-kernels use fused multiply-adds explicitly: one rounding
# per tap instead of two, sums still in order.) Numba's cache does not know
# MR, so a tile set by DSCONV_MR is compiled afresh rather than read from a
# cache of the other tile. The cache is keyed by all the package's sources
# (cache.salt), not only by the file that defines a function.
JIT = dict(cache=cache.salted and not os.environ.get("DSCONV_MR"), nogil=True, fastmath=False)

# Constant arguments to compiled functions are passed as np.int64(...): a
# Python literal would compile a version of the callee of its own. A small
# helper is inlined (inline="always") into the function that uses it, so
# that it is compiled once, not once alone and once inside.


# ---------------------------------------------------------------------------
# Tuning constants, in float32 elements unless said

# Floats of depthwise output (or stem patches) each thread keeps for the matrix
# product that follows: 512 KB, a few rows, in L2 with the product's output.
TILE = 1 << 17
# Floats of activations per thread a stack of images may take (4 MB): small
# variants run several images per layer, for matrix products with more rows.
STACK = 1 << 20
# Stacks per thread the fused pass makes at least, where there are images
# enough, so that threads slowed by other work (image decoding, another
# process) take fewer of them.
STACKS = 4
# Output rows of one parallel task in the one-layer stem.
STEM_BAND = 8
# Rows of one parallel task in the one-layer pointwise product.
POINTWISE_ROWS = 256
# Mult-adds per task of a layer the threads share (the images left over
# when there are fewer than the threads: one image, mostly): about 5 to 50
# microseconds. A layer has at most TASKS per thread, each at least one row:
# one, so that each thread works on the same rows layer after layer (its own
# share first), in its own cache; 2 and 4 were 7-20% slower at batch 1.
GRAIN = 250_000
TASKS = 1
# Output pixels (of all images) below which a shared layer is split by output
# channels instead of rows: 7x7 maps yes, 14x14 no.
FEW_PIXELS = 64
# Floats past a 64-byte boundary where each layer's packed weights start. On
# the AVX2 EPYC, products whose weights stream from beyond L2 (a 4 x 4 map
# at 1024 channels) ran 11-18% faster with their panels half a cache line
# off (the whole pass at batch 1: 1.0-128 4-6%, 0.75-128 3-4%) for a reason
# not pinned down; 32 bytes keep AVX2's and NEON's vectors whole. None with
# AVX-512, whose 64-byte vectors would each straddle two lines.
SKEW = 0 if MR >= 8 else 8
# Polls of a counter before a waiting thread gives its core away (sched_yield)
# between polls: a few microseconds of spinning.
SPINS = 2000
# Polls (SPINS with the spin hint, then with sched_yield) a helper thread
# makes for the next pass before it sleeps until woken.
IDLE = SPINS + 1000
# B (K x columns) floats up to which a matrix product goes row block by row
# block, all panels for each (the block of a stays in L1); above, panel by
# panel (each panel stays in L2 while every row block passes).
SMALL_B = 1 << 15


# ---------------------------------------------------------------------------
# Vector widths

LANES = 16  # floats per vector of the matrix products
# Floats per vector of the depthwise rows: its nine taps stay in registers,
# 9 of AVX-512's 32 at 16 floats, but 18 of AVX2's 16 registers (NEON: 36 of
# 32), so 8 floats elsewhere.
DW_LANES = 16 if MR >= 8 else 8
# Columns per packed panel of a matrix product's weights: one micro-kernel's
# width (NV vectors), so that a micro-kernel reads its weights as one
# contiguous stream, every cache line whole (AVX2: 16 columns, 64 bytes per
# step of K). Panels of two 16-column vectors, of which each micro-kernel
# read every other half, were 1-4% slower on the whole pass (AVX2 EPYC).
NR = NV * LANES
