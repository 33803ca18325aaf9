// A minimal WebSocket client (RFC 6455) for the load generator's receive path.
//
// Why not the `ws` package: in the one-room-of-10,000 scenario the load
// generator must take 10,000 frames off 10,000 sockets per event, and with
// `ws` that cost ~16 us of load-generator CPU per frame, more than the server
// under test spends writing it, so the harness measured itself. This client
// reads every socket into one shared buffer (net's `onread`, no stream
// machinery, no Buffer per read) and parses the unmasked server frames in
// place. It supports what the benchmark needs and rejects the rest loudly:
// text/binary messages (fragmented or not), ping/pong, close; no extensions.

import { createHash, randomBytes } from "node:crypto";
import net from "node:net";

const GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";
const READ_BUFFER = Buffer.allocUnsafe(256 * 1024);
const MAX_HANDSHAKE_BYTES = 16 * 1024;
const MAX_MESSAGE_BYTES = 16 * 1024 * 1024;

export const CONNECTING = 0;
export const OPEN = 1;
export const CLOSED = 3;

/**
 * handlers: {
 *   onOpen(),                          handshake accepted
 *   onMessage(data, isBinary),          data: string for text, Buffer for binary
 *   onClose(code, reason, error|null),  once; error set for failures
 * }
 */
export class RawWebSocket {
  constructor(url, handlers, { handshakeTimeoutMs = 15000 } = {}) {
    const u = new URL(url);
    this.handlers = handlers;
    this.readyState = CONNECTING;
    this.pending = null; // unparsed bytes carried over from the previous read
    this.fragments = null; // parts of a fragmented message
    this.fragmentBinary = false;
    this.closeCode = 1006;
    this.closeReason = "";
    this.error = null;
    this.done = false;
    this.key = randomBytes(16).toString("base64");
    const request =
      `GET ${u.pathname}${u.search} HTTP/1.1\r\nHost: ${u.host}\r\nUpgrade: websocket\r\n` +
      `Connection: Upgrade\r\nSec-WebSocket-Key: ${this.key}\r\nSec-WebSocket-Version: 13\r\n\r\n`;
    this.socket = net.connect({
      host: u.hostname,
      port: Number(u.port || 80),
      noDelay: true,
      onread: {
        buffer: READ_BUFFER,
        callback: (n, buf) => {
          this.onRead(buf, n);
          return true;
        },
      },
    });
    this.timer = setTimeout(() => this.fail(new Error(`handshake timeout after ${handshakeTimeoutMs} ms`)), handshakeTimeoutMs);
    this.socket.on("connect", () => this.socket.write(request));
    this.socket.on("error", (err) => this.fail(err));
    this.socket.on("close", () => this.finish());
  }

  send(text) {
    if (this.readyState !== OPEN) return false;
    this.socket.write(encodeFrame(0x1, Buffer.from(text, "utf8")));
    return true;
  }

  terminate() {
    this.readyState = CLOSED;
    this.socket.destroy();
  }

  fail(err) {
    if (this.error === null) this.error = err;
    this.readyState = CLOSED;
    this.socket.destroy();
    this.finish();
  }

  finish() {
    if (this.done) return;
    this.done = true;
    this.readyState = CLOSED;
    clearTimeout(this.timer);
    this.handlers.onClose(this.closeCode, this.closeReason, this.error);
  }

  onRead(buf, n) {
    let data = buf;
    let start = 0;
    let end = n;
    if (this.pending !== null) {
      data = Buffer.concat([this.pending, buf.subarray(0, n)]);
      end = data.length;
      this.pending = null;
    }
    if (this.readyState === CONNECTING) {
      start = this.onHandshake(data, end);
      if (start < 0) return;
    }
    while (end - start >= 2 && this.readyState === OPEN) {
      const b0 = data[start];
      const b1 = data[start + 1];
      if (b1 & 0x80) {
        this.fail(new Error("server sent a masked frame"));
        return;
      }
      let len = b1 & 0x7f;
      let off = 2;
      if (len === 126) {
        if (end - start < 4) break;
        len = data.readUInt16BE(start + 2);
        off = 4;
      } else if (len === 127) {
        if (end - start < 10) break;
        len = data.readUInt32BE(start + 2) * 2 ** 32 + data.readUInt32BE(start + 6);
        off = 10;
      }
      if (len > MAX_MESSAGE_BYTES) {
        this.fail(new Error(`frame of ${len} bytes`));
        return;
      }
      if (end - start < off + len) break;
      const s = start + off;
      start = s + len;
      this.onFrame(b0, data, s, start);
    }
    if (start < end && this.readyState !== CLOSED) {
      // The shared read buffer is reused by the next read: copy what is left.
      this.pending = Buffer.from(data.subarray(start, end));
    }
  }

