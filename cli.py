"""The `cardq` command: thin click commands over the public Python API (`import cardq`).

Exit codes: 0 success; 2 usage, config or input error; 3 rejected by a limit; 1 any other failure.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click
import orjson

import cardq
from cardq import render
from cardq.errors import (
    AlreadyRunning,
    ConfigError,
    Error,
    InputError,
    InvalidRequest,
    InvalidTransition,
    JobNotFound,
    LimitExceeded,
    RestartIntensityExceeded,
    os_problem,
)
from cardq.vocabulary import FORMATS, MAX_PRIORITY, STATUSES

EXIT_CODES_HELP = """\b
Exit codes:
  0  success
  1  any other failure (database locked, disk full, ...)
  2  usage, config or input error
  3  rejected by a limit (nothing was submitted)
"""
EXIT_FAILURE, EXIT_USAGE, EXIT_LIMIT, EXIT_INTENSITY = 1, 2, 3, 4
# The one place errors become exit codes: the first matching type wins (so subclasses come first).
EXIT_CODES: tuple[tuple[type[Error], int], ...] = (
    (LimitExceeded, EXIT_LIMIT),
    (InputError, EXIT_USAGE),
    (ConfigError, EXIT_USAGE),
    (JobNotFound, EXIT_USAGE),
    (InvalidTransition, EXIT_USAGE),
    (InvalidRequest, EXIT_USAGE),
    (RestartIntensityExceeded, EXIT_INTENSITY),
    (AlreadyRunning, EXIT_FAILURE),
    (Error, EXIT_FAILURE),
)


def exit_code(e: Error) -> int:
    return next(code for cls, code in EXIT_CODES if isinstance(e, cls))


PROGRESS_MIN_ITEMS = 5000
JOB_ID = click.IntRange(1, 2**63 - 1)


class CardqGroup(click.Group):
    """Turns every Error into its one-line message and exit code; never a traceback for the user."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        """click's own usage errors as one line too (click prints three), with the same exit codes."""
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.UsageError as e:
            where = f" (see '{e.ctx.command_path} --help')" if e.ctx is not None else ""
            click.echo(f"cardq: {e.format_message()}{where}", err=True)
            rv = e.exit_code
        except click.ClickException as e:
            click.echo(f"cardq: {e.format_message()}", err=True)
            rv = e.exit_code
        except click.Abort:
            click.echo("cardq: aborted", err=True)
            rv = EXIT_FAILURE
        code = rv if isinstance(rv, int) else 0
        if standalone_mode:
            sys.exit(code)
        return code

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except Error as e:
            click.echo(f"cardq: {e}", err=True)
            ctx.exit(exit_code(e))
        except KeyboardInterrupt:
            click.echo("cardq: interrupted", err=True)
            ctx.exit(130)
        except (click.exceptions.Exit, click.ClickException, click.Abort):
            raise
        except OSError as e:  # a file cardq reached without a guard of its own: still one line, in words
            if os.environ.get("CARDQ_DEBUG"):
                raise
            where = f"{e.filename}: " if e.filename else ""
            click.echo(f"cardq: {where}{os_problem(e, e.filename)}", err=True)
            ctx.exit(EXIT_FAILURE)
        except Exception as e:  # a bug: say so in one line; CARDQ_DEBUG=1 shows the traceback
            if os.environ.get("CARDQ_DEBUG"):
                raise
            click.echo(f"cardq: internal error: {type(e).__name__}: {e} (set CARDQ_DEBUG=1 for a traceback)",
                       err=True)
            ctx.exit(EXIT_FAILURE)


config_option = click.option(
    "--config", "config_path", envvar="CARDQ_CONFIG", type=click.Path(dir_okay=False),
    help="Config file (env CARDQ_CONFIG). Default: ./config.toml if present, else built-in defaults.",
)


def json_option(f):
    return click.option("--json", "as_json", is_flag=True, help="Machine-readable JSON (stable keys).")(f)


def emit_json(data: object) -> None:
    click.echo(orjson.dumps(data, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS).decode())


