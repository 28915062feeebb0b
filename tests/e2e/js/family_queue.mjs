// @fal-ai/client's queue calls on the family's app ids (a fine-tune's own owner included), in
// proxy and middleware mode, against a server whose "worker" is the Python test: it submits each
// app id, prints one line per submit ({"submitted": app, "request_id"}) so that the test can
// complete the job, then waits for COMPLETED and reads the result. Last line: everything seen.
// Environment: FLUX_BASE (http://127.0.0.1:PORT), FAMILY_APPS (comma-separated app ids),
// UNSERVED_APP (an app id the server does not serve, or empty).
import { ApiError, createFalClient } from "@fal-ai/client";

const BASE = process.env.FLUX_BASE;
const APPS = process.env.FAMILY_APPS.split(",");
const UNSERVED = process.env.UNSERVED_APP;

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

const input = { prompt: "a lighthouse", image_url: process.env.IMAGE_URI, mask_url: process.env.IMAGE_URI };
const out = { runs: [] };
for (const mode of ["proxy", "middleware"]) {
  const fal = client(mode);
  for (const app of APPS) {
    const submitted = await fal.queue.submit(app, { input });
    console.log(JSON.stringify({ submitted: app, request_id: submitted.request_id }));
    const firstStatus = await fal.queue.status(app, { requestId: submitted.request_id });
    await fal.queue.subscribeToStatus(app, { requestId: submitted.request_id, pollInterval: 50 });
    const result = await fal.queue.result(app, { requestId: submitted.request_id });
    out.runs.push({ mode, app, submitted, firstStatus: firstStatus.status, result });
  }
  if (UNSERVED) {
    try {
      await fal.queue.submit(UNSERVED, { input });
      out[`unserved_${mode}`] = { thrown: false };
    } catch (error) {
      out[`unserved_${mode}`] = {
        thrown: true,
        isApiError: error instanceof ApiError,
        status: error.status,
        body: error.body,
      };
    }
  }
}
console.log(JSON.stringify(out));
