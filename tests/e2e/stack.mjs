// Starts the whole msys system natively for the browser tests, with the real
// binary: on the PostgreSQL clusters and the broker that scripts/test.sh runs
// (their addresses in MSYS_TEST_*), it creates databases, a topic and a
// consumer group of its own (so runs never see each other), then starts
// user, order, monitor and frontend as separate processes on free ports, each
// healthy before the next. Processes can be frozen (SIGSTOP) and resumed.
import { spawn, spawnSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import fs from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';

const ROLES = (process.env.MSYS_E2E_ROLES || 'user order monitor frontend').split(/\s+/).filter(Boolean);

function need(name) {
  const value = process.env[name];
  if (!value) throw new Error(`${name} is not set: run the browser tests through scripts/test.sh`);
  return value;
}

async function freePort() {
  return new Promise((resolve, reject) => {
    const server = net.createServer();
    server.unref();
    server.on('error', reject);
    server.listen(0, '127.0.0.1', () => {
      const { port } = server.address();
      server.close(() => resolve(port));
    });
  });
}

/** Polls `probe` until it returns truthy or `timeoutMs` passes. */
export async function eventually(timeoutMs, probe, what) {
  const deadline = Date.now() + timeoutMs;
  let last;
  while (Date.now() < deadline) {
    try {
      last = await probe();
      if (last) return last;
    } catch (error) {
      last = error;
    }
    await sleep(250);
  }
  throw new Error(`${what} did not happen within ${timeoutMs} ms (last: ${last instanceof Error ? last.message : JSON.stringify(last)})`);
}

export class Stack {
  constructor(artifacts) {
    this.artifacts = artifacts;
    this.bin = need('MSYS_BIN');
    this.procs = new Map();
    this.ports = {};
    this.env = {};
  }

  static async start(artifacts) {
    const stack = new Stack(artifacts);
    process.on('exit', () => stack.kill());
    await stack.prepare();
    for (const role of ROLES) await stack.startRole(role);
    return stack;
  }

  async prepare() {
    fs.mkdirSync(this.artifacts, { recursive: true });
    const id = randomBytes(4).toString('hex');
    const [kafkaHost, kafkaPort] = need('MSYS_TEST_KAFKA').split(':');
    for (const name of ['user', 'order', 'monitor', 'frontend', 'userMetrics', 'orderMetrics', 'monitorMetrics']) {
      this.ports[name] = await freePort();
    }
    const pg = (prefix, port, db) => ({
      [`${prefix}_POSTGRES_HOST`]: need('MSYS_TEST_PG_HOST'),
      [`${prefix}_POSTGRES_PORT`]: port,
      [`${prefix}_POSTGRES_USER`]: need('MSYS_TEST_PG_USER'),
      [`${prefix}_POSTGRES_PASSWORD`]: need('MSYS_TEST_PG_PASSWORD'),
      [`${prefix}_POSTGRES_DB`]: db,
    });
    this.databases = { users: `e2e_users_${id}`, orders: `e2e_orders_${id}` };
    this.topic = `e2e-events-${id}`;
    this.group = `e2e-group-${id}`;
    this.token = `e2e-token-${id}`;
    this.env = {
      ...process.env,
      ...pg('USER', need('MSYS_TEST_USER_PG_PORT'), this.databases.users),
      ...pg('ORDER', need('MSYS_TEST_ORDER_PG_PORT'), this.databases.orders),
      KAFKA_HOST: kafkaHost,
      KAFKA_PORT: kafkaPort,
      USER_EVENTS_TOPIC: this.topic,
      USER_EVENTS_DLQ_TOPIC: `${this.topic}.dlq`,
      ORDER_CONSUMER_GROUP: this.group,
      MONITOR_CONSUMER_GROUP: this.group,
      MSYS_LISTEN_HOST: '127.0.0.1',
      USER_SERVICE_PORT: String(this.ports.user),
      ORDER_SERVICE_PORT: String(this.ports.order),
      MONITOR_SERVICE_PORT: String(this.ports.monitor),
      FRONTEND_PORT: String(this.ports.frontend),
      USER_METRICS_PORT: String(this.ports.userMetrics),
      ORDER_METRICS_PORT: String(this.ports.orderMetrics),
      MONITOR_METRICS_PORT: String(this.ports.monitorMetrics),
      MONITOR_USER_ADDR: `http://127.0.0.1:${this.ports.user}`,
      MONITOR_ORDER_ADDR: `http://127.0.0.1:${this.ports.order}`,
      MONITOR_ADDR: `http://127.0.0.1:${this.ports.monitor}`,
      // A short evaluation window, so a frozen consumer shows within seconds.
      MONITOR_STATUS_WINDOW: '4s',
      MSYS_ADMIN_TOKEN: this.token,
      MSYS_SHUTDOWN_GRACE: '3s',
      MSYS_LOG_FORMAT: 'text',
      RUST_LOG: process.env.RUST_LOG || 'info',
    };
    // Processes run from the scratch directory scripts/test.sh sweeps, so none can outlive the run.
    this.cwd = fs.mkdtempSync(path.join(process.env.MSYS_TEST_SCRATCH || '/tmp', 'e2e-'));
    this.run(['migrate', 'all']);
    this.run(['events', 'create-topic', '--topic', this.topic, '--partitions', '3', '--replication-factor', '1']);
  }

  run(args) {
    const result = spawnSync(this.bin, args, { env: this.env, cwd: this.cwd, encoding: 'utf8', timeout: 60_000 });
    if (result.status !== 0) {
      throw new Error(`msys ${args.join(' ')} failed (${result.status ?? result.signal}): ${result.stderr}${result.stdout}`);
    }
    return result.stdout;
  }

  get frontendUrl() {
    return `http://127.0.0.1:${this.ports.frontend}`;
  }

  async startRole(role) {
    const log = fs.openSync(path.join(this.artifacts, `${role}.log`), 'a');
    const child = spawn(this.bin, [role], { env: this.env, cwd: this.cwd, stdio: ['ignore', log, log] });
    fs.closeSync(log);
    let exited = null;
    child.on('exit', (code, signal) => {
      exited = `exited (${code ?? signal})`;
    });
    this.procs.set(role, child);
    await eventually(60_000, async () => {
      if (exited) throw new Error(`${role} ${exited}; see ${path.join(this.artifacts, `${role}.log`)}`);
      return this.healthy(role);
    }, `${role} becoming healthy`).catch((error) => {
      throw new Error(`${error.message}; log: ${path.join(this.artifacts, `${role}.log`)}`);
    });
  }

  async healthy(role) {
    if (role === 'frontend') {
      const response = await fetch(`${this.frontendUrl}/healthz`).catch(() => null);
      return Boolean(response && response.ok);
    }
    const args = ['health', `127.0.0.1:${this.ports[role]}`, '--timeout', '1s'];
    if (role === 'order') args.push('--service', 'msys.v1.OrderService');
    return spawnSync(this.bin, args, { env: this.env, timeout: 5000 }).status === 0;
  }

  freeze(role) {
    this.procs.get(role).kill('SIGSTOP');
  }

  resume(role) {
    this.procs.get(role).kill('SIGCONT');
  }

  /** Runs SQL on one of the test databases with psql (for long queries). */
  psql(database, sql) {
    const bindir = need('MSYS_PG_BINDIR');
    const port = database === 'users' ? need('MSYS_TEST_USER_PG_PORT') : need('MSYS_TEST_ORDER_PG_PORT');
    return spawn(
      path.join(bindir, 'psql'),
      ['-h', need('MSYS_TEST_PG_HOST'), '-p', port, '-U', need('MSYS_TEST_PG_USER'), '-d', this.databases[database], '-c', sql],
      { env: { ...process.env, PGPASSWORD: need('MSYS_TEST_PG_PASSWORD') }, stdio: 'ignore' },
    );
  }

  kill() {
    for (const child of this.procs.values()) {
      if (child.exitCode === null && child.signalCode === null) {
        child.kill('SIGCONT');
        child.kill('SIGKILL');
      }
    }
  }

  /** Stops every role gracefully (frontend first), bounded. */
  async stop() {
    for (const role of [...this.procs.keys()].reverse()) {
      const child = this.procs.get(role);
      if (child.exitCode !== null || child.signalCode !== null) continue;
      child.kill('SIGCONT');
      const done = new Promise((resolve) => child.once('exit', resolve));
      child.kill('SIGTERM');
      const timeout = sleep(10_000).then(() => 'timeout');
      if ((await Promise.race([done, timeout])) === 'timeout') {
        child.kill('SIGKILL');
        throw new Error(`${role} did not stop within 10 s of SIGTERM`);
      }
    }
  }
}
