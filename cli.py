"""The `cardq` command: thin click commands over cardq/ and store/.

Exit codes: 0 success; 2 usage, config or input error; 3 rejected by a limit; 1 any other failure.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import click
import orjson

from cardq import app, render
from cardq.errors import EXIT_FAILURE, EXIT_LIMIT, EXIT_USAGE, CardqError, ConfigError, InputError
from cardq.inputs import FORMATS, parse_items, read_text
from cardq.running import supervisor_summary
from store import admin, processes, queries
from store import limits as store_limits
from store import submit as store_submit
from store.schema import STATUSES

EXIT_CODES_HELP = """\b
Exit codes:
  0  success
  1  any other failure (database locked, disk full, ...)
  2  usage, config or input error
  3  rejected by a limit (nothing was submitted)
"""
PROGRESS_MIN_ITEMS = 5000
JOB_ID = click.IntRange(1, 2**63 - 1)


class CardqGroup(click.Group):
    """Turns every CardqError into its one-line message and exit code; never a traceback for the user."""

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
        except CardqError as e:
            click.echo(f"cardq: {e}", err=True)
            ctx.exit(e.exit_code)
        except KeyboardInterrupt:
            click.echo("cardq: interrupted", err=True)
            ctx.exit(130)
        except (click.exceptions.Exit, click.ClickException, click.Abort):
            raise
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
    target = Path(config_path) if config_path else Path("config.toml")
    if target.exists():
        click.echo(f"config: {target} exists, left as it is")
    else:
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(app.DEFAULT_CONFIG_TEXT())
        click.echo(f"config: wrote {target}")
    loaded = app.load(target)
    with app.open_db(loaded, create=True) as db:
        click.echo(f"database: {db.path} ready (schema v{db.conn.execute('PRAGMA user_version').fetchall()[0][0]})")
    from actors import keys

    click.echo(f"key file: {keys.ensure_run_dir(loaded.run_dir)} (mode 0600; apps authenticate with it)")


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
    if not 0 <= priority <= store_submit.MAX_PRIORITY:
        raise InputError(f"--priority {priority}: expected a whole number from 0 to {store_submit.MAX_PRIORITY}")
    loaded = app.load(config_path)
    name = "<stdin>" if file == "-" else file
    text = read_text(file, name)
    items = parse_items(text, name, fmt, key_field)
    jobs = [store_submit.NewJob(i.payload, i.idempotency_key, i.where) for i in items]
    progress = sys.stdout.isatty() and len(jobs) >= PROGRESS_MIN_ITEMS
    with app.open_db(loaded) as db:
        if progress:
            with click.progressbar(length=len(jobs), label="submitting", file=sys.stderr) as bar:
                result = store_submit.submit(
                    db, jobs, user_id=user_id, plan=plan, kind=kind, priority=priority,
                    max_attempts=loaded.config.workers.max_attempts, configured=loaded.limit_values(),
                    progress=bar.update)
        else:
            result = store_submit.submit(
                db, jobs, user_id=user_id, plan=plan, kind=kind, priority=priority,
                max_attempts=loaded.config.workers.max_attempts, configured=loaded.limit_values())
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

    Works with no supervisor running. Example: cardq status --json
    """
    loaded, config_error = app.load_for_reading(config_path)
    try:
        with app.open_db(loaded) as db:
            data = queries.stats(db, loaded.limit_values(), top_users=top)
            data["processes"] = db.read(processes.read)
    except CardqError:
        if config_error:
            raise ConfigError(config_error) from None  # the broken file is the first thing to fix
        raise
    data["config"] = {"file": loaded.source, "digest": loaded.digest, "error": config_error}
    data["supervisor"] = supervisor_summary(loaded, data["processes"])
    data["gates"] = _gate_stats(loaded) if data["supervisor"]["running"] else None
    if as_json:
        emit_json(data)
    else:
        click.echo(render.status(data))
    if config_error:
        # Shown anyway (a running supervisor keeps its last good config), but a script must notice.
        click.echo(f"cardq: {config_error} (status shown with built-in limits)", err=True)
        sys.exit(EXIT_USAGE)


def _gate_stats(loaded) -> dict | str:
    """The running gates, or why they cannot be shown (status must work even when the actors do not)."""
    from actors.client import Client
    from actors.protocol import ActorError

    try:
        with Client.from_config(loaded, name="status") as client:
            client.timeout_s = 0.5
            return client.ratelimit.gate_stats()
    except (ActorError, CardqError) as e:
        return f"unavailable: {e}"


