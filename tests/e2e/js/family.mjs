// @fal-ai/client runs each FLUX.1 [dev] family endpoint end to end (subscribe, then stream for
// the first one), in proxy mode. Environment: FLUX_BASE, NODE_EXTRA_CA_CERTS and FAMILY_CASES, a
// JSON list of {app, input}. Prints one JSON object: {results: [{app, data, requestId}], stream}.
import { createFalClient } from "@fal-ai/client";

const BASE = process.env.FLUX_BASE;
const CASES = JSON.parse(process.env.FAMILY_CASES);
const fal = createFalClient({
  credentials: "any-key",
  proxyUrl: { url: `${BASE}/api/fal/proxy`, when: "always" },
});

const out = { results: [] };
for (const { app, input } of CASES) {
  const result = await fal.subscribe(app, { input, logs: true, pollInterval: 100 });
  out.results.push({ app, data: result.data, requestId: result.requestId });
}
const first = CASES[0];
const stream = await fal.stream(first.app, { input: first.input });
out.stream = await stream.done();
console.log(JSON.stringify(out));
