// Bundled by tests/e2e/test_cors_browser.py (esbuild) for a page served on another origin.
import { fal } from "@fal-ai/client";

window.fal = fal;
