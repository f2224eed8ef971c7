// A JavaScript client of the metered HTTP API, written against its contract with nothing but
// fetch (as a Node service would), run by tests/server/test_server_live.py against a live
// `metered serve`. Environment: METERED_URL, METERED_API_KEY, SUBJECT (on a plan with 3 units
// of its one metered feature). Exits non-zero on the first broken expectation.
import assert from "node:assert/strict";

const base = process.env.METERED_URL;
const apiKey = process.env.METERED_API_KEY;
const subject = process.env.SUBJECT;
let checks = 0;

async function call(method, path, body, headers = {}) {
  const response = await fetch(base + path, {
    method,
    headers: { Authorization: `Bearer ${apiKey}`, "Content-Type": "application/json", ...headers },
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  return { status: response.status, type: response.headers.get("content-type"), body: await response.json() };
}

function expect(condition, message) {
  assert.ok(condition, message);
  checks += 1;
}

const consume = (units, key) =>
  call("POST", "/v1/usage/consume", { subject_ref: subject, units }, { "Idempotency-Key": key });

// 1. check: allowed, 3 units left
let r = await call("POST", "/v1/access/check", { subject_ref: subject });
expect(r.status === 200 && r.body.allowed === true && r.body.reason === null, "check allowed");
expect(r.body.usage_remaining === 3 && r.body.limit === 3, "3 units to start with");

// 2. consume 1 unit under a fresh key
const key = `node-${Date.now()}`;
const first = await consume(1, key);
expect(first.status === 200 && first.body.ok === true, "consume ok");
expect(first.body.consumed === 1 && first.body.usage_remaining === 2, "1 consumed, 2 left");
expect(first.body.replayed === false && typeof first.body.entry_id === "string", "fresh entry");

// 3. the retried request (same Idempotency-Key) returns the original result, charges nothing
const retry = await consume(1, key);
expect(retry.status === 200 && retry.body.replayed === true, "retry replayed");
expect(retry.body.entry_id === first.body.entry_id && retry.body.usage_remaining === 2, "same result");
r = await call("GET", `/v1/subjects/${encodeURIComponent(subject)}/balance`);
expect(r.body.balances[0].used === 1, "the retry charged nothing");

// 4. spend the rest, then the quota is exhausted: 402, ok: false, a problem document
r = await consume(2, `${key}-b`);
expect(r.status === 200 && r.body.usage_remaining === 0, "2 more consumed, none left");
r = await consume(1, `${key}-c`);
expect(r.status === 402 && r.type === "application/problem+json", "402 problem+json");
expect(r.body.ok === false && r.body.reason === "quota_exhausted" && r.body.consumed === 0, "ok: false");
expect(r.body.usage_remaining === 0 && r.body.units_requested === 1, "what was asked and left");
r = await call("POST", "/v1/access/check", { subject_ref: subject });
expect(r.body.allowed === false && r.body.reason === "quota_exhausted", "check denied");

// 5. errors a client must be able to tell apart
r = await call("POST", "/v1/usage/consume", { subject_ref: subject, units: "lots" });
expect(r.status === 422 && r.body.errors[0].loc.join(".") === "body.units", "422 names the field");
r = await fetch(base + "/v1/access/check", { method: "POST", body: "{}" });
expect(r.status === 401 && r.headers.get("www-authenticate") === "Bearer", "401 without a key");

console.log(`node client: ${checks} checks passed`);
