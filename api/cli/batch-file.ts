import { readFileSync } from 'node:fs';
import { extname } from 'node:path';
import { UsageError } from './client.js';
import { compact, parseTag } from './upload.js';

const CSV_COLUMNS = ['source_key_identifier', 'region', 'kms', 'alias', 'description', 'tags', 'key_expiration', 'valid_to', 'source_key_tier', 'source_connection', 'policytemplate'];

/** The items of a batch file: a CSV (by its .csv extension), else a JSON array of upload-key bodies. */
export function readBatchFile(file: string): unknown[] {
  let text: string;
  try {
    text = readFileSync(file, 'utf8').replace(/^\uFEFF/, '');
  } catch (err) {
    throw new UsageError(`Cannot read ${file}: ${(err as NodeJS.ErrnoException).code ?? String(err)}.`);
  }
  return extname(file).toLowerCase() === '.csv' ? csvItems(text) : jsonItems(text, file);
}

function jsonItems(text: string, file: string): unknown[] {
  let items: unknown;
  try {
    items = JSON.parse(text);
  } catch {
    throw new UsageError(`${file} is neither a .csv file nor valid JSON.`);
  }
  if (!Array.isArray(items)) throw new UsageError(`${file} must hold a JSON array of upload-key bodies.`);
  return items;
}

/** A header row naming CSV_COLUMNS, then one upload per row; row numbers count the header as row 1. */
function csvItems(text: string): Record<string, unknown>[] {
  const [header, ...rows] = parseCsv(text);
  if (!header) throw new UsageError('The CSV file is empty.');
  const unknown = header.filter((c) => !CSV_COLUMNS.includes(c));
  if (unknown.length > 0) throw new UsageError(`Unknown CSV columns: ${unknown.join(', ')}; known: ${CSV_COLUMNS.join(', ')}.`);
  return rows.map((cells, i) => {
    if (cells.length !== header.length) throw new UsageError(`CSV row ${i + 2} has ${cells.length} cells, the header ${header.length}.`);
    return csvItem(new Map(header.map((h, j) => [h, cells[j] ?? ''])), i + 2);
  });
}

function csvItem(row: Map<string, string>, rowNo: number): Record<string, unknown> {
  const cell = (name: string) => row.get(name) || undefined;
  return compact({
    source_key_tier: cell('source_key_tier'),
    source_connection: cell('source_connection'),
    source_key_identifier: cell('source_key_identifier'),
    region: cell('region'),
    kms: cell('kms'),
    KeyExpiration: booleanCell(cell('key_expiration'), rowNo),
    aws_param: compact({ Alias: cell('alias'), Description: cell('description'), Tags: tagsCell(cell('tags'), rowNo), ValidTo: cell('valid_to') }),
    policytemplate: cell('policytemplate'),
  });
}

function booleanCell(value: string | undefined, rowNo: number): boolean | undefined {
  if (value === undefined) return undefined;
  if (/^(true|false)$/i.test(value)) return value.toLowerCase() === 'true';
  throw new UsageError(`CSV row ${rowNo}: key_expiration must be true or false.`);
}

/** `k=v;k2=v2` as AWS tags. */
function tagsCell(value: string | undefined, rowNo: number) {
  return value?.split(';').filter(Boolean).map((pair) => {
    const tag = parseTag(pair);
    if (!tag) throw new UsageError(`CSV row ${rowNo}: tags must be KEY=VALUE pairs separated by ";".`);
    return tag;
  });
}

/** RFC 4180: commas between fields, CRLF or LF between records; "quoted" fields may hold commas, "" and line breaks. */
export function parseCsv(text: string): string[][] {
  const records: string[][] = [];
  let record: string[] = [];
  let field = '';
  let quoted = false;
  for (let i = 0; i < text.length; i++) {
    const ch = text[i];
    if (quoted) {
      if (ch === '"' && text[i + 1] === '"') field += text[++i];
      else if (ch === '"') quoted = false;
      else field += ch;
    } else if (ch === '"') {
      quoted = true;
    } else if (ch === ',') {
      record.push(field);
      field = '';
    } else if (ch === '\n' || ch === '\r') {
      if (ch === '\r' && text[i + 1] === '\n') i++;
      records.push([...record, field]);
      record = [];
      field = '';
    } else {
      field += ch;
    }
  }
  if (quoted) throw new UsageError('The CSV file ends inside a quoted field.');
  records.push([...record, field]);
  return records.filter((r) => r.length > 1 || r[0] !== '');
}
