"""The threads of the fused pass: the caller's and helpers kept from call to call, sharing work by atomic counters.

Promises: _Crew.run runs one fused pass (forward.network) on the caller's
thread and T - 1 helper threads, and returns when every thread is done with
the pass's buffers. The work is claimed, never assigned: a pass completes
however the threads are scheduled, even one after another.

    _counters, _layer_counters        the counters of a pass and their layout
    _atomic_add, _atomic_load, _relax, _wait   atomics and spin-waiting
    PASS ... COUNTERS, MAIL           the words of a mail array, which describes a pass
    _post, _pass_counters, _join      a pass posted in mail, and the caller's wait
    _part, _call_part                 thread t's part of a pass, a C function called by name
    _passes                           a thread's loop over passes (both roles)
    _Crew, _crew                      the helper threads, per process
"""
import os
import threading

import numpy as np
from llvmlite import binding, ir
from numba import carray, cfunc, njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from .config import IDLE, JIT, SPINS, STACKS, TASKS
from .entry import C_FLAGS, FLAT_INTS, INT, _by_name, _call_entry, _floats_at, _ints_at, c_signature
from .fused import BLOCKS, _call_layer, _out_side, _pool_flat, _shared_tasks, _stack, _sums
from .vector import I32, I64


# ---------------------------------------------------------------------------
# Counters and atomics


# Counters the threads of the fused pass share: a task is claimed by adding 1
# to a claim counter (the old value is the task's number) or to the task's
# own flag (0: it is ours), and counted done by adding 1 to a done counter.
# Sequentially consistent atomics: what a thread wrote before counting a
# task done is seen by every thread that sees the count. Their layout:
# stacks claimed and done, then per shared layer (stem and blocks) a done
# count and TASKS T claim flags, then the pooling's claims, then the helper
# threads that have finished their part (the last).


def _counters(blocks, threads):
    """Zeroed counters of one fused pass of a network with this many blocks, on T threads."""
    return np.zeros(_layer_counters.py_func(blocks + 1, threads) + 2, np.int64)  # (plain Python: nothing to compile)


@njit(inline="always", **JIT)
def _layer_counters(i, threads):
    # index of shared layer i's done count, its claim flags following; "layer" blocks + 1: the pooling's claims
    return 2 + i * (TASKS * threads + 1)


@intrinsic
def _atomic_add(typingctx, counters, index, value):
    def codegen(context, builder, signature, args):
        data = context.make_array(signature.args[0])(context, builder, args[0]).data
        i = context.cast(builder, args[1], signature.args[1], types.int64)
        v = context.cast(builder, args[2], signature.args[2], types.int64)
        return builder.atomic_rmw("add", builder.gep(data, [i]), v, "seq_cst")

    return types.int64(counters, index, value), codegen


@intrinsic
def _atomic_load(typingctx, counters, index):
    def codegen(context, builder, signature, args):
        data = context.make_array(signature.args[0])(context, builder, args[0]).data
        i = context.cast(builder, args[1], signature.args[1], types.int64)
        return builder.load_atomic(builder.gep(data, [i]), "seq_cst", 8)

    return types.int64(counters, index), codegen


@intrinsic
def _relax(typingctx, spins):
    """A spin-wait's pause: the CPU's spin hint (x86 PAUSE) up to SPINS polls, then sched_yield()."""
    def codegen(context, builder, signature, args):
        mod = builder.module
        with builder.if_else(builder.icmp_signed("<", args[0], ir.Constant(I64, SPINS))) as (spin, give):
            with spin:
                if binding.get_process_triple().startswith(("x86_64", "i686", "i386")):
                    builder.call(cgutils.get_or_insert_function(mod, ir.FunctionType(ir.VoidType(), []),
                                                                "llvm.x86.sse2.pause"), [])
            with give:
                builder.call(cgutils.get_or_insert_function(mod, ir.FunctionType(I32, []), "sched_yield"), [])
        return context.get_dummy_value()

    return types.void(spins), codegen


@njit(inline="always", **JIT)
def _wait(counters, index, target):
    # until counters[index] reaches target
    spins = 0
    while _atomic_load(counters, index) < target:
        _relax(spins)
        spins += 1


# ---------------------------------------------------------------------------
# A pass posted in a mail array


