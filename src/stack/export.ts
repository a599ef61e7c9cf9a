import { TransmissionFlag as F } from "../protocol/constants.js";
import { plainIo, type Capabilities, type Layer } from "./layer.js";

/** A named export: the top of one stack, shared by every connection to it. */
export class Export {
  private sizeBytes = 0;
  private caps!: Capabilities;
  private opened = false;

  /** On a cluster node: the epoch at which this node owns the export now (null: it does not). */
  ownerEpoch?: () => number | null;

  constructor(
    readonly name: string,
    readonly layer: Layer,
    private readonly desc?: string | (() => string),
  ) {}

  /** Free text shown by NBD_OPT_LIST / NBD_INFO_DESCRIPTION: the stack as it is now, by default. */
  get description(): string {
    if (typeof this.desc === "function") return this.desc();
    return this.desc ?? this.layer.describe();
  }

  /** Opens the stack; a second call does nothing. */
  async open(): Promise<void> {
    if (this.opened) return;
    await this.layer.open();
    this.sizeBytes = this.layer.size();
    this.caps = this.layer.capabilities();
    this.opened = true;
  }

  /** Makes every write acknowledged so far durable (a FLUSH through the whole stack), if the export takes writes. */
  async flush(): Promise<void> {
    if (this.opened && this.caps.writable && this.caps.flush) await this.layer.flush(plainIo);
  }

  async close(): Promise<void> {
    if (!this.opened) return;
    this.opened = false;
    await this.layer.close();
  }

  size(): number {
    return this.sizeBytes;
  }
  capabilities(): Capabilities {
    return this.caps;
  }

  /** Transmission flags as advertised to a client; DF only once structured replies are on. */
  transmissionFlags(structured: boolean): number {
    const c = this.caps;
    let f = F.NBD_FLAG_HAS_FLAGS;
    if (!c.writable) f |= F.NBD_FLAG_READ_ONLY;
    if (c.flush) f |= F.NBD_FLAG_SEND_FLUSH;
    if (c.fua) f |= F.NBD_FLAG_SEND_FUA;
    if (c.writable && c.trim) f |= F.NBD_FLAG_SEND_TRIM;
    if (c.writable && c.zero) f |= F.NBD_FLAG_SEND_WRITE_ZEROES | F.NBD_FLAG_SEND_FAST_ZERO;
    if (structured) f |= F.NBD_FLAG_SEND_DF;
    if (c.multiConn) f |= F.NBD_FLAG_CAN_MULTI_CONN;
    if (c.cache) f |= F.NBD_FLAG_SEND_CACHE;
    return f;
  }
}
