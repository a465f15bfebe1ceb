import { defineScript, type RedisClient, type RedisScript } from '../redis.js';
import { ConflictError, NotFoundError } from '../errors.js';
import type { Keyspace } from './keyspace.js';

/**
 * Claims the name and stores the record in one step (both keys share the account's hash slot). A name that
 * already stands for this record's (new, random) id was claimed by this very call, sent again by ioredis
 * after a reconnect because Redis's answer was lost: it succeeds again instead of reporting a conflict.
 */
const CREATE_SCRIPT = `
if redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[2]) == 0 then
  if redis.call('HGET', KEYS[1], ARGV[1]) == ARGV[2] then return 1 end
  return 0
end
redis.call('HSET', KEYS[2], ARGV[2], ARGV[3])
return 1`;

/** The record whose id is ARGV[1], else the one whose name is ARGV[1]; false (nil) if neither. */
const FIND_SCRIPT = `
local byId = redis.call('HGET', KEYS[1], ARGV[1])
if byId then return byId end
local id = redis.call('HGET', KEYS[2], ARGV[1])
if not id then return false end
return redis.call('HGET', KEYS[1], id)`;

export interface AccountResource {
  id: string;
  name: string;
  account: string;
  created_at: string;
  updated_at: string;
}

/** The common fields of a resource made now. */
export function newResourceStamp(account: string, id: string, name: string): AccountResource {
  const now = new Date().toISOString();
  return { id, name, account, created_at: now, updated_at: now };
}

/**
 * Named resources owned by one account (KMS connections, policy templates, local keys): a hash of
 * id → JSON and a hash of name → id in one slot, so creation with a unique name is one MULTI.
 */
export class ResourceStore<T extends AccountResource> {
  readonly #create: RedisScript;
  readonly #find: RedisScript;

  constructor(
    private readonly redis: RedisClient,
    private readonly keys: Keyspace,
    private readonly kind: string,
    private readonly label: string,
  ) {
    this.#create = defineScript(redis, 'resource_create', CREATE_SCRIPT);
    this.#find = defineScript(redis, 'resource_find', FIND_SCRIPT);
  }

  async create(record: T): Promise<T> {
    const claimed = await this.#create(
      [this.keys.resourceNames(record.account, this.kind), this.keys.resources(record.account, this.kind)],
      [record.name, record.id, JSON.stringify(record)],
    );
    if (claimed === 0) throw new ConflictError('name_taken', `A ${this.label} named "${record.name}" already exists.`);
    return record;
  }

  /** Finds by id, then by name, in one round trip; another account's resources are not found. */
  async find(account: string, idOrName: string): Promise<T | undefined> {
    const raw = (await this.#find([this.keys.resources(account, this.kind), this.keys.resourceNames(account, this.kind)], [idOrName])) as string | null;
    return raw ? (JSON.parse(raw) as T) : undefined;
  }

  async get(account: string, idOrName: string): Promise<T> {
    const found = await this.find(account, idOrName);
    if (!found) throw new NotFoundError(`The ${this.label} "${idOrName}"`);
    return found;
  }

  async list(account: string): Promise<T[]> {
    const all = await this.redis.hvals(this.keys.resources(account, this.kind));
    return all.map((v) => JSON.parse(v) as T).sort((a, b) => a.created_at.localeCompare(b.created_at));
  }
}
