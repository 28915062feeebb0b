"""Tenants: who a request belongs to, what its key may do, and the limits it runs under.

The API's key check (server/api/auth.py) resolves every request to a `Caller` and puts it on
`request.state.caller`; routes and the submit path read it from there. Shared below the API,
the worker and the CLI: imports nothing of theirs.
"""

from server.tenants.caller import ANONYMOUS, Caller, Quotas, Role

__all__ = ["ANONYMOUS", "Caller", "Quotas", "Role"]
