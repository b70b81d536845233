"""Plain-text tables for the terminal. JSON output does not come through here: it is the data as is."""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from cardq.store.limits import Limit


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [max([len(h), *(len(r[i]) for r in cells)]) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells]
    return "\n".join(lines)


def _cell(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3f}"
    return printable(str(v))


def printable(text: str) -> str:
    """Text for a terminal: control characters (newlines, escape sequences, bidi overrides) shown escaped, never
    acted on — a value from the database must not be able to forge a row or recolour the screen."""
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else ascii(ch)[1:-1] for ch in text)


def age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f}{unit}"
    return f"{seconds:.1f}s"


STALE_AFTER_S = 30.0  # the supervisor publishes on change and every 10 s: older than this, it could not write


def status(data: dict[str, Any]) -> str:
    jobs, today = data["jobs"], data["today"]
    out = [
        f"database  {data['database']}",
        f"config    {data['config']['file']} ({data['config']['digest']})"
        + (f"  INVALID: {data['config']['error']}" if data["config"].get("error") else ""),
        "",
        table(["status", "jobs"], jobs.items()),
        "",
        f"oldest queued job: {age(data['oldest_queued_age_s'])}    expired leases: {data['expired_leases']}",
        f"today ({today['day']} {today['timezone']}): done {today['done']}, failed attempts "
        f"{today['failed_attempts']}, dead {today['dead']}",
    ]
    sup = data.get("supervisor")
    if sup is not None:
        out += ["", _supervisor(sup)]
    gate_stats = data.get("gates")
    if gate_stats:
        out += ["", "gates:", gate_stats if isinstance(gate_stats, str) else gates(gate_stats)]
    if data["users"]:
        out += ["", "busiest users:", table(["user", "queued", "processing"],
                                            ([u["user_id"], u["queued"], u["processing"]] for u in data["users"]))]
    out += ["", "limits in effect:", table(
        ["limit", "value", "source"], ([k, v["value"], v["source"]] for k, v in data["limits"].items()))]
    for warning in data.get("warnings") or ():
        out += [f"WARNING: {warning}"]
    return "\n".join(printable(line) for line in "\n".join(out).split("\n"))


def _supervisor(sup: dict[str, Any]) -> str:
    if not sup["running"]:
        return "supervisor: not running"
    loaded_at = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(sup["config_loaded_at"] or 0))
    lines = [
        f"supervisor: pid {sup['pid']}, up {age(sup['uptime_s'])}, workers {sup['workers_desired']}",
        f"config in effect: {sup['config_file']} ({sup['config_digest']}), version {sup['config_version']}, "
        f"loaded {loaded_at}",
    ]
    if sup.get("http"):
        lines.append(f"http: {sup['http']}")
    if sup["last_reload_error"]:
        lines.append(f"LAST RELOAD FAILED (old config kept): {sup['last_reload_error']}")
    if sup["workers"]:
        lines.append(table(["worker", "pid", "state", "job", "done", "restarts", "last exit"],
                           ([w["name"], w["pid"], w["state"], w["current_job"], w["jobs_done"], w["restarts"],
                             w["last_exit"]] for w in sup["workers"])))
    for w in sup["workers"]:
        refused, evicted = w.get("connections_refused", 0), w.get("connections_evicted", 0)
        if refused or evicted:
            lines.append(f"{w['name']}: {refused} connections refused (out of file descriptors), {evicted} idle "
                         "connections closed to make room (actors.max_connections); an app may be leaking clients")
    if sup.get("heartbeat_age_s", 0) > STALE_AFTER_S:
        lines.append(f"(as published {age(sup['heartbeat_age_s'])} ago: the supervisor has not been able to "
                     "write since; see its log and the warnings below)")
    return "\n".join(lines)


def job_table(rows: list[dict[str, Any]]) -> str:
    now = time.time()
    return table(
        ["id", "user", "plan", "kind", "status", "attempts", "age", "last_error"],
        ([r["id"], r["user_id"], r["plan"], r["kind"], r["status"], f"{r['attempts']}/{r['max_attempts']}",
          age(now - r["created_at"]), (r["last_error"] or "")[:60]] for r in rows),
    )


def gates(stats: dict[str, dict[str, Any]]) -> str:
    return table(
        ["gate", "active", "limit", "queued", "max_queue", "dropped", "avg_wait_ms", "p95_wait_ms", "last_drop"],
        ([name, g["active"], _limit(g), g["queued"], g["max_queue"], g["dropped_since_boot"],
          g["avg_wait_ms"], g["p95_wait_ms"],
          time.strftime("%H:%M:%S", time.localtime(g["last_drop_at"])) if g["last_drop_at"] else "-"]
         for name, g in stats.items()))


def _limit(g: dict[str, Any]) -> str:
    """A fixed gate's limit; an adaptive one's current limit with its range, e.g. "6 (1-16, adaptive)"."""
    if not g.get("adaptive"):
        return str(g["max_concurrency"])
    return f"{g['limit']} ({g['min_concurrency']}-{g['max_concurrency']}, adaptive)"


def limits_table(limits: Iterable[Limit], config_source: str) -> str:
    rows = [[lim.key, lim.value, lim.source, lim.configured] for lim in limits]
    return table(["limit", "value", "source", "config value"], rows) + f"\n(config: {config_source})"


def tokens_table(rows: Iterable[Any]) -> str:
    """`cardq token list`: never the token (it is not kept), only what tells them apart."""
    now = time.time()
    out = [[t.id, t.name, t.scope, age(now - t.created_at) + " ago",
            "revoked " + age(now - t.revoked_at) + " ago" if t.revoked_at else "live"] for t in rows]
    return table(["id", "name", "scope", "created", "state"], out) if out else "no tokens (cardq token create)"
