// Drive the Chester page in headless Chromium (the system one) with playwright-core:
//   node tests/web_driver.cjs URL [SCREENSHOT.png]
// Waits until the page reports done/rejected/error in #status, prints one JSON line with the
// status, the OOD score, the result rows (from the DOM) and every URL the page requested.
"use strict";
const fs = require("fs");
const os = require("os");
const path = require("path");
const { chromium } = require(process.env.PLAYWRIGHT_CORE || "playwright-core");

const FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
  "--disable-background-networking", "--disable-component-update", "--disable-sync"];

(async () => {
  const [url, shot] = process.argv.slice(2);
  const userDir = fs.mkdtempSync(path.join(os.tmpdir(), "chester-chromium-"));
  const ctx = await chromium.launchPersistentContext(userDir, {
    executablePath: process.env.CHROMIUM || "/usr/bin/chromium", headless: true, args: FLAGS,
    viewport: { width: 1100, height: 760 },
  });
  const requests = [];
  const consoleLines = [];
  try {
    const page = await ctx.newPage();
    page.on("request", (r) => requests.push(r.url()));
    page.on("console", (m) => consoleLines.push(m.text()));
    await page.goto(url);
    await page.waitForSelector('#status[data-state="done"], #status[data-state="rejected"], #status[data-state="error"]',
      { timeout: 120000 });
    const result = await page.evaluate(() => ({
      state: document.getElementById("status").dataset.state,
      text: document.getElementById("status").textContent,
      ood: document.getElementById("ood").dataset.score,
      rows: [...document.querySelectorAll("#results li")].map((li) => ({ ...li.dataset })),
      legend: { mapping: document.getElementById("legend")?.dataset.mapping,
                text: document.getElementById("legend")?.textContent },
      cam: { empty: document.getElementById("camlabel").dataset.empty,
             text: document.getElementById("camlabel").textContent },
    }));
    if (shot) await page.screenshot({ path: shot, fullPage: true });
    console.log(JSON.stringify({ ...result, requests, console: consoleLines }));
  } finally {
    await ctx.close();
    fs.rmSync(userDir, { recursive: true, force: true });
  }
})().catch((err) => { console.error(err); process.exit(1); });
