"use strict";
// The live status page. Every 2 s it asks GET v1/status and GET v1/paths/top with a read token, and shows what
// `cardq status` prints in the terminal, in the same words. Every value from the server reaches the page as
// text (textContent, a text node, or an SVG attribute set to a number we computed): never as HTML, so a user
// name, a path or an error message cannot become markup.
(() => {
  const REFRESH_MS = 2000;
  const TIMEOUT_MS = 8000; // a request that takes longer counts as the server not answering
  const STALE_AFTER_S = 30; // as render.STALE_AFTER_S: the supervisor publishes at least every 10 s
  const TOKEN_KEY = "cardq.read_token";
  const $ = (id) => document.getElementById(id);

  let memoryToken = null; // when localStorage is unavailable (a private window may refuse it)
  let timer = null;
  let round = 0; // a newer round (a new token) makes an older answer arriving late be ignored
  let lastShownAt = null;
  let failingSince = null;

  // ---- the token ---------------------------------------------------------------------------------------------

  function readToken() {
    try {
      return localStorage.getItem(TOKEN_KEY) || memoryToken;
    } catch {
      return memoryToken;
    }
  }

  function keepToken(token) {
    memoryToken = token;
    try {
      if (token) localStorage.setItem(TOKEN_KEY, token);
      else localStorage.removeItem(TOKEN_KEY);
    } catch {
      // kept in memory only, for this tab
    }
  }

  // #token=... (a bookmark, a test): kept like a typed one, then removed from the address bar and the history.
  function takeTokenFromFragment() {
    const params = new URLSearchParams(location.hash.slice(1));
    const token = params.get("token");
    if (token === null) return;
    keepToken(token.trim());
    history.replaceState(null, "", location.pathname + location.search);
  }

  // ---- asking the server -------------------------------------------------------------------------------------

  class Refused extends Error {
    constructor(status, detail) {
      super(detail);
      this.status = status; // 0: no answer
    }
  }

  async function get(path, token) {
    const abort = new AbortController();
    const timeout = setTimeout(() => abort.abort(), TIMEOUT_MS);
    let resp;
    try {
      resp = await fetch(path, {headers: {Authorization: `Bearer ${token}`}, cache: "no-store", signal: abort.signal});
    } catch {
      throw new Refused(0, "the server did not answer");
    } finally {
      clearTimeout(timeout);
    }
    if (!resp.ok) {
      let detail = resp.statusText;
      try {
        detail = (await resp.json()).detail || detail; // an RFC 9457 problem
      } catch {
        // not JSON: a proxy's page
      }
      throw new Refused(resp.status, String(detail));
    }
    return resp.json();
  }

  async function refresh() {
    timer = null;
    const token = readToken();
    if (!token) {
      showLogin("");
      return;
    }
    const mine = round;
    try {
      const [status, top] = await Promise.all([get("v1/status?top=10", token), get("v1/paths/top?limit=10", token)]);
      if (mine !== round) return;
      render(status, top);
      lastShownAt = new Date();
      failingSince = null;
      setState("fresh", `updated ${clock(lastShownAt)}`);
      banner("");
    } catch (e) {
      if (mine !== round) return;
      if (!(e instanceof Refused)) throw e; // a bug of this page: the console has it
      if (e.status === 401 || e.status === 403) {
        const why = e.status === 401
          ? `The server refused the token (401): ${e.message}.`
          : `This token may not read the status (403): ${e.message}.`;
        showLogin(`${why} Enter a read token.`);
        return; // no retry with a token that cannot work
      }
      failingSince = failingSince || new Date();
      const what = e.status === 0
        ? `Cannot reach the server since ${clock(failingSince)}`
        : `The server answered ${e.status} since ${clock(failingSince)}: ${e.message}`;
      const shown = lastShownAt ? `the numbers below are from ${clock(lastShownAt)} (stale)` : "nothing to show yet";
      setState("stale", "stale");
      banner(`${what}; retrying every ${REFRESH_MS / 1000} s; ${shown}.`);
    }
    schedule();
  }

  function schedule() {
    if (timer === null) timer = setTimeout(refresh, REFRESH_MS);
  }

  function restart() {
    round += 1;
    clearTimeout(timer);
    timer = null;
    refresh();
  }

  // ---- page state --------------------------------------------------------------------------------------------

  function setState(state, text) {
    document.body.dataset.state = state;
    $("freshness").textContent = text;
    $("main").classList.toggle("stale", state !== "fresh");
  }

  function banner(text) {
    $("banner").textContent = text;
    $("banner").hidden = !text;
  }

  function showLogin(message) {
    banner(message);
    $("login").hidden = false;
    $("forget").hidden = true;
    setState(lastShownAt ? "login-stale" : "login", lastShownAt ? "stale" : "");
    $("token").focus();
  }

  // ---- building the page from data ---------------------------------------------------------------------------

  // A table: headers, and rows of [key, cells]; each row carries data-key, each cell data-col (its header).
  function fillTable(id, headers, rows) {
    const head = document.createElement("tr");
    for (const h of headers) head.append(element("th", h));
    const body = document.createElement("tbody");
    for (const [key, cells] of rows) {
      const tr = document.createElement("tr");
      tr.dataset.key = String(key);
      cells.forEach((value, i) => {
        const td = element("td", cell(value));
        td.dataset.col = headers[i];
        if (typeof value === "number") td.className = "n";
        tr.append(td);
      });
      body.append(tr);
    }
    const thead = document.createElement("thead");
    thead.append(head);
    $(id).replaceChildren(thead, body);
    $(id).hidden = rows.length === 0;
  }

  function element(tag, text, className) {
    const node = document.createElement(tag);
    node.textContent = text;
    if (className) node.className = className;
    return node;
  }

  function cell(value) {
    if (value === null || value === undefined) return "-";
    if (typeof value === "number" && !Number.isInteger(value)) return value.toFixed(1);
    return String(value);
  }

  function age(seconds) { // as render.age
    if (seconds === null || seconds === undefined) return "-";
    for (const [unit, size] of [["d", 86400], ["h", 3600], ["m", 60]]) {
      if (seconds >= size) return `${(seconds / size).toFixed(1)}${unit}`;
    }
    return `${seconds.toFixed(1)}s`;
  }

  const pad = (n) => String(n).padStart(2, "0");

  function clock(date) {
    return `${pad(date.getHours())}:${pad(date.getMinutes())}:${pad(date.getSeconds())}`;
  }

  function when(epochSeconds) { // as render's "%Y-%m-%d %H:%M:%S", local time
    const d = new Date(epochSeconds * 1000);
    return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())} ${clock(d)}`;
  }

  function render(s, top) {
    $("main").hidden = false;
    $("login").hidden = true;
    $("forget").hidden = false;
    $("database").textContent = `database ${s.database}`;
    renderQueue(s);
    renderThroughput(s.throughput);
    renderSupervisor(s.supervisor);
    renderGates(s.gates);
    renderPaths(top);
    fillTable("users-table", ["user", "queued", "processing"], s.users.map((u) => [u.user_id,
      [u.user_id, u.queued, u.processing]]));
    $("users-note").textContent = s.users.length ? "" : "no user has jobs queued or processing";
    fillTable("limits-table", ["limit", "value", "source"], Object.entries(s.limits).map(([k, v]) => [k,
      [k, v.value, v.source]]));
    renderConfig(s);
  }

  function renderQueue(s) {
    fillTable("jobs-table", ["status", "jobs"], Object.entries(s.jobs).map(([k, n]) => [k, [k, n]]));
    $("queue-oldest").textContent =
      `oldest queued job: ${age(s.oldest_queued_age_s)} · expired leases: ${s.expired_leases}`;
    const t = s.today;
    $("queue-today").textContent =
      `today (${t.day} ${t.timezone}): done ${t.done}, failed attempts ${t.failed_attempts}, dead ${t.dead}`;
  }

  function renderSupervisor(sup) {
    if (!sup.running) {
      $("supervisor-line").textContent = "supervisor: not running";
    } else {
      $("supervisor-line").textContent =
        `supervisor: pid ${sup.pid}, up ${age(sup.uptime_s)}, workers ${sup.workers_desired}`;
    }
    fillTable("workers-table", ["worker", "pid", "state", "job", "done", "restarts", "last exit"],
      sup.workers.map((w) => [w.name, [w.name, w.pid, w.state, w.current_job, w.jobs_done, w.restarts,
        w.last_exit]]));
    $("supervisor-note").textContent = sup.running && sup.heartbeat_age_s > STALE_AFTER_S
      ? `(as published ${age(sup.heartbeat_age_s)} ago: the supervisor has not been able to write since; see its ` +
        "log and the warnings below)"
      : "";
  }

  function renderGates(gates) {
    const note = gates === null ? "no supervisor runs: no gate is open"
      : typeof gates === "string" ? gates
        : Object.keys(gates).length === 0 ? "no gates configured" : "";
    const rows = gates && typeof gates === "object" ? Object.entries(gates) : [];
    fillTable("gates-table", ["gate", "active", "limit", "queued", "max_queue", "dropped", "p95_wait_ms"],
      rows.map(([name, g]) => [name, [name, g.active, gateLimit(g), g.queued, g.max_queue, g.dropped_since_boot,
        g.p95_wait_ms]]));
    $("gates-note").textContent = note;
  }

  function gateLimit(g) { // as render._limit: "6 (1-16, adaptive)"
    return g.adaptive ? `${g.limit} (${g.min_concurrency}-${g.max_concurrency}, adaptive)` : g.max_concurrency;
  }

  function renderPaths(top) {
    const approx = (n, estimated) => (estimated ? `~${Math.round(n)}` : Math.round(n));
    fillTable("paths-table", ["path", "requests", "4xx", "5xx", "p95_ms"], top.paths.map((p) => [p.path,
      [p.path, approx(p.requests, p.estimated), approx(p.status_4xx, p.estimated),
        approx(p.status_5xx, p.estimated), p.p95_ms]]));
    $("paths-note").textContent = top.paths.length ? "" : `no requests recorded since ${when(top.hour)}`;
  }

  function renderConfig(s) {
    const sup = s.supervisor;
    const rows = [];
    if (sup.running) {
      rows.push(["file", sup.config_file], ["digest", sup.config_digest], ["version", sup.config_version],
        ["loaded", when(sup.config_loaded_at)],
        ["last reload", sup.last_reload_at ? when(sup.last_reload_at) : "none since the supervisor started"]);
    } else {
      rows.push(["file", s.config.file], ["digest", s.config.digest], ["supervisor", "not running"]);
    }
    const list = $("config-list");
    list.replaceChildren();
    for (const [k, v] of rows) {
      const dd = element("dd", cell(v));
      dd.dataset.key = k;
      list.append(element("dt", k), dd);
    }
    const errors = [];
    if (sup.running && sup.last_reload_error) {
      errors.push(`LAST RELOAD FAILED (old config kept): ${sup.last_reload_error}`);
    }
    if (s.config.error) errors.push(`config.toml as read now: INVALID: ${s.config.error}`);
    $("config-error").textContent = errors.join("\n");
    $("warnings").replaceChildren(...(s.warnings || []).map((w) => element("li", `WARNING: ${w}`)));
  }

  // ---- the chart: one bar per minute, done below and dead above it; drawn here, no library -------------------

  const SVG = "http://www.w3.org/2000/svg";
  const CHART = {width: 600, height: 130, top: 16, bottom: 18};

  function svg(tag, attrs, text) {
    const node = document.createElementNS(SVG, tag);
    for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, String(v));
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function renderThroughput(t) {
    const chart = $("chart");
    const n = t.done.length;
    const totals = t.done.map((d, i) => d + t.dead[i] + t.cancelled[i]);
    const most = Math.max(0, ...totals);
    const peak = Math.max(1, most);
    const plotH = CHART.height - CHART.top - CHART.bottom;
    const step = CHART.width / n;
    const y = (v) => (v / peak) * plotH;
    const nodes = [svg("line", {x1: 0, x2: CHART.width, y1: CHART.top + plotH, y2: CHART.top + plotH,
      class: "axis"})];
    totals.forEach((total, i) => {
      if (total === 0) return;
      const x = i * step + 1;
      const w = Math.max(1, step - 2);
      let base = CHART.top + plotH;
      const bar = svg("g", {});
      for (const [status, cls] of [["done", "done"], ["dead", "dead"], ["cancelled", "cancelled"]]) {
        const h = y(t[status][i]);
        if (h <= 0) continue;
        base -= h;
        bar.append(svg("rect", {x, y: base, width: w, height: h, class: cls}));
      }
      const start = new Date((t.since + i * t.minute_s) * 1000);
      bar.append(svg("title", {}, `${clock(start).slice(0, 5)}: ${t.done[i]} done, ${t.dead[i]} dead, ` +
        `${t.cancelled[i]} cancelled`));
      nodes.push(bar);
    });
    nodes.push(svg("text", {x: 0, y: 11, class: "label"}, `peak ${most}/min`),
      svg("text", {x: 0, y: CHART.height - 4, class: "label"}, `${n} min ago`),
      svg("text", {x: CHART.width, y: CHART.height - 4, class: "label end"}, "now"));
    chart.replaceChildren(...nodes);
    const sum = (xs) => xs.reduce((a, b) => a + b, 0);
    $("throughput-total").textContent = `last hour: ${sum(t.done)} done, ${sum(t.dead)} dead, ` +
      `${sum(t.cancelled)} cancelled`;
  }

  // ---- start ---------------------------------------------------------------------------------------------------

  $("login").addEventListener("submit", (event) => {
    event.preventDefault();
    const token = $("token").value.trim();
    if (!token) return;
    keepToken(token);
    $("token").value = "";
    $("login").hidden = true;
    banner("");
    restart();
  });
  $("forget").addEventListener("click", () => {
    keepToken(null);
    round += 1;
    clearTimeout(timer);
    timer = null;
    showLogin("The token was forgotten by this browser.");
  });
  window.addEventListener("hashchange", () => {
    if (new URLSearchParams(location.hash.slice(1)).has("token")) {
      takeTokenFromFragment();
      restart();
    }
  });
  takeTokenFromFragment();
  refresh();
})();
