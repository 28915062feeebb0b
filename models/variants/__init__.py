"""The FLUX.1 [dev] family besides the base `--model`: Fill, Kontext, Krea and fine-tunes.

- `spec` (torch-free, the preflight): which variants are configured and whether their files
  are right (`resolve_variants`);
- `tiny`: the tiny variants `--model tiny` serves; `load`: one variant's transformer;
- `pipelines`: a variant's diffusers pipelines on the base's shared components, its presets
  and LoRAs; `serving`: every variant one worker serves, and its residency manager
  (models/residency.py); `placement`: moving one variant's weights; `sizes`: Kontext's and
  Fill's image sizes and Fill's paste-back.
"""
