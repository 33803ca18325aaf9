// Two clients against the container image: one that starts on polling and upgrades, one that
// stays on polling; both send the allowed Origin, join one room and receive one publication.
// Config: {url, opsUrl (the listener of the publish API), token, apiKey, room, origin}
import { call, config, connected, describe, io, once, options, run, step } from "./lib.mjs";

const cfg = config();

function client(extra) {
  return io(
    cfg.url,
    options({ auth: { token: cfg.token }, extraHeaders: { Origin: cfg.origin }, ...extra }),
  );
}

run(
  async () => {
    const upgrading = client({});
    const polling = client({ transports: ["polling"] });
    step("connecting");
    await Promise.all([connected(upgrading), connected(polling)]);
    if (upgrading.io.engine.transport.name !== "websocket") {
      step("upgrading");
      await once(upgrading.io.engine, "upgrade");
    }
    step("joining");
    const joins = [await call(upgrading, "join", cfg.room), await call(polling, "join", cfg.room)];
    const received = Promise.all([once(upgrading, "news"), once(polling, "news")]);
    step("publishing");
    const response = await fetch(`${cfg.opsUrl}/api/v1/publish`, {
      method: "POST",
      headers: {
        Authorization: `Bearer ${cfg.apiKey}`,
        "Content-Type": "application/json",
      },
      body: JSON.stringify({ room: cfg.room, event: "news", data: { from: "image", n: 1 } }),
    });
    const published = { status: response.status, body: await response.json() };
    step("receiving");
    const news = await received;
    const transports = [upgrading.io.engine.transport.name, polling.io.engine.transport.name];
    upgrading.disconnect();
    polling.disconnect();
    return { joins, published, news: describe(news), transports };
  },
  { timeoutMs: 20_000 },
);