@click.group(cls=CardqGroup, epilog=EXIT_CODES_HELP, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="cardq")
def cli() -> None:
    """cardq: a single-VM job queue and traffic system on SQLite. No Redis, no Postgres, no cloud queue."""


@cli.command(epilog=EXIT_CODES_HELP)
@config_option
def init(config_path: str | None) -> None:
    """Write a commented config.toml (if none exists) and create the database.

    Example: cardq init --config /srv/cardq/config.toml
    """
    r = cardq.init(config_path)
    click.echo(f"config: {'wrote ' if r.config_written else ''}{r.config_path}"
               f"{'' if r.config_written else ' exists, left as it is'}")
    click.echo(f"database: {r.database} ready (schema v{r.schema_version})")
    click.echo(f"key file: {r.key_file} (mode 0600; apps authenticate with it)")


def connect(config_path: str | None) -> cardq.Queue:
    return cardq.connect(config_path, name="cli")


@cli.command(epilog=EXIT_CODES_HELP)
@click.argument("file", type=click.Path(allow_dash=True, dir_okay=False))
@click.option("--user", "user_id", required=True, help="The user the jobs belong to.")
@click.option("--plan", required=True, help="The user's plan (free, basic, professional, enterprise, ...).")
@click.option("--kind", default="card", show_default=True, help="Job kind.")
@click.option("--priority", type=int, default=0, show_default=True, help="Higher runs first (0 to 1000000).")
@click.option("--idempotency-key-field", "key_field", help="Item field whose value makes resubmits idempotent.")
@click.option("--format", "fmt", type=click.Choice(FORMATS), default="auto", show_default=True,
              help="Input format; auto: by extension, else by the first character.")
@click.option("--quiet", "-q", is_flag=True, help="Print only the number of jobs.")
@config_option
def submit(file: str, user_id: str, plan: str, kind: str, priority: int, key_field: str | None, fmt: str,
           quiet: bool, config_path: str | None) -> None:
    """Submit FILE (JSONL, a JSON array, or CSV with a header; - for stdin) as one all-or-nothing batch.

    Prints the job ids, one per line. One bad line rejects the whole batch, naming the line.

    Example: cardq submit items.jsonl --user u42 --plan basic --idempotency-key-field sku
    """
    if not 0 <= priority <= MAX_PRIORITY:
        raise InputError(f"--priority {priority}: expected a whole number from 0 to {MAX_PRIORITY}")
    with connect(config_path) as q:  # the config first: a broken one is the first thing to say
        items = cardq.read_items(file, fmt=fmt, idempotency_key_field=key_field)
        if sys.stdout.isatty() and len(items) >= PROGRESS_MIN_ITEMS:
            with click.progressbar(length=len(items), label="submitting", file=sys.stderr) as bar:
                result = q.submit(items, user=user_id, plan=plan, kind=kind, priority=priority, progress=bar.update)
        else:
            result = q.submit(items, user=user_id, plan=plan, kind=kind, priority=priority)
    if quiet:
        click.echo(result.created)
    else:
        click.echo("\n".join(map(str, result.ids)))
        extra = f" ({result.existing} already submitted under the same key)" if result.existing else ""
        click.echo(f"submitted {result.created} jobs for {user_id}{extra}", err=True)


@cli.command(epilog=EXIT_CODES_HELP)
@json_option
@click.option("--top", default=10, show_default=True, help="How many users to list.")
@config_option
def status(as_json: bool, top: int, config_path: str | None) -> None:
    """Jobs by status, the busiest users, today's figures, expired leases and the limits in effect.

    Works with no supervisor running, and while config.toml is broken. Example: cardq status --json
    """
    with cardq.connect(config_path, name="cli", tolerate_invalid=True) as q:
        try:
            data = q.status(top=top)
        except Error:
            if q.config_error:
                raise ConfigError(q.config_error) from None  # the broken file is the first thing to fix
            raise
    if as_json:
        emit_json(data)
    else:
        click.echo(render.status(data))
    if q.config_error:
        # Shown anyway (a running supervisor keeps its last good config), but a script must notice.
        click.echo(f"cardq: {q.config_error} (status shown with built-in limits)", err=True)
        sys.exit(EXIT_USAGE)


