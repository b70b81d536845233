// cardq from a Node app, over its HTTP API: a middleware that rate-limits each request by client IP and records it
// as a traffic event, and submitCards() for batches of cards. No dependencies: Node's global fetch (Node 18+).
// url and token default to the environment: CARDQ_URL (e.g. http://127.0.0.1:8787) and CARDQ_TOKEN (scope app).
import { randomUUID } from 'node:crypto';

/** POST JSON to cardq: a function (path, body) -> fetch's Response, made once with the url and token checked. */
function poster({ url = process.env.CARDQ_URL, token = process.env.CARDQ_TOKEN, timeoutMs = 2000 } = {}) {
  if (!url || !token) throw new Error('cardq: set CARDQ_URL and CARDQ_TOKEN (or pass { url, token })');
  const headers = { authorization: `Bearer ${token}`, 'content-type': 'application/json' };
  return (path, body) => fetch(url.replace(/\/$/, '') + path,
    { method: 'POST', headers, body: JSON.stringify(body), signal: AbortSignal.timeout(timeoutMs) });
}

/**
 * Express-style middleware, (req, res, next): app.use(cardqMiddleware()) or, with node:http, call it first.
 * Fail open, as the old gateway did: when cardq cannot answer (down, restarting, a timeout, a 5xx, a 401) the
 * request goes through unchecked, so the rate limiter never becomes the outage; that is logged once per outage, and
 * while it lasts cardq is asked at most once a second. failOpen: false answers 503 instead.
 * Events are kept in memory and sent every flushMs or batchSize events; a failed send is retried as it was: the
 * same ts_ms and request_id give the same event id, so cardq counts an event that did arrive once.
 * @param {{ url?: string, token?: string, failOpen?: boolean, timeoutMs?: number, flushMs?: number,
 *           batchSize?: number, maxBuffered?: number, log?: Pick<Console, 'info' | 'warn'> }} [opts]
 */
export function cardqMiddleware(opts = {}) {
  const { failOpen = true, flushMs = 1000, batchSize = 100, maxBuffered = 10_000, log = console } = opts;
  const post = poster(opts);
  let pending = [], downUntil = 0;
  const up = () => { if (downUntil) log.info('cardq: reachable again'); downUntil = 0; };
  const down = (err) => { // fetch's own message is "fetch failed"; the cause says why: connect ECONNREFUSED ...
    const why = err.cause?.message ?? err.message;
    if (!downUntil) log.warn(`cardq unavailable (${why}): ${failOpen ? 'requests pass unchecked' : 'answering 503'}`);
    downUntil = Date.now() + 1000;
  };
  async function flush() {
    const events = pending.splice(0, batchSize);
    if (!events.length) return;
    try {
      const r = await post('/v1/events', events);
      const text = await r.text();
      if (r.status >= 500 || r.status === 401 || r.status === 403) throw new Error(`HTTP ${r.status}`);
      if (!r.ok) log.warn(`cardq refused ${events.length} events: HTTP ${r.status} ${text}`); // a resend would be too
      up();
    } catch (err) {
      pending = events.concat(pending).slice(-maxBuffered); // for the next flush (the newest, if cardq is long away)
      down(err);
    }
  }
  const timer = setInterval(flush, flushMs);
  timer.unref();

  async function middleware(req, res, next) {
    const tsMs = Date.now(), started = performance.now();
    const ip = (req.ip ?? req.socket.remoteAddress ?? '').replace(/^::ffff:/, '');
    const given = req.headers['x-request-id'];
    const requestId = /^[\w.:-]{1,64}$/.test(given ?? '') ? given : randomUUID();
    res.setHeader('x-request-id', requestId);
    res.once('finish', () => {
      const path = (req.originalUrl ?? req.url).split('?')[0];
      if (path[0] !== '/' || res.statusCode > 599) return; // cardq would refuse the whole batch for it
      pending.push({ path, method: req.method, status: res.statusCode, response_ms: performance.now() - started,
        client_ip: ip, request_id: requestId, ts_ms: tsMs });
      if (pending.length > maxBuffered) pending.shift();
      if (pending.length >= batchSize && !downUntil) flush();
    });
    let r = null;
    if (downUntil <= Date.now()) {
      try {
        r = await post('/v1/ratelimit/check', { key: `ip:${ip}` });
        await r.arrayBuffer();
        if (r.status !== 200 && r.status !== 429) throw new Error(`HTTP ${r.status}`); // 401, 403, 503: no answer
        up();
      } catch (err) {
        r = null;
        down(err);
      }
    }
    if (!r && failOpen) return next();
    if (!r) {
      res.writeHead(503, { 'retry-after': '1', 'content-type': 'application/problem+json' });
      return res.end(JSON.stringify({ type: 'about:blank', title: 'Service Unavailable', status: 503 }));
    }
    for (const name of ['ratelimit-policy', 'ratelimit', 'retry-after']) {
      if (r.headers.has(name)) res.setHeader(name, r.headers.get(name));
    }
    if (r.status === 200) return next();
    res.writeHead(429, { 'content-type': 'application/problem+json' });
    res.end(JSON.stringify({ type: 'about:blank', title: 'Too Many Requests', status: 429,
      detail: `too many requests from ${ip}; retry in ${r.headers.get('retry-after')} s` }));
  }
  middleware.flush = flush;
  /** Stop the timer and send what is still pending (call it before the process exits). */
  middleware.close = async () => {
    clearInterval(timer);
    for (let rounds = Math.ceil(pending.length / batchSize); rounds > 0; rounds--) await flush();
  };
  return middleware;
}

/** A refusal by cardq: HTTP status, the RFC 9457 problem (type, detail, ...) and the request id to look up. */
export class CardqError extends Error {
  constructor(status, problem, headers) {
    super(problem.detail ?? `cardq answered HTTP ${status}`);
    this.name = 'CardqError';
    this.status = status;
    this.type = problem.type;
    this.problem = problem;
    this.requestId = headers.get('x-request-id');
  }
}

/** A limit refused the batch (nothing was submitted): which one, what it allows, and when to try again. */
export class CardqLimitError extends CardqError {
  constructor(status, problem, headers) {
    super(status, problem, headers);
    this.name = 'CardqLimitError';
    this.limit = problem.limit; // "daily.free", "batch_max_items_per_request", "batch_max_queued_per_user", ...
    this.allowed = problem.allowed;
    this.current = problem.current;
    this.requested = problem.requested;
    this.resetsAt = problem.resets_at ?? null; // epoch seconds (daily limits: the next midnight)
    this.retryAfterS = Number(headers.get('retry-after')) || null;
  }
}

/**
 * Submit a batch of cards for one user, all or nothing: POST /v1/jobs. Resolves to { ids, created, existing };
 * rejects with CardqLimitError when a limit refuses it, CardqError for any other refusal.
 * @param {{ user: string, plan: string, items: object[], kind?: string, priority?: number,
 *           idempotency_key_field?: string }} batch
 * @param {{ url?: string, token?: string, timeoutMs?: number }} [opts]
 */
export async function submitCards(batch, opts = {}) {
  const r = await poster({ timeoutMs: 30_000, ...opts })('/v1/jobs', batch);
  const body = await r.json().catch(() => ({}));
  if (r.ok) return body;
  const limited = r.status === 429 && body.type?.endsWith('/limit-exceeded');
  throw new (limited ? CardqLimitError : CardqError)(r.status, body, r.headers);
}