# A pass as the threads take it: mail[PASS] is its number, counted up by
# _post after it wrote the pass's thread count and sizes and its arrays'
# addresses in the words after. Every thread, the caller's included, makes
# its views of the arrays from there (_part, in _passes): a call unboxes one array, not
# sixty, and a helper runs pass after pass without leaving compiled code
# (no GIL to take back between passes). The arrays stay alive because the
# caller holds them until every helper has finished. The words of mail (int64):
PASS, THREADS, IMAGES, SIDE, STACK_IMAGES = 0, 1, 2, 3, 4  # number; T; N; r; images per stack at most
# Each array: its address at mail[A], at mail[A + 1] its size (flat ones) or its last dimension.
X, WEIGHTS, TABLE = 5, 7, 9  # images flat (N, r, r, 3); Packed.weights; Packed.table
ACT, TILE, POOLED = 11, 13, 15  # (T, 2, S): S; (T, tile): tile; (N, F): F
MAPS, COUNTERS = 17, 19  # last maps flat (N, s, s, F) or empty; _counters
MAIL = 21


@njit(**JIT)
def _post(mail, threads, x, n_img, r, stack, weights, table, act, tile, pooled, maps, counters):
    # Describes a pass in mail, then counts up its number: a thread that sees the number sees the rest.
    for i in range(counters.size):
        counters[i] = 0
    mail[THREADS], mail[IMAGES], mail[SIDE], mail[STACK_IMAGES] = threads, n_img, r, stack
    mail[X], mail[X + 1] = x.ctypes.data, x.size
    mail[WEIGHTS], mail[WEIGHTS + 1] = weights.ctypes.data, weights.size
    mail[TABLE], mail[TABLE + 1] = table.ctypes.data, table.size
    mail[ACT], mail[ACT + 1] = act.ctypes.data, act.shape[2]
    mail[TILE], mail[TILE + 1] = tile.ctypes.data, tile.shape[1]
    mail[POOLED], mail[POOLED + 1] = pooled.ctypes.data, pooled.shape[1]
    mail[MAPS], mail[MAPS + 1] = maps.ctypes.data, maps.size
    mail[COUNTERS], mail[COUNTERS + 1] = counters.ctypes.data, counters.size
    _atomic_add(mail, PASS, 1)


@njit(inline="always", **JIT)
def _pass_counters(mail):
    # the counters of the pass posted in mail: the last one counts the helpers that have finished their part
    return carray(_ints_at(mail[COUNTERS]), mail[COUNTERS + 1])


@njit(**JIT)
def _join(mail):
    # The caller's wait for the helpers' parts of the pass in mail: they may
    # still read the buffers after the last task is done.
    counters = _pass_counters(mail)
    _wait(counters, counters.size - 1, mail[THREADS] - 1)


# ---------------------------------------------------------------------------
# A thread's part of a pass, and its loop over passes


