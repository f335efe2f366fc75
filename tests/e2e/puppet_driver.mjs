// A real Wechaty puppet service (wechaty-puppet-service) with the official mock puppet behind it,
// driven by the tests: JSON commands on stdin, what happened as JSON lines on stdout.
//
//   node puppet_driver.mjs
//   env: WB_NODE_MODULES (required: the node_modules holding the packages, see install_peers.sh), WB_PORT (required), WB_TOKEN (required), WB_TLS=1 (the service's default TLS, the community
//        CA's "insecure" server certificate), WB_AUTO_LOGIN=1 (log the bot in on every Start; else a
//        scan event is emitted on Start and the bot logs in on {"op": "login"})
//
// The world: the bot "bot" (name "Bot"), contacts "alice", "bob", "carol", and one room
// "room1@chatroom" (topic "Team Room", members bot, alice, bob). Mock room ids must contain "@".
// Contacts and the room are created here, once, not in the mock's environment function (that runs on
// every Start).
//
// Commands (one JSON object a line):
//   {"op": "say", "from": "alice", "room": "room1@chatroom", "text": "hi", "mentions": ["bot"], "id"?: "m1"}
//   {"op": "say", "from": "alice", "to": "bot", "text": "hi"}                     a direct message
//   {"op": "file", "from": "alice", "room": "...", "name": "a.txt", "base64": "..."}
//   {"op": "join", "room": "...", "who": ["carol"], "by": "alice"}
//   {"op": "leave", "room": "...", "who": ["carol"], "by": "alice"}
//   {"op": "topic", "room": "...", "text": "New topic", "by": "alice"}
//   {"op": "replay", "id": "m1"}       emit the message event again for a message (a re-sending puppet)
//   {"op": "scan"} | {"op": "login"} | {"op": "logout"}
// Output (one JSON object a line):
//   {"ev": "listening", "port": N}
//   {"ev": "message", "id", "talker", "room", "listener", "text", "mentions", "type", "file"?: {"name", "base64"}}
//     for every message in the world (the contacts' and the bot's own)
//   {"ev": "ok", "op": ...} after each command; {"ev": "error", "op", "error"} when one failed
import readline from 'node:readline'
import { createRequire } from 'node:module'

// the packages live in a cache outside the repo: load them from there (their CommonJS builds)
const require = createRequire(process.env.WB_NODE_MODULES.replace(/\/?$/, '/'))
const { PuppetServer } = require('wechaty-puppet-service')
const { PuppetMock, mock } = require('wechaty-puppet-mock')
const PUPPET = require('wechaty-puppet')
const { FileBox } = require('file-box')

const port = Number(process.env.WB_PORT)
const token = process.env.WB_TOKEN
const tls = process.env.WB_TLS === '1'
const autoLogin = process.env.WB_AUTO_LOGIN === '1'
const out = (obj) => process.stdout.write(JSON.stringify(obj) + '\n')

let seq = 0
const newId = () => `msg-${process.pid}-${Date.now()}-${++seq}`

// The stock mock's messageSendText drops the mention list and returns no id: this one keeps both.
class PuppetMockMentions extends PuppetMock {
  async messageSendText (conversationId, text, mentionIdList) {
    if (!this.isLoggedIn) throw new Error('not logged in')
    const payload = {
      id: newId(),
      talkerId: this.currentUserId,
      timestamp: Date.now(),
      type: PUPPET.types.Message.Text,
      text,
    }
    if (/@/.test(conversationId)) {
      this.mocker.RoomMock.load(conversationId)
      Object.assign(payload, { roomId: conversationId, mentionIdList: mentionIdList || [] })
    } else {
      this.mocker.ContactMock.load(conversationId)
      payload.listenerId = conversationId
    }
    const msg = this.mocker.MessageMock.create(payload)
    this.emit('message', { messageId: msg.id })
    return msg.id
  }
}

