"""Converters between Hugging Face checkpoints, GGUF files, cbjax Orbax params and training runs.

`orbax_export.convert_to_orbax` writes a base model as Orbax params (see `orbax_params`), and
`hf_export.convert_to_hf` writes a Hugging Face directory from such params or from a training run,
either merged (`hf_export`) or as PEFT adapters (`peft_export`). The `convert/` scripts wrap them.
"""
