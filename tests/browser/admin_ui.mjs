// Drives the Socket.IO Admin UI's own files (@socket.io/admin-ui's ui/dist, served by the caller)
// in Debian's chromium against a Roomcast server; run by tests/test_admin_ui.py and by
// benchmarks/admin_ui.py.
//
// Config (the one JSON argument):
//   {uiUrl, serverUrl, username, password, chromium, userDataDir, timeoutMs,
//    mode: "flow" | "measure", badPassword?, earlyId?, room?, expectSockets?, screenshot?,
//    viewport?: {width, height}}
//
// The UI loads two stylesheets from CDNs: the icon font (@mdi/font, served here from the npm
// package) and Roboto (answered with an empty stylesheet: the system font stands in). No other
// request leaves the machine.
//
// mode "flow" (the test), stdin carries pytest's answers, one JSON line each:
//   step "refused"       a wrong password got the UI's "Invalid credentials"
//   step "watching"      logged in, on the sockets page, the early socket listed
//   <stdin {"liveId"}>   pytest connected a socket after that
//   step "appeared"      its row is on the page (ms after pytest's line)
//   step "joined"        made to join `room` from its page; the page lists the room
//   <stdin {}>           pytest checked the join on the server
//   step "disconnected"  disconnected from its page; the page says so
//   step "reused"        a reload logs in again with the session id alone (no form)
// mode "measure" (the benchmark): log in, open the sockets page and report how long until the
//   table counts `expectSockets` sockets; the same after a reload; a next page; `screenshot`;
//   then step "holding" and stay `holdMs` on the page (the caller makes the gateway busy),
//   reporting the page's long tasks meanwhile; `dashboardScreenshot`, `serversScreenshot`.
//
// Output: one JSON object per line; the last is {"ok": true, "result": ...} or
// {"ok": false, "error", "step"}.
import { createInterface } from "node:readline";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import { chromium } from "playwright-core";

const HERE = dirname(fileURLToPath(import.meta.url));
const MDI = join(HERE, "node_modules", "@mdi", "font");
const cfg = JSON.parse(process.argv[2] ?? "null");
if (!cfg) {
  throw new Error("usage: node admin_ui.mjs '<json config>'");
}
const timeoutMs = cfg.timeoutMs ?? 60_000;
const deadline = Date.now() + timeoutMs;
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
const stdin = createInterface({ input: process.stdin });
const lines = [];
const lineWaiters = [];
stdin.on("line", (line) => {
  const waiter = lineWaiters.shift();
  if (waiter) {
    waiter(line);
  } else {
    lines.push(line);
  }
});

function report(value) {
  process.stdout.write(`${JSON.stringify(value)}\n`);
}

function step(name, extra = {}) {
  currentStep = name;
  report({ step: name, ...extra });
}

function left() {
  return Math.max(deadline - Date.now(), 1);
}

/** The next JSON line pytest writes on stdin. */
function nextLine() {
  const line = lines.shift();
  if (line !== undefined) {
    return Promise.resolve(JSON.parse(line));
  }
  return new Promise((resolve) => lineWaiters.push((text) => resolve(JSON.parse(text))));
}

async function finish(line, code) {
  clearTimeout(timer);
  stdin.close();
  if (context) {
    await Promise.race([context.close().catch(() => {}), new Promise((r) => setTimeout(r, 3_000))]);
  }
  report(line);
  process.stdout.write("", () => process.exit(code));
}

const timer = setTimeout(() => {
  finish({ ok: false, error: `timeout after ${timeoutMs} ms`, step: currentStep, console: console_.slice(-30) }, 2);
}, timeoutMs);

async function offline(ctx) {
  await ctx.route("**/*", (route) => {
    const url = new URL(route.request().url());
    if (url.hostname === "127.0.0.1" || url.hostname === "localhost") {
      return route.continue();
    }
    if (url.hostname === "cdn.jsdelivr.net" && url.pathname.includes("/@mdi/font")) {
      const rest = url.pathname.split("/").slice(-2).join("/"); // css/x.css or fonts/x.woff2
      return route.fulfill({ path: join(MDI, rest) });
    }
    if (url.hostname === "fonts.googleapis.com") {
      return route.fulfill({ status: 200, contentType: "text/css", body: "" });
    }
    return route.abort();
  });
}

/** Fill the UI's connection form and submit it. */
async function login(page, password) {
  const dialog = page.locator(".v-dialog--active");
  await dialog.waitFor({ timeout: left() });
  await dialog.getByLabel("Server URL").fill(cfg.serverUrl);
  await dialog.getByLabel("Username").fill(cfg.username);
  await dialog.getByLabel("Password").fill(password);
  await dialog.getByRole("button", { name: "Connect" }).click();
}

async function loggedIn(page) {
  await page.locator(".v-dialog--active").waitFor({ state: "detached", timeout: left() });
  await page.getByRole("link", { name: "Sockets" }).first().waitFor({ timeout: left() });
}

/** The ids in the sockets table, as listed. */
function listedIds(page) {
  return page.locator("table tbody tr td:first-child").allInnerTexts();
}

