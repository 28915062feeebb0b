"""Webhooks: the URL policy (policy.py), signatures (signing.py) and the dispatcher that
delivers completed jobs' webhooks from the queue's delivery rows (dispatch.py). The payloads
belong to the protocols (server/api/protocols/<name>/webhook.py); the app hands them in."""
