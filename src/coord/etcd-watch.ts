import type http from "node:http";
import { EtcdError, codeOfGrpc, staleToken } from "./etcd-errors.js";
import { decodeWatchResponse, encodeWatchCreate, showKey, type Bytes, type ResponseHeader, type WatchCreate, type WatchEvent } from "./etcd-codec.js";
import { AttemptFailure, gatewayError, type EtcdTransport } from "./etcd-transport.js";

export interface WatchOptions extends Omit<WatchCreate, "key"> {
  /** The events of one or more revisions, in revision order; never called twice for one event. */
  onEvents: (events: WatchEvent[], header: ResponseHeader) => void;
  /**
   * The revision to resume from was compacted: events were lost. The watch has ended; read the
   * keys again and watch from that read's revision + 1. Without this callback it goes to onError.
   */
  onCompacted?: (compactRevision: number) => void;
  /** The watch ended for good (permission denied, or compaction without onCompacted). */
  onError?: (err: EtcdError) => void;
  /** Connection changes, for logs and metrics. */
  onStatus?: (s: WatchStatus) => void;
  /** A stream quiet for this long gets its member probed (default 2000 ms). */
  probeIntervalMs?: number;
}

export interface WatchStatus {
  state: "connecting" | "watching" | "retrying" | "closed";
  endpoint?: string;
  /** Why the last stream ended (retrying). */
  error?: string;
  /** The next revision the watch will deliver. */
  nextRevision: number;
}

const now = () => performance.now();
const FATAL = new Set(["ETCD_AUTH_FAILED", "ETCD_AUTH_REQUIRED", "ETCD_PERMISSION_DENIED", "ETCD_PROTOCOL"]);

/** Fatal: ends the watch. Anything else ends one stream, and the watch resumes elsewhere. */
class WatchEnd extends Error {
  constructor(readonly err: EtcdError | null) {
    super(err?.message ?? "closed");
  }
}

/**
 * A watch of a key or a range that outlives members: events are delivered in order, exactly
 * once, from the start revision on, across reconnections.
 *
 * The stream is one POST /v3/watch on one member (etcd's gateway sends each WatchResponse as a
 * JSON line). It ends when the member goes away (reset), has no leader (the `hasleader` metadata
 * makes etcd cancel it within a few election timeouts), or — the case nothing else notices, a
 * silent network cut or a frozen member — when a probe of that member (its status, every
 * probeIntervalMs the stream is quiet) does not answer within the client's attempt timeout. Then
 * the watch opens a new stream on the next member, from the revision after the last one it
 * delivered (backing off from 100 ms to 2 s while no member answers).
 */
export class Watcher {
  /** The next revision to deliver: the last delivered + 1 (0 until the first stream started, without startRevision). */
  nextRevision: number;
  /** Resolves when the first stream is established (etcd created the watch); rejects if the watch ends before. */
  readonly ready: Promise<void>;
  /** Resolves when the watch has ended (closed, compacted or failed). */
  readonly done: Promise<void>;
  /** Where the current stream is. */
  endpoint: string | undefined;
  private closed = false;
  private req: http.ClientRequest | undefined;
  private wake: (() => void) | undefined;
  private resolveReady!: () => void;
  private rejectReady!: (e: Error) => void;
  private readonly what: string;

  constructor(
    private readonly t: EtcdTransport,
    private readonly key: Bytes,
    private readonly o: WatchOptions,
  ) {
    this.nextRevision = o.startRevision ?? 0;
    this.what = `watch ${showKey(key)}${o.prefix ? " (prefix)" : ""}`;
    this.ready = new Promise((res, rej) => {
      this.resolveReady = res;
      this.rejectReady = rej;
    });
    this.ready.catch(() => {});
    this.done = this.run();
  }

  /** Ends the watch (no more callbacks). */
  close(): void {
    if (this.closed) return;
    this.closed = true;
    this.req?.destroy();
    this.wake?.();
  }

  private status(state: WatchStatus["state"], error?: string): void {
    this.o.onStatus?.({ state, endpoint: this.endpoint, error, nextRevision: this.nextRevision });
  }

  private async run(): Promise<void> {
    let backoff = 100;
    try {
      while (!this.closed) {
        const url = this.t.preferred();
        this.endpoint = url;
        this.status("connecting");
        let established = false;
        try {
          await this.stream(url, () => {
            established = true;
            backoff = 100;
          });
          if (this.closed) break;
          throw new Error("the member ended the stream");
        } catch (err) {
          if (err instanceof WatchEnd) {
            if (err.err) throw err.err;
            break;
          }
          if (this.closed || this.t.isClosed) break;
          // Wrong credentials or rights do not get better by trying again.
          if (err instanceof EtcdError && FATAL.has(err.code)) throw err;
          const msg = err instanceof Error ? err.message : String(err);
          this.t.failed(url);
          this.t.log?.info({ endpoint: url, key: showKey(this.key), nextRevision: this.nextRevision, error: msg }, "etcd watch stream ended, resuming");
          this.status("retrying", `${url}: ${msg}`);
          if (!established) backoff = Math.min(backoff * 2, 2000);
          await this.pause(established ? 0 : backoff);
        }
      }
      this.rejectReady(new EtcdError("ETCD_CLOSED", this.what, "the watch was closed before etcd created it"));
    } catch (err) {
      const e = err instanceof EtcdError ? err : new EtcdError("ETCD_PROTOCOL", this.what, String(err));
      this.rejectReady(e);
      this.closed = true;
      if (e.code === "ETCD_COMPACTED" && this.o.onCompacted) this.o.onCompacted(e.compactRevision ?? 0);
      else this.o.onError?.(e);
    } finally {
      this.closed = true;
      this.status("closed");
    }
  }

