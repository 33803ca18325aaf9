// Reference socket.io 4.8 server for the Roomcast benchmark harness.
//
// It implements the same client/publisher contract as `roomcast serve` so the
// same load generator can drive both:
//   * websocket transport only, perMessageDeflate off, no HTTP long-polling;
//   * client event `join` (room, ack) -> socket.join(room); ack({ ok: true });
//   * POST /api/v1/publish {room, event, data} with `Authorization: Bearer KEY`
//     -> io.to(room).emit(event, data); answers 200 {"id": "..."};
//   * GET /healthz -> 200 {"status":"ok"}.
// With --jwt-secret, like Roomcast it requires an HS256 JWT in the CONNECT auth
// payload (verified with the jsonwebtoken package) and checks `join` against the
// token's `rooms` glob patterns.
//
// Usage: node reference-server.mjs [--host 127.0.0.1] [--port 0] [--api-key KEY]
// Prints one line `READY {"host":...,"port":...,"pid":...}` once listening.

import http from "node:http";
import { parseArgs } from "node:util";
import jwt from "jsonwebtoken";
import { Server } from "socket.io";

const { values: opts } = parseArgs({
  options: {
    host: { type: "string", default: "127.0.0.1" },
    port: { type: "string", default: "0" },
    "api-key": { type: "string", default: "bench-api-key" },
    "jwt-secret": { type: "string", default: "" },
  },
});

const expectedAuth = `Bearer ${opts["api-key"]}`;
const MAX_BODY = 1 << 20;
let nextId = 0;

function reply(res, status, body) {
  const text = JSON.stringify(body);
  res.writeHead(status, {
    "content-type": "application/json",
    "content-length": Buffer.byteLength(text),
  });
  res.end(text);
}

function handlePublish(req, res) {
  if (req.headers.authorization !== expectedAuth) {
    reply(res, 401, { error: "unauthorized" });
    req.resume();
    return;
  }
  const chunks = [];
  let size = 0;
  req.on("data", (chunk) => {
    size += chunk.length;
    if (size > MAX_BODY) {
      reply(res, 413, { error: "body too large" });
      req.destroy();
      return;
    }
    chunks.push(chunk);
  });
  req.on("end", () => {
    if (res.writableEnded) return;
    let body;
    try {
      body = JSON.parse(Buffer.concat(chunks).toString("utf8"));
    } catch {
      reply(res, 400, { error: "invalid JSON" });
      return;
    }
    if (
      body === null ||
      typeof body !== "object" ||
      typeof body.room !== "string" ||
      typeof body.event !== "string" ||
      !("data" in body)
    ) {
      reply(res, 400, { error: "expected {room, event, data}" });
      return;
    }
    io.to(body.room).emit(body.event, body.data);
    nextId += 1;
    reply(res, 200, { id: String(nextId) });
  });
}

const httpServer = http.createServer((req, res) => {
  const path = (req.url ?? "/").split("?", 1)[0];
  if (req.method === "GET" && path === "/healthz") {
    reply(res, 200, { status: "ok" });
  } else if (req.method === "POST" && path === "/api/v1/publish") {
    handlePublish(req, res);
  } else if (!path.startsWith("/socket.io/")) {
    reply(res, 404, { error: "not found" });
  }
  // /socket.io/ requests are answered by the engine.io request listener.
});
httpServer.keepAliveTimeout = 60_000;

const io = new Server(httpServer, {
  transports: ["websocket"],
  perMessageDeflate: false,
  httpCompression: false,
  serveClient: false,
  // Keep socket.io's own defaults for pingInterval (25 s) / pingTimeout (20 s).
});

function globToRegExp(pattern) {
  const escaped = pattern.replace(/[.+^${}()|[\]\\?]/g, "\\$&").replace(/\*/g, ".*");
  return new RegExp(`^${escaped}$`);
}

if (opts["jwt-secret"]) {
  io.use((socket, next) => {
    const token = socket.handshake.auth?.token;
    try {
      const claims = jwt.verify(token, opts["jwt-secret"], { algorithms: ["HS256"] });
      socket.data.rooms = (claims.rooms ?? []).map(globToRegExp);
      next();
    } catch (err) {
      next(new Error(`token_invalid: ${err.message}`));
    }
  });
}

io.on("connection", (socket) => {
  socket.on("join", (room, ack) => {
    if (typeof room !== "string" || room.length === 0) {
      if (typeof ack === "function") ack({ ok: false, error: "invalid room" });
      return;
    }
    if (socket.data.rooms && !socket.data.rooms.some((re) => re.test(room))) {
      if (typeof ack === "function") ack({ ok: false, error: "forbidden" });
      return;
    }
    socket.join(room);
    if (typeof ack === "function") ack({ ok: true });
  });
});

httpServer.listen(Number(opts.port), opts.host, () => {
  const addr = httpServer.address();
  process.stdout.write(
    `READY ${JSON.stringify({ host: opts.host, port: addr.port, pid: process.pid })}\n`,
  );
});

function shutdown() {
  io.close();
  httpServer.close(() => process.exit(0));
  setTimeout(() => process.exit(0), 2000).unref();
}
process.on("SIGTERM", shutdown);
process.on("SIGINT", shutdown);
