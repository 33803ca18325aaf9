// One client over the given transports: connect, join, receive a published event, echo.
// Config: {url, token, apiKey, room, transports?: string[], expectUpgrade?: boolean}
import { call, config, connected, describe, io, once, options, run, step } from "./lib.mjs";

const cfg = config();

run(async () => {
  const extra = cfg.transports ? { transports: cfg.transports } : {};
  const socket = io(cfg.url, options({ auth: { token: cfg.token }, ...extra }));
  let transportAtOpen = null;
  const upgrades = [];
  socket.io.on("open", () => {
    transportAtOpen = socket.io.engine.transport.name;
    socket.io.engine.on("upgrade", (transport) => upgrades.push(transport.name));
  });
  step("connecting");
  await connected(socket);
  const engine = socket.io.engine;
  const transportAtConnect = engine.transport.name;
  if (cfg.expectUpgrade && engine.transport.name !== "websocket") {
    step("upgrading");
    await once(engine, "upgrade");
  }
  step("joining");
  const join = await call(socket, "join", cfg.room);
  const received = once(socket, "news");
  step("publishing");
  const response = await fetch(`${cfg.url}/api/v1/publish`, {
    method: "POST",
    headers: { Authorization: `Bearer ${cfg.apiKey}`, "Content-Type": "application/json" },
    body: JSON.stringify({ room: cfg.room, event: "news", data: { headline: "héllo", n: 1 } }),
  });
  const published = { status: response.status, body: await response.json() };
  step("receiving");
  const news = await received;
  step("echo");
  const echo = await call(socket, "echo", { text: "ünïcode ✓", list: [1, 2.5, null, true] });
  const transportAfter = engine.transport.name;
  const sid = socket.id;
  socket.disconnect();
  return {
    sid,
    transportAtOpen,
    transportAtConnect,
    transportAfter,
    upgrades,
    join,
    published,
    news: describe(news),
    echo,
  };
});
