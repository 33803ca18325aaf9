// Load generator for the Roomcast benchmark harness.
//
// Opens N websocket connections speaking Engine.IO v4 / Socket.IO v5 framing
// itself (on a minimal WebSocket client, ./rawws.mjs; no socket.io-client), joins each one to a
// room with an acknowledged `join` event, publishes timestamped events through
// the server's HTTP publish API (POST /api/v1/publish), and measures
// publish->client latency, throughput and loss.
//
// Phases (stdout lines; with --sync it waits for one stdin line after each so
// the driver can sample the server's /proc counters at the boundaries):
//   PHASE pre-connect   server idle, nothing connected yet
//   PHASE connected     all clients connected and joined, nothing published
//   PHASE drained       publishing finished and deliveries drained
//   RESULT {...}        one JSON line with all measurements
// Diagnostics go to stderr.
//
// Clock: every timestamp is performance.timeOrigin + performance.now() (absolute
// ms with sub-ms resolution), so the publisher and receivers share one clock
// even when receivers live in forked shard processes (--procs > 1).

import { fork } from "node:child_process";
import { createHmac } from "node:crypto";
import http from "node:http";
import { monitorEventLoopDelay, performance } from "node:perf_hooks";
import readline from "node:readline";
import { fileURLToPath } from "node:url";
import { parseArgs } from "node:util";
import { RawWebSocket } from "./rawws.mjs";

const SELF = fileURLToPath(import.meta.url);
const MAX_SAMPLES = 20;
const FULL_PARSE_MASK = 15; // fully JSON.parse one event frame in 16

function now() {
  return performance.timeOrigin + performance.now();
}

function log(msg) {
  process.stderr.write(`[loadgen ${process.pid}] ${msg}\n`);
}

function truncate(text, n = 300) {
  return text.length > n ? `${text.slice(0, n)}...(${text.length} bytes)` : text;
}

// ---------------------------------------------------------------------------
// Latency histogram: 1 us buckets below 1 ms, then log buckets 0.5 % wide.

const LINEAR_US = 1000;
const LOG_BASE = Math.log(1.005);
const N_BUCKETS = LINEAR_US + 2400; // covers > 100 s

function bucketOf(us) {
  if (us < LINEAR_US) return us;
  const idx = LINEAR_US + Math.floor(Math.log(us / LINEAR_US) / LOG_BASE);
  return idx < N_BUCKETS ? idx : N_BUCKETS - 1;
}

function bucketValueUs(idx) {
  if (idx < LINEAR_US) return idx;
  return LINEAR_US * Math.pow(1.005, idx - LINEAR_US + 0.5);
}

class Histogram {
  constructor() {
    this.counts = new Float64Array(N_BUCKETS);
    this.total = 0;
    this.sumMs = 0;
    this.maxMs = 0;
    this.negative = 0;
  }

  record(ms) {
    if (ms < 0) {
      this.negative += 1;
      ms = 0;
    }
    this.counts[bucketOf(Math.round(ms * 1000))] += 1;
    this.total += 1;
    this.sumMs += ms;
    if (ms > this.maxMs) this.maxMs = ms;
  }

  toJSON() {
    const sparse = [];
    for (let i = 0; i < N_BUCKETS; i++) if (this.counts[i] > 0) sparse.push([i, this.counts[i]]);
    return {
      sparse,
      total: this.total,
      sumMs: this.sumMs,
      maxMs: this.maxMs,
      negative: this.negative,
    };
  }

  merge(obj) {
    for (const [i, c] of obj.sparse) this.counts[i] += c;
    this.total += obj.total;
    this.sumMs += obj.sumMs;
    this.negative += obj.negative;
    if (obj.maxMs > this.maxMs) this.maxMs = obj.maxMs;
  }

  percentile(p) {
    if (this.total === 0) return null;
    const rank = Math.max(1, Math.ceil(p * this.total));
    let cum = 0;
    for (let i = 0; i < N_BUCKETS; i++) {
      cum += this.counts[i];
      if (cum >= rank) return Math.min(bucketValueUs(i) / 1000, this.maxMs);
    }
    return this.maxMs;
  }
}

// ---------------------------------------------------------------------------
// One Engine.IO/Socket.IO client connection.

function b64url(data) {
  return Buffer.from(data).toString("base64url");
}

/** An HS256 JWT for `sub`, allowed to join every bench room, valid for an hour. */
function mintToken(secret, sub) {
  const head = b64url(JSON.stringify({ alg: "HS256", typ: "JWT" }));
  const exp = Math.floor(Date.now() / 1000) + 3600;
  const body = b64url(JSON.stringify({ sub, rooms: ["bench:*"], exp }));
  const sig = createHmac("sha256", secret).update(`${head}.${body}`).digest("base64url");
  return `${head}.${body}.${sig}`;
}

