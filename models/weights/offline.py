"""Keep every Hugging Face library off the network, whatever the environment says."""

from __future__ import annotations

import os
import sys

# Values that make huggingface_hub, transformers and diffusers stay off the network.
# diffusers has no offline switch of its own: it reads huggingface_hub's HF_HUB_OFFLINE.
OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "DISABLE_TELEMETRY": "1",
    "DO_NOT_TRACK": "1",
    "HF_HUB_DISABLE_UPDATE_CHECK": "1",
    "HF_HUB_DISABLE_IMPLICIT_TOKEN": "1",
}


def enforce_offline() -> None:
    """Switch every Hugging Face library to offline mode, whatever the environment says.

    Sets the environment variables (read by libraries imported later) and the module-level
    copies that libraries already imported made of them at import time. Looks only at what
    each module already holds (its `__dict__`): transformers' lazy modules import their
    submodules on a `getattr` of a name they do not have, and under transformers 5.17 asking
    each of them for `HF_HUB_OFFLINE` imported some 420 image-processing modules.
    """
    os.environ.update(OFFLINE_ENV)
    constants = sys.modules.get("huggingface_hub.constants")
    if constants is not None:
        constants.HF_HUB_OFFLINE = True
        constants.HF_HUB_DISABLE_TELEMETRY = True
    for name, module in list(sys.modules.items()):
        if module is None or not name.startswith(("huggingface_hub", "diffusers", "transformers")):
            continue
        held = getattr(module, "__dict__", {})
        for flag in ("HF_HUB_OFFLINE", "HF_HUB_DISABLE_TELEMETRY"):
            if isinstance(held.get(flag), bool):
                setattr(module, flag, True)
