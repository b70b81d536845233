// Submit a batch of cards for one user from a JSON Lines file (one item per line), or from stdin:
//   node submit.js --user u42 --plan basic items.jsonl
// Prints {"ids", "created", "existing"}; when a limit refuses the batch (nothing is submitted), prints the limit
// and exits 2. Env: CARDQ_URL, CARDQ_TOKEN (scope app).
import { readFileSync } from 'node:fs';
import { parseArgs } from 'node:util';
import { CardqError, CardqLimitError, submitCards } from './cardq.js';

const { values, positionals } = parseArgs({
  options: { user: { type: 'string' }, plan: { type: 'string', default: 'free' } }, allowPositionals: true,
});
const lines = readFileSync(positionals[0] ?? 0, 'utf8').split('\n').filter((line) => line.trim());
const items = lines.map((line) => JSON.parse(line));

try {
  console.log(JSON.stringify(await submitCards({ user: values.user, plan: values.plan, items })));
} catch (err) {
  if (err instanceof CardqLimitError) {
    const { name, limit, allowed, current, requested, resetsAt, retryAfterS } = err;
    console.log(JSON.stringify({ error: name, limit, allowed, current, requested, resetsAt, retryAfterS }));
    console.error(`refused: ${err.message}`);
    process.exit(2);
  }
  if (!(err instanceof CardqError)) throw err; // not an answer from cardq: unreachable, a timeout
  console.error(`cardq refused the batch (HTTP ${err.status}, request ${err.requestId}): ${err.message}`);
  process.exit(1);
}
