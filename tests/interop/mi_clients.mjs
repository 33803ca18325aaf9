// Many official socket.io-client sockets in one process, driven by tests/test_multi_instance.py.
//
// Protocol: one JSON command per line on stdin, {"id": N, "cmd": "...", ...arguments}; one JSON
// answer per command on stdout, {"id": N, "ok": true, "result": ...} or
// {"id": N, "ok": false, "error": "..."}. Commands run concurrently, so a test may wait for one
// client's events while it drives another. Each client records everything it sees: events (with
// the offset the server appended), connects (socket id, `recovered`), disconnect reasons and
// connect errors. Every wait has a deadline given by the command (`timeoutMs`).
//
// Commands (each names its client with `name`):
//   connect {url, token, options?}        -> {id, recovered, transport}; rejects on connect_error
//                                            (options.parser "msgpack": socket.io-msgpack-parser)
//                                            (options.auth, when given, replaces {token})
//   emit {event, args, timeoutMs?}        -> the ack's arguments (an array)
//   send {event, args, count?}            -> {}; emits `count` times (default 1), no ack
//   waitEvents {count, untilEvent?, timeoutMs}
//                                         -> every event so far ({event, data, offset, n,
//                                            data as lib.mjs's describe() shows binary parts,
//                                            connection: how many connects preceded it,
//                                            engine: the Engine.IO session id it came on}),
//                                            once there are >= count (and one named untilEvent)
//   waitEvent {event, contains?, after?, timeoutMs}
//                                         -> the first event named `event` from index `after`
//                                            on whose arguments, as JSON, contain `contains`
//   waitConnects {count, timeoutMs}       -> every connect so far, once there are >= count
//   waitDisconnects {count, timeoutMs}    -> every disconnect reason so far, once >= count
//   answer {event, value}                 -> {}; from now on the client acks the server's
//                                            `event` (when the server asks) with `value`
//   state {}                              -> {connected, id, recovered, events, connects, ...}
//   close {}                              -> {}
// The process ends when stdin closes.
import { createInterface } from "node:readline";
import msgpackParser from "socket.io-msgpack-parser";
import { describe, io } from "./lib.mjs";

const clients = new Map();

function write(line) {
  process.stdout.write(`${JSON.stringify(line)}\n`);
}

class Client {
  constructor(name, url, token, options) {
    this.name = name;
    this.events = [];
    this.connects = [];
    this.disconnects = [];
    this.connectErrors = [];
    this.waiters = new Set();
    this.answers = new Map();
    const { parser, ...rest } = options ?? {};
    this.socket = io(url, {
      forceNew: true,
      reconnection: false,
      timeout: 5_000,
      ...rest,
      ...(parser === "msgpack" ? { parser: msgpackParser } : {}),
      auth: rest.auth ?? { token },
    });
    this.socket.onAny((event, ...args) => {
      if (typeof args.at(-1) === "function") {
        const ack = args.pop();
        if (this.answers.has(event)) {
          ack(this.answers.get(event));
        }
      }
      this.events.push({
        event,
        data: describe(args[0] ?? null),
        offset: args[1] ?? null,
        args,
        n: args.length,
        connection: this.connects.length,
        engine: this.socket.io.engine?.id ?? null,
      });
      this.changed();
    });
    this.socket.on("connect", () => {
      this.connects.push({
        id: this.socket.id,
        recovered: this.socket.recovered === true,
        transport: this.socket.io.engine.transport.name,
      });
      this.changed();
    });
    this.socket.on("disconnect", (reason) => {
      this.disconnects.push(reason);
      this.changed();
    });
    this.socket.on("connect_error", (error) => {
      this.connectErrors.push(`${error.message} ${JSON.stringify(error.data ?? null)}`);
      this.changed();
    });
  }

  changed() {
    for (const waiter of [...this.waiters]) {
      waiter();
    }
  }

