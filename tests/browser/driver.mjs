// Opens tests/browser/page.html in Debian's chromium (through playwright-core, which brings no
// browser of its own) and reports what the page's socket.io-client saw; run by
// tests/test_browser.py.
//
// Config (the one JSON argument):
//   {pageUrl, chromium, userDataDir, expect: "fenced" | "connect_error",
//    echo?: any, awaitTransport?: string, timeoutMs?: number}
//
// Output: one JSON object per line, like the scripts of tests/interop:
//   {"step": "ready", ...}     the page connected and joined: pytest publishes now, then the fence
//   {"ok": true, "result": {...}} or {"ok": false, "error": "...", "step": "..."} (always last)
import { chromium } from "playwright-core";

const cfg = JSON.parse(process.argv[2] ?? "null");
if (!cfg) {
  throw new Error("usage: node driver.mjs '<json config>'");
}
const timeoutMs = cfg.timeoutMs ?? 20_000;
const deadline = Date.now() + timeoutMs;

// The flags the project's brief asks for: no sandbox (root, containers), no GPU, and no network
// traffic of the browser's own (updates, sync, QUIC probes) that could slow or disturb a test.
const CHROMIUM_ARGS = [
  "--headless",
  "--no-sandbox",
  "--disable-gpu",
  "--disable-quic",
  "--no-first-run",
  "--disable-background-networking",
  "--disable-component-update",
  "--disable-sync",
];

let currentStep = "start";
let context = null;
const console_ = [];

function report(value) {
  process.stdout.write(`${JSON.stringify(value)}\n`);
}

function step(name, extra = {}) {
  currentStep = name;
  report({ step: name, ...extra });
}

/** Milliseconds left before the driver's own deadline (at least 1). */
function left() {
  return Math.max(deadline - Date.now(), 1);
}

async function finish(line, code) {
  clearTimeout(timer);
  if (context) {
    // Bounded: a browser that does not close is killed by playwright-core when the process exits.
    await Promise.race([context.close().catch(() => {}), new Promise((r) => setTimeout(r, 3_000))]);
  }
  report(line);
  process.stdout.write("", () => process.exit(code));
}

const timer = setTimeout(() => {
  finish({ ok: false, error: `timeout after ${timeoutMs} ms`, step: currentStep, console: console_ }, 2);
}, timeoutMs);

/** The page's window.state (a JSON copy). */
function pageState(page) {
  return page.evaluate(() => JSON.parse(JSON.stringify(window.state ?? null)));
}

/** Wait until the page's state.phase is one of `phases`; return the state. */
async function phase(page, phases) {
  try {
    await page.waitForFunction((wanted) => wanted.includes(window.state?.phase), phases, {
      timeout: left(),
      polling: 20,
    });
  } catch (error) {
    const state = await pageState(page).catch(() => null);
    throw new Error(`page never reached ${phases.join(" or ")}: ${error.message}; state: ${JSON.stringify(state)}`);
  }
  return pageState(page);
}

async function main() {
  step("launching");
  context = await chromium.launchPersistentContext(cfg.userDataDir, {
    executablePath: cfg.chromium,
    headless: true,
    args: CHROMIUM_ARGS,
    timeout: left(),
  });
  const page = context.pages()[0] ?? (await context.newPage());
  page.on("console", (msg) => console_.push(`${msg.type()}: ${msg.text()}`));
  page.on("pageerror", (error) => console_.push(`pageerror: ${error.message}`));

  step("connecting");
  await page.goto(cfg.pageUrl, { timeout: left() });
  let state = await phase(page, ["ready", "connect_error", "failed"]);
  if (cfg.expect === "connect_error") {
    return { state, console: console_ };
  }
  if (state.phase !== "ready") {
    throw new Error(`page did not get ready: ${JSON.stringify(state)}; console: ${JSON.stringify(console_)}`);
  }
  step("ready", { transports: state.transports, join: state.join });

  // pytest publishes its events and then the "fence" event, which arrives after them.
  state = await phase(page, ["fenced", "failed", "connect_error"]);
  if (state.phase !== "fenced") {
    throw new Error(`page failed before the fence: ${JSON.stringify(state)}`);
  }
  step("echo");
  const echo = await page.evaluate((value) => window.echo(value), cfg.echo ?? null);

  let upgraded = null;
  if (cfg.awaitTransport) {
    step("awaiting-transport");
    // Bounded; if it never happens the result says which transport the engine kept.
    upgraded = await page
      .waitForFunction((name) => window.socket.io.engine?.transport?.name === name, cfg.awaitTransport, {
        timeout: Math.min(left() - 1_000, 5_000),
        polling: 20,
      })
      .then(
        () => true,
        () => false,
      );
  }
  const final = await page.evaluate(() => ({
    transport: window.socket.io.engine.transport.name,
    id: window.socket.id,
    connected: window.socket.connected,
  }));
  state = await pageState(page);
  await page.evaluate(() => window.socket.disconnect());
  return { state, echo, upgraded, final, console: console_ };
}

main().then(
  (result) => finish({ ok: true, result }, 0),
  (error) => finish({ ok: false, error: String(error?.stack ?? error), step: currentStep, console: console_ }, 1),
);
