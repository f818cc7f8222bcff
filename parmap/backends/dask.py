"""The ``dask`` backend: the same ``Parallel`` call runs on a Dask cluster.

Data flow::

    Dispatcher ──submit(batch)──> DaskBackend ──client.submit(run_batch, ...)──> scheduler
        ^                            │  arguments above max_nbytes: client.scatter once per    │
        │                            │  call and object, sent as futures (see _dask_worker)    v
        │ callback(results | exc)    v                                                    workers
        └──── collector thread <── SimpleQueue <── Future.add_done_callback ◄───────────────┘
                                               <── timeout events (subscribed topic)

One collector thread per call gathers the finished batches in groups, sets
``batch.duration`` from the worker's own measurement (auto batching then learns the tasks'
time, not Dask's round trip), turns Dask's failures into parmap's errors (a worker that kept
dying: WorkerCrashedError; a cancelled future: PoolError), and, when the cluster has had no
worker for ``wait_for_workers_timeout`` seconds while batches wait, fails the call instead of
hanging. The client is the one passed as ``client=`` or the current one
(``distributed.get_client()``); the backend never starts or closes a cluster.
"""
from __future__ import annotations

import asyncio
import threading
from queue import Empty, SimpleQueue
from time import monotonic
from typing import Any, Callable
from uuid import uuid4

try:
    import distributed
except ImportError as _exc:  # pragma: no cover - exercised by a subprocess test
    raise ImportError(
        "backend='dask' needs the dask and distributed packages, which are not installed: "
        "pip install 'dask[distributed]' (or parmap's extra: pip install 'parmap[dask]')"
    ) from _exc

from .._delayed import compact
from .._errors import (CapturedError, PoolError, SerializationError, WorkerCrashedError,
                       timeout_error)
from ._base import CallOptions, ParallelBackendBase
from ._dask_support import (ArgumentScatter, dask_error, drop_frames, find_unpicklable,
                            first_line, span, with_note)
from ._dask_worker import rejoin, run_batch, secede_if_in_task

__all__ = ["DaskBackend"]

#: how long the collector waits for news before it checks that the cluster still has workers
HEALTH_CHECK_INTERVAL = 1.0
_STOP = object()
START_HINT = ("from dask.distributed import Client, LocalCluster; "
              "client = Client(LocalCluster(n_workers=4, processes=True))")


