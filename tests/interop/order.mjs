// Join a room, report "joined", then record every server event until an "end" event.
// Config: {url, token, room, transports?: string[], expectUpgrade?: boolean}
import { call, config, connected, io, once, options, run, step } from "./lib.mjs";

const cfg = config();

run(async () => {
  const extra = cfg.transports ? { transports: cfg.transports } : {};
  const socket = io(cfg.url, options({ auth: { token: cfg.token }, ...extra }));
  const events = [];
  socket.onAny((event, ...args) => events.push({ event, args }));
  step("connecting");
  await connected(socket);
  const end = once(socket, "end");
  const join = await call(socket, "join", cfg.room);
  step("joined", { join });
  await end;
  if (cfg.expectUpgrade && socket.io.engine.transport.name !== "websocket") {
    step("upgrading");
    await once(socket.io.engine, "upgrade");
  }
  const transport = socket.io.engine.transport.name;
  socket.disconnect();
  return { events, transport };
});
