"""MKS2: visual memory inside a Llama and the soft mixture of multimodal experts (SPEC.md)."""
