// Drives @fal-ai/client's storage against a local flux-server: explicit uploads of a Blob and
// a File, Blob inputs that subscribe and queue.submit upload by themselves, a lifecycle, and
// (FAL_BIG=1) a file above the client's 90 MB multipart threshold. Prints one JSON object.
// Environment: FLUX_BASE, FAL_MODE ("proxy" or "middleware"), FAL_CREDENTIALS, FAL_BIG,
// NODE_EXTRA_CA_CERTS. The Python test (test_fal_js_uploads.py) asserts on the output.
import { createHash } from "node:crypto";
import { ApiError, createFalClient } from "@fal-ai/client";
import { png } from "./png.mjs";

const BASE = process.env.FLUX_BASE;
const MODE = process.env.FAL_MODE;
const CREDENTIALS = process.env.FAL_CREDENTIALS || "any-key";

function makeClient(credentials) {
  if (MODE === "proxy") {
    return createFalClient({ credentials, proxyUrl: { url: `${BASE}/api/fal/proxy`, when: "always" } });
  }
  // Without a proxy, fal's REST host (where uploads start) is rewritten like the queue hosts.
  return createFalClient({
    credentials,
    requestMiddleware: async (request) => ({
      ...request,
      url: request.url
        .replace("https://queue.fal.run", BASE)
        .replace("https://fal.run", `${BASE}/run`)
        .replace("https://rest.fal.ai", BASE),
    }),
  });
}

const sha256 = (buffer) => createHash("sha256").update(buffer).digest("hex");

async function served(url) {
  const response = await fetch(url);
  const body = Buffer.from(await response.arrayBuffer());
  return {
    status: response.status,
    contentType: response.headers.get("content-type"),
    cacheControl: response.headers.get("cache-control"),
    size: body.length,
    sha256: sha256(body),
  };
}

async function main() {
  const fal = makeClient(CREDENTIALS);
  const out = { mode: MODE };

  if (process.env.FAL_EXPECT_REFUSAL === "1") {
    try {
      await fal.storage.upload(new Blob([png(8, 8)], { type: "image/png" }));
      out.refused = { thrown: false };
    } catch (error) {
      out.refused = { thrown: true, isApiError: error instanceof ApiError, status: error?.status };
    }
    process.stdout.write(`${JSON.stringify(out)}\n`);
    return;
  }

  const picture = png(96, 64);
  out.pictureSha256 = sha256(picture);
  const blobUrl = await fal.storage.upload(new Blob([picture], { type: "image/png" }));
  out.blob = { url: blobUrl, ...(await served(blobUrl)) };

  const mask = png(32, 32);
  const fileUrl = await fal.storage.upload(new File([mask], "mask.png", { type: "image/png" }));
  out.file = { url: fileUrl, maskSha256: sha256(mask), ...(await served(fileUrl)) };

  const shortUrl = await fal.storage.upload(new Blob([mask], { type: "image/png" }), {
    lifecycle: { expiresIn: 60 },
  });
  out.lifecycle = { url: shortUrl, ...(await served(shortUrl)) };

  // Blob inputs: the client uploads them itself before it submits.
  out.imageToImage = await fal.subscribe("fal-ai/flux/dev/image-to-image", {
    input: {
      prompt: "the same picture at night",
      image_url: new Blob([picture], { type: "image/png" }),
      strength: 0.3,
      num_inference_steps: 10,
      seed: 7,
    },
  });
  const queued = await fal.queue.submit("fal-ai/flux-1/dev/redux", {
    input: {
      image_url: new Blob([picture], { type: "image/png" }),
      image_size: { width: 64, height: 64 },
      num_inference_steps: 2,
      seed: 8,
    },
  });
  await fal.queue.subscribeToStatus("fal-ai/flux-1/dev/redux", {
    requestId: queued.request_id,
    mode: "polling",
    pollInterval: 100,
  });
  out.redux = await fal.queue.result("fal-ai/flux-1/dev/redux", { requestId: queued.request_id });

  if (process.env.FAL_BIG === "1") {
    // Above 90 MB the client switches to its multipart protocol (10 MB parts).
    const big = Buffer.alloc(91 * 1024 * 1024 + 123);
    for (let i = 0; i < big.length; i += 4096) big[i] = (i / 4096) % 251;
    const started = Date.now();
    const bigUrl = await fal.storage.upload(new Blob([big], { type: "application/octet-stream" }));
    out.big = { url: bigUrl, seconds: (Date.now() - started) / 1000, sha256: sha256(big), served: await served(bigUrl) };
  }
  process.stdout.write(`${JSON.stringify(out)}\n`);
}

main().catch((error) => {
  process.stderr.write(`uploads failed: ${String(error?.message ?? error)} ${JSON.stringify(error?.body ?? null)}\n${error?.stack ?? ""}\n`);
  process.exit(1);
});
