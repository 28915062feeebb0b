// @fal-ai/client in proxy mode against fal-ai/flux-lora: one LoRA request and one bad LoRA.
// Environment: FLUX_BASE, NODE_EXTRA_CA_CERTS, LORA_PATH, BAD_LORA_PATH. Prints one JSON object.
import { ApiError, createFalClient } from "@fal-ai/client";

const BASE = process.env.FLUX_BASE;
const fal = createFalClient({
  credentials: "any-key",
  proxyUrl: { url: `${BASE}/api/fal/proxy`, when: "always" },
});
const input = (path) => ({
  prompt: "a lighthouse",
  image_size: { width: 64, height: 64 },
  num_inference_steps: 2,
  seed: 9,
  output_format: "png",
  loras: [{ path, scale: 1 }],
});

const out = {};
const result = await fal.subscribe("fal-ai/flux-lora", { input: input(process.env.LORA_PATH), logs: true });
out.data = result.data;
out.requestId = result.requestId;
try {
  await fal.subscribe("fal-ai/flux-lora", { input: input(process.env.BAD_LORA_PATH) });
  out.bad = { thrown: false };
} catch (error) {
  out.bad = { thrown: true, isApiError: error instanceof ApiError, status: error.status, body: error.body };
}
console.log(JSON.stringify(out));
