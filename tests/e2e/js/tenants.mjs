// Two tenants' @fal-ai/client instances against one flux-server: what B sees of A's request.
// Environment: FLUX_BASE, NODE_EXTRA_CA_CERTS, KEY_A, KEY_B, FAL_MODE ("proxy" or "middleware").
// The Python test (test_tenants_e2e.py) asserts on the JSON object printed last.
import { createFalClient } from "@fal-ai/client";

const BASE = process.env.FLUX_BASE;
const MODE = process.env.FAL_MODE;
const ENDPOINT = "fal-ai/flux/dev";

function makeClient(key) {
  if (MODE === "proxy") {
    // The proxy hands the request on with its headers: the key is sent as a header here, as a
    // studio's own proxy in front of this server would add it.
    return createFalClient({
      proxyUrl: { url: `${BASE}/api/fal/proxy`, when: "always" },
      requestMiddleware: async (request) => ({
        ...request,
        headers: { ...request.headers, authorization: `Key ${key}` },
      }),
    });
  }
  return createFalClient({
    credentials: key,
    requestMiddleware: async (request) => ({
      ...request,
      url: request.url.replace("https://queue.fal.run", BASE).replace("https://fal.run", `${BASE}/run`),
    }),
  });
}

async function outcome(call) {
  try {
    return { ok: true, value: await call() };
  } catch (error) {
    return { ok: false, status: error?.status, body: error?.body };
  }
}

async function main() {
  const a = makeClient(process.env.KEY_A);
  const b = makeClient(process.env.KEY_B);
  const input = { prompt: "a lighthouse", image_size: { width: 64, height: 64 }, num_inference_steps: 2, seed: 3 };
  const { request_id: requestId } = await a.queue.submit(ENDPOINT, { input });
  await a.queue.subscribeToStatus(ENDPOINT, { requestId, mode: "polling", pollInterval: 100 });
  const out = { mode: MODE, requestId };
  out.ownResult = await outcome(() => a.queue.result(ENDPOINT, { requestId }));
  out.otherStatus = await outcome(() => a.queue.status(ENDPOINT, { requestId: "00000000-0000-0000-0000-000000000000" }));
  out.foreignStatus = await outcome(() => b.queue.status(ENDPOINT, { requestId }));
  out.foreignResult = await outcome(() => b.queue.result(ENDPOINT, { requestId }));
  out.foreignCancel = await outcome(() => b.queue.cancel(ENDPOINT, { requestId }));
  out.ownRun = await outcome(() => b.run(ENDPOINT, { input: { ...input, seed: 4 } }));
  process.stdout.write(`${JSON.stringify(out)}\n`);
}

main().catch((error) => {
  process.stderr.write(`tenants failed: ${String(error?.message ?? error)}\n${error?.stack ?? ""}\n`);
  process.exit(1);
});
