// Type declarations for linechat.js, the browser client of linechatd.
// The module itself is linechatd/static/linechat.js in the linechatd repository
// (copied into this package by scripts/build.mjs); docs/js-client.md describes it.

/** The contract version this client speaks. */
export declare const VERSION: string;

/** Connection states, in the order a healthy client goes through them. */
export declare const State: Readonly<{
  IDLE: "idle";
  CONNECTING: "connecting";
  CONNECTED: "connected";
  RECONNECTING: "reconnecting";
  CLOSED: "closed";
}>;
export type ConnectionState = (typeof State)[keyof typeof State];

/** An error with a machine-readable code, e.g. "timeout", "bad_recipient", "closed". */
export declare class LineChatError extends Error {
  constructor(code: string, message?: string, extra?: Record<string, unknown>);
  readonly code: string;
  /** The message id, for errors about one send. */
  readonly id?: string;
}

/** The HTTP API refused the connection-url request. */
export declare class RefusedError extends LineChatError {
  constructor(status: number, body: unknown, retryAfterMs: number | null);
  readonly status: number;
  readonly body: unknown;
  /** From the answer's Retry-After header, when it had one. */
  readonly retryAfterMs: number | null;
}

/** Valid uid / device id: 1-128 characters of [A-Za-z0-9_.:@-]. */
export declare function isValidUid(value: unknown): value is string;

/**
 * Why `to` cannot be sent, or null when it can: a uid, or a list of 1 to
 * `maxRecipients` (default 100) distinct uids.
 */
export declare function recipientProblem(to: unknown, maxRecipients?: number): string | null;

/** Where a uid is served: the answer of GET /api/connection-url. */
export interface ConnectionTarget {
  url: string;
  partition: number;
  instance: string;
}

export interface FetchConnectionUrlOptions {
  token?: string | null;
  fetch?: typeof fetch;
  signal?: AbortSignal;
}

/** Ask the HTTP API which instance serves `uid`. Rejects with a RefusedError. */
export declare function fetchConnectionUrl(
  httpUrl: string,
  uid: string,
  options?: FetchConnectionUrlOptions,
): Promise<ConnectionTarget>;

/** What the client needs of localStorage. */
export interface StorageLike {
  getItem(key: string): string | null;
  setItem(key: string, value: string): void;
  removeItem(key: string): void;
}

/** A Storage-like object kept in memory (for tests, or where localStorage is unusable). */
export declare function memoryStorage(): StorageLike;

/** What the client needs of a WebSocket (the browser's, or a test's fake). */
export interface WebSocketLike {
  readonly readyState: number;
  send(data: string): void;
  close(code?: number, reason?: string): void;
  onopen: ((event: any) => void) | null;
  onmessage: ((event: any) => void) | null;
  onerror: ((event: any) => void) | null;
  onclose: ((event: any) => void) | null;
}

/** A JWT, or a function (sync or async) asked for a fresh one before every connection attempt. */
export type TokenSource = string | null | (() => string | null | Promise<string | null>);

export interface LineChatOptions {
  /** 1-128 characters of [A-Za-z0-9_.:@-]. */
  uid: string;
  /** Base url of the HTTP API; default: the page's origin. */
  httpUrl?: string;
  /** Device id; default: stored per uid, else a new random one. */
  device?: string;
  token?: TokenSource;
  /** Resume from this offset instead of the stored cursor (-1: the whole replay window; null: live only). */
  resume?: number | null;
  storage?: StorageLike;
  initialBackoffMs?: number;
  maxBackoffMs?: number;
  connectTimeoutMs?: number;
  pingIntervalMs?: number;
  /** Default time a send() waits for its ack. */
  sendTimeoutMs?: number;
  /** Sends whose frame is larger are refused locally ("too_large"). */
  maxFrameBytes?: number;
  /** Group sends to more uids are refused locally ("bad_recipient"); default 100. */
  maxRecipients?: number;
  fetch?: typeof fetch;
  WebSocket?: new (url: string) => WebSocketLike;
}

export interface SendOptions {
  /** 1-64 characters; default: a fresh newId(). */
  id?: string;
  timeoutMs?: number;
}

/** The ack of a send to one uid: where the message was stored. */
export interface Ack {
  id: string;
  partition: number;
  offset: number;
}

/** One durable write of a group send: the recipients of one partition. */
export interface PartitionAck {
  partition: number;
  offset: number;
  to: string[];
}

