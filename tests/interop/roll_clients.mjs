// A crowd of official socket.io-client sockets and a steady publisher, for a rolling restart
// behind a load balancer (tests/test_rolling_restart.py, benchmarks/storm.py).
//
// Protocol (as mi_clients.mjs): one JSON command per line on stdin, {"id": N, "cmd": "...", ...};
// one answer per command on stdout, {"id": N, "ok": true, "result": ...} or
// {"id": N, "ok": false, "error": "..."}. The process ends when stdin closes.
//
// Commands:
//   open {url, token, clients, rooms, pollingEvery, concurrency, timeoutMs}
//       connect `clients` sockets (reconnection on, cookies kept for the balancer's stickiness;
//       every `pollingEvery`-th one polling-only, the others WebSocket-only), client i in room
//       `roll:${i % rooms}`, each joined (acked) -> {connected, websocket, polling, ms}
//   publish {url, apiKey, perRoomPerSecond}
//       publish {seq} to every room, one at a time per room (each waits for the previous one's
//       answer, so a room's seq order is its offset order), retrying a failed request with the
//       same idempotency key -> {}
//   status {} -> {connected, disconnected, moves, published, ...} (cheap, for polling)
//   stopPublishing {} -> {published: {room: last seq}, requests, retries, failures}
//   settle {timeoutMs} -> once every socket is connected and has the last seq of its room (or at
//       the deadline): the verdict, see `verdict()`
import { createInterface } from "node:readline";
import { io } from "socket.io-client";

const clients = [];
const publisher = { running: false, last: new Map(), requests: 0, retries: 0, failures: {}, loops: [] };

function write(line) {
  process.stdout.write(`${JSON.stringify(line)}\n`);
}