@cli.group(epilog=EXIT_CODES_HELP)
def jobs() -> None:
    """List, inspect, retry, cancel and purge jobs."""


@jobs.command("list")
@click.option("--status", type=click.Choice(STATUSES), help="Only jobs in this status.")
@click.option("--user", "user_id", help="Only this user's jobs.")
@click.option("--kind", help="Only jobs of this kind.")
@click.option("--limit", default=50, show_default=True, type=click.IntRange(1, 100_000), help="At most this many.")
@json_option
@config_option
def jobs_list(status: str | None, user_id: str | None, kind: str | None, limit: int, as_json: bool,
              config_path: str | None) -> None:
    """Jobs, newest first. Example: cardq jobs list --status dead --user u42"""
    with connect(config_path) as q:
        page = q.jobs(status=status, user=user_id, kind=kind, limit=limit)
    rows = [{k: v for k, v in job.to_dict().items() if k not in ("payload", "result", "errors")}
            for job in page.jobs]
    if as_json:
        emit_json(rows)
    else:
        click.echo(render.job_table(rows))


@jobs.command("show")
@click.argument("job_id", type=JOB_ID)
@config_option
def jobs_show(job_id: int, config_path: str | None) -> None:
    """Every field of one job, as JSON (payload, result and error history decoded)."""
    with connect(config_path) as q:
        emit_json(q.job(job_id).to_dict())


@jobs.command("retry")
@click.argument("job_id", type=JOB_ID, required=False)
@click.option("--dead", "all_dead", is_flag=True, help="Retry every dead job (narrow with --user, --kind).")
@click.option("--user", "user_id", help="With --dead: only this user's jobs.")
@click.option("--kind", help="With --dead: only jobs of this kind.")
@config_option
def jobs_retry(job_id: int | None, all_dead: bool, user_id: str | None, kind: str | None,
               config_path: str | None) -> None:
    """Queue a dead, cancelled or scheduled job again now, with a full set of attempts.

    Example: cardq jobs retry 42; cardq jobs retry --dead --user u42
    """
    if (job_id is None) == (not all_dead):
        raise InputError("give a JOB_ID or --dead (not both)")
    with connect(config_path) as q:
        ids = q.retry(job_id) if job_id is not None else q.retry_dead(user=user_id, kind=kind)
    click.echo(f"queued again: {len(ids)} job{'s' if len(ids) != 1 else ''}")


@jobs.command("cancel")
@click.argument("job_id", type=JOB_ID)
@config_option
def jobs_cancel(job_id: int, config_path: str | None) -> None:
    """Cancel a queued, scheduled or processing job (a processing one's worker loses its lease)."""
    with connect(config_path) as q:
        was = q.cancel(job_id)
    click.echo(f"job {job_id}: cancelled (was {was})")


@jobs.command("purge")
@click.option("--older-than", "older_than", required=True, help="Age such as 7d, 12h, 30m.")
@click.option("--status", "statuses", multiple=True, type=click.Choice(("done", "dead", "cancelled")),
              default=("done",), show_default=True, help="Repeatable.")
@click.option("--dry-run", is_flag=True, help="Only count what would be deleted.")
@config_option
def jobs_purge(older_than: str, statuses: tuple[str, ...], dry_run: bool, config_path: str | None) -> None:
    """Delete finished jobs older than a retention. Example: cardq jobs purge --older-than 7d"""
    with connect(config_path) as q:
        n = q.purge(older_than, statuses=statuses, dry_run=dry_run)
    verb = "would purge" if dry_run else "purged"
    click.echo(f"{verb} {n} jobs ({', '.join(statuses)}) finished more than {older_than} ago")


@cli.group(invoke_without_command=True, epilog=EXIT_CODES_HELP)
@json_option
@config_option
@click.pass_context
def limits(ctx: click.Context, as_json: bool, config_path: str | None) -> None:
    """Show or change limits live (database override > config.toml > built-in default)."""
    if ctx.invoked_subcommand is None:
        ctx.invoke(limits_list, as_json=as_json, config_path=config_path)


