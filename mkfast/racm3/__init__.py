"""RA-CM3: CLIP retriever + CM3 generator over VQ image tokens (docs/methods.md, equations R1-R3)."""
