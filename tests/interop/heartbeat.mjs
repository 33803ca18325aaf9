// Heartbeat: stay connected through several server pings, then still answer an echo.
// Config: {url, token, pings, transports?: string[]}
import { call, config, connected, io, options, run, step } from "./lib.mjs";

const cfg = config();

run(async () => {
  const extra = cfg.transports ? { transports: cfg.transports } : {};
  const socket = io(cfg.url, options({ auth: { token: cfg.token }, ...extra }));
  const disconnects = [];
  socket.on("disconnect", (reason) => disconnects.push(reason));
  step("connecting");
  await connected(socket);
  const engine = socket.io.engine;
  const engineId = engine.id;
  step("waiting for pings");
  await new Promise((resolve) => {
    let pings = 0;
    engine.on("ping", () => {
      pings += 1;
      if (pings === cfg.pings) {
        resolve();
      }
    });
  });
  step("echo");
  const echo = await call(socket, "echo", "alive");
  const result = {
    engineIdUnchanged: socket.io.engine === engine && engine.id === engineId,
    connected: socket.connected,
    disconnects: [...disconnects],
    echo,
    transport: engine.transport.name,
  };
  socket.disconnect();
  return result;
});