class Client {
  constructor(shard, index, room) {
    this.shard = shard;
    this.index = index;
    this.room = room;
    this.ws = null;
    this.sid = null;
    this.nextAckId = 0;
    this.pendingAcks = new Map();
    this.seen = new Uint8Array(64); // bitmap of received seq numbers
    this.connected = false;
    this.joined = false;
    this.closed = false;
    this.onConnect = null;
  }

  connect() {
    const cfg = this.shard.cfg;
    return new Promise((resolve, reject) => {
      let settled = false;
      const finish = (err) => {
        if (settled) return;
        settled = true;
        clearTimeout(timer);
        this.onConnect = null;
        if (err) {
          try {
            this.ws?.terminate();
          } catch {
            // ignore
          }
          reject(err);
        } else {
          resolve();
        }
      };
      const timer = setTimeout(
        () => finish(new Error(`connect timeout after ${cfg.connectTimeoutMs} ms`)),
        cfg.connectTimeoutMs,
      );
      this.onConnect = finish;
      try {
        this.ws = new RawWebSocket(
          this.shard.wsUrl,
          {
            onOpen: () => undefined,
            onMessage: (data, isBinary) => this.onFrame(data, isBinary),
            onClose: (code, reason, err) => {
              this.closed = true;
              if (!this.connected) {
                finish(err ?? new Error(`closed before connect (code ${code} ${reason})`));
              } else if (!this.shard.closing) {
                this.shard.disconnects += 1;
                const why = err ? `error ${String(err?.message ?? err)}` : `code=${code} ${reason}`;
                this.shard.sample("closed", this.index, `websocket closed: ${why}`);
              }
            },
          },
          { handshakeTimeoutMs: cfg.connectTimeoutMs },
        );
      } catch (err) {
        finish(err);
      }
    });
  }

  send(text) {
    this.ws?.send(text);
  }

  emitWithAck(args, timeoutMs) {
    const id = this.nextAckId++;
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this.pendingAcks.delete(id);
        reject(new Error(`ack ${id} timeout after ${timeoutMs} ms`));
      }, timeoutMs);
      this.pendingAcks.set(id, (ackArgs, raw) => {
        clearTimeout(timer);
        resolve({ ackArgs, raw });
      });
      this.send(`42${id}${JSON.stringify(args)}`);
    });
  }

  onFrame(data, isBinary) {
    const shard = this.shard;
    if (isBinary) {
      shard.sample("binary-frame", this.index, `binary frame of ${data.length} bytes`);
      return;
    }
    const text = typeof data === "string" ? data : data.toString("utf8");
    shard.recordFirstFrame(this.index, text);
    const type = text.charCodeAt(0);
    switch (type) {
      case 0x34: // '4' message -> socket.io packet
        this.onSocketIoPacket(text);
        return;
      case 0x32: // '2' ping
        if (text.length === 1) this.send("3");
        else shard.sample("bad-ping", this.index, text);
        return;
      case 0x30: {
        // '0' open
        let open;
        try {
          open = JSON.parse(text.slice(1));
        } catch {
          shard.sample("bad-open", this.index, text);
          this.onConnect?.(new Error(`unparseable open packet: ${truncate(text)}`));
          return;
        }
        if (typeof open?.sid !== "string") shard.sample("open-without-sid", this.index, text);
        shard.sendConnectPacket(this);
        return;
      }
      case 0x31: // '1' close
        shard.sample("eio-close", this.index, text);
        return;
      case 0x36: // '6' noop
        return;
      default:
        shard.sample("unknown-eio-packet", this.index, text);
    }
  }

  onSocketIoPacket(text) {
    const shard = this.shard;
    const kind = text.charCodeAt(1);
    if (kind === 0x32) {
      // '2' EVENT: 42[ackId]["name", data, ...extra]
      // Fast path for the harness's own payload layout; every FULL_PARSE_EVERY-th
      // frame (and anything that does not match the layout) is fully parsed.
      if ((shard.frameCounter++ & FULL_PARSE_MASK) !== 0) {
        const fast = shard.fastEvent(text);
        if (fast !== null) {
          shard.onDelivery(this, fast);
          return;
        }
      }
      let i = 2;
      while (i < text.length && text.charCodeAt(i) !== 0x5b /* [ */) i++;
      let arr;
      try {
        arr = JSON.parse(text.slice(i));
      } catch {
        shard.sample("bad-event-json", this.index, text);
        return;
      }
      if (!Array.isArray(arr) || arr[0] !== shard.cfg.event) {
        shard.sample("unexpected-event", this.index, text);
        return;
      }
      const payload = arr[1];
      if (payload === null || typeof payload !== "object" || typeof payload.ts !== "number") {
        shard.sample("event-without-ts", this.index, text);
        return;
      }
      shard.onDelivery(this, payload);
      return;
    }
    if (kind === 0x33) {
      // '3' ACK: 43<id>[args]
      let i = 2;
      while (i < text.length && text.charCodeAt(i) >= 0x30 && text.charCodeAt(i) <= 0x39) i++;
      const id = Number(text.slice(2, i));
      const cb = this.pendingAcks.get(id);
      if (i === 2 || cb === undefined) {
        shard.sample("unexpected-ack", this.index, text);
        return;
      }
      this.pendingAcks.delete(id);
      let args;
      try {
        args = JSON.parse(text.slice(i));
      } catch {
        shard.sample("bad-ack-json", this.index, text);
        args = null;
      }
      cb(args, text);
      return;
    }
    if (kind === 0x30) {
      // '0' CONNECT answer: 40{"sid":"..."}
      let payload = null;
      try {
        payload = text.length > 2 ? JSON.parse(text.slice(2)) : null;
      } catch {
        // handled below
      }
      if (payload === null || typeof payload.sid !== "string") {
        shard.sample("bad-connect-answer", this.index, text);
        this.onConnect?.(new Error(`namespace connect answer without sid: ${truncate(text)}`));
        return;
      }
      this.sid = payload.sid;
      this.connected = true;
      this.onConnect?.(null);
      return;
    }
    if (kind === 0x34) {
      // '4' CONNECT_ERROR
      shard.sample("connect-error", this.index, text);
      this.onConnect?.(new Error(`CONNECT_ERROR: ${truncate(text)}`));
      return;
    }
    if (kind === 0x31) {
      // '1' DISCONNECT from server
      shard.sample("server-disconnect", this.index, text);
      return;
    }
    shard.sample("unknown-sio-packet", this.index, text);
  }
}

