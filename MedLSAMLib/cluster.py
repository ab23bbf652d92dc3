"""Cohorts on a Dask cluster: one task per case, models loaded once per worker.

The client computes the templates' support features once and ships them, with a
:class:`~MedLSAMLib.settings.RunSettings`, inside a worker plugin; every worker (and every worker that replaces a
dead one) builds its :class:`~MedLSAMLib.pipeline.CohortSegmenter` from them when it joins.
A task is one case: it writes that case's outputs atomically into the shared output folder and
returns its :class:`~MedLSAMLib.results.CaseResult`. The scheduler re-runs a task whose worker
died (up to ``distributed.scheduler.allowed-failures`` times); a case that still cannot finish
is recorded as failed, like any other failure, and the batch goes on.

Needs ``pip install medlsam[distributed]`` (``dask.distributed``); the core install does not.
"""
from __future__ import annotations

import threading
import uuid
from pathlib import Path

from .errors import InputError

try:
    import distributed
except ImportError as exc:  # optional dependency: a clear one-line error, not a traceback
    raise InputError("--executor dask needs dask.distributed: pip install 'medlsam[distributed]'") from exc

from .io import case_name
from .device import set_cpu_threads, usable_cores
from .pipeline import output_lock, prepare_out_dir, resumed_result, segment_one, write_summary
from .results import BatchSummary, CaseResult
from .settings import RunSettings

PLUGIN_NAME = "medlsam-cohort"


class _WorkerState:
    """What one worker keeps between tasks: its models, and a lock so it runs one case at a time
    (a worker started with several threads would otherwise hold several cases in memory)."""

    def __init__(self, settings: RunSettings, support, threads: int):
        set_cpu_threads(threads)
        self.cohort = settings.build(support)
        self.lock = threading.Lock()


class MedLSAMWorkerPlugin(distributed.WorkerPlugin):
    """Carries the run settings and support features to each worker; builds the models when it joins."""

    name = PLUGIN_NAME

    def __init__(self, settings: RunSettings, support):
        self.settings, self.support, self.state = settings, support, None

    def setup(self, worker):
        self.state = _WorkerState(self.settings, self.support, worker.state.nthreads)


def _segment_case_task(image: str, out_dir: str) -> CaseResult:
    """Runs on a worker: the models come from the worker plugin, never from the task."""
    state = distributed.get_worker().plugins[PLUGIN_NAME].state
    with state.lock:
        return segment_one(state.cohort, Path(image), Path(out_dir))


def run_cohort_dask(settings: RunSettings, images: list[Path], out_dir: Path, *, resume: bool = False,
                    scheduler: str | None = None, workers: int | None = None, client=None,
                    show_progress: bool = True) -> BatchSummary:
    """Segment every image on a Dask cluster; same outputs, summary and resume rules as ``run_cohort``.

    Cluster: ``client`` (an existing ``distributed.Client``), else ``scheduler`` (address of a
    running scheduler, e.g. one started by dask-jobqueue), else a ``LocalCluster`` of ``workers``
    processes sharing this machine's cores.
    """
    from tqdm import tqdm

    out_dir = prepare_out_dir(Path(out_dir).resolve())
    with output_lock(out_dir):  # held by the client: the workers write only their own cases
        results: dict[str, CaseResult] = {}
        todo = []
        for path in images:
            earlier = resumed_result(out_dir, path) if resume else None
            if earlier is not None:
                results[earlier.case] = earlier
            else:
                todo.append(Path(path).resolve())

        own_cluster = own_client = None
        if todo:
            # support features once, here, on CPU: the client may be a login node without a GPU
            support = settings.client_support()
            if client is None:
                if scheduler:
                    client = own_client = distributed.Client(scheduler)
                else:
                    n = max(1, workers or 1)
                    own_cluster = distributed.LocalCluster(n_workers=n, threads_per_worker=max(1, usable_cores() // n),
                                                           processes=True, dashboard_address=None)
                    client = own_client = distributed.Client(own_cluster)
            try:
                client.register_plugin(MedLSAMWorkerPlugin(settings, support), name=PLUGIN_NAME)
                futures = {client.submit(_segment_case_task, str(p), str(out_dir), pure=False,
                                         key=f"medlsam-{case_name(p)}-{uuid.uuid4().hex[:8]}"): p
                           for p in todo}
                bar = tqdm(total=len(futures), desc="cases", unit="case", disable=not show_progress, dynamic_ncols=True)
                for future in distributed.as_completed(futures):
                    path = futures[future]
                    case = case_name(path)
                    try:
                        results[case] = future.result()
                    except Exception as exc:  # e.g. KilledWorker: its worker died on every retry
                        results[case] = CaseResult(case, str(path), "failed", 0.0,
                                                   f"{exc.__class__.__name__}: {exc}")
                    bar.set_postfix_str(f"{case} {results[case].status}, "
                                        f"{len(client.scheduler_info().get('workers', {}))} worker(s)")
                    bar.update()
                bar.close()
            finally:
                if own_client is not None:
                    own_client.close()
                if own_cluster is not None:
                    own_cluster.close()

        ordered = [results[case_name(p)] for p in images]
        return write_summary(out_dir, settings.templates, ordered, executor="dask")