const mocker = new mock.Mocker()
const puppet = new PuppetMockMentions({ mocker })
const contacts = {}
for (const [id, name] of [['bot', 'Bot'], ['alice', 'Alice'], ['bob', 'Bob'], ['carol', 'Carol']]) {
  contacts[id] = mocker.createContact({ id, name })
}
const rooms = {}
rooms['room1@chatroom'] = mocker.createRoom({
  id: 'room1@chatroom', topic: 'Team Room', memberIdList: ['bot', 'alice', 'bob'],
})

mocker.use((m) => {
  if (autoLogin) m.login(contacts.bot)
  else m.scan('https://login.example.invalid/qr/' + process.pid, PUPPET.types.ScanStatus.Waiting)
})

async function describe (msg) {
  const p = msg.payload
  const ev = {
    ev: 'message', id: p.id, talker: p.talkerId, room: p.roomId || null, listener: p.listenerId || null,
    text: p.text || '', mentions: p.mentionIdList || [], type: p.type,
  }
  if (p.type !== PUPPET.types.Message.Text) {
    try {
      const box = await msg.toFileBox()
      ev.file = { name: box.name, base64: await box.toBase64() }
    } catch (e) {
      ev.file = { error: String(e && e.message) }
    }
  }
  return ev
}
for (const target of [...Object.values(contacts), ...Object.values(rooms)]) {
  target.on('message', (msg) => {
    // a room message reaches the room and its talker: report it once, from the room or (direct) the listener
    const p = msg.payload
    if (p.roomId ? target !== rooms[p.roomId] : target.id !== p.listenerId) return
    describe(msg).then(out, (e) => out({ ev: 'error', op: 'observe', error: String(e) }))
  })
}

function emitMessage (payload) {
  const msg = mocker.MessageMock.create(payload)
  puppet.emit('message', { messageId: msg.id })
}

const ops = {
  say (c) {
    const base = { id: c.id || newId(), talkerId: c.from, timestamp: Date.now(), type: PUPPET.types.Message.Text, text: c.text }
    if (c.room) emitMessage({ ...base, roomId: c.room, mentionIdList: c.mentions || [] })
    else emitMessage({ ...base, listenerId: c.to })
  },
  file (c) {
    // as ContactMock.say(fileBox) does, but typed by the name's extension (say() types most files Unknown)
    const box = FileBox.fromBase64(c.base64, c.name)
    const id = c.id || newId()
    mocker.cacheFileBoxPayload.set(id, box.toJSON())
    const type = /\.(png|jpe?g)$/i.test(c.name) ? PUPPET.types.Message.Image : PUPPET.types.Message.Attachment
    const base = { id, talkerId: c.from, timestamp: Date.now(), type }
    if (c.room) emitMessage({ ...base, roomId: c.room, mentionIdList: [] })
    else emitMessage({ ...base, listenerId: c.to })
  },
  join (c) { rooms[c.room].add(...c.who.map((w) => contacts[w])).by(contacts[c.by]) },
  leave (c) { rooms[c.room].remove(...c.who.map((w) => contacts[w])).by(contacts[c.by]) },
  topic (c) { rooms[c.room].topic(c.text).by(contacts[c.by]) },
  replay (c) { puppet.emit('message', { messageId: c.id }) },
  scan () { mocker.scan('https://login.example.invalid/qr/' + process.pid, PUPPET.types.ScanStatus.Waiting) },
  login () { mocker.login(contacts.bot) },
  async logout () { await puppet.logout() },
}

const server = new PuppetServer({
  puppet, token, endpoint: `127.0.0.1:${port}`, tls: tls ? {} : { disable: true },
})
await server.start()
out({ ev: 'listening', port })

const rl = readline.createInterface({ input: process.stdin })
rl.on('line', async (line) => {
  if (!line.trim()) return
  let c
  try {
    c = JSON.parse(line)
    await ops[c.op](c)
    out({ ev: 'ok', op: c.op })
  } catch (e) {
    out({ ev: 'error', op: c && c.op, error: String(e && e.stack || e) })
  }
})
rl.on('close', async () => {
  await server.stop()
  process.exit(0)
})