// ---------------------------------------------------------------------------
// A shard owns a slice of the client connections (in this process, or in a
// forked child when --procs > 1).

class Shard {
  constructor(cfg, first, count, onProgress) {
    this.cfg = cfg;
    this.first = first;
    this.count = count;
    this.onProgress = onProgress; // (deliveredSoFar) => void
    const u = new URL(cfg.url);
    const qs = new URLSearchParams({ EIO: "4", transport: "websocket" });
    if (cfg.token && (cfg.tokenMode === "query" || cfg.tokenMode === "both")) {
      qs.set("token", cfg.token);
    }
    this.wsUrl = `ws://${u.host}/socket.io/?${qs.toString()}`;
    this.connectPacket =
      cfg.token && (cfg.tokenMode === "auth" || cfg.tokenMode === "both")
        ? `40${JSON.stringify({ token: cfg.token })}`
        : "40";
    this.clients = [];
    this.hist = new Histogram();
    this.delivered = 0;
    this.duplicates = 0;
    this.misrouted = 0;
    this.disconnects = 0;
    this.firstRecvAt = null;
    this.lastRecvAt = null;
    this.samples = [];
    this.sampleCounts = {};
    this.firstFrames = [];
    this.closing = false;
    this.frameCounter = 0;
    this.eventPrefix = `42[${JSON.stringify(cfg.event)},{"ts":`;
    this.progressTimer = null;
    this.reportedDelivered = 0;
    this.cpuMark = null;
  }

  sample(kind, index, detail) {
    this.sampleCounts[kind] = (this.sampleCounts[kind] ?? 0) + 1;
    if (this.samples.length < MAX_SAMPLES) {
      this.samples.push({ kind, client: index, detail: truncate(detail, 800) });
    }
  }

  recordFirstFrame(index, text) {
    if (index === this.first && this.firstFrames.length < 6) {
      this.firstFrames.push(truncate(text, 400));
    }
  }

  // Extracts {ts, seq, room} from `42["<event>",{"ts":N,"seq":N,"room":"R",...}...]`
  // without a full JSON.parse; null when the frame does not look like that.
  fastEvent(text) {
    const p = this.eventPrefix;
    if (!text.startsWith(p)) return null;
    let i = p.length;
    let j = text.indexOf(',"seq":', i);
    if (j < 0) return null;
    const ts = Number(text.slice(i, j));
    i = j + 7;
    j = text.indexOf(',"room":"', i);
    if (j < 0) return null;
    const seq = Number(text.slice(i, j));
    i = j + 9;
    j = text.indexOf('"', i);
    if (j < 0 || !Number.isFinite(ts) || !Number.isInteger(seq)) return null;
    const last = text.charCodeAt(text.length - 1);
    if (last !== 0x5d /* ] */) return null;
    return { ts, seq, room: text.slice(i, j) };
  }

  sendConnectPacket(client) {
    if (this.cfg.jwtSecret && this.cfg.tokenMode === "auth") {
      // A distinct token per client, as real users have: the server cannot reuse a
      // verification (Roomcast caches verified tokens, which a shared token would flatter).
      client.send(`40${JSON.stringify({ token: mintToken(this.cfg.jwtSecret, `bench-${client.index}`) })}`);
    } else {
      client.send(this.connectPacket);
    }
  }