@limits.command("list")
@json_option
@config_option
def limits_list(as_json: bool = False, config_path: str | None = None) -> None:
    """Every limit with its effective value and where it comes from."""
    with connect(config_path) as q:
        effective = q.limits()
        source = q.config.source
    if as_json:
        emit_json({k: {"value": v.value, "source": v.source, "configured": v.configured}
                   for k, v in effective.items()})
    else:
        click.echo(render.limits_table(effective.values(), source))


@limits.command("set", context_settings={"ignore_unknown_options": True})  # so that "-1" is a value
@click.argument("key")
@click.argument("value")
@config_option
def limits_set(key: str, value: str, config_path: str | None) -> None:
    """Override a limit in the database; the next submit uses it. Example: cardq limits set daily.free 10"""
    with connect(config_path) as q:
        number = q.set_limit(key, value)
        configured, source = q.config.limit_values()[key]
    click.echo(f"{key} = {number} (override; the {source} value is {configured})")


@limits.command("unset")
@click.argument("key")
@config_option
def limits_unset(key: str, config_path: str | None) -> None:
    """Drop a limit's override: back to the config.toml (or built-in) value."""
    with connect(config_path) as q:
        had = q.unset_limit(key)
        value, source = q.config.limit_values()[key]
    click.echo(f"{key} = {value} ({source}){'' if had else '; there was no override'}")


@cli.group(epilog=EXIT_CODES_HELP)
def token() -> None:
    """Bearer tokens of the HTTP API: read (status, jobs, paths, diag, metrics) < app (submit, rate limits,
    gates, counters, events) < admin (limits, retry, cancel, purge)."""


@token.command("create")
@click.option("--scope", required=True, type=click.Choice(("read", "app", "admin")), help="What it may do.")
@click.option("--name", default="", help="Whose or what for (shown by `cardq token list`).")
@config_option
def token_create(scope: str, name: str, config_path: str | None) -> None:
    """Make a token and print it, once: only its SHA-256 digest is kept."""
    with connect(config_path) as q:
        t = q.create_token(scope, name)
    click.echo(t.token)
    click.echo(f"token {t.id} ({t.scope}{', ' + t.name if t.name else ''}): shown once; keep it in a secret store",
               err=True)


@token.command("list")
@json_option
@config_option
def token_list(as_json: bool, config_path: str | None) -> None:
    """Every token: id, name, scope, when made, when revoked (never the token itself)."""
    with connect(config_path) as q:
        rows = q.tokens()
    if as_json:
        emit_json([{f: getattr(r, f) for f in r.__struct_fields__} for r in rows])
    else:
        click.echo(render.tokens_table(rows))


@token.command("revoke")
@click.argument("token_id", type=click.IntRange(1))
@config_option
def token_revoke(token_id: int, config_path: str | None) -> None:
    """Revoke a token by id; a running HTTP server refuses it within a second."""
    with connect(config_path) as q:
        if not q.revoke_token(token_id):
            raise InputError(f"token {token_id}: no live token with this id (see `cardq token list`)")
    click.echo(f"token {token_id} revoked")


@cli.command(epilog=EXIT_CODES_HELP)
@click.option("--dir", "directory", default="demo", show_default=True, type=click.Path(file_okay=False),
              help="Folder for the demo's config and fresh database.")
@click.option("--items", "items_path", type=click.Path(exists=True, dir_okay=False),
              help="Items to submit (default: the bundled cardq/examples/cards.jsonl).")
def demo(directory: str, items_path: str | None) -> None:
    """Run cardq's main job end to end on the built-in defaults, in a fresh database under ./demo."""
    from cardq import demo as demo_mod

    demo_mod.run(Path(directory), Path(items_path) if items_path else None, click.echo,
                 lambda q: supervise_burst(q, quiet=True))


