"""MKS2: visual memory inside a Llama, soft mixture of multimodal experts (docs/methods.md, M1-M7)."""
