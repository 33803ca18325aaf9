// Join and leave: allowed, forbidden and invalid rooms; a left room delivers nothing more.
// Config: {url, token, apiKey}; the token's rooms claim is ["doc:*", "team:7:*", "org:**"].
import { call, config, connected, io, once, options, run, step } from "./lib.mjs";

const cfg = config();

async function publish(room, event, data) {
  const response = await fetch(`${cfg.url}/api/v1/publish`, {
    method: "POST",
    headers: { Authorization: `Bearer ${cfg.apiKey}`, "Content-Type": "application/json" },
    body: JSON.stringify({ room, event, data }),
  });
  await response.json();
  if (response.status !== 202) {
    throw new Error(`publish to ${room} answered ${response.status}`);
  }
}

run(async () => {
  const socket = io(cfg.url, options({ auth: { token: cfg.token } }));
  step("connecting");
  await connected(socket);
  const events = [];
  socket.onAny((event, ...args) => events.push({ event, data: args[0] }));
  const joins = {};
  const rooms = {
    allowed: "doc:1",
    allowedOneSegment: "team:7:a",
    allowedDeep: "org:1:a:b",
    allowedDeepOne: "org:1",
    forbiddenDeep: "team:7:a:b",
    forbiddenBelowDoc: "doc:1:x",
    forbiddenZeroSegments: "org",
    forbiddenEmptySegment: "team:7:",
    longest: `doc:${"a".repeat(252)}`,
    forbidden: "secret:1",
    forbiddenSibling: "team:8:a",
    space: "bad room",
    empty: "",
    tooLong: `doc:${"a".repeat(253)}`,
    notString: 42,
  };
  for (const [name, room] of Object.entries(rooms)) {
    step(`join ${name}`);
    joins[name] = (await call(socket, "join", room))[0];
  }
  step("join twice");
  joins.again = (await call(socket, "join", "doc:1"))[0];
  step("join doc:2");
  joins.second = (await call(socket, "join", "doc:2"))[0];
  step("leave");
  const leave = (await call(socket, "leave", "doc:1"))[0];
  const leaveInvalid = (await call(socket, "leave", "bad room"))[0];
  const leaveNotJoined = (await call(socket, "leave", "doc:never"))[0];
  step("publish after leave");
  const marker = once(socket, "marker");
  await publish("doc:1", "after-leave", { n: 1 });
  await publish("doc:2", "marker", { n: 2 });
  await marker;
  socket.disconnect();
  return { joins, leave, leaveInvalid, leaveNotJoined, events };
});