  onDelivery(client, payload) {
    const t = now();
    if (payload.room !== client.room) {
      this.misrouted += 1;
      this.sample("misrouted", client.index, `client in ${client.room} got ${JSON.stringify(payload)}`);
      return;
    }
    const seq = payload.seq;
    if (!Number.isInteger(seq) || seq < 0) {
      this.sample("event-without-seq", client.index, JSON.stringify(payload));
      return;
    }
    // Publishes run concurrently, so arrival order is not checked; only
    // repeated (room, seq) deliveries to the same client are.
    const byte = seq >> 3;
    if (byte >= client.seen.length) {
      const grown = new Uint8Array(Math.max(byte + 1, client.seen.length * 2));
      grown.set(client.seen);
      client.seen = grown;
    }
    const bit = 1 << (seq & 7);
    if (client.seen[byte] & bit) {
      this.duplicates += 1;
      return;
    }
    client.seen[byte] |= bit;
    this.hist.record(t - payload.ts);
    this.delivered += 1;
    if (this.firstRecvAt === null) this.firstRecvAt = t;
    this.lastRecvAt = t;
    if (this.onProgress !== null && this.progressTimer === null) {
      // Coalesce progress notifications (one per macrotask burst).
      this.progressTimer = setImmediate(() => {
        this.progressTimer = null;
        if (this.delivered !== this.reportedDelivered) {
          this.reportedDelivered = this.delivered;
          this.onProgress(this.delivered);
        }
      });
    }
  }

  roomOf(globalIndex) {
    return `${this.cfg.roomPrefix}${globalIndex % this.cfg.rooms}`;
  }

  async connect(concurrency) {
    for (let k = 0; k < this.count; k++) {
      const idx = this.first + k;
      this.clients.push(new Client(this, idx, this.roomOf(idx)));
    }
    let next = 0;
    let ok = 0;
    let failed = 0;
    const worker = async () => {
      while (next < this.clients.length) {
        const c = this.clients[next++];
        try {
          await c.connect();
          ok += 1;
        } catch (err) {
          failed += 1;
          const why = String(err?.message ?? err);
          this.sample("connect-failed", c.index, why);
        }
      }
    };
    const n = Math.max(1, Math.min(concurrency, this.clients.length));
    await Promise.all(Array.from({ length: n }, worker));
    return { ok, failed };
  }

  async join(concurrency) {
    const perRoom = {};
    let ok = 0;
    let failed = 0;
    const todo = this.clients.filter((c) => c.connected && !c.closed);
    let next = 0;
    const worker = async () => {
      while (next < todo.length) {
        const c = todo[next++];
        try {
          const { ackArgs, raw } = await c.emitWithAck(["join", c.room], this.cfg.joinTimeoutMs);
          const first = Array.isArray(ackArgs) ? ackArgs[0] : undefined;
          if (first !== null && typeof first === "object" && first.ok === true) {
            c.joined = true;
            ok += 1;
            perRoom[c.room] = (perRoom[c.room] ?? 0) + 1;
          } else {
            failed += 1;
            this.sample("join-rejected", c.index, raw);
          }
        } catch (err) {
          failed += 1;
          this.sample("join-failed", c.index, String(err?.message ?? err));
        }
      }
    };
    const n = Math.max(1, Math.min(concurrency, todo.length));
    await Promise.all(Array.from({ length: n }, worker));
    return { ok, failed, perRoom };
  }

  markMeasureStart() {
    this.cpuMark = process.cpuUsage();
  }

  final() {
    const cpu = this.cpuMark ? process.cpuUsage(this.cpuMark) : process.cpuUsage();
    return {
      delivered: this.delivered,
      duplicates: this.duplicates,
      misrouted: this.misrouted,
      disconnects: this.disconnects,
      firstRecvAt: this.firstRecvAt,
      lastRecvAt: this.lastRecvAt,
      hist: this.hist.toJSON(),
      samples: this.samples,
      sampleCounts: this.sampleCounts,
      firstFrames: this.firstFrames,
      cpuSeconds: (cpu.user + cpu.system) / 1e6,
    };
  }

  close() {
    this.closing = true;
    for (const c of this.clients) {
      try {
        c.ws?.terminate();
      } catch {
        // ignore
      }
    }
  }
}

// Proxy for a Shard running in a forked child process (same API, over IPC).
class RemoteShard {
  constructor(cfg, first, count, onProgress) {
    this.child = fork(SELF, ["--shard"], { stdio: ["ignore", "inherit", "inherit", "ipc"] });
    this.pending = new Map();
    this.nextId = 0;
    this.child.on("message", (msg) => {
      if (msg.type === "progress") {
        onProgress(msg.delivered);
      } else if (msg.type === "reply") {
        const cb = this.pending.get(msg.id);
        this.pending.delete(msg.id);
        cb?.(msg);
      }
    });
    this.child.on("exit", (code) => {
      for (const cb of this.pending.values()) cb({ error: `shard exited with code ${code}` });
      this.pending.clear();
    });
    this.ready = this.call("init", { cfg, first, count });
  }

