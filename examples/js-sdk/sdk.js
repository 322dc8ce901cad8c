// QuickBlox's official JavaScript SDK (the `quickblox` npm package),
// unchanged, through qbproxy. It holds no application secret and no real
// session: it is initialised with a placeholder token, and qbproxy puts its
// own session on every call. Run it with ./run.sh, which starts
// `qbproxy demo --tls`, or by hand:
//
//   NODE_EXTRA_CA_CERTS=<the printed ca.pem> QB_API=127.0.0.1:8080 \
//   QB_APP_ID=76730 QB_SIM=http://127.0.0.1:8081 node sdk.js
'use strict';

const QB = require('quickblox');

const api = process.env.QB_API || '127.0.0.1:8080';
const appId = Number(process.env.QB_APP_ID || 76730);
const sim = process.env.QB_SIM; // the demo's simulator, to expire its sessions
const PLACEHOLDER = 'placeholder-token-qbproxy-replaces-it';

// Any token will do: qbproxy replaces it with the session it holds.
QB.init(PLACEHOLDER, appId, null, {
  endpoints: { api, chat: 'chat.invalid' },
  debug: { mode: 0 },
});

// The SDK's callbacks, as promises.
const call = (fn, ...args) =>
  new Promise((resolve, reject) =>
    fn(...args, (err, res) => (err ? reject(err) : resolve(res))));

let passed = 0;
let failed = 0;
async function step(name, body) {
  try {
    const said = await body();
    passed += 1;
    console.log(`ok   ${name}${said ? ': ' + said : ''}`);
  } catch (e) {
    failed += 1;
    console.log(`FAIL ${name}: ${e && (e.message || JSON.stringify(e))}`);
  }
}

function expect(what, ok) {
  if (!ok) throw new Error(`expected ${what}`);
}

// What the simulator received, from the echo it adds to every answer:
// the token that reached it is qbproxy's, never the placeholder.
function realToken(res) {
  const seen = res && res.echo && res.echo.headers && res.echo.headers['qb-token'];
  expect('the echo of a QB-Token', typeof seen === 'string');
  expect(`qbproxy's token, not the placeholder (saw ${seen})`, !PLACEHOLDER.startsWith(seen.replace('…', '')));
  return seen;
}