class DaskBackend(ParallelBackendBase):
    """Runs batches as Dask tasks on the cluster of a ``distributed.Client``.

    ``client``: the client to use (default: ``distributed.get_client()`` at each call).
    ``wait_for_workers_timeout``: seconds to wait for a first worker before failing.
    ``workers``, ``resources``, ``retries``: passed to ``client.submit`` for every batch.
    """

    enforces_timeout = True  # the front end's tracker cannot see into a remote worker
    #: a batch costs ~1-2 ms of Dask round trip: at 0.1 s per batch that is 1-2 %
    target_batch_duration = 0.1

    def __init__(self, nesting_level: int = 0, client: Any = None,
                 wait_for_workers_timeout: float = 10.0, workers: Any = None,
                 resources: dict | None = None, retries: int | None = None):
        super().__init__(nesting_level)
        if client is not None and not isinstance(client, distributed.Client):
            raise TypeError(f"backend='dask': client must be a distributed.Client, got "
                            f"{type(client).__name__} {client!r:.60}")
        if isinstance(wait_for_workers_timeout, bool) or not isinstance(
                wait_for_workers_timeout, (int, float)) or not wait_for_workers_timeout >= 0:
            raise ValueError(f"backend='dask': wait_for_workers_timeout must be a number of "
                             f"seconds >= 0, got {wait_for_workers_timeout!r}")
        if retries is not None and (isinstance(retries, bool) or not isinstance(retries, int)
                                    or retries < 0):
            raise ValueError(f"backend='dask': retries must be None or an int >= 0, got "
                             f"{retries!r}")
        self.client = client
        self.wait_for_workers_timeout = float(wait_for_workers_timeout)
        self._submit_options = {name: value for name, value in
                                (("workers", workers), ("resources", resources),
                                 ("retries", retries)) if value is not None}
        self._client: Any = None  # the client of the current call
        self._max_nbytes: int | None = None
        self._lock = threading.Lock()
        self._pending: dict[str, tuple] = {}  # Dask key -> (batch, callback, future)
        self._generation = 0  # bumped by start_call and abort: late submits are dropped
        self._events: SimpleQueue = SimpleQueue()
        self._collector: threading.Thread | None = None
        self._topic: str | None = None
        self._scatter: ArgumentScatter | None = None  # the current call's
        self._seceded = False
        self._no_workers_since: float | None = None

    # ------------------------------------------------------------------ set-up
    def effective_n_jobs(self, n_jobs: int) -> int:
        # The front end hands us n_jobs already resolved against the *local* CPUs, so -1
        # cannot be told apart here; configure() reads the caller's own value instead.
        return n_jobs

    def configure(self, n_jobs: int, options: CallOptions) -> int:
        super().configure(n_jobs, options)
        client = self._client = _resolve_client(self.client)
        threads = _cluster_threads(client, self.wait_for_workers_timeout)
        wanted = options.requested_n_jobs  # None, -k or k, as the caller gave it
        if wanted is None:
            wanted = n_jobs
        elif wanted < 0:  # -1: every thread of the cluster, -2: all but one, ...
            wanted = max(1, threads + 1 + wanted)
        # one worker thread still gets two batches in flight, so it never idles between
        # them (and n_jobs=1 would make the front end run the tasks in the caller)
        self.n_jobs = max(2, wanted)
        self._max_nbytes = options.max_nbytes
        return self.n_jobs

    # ------------------------------------------------------------------ one call
    def start_call(self) -> None:
        if self._client is None:
            raise RuntimeError("DaskBackend.start_call called before configure")
        with self._lock:
            self._generation += 1
            self._pending = {}
        events = self._events = SimpleQueue()
        if self._max_nbytes is not None:
            self._scatter = ArgumentScatter(self._client, self._max_nbytes)
        self._no_workers_since = None
        self._topic = None
        if self.options.timeout is not None:
            self._topic = f"parmap-timeout-{uuid4().hex}"
            self._client.subscribe_topic(self._topic, lambda event: events.put(event))
        self._collector = threading.Thread(target=self._collect, args=(events,),
                                           name="parmap-dask-collector", daemon=True)
        self._collector.start()
        # a call made by a task on a Dask worker waits for other Dask tasks: give the
        # worker thread back meanwhile, or two such tasks on two threads deadlock
        self._seceded = secede_if_in_task()

    def submit(self, batch: Any, callback: Callable[[Any], None]) -> None:
        client = self._client
        if client is None:
            raise RuntimeError("DaskBackend.submit called before configure")
        generation = self._generation
        if batch.func is None:
            func, tasks = compact(batch.tasks)
            if func is not None:  # keep the compact form: it is also what we send
                batch.func, batch.tasks = func, tasks
        if batch.unary:  # what is sent is argument tuples
            batch.tasks, batch.unary = [(arg,) for arg in batch.tasks], False
        func, tasks = batch.func, batch.tasks
        wire, scattered = self._scatter.externalise(func, tasks) if self._scatter is not None \
            else (tasks, ())
        options = (self.options.timeout, self._topic) if self._topic is not None else None
        name = getattr(func, "__name__", "batch") if func is not None else "batch"
        key = f"parmap-{name}-{uuid4().hex}"
        try:
            future = client.submit(run_batch, batch.start, func, wire, options, *scattered,
                                   key=key, pure=False, **self._submit_options)
        except Exception as exc:
            found = find_unpicklable(batch)
            if found is not None:
                raise found from exc
            raise with_note(exc, f"parmap: raised while sending tasks {span(batch)} to the "
                                 f"Dask cluster")
        with self._lock:
            if generation != self._generation:  # the call was cancelled meanwhile
                future.cancel()
                return
            self._pending[key] = (batch, callback, future)
        future.add_done_callback(self._events.put)

    def abort_everything(self, ensure_ready: bool = True) -> None:
        with self._lock:
            self._generation += 1
            futures = [entry[2] for entry in self._pending.values()]
            self._pending = {}
        client = self._client
        if futures and client is not None and client.status == "running":
            try:  # running tasks go on to their end (Dask cannot stop them); queued ones go
                client.cancel(futures)
            except Exception:  # the client is going away: nothing left to cancel
                pass
        if not ensure_ready:  # (terminate forgets the client: unsubscribe first)
            _unsubscribe(self._client, self._topic)
            self._topic = None
            self.terminate()

    def stop_call(self) -> None:
        collector, self._collector = self._collector, None
        if collector is not None:
            self._events.put(_STOP)
            if collector is not threading.current_thread():
                collector.join()
            # futures that finish from now on go to the old queue, which nobody holds: they
            # are released at once instead of staying wanted by this client
            self._events = SimpleQueue()
        _unsubscribe(self._client, self._topic)
        self._topic = None
        self._scatter = None  # releases the scattered data on the cluster
        if self._seceded:
            self._seceded = False
            rejoin()

    def terminate(self) -> None:
        self._client = None

    def get_nested_backend(self) -> tuple[str, int | None]:
        return "dask", None

    # ------------------------------------------------------------------ collecting
    def _collect(self, events: SimpleQueue) -> None:
        while True:
            try:
                items = [events.get(timeout=HEALTH_CHECK_INTERVAL)]
            except Empty:
                self._check_health()
                continue
            while True:  # take everything that is ready: one gather for all of it
                try:
                    items.append(events.get_nowait())
                except Empty:
                    break
            done = []
            for item in items:
                if item is _STOP:
                    return
                if isinstance(item, tuple):  # (timestamp, message) of a timeout event
                    self._on_timeout(item[1])
                else:
                    done.append(item)
            if done:
                self._deliver(done)

    def _deliver(self, futures: list) -> None:
        with self._lock:
            entries = [(f, self._pending.pop(f.key)) for f in futures if f.key in self._pending]
        finished = [f for f, _ in entries if f.status == "finished"]
        values: dict = {}
        if finished:
            try:
                values = dict(zip([f.key for f in finished], self._client.gather(finished)))
            except Exception as exc:  # one of them went wrong since: one by one below
                drop_frames(exc)
                values = {}
        for future, (batch, callback, _) in entries:
            try:
                outcome = _outcome(future, batch, values)
            except BaseException as exc:
                outcome = exc
            callback(outcome)

    def _on_timeout(self, message: dict) -> None:
        start, index = message["start"], message["index"]
        with self._lock:
            entry = next((e for e in self._pending.values() if e[0].start == start), None)
            if entry is None:
                return  # delivered already, or cancelled
            del self._pending[entry[2].key]
        batch, callback, future = entry
        future.cancel()  # the scheduler forgets it; the worker runs the task to its end
        callback(timeout_error(
            index, batch.task(index - batch.start), self.options.timeout,
            f"it ran on the Dask worker {message['worker']}; the call was cancelled. Dask "
            f"cannot stop a running task: it goes on until it returns"))

    def _check_health(self) -> None:
        """No news for a while: make sure the cluster can still finish what is pending."""
        if not self._pending:
            self._no_workers_since = None
            return
        client = self._client
        problem = None
        if client is None or not _client_open(client):
            problem = _client_closed()
        else:
            try:
                has_workers = bool(client.nthreads())
            except Exception as exc:
                has_workers, problem = False, PoolError(
                    f"the Dask scheduler cannot be reached ({type(exc).__name__}: {exc}); the "
                    f"call cannot complete.")
            if has_workers:
                self._no_workers_since = None
            elif problem is None:
                now = monotonic()
                if self._no_workers_since is None:
                    self._no_workers_since = now
                elif now - self._no_workers_since > self.wait_for_workers_timeout:
                    problem = WorkerCrashedError(
                        f"the Dask cluster has had no worker for more than "
                        f"{self.wait_for_workers_timeout:g}s while tasks were waiting; the "
                        f"call was cancelled. Restart the workers, or allow more time with "
                        f"parallel_config(backend='dask', wait_for_workers_timeout=...).")
        if problem is not None:
            with self._lock:
                entries, self._pending = list(self._pending.values()), {}
            for _, callback, _ in entries:
                callback(problem)


