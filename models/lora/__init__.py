"""Per-request LoRAs on the shared FLUX pipeline.

- spec.py: what a request asks for (`LoraSpec`: a local file and its scale) and the limits;
- reading.py: reading and checking one file (any layout diffusers reads) -> `LoadedLora`;
- manager.py: `LoraManager.apply(specs)`, the LoRAs for one request and off again afterwards;
- named.py / hotswap.py: the two ways of holding them (plain adapters / compiled hot-swap);
- layers.py: switching peft's layers; tiny_loras.py: test LoRAs for the tiny model.

Finding the file (URL download, LoRA folder, Hugging Face cache, uploads) is the server's job.
"""

from models.lora.errors import LoraError
from models.lora.spec import LoraLimits, LoraSpec

__all__ = ["LoraError", "LoraLimits", "LoraSpec"]
