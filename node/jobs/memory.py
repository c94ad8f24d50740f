"""A worker process's memory between jobs: kept for the next job, given back above a ceiling.

A job allocates and frees volumes of hundreds of MB (each series as read, resampled, as the
network's input and output, each mask). By default glibc maps every block over 32 MB on its own
and returns it to the kernel when freed, shrinks its heaps as soon as their top is free, and
gives each thread an arena of its own whose large blocks are always mapped apart: each job
page-faulted its whole working memory in afresh, 1.1 million faults and 2.8 s of kernel time
in a 9.6 s 512 x 512 x 200 study on a 2-core virtual machine, where a first touch costs the
hypervisor too. With freed memory held (:func:`hold_freed_memory`: one arena, no block mapped
on its own, no heap shrunk on free) the next job reuses it: about 400 faults, 0.2 s of kernel
time, the job 7.5 s, resident memory level from the second job on (2.5 GB).

After a job, everything freed is given back when the process's resident memory (the models
included) exceeds ``pipeline.worker_keep_memory_mb`` (:func:`release`): one exceptional study
(600 slices, a GPU batch of eight) does not keep its peak for ever. At 0 every job's memory is
given back, glibc's defaults untouched. Only the worker's own processes hold memory
(``mvi-node serve``'s pool, ``mvi-node worker``); a worker run inside another program (a test,
a benchmark) leaves that program's allocator as it is and gives every job's memory back.
Measured on 2 cores only: with one arena every thread (torch's, the two loading threads) takes
the same allocator lock, which a many-core host may feel.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import gc
import os
import sys

__all__ = ["hold_freed_memory", "release", "resident_mb"]

# mallopt(3) parameters (glibc's malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
#: glibc takes the threshold as a size_t: -1 is the largest, the heap is never shrunk on free.
_NEVER = -1

#: Whether :func:`hold_freed_memory` took effect in this process.
_held = False


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    """The C library when it is glibc (mallopt and malloc_trim); ``None`` elsewhere (looked
    up once per process, not after every job)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        libc.mallopt.restype = ctypes.c_int
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
        return libc
    except (OSError, AttributeError):  # musl and others: no libc.so.6 or no mallopt
        return None


def hold_freed_memory(keep_mb: int) -> bool:
    """From now on, memory this process frees stays with it for the next allocation (nothing
    when ``keep_mb``, the ceiling :func:`release` is given, is 0).

    Every thread allocates from the one arena (a thread's own arena maps its large blocks
    apart whatever the settings), every block comes from its heap and the heap is not shrunk
    when freed (:func:`release` gives memory back when asked). Call it before the process
    starts a thread: a thread that already has an arena keeps it, and may hand it on.
    Returns whether the C library took every setting (``False`` where it is not glibc).
    """
    global _held
    libc = _glibc()
    if libc is None or keep_mb <= 0:
        return False
    one_arena = libc.mallopt(_M_ARENA_MAX, 1)
    mapped = libc.mallopt(_M_MMAP_MAX, 0)
    trimmed = libc.mallopt(_M_TRIM_THRESHOLD, _NEVER)
    _held = bool(one_arena and mapped and trimmed)
    return _held


def resident_mb() -> float:
    """This process's resident memory in MB (``/proc/self/statm``; 0 where there is none)."""
    try:
        with open("/proc/self/statm", "rb") as statm:
            pages = int(statm.read().split()[1])
    except (OSError, ValueError, IndexError):
        return 0.0
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def release(freeze: bool, keep_mb: int) -> None:
    """After a job: collect its garbage, and give its freed memory back when the process's
    resident memory exceeds ``keep_mb`` — always in a process that does not hold freed memory
    (:func:`hold_freed_memory` not called) or at 0.

    ``freeze`` (a process that is the worker's alone): what outlives the job (the models, the
    modules, about 600,000 objects) is kept out of the garbage collector's sight — each full
    collection a job's own allocations set off walked them all (about 0.1 s each, several per
    512 x 512 x 200 study) — and unfrozen here for one collection per job so that no cycle
    among them is kept for ever.
    """
    if freeze:
        gc.unfreeze()
    gc.collect()
    if not _held or keep_mb <= 0 or resident_mb() > keep_mb:
        libc = _glibc()
        if libc is not None:
            with contextlib.suppress(OSError, AttributeError):
                libc.malloc_trim(0)
    if freeze:
        gc.freeze()
