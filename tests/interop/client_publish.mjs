// Client publishing: a token with a publish claim reaches the other members (not itself);
// one without it, or to another room, is refused.
// Config: {url, publisher, reader, apiKey, room, otherRoom}
import { call, config, connected, io, once, options, run, step } from "./lib.mjs";

const cfg = config();

run(async () => {
  const alice = io(cfg.url, options({ auth: { token: cfg.publisher } }));
  const bob = io(cfg.url, options({ auth: { token: cfg.reader } }));
  const events = { alice: [], bob: [] };
  alice.onAny((event, ...args) => events.alice.push({ event, data: args[0] }));
  bob.onAny((event, ...args) => events.bob.push({ event, data: args[0] }));
  step("connecting");
  await Promise.all([connected(alice), connected(bob)]);
  step("joining");
  const joins = [
    (await call(alice, "join", cfg.room))[0],
    (await call(bob, "join", cfg.room))[0],
    (await call(bob, "join", cfg.otherRoom))[0],
  ];
  step("publishing");
  const bobGotNote = once(bob, "note");
  const allowed = (await call(alice, "publish", { room: cfg.room, event: "note", data: { text: "hi" } }))[0];
  await bobGotNote;
  const forbidden = (await call(bob, "publish", { room: cfg.room, event: "note", data: { text: "no" } }))[0];
  const otherRoom = (await call(alice, "publish", { room: cfg.otherRoom, event: "note", data: 1 }))[0];
  const malformed = (await call(alice, "publish", { room: cfg.room, data: 1 }))[0];
  step("end marker");
  const ends = [once(alice, "end"), once(bob, "end")];
  const response = await fetch(`${cfg.url}/api/v1/publish`, {
    method: "POST",
    headers: { Authorization: `Bearer ${cfg.apiKey}`, "Content-Type": "application/json" },
    body: JSON.stringify({ room: cfg.room, event: "end", data: null }),
  });
  await response.json();
  await Promise.all(ends);
  alice.disconnect();
  bob.disconnect();
  return { joins, allowed, forbidden, otherRoom, malformed, events };
});
