import { KmsEmulator } from './emulator.js';

const port = Number(process.env.KMS_EMULATOR_PORT ?? 4599);
if (!Number.isInteger(port) || port < 0 || port > 65535) {
  throw new Error(`KMS_EMULATOR_PORT must be a port number, got ${process.env.KMS_EMULATOR_PORT}`);
}

// Loopback unless told otherwise (docker-compose sets KMS_EMULATOR_HOST=0.0.0.0 inside its network).
const emulator = new KmsEmulator({ port, host: process.env.KMS_EMULATOR_HOST ?? '127.0.0.1' });
console.log(await emulator.start());

for (const signal of ['SIGINT', 'SIGTERM'] as const) {
  process.once(signal, () => void emulator.close().then(() => process.exit(0)));
}
