// Connection state recovery: drop the transport (no Socket.IO DISCONNECT), publish while the
// client is away, reconnect, and expect the same socket id and the missed events in order.
// Config: {url, token, apiKey, room, transports?: string[]}
import { call, config, connected, io, once, options, run, step } from "./lib.mjs";

const cfg = config();

async function publish(event, data) {
  const response = await fetch(`${cfg.url}/api/v1/publish`, {
    method: "POST",
    headers: { Authorization: `Bearer ${cfg.apiKey}`, "Content-Type": "application/json" },
    body: JSON.stringify({ room: cfg.room, event, data }),
  });
  const body = await response.json();
  if (response.status !== 202) {
    throw new Error(`publish answered ${response.status}: ${JSON.stringify(body)}`);
  }
  return body.offset;
}

run(async () => {
  const extra = cfg.transports ? { transports: cfg.transports } : {};
  // No automatic reconnection: the script reconnects itself once the missed events are out.
  const socket = io(cfg.url, options({ auth: { token: cfg.token }, ...extra }));
  const events = [];
  socket.onAny((event, ...args) => events.push({ event, args }));
  step("connecting");
  await connected(socket);
  const firstSid = socket.id;
  const join = (await call(socket, "join", cfg.room))[0];
  const before = once(socket, "before");
  const offsets = [await publish("before", 0)];
  await before;
  step("dropping the transport");
  const gone = once(socket, "disconnect");
  socket.io.engine.close();
  const [reason] = await gone;
  step("publishing while away");
  offsets.push(await publish("missed", 1), await publish("missed", 2));
  step("reconnecting");
  socket.connect();
  await connected(socket);
  const recovered = socket.recovered;
  const secondSid = socket.id;
  step("live again");
  const after = Promise.race([
    once(socket, "after"),
    new Promise((resolve) => setTimeout(() => resolve(null), 2_000)),
  ]);
  offsets.push(await publish("after", 3));
  const gotAfter = (await after) !== null;
  const transport = socket.io.engine.transport.name;
  socket.disconnect();
  return { join, reason, firstSid, secondSid, recovered, gotAfter, offsets, events, transport };
});
