"""A reload across worker processes: every worker swaps, or none does.

One process reloads in two phases (:func:`afpa.reload.prepare` builds and
checks everything without touching what serves; ``commit()`` swaps in one
reactor turn).  With workers the supervisor runs the phases over the control
channel:

1. it prepares its own copy (the tables ``/tables/`` shows, the admin token),
   refusing what workers cannot do without a restart (new listen or admin
   addresses, another number of workers);
2. every worker prepares (``reload_prepare``) and says ok or its problems;
3. if all are ok, every worker commits (``reload_commit``) and so does the
   supervisor; otherwise every worker aborts (``reload_abort``) and the answer
   lists the problems, each once.

A worker that dies in between comes back reading the configuration on disk,
which is then the new one: it never runs a mix.  Only one reload runs at a time.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, inlineCallbacks, succeed
from twisted.logger import Logger

from afpa import reload

log = Logger(namespace="afpa.reload")

PREPARE_TIMEOUT = 30.0  # seconds a worker has to read and check everything
COMMIT_TIMEOUT = 10.0


# -- worker side ---------------------------------------------------------------------

_pending: dict[int, Any] = {}  # id(server) -> the Prepared waiting for commit or abort


def op_prepare(server: Any, args: dict[str, Any]) -> dict[str, Any]:
    """``reload_prepare``: ``{"ok": true, "changed": [...]}`` with a generation held
    for ``reload_commit``, or ``{"ok": false, "problems": [...]}``."""
    _abort(server)
    result = server.prepare_reload()
    if isinstance(result, list):
        return {"ok": False, "problems": result}
    _pending[id(server)] = result
    return {"ok": True, "changed": list(result.changed)}


def op_commit(server: Any, args: dict[str, Any]) -> dict[str, Any]:
    """``reload_commit``: swap in the generation ``reload_prepare`` built."""
    prepared = _pending.pop(id(server), None)
    if prepared is None:
        raise ValueError("reload_commit: nothing prepared")
    try:
        out = prepared.commit()
    except RuntimeError as exc:
        raise ValueError(f"reload_commit: {exc}") from None
    log.info("reloaded: generation {n}", n=out["generation"])
    return out


def op_abort(server: Any, args: dict[str, Any]) -> dict[str, Any]:
    """``reload_abort``: forget a prepared generation (if any)."""
    _abort(server)
    return {}


def op_reopen_logs(server: Any, args: dict[str, Any]) -> dict[str, Any]:
    """``reopen_logs``: reopen the access log (after logrotate moved it)."""
    reopened = server.reopen_logs()
    if reopened:
        log.info("access log reopened")
    return {"reopened": reopened}


def _abort(server: Any) -> None:
    prepared = _pending.pop(id(server), None)
    if prepared is not None:
        prepared.abort()


def register_worker_ops(register: Any) -> None:
    """Register the reload ops with a worker's control channel."""
    register("reload_prepare", op_prepare)
    register("reload_commit", op_commit)
    register("reload_abort", op_abort)
    register("reopen_logs", op_reopen_logs)


# -- supervisor side -----------------------------------------------------------------

class ClusterReload:
    """Runs reloads for a supervisor (``server``: its own never-started Server)."""

    def __init__(self, cluster: Any, server: Any):
        self.cluster = cluster
        self.server = server
        self.running = False

    def reload(self) -> Deferred:
        """Fires with ``{"ok": true, "generation": n, "changed": [...], "workers": k}``
        or ``{"ok": false, "problems": [...]}`` (nothing changed anywhere)."""
        if self.running:
            return succeed({"ok": False, "problems": [reload.problem(
                None, None, "a reload is already running; try again when it ends")]})
        self.running = True
        d = self._run()

        def done(result: dict[str, Any]) -> dict[str, Any]:
            self.running = False
            if result["ok"]:
                log.info("reloaded every worker: generation {n}{changed}", n=result["generation"],
                         changed=f" (changed: {', '.join(result['changed'])})" if result["changed"] else "")
            else:
                for p in result["problems"]:
                    log.error("reload failed: {problem}", problem=reload.format_problem(p))
            return result

        def failed(f: Any) -> Any:
            self.running = False
            return f

        return d.addCallbacks(done, failed)

    @inlineCallbacks
    def _run(self) -> Any:
        server = self.server
        mine = server.prepare_reload()
        if isinstance(mine, list):
            return {"ok": False, "problems": mine}
        problems = _needs_restart(server.settings, mine.gen.settings, server.source)
        if problems:
            mine.abort()
            return {"ok": False, "problems": problems}
        replies = yield self.cluster.call("reload_prepare", {}, PREPARE_TIMEOUT)
        problems = []
        for r in replies:
            if "error" in r:
                problems.append(reload.problem(None, None, f"worker {r['worker']}: {r['error']}"))
            elif not r.get("ok"):
                problems += [p for p in r.get("problems", []) if p not in problems]
        if problems or not replies:
            mine.abort()
            yield self.cluster.call("reload_abort", {}, COMMIT_TIMEOUT)
            return {"ok": False, "problems": problems or [reload.problem(None, None, "no worker is running")]}
        out = mine.commit()
        commits = yield self.cluster.call("reload_commit", {}, COMMIT_TIMEOUT)
        failed = [r for r in commits if "error" in r]
        for r in failed:
            # Prepared but could not commit (it died, or was replaced meanwhile):
            # a restart of that worker reads the new configuration.
            log.error("worker {i} did not commit the reload ({why}); restarting it", i=r["worker"], why=r["error"])
            self.cluster.restart(r["worker"])
        return {**out, "workers": len(commits) - len(failed)}


def _needs_restart(old: Any, new: Any, source: Any) -> list[dict[str, Any]]:
    """What a supervisor cannot change under running workers."""
    from afpa.server import listener_plan

    path = source.path if source is not None else None
    out = []
    if listener_plan(old) != listener_plan(new):
        out.append(reload.config_problem("listen: with workers, moving a listener needs a restart "
                                         "(the supervisor binds them once)", path))
    if old.admin != new.admin:
        out.append(reload.config_problem("admin: with workers, moving the admin listener needs a restart", path))
    if old.workers != new.workers:
        out.append(reload.config_problem(f"workers: changing the number of workers needs a restart "
                                         f"({old.workers} -> {new.workers})", path))
    return out

