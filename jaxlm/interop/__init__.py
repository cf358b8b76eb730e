"""Interoperability with other model formats (Hugging Face transformers: `jaxlm.interop.hf`)."""
