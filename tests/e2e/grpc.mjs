// A minimal gRPC unary client on node's own http2 module, enough for the
// browser tests to create users the way any client does (no npm package):
// protobuf strings and varints encoded by hand, one length-prefixed frame.
import http2 from 'node:http2';

function varint(n) {
  const out = [];
  let v = BigInt(n);
  while (v >= 128n) {
    out.push(Number((v & 127n) | 128n));
    v >>= 7n;
  }
  out.push(Number(v));
  return Buffer.from(out);
}

/** A protobuf string field. */
export function stringField(number, value) {
  const bytes = Buffer.from(value, 'utf8');
  return Buffer.concat([varint((number << 3) | 2), varint(bytes.length), bytes]);
}

/** One unary call; resolves with { status, message, body } (status 0 = OK). */
export function unary(client, path, payload, timeoutMs = 5000) {
  return new Promise((resolve, reject) => {
    const frame = Buffer.alloc(5 + payload.length);
    frame.writeUInt8(0, 0);
    frame.writeUInt32BE(payload.length, 1);
    payload.copy(frame, 5);
    const req = client.request({
      ':method': 'POST',
      ':path': path,
      'content-type': 'application/grpc',
      te: 'trailers',
      'grpc-timeout': `${timeoutMs}m`,
    });
    const chunks = [];
    let headers = {};
    const timer = setTimeout(() => {
      req.close(http2.constants.NGHTTP2_CANCEL);
      reject(new Error(`${path}: no answer within ${timeoutMs} ms`));
    }, timeoutMs + 1000);
    req.on('response', (h) => {
      headers = h;
    });
    req.on('trailers', (t) => {
      headers = { ...headers, ...t };
    });
    req.on('data', (c) => chunks.push(c));
    req.on('error', (e) => {
      clearTimeout(timer);
      reject(e);
    });
    req.on('end', () => {
      clearTimeout(timer);
      resolve({
        status: Number(headers['grpc-status'] ?? -1),
        message: decodeURIComponent(headers['grpc-message'] ?? ''),
        body: Buffer.concat(chunks),
      });
    });
    req.end(frame);
  });
}

/** A connection to one role; close() when done. */
export function connect(address) {
  const client = http2.connect(`http://${address}`);
  client.on('error', () => {});
  return client;
}

export async function createUser(client, name, email) {
  const payload = Buffer.concat([stringField(1, name), stringField(2, email)]);
  const answer = await unary(client, '/msys.v1.UserService/CreateUser', payload);
  if (answer.status !== 0) throw new Error(`CreateUser(${email}): grpc-status ${answer.status} ${answer.message}`);
  return answer;
}
