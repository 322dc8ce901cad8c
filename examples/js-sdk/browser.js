// QuickBlox's official JavaScript SDK, its browser build (quickblox.min.js,
// unchanged), in headless Chromium: two users log in to chat through
// qbproxy over XMPP over WebSocket on TLS (wss://, what browsers use),
// with a placeholder password; one sends, the other hears. Run by
// ./run.sh after sdk.js, against the same `qbproxy demo --tls`:
//
//   HOME=<a home whose NSS database trusts the demo's CA> \
//   QB_CHAT_WS=wss://127.0.0.1:5291 QB_APP_ID=76730 node browser.js
//
// Chromium trusts the demo's throw-away CA as a user installs one: in the
// NSS database of its home (run.sh makes one with certutil), so the
// certificate is checked as any other. The page is served from 127.0.0.1
// (an app on the local network): Chromium's local network access rules
// keep a page of no address (about:blank) from opening a WebSocket to a
// loopback port at all.
'use strict';

const http = require('http');
const { chromium } = require('playwright-core');

const ws = process.env.QB_CHAT_WS;
const appId = Number(process.env.QB_APP_ID || 76730);

(async () => {
  if (!ws) {
    console.log('FAIL browser: QB_CHAT_WS is needed (run ./run.sh)');
    process.exit(1);
  }
  const browser = await chromium.launch({
    executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
    // As root, Chromium runs only without its sandbox.
    args: process.getuid && process.getuid() === 0 ? ['--no-sandbox'] : [],
  });
  const app = http.createServer((req, res) => {
    res.writeHead(200, { 'content-type': 'text/html' });
    res.end('<!doctype html><title>an app using the QuickBlox SDK</title>');
  });
  await new Promise((resolve) => app.listen(0, '127.0.0.1', resolve));
  let ok = false;
  try {
    const page = await browser.newPage();
    page.on('pageerror', (e) => console.log(`page error: ${e.message}`));
    page.on('console', (m) => { if (process.env.QB_BROWSER_DEBUG) console.log(`page: ${m.text()}`); });
    await page.goto(`http://127.0.0.1:${app.address().port}/`);
    await page.addScriptTag({ path: require.resolve('quickblox/quickblox.min.js') });
    const said = await page.evaluate(async ({ ws, appId, debug }) => {
      // The WebSocket URL names 127.0.0.1; the JID's domain is a name the
      // demo's certificate holds.
      const user = (userId) => new Promise((resolve, reject) => {
        const qb = new QB.QuickBlox();
        qb.init('placeholder-token-qbproxy-replaces-it', appId, null, {
          endpoints: { api: '127.0.0.1:1', chat: 'localhost' },
          chatProtocol: { active: 2, websocket: ws },
          debug: { mode: debug ? 1 : 0 },
        });
        const timer = setTimeout(() => reject(new Error(`user ${userId}: no login within 10 s`)), 10000);
        qb.chat.connect({ userId, password: 'placeholder' }, (err) => {
          clearTimeout(timer);
          if (err) reject(new Error(`user ${userId}: ${JSON.stringify(err)}`));
          else resolve(qb);
        });
      });
      const a = await user(1001);
      const b = await user(1002);
      const heard = new Promise((resolve, reject) => {
        const timer = setTimeout(() => reject(new Error('no message within 10 s')), 10000);
        b.chat.onMessageListener = (userId, message) => {
          clearTimeout(timer);
          resolve({ userId, body: message.body });
        };
      });
      a.chat.send(a.chat.helpers.getUserJid(1002, appId), {
        type: 'chat', body: 'hello from a browser', extension: { save_to_history: 1 },
      });
      const got = await heard;
      a.chat.disconnect();
      b.chat.disconnect();
      return got;
    }, { ws, appId, debug: Boolean(process.env.QB_BROWSER_DEBUG) });
    ok = said.userId === 1001 && said.body === 'hello from a browser';
    console.log(`${ok ? 'ok  ' : 'FAIL'} browser chat over wss: 1002 heard ${said.userId}: "${said.body}"`);
  } catch (e) {
    console.log(`FAIL browser chat over wss: ${e.message}`);
  } finally {
    await browser.close();
    app.close();
  }
  process.exit(ok ? 0 : 1);
})();
