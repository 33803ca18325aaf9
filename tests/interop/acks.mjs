// Acks both ways, with JSON and binary arguments.
// Config: {url, token, transports?: string[]}
import { Buffer } from "node:buffer";
import { call, config, connected, describe, io, once, options, run, step } from "./lib.mjs";

const cfg = config();

function pattern(length, modulo) {
  return Buffer.from(Array.from({ length }, (_, i) => i % modulo));
}

run(async () => {
  const extra = cfg.transports ? { transports: cfg.transports } : {};
  const socket = io(cfg.url, options({ auth: { token: cfg.token }, ...extra }));
  const asked = [];
  socket.on("server-ask", (...args) => {
    const ack = args.pop();
    asked.push(args);
    ack(args[0] + 1, Buffer.from([9, 8, 7]));
  });
  step("connecting");
  await connected(socket);
  step("echo json");
  const json = await call(socket, "echo", "a", 1, { b: [true, null, 2.5] });
  step("echo binary");
  const binary = await call(
    socket,
    "echo",
    pattern(256, 256),
    { nested: Buffer.from("roomcast"), label: "x", list: [pattern(65536, 251)] },
    "text",
  );
  step("echo nothing");
  const nothing = await call(socket, "echo");
  step("ping-me");
  const answered = once(socket, "client-answered");
  const pingAck = await call(socket, "ping-me");
  const clientAnswered = await answered;
  const transport = socket.io.engine.transport.name;
  socket.disconnect();
  return {
    transport,
    json,
    binary: describe(binary),
    nothing,
    asked,
    pingAck,
    clientAnswered: describe(clientAnswered),
  };
});
