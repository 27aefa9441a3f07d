"""Optuna studies on RDB storage (sqlite embedded, PostgreSQL in production): parallel workers (processes or
pods) share one study by name; every trial is an MLflow run nested under the worker's step run (or the
pipeline's parent run), holding the trial's params, intermediate values, value and final state.

Optuna's MLflowCallback is deprecated, and logs only after a trial ends; here the trial's run is active while
the objective runs, so the objective may log its own metrics and artifacts into it.

A restarted database must not cost trials: every storage call that lost its connection is retried until the
database answers again (bounded by settings.sweep_reconnect_s), so a worker rides through a restart; a worker
that dies instead leaves its trial RUNNING, Optuna's heartbeat marks it FAIL after the grace period, and
RetryHeartbeatStaleTrialCallback enqueues it again with the same parameters for whichever worker comes next.
"""

from __future__ import annotations

import functools
import logging
import time
import warnings
from typing import Any, Callable

from distillery.settings import get_settings

log = logging.getLogger(__name__)

DIRECTIONS = ("minimize", "maximize")


def _connection_lost(e: BaseException | None) -> bool:
    """Whether `e` (or what caused it: Optuna wraps SQLAlchemy's errors) is a lost or refused database connection,
    which a retry on a fresh connection may cure; constraint violations and bad SQL are not."""
    from sqlalchemy.exc import DBAPIError, OperationalError, PendingRollbackError

    while e is not None:
        if isinstance(e, (OperationalError, PendingRollbackError)) \
                or (isinstance(e, DBAPIError) and e.connection_invalidated):
            return True
        e = e.__cause__
    return False


def _reconnecting(method: Callable) -> Callable:
    @functools.wraps(method)
    def call(self, *args, **kwargs):
        deadline = time.monotonic() + self.reconnect_s
        delay = 0.5
        while True:
            try:
                return method(self, *args, **kwargs)
            except Exception as e:
                if not _connection_lost(e) or time.monotonic() + delay > deadline:
                    raise
                log.warning("optuna storage: %s lost its database connection (%s); retrying in %.1f s",
                            method.__name__, type(e.__cause__ or e).__name__, delay)
                # The session or a pooled connection may still hold the transaction that died with the
                # database (PendingRollbackError on every later call): the retry starts from fresh ones.
                try:
                    self.scoped_session.remove()
                    self.engine.dispose()
                except Exception:  # noqa: BLE001 - closing what lost its connection may fail too
                    pass
                time.sleep(delay)
                delay = min(delay * 2, 8.0)
    return call


# RDBStorage methods that are not calls to the database.
_LOCAL_METHODS = frozenset({"get_heartbeat_interval", "get_heartbeat_stale_trial_callback", "remove_session",
                            "check_trial_is_updatable"})


# The private RDBStorage methods Optuna's _CachedStorage calls directly, bypassing the public ones.
_CACHED_STORAGE_CALLS = frozenset({"_create_new_trial", "_set_trial_param", "_get_best_trial_id", "_get_trials",
                                   "_get_stale_trial_ids"})


@functools.lru_cache(maxsize=1)
def _storage_class():
    """RDBStorage whose database calls survive a restart of the database (see the module's docstring)."""
    import inspect

    from optuna.storages import RDBStorage

    class ReconnectingRDBStorage(RDBStorage):
        reconnect_s = 60.0

    for name, method in inspect.getmembers(RDBStorage, inspect.isfunction):
        if (not name.startswith("_") or name in _CACHED_STORAGE_CALLS) and name not in _LOCAL_METHODS \
                and name not in ("upgrade", "get_current_version", "get_head_version", "get_all_versions"):
            setattr(ReconnectingRDBStorage, name, _reconnecting(method))
    return ReconnectingRDBStorage


def with_driver(url: str) -> str:
    """A PostgreSQL URL without a driver gets psycopg2, the one the project ships: SQLAlchemy 2.1 would pick
    psycopg 3 for `postgresql://` and fail with "Failed to import DB access module"."""
    return "postgresql+psycopg2://" + url[len("postgresql://"):] if url.startswith("postgresql://") else url


