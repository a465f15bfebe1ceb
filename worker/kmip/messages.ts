import { KmipProtocolError } from './errors.js';
import { Tag, type ProtocolVersion } from './tags.js';
import { enumeration, fields, integer, optional, required, structure, TtlvError, type Ttlv } from './ttlv.js';

/*
 * The KMIP message envelope (KMIP 1.4 §7, 2.0 §8): a Request Message holds a Request Header and Batch Items; a
 * Response Message a Response Header and one Batch Item per request item. keyferry sends batches of one.
 */

export const protocolVersion = (v: ProtocolVersion): Ttlv =>
  structure(Tag.ProtocolVersion, [integer(Tag.ProtocolVersionMajor, v.major), integer(Tag.ProtocolVersionMinor, v.minor)]);

export function parseProtocolVersion(item: Ttlv): ProtocolVersion {
  return { major: required(item, Tag.ProtocolVersionMajor, 'Integer').value, minor: required(item, Tag.ProtocolVersionMinor, 'Integer').value };
}

export interface RequestOptions {
  version: ProtocolVersion;
  operation: number;
  /** The Request Payload's items. */
  payload: Ttlv[];
  /** Maximum Response Size: asks the server not to answer with more bytes than this. */
  maxResponseSize?: number;
}

/** A Request Message with one Batch Item. */
export function requestMessage(o: RequestOptions): Ttlv {
  return structure(Tag.RequestMessage, [
    structure(Tag.RequestHeader, [
      protocolVersion(o.version),
      o.maxResponseSize !== undefined ? integer(Tag.MaximumResponseSize, o.maxResponseSize) : undefined,
      integer(Tag.BatchCount, 1),
    ]),
    structure(Tag.BatchItem, [enumeration(Tag.Operation, o.operation), structure(Tag.RequestPayload, o.payload)]),
  ]);
}

export interface ResponseBatchItem {
  /** Absent when the server could not tell which operation failed (e.g. it could not parse the request). */
  operation: number | undefined;
  resultStatus: number;
  resultReason: number | undefined;
  resultMessage: string | undefined;
  payload: Ttlv | undefined;
}

export interface ResponseMessage {
  version: ProtocolVersion;
  /** Seconds since the epoch. */
  timeStamp: bigint;
  items: ResponseBatchItem[];
}

/** Reads a Response Message; anything that does not fit the envelope is a KmipProtocolError. */
export function parseResponse(message: Ttlv): ResponseMessage {
  try {
    if (message.tag !== Tag.ResponseMessage) throw new TtlvError(`expected a Response Message, got tag 0x${message.tag.toString(16)}`);
    const header = required(message, Tag.ResponseHeader, 'Structure');
    const batchCount = required(header, Tag.BatchCount, 'Integer').value;
    const items = fields(message)
      .filter((f) => f.tag === Tag.BatchItem)
      .map((item): ResponseBatchItem => {
        if (item.type !== 'Structure') throw new TtlvError('a Batch Item is not a Structure');
        return {
          operation: optional(item, Tag.Operation, 'Enumeration')?.value,
          resultStatus: required(item, Tag.ResultStatus, 'Enumeration').value,
          resultReason: optional(item, Tag.ResultReason, 'Enumeration')?.value,
          resultMessage: optional(item, Tag.ResultMessage, 'TextString')?.value,
          payload: optional(item, Tag.ResponsePayload, 'Structure'),
        };
      });
    if (items.length !== batchCount) throw new TtlvError(`Batch Count says ${batchCount}, the message holds ${items.length} items`);
    return {
      version: parseProtocolVersion(required(header, Tag.ProtocolVersion, 'Structure')),
      timeStamp: required(header, Tag.TimeStamp, 'DateTime').value,
      items,
    };
  } catch (err) {
    if (err instanceof TtlvError) throw new KmipProtocolError(`malformed KMIP response: ${err.message}`, { cause: err });
    throw err;
  }
}