def supervise_burst(config: cardq.Queue | str | None, workers: int | None = None, quiet: bool = False) -> None:
    """`supervise --burst`, with a progress bar of jobs done on a terminal (the log then cut to warnings, so that
    the bar stays readable; `quiet`: always, as the demo wants)."""
    if not isinstance(config, cardq.Queue):
        with connect(config) as q:
            return supervise_burst(q, workers, quiet)
    q = config
    quiet_level = "warning" if q.config.config.log.level in ("debug", "info") else None
    if not sys.stderr.isatty():
        cardq.supervise(q.config, workers=workers, burst=True, log_level=quiet_level if quiet else None)
        return None
    with click.progressbar(length=q.pending(), label="processing", file=sys.stderr, show_pos=True) as bar:
        cardq.supervise(q.config, workers=workers, burst=True, log_level=quiet_level, on_progress=bar.update)
    return None


@cli.command(epilog=EXIT_CODES_HELP + "  4  restart intensity exceeded (workers kept crashing)\n")
@click.option("--workers", type=click.IntRange(0, 256), help="Worker processes (default: workers.count).")
@click.option("--burst", is_flag=True, help="Exit 0 once every job is finished (including retries) and "
              "every worker is idle.")
@config_option
def supervise(workers: int | None, burst: bool, config_path: str | None) -> None:
    """Run the supervisor and its worker processes until SIGTERM/SIGINT (or, with --burst, until drained).

    SIGHUP (or `cardq reload`) re-reads the config; a broken file is refused and the old config kept.
    Example: cardq supervise --workers 4
    """
    if burst:
        supervise_burst(config_path, workers)
    else:
        cardq.supervise(config_path, workers=workers)


@cli.command(epilog=EXIT_CODES_HELP)
@config_option
def reload(config_path: str | None) -> None:
    """Ask the running supervisor of this database to re-read its config (SIGHUP) and say what became of it:
    applied (with its version), or refused with the reason (exit 2)."""
    # A broken config.toml still finds the running supervisor (its record), which then refuses the file.
    with cardq.connect(config_path, name="cli", tolerate_invalid=True) as q:
        r = q.reload()
    if r["applied"] is None:
        click.echo(f"sent SIGHUP to supervisor pid {r['pid']}; no answer yet: see `cardq status`")
    elif r["applied"]:
        click.echo(f"reloaded: supervisor pid {r['pid']} runs config version {r['config_version']} "
                   f"({r['config_digest']})")
    else:
        raise ConfigError(f"reload refused by supervisor pid {r['pid']}, which keeps its config: {r['error']}")


@cli.command(epilog=EXIT_CODES_HELP)
@click.option("--wait/--no-wait", default=True, show_default=True, help="Wait until it has exited.")
@config_option
def stop(wait: bool, config_path: str | None) -> None:
    """Ask the running supervisor of this database to stop after in-flight jobs (SIGTERM)."""
    q = cardq.connect(config_path, name="cli", tolerate_invalid=True)  # works while config.toml is broken
    click.echo(f"sent SIGTERM to supervisor pid {q.stop(wait=False)}")
    if wait:
        q.wait_stopped()
        click.echo("stopped")


@cli.command("systemd-unit", epilog=EXIT_CODES_HELP)
@click.option("--user", help="The account the service runs as (default: root). It must be able to write the "
              "database's, run directory's and log's folders.")
@config_option
def systemd_unit(user: str | None, config_path: str | None) -> None:
    """Print a systemd service unit that runs `cardq supervise` for this config (Type=notify, watchdog, hardened).

    Example: cardq systemd-unit --user cardq --config /srv/cardq/config.toml > /etc/systemd/system/cardq.service
    """
    click.echo(cardq.systemd_unit(config_path, user=user, argv0=sys.argv[0]), nl=False)


@cli.command(epilog=EXIT_CODES_HELP)
@config_option
def selftest(config_path: str | None) -> None:
    """Check config, database and pragmas, schema, handler, free disk and supervisor; non-zero on a failure."""
    checks = cardq.selftest(config_path)
    for check in checks:
        click.echo(f"{'ok  ' if check.ok else 'FAIL'}  {check.name:<10}  {check.detail}")
    if not all(c.ok for c in checks):
        sys.exit(EXIT_FAILURE)