(async () => {
  let dialog;
  await step('users.listUsers', async () => {
    const res = await call(QB.users.listUsers.bind(QB.users), { page: 1, per_page: 10 });
    expect('users', res.items.length > 0 && res.items[0].user.login);
    return `${res.total_entries} users, upstream saw QB-Token ${realToken(res)}`;
  });
  await step('users.get', async () => {
    const user = await call(QB.users.get.bind(QB.users), 1001);
    expect('user 1001 is demo', user.id === 1001 && user.login === 'demo');
    return `user ${user.id} (${user.login})`;
  });
  await step('chat.dialog.create', async () => {
    dialog = await call(QB.chat.dialog.create.bind(QB.chat.dialog), {
      type: 2, name: 'through qbproxy', occupants_ids: [1002],
    });
    expect('a dialog id', typeof dialog._id === 'string' && dialog.name === 'through qbproxy');
    return `dialog ${dialog._id}`;
  });
  await step('chat.dialog.list', async () => {
    const res = await call(QB.chat.dialog.list.bind(QB.chat.dialog), {});
    expect('the new dialog listed', res.items.some((d) => d._id === dialog._id));
    return `${res.total_entries} dialog(s)`;
  });
  await step('chat.message.create', async () => {
    const msg = await call(QB.chat.message.create.bind(QB.chat.message), {
      chat_dialog_id: dialog._id, message: 'hello from the official SDK',
    });
    expect('a message in the dialog', msg._id && msg.chat_dialog_id === dialog._id);
    return `message ${msg._id}`;
  });
  let message;
  await step('chat.message.update', async () => {
    const listed = await call(QB.chat.message.list.bind(QB.chat.message), { chat_dialog_id: dialog._id });
    message = listed.items[0];
    await call(QB.chat.message.update.bind(QB.chat.message), message._id, {
      chat_dialog_id: dialog._id, message: 'edited through qbproxy',
    });
    const after = await call(QB.chat.message.list.bind(QB.chat.message), { chat_dialog_id: dialog._id });
    expect('the edited text', after.items[0].message === 'edited through qbproxy');
    return `message ${message._id} edited`;
  });
  await step('chat.message.delete', async () => {
    await call(QB.chat.message.delete.bind(QB.chat.message), message._id, {});
    const after = await call(QB.chat.message.list.bind(QB.chat.message), { chat_dialog_id: dialog._id });
    expect('the message gone', !after.items.some((m) => m._id === message._id));
    return `message ${message._id} deleted`;
  });
  await step('users.update', async () => {
    const user = await call(QB.users.update.bind(QB.users), 1001, { full_name: 'Demo, via the SDK' });
    const read = await call(QB.users.get.bind(QB.users), 1001);
    expect('the new name, read back', user.full_name === 'Demo, via the SDK' && read.full_name === user.full_name);
    return `user ${user.id} is now "${read.full_name}"`;
  });
  const notes = [];
  await step('data.create', async () => {
    for (const rank of [1, 2, 3]) {
      const note = await call(QB.data.create.bind(QB.data), 'Note', { title: `via qbproxy ${rank}`, rank });
      expect('a custom object', note._id && note.title === `via qbproxy ${rank}` && note.user_id === 1001);
      notes.push(note);
    }
    return `Notes ${notes.map((n) => n._id).join(', ')}`;
  });
  await step('data.list with a filter', async () => {
    const res = await call(QB.data.list.bind(QB.data), 'Note', { rank: { gt: 1 }, sort_desc: 'rank' });
    const ranks = res.items.map((n) => n.rank);
    expect(`ranks 3, 2 (got ${ranks})`, ranks.length === 2 && ranks[0] === 3 && ranks[1] === 2);
    return `rank > 1: ${ranks}`;
  });
  await step('data.update', async () => {
    const note = await call(QB.data.update.bind(QB.data), 'Note', { _id: notes[0]._id, title: 'updated' });
    const res = await call(QB.data.list.bind(QB.data), 'Note', { _id: notes[0]._id });
    expect('the update, read back', note.title === 'updated' && res.items[0].title === 'updated');
    return `Note ${note._id} updated`;
  });
  await step('data.delete', async () => {
    await call(QB.data.delete.bind(QB.data), 'Note', notes[0]._id);
    const res = await call(QB.data.list.bind(QB.data), 'Note', {});
    expect('the note gone', res.items.length === 2 && !res.items.some((n) => n._id === notes[0]._id));
    return `Note ${notes[0]._id} deleted, ${res.items.length} left`;
  });
  await step('content.createAndUpload', async () => {
    const data = Buffer.from('a file, through qbproxy\n');
    const blob = await call(QB.content.createAndUpload.bind(QB.content), {
      name: 'hello.txt', file: data, type: 'text/plain', size: data.length, public: false,
    });
    expect('a blob', blob.id && blob.uid);
    // The upload URL named qbproxy, so the file went through it with the
    // session's token: the simulator recorded its size and its uploader.
    const info = await call(QB.content.getInfo.bind(QB.content), blob.id);
    expect(`the file at the simulator, uploaded as user 1001 (got ${JSON.stringify(info.blob)})`,
      info.blob.uploaded_bytes === data.length && info.blob.uploaded_by === 1001
      && info.blob.blob_status === 'complete');
    return `blob ${blob.id}, ${info.blob.uploaded_bytes} bytes uploaded through qbproxy`;
  });
  await step('an expired session, unseen', async () => {
    expect('QB_SIM, the simulator to expire', sim);
    const before = realToken(await call(QB.users.listUsers.bind(QB.users), {}));
    const expired = await (await fetch(`${sim}/_sim/expire`, { method: 'POST' })).json();
    expect('sessions expired', expired.expired >= 1);
    // The same SDK, the same placeholder: qbproxy renews and replays.
    const res = await call(QB.users.listUsers.bind(QB.users), {});
    const after = realToken(res);
    expect(`a new session (${before} then ${after})`, before !== after);
    return `${expired.expired} session(s) expired; the call succeeded on a new one`;
  });
  // Chat: two users log in through qbproxy (XMPP over TCP with STARTTLS,
  // as the SDK speaks it in Node) with a placeholder password; qbproxy
  // logs them in with the sessions it holds. One sends, the other hears.
  const chatTcp = process.env.QB_CHAT_TCP; // host:port of qbproxy's chat-tcp
  const users = [];
  // An SDK instance logged in to chat as `userId`.
  const chatUser = async (userId) => {
    const qb = new QB.QuickBlox();
    qb.init(PLACEHOLDER, appId, null, {
      endpoints: { api, chat: 'localhost' },
      debug: { mode: 0 },
    });
    // Node's XMPP client connects to the JID's domain; point it at
    // qbproxy's port.
    qb.chat.Client.options.host = 'localhost';
    qb.chat.Client.options.port = Number(chatTcp.split(':')[1]);
    await call(qb.chat.connect.bind(qb.chat), { userId, password: PLACEHOLDER });
    return qb;
  };
  await step('chat.connect (two users)', async () => {
    expect('QB_CHAT_TCP, qbproxy\'s XMPP over TCP address', chatTcp);
    for (const userId of [1001, 1002]) {
      users.push(await chatUser(userId));
    }
    return 'users 1001 and 1002 logged in with sessions qbproxy holds';
  });
  const hear = (qb) => new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error('no message within 10 s')), 10000);
    qb.chat.onMessageListener = (userId, message) => {
      clearTimeout(timer);
      resolve({ userId, message });
    };
  });
  const say = (from, to, text) => {
    const heard = hear(users[1]);
    from.chat.send(from.chat.helpers.getUserJid(to, appId), {
      type: 'chat', body: text, extension: { save_to_history: 1 },
    });
    return heard;
  };
  await step('chat.send, heard by the other user', async () => {
    expect('two users connected', users.length === 2);
    const { userId, message } = await say(users[0], 1002, 'hello through qbproxy');
    expect(`the message from 1001 (got ${userId}: ${message.body})`,
      userId === 1001 && message.body === 'hello through qbproxy');
    return `1002 heard 1001: "${message.body}"`;
  });
  await step('chat after every session expired', async () => {
    expect('two users connected', users.length === 2);
    const expired = await (await fetch(`${sim}/_sim/expire`, { method: 'POST' })).json();
    expect('sessions expired', expired.expired >= 1);
    // The sender logs in again (a new SDK instance, as an app restarted):
    // its held token is dead, qbproxy renews it once and logs in with the
    // new one.
    users[0].chat.disconnect();
    users[0] = await chatUser(1001);
    const { message } = await say(users[0], 1002, 'again, on a renewed session');
    expect('the second message', message.body === 'again, on a renewed session');
    return `${expired.expired} session(s) expired; logged in again and heard`;
  });
  for (const qb of users) qb.chat.disconnect();
  console.log(`js-sdk: ${passed} passed, ${failed} failed`);
  process.exit(failed === 0 ? 0 : 1);
})();