  call(op, args = {}) {
    const id = this.nextId++;
    return new Promise((resolve, reject) => {
      this.pending.set(id, (msg) => (msg.error ? reject(new Error(msg.error)) : resolve(msg.value)));
      this.child.send({ op, id, args });
    });
  }

  async connect(concurrency) {
    await this.ready;
    return this.call("connect", { concurrency });
  }

  join(concurrency) {
    return this.call("join", { concurrency });
  }

  markMeasureStart() {
    return this.call("markMeasureStart");
  }

  final() {
    return this.call("final");
  }

  async close() {
    await this.call("close").catch(() => undefined);
    this.child.disconnect();
  }
}

function runShardChild() {
  let shard = null;
  process.on("message", async (msg) => {
    const reply = (value) => process.send({ type: "reply", id: msg.id, value });
    try {
      switch (msg.op) {
        case "init":
          shard = new Shard(msg.args.cfg, msg.args.first, msg.args.count, (delivered) =>
            process.send({ type: "progress", delivered }),
          );
          reply(null);
          break;
        case "connect":
          reply(await shard.connect(msg.args.concurrency));
          break;
        case "join":
          reply(await shard.join(msg.args.concurrency));
          break;
        case "markMeasureStart":
          reply(shard.markMeasureStart());
          break;
        case "final":
          reply(shard.final());
          break;
        case "close":
          shard.close();
          reply(null);
          break;
        default:
          process.send({ type: "reply", id: msg.id, error: `unknown op ${msg.op}` });
      }
    } catch (err) {
      process.send({ type: "reply", id: msg.id, error: String(err?.stack ?? err) });
    }
  });
  process.on("disconnect", () => process.exit(0));
}

// ---------------------------------------------------------------------------
// Publisher: HTTP POST /api/v1/publish over a keep-alive agent.

class Publisher {
  constructor(cfg) {
    this.cfg = cfg;
    const u = new URL(cfg.url);
    this.host = u.hostname;
    this.port = Number(u.port);
    this.agent = new http.Agent({ keepAlive: true, maxSockets: cfg.httpSockets });
    this.headers = { "content-type": "application/json" };
    if (cfg.apiKey) this.headers.authorization = `Bearer ${cfg.apiKey}`;
    this.outstanding = 0;
    this.maxOutstanding = 0;
    this.issued = 0;
    this.accepted = 0;
    this.errors = 0;
    this.missingId = 0;
    this.samples = [];
    this.statuses = {};
    this.firstResponse = null;
    this.responseMsSum = 0;
    this.seqByRoom = new Map();
    // Size the padding so JSON.stringify(data) is about cfg.payloadBytes long.
    const probe = JSON.stringify({ ts: now(), seq: 1000000, room: `${cfg.roomPrefix}999`, pad: "" });
    this.pad = "x".repeat(Math.max(0, cfg.payloadBytes - probe.length));
  }

  sample(detail) {
    if (this.samples.length < MAX_SAMPLES) this.samples.push(truncate(detail));
  }

  // Publishes one event; calls done(acceptedBool) when the HTTP exchange ends.
  publish(room, done) {
    const seq = this.seqByRoom.get(room) ?? 0;
    this.seqByRoom.set(room, seq + 1);
    const sentAt = now();
    const body = JSON.stringify({
      room,
      event: this.cfg.event,
      data: { ts: sentAt, seq, room, pad: this.pad },
    });
    this.issued += 1;
    this.outstanding += 1;
    if (this.outstanding > this.maxOutstanding) this.maxOutstanding = this.outstanding;
    let finished = false;
    const finish = (ok) => {
      if (finished) return;
      finished = true;
      this.outstanding -= 1;
      this.responseMsSum += now() - sentAt;
      if (ok) this.accepted += 1;
      else this.errors += 1;
      done(ok);
    };
    const req = http.request(
      {
        host: this.host,
        port: this.port,
        path: "/api/v1/publish",
        method: "POST",
        agent: this.agent,
        headers: { ...this.headers, "content-length": Buffer.byteLength(body) },
      },
      (res) => {
        const chunks = [];
        res.on("data", (c) => chunks.push(c));
        res.on("end", () => {
          const status = res.statusCode ?? 0;
          this.statuses[status] = (this.statuses[status] ?? 0) + 1;
          const text = Buffer.concat(chunks).toString("utf8");
          if (this.firstResponse === null) this.firstResponse = `${status} ${truncate(text)}`;
          if (status >= 200 && status < 300) {
            try {
              const parsed = JSON.parse(text);
              if (parsed === null || parsed.id === undefined) this.missingId += 1;
            } catch {
              this.missingId += 1;
            }
            finish(true);
          } else {
            this.sample(`HTTP ${status}: ${text}`);
            finish(false);
          }
        });
        res.on("error", (err) => {
          this.sample(`response error: ${err.message}`);
          finish(false);
        });
      },
    );
    req.on("error", (err) => {
      this.sample(`request error: ${err.message}`);
      finish(false);
    });
    req.end(body);
  }

