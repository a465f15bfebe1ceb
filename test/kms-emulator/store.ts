import { notFound } from './errors.js';

/** Who is calling: the account from the access key id, the region from the SigV4 credential scope. */
export interface Caller {
  accountId: string;
  region: string;
}

export interface Tag {
  TagKey: string;
  TagValue: string;
}

export type KeyState = 'Enabled' | 'PendingImport' | 'PendingDeletion';

export interface Key {
  keyId: string;
  arn: string;
  accountId: string;
  region: string;
  origin: 'AWS_KMS' | 'EXTERNAL';
  keyState: KeyState;
  description: string;
  multiRegion: boolean;
  tags: Tag[];
  policy: string;
  /** Material usable now; undefined before import and after imported material expired. */
  material: Buffer | undefined;
  /** EXTERNAL keys: the material first imported; every later import must bring the same bytes. */
  importedMaterial: Buffer | undefined;
  expirationModel?: string;
  validTo?: Date;
  creationDate: Date;
  deletionDate?: Date;
}

export interface Alias {
  name: string;
  targetKeyId: string;
  creationDate: Date;
  lastUpdatedDate: Date;
}

interface Scope {
  keys: Map<string, Key>;
  aliases: Map<string, Alias>;
}

const ARN_PATTERN = /^arn:aws:kms:([^:]*):([^:]*):(key|alias)\/(.+)$/;

export function keyArn(caller: Caller, keyId: string): string {
  return `arn:aws:kms:${caller.region}:${caller.accountId}:key/${keyId}`;
}

export function aliasArn(caller: Caller, aliasName: string): string {
  return `arn:aws:kms:${caller.region}:${caller.accountId}:${aliasName}`;
}

/** When imported material reaches ValidTo, KMS deletes it and the key goes back to PendingImport. */
function expireMaterial(key: Key, now: number): void {
  if (key.material && key.validTo && key.validTo.getTime() <= now) {
    key.material = undefined;
    if (key.keyState === 'Enabled') key.keyState = 'PendingImport';
  }
}

/** Keys and aliases, scoped per (account, region). */
export class Store {
  private readonly scopes = new Map<string, Scope>();

  scope(caller: Caller): Scope {
    const id = `${caller.accountId}/${caller.region}`;
    let scope = this.scopes.get(id);
    if (!scope) {
      scope = { keys: new Map(), aliases: new Map() };
      this.scopes.set(id, scope);
    }
    return scope;
  }

  allKeys(): Key[] {
    const keys = [...this.scopes.values()].flatMap((scope) => [...scope.keys.values()]);
    for (const key of keys) expireMaterial(key, Date.now());
    return keys;
  }

  aliasesOf(key: Key): string[] {
    const aliases = this.scope(key).aliases.values();
    return [...aliases].filter((alias) => alias.targetKeyId === key.keyId).map((alias) => alias.name);
  }

  /** Finds a key by key id or key ARN, and also by alias name or alias ARN when allowAlias is set. */
  findKey(caller: Caller, ref: string, allowAlias: boolean): Key {
    const scope = this.scope(caller);
    const arn = ARN_PATTERN.exec(ref);
    let isAlias = ref.startsWith('alias/');
    let id = ref;
    if (arn) {
      const [, region, accountId, kind, name = ''] = arn;
      if (region !== caller.region || accountId !== caller.accountId) throw notFound(`Invalid arn ${ref}`);
      isAlias = kind === 'alias';
      id = isAlias ? `alias/${name}` : name;
    }
    if (isAlias) {
      if (!allowAlias) throw notFound(`Invalid keyId ${ref}`);
      const alias = scope.aliases.get(id);
      if (!alias) throw notFound(`Alias ${aliasArn(caller, id)} is not found.`);
      id = alias.targetKeyId;
    }
    const key = scope.keys.get(id);
    if (!key) throw notFound(`Key '${keyArn(caller, id)}' does not exist`);
    expireMaterial(key, Date.now());
    return key;
  }
}