  /** Parses the HTTP answer; returns where frames start, or -1 (waiting or failed). */
  onHandshake(data, end) {
    const head = data.indexOf("\r\n\r\n", 0, "latin1");
    if (head < 0 || head + 4 > end) {
      if (end > MAX_HANDSHAKE_BYTES) this.fail(new Error("handshake answer too long"));
      else this.pending = Buffer.from(data.subarray(0, end));
      return -1;
    }
    const text = data.toString("latin1", 0, head);
    const lines = text.split("\r\n");
    const status = Number(lines[0].split(" ")[1]);
    const headers = new Map();
    for (const line of lines.slice(1)) {
      const colon = line.indexOf(":");
      if (colon > 0) headers.set(line.slice(0, colon).trim().toLowerCase(), line.slice(colon + 1).trim());
    }
    if (status !== 101) {
      const body = data.toString("utf8", head + 4, Math.min(end, head + 4 + 800));
      this.fail(new Error(`HTTP ${status} on upgrade: ${body}`));
      return -1;
    }
    const accept = createHash("sha1").update(this.key + GUID).digest("base64");
    if (headers.get("sec-websocket-accept") !== accept) {
      this.fail(new Error(`bad Sec-WebSocket-Accept ${headers.get("sec-websocket-accept")} for key ${this.key}`));
      return -1;
    }
    clearTimeout(this.timer);
    this.readyState = OPEN;
    this.handlers.onOpen();
    return head + 4;
  }

  onFrame(b0, data, s, e) {
    const opcode = b0 & 0x0f;
    const fin = (b0 & 0x80) !== 0;
    if (b0 & 0x70) {
      this.fail(new Error(`frame with reserved bits 0x${b0.toString(16)}`));
      return;
    }
    switch (opcode) {
      case 0x1:
      case 0x2:
        if (this.fragments !== null) {
          this.fail(new Error("new message inside a fragmented one"));
        } else if (fin) {
          this.handlers.onMessage(
            opcode === 0x1 ? data.toString("utf8", s, e) : Buffer.from(data.subarray(s, e)),
            opcode === 0x2,
          );
        } else {
          this.fragments = [Buffer.from(data.subarray(s, e))];
          this.fragmentBinary = opcode === 0x2;
        }
        return;
      case 0x0: {
        if (this.fragments === null) {
          this.fail(new Error("continuation frame without a message"));
          return;
        }
        this.fragments.push(Buffer.from(data.subarray(s, e)));
        if (!fin) return;
        const whole = Buffer.concat(this.fragments);
        this.fragments = null;
        this.handlers.onMessage(this.fragmentBinary ? whole : whole.toString("utf8"), this.fragmentBinary);
        return;
      }
      case 0x8: // close: answer it and end the TCP connection
        this.closeCode = e - s >= 2 ? data.readUInt16BE(s) : 1005;
        this.closeReason = e - s > 2 ? data.toString("utf8", s + 2, e) : "";
        this.socket.end(encodeFrame(0x8, Buffer.from(data.subarray(s, Math.min(e, s + 2)))));
        this.readyState = CLOSED;
        return;
      case 0x9: // ping
        this.socket.write(encodeFrame(0xa, Buffer.from(data.subarray(s, e))));
        return;
      case 0xa: // pong
        return;
      default:
        this.fail(new Error(`unknown opcode ${opcode}`));
    }
  }
}

/** A masked client frame (FIN set). */
function encodeFrame(opcode, payload) {
  const len = payload.length;
  const ext = len < 126 ? 0 : len < 65536 ? 2 : 8;
  const frame = Buffer.allocUnsafe(2 + ext + 4 + len);
  frame[0] = 0x80 | opcode;
  if (ext === 0) {
    frame[1] = 0x80 | len;
  } else if (ext === 2) {
    frame[1] = 0x80 | 126;
    frame.writeUInt16BE(len, 2);
  } else {
    frame[1] = 0x80 | 127;
    frame.writeUInt32BE(Math.floor(len / 2 ** 32), 2);
    frame.writeUInt32BE(len >>> 0, 6);
  }
  const m = 2 + ext;
  randomBytes(4).copy(frame, m);
  for (let i = 0; i < len; i++) frame[m + 4 + i] = payload[i] ^ frame[m + (i & 3)];
  return frame;
}