  private pause(ms: number): Promise<void> {
    if (ms <= 0 || this.closed) return Promise.resolve();
    return new Promise((r) => {
      const t = setTimeout(r, ms);
      this.wake = () => {
        clearTimeout(t);
        r();
      };
    });
  }

  /** One stream on one member; resolves when it ends without error, rejects with why it ended. */
  private async stream(url: string, onCreated: () => void): Promise<void> {
    const token = await this.t.token(url, this.t.attemptTimeoutMs);
    const body = JSON.stringify(encodeWatchCreate({ ...this.o, key: this.key, startRevision: this.nextRevision > 0 ? this.nextRevision : undefined }));
    const { req, res } = await this.t.open(url, "/v3/watch", body, token, this.t.attemptTimeoutMs, true);
    this.req = req;
    if (this.closed) {
      req.destroy();
      return;
    }
    const probeEvery = this.o.probeIntervalMs ?? 2000;
    let lastData = now();
    let probing = false;
    return new Promise<void>((resolve, reject) => {
      let buf = "";
      let finished = false;
      const finish = (err?: unknown) => {
        if (finished) return;
        finished = true;
        clearInterval(probe);
        req.destroy();
        if (err === undefined) resolve();
        else reject(err);
      };
      const probe = setInterval(() => {
        if (probing || now() - lastData < probeEvery) return;
        probing = true;
        this.t
          .call("/v3/maintenance/status", {}, { op: `probe ${url} for a ${this.what}`, mutation: false, endpoint: url, timeoutMs: this.t.attemptTimeoutMs })
          .then(
            () => (lastData = now()),
            (e: unknown) => finish(new Error(`probe failed: ${e instanceof Error ? e.message : String(e)}`)),
          )
          .finally(() => (probing = false));
      }, Math.max(50, probeEvery / 2));
      const line = (text: string) => {
        if (!text.trim()) return;
        let json: Record<string, unknown>;
        try {
          json = JSON.parse(text) as Record<string, unknown>;
        } catch {
          throw new AttemptFailure(`sent a watch line that is not JSON: ${text.slice(0, 100)}`, true);
        }
        const gErr = gatewayError(json);
        if (gErr) {
          if (staleToken(gErr.message)) this.t.dropToken(token);
          const code = codeOfGrpc(gErr.code, gErr.message);
          if (code === "ETCD_PERMISSION_DENIED" || code === "ETCD_AUTH_REQUIRED") throw new WatchEnd(new EtcdError(code, this.what, `${gErr.message} (answered by ${url})`, { endpoint: url, grpcCode: gErr.code }));
          throw new Error(`etcd answered "${gErr.message}"`);
        }
        const m = decodeWatchResponse((json.result ?? json) as Record<string, unknown>);
        if (m.canceled) {
          if (m.compactRevision > 0) {
            const e = new EtcdError("ETCD_COMPACTED", this.what, `revision ${this.nextRevision} was compacted (oldest kept: ${m.compactRevision}): events were lost; read again and watch from there`, { endpoint: url });
            e.compactRevision = m.compactRevision;
            throw new WatchEnd(e);
          }
          if (staleToken(m.cancelReason)) {
            this.t.dropToken(token);
            throw new Error(`etcd canceled the watch: ${m.cancelReason}`);
          }
          if (/permission denied/.test(m.cancelReason)) throw new WatchEnd(new EtcdError("ETCD_PERMISSION_DENIED", this.what, `${m.cancelReason} (answered by ${url})`, { endpoint: url }));
          throw new Error(`etcd canceled the watch${m.cancelReason ? `: ${m.cancelReason}` : ""}`);
        }
        if (m.created) {
          if (this.nextRevision === 0) this.nextRevision = m.header.revision + 1;
          onCreated();
          this.status("watching");
          this.resolveReady();
        }
        if (m.events.length > 0) {
          // Resuming from nextRevision, etcd never sends an older event; guard anyway.
          const fresh = m.events.filter((e) => e.kv.modRevision >= this.nextRevision);
          if (fresh.length > 0) {
            this.nextRevision = fresh[fresh.length - 1]!.kv.modRevision + 1;
            try {
              this.o.onEvents(fresh, m.header);
            } catch (err) {
              // A throwing callback is the caller's bug: surface it as Node does, keep the stream.
              process.nextTick(() => {
                throw err;
              });
            }
          }
        }
        // No progress notifications are asked for (etcd 3.4.23 may send one before the events it
        // vouches for, etcd issue 15220): only delivered events move nextRevision.
      };
      res.setEncoding("utf8");
      res.on("data", (chunk: string) => {
        lastData = now();
        if (this.closed) return finish();
        buf += chunk;
        let nl: number;
        try {
          while ((nl = buf.indexOf("\n")) >= 0) {
            const text = buf.slice(0, nl);
            buf = buf.slice(nl + 1);
            line(text);
            if (this.closed) return finish();
          }
        } catch (err) {
          finish(err);
        }
      });
      res.on("end", () => {
        try {
          line(buf);
          buf = "";
          finish();
        } catch (err) {
          finish(err);
        }
      });
      res.on("error", (err) => finish(err));
      res.on("close", () => finish(this.closed ? undefined : new Error("the connection closed")));
    });
  }
}
