"""The launcher thread of a pool that recycles its workers: it starts the replacements of
retired workers (see ``recycling.py``), so that neither a caller submitting work nor the
manager thread collecting results waits for a process to start. The caller has threads
by then, so replacements are not forked from it: they come from the pool's zygote
(``zygote.py``, started with the first replacement), or where there is none from the
forkserver or spawn.
"""
from __future__ import annotations

import threading
from contextlib import suppress

from .._errors import PoolError
from .manager import STOP_GRACE, PoolView
from .scheduler import Worker
from .zygote import Zygote, usable

__all__ = ["Launcher"]


class Launcher(threading.Thread):
    """Starts the replacements of retired workers; one per pool that recycles, started
    with its first retirement, ended by the pool's shutdown.

    A new worker joins the pool (and gets work) only once its process has started, so
    nothing is ever sent to a process that does not exist yet. The process is started
    outside the pool lock.
    """

    def __init__(self, pool: PoolView):
        super().__init__(name="parmap-pool-launcher", daemon=True)
        self.pool = pool
        self.due = threading.Condition(pool.lock)  # notified on retirement and close
        #: forks the replacements (None: not started yet, or not usable here)
        self.zygote: Zygote | None = None
        self._try_zygote = usable(pool.options.start_method)
        #: zygotes given up on (gone, or no answer): ended as this thread ends
        self._dropped: list[Zygote] = []

    def run(self) -> None:
        try:
            self._loop()
        except BaseException:  # a bug here: the pool starts replacements itself instead
            with self.pool.lock:
                self.pool.recycler.replacing.clear()
            self.pool.wake()
            raise
        finally:  # the pool closed (shut down or idled out)
            zygote = self.zygote
            if zygote is not None:
                zygote.close()
            for dropped in self._dropped:
                # its socket is closed: a running zygote exits once its children have
                # (retired workers in their finalizer); one that stopped answering
                # would never exit (and the interpreter's exit would wait on it), so it
                # is killed after the same grace
                dropped.join(STOP_GRACE)

    def join_zygote(self, timeout: float) -> None:
        """After the pool's shutdown: wait for the zygote to exit (it does once its
        children have)."""
        zygote = self.zygote  # once: a launcher still starting a worker may drop it
        if zygote is not None:
            zygote.join(timeout)

    def _launch(self, wid: int) -> Worker | None:
        """Start a replacement: from the zygote, started now if need be; should it fail
        (it cannot start, or died), from the forkserver from then on. None: the pool
        closed meanwhile (a shutdown ended the zygote this thread was waiting on)."""
        if self.zygote is None and self._try_zygote:
            try:
                self.zygote = Zygote(self.pool.options.warm_cloudpickle)
            except Exception:
                self._try_zygote = False
        if self.zygote is not None:
            try:
                return self.pool.launch(wid, self.zygote)
            except (OSError, EOFError):  # gone, or no answer (its workers may still run)
                self.zygote.close()
                self._dropped.append(self.zygote)
                self._try_zygote = False
                self.zygote = None
                if self.pool.closed:
                    return None
        return self.pool.launch(wid)

    def _loop(self) -> None:
        pool = self.pool
        while True:
            started: list[Worker] = []
            with pool.lock:
                self.due.wait_for(lambda: bool(pool.recycler.replacing) or pool.closed)
                if pool.closed:
                    pool.recycler.replacing.clear()
                    return
                wids = list(pool.recycler.replacing)
            failed: list[int] = []
            for wid in wids:
                try:
                    worker = self._launch(wid) if not pool.closed else None
                except Exception:  # out of processes or descriptors (EAGAIN, EMFILE)
                    failed.append(wid)  # the pool starts it when work needs it, and a
                    continue  # failure there fails the calls waiting: never a hang
                if worker is None:
                    break  # closed: no more workers for it
                started.append(worker)
            with pool.lock:
                closed = pool.closed
                for wid in failed:
                    if wid in pool.recycler.replacing:
                        pool.recycler.replacing.remove(wid)
                for worker in started:
                    if worker.wid in pool.recycler.replacing:
                        pool.recycler.replacing.remove(worker.wid)
                    if not closed:
                        worker.after = next((w for w in pool.workers if w.wid == worker.wid
                                             and w.dead and w.jobs), None)
                        pool.workers.append(worker)
                if not closed:
                    with suppress(PoolError):  # no worker starts: the manager fails the
                        pool.assign_pending()  # calls waiting as it tries again
            if closed:  # closed meanwhile: its manager may be gone, so reap them here
                for worker in started:
                    _discard(worker)
                return
            pool.wake()  # the manager must wait on the new workers too


def _discard(worker: Worker) -> None:
    worker.process.kill()
    worker.process.join(timeout=STOP_GRACE)
    worker.task_conn.close()
    worker.result_conn.close()