@cli.group(epilog=EXIT_CODES_HELP)
def ratelimit() -> None:
    """Rate limits (GCRA, per key; policies from [ratelimit])."""


@ratelimit.command("check")
@click.argument("key")
@click.option("--cost", default=1, show_default=True, type=click.IntRange(1, 1_000_000), help="Units to spend.")
@json_option
@config_option
def ratelimit_check(key: str, cost: int, as_json: bool, config_path: str | None) -> None:
    """Spend COST of KEY's limit if allowed; exit 3 when not. Example: cardq ratelimit check user:42"""
    with connect(config_path) as q:
        r = q.ratelimit.check(key, cost)
    if as_json:
        emit_json(r.to_dict())
    else:
        click.echo(f"{'allowed' if r.allowed else 'DENIED'}: limit {r.limit}, remaining {r.remaining}, "
                   f"retry after {r.retry_after_s:.3f}s, full again after {r.reset_after_s:.3f}s")
    if not r.allowed:
        sys.exit(EXIT_LIMIT)


@cli.group(epilog=EXIT_CODES_HELP)
def counter() -> None:
    """Named counters, exactly once (usage:<user> is a user's jobs done today)."""


@counter.command("get")
@click.argument("key")
@config_option
def counter_get(key: str, config_path: str | None) -> None:
    """Print KEY's value. Example: cardq counter get usage:u42"""
    with connect(config_path) as q:
        click.echo(q.counter.get(key))


@counter.command("incr", context_settings={"ignore_unknown_options": True})
@click.argument("key")
@click.argument("n", default=1, type=int)
@click.option("--op-id", help="Makes a retry apply once: the same op id is never applied twice.")
@config_option
def counter_incr(key: str, n: int, op_id: str | None, config_path: str | None) -> None:
    """Add N (default 1) to KEY and print the new value. Example: cardq counter incr cards:made 5"""
    with connect(config_path) as q:
        click.echo(q.counter.incr(key, n, op_id=op_id))


@cli.group(epilog=EXIT_CODES_HELP)
def event() -> None:
    """Traffic events for the path collector."""


@event.command("record")
@click.option("--path", "path", required=True, help="Request path (query string dropped, ids normalized).")
@click.option("--status", required=True, type=int, help="HTTP status.")
@click.option("--ms", "response_ms", required=True, type=float, help="Response time in milliseconds.")
@click.option("--method", default="GET", show_default=True)
@click.option("--ip", "client_ip", default="", help="Client IP (stored only as a keyed hash).")
@click.option("--request-id", default="", help="Request id (part of the idempotent event id).")
@click.option("--bytes", "size", type=int, help="Response size in bytes.")
@click.option("--id", "idempotent_id", help="The event's id, <13-digit ts_ms>-<8 hex>, if the caller has one.")
@config_option
def event_record(path: str, status: int, response_ms: float, method: str, client_ip: str, request_id: str,
                 size: int | None, idempotent_id: str | None, config_path: str | None) -> None:
    """Record one event and wait until the collector (or, if it is down, the inbox) has it."""
    with connect(config_path) as q:
        event_id = q.events.record(path=path, status=status, response_ms=response_ms, method=method,
                                   client_ip=client_ip, request_id=request_id, bytes=size,
                                   idempotent_id=idempotent_id)
        q.events.flush()
        where = "collector" if q.events.sent else "inbox (the collector is not reachable)"
    click.echo(f"{event_id} -> {where}")


@cli.group(epilog=EXIT_CODES_HELP)
def diag() -> None:
    """Diagnostics of the running actors (the old /admin/diag)."""


@diag.command("gates")
@json_option
@config_option
def diag_gates(as_json: bool, config_path: str | None) -> None:
    """Each gate: active, queued, dropped_since_boot, avg/p95 wait, last drop, and the limits in effect."""
    with connect(config_path) as q:
        stats = q.gate_stats()
    if as_json:
        emit_json(stats)
    else:
        click.echo(render.gates(stats))


def main() -> None:
    cli(prog_name="cardq")


if __name__ == "__main__":
    main()
