// Drives @fal-ai/client against a local flux-server and prints one JSON object with what it saw.
// Environment: FLUX_BASE (https://127.0.0.1:PORT), FAL_MODE ("proxy" or "middleware"),
// NODE_EXTRA_CA_CERTS (the test CA). The Python test (test_fal_js.py) asserts on the output.
import { ApiError, ValidationError, createFalClient } from "@fal-ai/client";
import { png } from "./png.mjs";

const BASE = process.env.FLUX_BASE;
const MODE = process.env.FAL_MODE;

function makeClient() {
  if (MODE === "proxy") {
    // The object form: a plain string proxyUrl only applies in browsers.
    return createFalClient({
      credentials: "any-key",
      proxyUrl: { url: `${BASE}/api/fal/proxy`, when: "always" },
    });
  }
  return createFalClient({
    credentials: "any-key",
    requestMiddleware: async (request) => ({
      ...request,
      url: request.url.replace("https://queue.fal.run", BASE).replace("https://fal.run", `${BASE}/run`),
    }),
  });
}

const small = (seed, extra = {}) => ({
  prompt: "a lighthouse on a cliff",
  image_size: { width: 64, height: 64 },
  num_inference_steps: 2,
  seed,
  ...extra,
});

// A PNG (two colours) as a data URI.
function pngDataUri(width, height) {
  return `data:image/png;base64,${png(width, height).toString("base64")}`;
}

function describeError(error) {
  return {
    name: error?.constructor?.name,
    isApiError: error instanceof ApiError,
    isValidationError: error instanceof ValidationError,
    status: error?.status,
    body: error?.body,
    fieldErrors: error instanceof ValidationError ? error.fieldErrors : undefined,
    message: String(error?.message ?? error),
  };
}

async function main() {
  const fal = makeClient();
  const out = { mode: MODE };

  out.run = await fal.run("fal-ai/flux/dev", { input: small(1) });

  const updates = [];
  out.subscribePolling = await fal.subscribe("fal-ai/flux/dev", {
    input: small(2, { num_inference_steps: 3 }),
    logs: true,
    pollInterval: 100,
    onQueueUpdate: (update) => updates.push({ status: update.status, logs: update.logs ?? null }),
  });
  out.pollingUpdates = updates;

  const streamedUpdates = [];
  out.subscribeStreaming = await fal.subscribe("fal-ai/flux-1/dev", {
    input: small(3),
    mode: "streaming",
    logs: true,
    onQueueUpdate: (update) => streamedUpdates.push(update.status),
  });
  out.streamingUpdates = streamedUpdates;

  const submitted = await fal.queue.submit("fal-ai/flux/dev", { input: small(4) });
  out.submitted = submitted;
  const requestId = submitted.request_id;
  out.firstStatus = await fal.queue.status("fal-ai/flux/dev", { requestId, logs: true });
  await fal.queue.subscribeToStatus("fal-ai/flux/dev", { requestId, mode: "polling", pollInterval: 100 });
  out.finalStatus = await fal.queue.status("fal-ai/flux/dev", { requestId, logs: false });
  out.result = await fal.queue.result("fal-ai/flux/dev", { requestId });
  try {
    await fal.queue.cancel("fal-ai/flux/dev", { requestId });
    out.cancelFinished = { thrown: false };
  } catch (error) {
    out.cancelFinished = { thrown: true, ...describeError(error) };
  }

  const stream = await fal.stream("fal-ai/flux/dev", { input: small(5, { num_inference_steps: 3 }) });
  const events = [];
  for await (const event of stream) events.push(event);
  out.streamEvents = events.length;
  out.streamDone = await stream.done();
  out.streamRequestId = stream.requestId ?? null;

  try {
    await fal.subscribe("fal-ai/flux/dev", { input: small(6, { num_images: 5 }) });
    out.validation = { thrown: false };
  } catch (error) {
    out.validation = { thrown: true, ...describeError(error) };
  }

  out.imageToImage = await fal.subscribe("fal-ai/flux/dev/image-to-image", {
    input: {
      prompt: "the same picture at night",
      image_url: pngDataUri(96, 64),
      strength: 0.3,
      num_inference_steps: 10,
      seed: 7,
    },
  });
  out.redux = await fal.subscribe("fal-ai/flux-1/dev/redux", {
    input: { image_url: pngDataUri(96, 64), image_size: { width: 64, height: 64 }, num_inference_steps: 2, seed: 8 },
  });
  out.reduxOldId = await fal.run("fal-ai/flux/dev/redux", {
    input: { image_url: pngDataUri(96, 64), image_size: { width: 64, height: 64 }, num_inference_steps: 2, seed: 9 },
  });
  process.stdout.write(`${JSON.stringify(out)}\n`);
}

main().catch((error) => {
  process.stderr.write(`flow failed: ${JSON.stringify(describeError(error))}\n${error?.stack ?? ""}\n`);
  process.exit(1);
});
