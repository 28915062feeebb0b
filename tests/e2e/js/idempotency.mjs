// @fal-ai/client 1.10.1's queue submit with an Idempotency-Key header (its `headers` option),
// in proxy and middleware mode: two submits with one key get one request id, the same key with
// another input is refused (an ApiError, not retried). Last line: what each mode saw.
// Environment: FLUX_BASE (https://127.0.0.1:PORT), KEY_PREFIX (unique per run).
import { ApiError, createFalClient } from "@fal-ai/client";

const BASE = process.env.FLUX_BASE;
const APP = "fal-ai/flux/dev";

function client(mode) {
  if (mode === "proxy") {
    return createFalClient({ credentials: "any-key", proxyUrl: { url: `${BASE}/api/fal/proxy`, when: "always" } });
  }
  return createFalClient({
    credentials: "any-key",
    requestMiddleware: async (request) => ({
      ...request,
      url: request.url.replace("https://queue.fal.run", BASE).replace("https://fal.run", `${BASE}/run`),
    }),
  });
}

const input = { prompt: "a lighthouse", image_size: { width: 64, height: 64 }, num_inference_steps: 2, seed: 5 };
const out = {};
for (const mode of ["proxy", "middleware"]) {
  const fal = client(mode);
  const headers = { "Idempotency-Key": `${process.env.KEY_PREFIX}-${mode}` };
  const first = await fal.queue.submit(APP, { input, headers });
  const again = await fal.queue.submit(APP, { input, headers });
  let refused = { thrown: false };
  try {
    await fal.queue.submit(APP, { input: { ...input, seed: 6 }, headers });
  } catch (error) {
    refused = { thrown: true, isApiError: error instanceof ApiError, status: error.status, body: error.body };
  }
  await fal.queue.subscribeToStatus(APP, { requestId: first.request_id, pollInterval: 50 });
  out[mode] = { first: first.request_id, again: again.request_id, refused };
}
console.log(JSON.stringify(out));