def _resolve_client(client: Any) -> Any:
    if client is not None:
        return client
    try:
        return distributed.get_client()
    except ValueError:
        raise ValueError(
            f"backend='dask' needs a Dask client, and none is running in this process. "
            f"Start one before the call, for example `{START_HINT}`, or connect to a "
            f"cluster with `Client('tcp://scheduler-address:8786')`; or pass it as "
            f"parallel_config(backend='dask', client=client).") from None


def _cluster_threads(client: Any, wait_for_workers_timeout: float) -> int:
    nthreads = client.nthreads()
    if not nthreads and wait_for_workers_timeout > 0:
        try:
            client.wait_for_workers(1, timeout=wait_for_workers_timeout)
        except (TimeoutError, asyncio.TimeoutError):
            pass
        nthreads = client.nthreads()
    if not nthreads:
        raise TimeoutError(
            f"backend='dask': the Dask cluster of {client.scheduler.address} has no "
            f"worker after {wait_for_workers_timeout:g}s. Start workers (for example "
            f"`dask worker {client.scheduler.address}`) and check that they can reach the "
            f"scheduler, or wait longer with parallel_config(backend='dask', "
            f"wait_for_workers_timeout={max(30.0, 2 * wait_for_workers_timeout):g}).")
    return sum(nthreads.values())