  /** Resolve with `value()` once `done()` holds; reject naming `what` after `timeoutMs`. */
  until(done, value, timeoutMs, what) {
    return new Promise((resolve, reject) => {
      const check = () => {
        if (done()) {
          this.waiters.delete(check);
          clearTimeout(timer);
          resolve(value());
        }
      };
      const timer = setTimeout(() => {
        this.waiters.delete(check);
        reject(new Error(`${this.name}: timed out after ${timeoutMs} ms waiting for ${what}`));
      }, timeoutMs);
      this.waiters.add(check);
      check();
    });
  }

  state() {
    return {
      connected: this.socket.connected,
      id: this.socket.id ?? null,
      recovered: this.socket.recovered === true,
      events: this.events,
      connects: this.connects,
      disconnects: this.disconnects,
      connectErrors: this.connectErrors,
    };
  }
}

function client(name) {
  const found = clients.get(name);
  if (!found) {
    throw new Error(`no client named ${JSON.stringify(name)}`);
  }
  return found;
}

const commands = {
  async connect({ name, url, token, options = {}, timeoutMs = 10_000 }) {
    if (clients.has(name)) {
      throw new Error(`client ${JSON.stringify(name)} exists already`);
    }
    const c = new Client(name, url, token, options);
    clients.set(name, c);
    await c.until(
      () => c.connects.length > 0 || c.connectErrors.length > 0,
      () => null,
      timeoutMs,
      "the first connect",
    );
    if (c.connects.length === 0) {
      throw new Error(`${name}: connect_error ${c.connectErrors[0]}`);
    }
    return c.connects[0];
  },

  async emit({ name, event, args = [], timeoutMs = 8_000 }) {
    const { socket } = client(name);
    return new Promise((resolve, reject) => {
      socket.timeout(timeoutMs).emit(event, ...args, (error, ...answer) => {
        if (error) {
          reject(new Error(`${name}: no ack for ${JSON.stringify(event)} within ${timeoutMs} ms`));
        } else {
          resolve(answer);
        }
      });
    });
  },

  async send({ name, event, args = [], count = 1 }) {
    const { socket } = client(name);
    for (let i = 0; i < count; i += 1) {
      socket.emit(event, ...args);
    }
    return {};
  },

  async waitEvents({ name, count = 0, untilEvent = null, timeoutMs = 10_000 }) {
    const c = client(name);
    const last = () => c.events.findLastIndex((e) => e.event === untilEvent);
    return c.until(
      () => c.events.length >= count && (untilEvent === null || last() >= 0),
      () => c.events,
      timeoutMs,
      `${count} events${untilEvent === null ? "" : ` and event ${JSON.stringify(untilEvent)}`} (have ${c.events.length})`,
    );
  },

  async waitEvent({ name, event, contains = "", after = 0, timeoutMs = 10_000 }) {
    const c = client(name);
    const found = () =>
      c.events.findIndex(
        (e, index) => index >= after && e.event === event && JSON.stringify(e.args).includes(contains),
      );
    return c.until(
      () => found() >= 0,
      () => ({ index: found(), ...c.events[found()] }),
      timeoutMs,
      `event ${JSON.stringify(event)} with ${JSON.stringify(contains)} (have ${c.events.length})`,
    );
  },

  async waitConnects({ name, count, timeoutMs = 10_000 }) {
    const c = client(name);
    return c.until(
      () => c.connects.length >= count,
      () => c.connects,
      timeoutMs,
      `connect number ${count} (connect errors: ${c.connectErrors.length})`,
    );
  },

  async waitDisconnects({ name, count, timeoutMs = 10_000 }) {
    const c = client(name);
    return c.until(
      () => c.disconnects.length >= count,
      () => c.disconnects,
      timeoutMs,
      `disconnect number ${count}`,
    );
  },

  async answer({ name, event, value }) {
    client(name).answers.set(event, value);
    return {};
  },

  async state({ name }) {
    return client(name).state();
  },

  async close({ name }) {
    client(name).socket.disconnect();
    clients.delete(name);
    return {};
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
// The test runner went away: do not linger.
lines.on("close", () => process.exit(0));
