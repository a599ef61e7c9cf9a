import fs from "node:fs";
import { PassthroughLayer, type Io, type Layer } from "../layer.js";

export type AuditedOp = "write" | "zero" | "trim" | "flush";

/**
 * Calls `record(op, offset, length)` for every write, zero, trim and flush right before it goes to
 * the layer below (the image), in the order they are sent. Put below the image-level fence, it
 * records exactly what that fence let through to the image (serve --write-audit). A flush has
 * offset 0 and length 0.
 */
export class AuditLayer extends PassthroughLayer {
  constructor(
    next: Layer,
    private readonly record: (op: AuditedOp, offset: number, length: number) => void,
  ) {
    super(next);
  }
  override pwrite(buf: Buffer, offset: number, io: Io): Promise<void> {
    this.record("write", offset, buf.length);
    return this.next.pwrite(buf, offset, io);
  }
  override zero(length: number, offset: number, io: Io): Promise<void> {
    this.record("zero", offset, length);
    return this.next.zero(length, offset, io);
  }
  override trim(length: number, offset: number, io: Io): Promise<void> {
    this.record("trim", offset, length);
    return this.next.trim(length, offset, io);
  }
  override flush(io: Io): Promise<void> {
    this.record("flush", 0, 0);
    return this.next.flush(io);
  }
}

/** One line of a write audit (JSON Lines). */
export interface AuditEntry {
  /** Wall clock (Date.now()) when the request went to the image. */
  t: number;
  /** This process's monotonic clock (performance.now()) at the same instant. */
  mono: number;
  node: string;
  export: string;
  /** The node's epoch of the export then (null: a live copy into this node, which owns nothing yet). */
  epoch: number | null;
  op: AuditedOp;
  offset: number;
  length: number;
}

/**
 * A JSON-Lines file of every write-type request that reached an image (serve --write-audit FILE),
 * for tests that show who wrote when ("a fenced node never writes after its deadline"). Lines are
 * buffered and appended with one fs.writeSync per event-loop turn (setImmediate), and
 * synchronously at close() and at process exit; a SIGKILL loses at most the current turn's lines.
 */
export class WriteAudit {
  private fd: number | null;
  private pending: string[] = [];
  private scheduled = false;
  private readonly onExit = () => this.close();

  constructor(readonly file: string) {
    this.fd = fs.openSync(file, "a");
    process.once("exit", this.onExit);
  }

  record(e: Omit<AuditEntry, "t" | "mono">): void {
    if (this.fd === null) return;
    this.pending.push(JSON.stringify({ t: Date.now(), mono: performance.now(), ...e }));
    if (!this.scheduled) {
      this.scheduled = true;
      setImmediate(() => this.flush());
    }
  }

  /** Writes what is buffered now (synchronously). */
  flush(): void {
    this.scheduled = false;
    if (this.fd === null || this.pending.length === 0) return;
    const text = `${this.pending.join("\n")}\n`;
    this.pending = [];
    fs.writeSync(this.fd, text);
  }

  close(): void {
    if (this.fd === null) return;
    this.flush();
    fs.closeSync(this.fd);
    this.fd = null;
    process.off("exit", this.onExit);
  }

  /** The entries of an audit file (a line still being written is skipped). */
  static read(file: string): AuditEntry[] {
    const out: AuditEntry[] = [];
    for (const line of fs.readFileSync(file, "utf8").split("\n")) {
      if (!line) continue;
      try {
        out.push(JSON.parse(line) as AuditEntry);
      } catch {
        /* partial */
      }
    }
    return out;
  }
}
