"""Keep a forked child of a process that ran fastattn's threads working.

libgomp, the OpenMP runtime the compiled core uses, keeps the threads of a
team in a pool.  A child made by fork() (multiprocessing's default on
Linux) after a team has run inherits the pool's bookkeeping but none of its
threads, and its first parallel region with more than one thread would wait
for them forever.  After such a fork, this hook makes every parallel region
of the child run on its one thread: the same numbers, since no result
depends on the thread count, but slower.  A child that should use several
threads can be started with the "spawn" or "forkserver" method instead.
"""
import os
import sys

_MODULES = ("fastattn._kernels", "fastattn._engine")
_registered = False
_lost = False  # this process is such a child


def _loaded():
    return [sys.modules[name] for name in _MODULES if name in sys.modules]


def _after_fork_in_child():
    global _lost
    modules = _loaded()
    if _lost or any(m._team_started() for m in modules):
        _lost = True
        for m in modules:
            m._lose_team()


def register():
    """Called by each compiled module as it loads: installs the hook once,
    and marks a module loaded in an already-affected child."""
    global _registered
    if not _registered:
        os.register_at_fork(after_in_child=_after_fork_in_child)
        _registered = True
    if _lost:
        for m in _loaded():
            m._lose_team()