def storage(url: str | None = None):
    """The RDB storage at `url` (default: settings.optuna_storage_url), with heartbeats (a trial whose worker died
    is failed after settings.sweep_grace_s and retried) and reconnection on a lost database connection."""
    import optuna
    from sqlalchemy.exc import IntegrityError, OperationalError

    s = get_settings()
    url = with_driver(url or s.optuna_storage_url)
    kwargs: dict[str, Any] = {"pool_pre_ping": True}  # a pooled connection from before a restart is replaced
    if url.startswith("sqlite"):
        kwargs["connect_args"] = {"timeout": 60}  # workers in other processes hold the write lock briefly
    elif url.startswith("postgresql"):
        kwargs["connect_args"] = {"connect_timeout": 10}  # an unreachable host fails the attempt, not the worker
    for attempt in range(3):
        try:
            with warnings.catch_warnings():  # heartbeats are "experimental" in Optuna 5, and warn every time
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                retry = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=s.sweep_trial_retries)
                st = _storage_class()(url, engine_kwargs=kwargs, heartbeat_interval=s.sweep_heartbeat_s,
                                      grace_period=s.sweep_grace_s, heartbeat_stale_trial_callback=retry)
            st.reconnect_s = s.sweep_reconnect_s
            return st
        except (OperationalError, IntegrityError):  # workers starting together on a new database race to create
            # its tables (a locked database) or to stamp its schema version (alembic_version's unique key)
            if attempt == 2:
                raise
            time.sleep(0.5 * (attempt + 1))


def default_pruner():
    import optuna

    return optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=1)


def successive_halving(min_resource: int, reduction_factor: int = 3):
    """Asynchronous successive halving (ASHA): at each rung (min_resource * reduction_factor**k steps) a trial goes
    on only if it is in the best 1/reduction_factor of the trials that reached that rung (the first ones: if it is
    the best so far). The rungs' values live in the study's storage, so parallel workers prune against each
    other's trials."""
    import optuna

    if min_resource < 1 or reduction_factor < 2:
        raise ValueError(f"min_resource must be >= 1 and reduction_factor >= 2, got {min_resource} and "
                         f"{reduction_factor}")
    return optuna.pruners.SuccessiveHalvingPruner(min_resource=min_resource, reduction_factor=reduction_factor,
                                                  min_early_stopping_rate=0)