async function flow(page) {
  await page.goto(cfg.uiUrl, { timeout: left() });
  if (cfg.badPassword) {
    await login(page, cfg.badPassword);
    await page.getByText("Invalid credentials").waitFor({ timeout: left() });
    step("refused");
    await page.locator(".v-dialog--active").getByLabel("Password").fill("");
  }
  await login(page, cfg.password);
  await loggedIn(page);
  await page.getByRole("link", { name: "Sockets" }).first().click();
  const early = page.locator("table tbody tr", { hasText: cfg.earlyId });
  await early.waitFor({ timeout: left() });
  step("watching", { listed: await listedIds(page) });

  const { liveId } = await nextLine();
  const asked = Date.now();
  const row = page.locator("table tbody tr", { hasText: liveId });
  await row.waitFor({ timeout: left() });
  step("appeared", { ms: Date.now() - asked, listed: await listedIds(page) });

  await row.locator("td").first().click();
  await page.getByText("Socket details").first().waitFor({ timeout: left() });
  await page.getByText(liveId).first().waitFor({ timeout: left() });
  const roomsCard = page.locator(".v-card", { has: page.getByText("Join a room") }).last();
  await roomsCard.getByLabel("Join a room").fill(cfg.room);
  await roomsCard.locator("button[type=submit]").click();
  await roomsCard.locator("table tbody tr", { hasText: cfg.room }).waitFor({ timeout: left() });
  step("joined", { rooms: await roomsCard.locator("table tbody tr td:first-child").allInnerTexts() });

  await nextLine(); // pytest checked the membership on the server
  const socketCard = page.locator(".v-card", { has: page.getByText("Initial HTTP request") }).first();
  const details = page.locator(".v-card", { hasText: "Details" }).first();
  const socketRow = details.locator("tr", { hasText: "Status" }).last();
  await socketRow.locator("button").click();
  await socketRow.getByText("disconnected").waitFor({ timeout: left() });
  step("disconnected", { headers: await socketCard.locator("tbody tr").count() });

  const session = await page.evaluate(() => localStorage.getItem("session_id"));
  await page.reload({ timeout: left() });
  await loggedIn(page);
  step("reused", { session: session !== null && session !== "" });
  return { console: console_.slice(-30) };
}

function observeLongTasks(page) {
  return page.evaluate(() => {
    window.__longTasks = [];
    new PerformanceObserver((list) => {
      for (const entry of list.getEntries()) {
        window.__longTasks.push(Math.round(entry.duration));
      }
    }).observe({ type: "longtask", buffered: false });
  });
}

async function listed(page, count) {
  await page.locator(".v-data-footer__pagination", { hasText: `of ${count}` }).waitFor({ timeout: left() });
}

async function measure(page) {
  const count = cfg.expectSockets;
  await page.goto(cfg.uiUrl, { timeout: left() });
  await login(page, cfg.password);
  await loggedIn(page);
  step("logged_in");
  // From the click on "Sockets" to a table that counts every listed socket ("1-20 of N").
  let started = Date.now();
  await page.getByRole("link", { name: "Sockets" }).first().click();
  await listed(page, count);
  const sockets_page_ms = Date.now() - started;
  step("listed", { sockets_page_ms });
  // A reload: the session id logs in again, a fresh list arrives, the sockets page shows it.
  started = Date.now();
  await page.reload({ timeout: left() });
  await loggedIn(page);
  await page.getByRole("link", { name: "Sockets" }).first().click();
  await listed(page, count);
  const reload_to_list_ms = Date.now() - started;
  started = Date.now();
  await page.getByRole("button", { name: "Next page" }).click();
  await page.locator(".v-data-footer__pagination", { hasText: `21-40 of ${count}` }).waitFor({ timeout: left() });
  const next_page_ms = Date.now() - started;
  await page.getByRole("button", { name: "Previous page" }).click();
  await page.locator(".v-data-footer__pagination", { hasText: `1-20 of ${count}` }).waitFor({ timeout: left() });
  if (cfg.screenshot) {
    await page.screenshot({ path: cfg.screenshot });
  }
  // Held on the sockets page while the caller makes the gateway busy.
  await observeLongTasks(page);
  step("holding");
  await page.waitForTimeout(cfg.holdMs ?? 0);
  const held_long_tasks_ms = await page.evaluate(() => window.__longTasks);
  const held_footer = await page.locator(".v-data-footer__pagination").innerText();
  if (cfg.dashboardScreenshot) {
    await page.getByRole("link", { name: "Dashboard" }).first().click();
    await page.getByText("Connection and disconnection events").waitFor({ timeout: left() });
    await page.waitForTimeout(2_500); // the next stats, every 2 s
    await page.screenshot({ path: cfg.dashboardScreenshot });
  }
  if (cfg.serversScreenshot) {
    await page.getByRole("link", { name: "Servers" }).first().click();
    await page.getByText("Hostname").first().waitFor({ timeout: left() });
    await page.screenshot({ path: cfg.serversScreenshot });
  }
  return { sockets_page_ms, reload_to_list_ms, next_page_ms, held_long_tasks_ms, held_footer, console: console_.slice(-10) };
}

async function main() {
  step("launching");
  context = await chromium.launchPersistentContext(cfg.userDataDir, {
    executablePath: cfg.chromium,
    headless: true,
    args: CHROMIUM_ARGS,
    timeout: left(),
    viewport: cfg.viewport ?? { width: 1400, height: 1000 },
  });
  await offline(context);
  const page = context.pages()[0] ?? (await context.newPage());
  page.on("console", (msg) => console_.push(`${msg.type()}: ${msg.text()}`));
  page.on("pageerror", (error) => console_.push(`pageerror: ${error.message}`));
  return cfg.mode === "measure" ? measure(page) : flow(page);
}

main().then(
  (result) => finish({ ok: true, result }, 0),
  (error) => finish({ ok: false, error: String(error?.stack ?? error), step: currentStep, console: console_.slice(-30) }, 1),
);
