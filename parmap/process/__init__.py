"""parmap's pool of worker processes: start, feed, watch and stop them.

The package imports nothing from parmap's front end (``Parallel``, the dispatcher, the
settings, the backends); it uses only the leaf modules ``_delayed`` (the batch it runs),
``_errors`` and ``_cpu``. ``parmap.backends.process`` adapts it to the backend contract.

Modules, from the caller's side to the worker's::

    registry   the one shared pool every call reuses; private pools for conflicting calls
    pool       WorkerPool: starting, stopping, replacing workers; submit and cancel
    scheduler  which job goes to which worker, deadlines (pure: no processes)
    manager    the thread that waits on results, sentinels and deadlines
    protocol   the wire format: requests, replies, their encoding and decoding
    spawn      start methods, thread caps, starting one worker process
    lifetime   workers die with their parent
    worker     the worker process's main loop
    shm        large numpy arguments through shared-memory files
    shm_results  large numpy results through shared-memory files
"""