  stats() {
    return {
      issued: this.issued,
      accepted: this.accepted,
      errors: this.errors,
      missingId: this.missingId,
      maxOutstanding: this.maxOutstanding,
      meanResponseMs: this.issued ? this.responseMsSum / this.issued : null,
      statuses: this.statuses,
      firstResponse: this.firstResponse,
      samples: this.samples,
    };
  }

  close() {
    this.agent.destroy();
  }
}

// ---------------------------------------------------------------------------
// Coordinator.

function sleep(ms) {
  return new Promise((r) => setTimeout(r, ms));
}

async function phase(name, sync, lines) {
  process.stdout.write(`PHASE ${name}\n`);
  if (!sync) return;
  const { value, done } = await lines.next();
  if (done) throw new Error(`stdin closed while waiting after phase ${name}`);
  if (String(value).trim() === "abort") throw new Error("aborted by driver");
}

function parseConfig() {
  const { values } = parseArgs({
    options: {
      shard: { type: "boolean", default: false },
      url: { type: "string", default: "http://127.0.0.1:3000" },
      token: { type: "string", default: "" },
      "jwt-secret": { type: "string", default: "" },
      "token-mode": { type: "string", default: "auth" }, // auth | query | both
      "api-key": { type: "string", default: "" },
      clients: { type: "string", default: "100" },
      rooms: { type: "string", default: "1" },
      "room-prefix": { type: "string", default: "bench:room-" },
      event: { type: "string", default: "bench" },
      mode: { type: "string", default: "rate" }, // rate | closed
      rate: { type: "string", default: "1" }, // events/s per room (rate mode)
      inflight: { type: "string", default: "8" }, // events in flight (closed mode)
      duration: { type: "string", default: "5" },
      "payload-bytes": { type: "string", default: "200" },
      "connect-concurrency": { type: "string", default: "200" },
      "http-sockets": { type: "string", default: "32" },
      "connect-timeout": { type: "string", default: "15" },
      "join-timeout": { type: "string", default: "15" },
      "drain-timeout": { type: "string", default: "5" },
      procs: { type: "string", default: "1" },
      sync: { type: "boolean", default: false },
    },
  });
  const num = (k) => {
    const v = Number(values[k]);
    if (!Number.isFinite(v) || v < 0) throw new Error(`--${k} must be a non-negative number`);
    return v;
  };
  return {
    shard: values.shard,
    url: values.url,
    token: values.token,
    jwtSecret: values["jwt-secret"],
    tokenMode: values["token-mode"],
    apiKey: values["api-key"],
    clients: Math.floor(num("clients")),
    rooms: Math.max(1, Math.floor(num("rooms"))),
    roomPrefix: values["room-prefix"],
    event: values.event,
    mode: values.mode,
    rate: num("rate"),
    inflight: Math.max(1, Math.floor(num("inflight"))),
    durationMs: num("duration") * 1000,
    payloadBytes: Math.floor(num("payload-bytes")),
    connectConcurrency: Math.max(1, Math.floor(num("connect-concurrency"))),
    httpSockets: Math.max(1, Math.floor(num("http-sockets"))),
    connectTimeoutMs: num("connect-timeout") * 1000,
    joinTimeoutMs: num("join-timeout") * 1000,
    drainTimeoutMs: num("drain-timeout") * 1000,
    procs: Math.max(1, Math.floor(num("procs"))),
    sync: values.sync,
  };
}

function protocolSummary(finals) {
  const samples = [];
  const counts = {};
  for (const f of finals) {
    samples.push(...f.samples);
    for (const [k, v] of Object.entries(f.sampleCounts)) counts[k] = (counts[k] ?? 0) + v;
  }
  return {
    problemCounts: counts,
    problemSamples: samples.slice(0, MAX_SAMPLES),
    firstClientFrames: finals[0]?.firstFrames ?? [],
  };
}