@cli.group(epilog=EXIT_CODES_HELP)
def jobs() -> None:
    """List, inspect, retry, cancel and purge jobs."""


@jobs.command("list")
@click.option("--status", type=click.Choice(STATUSES), help="Only jobs in this status.")
@click.option("--user", "user_id", help="Only this user's jobs.")
@click.option("--limit", default=50, show_default=True, type=click.IntRange(1, 100_000), help="At most this many.")
@json_option
@config_option
def jobs_list(status: str | None, user_id: str | None, limit: int, as_json: bool, config_path: str | None) -> None:
    """Jobs, newest first. Example: cardq jobs list --status dead --user u42"""
    loaded = app.load(config_path)
    with app.open_db(loaded) as db:
        rows = queries.list_jobs(db, status=status, user_id=user_id, limit=limit)
    if as_json:
        emit_json(rows)
    else:
        click.echo(render.job_table(rows))


@jobs.command("show")
@click.argument("job_id", type=JOB_ID)
@config_option
def jobs_show(job_id: int, config_path: str | None) -> None:
    """Every field of one job, as JSON (payload, result and error history decoded)."""
    loaded = app.load(config_path)
    with app.open_db(loaded) as db:
        emit_json(queries.get(db, job_id))


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
    loaded = app.load(config_path)
    with app.open_db(loaded) as db:
        ids = admin.retry(db, job_id, status="dead", user_id=user_id, kind=kind)
    click.echo(f"queued again: {len(ids)} job{'s' if len(ids) != 1 else ''}")


@jobs.command("cancel")
@click.argument("job_id", type=JOB_ID)
@config_option
def jobs_cancel(job_id: int, config_path: str | None) -> None:
    """Cancel a queued, scheduled or processing job (a processing one's worker loses its lease)."""
    loaded = app.load(config_path)
    with app.open_db(loaded) as db:
        was = admin.cancel(db, job_id)
    click.echo(f"job {job_id}: cancelled (was {was})")


@jobs.command("purge")
@click.option("--older-than", "older_than", required=True, help="Age such as 7d, 12h, 30m.")
@click.option("--status", "statuses", multiple=True, type=click.Choice(("done", "dead", "cancelled")),
              default=("done",), show_default=True, help="Repeatable.")
@config_option
def jobs_purge(older_than: str, statuses: tuple[str, ...], config_path: str | None) -> None:
    """Delete finished jobs older than a retention. Example: cardq jobs purge --older-than 7d"""
    seconds = app.parse_duration(older_than)
    loaded = app.load(config_path)
    with app.open_db(loaded) as db:
        n = admin.purge(db, older_than_s=seconds, statuses=statuses)
    click.echo(f"purged {n} jobs ({', '.join(statuses)}) finished more than {older_than} ago")


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
    loaded = app.load(config_path)
    with app.open_db(loaded) as db:
        effective = db.read(lambda c: store_limits.effective(c, loaded.limit_values()))
    if as_json:
        emit_json({k: {"value": v.value, "source": v.source, "configured": v.configured}
                   for k, v in effective.items()})
    else:
        click.echo(render.limits_table(effective.values(), loaded.source))


@limits.command("set", context_settings={"ignore_unknown_options": True})  # so that "-1" is a value
@click.argument("key")
@click.argument("value")
@config_option
def limits_set(key: str, value: str, config_path: str | None) -> None:
    """Override a limit in the database; the next submit uses it. Example: cardq limits set daily.free 10"""
    loaded = app.load(config_path)
    number = store_limits.validate(loaded.limit_values(), key, value)
    with app.open_db(loaded) as db:
        db.write(lambda c: store_limits.set_override(c, key, number, time.time()), "limits set")
    value, source = loaded.limit_values()[key]
    click.echo(f"{key} = {number} (override; the {source} value is {value})")


@limits.command("unset")
@click.argument("key")
@config_option
def limits_unset(key: str, config_path: str | None) -> None:
    """Drop a limit's override: back to the config.toml (or built-in) value."""
    loaded = app.load(config_path)
    configured = loaded.limit_values()
    store_limits.check_key(configured, key)
    with app.open_db(loaded) as db:
        had = db.write(lambda c: store_limits.unset_override(c, key), "limits unset")
    value, source = configured[key]
    click.echo(f"{key} = {value} ({source}){'' if had else '; there was no override'}")


@cli.command(epilog=EXIT_CODES_HELP)
@click.option("--dir", "directory", default="demo", show_default=True, type=click.Path(file_okay=False),
              help="Folder for the demo's config and fresh database.")
@click.option("--items", "items_path", type=click.Path(exists=True, dir_okay=False),
              help="Items to submit (default: the bundled examples/cards.jsonl).")
