"""RA-CM3: CLIP retriever + CM3 generator over VQ image tokens (SPEC.md)."""
