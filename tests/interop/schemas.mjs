// Event schemas: invalid payloads, with and without acks, never reach the upstream stream, a
// handler or a room; valid ones do. Config: {url, publisher, reader, room}.
// After step "clients done", pytest publishes (API and raw XADD, valid and not) and ends
// with the event "end" to the room.
import { call, config, connected, io, once, options, run, step } from "./lib.mjs";

const cfg = config();

run(async () => {
  const alice = io(cfg.url, options({ auth: { token: cfg.publisher } }));
  const bob = io(cfg.url, options({ auth: { token: cfg.reader } }));
  const bobEvents = [];
  bob.onAny((event, ...args) => bobEvents.push({ event, data: args[0] }));
  step("connecting");
  await Promise.all([connected(alice), connected(bob)]);
  const joins = [(await call(alice, "join", cfg.room))[0], (await call(bob, "join", cfg.room))[0]];

  step("upstream");
  const chat = {
    valid: (await call(alice, "chat", { text: "hi" }))[0],
    invalid: (await call(alice, "chat", { text: 5, extra: true }))[0],
    tooLong: (await call(alice, "chat", { text: "x".repeat(51) }))[0],
    twoArgs: (await call(alice, "chat", { text: "a" }, { text: "b" }))[0],
  };
  alice.emit("chat", { text: 6 }); // invalid, no ack: dropped
  alice.emit("chat", { text: "no ack" }); // valid, no ack: stored
  chat.last = (await call(alice, "chat", { text: "last" }))[0];

  step("handler");
  const rename = {
    valid: await call(alice, "rename", { name: "Alice" }),
    invalid: await call(alice, "rename", { name: "" }),
    wrongType: await call(alice, "rename", "Alice"),
  };
  alice.emit("rename", { name: 7 }); // invalid, no ack: dropped
  rename.after = await call(alice, "rename", { name: "Bob" });

  step("client publish");
  const bobGotNote = once(bob, "note");
  const publish = {
    invalid: (await call(alice, "publish", { room: cfg.room, event: "note", data: { text: [] } }))[0],
    valid: (await call(alice, "publish", { room: cfg.room, event: "note", data: { text: "client ok" } }))[0],
  };
  await bobGotNote;

  const end = once(bob, "end");
  step("clients done");
  await end;
  alice.disconnect();
  bob.disconnect();
  return { joins, chat, rename, publish, bobEvents };
});