def demo(directory: str, items_path: str | None) -> None:
    """Run cardq's main job end to end on the built-in defaults, in a fresh database under ./demo."""
    from cardq import demo as demo_mod

    demo_mod.run(Path(directory), Path(items_path) if items_path else None, click.echo)


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
    from cardq import running

    sys.exit(running.supervise(app.load(config_path), workers=workers, burst=burst))


@cli.command(epilog=EXIT_CODES_HELP)
@config_option
def reload(config_path: str | None) -> None:
    """Ask the running supervisor of this database to re-read its config (SIGHUP)."""
    from cardq import running

    pid = running.signal_supervisor(app.load(config_path), "SIGHUP")
    click.echo(f"sent SIGHUP to supervisor pid {pid}; see `cardq status` for the config in effect")


@cli.command(epilog=EXIT_CODES_HELP)
@click.option("--wait/--no-wait", default=True, show_default=True, help="Wait until it has exited.")
@config_option
def stop(wait: bool, config_path: str | None) -> None:
    """Ask the running supervisor of this database to stop after in-flight jobs (SIGTERM)."""
    from cardq import running

    loaded = app.load(config_path)
    pid = running.signal_supervisor(loaded, "SIGTERM")
    click.echo(f"sent SIGTERM to supervisor pid {pid}")
    if wait:
        running.wait_stopped(loaded, timeout=loaded.config.supervisor.shutdown_timeout_s + 30)
        click.echo("stopped")


@cli.command(epilog=EXIT_CODES_HELP)
@config_option
def selftest(config_path: str | None) -> None:
    """Check config, database and pragmas, schema, handler, free disk and supervisor; non-zero on a failure."""
    from cardq import selftest as st

    checks = st.run(config_path)
    for check in checks:
        click.echo(f"{'ok  ' if check.ok else 'FAIL'}  {check.name:<10}  {check.detail}")
    if not all(c.ok for c in checks):
        sys.exit(EXIT_FAILURE)


def _client(config_path: str | None):
    from actors.client import Client

    return Client.from_config(app.load(config_path), name="cli")


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
    with _client(config_path) as client:
        r = client.ratelimit.check(key, cost)
    if as_json:
        emit_json(r)
    else:
        click.echo(f"{'allowed' if r['allowed'] else 'DENIED'}: limit {r['limit']}, remaining {r['remaining']}, "
                   f"retry after {r['retry_after_s']:.3f}s, full again after {r['reset_after_s']:.3f}s")
    if not r["allowed"]:
        sys.exit(EXIT_LIMIT)


@cli.group(epilog=EXIT_CODES_HELP)
def counter() -> None:
    """Named counters, exactly once (usage:<user> is a user's jobs done today)."""


@counter.command("get")
@click.argument("key")
@config_option
def counter_get(key: str, config_path: str | None) -> None:
    """Print KEY's value. Example: cardq counter get usage:u42"""
    with _client(config_path) as client:
        click.echo(client.counter.get(key))


@counter.command("incr", context_settings={"ignore_unknown_options": True})
@click.argument("key")
@click.argument("n", default=1, type=int)
@click.option("--op-id", help="Makes a retry apply once: the same op id is never applied twice.")
@config_option
def counter_incr(key: str, n: int, op_id: str | None, config_path: str | None) -> None:
    """Add N (default 1) to KEY and print the new value. Example: cardq counter incr cards:made 5"""
    with _client(config_path) as client:
        click.echo(client.counter.incr(key, n, op_id))


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
    with _client(config_path) as client:
        event_id = client.events.record(path=path, status=status, response_ms=response_ms, method=method,
                                        client_ip=client_ip, request_id=request_id, bytes=size,
                                        idempotent_id=idempotent_id)
        client.events.flush()
        where = "collector" if client.events.sent else "inbox (the collector is not reachable)"
    click.echo(f"{event_id} -> {where}")


@cli.group(epilog=EXIT_CODES_HELP)
def diag() -> None:
    """Diagnostics of the running actors (the old /admin/diag)."""


@diag.command("gates")
@json_option
@config_option
def diag_gates(as_json: bool, config_path: str | None) -> None:
    """Each gate: active, queued, dropped_since_boot, avg/p95 wait, last drop, and the limits in effect."""
    with _client(config_path) as client:
        stats = client.ratelimit.gate_stats()
    if as_json:
        emit_json(stats)
    else:
        click.echo(render.gates(stats))


def main() -> None:
    cli(prog_name="cardq")


if __name__ == "__main__":
    main()
