// Namespaces multiplexed over one Manager: "/" and "/admin" connect, "/nope" is refused.
// Config: {url, token}
import { Manager } from "socket.io-client";
import { call, config, connectError, connected, io, once, options, run, step } from "./lib.mjs";

const cfg = config();

run(async () => {
  const manager = new Manager(cfg.url, { reconnection: false, timeout: 5_000 });
  const main = manager.socket("/", { auth: { token: cfg.token } });
  const admin = manager.socket("/admin", { auth: { token: cfg.token } });
  const welcome = once(admin, "admin-welcome");
  step("connecting");
  await Promise.all([connected(main), connected(admin)]);
  step("welcome");
  const adminWelcome = await welcome;
  const sameEngine = main.io.engine === admin.io.engine;
  const ids = { main: main.id, admin: admin.id };
  step("unknown namespace");
  const unknown = manager.socket("/nope", { auth: { token: cfg.token } });
  const unknownError = await connectError(unknown);
  step("after refusal");
  const mainEcho = await call(main, "echo", "still here");
  const adminJoin = await call(admin, "join", "doc:1");
  const stillConnected = { main: main.connected, admin: admin.connected };
  step("admin without token");
  const anonymous = io(`${cfg.url}/admin`, options());
  const anonymousError = await connectError(anonymous);
  anonymous.disconnect();
  manager.engine.close();
  return {
    ids,
    sameEngine,
    adminWelcome,
    unknownError,
    mainEcho,
    adminJoin,
    stillConnected,
    anonymousError,
  };
});
