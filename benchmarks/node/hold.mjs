// Holds many Socket.IO clients open, for benchmarks/admin_ui.py: each speaks Engine.IO v4 over
// WebSocket itself (./rawws.mjs), connects the main namespace with a JWT and joins one room.
// While holding, it can churn (close one client and open a new one, N per second) and send
// client events (an event no handler takes, N per second), as set on stdin.
//
//   node hold.mjs --url http://127.0.0.1:8000 --token JWT --clients 10000 --rooms 1000
//
// stdout, one JSON object per line: {"ready": n, "ms": ...} once every client joined, then
// {"rates": {...}} after each stdin line ({"churn": per_s, "events": per_s}), and
// {"done": {...}} when stdin closes (the clients are closed first).
import { createInterface } from "node:readline";
import { parseArgs } from "node:util";
import { RawWebSocket } from "./rawws.mjs";

const { values } = parseArgs({
  options: {
    url: { type: "string", default: "http://127.0.0.1:8000" },
    token: { type: "string", default: "" },
    clients: { type: "string", default: "1000" },
    rooms: { type: "string", default: "100" },
    concurrency: { type: "string", default: "200" },
  },
});
const url = new URL(values.url);
const wsUrl = `ws://${url.host}/socket.io/?EIO=4&transport=websocket`;
const total = Number(values.clients);
const rooms = Number(values.rooms);
const concurrency = Number(values.concurrency);

function out(value) {
  process.stdout.write(`${JSON.stringify(value)}\n`);
}

let opened = 0;
let failed = 0;
let closed = 0;
let eventsSent = 0;

/** One client: resolves once it joined its room. */
function open(index) {
  return new Promise((resolve, reject) => {
    const room = `bench:room-${index % rooms}`;
    const client = { ws: null, index, joined: false };
    const timer = setTimeout(() => reject(new Error(`client ${index}: no join within 30 s`)), 30_000);
    client.ws = new RawWebSocket(wsUrl, {
      onOpen: () => undefined,
      onMessage: (data) => {
        const text = typeof data === "string" ? data : data.toString("utf8");
        if (text === "2") {
          client.ws.send("3");
        } else if (text.startsWith("0")) {
          client.ws.send(`40${JSON.stringify({ token: values.token })}`);
        } else if (text.startsWith("40")) {
          client.ws.send(`421${JSON.stringify(["join", room])}`);
        } else if (text.startsWith("431") && !client.joined) {
          client.joined = true;
          clearTimeout(timer);
          opened += 1;
          resolve(client);
        } else if (text.startsWith("44")) {
          clearTimeout(timer);
          reject(new Error(`client ${index}: connect_error ${text}`));
        }
      },
      onClose: (code, reason, err) => {
        if (!client.joined) {
          clearTimeout(timer);
          reject(err ?? new Error(`client ${index}: closed (${code} ${reason})`));
        }
      },
    });
  });
}

const live = [];
const started = Date.now();
let next = 0;
async function worker() {
  while (next < total) {
    const index = next++;
    try {
      live.push(await open(index));
    } catch (error) {
      failed += 1;
      process.stderr.write(`${error.message}\n`);
    }
  }
}
await Promise.all(Array.from({ length: concurrency }, worker));
out({ ready: live.length, failed, ms: Date.now() - started });

let churnTimer = null;
let eventTimer = null;
let counter = total;

function every(perSecond, action) {
  if (!perSecond) {
    return null;
  }
  const period = 1000 / perSecond;
  let due = Date.now();
  return setInterval(() => {
    while (Date.now() >= due) {
      due += period;
      action();
    }
  }, Math.max(Math.min(period, 50), 5));
}

function churn() {
  const position = Math.floor(Math.random() * live.length);
  const [gone] = live.splice(position, 1);
  if (gone) {
    gone.ws.send("41");
    gone.ws.terminate();
    closed += 1;
  }
  open(counter++).then(
    (client) => live.push(client),
    (error) => {
      failed += 1;
      process.stderr.write(`${error.message}\n`);
    },
  );
}

function sendEvent() {
  const client = live[Math.floor(Math.random() * live.length)];
  if (client) {
    client.ws.send(`42${JSON.stringify(["bench:note", { n: eventsSent }])}`);
    eventsSent += 1;
  }
}

const input = createInterface({ input: process.stdin });
input.on("line", (line) => {
  const rates = JSON.parse(line);
  clearInterval(churnTimer);
  clearInterval(eventTimer);
  churnTimer = every(rates.churn ?? 0, churn);
  eventTimer = every(rates.events ?? 0, sendEvent);
  out({ rates });
});
input.on("close", () => {
  clearInterval(churnTimer);
  clearInterval(eventTimer);
  for (const client of live) {
    client.ws.terminate();
  }
  out({ done: { live: live.length, opened, closed, failed, eventsSent } });
  process.exit(0);
});
