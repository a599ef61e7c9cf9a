import { describe, expect, it } from "vitest";
import { NbdError, errnoOf, wireErrno } from "./errors.js";

describe("errno mapping", () => {
  it("maps NbdError to its own errno", () => {
    for (const [name, wire] of [["EPERM", 1], ["EIO", 5], ["ENOMEM", 12], ["EINVAL", 22], ["ENOSPC", 28], ["EOVERFLOW", 75], ["ENOTSUP", 95], ["ESHUTDOWN", 108]] as const) {
      expect(wireErrno(new NbdError(name, "x"))).toBe(wire);
    }
  });
  it("maps Node.js system errors by code", () => {
    const sys = (code: string) => Object.assign(new Error(code), { code });
    expect(errnoOf(sys("ENOSPC"))).toBe("ENOSPC");
    expect(errnoOf(sys("EDQUOT"))).toBe("ENOSPC");
    expect(errnoOf(sys("EROFS"))).toBe("EPERM");
    expect(errnoOf(sys("EACCES"))).toBe("EPERM");
    expect(errnoOf(sys("EOPNOTSUPP"))).toBe("ENOTSUP");
    expect(errnoOf(sys("EBADF"))).toBe("EIO");
  });
  it("maps anything else to EIO", () => {
    expect(wireErrno(new Error("boom"))).toBe(5);
    expect(wireErrno("string")).toBe(5);
    expect(wireErrno(undefined)).toBe(5);
  });
});