def _client_open(client: Any) -> bool:
    return client.status in ("running", "connecting")


def _client_closed() -> PoolError:
    return PoolError("the Dask client was closed while tasks were running; the call cannot "
                     "complete. Close the client only after the calls that use it return.")


def _outcome(future: Any, batch: Any, values: dict) -> Any:
    """The batch's result list or the exception to report. Nothing here raises a Dask
    error: a raised one would keep the future alive in its traceback's frames."""
    if future.key in values:
        value = values[future.key]
    else:
        if not _client_open(future.client):
            return _client_closed()  # (and nothing can be waited for through it)
        # a future can be "lost" after it finished (the worker that held its result
        # died): wait for the scheduler to compute it again, or to give up
        try:
            future.exception()  # waits, and raises nothing (unlike result())
        except Exception:
            if not _client_open(future.client):  # closed while this waited
                return _client_closed()
            raise
        status = future.status
        if status == "error":
            return dask_error(future, batch)
        if status != "finished":
            return PoolError(
                f"the Dask task running tasks {span(batch)} was {status} before it "
                f"finished (client.cancel or client.restart by someone else, or the "
                f"client lost the scheduler), so the call cannot complete. Run it again "
                f"once the cluster is stable.")
        try:
            value = future.result()
        except Exception as exc:
            drop_frames(exc)
            return SerializationError(
                f"the results of tasks {span(batch)} could not be fetched from the Dask "
                f"worker: {type(exc).__name__}: {first_line(exc)}. Return picklable "
                f"objects from the tasks (the worker's log says more).")
    if isinstance(value, CapturedError):
        return value.rebuild()
    results, batch.duration = value
    return results


def _unsubscribe(client: Any, topic: str | None) -> None:
    """Stop a call's event topic (its tasks' start times: see ``DaskBackend._collect``)."""
    if topic is not None and client is not None:
        try:
            client.unsubscribe_topic(topic)
        except Exception:  # already gone with the client
            pass