/** The ack of a group send: one entry per recipient partition. */
export interface GroupAck {
  id: string;
  acks: PartitionAck[];
}

/** The detail of `connected`, and `client.welcome`. */
export interface Welcome {
  instance: string;
  partition: number;
  offset: number;
  /** null: live only; true: replayed from the cursor; false: could not replay. */
  resumed: boolean | null;
  url: string;
}

export interface ChatMessage<Body = unknown> {
  from: string;
  /** The sender's device; "server" for messages published through the server API. */
  fromDevice: string;
  /** This client's uid. */
  to: string;
  id: string;
  body: Body;
  partition: number;
  offset: number;
  /** Milliseconds since the epoch. */
  ts: number;
  /** Every recipient of a group message, in the sender's order; absent for one-to-one messages. */
  recipients?: string[];
}

export interface ReconnectingDetail {
  attempt: number;
  /** Milliseconds until the next attempt. */
  delay: number;
  code: number | null;
  reason: string;
}

export interface ClosedDetail {
  code: number | null;
  reason: string;
  error: Error | null;
}

export interface CursorDetail {
  cursor: number | null;
  offset: number;
}

export interface SentDetail {
  id: string;
  to: string | readonly string[];
  attempt: number;
}

export interface ServerErrorDetail {
  id: string | null;
  code: string;
  message: string;
}

export type StateDetail =
  | { state: "connecting" }
  | ({ state: "connected" } & Welcome)
  | ({ state: "reconnecting" } & ReconnectingDetail)
  | ({ state: "closed" } & ClosedDetail);

export interface LineChatEventMap {
  state: StateDetail;
  connecting: Record<string, never>;
  connected: Welcome;
  reconnecting: ReconnectingDetail;
  closed: ClosedDetail;
  message: ChatMessage;
  sent: SentDetail;
  ack: Ack | GroupAck;
  gap: CursorDetail;
  cursorreset: CursorDetail;
  servererror: ServerErrorDetail;
}

/** One device of one user. */
export declare class LineChatClient extends EventTarget {
  constructor(options: LineChatOptions);
  readonly uid: string;
  readonly httpUrl: string;
  readonly device: string;
  /** The highest offset received (or known not to concern this device); resumed from. */
  readonly cursor: number | null;
  readonly state: ConnectionState;
  readonly welcome: Welcome | null;
  /** Successful connections so far. */
  readonly connections: number;
  readonly duplicatesDropped: number;
  /** Why the client closed, if it failed. */
  readonly error: Error | null;

  /** Subscribe to an event; the handler gets its detail. Returns an unsubscribe function. */
  on<K extends keyof LineChatEventMap>(
    type: K,
    handler: (detail: LineChatEventMap[K], event: CustomEvent<LineChatEventMap[K]>) => void,
  ): () => void;

  addEventListener<K extends keyof LineChatEventMap>(
    type: K,
    listener: (this: LineChatClient, event: CustomEvent<LineChatEventMap[K]>) => void,
    options?: boolean | AddEventListenerOptions,
  ): void;
  addEventListener(
    type: string,
    listener: EventListenerOrEventListenerObject | null,
    options?: boolean | AddEventListenerOptions,
  ): void;
  removeEventListener<K extends keyof LineChatEventMap>(
    type: K,
    listener: (this: LineChatClient, event: CustomEvent<LineChatEventMap[K]>) => void,
    options?: boolean | EventListenerOptions,
  ): void;
  removeEventListener(
    type: string,
    listener: EventListenerOrEventListenerObject | null,
    options?: boolean | EventListenerOptions,
  ): void;

  /** Start connecting (idempotent); resolves with the first welcome. */
  connect(): Promise<Welcome>;
  /** Stop for good: close the socket (1000) and fail pending sends with "closed". */
  close(): void;
  /** A fresh message id (1-64 characters), unique to this client object. */
  newId(): string;

  /** Send to one uid: resolves with where the broker stored it. */
  send(to: string, body: unknown, options?: SendOptions): Promise<Ack>;
  /**
   * A group send to 1 to `maxRecipients` distinct uids: resolves once every
   * recipient partition has it. A bad list rejects with "bad_recipient" before
   * anything is sent.
   */
  send(to: readonly string[], body: unknown, options?: SendOptions): Promise<GroupAck>;
  send(to: string | readonly string[], body: unknown, options?: SendOptions): Promise<Ack | GroupAck>;
}

/** Create a client and wait for its first connection. */
export declare function connect(options: LineChatOptions): Promise<LineChatClient>;
