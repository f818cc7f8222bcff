"""The cases of joblib's ``test_parallel.py`` that parmap skips on purpose, each with its
reason. Reviewed: add an entry only for a deliberate difference that docs/joblib.rst
explains, never to hide a bug."""
from __future__ import annotations

from typing import Callable, Mapping, NamedTuple


class Skip(NamedTuple):
    test: str  #: the test function's name
    reason: str
    #: which parametrised cases (by their parameters); None: all of them
    when: Callable[[Mapping[str, object]], bool] | None = None


INTERNALS = ("inspects joblib's internal state (joblib.parallel.get_active_backend, BACKENDS, "
             "DEFAULT_BACKEND, joblib's backend classes or private attributes of Parallel "
             "and its backend), which parmap does not have")
CUSTOM = ("defines a backend with joblib's backend contract (apply_async, configure, ...); "
          "parmap's ParallelBackendBase is its own, smaller contract (submit)")
LOKY = "tests loky itself (its executor, its process class), which parmap does not use"

SKIPS: list[Skip] = [
    Skip("test_overwrite_default_backend", INTERNALS + "; it also leaves parmap's default "
         "changed (it restores joblib's only)"),
    Skip("test_register_parallel_backend", INTERNALS),
    Skip("test_backend_context_manager", INTERNALS),
    Skip("test_nested_backend_in_sequential", INTERNALS),
    Skip("test_nested_backend_context_manager", INTERNALS),
    Skip("test_backend_nesting_level", INTERNALS + " (the backend instance that "
         "parallel_config's __enter__ returns)"),
    Skip("test_backend_hinting_and_constraints", INTERNALS),
    Skip("test_nested_parallelism_limit", INTERNALS),
    Skip("test_batching_auto_threading", INTERNALS),
    Skip("test_batching_auto_subprocesses", INTERNALS),
    Skip("test_backend_batch_statistics_reset", INTERNALS),
    Skip("test_default_mp_context", INTERNALS),
    Skip("test_error_capture", INTERNALS + "; and after a task raises, parmap keeps its "
         "healthy workers, where joblib's loky starts a new executor"),
    Skip("test_parameterized_backend_context_manager", CUSTOM),
    Skip("test_directly_parameterized_backend_context_manager", CUSTOM),
    Skip("test_backend_hinting_and_constraints_with_custom_backends", CUSTOM),
    Skip("test_retrieval_context", CUSTOM),
    Skip("test_zero_worker_backend", CUSTOM),
    Skip("test_multiple_generator_call_separated_gc", INTERNALS + " (Parallel."
         "_effective_n_jobs, _aborting); and for loky it expects loky's limitation, a "
         "RuntimeError when a second call starts while a collected generator shuts the "
         "shared executor down: parmap runs the second call"),
    Skip("test_memmapping_leaks", "expects array files in temp_folder during the call: "
         "parmap's forked workers read the caller's arrays in place at cold start, no file "
         "is written (docs/large_data.rst)"),
    Skip("test_nested_parallel_warnings", "parmap's 'multiprocessing' and 'loky' name one "
         "pool, so a nested 'loky' call cannot tell that its parent used 'multiprocessing' "
         "(joblib warns there because multiprocessing's workers are daemonic); the call "
         "runs on threads either way, and every other pairing warns as joblib does",
         when=lambda p: (p.get("parent_backend"), p.get("child_backend")) ==
         ("multiprocessing", "loky")),
    Skip("test_loky_reuse_workers", LOKY),
    Skip("test_parallel_with_interactively_defined_bound_method_loky", LOKY),
]


def skip_reason(function: str, params: Mapping[str, object]) -> str | None:
    """Why the case of ``function`` with ``params`` is skipped, or None to run it."""
    for skip in SKIPS:
        if skip.test == function and (skip.when is None or skip.when(params)):
            return skip.reason
    return None
