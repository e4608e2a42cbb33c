// How an application uses the package, and a check of its declarations:
// `npm run typecheck` compiles this file against linechat.d.ts. Lines marked
// as expected errors are uses the declarations must refuse.

import {
  type Ack,
  type ChatMessage,
  type GroupAck,
  LineChatClient,
  LineChatError,
  type StorageLike,
  type WebSocketLike,
  connect,
  fetchConnectionUrl,
  isValidUid,
  memoryStorage,
  recipientProblem,
  State,
} from "linechatd-client";

interface TextBody {
  kind: "text";
  text: string;
}

function isText(body: unknown): body is TextBody {
  return typeof body === "object" && body !== null && (body as TextBody).kind === "text";
}

export async function chat(): Promise<void> {
  const client = new LineChatClient({
    uid: "alice",
    httpUrl: "https://chat.example.com",
    token: async () => "a.jwt.token",
    maxRecipients: 50,
  });

  const unsubscribe = client.on("message", (message: ChatMessage) => {
    const group = message.recipients ? ` (to ${message.recipients.join(", ")})` : "";
    const text = isText(message.body) ? message.body.text : JSON.stringify(message.body);
    console.log(`${message.from}/${message.fromDevice}${group}: ${text} #${message.offset}`);
  });
  client.on("state", (detail) => {
    if (detail.state === "reconnecting") console.log(`retry in ${detail.delay} ms (${detail.code})`);
    if (detail.state === "connected") console.log(`on ${detail.instance}, partition ${detail.partition}`);
  });
  client.addEventListener("ack", (event) => {
    const ack = event.detail;
    console.log("acked", ack.id, "acks" in ack ? ack.acks.length : ack.offset);
  });

  const welcome = await client.connect();
  console.log(welcome.resumed, client.state === State.CONNECTED, client.cursor);

  const one: Ack = await client.send("bob", { kind: "text", text: "hi" } satisfies TextBody);
  console.log(one.partition, one.offset);

  const recipients = ["bob", "carol", "dave"] as const;
  const problem = recipientProblem(recipients, 50);
  if (problem === null) {
    const group: GroupAck = await client.send(recipients, { kind: "text", text: "hi all" });
    for (const entry of group.acks) console.log(entry.partition, entry.offset, entry.to.join(","));
  }

  try {
    await client.send([], "nobody", { id: client.newId(), timeoutMs: 5000 });
  } catch (error) {
    if (error instanceof LineChatError && error.code === "bad_recipient") console.log(error.message);
  }

  // @ts-expect-error a group send resolves with `acks`, not one offset
  const wrong: Ack = await client.send(["bob"], 1);
  // @ts-expect-error recipients are uids (strings)
  await client.send([1, 2], "numbers");
  // @ts-expect-error the uid is required
  new LineChatClient({ httpUrl: "https://chat.example.com" });
  console.log(wrong);

  unsubscribe();
  client.close();
}

// Everything a test or an unusual environment can swap in.
class FakeSocket implements WebSocketLike {
  readyState = 0;
  onopen: ((event: unknown) => void) | null = null;
  onmessage: ((event: { data: string }) => void) | null = null;
  onerror: ((event: unknown) => void) | null = null;
  onclose: ((event: { code: number; reason: string }) => void) | null = null;
  constructor(readonly url: string) {}
  send(data: string): void {
    console.log("sent", data);
  }
  close(code?: number): void {
    this.readyState = 3;
    this.onclose?.({ code: code ?? 1005, reason: "" });
  }
}

export async function inTests(): Promise<void> {
  const storage: StorageLike = memoryStorage();
  const target = await fetchConnectionUrl("http://127.0.0.1:8080", "alice", { token: null });
  console.log(target.url, target.partition, target.instance, isValidUid("alice"));
  const client = await connect({ uid: "alice", storage, WebSocket: FakeSocket, fetch: globalThis.fetch });
  // The browser's own WebSocket fits too.
  const browser = new LineChatClient({ uid: "bob", WebSocket });
  console.log(client.device, browser.duplicatesDropped);
}
