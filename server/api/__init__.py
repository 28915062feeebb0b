"""The HTTP process: protocols, routes, auth, webhooks dispatch; never imports torch."""
