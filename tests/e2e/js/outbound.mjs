// @fal-ai/client (proxy mode) against a server with outbound fetches closed (the default):
// an image URL, a webhook and a LoRA each naming a closed address. Environment: FLUX_BASE,
// NODE_EXTRA_CA_CERTS, CLOSED_URL (a loopback URL the server must never contact).
// Prints one JSON object: each attempt's error (status and body) or its result.
import { ApiError, createFalClient } from "@fal-ai/client";

const BASE = process.env.FLUX_BASE;
const CLOSED = process.env.CLOSED_URL;
const fal = createFalClient({
  credentials: "any-key",
  proxyUrl: { url: `${BASE}/api/fal/proxy`, when: "always" },
});
const small = { prompt: "a lighthouse", image_size: { width: 64, height: 64 }, num_inference_steps: 10, seed: 3 };

async function attempt(run) {
  try {
    return { thrown: false, result: await run() };
  } catch (error) {
    return { thrown: true, isApiError: error instanceof ApiError, status: error.status, body: error.body };
  }
}

const out = {};
out.image = await attempt(() =>
  fal.subscribe("fal-ai/flux/dev/image-to-image", { input: { ...small, image_url: "http://169.254.169.254/latest/meta-data/" } }),
);
out.webhook = await attempt(() =>
  fal.queue.submit("fal-ai/flux/dev", { input: small, webhookUrl: `${CLOSED}/hook` }),
);
out.lora = await attempt(() =>
  fal.subscribe("fal-ai/flux-lora", { input: { ...small, loras: [{ path: `${CLOSED}/style.safetensors`, scale: 1 }] } }),
);
console.log(JSON.stringify(out));
