// Connect attempts with tokens passed in different ways; each reports its outcome.
// Config: {url, cases: [{name, via: "auth"|"query"|"header"|"none", token?, transports?}]}
import { call, config, io, options, run, step } from "./lib.mjs";

const cfg = config();

function carry(via, token) {
  switch (via) {
    case "auth":
      return { auth: { token } };
    case "query":
      return { query: { token } };
    case "header":
      return { extraHeaders: { Authorization: `Bearer ${token}` } };
    case "none":
      return {};
    default:
      throw new Error(`unknown way to pass a token: ${via}`);
  }
}

run(async () => {
  const results = {};
  for (const c of cfg.cases) {
    step(c.name);
    const extra = c.transports ? { transports: c.transports } : {};
    const socket = io(cfg.url, options({ ...carry(c.via, c.token), ...extra }));
    const outcome = await new Promise((resolve) => {
      socket.once("connect", () => resolve({ connected: true }));
      socket.once("connect_error", (err) =>
        resolve({ connected: false, message: err.message, data: err.data ?? null }),
      );
    });
    if (outcome.connected) {
      outcome.transport = socket.io.engine.transport.name;
      outcome.join = (await call(socket, "join", "doc:1"))[0];
    }
    socket.disconnect();
    results[c.name] = outcome;
  }
  return results;
});
