"""Where a request's LoRAs come from, with no internet (torch-free; runs in the worker).

- sources.py: `LoraResolver.resolve(path)` -> a local safetensors file, from an uploaded file
  of this server, a LAN http(s) URL (downloaded once), a name inside `--lora-dir`, or a Hugging
  Face repo id found in the local Hugging Face cache (offline);
- cache.py: the on-disk download cache, bounded in bytes (least recently used goes first).
"""
