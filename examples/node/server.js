// A tiny Node app behind cardq: every request is rate-limited by client IP and recorded as a traffic event.
// Plain node:http; the middleware has Express's (req, res, next) signature, so with Express it is app.use(cardq).
// Env: CARDQ_URL, CARDQ_TOKEN (scope app), PORT (3000; 0: any free port), HOST (127.0.0.1).
import http from 'node:http';
import { cardqMiddleware } from './cardq.js';

const cardq = cardqMiddleware();

const server = http.createServer((req, res) => cardq(req, res, () => {
  res.writeHead(200, { 'content-type': 'application/json' });
  res.end(JSON.stringify({ hello: 'from node', path: req.url }));
}));

server.listen(Number(process.env.PORT ?? 3000), process.env.HOST ?? '127.0.0.1', () => {
  const { address, port } = server.address();
  console.log(`listening on http://${address}:${port}`);
});

for (const signal of ['SIGINT', 'SIGTERM']) {
  process.once(signal, async () => {
    server.close();
    await cardq.close(); // the events still in memory
    process.exit(0);
  });
}