@cfunc(c_signature(INT, FLAT_INTS), **C_FLAGS)
def _part(t, words, size):
    # Thread t's part of the fused pass posted in the mail array at words
    # (_post), whose arrays it makes its views of: x flat (N, r, r, 3) -> pooled (N, F),
    # T = len(tile) threads in all: first the W = N - N mod T images that go
    # whole, in stacks of up to `stack`, each thread its stack on its own
    # buffers act[t] and tile[t] (no synchronisation between layers); then
    # the images left over, layer by layer, every layer split into tasks
    # (bands of rows, or ranges of output channels) on act[0]. Any thread
    # claims any task and a layer waits only for the previous one's tasks to
    # be done, so the pass completes however the threads are scheduled, even
    # one after another. maps: the last feature maps, flat (N, s, s, F), or
    # empty. counters: _counters(blocks, T).
    mail = carray(words, size)
    threads, n_img, r, stack = mail[THREADS], mail[IMAGES], mail[SIDE], mail[STACK_IMAGES]
    x = carray(_floats_at(mail[X]), mail[X + 1])
    weights = carray(_floats_at(mail[WEIGHTS]), mail[WEIGHTS + 1])
    table = carray(_ints_at(mail[TABLE]), mail[TABLE + 1])
    act = carray(_floats_at(mail[ACT]), (threads, 2, mail[ACT + 1]))
    tile = carray(_floats_at(mail[TILE]), (threads, mail[TILE + 1]))
    pooled = carray(_floats_at(mail[POOLED]), (n_img, mail[POOLED + 1]))
    maps = carray(_floats_at(mail[MAPS]), mail[MAPS + 1])
    counters = _pass_counters(mail)
    size = r * r * 3
    per_map = maps.size // max(n_img, 1)  # s s F, or 0
    whole = n_img - n_img % threads
    # At most `stack` images each, at least STACKS per thread where there are images enough (a thread
    # that another process slows takes fewer), a multiple of T of them: equal shares.
    stacks = max(-(-whole // stack), min(whole, STACKS * threads))
    stacks = -(-stacks // threads) * threads
    g = n_img - whole
    while True:
        s = _atomic_add(counters, 0, 1)
        if s >= stacks:
            break
        n0, n1 = whole * s // stacks, whole * (s + 1) // stacks
        _stack(x[n0 * size:n1 * size], n1 - n0, r, weights, table, act[t, 0], act[t, 1], tile[t], pooled[n0:n1],
               maps[n0 * per_map:n1 * per_map])
        _atomic_add(counters, 1, 1)
    if g == 0:
        return
    _wait(counters, np.int64(1), stacks)  # act[0] is free
    a, b = act[0, 0], act[0, 1]
    side = r
    blocks = table[BLOCKS]
    for i in range(blocks + 1):
        src, dst = (a, b) if i % 2 else (b, a)
        tasks = _shared_tasks(i, side, g, r, table, tile[t], threads)
        base = _layer_counters(i, threads)
        first = t * tasks // threads
        for j in range(tasks):
            task = (first + j) % tasks  # its own share first (the rows it made last layer), then the others'
            if _atomic_add(counters, base + 1 + task, 1) == 0:
                _call_layer(i, task, tasks, src, side, g, r, weights, table, dst, tile[t], x[whole * size:])
                _atomic_add(counters, base, 1)
        _wait(counters, base, tasks)
        side = _out_side(i, side, table)
    last = a if blocks % 2 == 0 else b
    c = pooled.shape[1]
    while True:
        n = _atomic_add(counters, _layer_counters(blocks + 1, threads), 1)  # the pooling's claims
        if n >= g:
            break
        m = side * side * c
        if per_map:
            for i in range(m):
                maps[(whole + n) * m + i] = last[n * m + i]
        _pool_flat(last[n * m:], side * side, pooled[whole + n], _sums(tile[t], c))


_by_name("part", _part)


@intrinsic
def _call_part(typingctx, t, mail):
    return _call_entry("part", (t, mail))


@njit(**JIT)
def _passes(t, mail, done):
    # Thread t's parts of fused passes (_part), for both roles. The caller's thread (t = 0) runs
    # its part of the pass posted in mail and returns. A helper runs its part
    # of each pass as soon as it is posted, until none comes for IDLE polls
    # (spin hints, then sched_yield), and returns the number of the last pass
    # it saw. It takes part in a pass of more than t threads; a pass whose
    # number moved on while it read the thread count was not one (the caller
    # waits for every helper of its pass).
    while True:
        if t > 0:
            spins = 0
            while _atomic_load(mail, PASS) <= done and spins < IDLE:
                _relax(spins)
                spins += 1
            number = _atomic_load(mail, PASS)
            if number <= done:
                return done
            threads = _atomic_load(mail, THREADS)
            if _atomic_load(mail, PASS) != number:
                continue
            done = number
            if t >= threads:
                continue
        _call_part(t, mail)
        if t == 0:
            return done
        counters = _pass_counters(mail)
        _atomic_add(counters, counters.size - 1, 1)  # this helper's part is finished (_join)


# ---------------------------------------------------------------------------
# The helper threads


class _Crew:
    """The threads besides the caller's that run the fused pass, kept from call to call.

    A helper runs passes in compiled code as they are posted, and after a
    pass polls for the next one for a while (IDLE polls, mostly
    sched_yield: a fraction of a millisecond) before it sleeps on a
    condition: back-to-back passes, batch 1 especially, start without an
    operating-system wake-up (a thread pool's round trip was 80
    microseconds, a tenth of a small network's pass). Helper t runs its part
    of every pass of more than t threads. Daemon threads: idle, they do not
    keep the process alive.
    """

    def __init__(self):
        self.n = 0  # helpers started
        self.mail = np.zeros(MAIL, np.int64)  # the pass posted last (_post)
        self.posted = threading.Condition()
        self.lock = threading.Lock()  # one pass at a time: callers in several threads take turns

    def run(self, threads, args):
        """One fused pass (args: _post's after the thread count) on the caller's thread and helpers 1 .. threads - 1."""
        with self.lock:
            while self.n < threads - 1:
                self.n += 1
                threading.Thread(target=self._helper, args=(self.n,), name=f"dsconv-network-{self.n}",
                                 daemon=True).start()
            number = self.mail[PASS] + 1
            try:
                with self.posted:
                    _post(self.mail, threads, *args)
                    self.posted.notify_all()
                _passes(0, self.mail, 0)
            finally:  # the buffers are not free before every helper has finished, even on Ctrl-C
                if self.mail[PASS] == number:  # (the helpers complete the pass: any thread takes any task)
                    _join(self.mail)

    def _helper(self, t):
        done = 0  # the number of the last pass this helper saw
        while True:
            done = _passes(t, self.mail, done)
            with self.posted:
                while self.mail[PASS] <= done:
                    self.posted.wait()


_crews = {}  # per process: a forked child inherits the parent's crew but none of its threads


def _crew():
    """This process's crew."""
    crew = _crews.get(os.getpid())
    if crew is None:
        crew = _crews[os.getpid()] = _Crew()
    return crew
