import { pino } from "pino";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { ControlServer, HttpError } from "./control-server.js";

const TOKEN = "k".repeat(32);

describe("ControlServer", () => {
  const server = new ControlServer(pino({ level: "silent" }), TOKEN);
  const calls: string[] = [];
  let url: string;
  beforeAll(async () => {
    server.route("GET", "/v1/things/:name", async (p) => {
      calls.push(`GET ${p.name}`);
      if (p.name !== "a") throw new HttpError(404, `no thing "${p.name}"`);
      return { body: { name: p.name } };
    });
    server.route("POST", "/v1/things/:name/poke", async (p, body) => {
      calls.push(`POST ${p.name}`);
      if (p.name !== "a") throw new HttpError(404, `no thing "${p.name}"`);
      return { body: { poked: p.name, body } };
    });
    url = await server.listen("127.0.0.1", 0);
  });
  afterAll(() => server.close());

  const call = async (method: string, path: string, auth?: string, body?: string) => {
    const res = await fetch(`${url}${path}`, { method, headers: auth ? { authorization: auth } : {}, body });
    return { status: res.status, body: (await res.json()) as Record<string, unknown> };
  };

  it("answers 401 to every call but GET without the token, before looking for its route", async () => {
    calls.length = 0;
    for (const [method, path] of [
      ["POST", "/v1/things/a/poke"],
      ["POST", "/v1/things/nope/poke"],
      ["POST", "/v1/nowhere"],
      ["PUT", "/v1/things/a"],
      ["DELETE", "/v1/things/a"],
    ] as const) {
      for (const auth of [undefined, "Bearer not-the-token-not-the-token", `Basic ${TOKEN}`]) {
        const r = await call(method, path, auth, method === "POST" ? "not json" : undefined);
        expect({ method, path, auth, status: r.status }).toEqual({ method, path, auth, status: 401 });
        expect(JSON.stringify(r.body)).not.toMatch(/route|thing|nope|nowhere/);
      }
    }
    expect(calls).toEqual([]);
  });

  it("with the token, says which route or thing is missing", async () => {
    const bearer = `Bearer ${TOKEN}`;
    expect(await call("POST", "/v1/nowhere", bearer)).toEqual({ status: 404, body: { error: "no route for POST /v1/nowhere" } });
    expect((await call("PUT", "/v1/things/a", bearer)).status).toBe(404);
    expect(await call("POST", "/v1/things/nope/poke", bearer, "{}")).toEqual({ status: 404, body: { error: 'no thing "nope"' } });
    expect((await call("POST", "/v1/things/a/poke", bearer, "not json")).status).toBe(400);
    expect(await call("POST", "/v1/things/a/poke", bearer, '{"x":1}')).toEqual({ status: 200, body: { poked: "a", body: { x: 1 } } });
  });

  it("leaves GET open", async () => {
    expect(await call("GET", "/v1/things/a")).toEqual({ status: 200, body: { name: "a" } });
    expect((await call("GET", "/v1/things/nope")).status).toBe(404);
    expect((await call("GET", "/v1/nowhere")).status).toBe(404);
  });
});