def rungs(max_resource: int, n_rungs: int, reduction_factor: int = 3) -> list[int]:
    """Where a trial reports (the pruner's rungs): max/eta^(n-1), ..., max/eta, then max itself. The first is the
    `min_resource` of `successive_halving`; the rest are it times powers of eta, so they are rungs exactly."""
    if max_resource < 1 or n_rungs < 1 or reduction_factor < 2:
        raise ValueError(f"max_resource and n_rungs must be >= 1 and reduction_factor >= 2, got {max_resource}, "
                         f"{n_rungs} and {reduction_factor}")
    r0 = max(1, max_resource // reduction_factor ** (n_rungs - 1))
    below = {r0 * reduction_factor ** k for k in range(n_rungs - 1)}
    return sorted({r for r in below if r < max_resource} | {max_resource})


def create_study(name: str, direction: str = "minimize", storage: Any = None, sampler_seed: int | None = 0,
                 pruner=None):
    """Create the study, or load it when another worker already did (so parallel workers share it).

    `storage` is an RDB URL or an Optuna storage (default: settings.optuna_storage_url). Each worker gets its own
    sampler: give parallel workers different `sampler_seed`s or they propose the same first points.
    """
    import optuna

    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
    study = optuna.create_study(study_name=name, storage=_storage(storage), direction=direction, load_if_exists=True,
                                sampler=optuna.samplers.TPESampler(seed=sampler_seed),
                                pruner=pruner if pruner is not None else default_pruner())
    existing = study.direction.name.lower()
    if existing != direction:
        raise ValueError(f"study {name!r} already exists with direction {existing}; use a new study name or "
                         f"direction={existing!r}")
    return study


def _storage(url_or_storage: Any):
    return storage(url_or_storage) if url_or_storage is None or isinstance(url_or_storage, str) else url_or_storage


def run_worker(study_name: str, objective: Callable, n_trials: int, pipeline: str = "", parent_run_id: str = "",
               *, direction: str = "minimize", storage: Any = None, sampler_seed: int | None = 0,
               pruner=None, catch: tuple = ()) -> dict:
    """Run `n_trials` of the shared study in this process; each trial is an MLflow run nested under the active
    run (the worker's step run), else under `parent_run_id` in the experiment of `pipeline`.

    Returns {"trials": trials in the study so far (all workers), "finished_here", "pruned" (in the study),
    "best_value", "best_params"}.
    """
    import mlflow
    import optuna

    from distillery.platform import tracking

    if n_trials < 1:
        raise ValueError(f"n_trials must be >= 1, got {n_trials}")
    study = create_study(study_name, direction, storage, sampler_seed, pruner)
    active = mlflow.active_run()
    if active is None and not pipeline:
        raise ValueError("run_worker needs an active step run (inside step_run) or a pipeline name to log trials to")
    # Trials live in their parent's experiment, so the MLflow UI shows them nested.
    experiment_id = active.info.experiment_id if active is not None else tracking.experiment_for(pipeline)
    parent = active.info.run_id if active is not None else parent_run_id
    base_tags = {tracking.ROLE: "trial", "optuna.study": study_name, "git_commit": tracking.git_commit(),
                 **({"pipeline": pipeline} if pipeline else {})}
    if active is not None:
        base_tags.update({k: v for k, v in active.data.tags.items() if k in ("kfp_run_id", "data_revision")})
    c = tracking.client()
    done_here = []

    def tracked(trial: optuna.Trial) -> float:
        tags = {**base_tags, "optuna.trial": str(trial.number), **({tracking.PARENT_TAG: parent} if parent else {})}
        run = c.create_run(experiment_id, run_name=f"{study_name}-trial-{trial.number}", tags=tags)
        trial.set_user_attr("mlflow_run_id", run.info.run_id)
        # Active while the objective runs, so its own mlflow.log_* calls land in the trial's run.
        mlflow.start_run(run_id=run.info.run_id, nested=mlflow.active_run() is not None)
        status = "FAILED"
        try:
            value = objective(trial)
            status = "FINISHED"
            return value
        except optuna.TrialPruned:
            status = "FINISHED"  # a normal outcome; the callback records state PRUNED
            raise
        except BaseException as e:  # not caught by Optuna: the callback will not run, so record it here
            mlflow.set_tags({"optuna.state": "FAIL", "error": f"{type(e).__name__}: {e}"[:5000]})
            mlflow.log_params({k: str(v) for k, v in trial.params.items()})
            raise
        finally:
            mlflow.end_run(status)

    def record_finished(study: optuna.Study, frozen: optuna.trial.FrozenTrial) -> None:
        run_id = frozen.user_attrs.get("mlflow_run_id")
        if run_id:
            _record(c, run_id, frozen)
            done_here.append(frozen.number)

    study.optimize(tracked, n_trials=n_trials, catch=catch, callbacks=[record_finished], gc_after_trial=False)
    try:
        best_value, best = study.best_value, study.best_params
    except ValueError:  # no trial completed (all pruned or failed)
        best_value, best = None, {}
    pruned = sum(t.state == optuna.trial.TrialState.PRUNED for t in study.trials)
    return {"trials": len(study.trials), "finished_here": len(done_here), "pruned": pruned, "best_value": best_value,
            "best_params": best}


def _record(c, run_id: str, frozen) -> None:
    """Params, intermediate values (metric history), value and final state of one finished trial on its run."""
    from mlflow.entities import Metric, Param, RunTag

    now = int(time.time() * 1000)
    metrics = [Metric("intermediate_value", float(v), now, int(step))
               for step, v in sorted(frozen.intermediate_values.items())]
    if frozen.state.name == "COMPLETE" and frozen.value is not None:
        metrics.append(Metric("objective", float(frozen.value), now, 0))
    existing = c.get_run(run_id).data.params
    params = [Param(k, str(v)) for k, v in frozen.params.items() if k not in existing]
    c.log_batch(run_id, metrics=metrics, params=params, tags=[RunTag("optuna.state", frozen.state.name)])
    if frozen.state.name == "FAIL":  # e.g. the objective returned NaN, or raised an exception listed in `catch`
        c.set_terminated(run_id, "FAILED")


def best_params(study_name: str, storage: Any = None) -> dict:
    import optuna

    try:
        study = optuna.load_study(study_name=study_name, storage=_storage(storage))
    except KeyError as e:
        raise LookupError(f"no Optuna study named {study_name!r} in the configured storage") from e
    try:
        return study.best_params
    except ValueError as e:
        raise LookupError(f"study {study_name!r} has no completed trial yet") from e