async function main() {
  const cfg = parseConfig();
  if (cfg.shard) {
    runShardChild();
    return;
  }
  if (!["rate", "closed"].includes(cfg.mode)) throw new Error("--mode must be rate or closed");
  const lines = readline.createInterface({ input: process.stdin })[Symbol.asyncIterator]();

  // Delivery accounting shared by all shards.
  const deliveredByShard = new Array(cfg.procs).fill(0);
  let deliveredTotal = 0;
  let wake = null; // publisher wake-up when blocked on deliveries
  const onProgressFor = (k) => (delivered) => {
    deliveredTotal += delivered - deliveredByShard[k];
    deliveredByShard[k] = delivered;
    if (wake !== null) wake();
  };

  const shards = [];
  const per = Math.floor(cfg.clients / cfg.procs);
  let first = 0;
  for (let k = 0; k < cfg.procs; k++) {
    const count = k === cfg.procs - 1 ? cfg.clients - first : per;
    const S = cfg.procs === 1 ? Shard : RemoteShard;
    shards.push(new S(cfg, first, count, onProgressFor(k)));
    first += count;
  }
  if (cfg.procs > 1) await Promise.all(shards.map((s) => s.ready));

  let aborted = null;
  const publisher = new Publisher(cfg);
  const result = {
    config: { ...cfg, token: cfg.token ? "<set>" : "", jwtSecret: cfg.jwtSecret ? "<set>" : "", apiKey: cfg.apiKey ? "<set>" : "" },
  };
  try {
    await phase("pre-connect", cfg.sync, lines);

    // --- connect -----------------------------------------------------------
    const perShardConc = Math.max(1, Math.ceil(cfg.connectConcurrency / cfg.procs));
    const t0 = now();
    const conns = await Promise.all(shards.map((s) => s.connect(perShardConc)));
    const t1 = now();
    const connected = conns.reduce((a, c) => a + c.ok, 0);
    const connectFailed = conns.reduce((a, c) => a + c.failed, 0);
    result.connect = {
      attempted: cfg.clients,
      connected,
      failed: connectFailed,
      seconds: (t1 - t0) / 1000,
      rate: connected / Math.max((t1 - t0) / 1000, 1e-9),
      concurrency: cfg.connectConcurrency,
    };
    log(`connected ${connected}/${cfg.clients} in ${((t1 - t0) / 1000).toFixed(2)} s`);
    if (connected === 0) throw new Error("no connection succeeded");

    // --- join --------------------------------------------------------------
    const joins = await Promise.all(shards.map((s) => s.join(perShardConc)));
    const t2 = now();
    const members = new Map();
    for (const j of joins) {
      for (const [room, n] of Object.entries(j.perRoom)) members.set(room, (members.get(room) ?? 0) + n);
    }
    const joined = joins.reduce((a, j) => a + j.ok, 0);
    result.join = {
      joined,
      failed: joins.reduce((a, j) => a + j.failed, 0),
      seconds: (t2 - t1) / 1000,
      rate: joined / Math.max((t2 - t1) / 1000, 1e-9),
      roomsWithMembers: members.size,
    };
    log(`joined ${joined} clients into ${members.size} rooms in ${((t2 - t1) / 1000).toFixed(2)} s`);

    await phase("connected", cfg.sync, lines);

    // --- publish -----------------------------------------------------------
    const roomNames = Array.from({ length: cfg.rooms }, (_, j) => `${cfg.roomPrefix}${j}`);
    const membersOf = roomNames.map((r) => members.get(r) ?? 0);
    const avgMembers = Math.max(1, joined / cfg.rooms);
    let expected = 0; // messages owed by accepted publishes
    let pendingExpected = 0; // messages owed by publishes still awaiting HTTP answer
    let roomCursor = 0;
    let publishing = true;

    await Promise.all(shards.map((s) => s.markMeasureStart()));
    const loopDelay = monitorEventLoopDelay({ resolution: 5 });
    loopDelay.enable();
    const lgCpu0 = process.cpuUsage();
    const pubStart = now();

    const issue = (onDone) => {
      const j = roomCursor;
      roomCursor = (roomCursor + 1) % cfg.rooms;
      const owed = membersOf[j];
      pendingExpected += owed;
      publisher.publish(roomNames[j], (ok) => {
        pendingExpected -= owed;
        if (ok) expected += owed;
        onDone();
      });
    };

    await new Promise((resolve) => {
      const deadline = pubStart + cfg.durationMs;
      if (cfg.mode === "closed") {
        // Closed loop: keep about `inflight` events published but not yet
        // delivered to all their members (and at most `inflight` HTTP requests).
        const windowMsgs = cfg.inflight * avgMembers;
        const pump = () => {
          wake = null;
          if (!publishing) return;
          if (now() >= deadline) {
            publishing = false;
            resolve();
            return;
          }
          while (
            publisher.outstanding < cfg.inflight &&
            expected + pendingExpected - deliveredTotal < windowMsgs
          ) {
            issue(pumpSoon);
          }
          wake = pumpSoon;
        };
        let scheduled = false;
        const pumpSoon = () => {
          if (scheduled) return;
          scheduled = true;
          setImmediate(() => {
            scheduled = false;
            pump();
          });
        };
        // Make sure the deadline is noticed even if everything stalls.
        setTimeout(pumpSoon, cfg.durationMs + 1);
        pump();
      } else {
        // Open loop: each room receives `rate` events/s, rooms round-robin.
        const total = cfg.rate * cfg.rooms;
        let due = 0;
        const tick = () => {
          const t = now();
          const until = Math.min(t, deadline);
          const target = Math.floor(((until - pubStart) / 1000) * total) + 1;
          while (due < target && total > 0) {
            issue(() => undefined);
            due += 1;
          }
          if (t >= deadline) {
            publishing = false;
            resolve();
          } else {
            setTimeout(tick, Math.max(1, Math.min(5, 1000 / Math.max(total, 1))));
          }
        };
        tick();
      }
    });
    const pubEnd = now();
    wake = null;

    // --- drain: wait for HTTP answers, then for all owed deliveries ---------
    const drainDeadline = now() + cfg.drainTimeoutMs;
    while (now() < drainDeadline && (publisher.outstanding > 0 || deliveredTotal < expected)) {
      await sleep(2);
    }
    const drainEnd = now();
    const lgCpu = process.cpuUsage(lgCpu0);
    loopDelay.disable();
    await phase("drained", cfg.sync, lines);

    const finals = await Promise.all(shards.map((s) => s.final()));
    const hist = new Histogram();
    let delivered = 0;
    let lastRecvAt = null;
    let firstRecvAt = null;
    const sum = (k) => finals.reduce((a, f) => a + f[k], 0);
    for (const f of finals) {
      hist.merge(f.hist);
      delivered += f.delivered;
      if (f.lastRecvAt !== null && (lastRecvAt === null || f.lastRecvAt > lastRecvAt)) {
        lastRecvAt = f.lastRecvAt;
      }
      if (f.firstRecvAt !== null && (firstRecvAt === null || f.firstRecvAt < firstRecvAt)) {
        firstRecvAt = f.firstRecvAt;
      }
    }
    const windowS = ((lastRecvAt ?? pubEnd) - pubStart) / 1000;
    const loadgenCpu = (lgCpu.user + lgCpu.system) / 1e6 + (cfg.procs > 1 ? sum("cpuSeconds") : 0);
    result.publish = {
      ...publisher.stats(),
      seconds: (pubEnd - pubStart) / 1000,
      rate: publisher.accepted / Math.max((pubEnd - pubStart) / 1000, 1e-9),
    };
    result.delivery = {
      expected,
      delivered,
      lost: Math.max(0, expected - delivered),
      extra: Math.max(0, delivered - expected),
      duplicates: sum("duplicates"),
      misrouted: sum("misrouted"),
      disconnects: sum("disconnects"),
      windowSeconds: windowS,
      rate: delivered / Math.max(windowS, 1e-9),
      drainSeconds: (drainEnd - pubEnd) / 1000,
    };
    result.latencyMs = {
      count: hist.total,
      p50: hist.percentile(0.5),
      p95: hist.percentile(0.95),
      p99: hist.percentile(0.99),
      max: hist.total ? hist.maxMs : null,
      mean: hist.total ? hist.sumMs / hist.total : null,
      negativeClamped: hist.negative,
    };
    result.loadgen = {
      procs: cfg.procs,
      cpuSeconds: loadgenCpu,
      wallSeconds: (drainEnd - pubStart) / 1000,
      cpuUtilization: loadgenCpu / Math.max((drainEnd - pubStart) / 1000, 1e-9),
      // Event-loop delay of the publishing process (sampled every 5 ms): stalls
      // here show up as latency the server is not responsible for.
      // The histogram holds whole timer intervals, so the 5 ms is subtracted.
      eventLoopDelayMs: {
        p50: Math.max(0, loopDelay.percentile(50) / 1e6 - 5),
        p99: Math.max(0, loopDelay.percentile(99) / 1e6 - 5),
        max: Math.max(0, loopDelay.max / 1e6 - 5),
      },
    };
    result.protocol = protocolSummary(finals);
  } catch (err) {
    aborted = String(err?.message ?? err);
    result.error = aborted;
    log(`aborted: ${String(err?.stack ?? err)}`);
    try {
      result.protocol = protocolSummary(await Promise.all(shards.map((s) => s.final())));
    } catch {
      // shards are gone; nothing more to report
    }
  } finally {
    publisher.close();
    await Promise.all(shards.map((s) => s.close()));
  }
  process.stdout.write(`RESULT ${JSON.stringify(result)}\n`);
  // Do not wait for sockets to linger.
  setTimeout(() => process.exit(aborted ? 1 : 0), 50).unref();
  setImmediate(() => process.exit(aborted ? 1 : 0));
}

main().catch((err) => {
  log(String(err?.stack ?? err));
  process.exit(2);
});
