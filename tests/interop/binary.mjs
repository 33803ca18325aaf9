// Binary to rooms, with either parser: the official client connects, joins, publishes JSON and
// binary to its room (a Buffer inside `publish`'s data), receives publications of the HTTP API
// (JSON, and bytes given as {"$binary": base64}), echoes binary through a handler, then drops
// its transport, misses binary publications, reconnects and recovers them byte for byte.
// Config: {url, token, apiKey, room, parser?: "json" | "msgpack", transports?: string[]}
import { Buffer } from "node:buffer";
import msgpackParser from "socket.io-msgpack-parser";
import { call, config, connected, describe, io, once, options, run, step } from "./lib.mjs";

const cfg = config();

/** Every byte value, then `salt`: a different blob per publication. */
function blob(salt) {
  return Buffer.concat([Buffer.from(Array.from({ length: 256 }, (_, i) => i)), Buffer.from(salt)]);
}

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

/** {"$binary": base64}: how the publish API takes bytes. */
function binary(bytes) {
  return { $binary: bytes.toString("base64") };
}

run(async () => {
  const extra = cfg.transports ? { transports: cfg.transports } : {};
  if (cfg.parser === "msgpack") {
    extra.parser = msgpackParser;
  }
  const socket = io(cfg.url, options({ auth: { token: cfg.token }, ...extra }));
  // A second member of the room sees what the first one publishes (not sent back to itself).
  const peer = io(cfg.url, options({ auth: { token: cfg.token }, ...extra }));
  const events = [];
  const peerEvents = [];
  socket.onAny((event, ...args) => events.push({ event, args: describe(args) }));
  peer.onAny((event, ...args) => peerEvents.push({ event, args: describe(args) }));
  step("connecting");
  await Promise.all([connected(socket), connected(peer)]);
  const firstSid = socket.id;
  const joins = [(await call(socket, "join", cfg.room))[0], (await call(peer, "join", cfg.room))[0]];

  step("client publishes json and binary");
  const peerGot = once(peer, "from-client-binary");
  const published = [
    (await call(socket, "publish", { room: cfg.room, event: "from-client", data: { n: 1 } }))[0],
    (
      await call(socket, "publish", {
        room: cfg.room,
        event: "from-client-binary",
        data: { name: "c.bin", body: blob("client") },
      })
    )[0],
  ];
  await peerGot;

  step("http publications");
  const gotBinary = once(socket, "http-binary");
  const offsets = [
    await publish("http-json", { headline: "héllo" }),
    await publish("http-binary", { name: "h.bin", body: binary(blob("http")), list: [binary(Buffer.alloc(0))] }),
  ];
  await gotBinary;

  step("echo binary");
  const echo = describe(await call(socket, "echo", blob("echo"), { nested: [Buffer.from([0, 255])] }));

  step("dropping the transport");
  const gone = once(socket, "disconnect");
  socket.io.engine.close();
  const [reason] = await gone;
  step("publishing while away");
  offsets.push(
    await publish("missed", { body: binary(blob("missed-1")) }),
    await publish("missed", { body: binary(blob("missed-2")), text: "and json" }),
  );
  step("reconnecting");
  socket.connect();
  await connected(socket);
  const recovered = socket.recovered;
  const secondSid = socket.id;
  step("live again");
  const after = once(socket, "after");
  offsets.push(await publish("after", binary(blob("after"))));
  await after;
  const transport = socket.io.engine.transport.name;
  socket.disconnect();
  peer.disconnect();
  return {
    joins,
    published,
    echo,
    reason,
    firstSid,
    secondSid,
    recovered,
    offsets,
    events,
    peerEvents,
    transport,
  };
});
