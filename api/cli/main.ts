#!/usr/bin/env node
import { Command, Option } from 'commander';
import { registerBatch } from './batch.js';
import { reportError } from './output.js';
import { registerStatus } from './status.js';
import { registerToken } from './token.js';
import { registerUpload } from './upload.js';

/** `keyferry`: the command-line client of the keyferry API. Exit codes: 0 ok, 1 failed, 2 usage. */
const program = new Command('keyferry')
  .description('Upload keys into AWS KMS through a keyferry API.')
  .addOption(new Option('--url <url>', 'the API\'s base URL').env('KEYFERRY_URL').default('http://127.0.0.1:8080'))
  .addOption(new Option('--token <jwt>', 'bearer token').env('KEYFERRY_TOKEN'))
  .option('--json', 'print resources as JSON')
  .configureHelp({ showGlobalOptions: true })
  .exitOverride(); // before the commands, which inherit it: usage errors throw and exit 2

registerUpload(program);
registerBatch(program);
registerStatus(program);
registerToken(program);

try {
  await program.parseAsync();
} catch (err) {
  process.exitCode = reportError(err);
}
