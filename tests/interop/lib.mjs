// Shared helpers of the interop scripts that tests/test_interop.py runs.
//
// Every script takes one JSON argument (its configuration: url, token, ...), writes one JSON
// object per line on stdout, and ends with exactly one line that is either
//   {"ok": true, "result": {...}}                  (exit code 0), or
//   {"ok": false, "error": "...", "step": "..."}   (exit code 1, or 2 on its own timeout).
// Lines before that are progress reports ({"step": "..."}) that pytest may wait for.
import { Buffer } from "node:buffer";
import { io } from "socket.io-client";

export { io };

let currentStep = "start";

/** The script's configuration: the JSON object given as its first argument. */
export function config() {
  const raw = process.argv[2];
  if (!raw) {
    throw new Error("usage: node SCRIPT.mjs '<json config>'");
  }
  return JSON.parse(raw);
}

/** Write one JSON line on stdout. */
export function report(value) {
  process.stdout.write(`${JSON.stringify(value)}\n`);
}

/** Name what the script is doing (a timeout names it), and tell pytest about it. */
export function step(name, extra = {}) {
  currentStep = name;
  report({ step: name, ...extra });
}

function finish(line, code) {
  report(line);
  // Sockets still open would keep the process alive: exit once stdout is flushed.
  process.stdout.write("", () => process.exit(code));
}

/**
 * Run `body` under a deadline of `timeoutMs`: its return value becomes the result line; an
 * exception or the deadline becomes the error line.
 */
export function run(body, { timeoutMs = 10_000 } = {}) {
  const timer = setTimeout(() => {
    finish({ ok: false, error: `timeout after ${timeoutMs} ms`, step: currentStep }, 2);
  }, timeoutMs);
  Promise.resolve()
    .then(body)
    .then(
      (result) => {
        clearTimeout(timer);
        finish({ ok: true, result: result ?? {} }, 0);
      },
      (error) => {
        clearTimeout(timer);
        finish({ ok: false, error: String(error?.stack ?? error), step: currentStep }, 1);
      },
    );
}

/** Resolve with the arguments of the next `event` on `emitter`. */
export function once(emitter, event) {
  return new Promise((resolve) => emitter.once(event, (...args) => resolve(args)));
}

/** Resolve when `socket` connects; reject with the connect_error's message and data. */
export function connected(socket) {
  return new Promise((resolve, reject) => {
    const onConnect = () => {
      socket.off("connect_error", onError);
      resolve(socket);
    };
    const onError = (err) => {
      socket.off("connect", onConnect);
      reject(new Error(`connect_error: ${err.message} ${JSON.stringify(err.data ?? null)}`));
    };
    if (socket.connected) {
      resolve(socket);
      return;
    }
    socket.once("connect", onConnect);
    socket.once("connect_error", onError);
  });
}

/** Resolve with `{message, data}` of the next connect_error; reject if the socket connects. */
export function connectError(socket) {
  return new Promise((resolve, reject) => {
    const onError = (err) => {
      socket.off("connect", onConnect);
      resolve({ message: err.message, data: err.data ?? null });
    };
    const onConnect = () => {
      socket.off("connect_error", onError);
      reject(new Error("connected although a connect_error was expected"));
    };
    socket.once("connect_error", onError);
    socket.once("connect", onConnect);
  });
}

/** Emit with an ack and resolve with the ack's arguments (as an array). */
export function call(socket, event, ...args) {
  return new Promise((resolve, reject) => {
    socket.timeout(5_000).emit(event, ...args, (err, ...answer) => {
      if (err) {
        reject(new Error(`no ack for ${JSON.stringify(event)}: ${err.message}`));
      } else {
        resolve(answer);
      }
    });
  });
}

/** A JSON-safe description of a value that may hold binary parts. */
export function describe(value) {
  if (Buffer.isBuffer(value)) {
    return { binary: "Buffer", hex: value.toString("hex") };
  }
  if (value instanceof ArrayBuffer) {
    return { binary: "ArrayBuffer", hex: Buffer.from(value).toString("hex") };
  }
  if (ArrayBuffer.isView(value)) {
    const bytes = Buffer.from(value.buffer, value.byteOffset, value.byteLength);
    return { binary: value.constructor.name, hex: bytes.toString("hex") };
  }
  if (Array.isArray(value)) {
    return value.map(describe);
  }
  if (value !== null && typeof value === "object") {
    return Object.fromEntries(Object.entries(value).map(([k, v]) => [k, describe(v)]));
  }
  return value;
}

/** Default client options: no automatic reconnection unless a script asks for it. */
export function options(extra = {}) {
  return { reconnection: false, forceNew: true, timeout: 5_000, ...extra };
}