function sleep(ms) {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

function count(table, key) {
  table[key] = (table[key] ?? 0) + 1;
}

class Client {
  constructor(index, room, transport, url, token) {
    this.index = index;
    this.room = room;
    this.transport = transport;
    this.seqs = [];
    this.marks = []; // connects before each seq: where in the client's life it came
    this.connects = [];
    this.disconnects = {};
    this.connectErrors = 0;
    this.joined = false;
    this.socket = io(url, {
      forceNew: true,
      transports: [transport],
      withCredentials: true, // a cookie jar: the balancer's stickiness cookie comes back
      reconnection: true,
      reconnectionDelay: 1_000,
      reconnectionDelayMax: 5_000,
      timeout: 10_000,
      auth: { token },
    });
    this.socket.on("tick", (data) => {
      this.seqs.push(data.seq);
      this.marks.push(this.connects.length);
    });
    this.socket.on("connect", () => {
      this.connects.push({ id: this.socket.id, recovered: this.socket.recovered === true });
    });
    this.socket.on("disconnect", (reason) => count(this.disconnects, reason));
    this.socket.on("connect_error", () => {
      this.connectErrors += 1;
    });
  }

  async join() {
    const answer = await this.socket.timeout(20_000).emitWithAck("join", this.room);
    if (answer?.ok !== true) {
      throw new Error(`client ${this.index} joining ${this.room}: ${JSON.stringify(answer)}`);
    }
    this.joined = true;
  }

  firstConnect(timeoutMs) {
    return new Promise((resolve, reject) => {
      if (this.socket.connected) {
        resolve();
        return;
      }
      const timer = setTimeout(
        () => reject(new Error(`client ${this.index}: no connect within ${timeoutMs} ms`)),
        timeoutMs,
      );
      this.socket.once("connect", () => {
        clearTimeout(timer);
        resolve();
      });
    });
  }

  /** What went wrong with this client's stream of seqs, given the room's last seq. */
  check(last) {
    const seen = new Uint16Array(last + 2);
    let duplicates = 0;
    let reordered = 0;
    let previous = 0;
    const where = [];
    for (const [i, seq] of this.seqs.entries()) {
      if (seq > last || seq < 1) {
        reordered += 1; // nothing outside 1..last was ever published
        continue;
      }
      if (seen[seq] > 0) {
        duplicates += 1;
        where.push({ duplicate: seq, at: i, connection: this.marks[i] });
      } else if (seq < previous) {
        reordered += 1;
        where.push({ reordered: seq, at: i, connection: this.marks[i] });
      }
      seen[seq] += 1;
      previous = Math.max(previous, seq);
    }
    let missing = 0;
    for (let seq = 1; seq <= last; seq += 1) {
      if (seen[seq] === 0) {
        missing += 1;
      }
    }
    return { duplicates, reordered, missing, where: where.slice(0, 5) };
  }
}

async function inBatches(items, size, body) {
  for (let start = 0; start < items.length; start += size) {
    await Promise.all(items.slice(start, start + size).map(body));
  }
}

async function publishLoop(url, apiKey, room, intervalMs) {
  let seq = 0;
  let next = performance.now();
  while (publisher.running) {
    seq += 1;
    const body = JSON.stringify({ room, event: "tick", data: { seq }, idempotency_key: `${room}:${seq}` });
    for (;;) {
      publisher.requests += 1;
      try {
        const response = await fetch(`${url}/api/v1/publish`, {
          method: "POST",
          headers: { Authorization: `Bearer ${apiKey}`, "Content-Type": "application/json" },
          body,
          signal: AbortSignal.timeout(5_000),
        });
        await response.arrayBuffer();
        if (response.status === 202 || response.status === 200) {
          break;
        }
        count(publisher.failures, `http_${response.status}`);
      } catch (error) {
        count(publisher.failures, error?.cause?.code ?? error?.name ?? "error");
      }
      publisher.retries += 1;
      await sleep(50);
    }
    publisher.last.set(room, seq);
    next += intervalMs;
    await sleep(Math.max(0, next - performance.now()));
  }
}

function status() {
  let connected = 0;
  let moves = 0;
  let notRecovered = 0;
  let connectErrors = 0;
  for (const c of clients) {
    connected += c.socket.connected ? 1 : 0;
    moves += Math.max(0, c.connects.length - 1);
    notRecovered += c.connects.slice(1).filter((x) => !x.recovered).length;
    connectErrors += c.connectErrors;
  }
  let published = 0;
  for (const seq of publisher.last.values()) {
    published += seq;
  }
  return {
    clients: clients.length,
    connected,
    disconnected: clients.length - connected,
    moves,
    notRecovered,
    connectErrors,
    published,
    publishRetries: publisher.retries,
  };
}

function verdict() {
  const totals = {
    clients: clients.length,
    websocket: 0,
    polling: 0,
    connected: 0,
    moved: 0,
    moves: 0,
    movedNotRecovered: 0,
    idChanged: 0,
    connectErrors: 0,
    published: 0,
    expected: 0,
    received: 0,
    missing: 0,
    duplicates: 0,
    reordered: 0,
    disconnects: {},
  };
  const bad = [];
  for (const [, seq] of publisher.last) {
    totals.published += seq;
  }
  for (const c of clients) {
    totals[c.transport] += 1;
    totals.connected += c.socket.connected ? 1 : 0;
    const moves = c.connects.length - 1;
    totals.moves += Math.max(0, moves);
    totals.moved += moves > 0 ? 1 : 0;
    const again = c.connects.slice(1);
    const notRecovered = again.filter((x) => !x.recovered).length;
    totals.movedNotRecovered += notRecovered > 0 ? 1 : 0;
    totals.idChanged += again.some((x) => x.id !== c.connects[0].id) ? 1 : 0;
    totals.connectErrors += c.connectErrors;
    for (const [reason, n] of Object.entries(c.disconnects)) {
      totals.disconnects[reason] = (totals.disconnects[reason] ?? 0) + n;
    }
    const last = publisher.last.get(c.room) ?? 0;
    const found = c.check(last);
    totals.expected += last;
    totals.received += c.seqs.length;
    totals.missing += found.missing;
    totals.duplicates += found.duplicates;
    totals.reordered += found.reordered;
    if (found.missing || found.duplicates || found.reordered || notRecovered || !c.socket.connected) {
      if (bad.length < 5) {
        bad.push({
          index: c.index,
          transport: c.transport,
          room: c.room,
          connected: c.socket.connected,
          connects: c.connects,
          disconnects: c.disconnects,
          last,
          ...found,
          around: found.where.length
            ? c.seqs.slice(Math.max(0, found.where[0].at - 6), found.where[0].at + 4)
            : c.seqs.slice(-10),
        });
      }
    }
  }
  return { totals, bad };
}

const commands = {
  async open({ url, token, clients: n, rooms, pollingEvery, concurrency = 100, timeoutMs = 60_000 }) {
    const started = performance.now();
    const fresh = [];
    for (let i = 0; i < n; i += 1) {
      const transport = pollingEvery > 0 && i % pollingEvery === 0 ? "polling" : "websocket";
      fresh.push({ index: i, room: `roll:${i % rooms}`, transport });
    }
    await inBatches(fresh, concurrency, async ({ index, room, transport }) => {
      const c = new Client(index, room, transport, url, token);
      clients.push(c);
      await c.firstConnect(timeoutMs);
      await c.join();
    });
    const counts = status();
    return {
      connected: counts.connected,
      websocket: clients.filter((c) => c.transport === "websocket").length,
      polling: clients.filter((c) => c.transport === "polling").length,
      ms: Math.round(performance.now() - started),
    };
  },

  async publish({ url, apiKey, perRoomPerSecond }) {
    if (publisher.running) {
      throw new Error("already publishing");
    }
    publisher.running = true;
    const rooms = [...new Set(clients.map((c) => c.room))];
    for (const room of rooms) {
      publisher.last.set(room, 0);
      publisher.loops.push(publishLoop(url, apiKey, room, 1000 / perRoomPerSecond));
    }
    return { rooms: rooms.length };
  },

  async status() {
    return status();
  },

  async stopPublishing() {
    publisher.running = false;
    await Promise.all(publisher.loops);
    return {
      published: Object.fromEntries(publisher.last),
      requests: publisher.requests,
      retries: publisher.retries,
      failures: publisher.failures,
    };
  },

  async settle({ timeoutMs = 30_000 }) {
    const deadline = performance.now() + timeoutMs;
    const done = () =>
      clients.every(
        (c) => c.socket.connected && c.seqs.at(-1) === (publisher.last.get(c.room) ?? 0),
      );
    while (!done() && performance.now() < deadline) {
      await sleep(100);
    }
    return { settled: done(), ...verdict() };
  },
};

async function handle(line) {
  let id = null;
  try {
    const command = JSON.parse(line);
    id = command.id;
    const run = commands[command.cmd];
    if (!run) {
      throw new Error(`unknown command ${JSON.stringify(command.cmd)}`);
    }
    write({ id, ok: true, result: (await run(command)) ?? null });
  } catch (error) {
    write({ id, ok: false, error: String(error?.stack ?? error) });
  }
}

const lines = createInterface({ input: process.stdin });
lines.on("line", (line) => {
  if (line.trim()) {
    handle(line);
  }
});
lines.on("close", () => process.exit(0));
