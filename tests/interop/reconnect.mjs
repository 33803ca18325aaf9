// Automatic reconnection: report "connected", let pytest restart the server on the same port,
// then wait for the second "connect", join again and receive a published event.
// Config: {url, token, apiKey, room, transports?: string[]}
import { call, config, io, once, run, step } from "./lib.mjs";

const cfg = config();

run(
  async () => {
    const extra = cfg.transports ? { transports: cfg.transports } : {};
    const socket = io(cfg.url, {
      forceNew: true,
      auth: { token: cfg.token },
      reconnection: true,
      reconnectionDelay: 100,
      reconnectionDelayMax: 300,
      randomizationFactor: 0,
      timeout: 5_000,
      ...extra,
    });
    let connects = 0;
    let connectErrors = 0;
    const disconnects = [];
    let second;
    const reconnected = new Promise((resolve) => {
      second = resolve;
    });
    socket.on("connect", () => {
      connects += 1;
      if (connects === 2) {
        second();
      }
    });
    socket.on("connect_error", () => {
      connectErrors += 1;
    });
    socket.on("disconnect", (reason) => disconnects.push(reason));
    step("connecting");
    await once(socket, "connect");
    const firstSid = socket.id;
    const join1 = await call(socket, "join", cfg.room);
    step("connected", { sid: firstSid, join: join1 });
    await reconnected;
    step("reconnected");
    const join2 = await call(socket, "join", cfg.room);
    const news = once(socket, "news");
    const response = await fetch(`${cfg.url}/api/v1/publish`, {
      method: "POST",
      headers: { Authorization: `Bearer ${cfg.apiKey}`, "Content-Type": "application/json" },
      body: JSON.stringify({ room: cfg.room, event: "news", data: { after: "restart" } }),
    });
    await response.json();
    step("receiving");
    const received = await news;
    const result = {
      connects,
      connectErrors,
      disconnects: [...disconnects],
      firstSid,
      secondSid: socket.id,
      recovered: socket.recovered,
      join1,
      join2,
      publishStatus: response.status,
      received: received[0],
    };
    socket.disconnect();
    return result;
  },
  { timeoutMs: 20_000 },
);
