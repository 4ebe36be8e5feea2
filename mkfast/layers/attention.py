"""mkfast attention inside Hugging Face models: ``attn_implementation="mkfast"``.

    import mkfast
    mkfast.apply_attention(model)     # in place; mkfast.remove_attention(model) undoes it
    # or: register_transformers_attention(), then from_pretrained(..., attn_implementation="mkfast")

transformers builds one attention mask per forward through the mask builder registered
under our name, :func:`mkfast_mask`; it returns a :class:`MkfastMask` (or None for plain
causal attention) that every layer's :func:`mkfast_attention_forward` reads. Derived once
per forward, from the 2-D padding mask, the cache position and transformers' own mask
function (for ``position_ids`` packing):
  - ``filled_length``: keys [0, filled) hold tokens; a static cache is longer (its empty
    slots are cut off, views only);
  - no past (training, prefill): document ids per token, a new document at each packing
    boundary and at each change between padding and tokens (right-padded training,
    left-padded prompts, ``DataCollatorWithFlattening``'s position_ids resets) ->
    ``mkfast.ops.attention`` with ``document_ids``, whose kernels skip the blocks between
    documents. Padding tokens form their own documents: their outputs are meaningless,
    as with any attention, and no real token sees them;
  - with a past (generation steps): each row's first token (left padding) -> the op runs
    on the row's keys from there (a view), rows with the same start together;
  - plain causal -> ``mkfast.ops.decode_attention`` for a few new tokens without
    gradients (generation), ``mkfast.ops.attention`` otherwise.
A ``document_ids`` (B, S) model kwarg (RA-CM3 packing) supersedes the mask; without
position_ids, FlashAttention's ``cu_seq_lens_q`` kwarg (the flattening collator's
``return_flash_attn_kwargs=True``) gives the documents of a packed row. A 4-D mask
tensor a caller built itself goes to transformers' SDPA (any mask is allowed there).
A forced backend (``mkfast.use_backend``) applies per op: decode steps use the main op
where ``decode_attention`` lacks that backend (it has no ``cpu`` one).

Nothing here imports transformers at module import time; registration does. Needs
transformers with ``AttentionInterface`` and ``masking_utils`` (4.53+).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mkfast.backend import BackendUnavailableError
from mkfast.ops.attention import attention, decode_attention, decode_attention_backends
from mkfast.ops.attention_interface import document_ids_from_cu_seqlens, document_ids_from_position_ids

__all__ = ["ATTENTION_NAME", "MkfastMask", "apply_attention", "document_ids_from_position_ids",
           "mkfast_attention_forward", "mkfast_mask", "register_transformers_attention", "remove_attention"]

ATTENTION_NAME = "mkfast"
# Generation steps use the split-K decode kernel up to this many new tokens per
# row (speculative / multi-token steps); longer queries have enough rows for the
# main kernel's grid.
DECODE_MAX_NEW_TOKENS = 16
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")


@dataclass(frozen=True, eq=False)
class MkfastMask:
    """What mkfast attention needs of a batch's mask; built once per forward by :func:`mkfast_mask`.

    filled_length: keys [0, filled_length) hold tokens (a static cache may be longer).
    document_ids: (B, filled_length) int32 when the queries are all the keys (no past), else None.
    row_starts: with a past, each row's first real key (left padding), else None.
    """

    filled_length: int
    document_ids: torch.Tensor | None = None
    row_starts: tuple[int, ...] | None = None
    # generate() builds a static cache's mask before the forward and passes it in as the
    # attention mask: rank 4 makes transformers treat it as built and hand it back to the builder.
    ndim = 4


def mkfast_mask(batch_size: int, q_length: int, kv_length: int, q_offset=0, kv_offset: int = 0,
                mask_function=None, attention_mask: torch.Tensor | None = None, use_vmap: bool = False,
                device: torch.device | str = "cpu", **kwargs) -> MkfastMask | None:
    """transformers mask builder (``sdpa_mask``'s signature) -> :class:`MkfastMask` or None (plain causal)."""
    if isinstance(attention_mask, MkfastMask):
        return attention_mask
    if use_vmap:
        raise ValueError("mkfast attention: this model adds its own mask functions (or/and_mask_function), "
                         "which causal and document masks cannot express; use attn_implementation='sdpa'")
    if kv_offset != 0:
        raise ValueError(f"mkfast attention: caches that drop old keys (kv_offset={kv_offset}) "
                         "are not supported")
    past = int(q_offset)  # a static cache gives a tensor: one host sync per forward, not per layer
    filled = past + q_length
    valid = None
    if attention_mask is not None:
        valid = attention_mask.to(device=device, dtype=torch.bool)[:, :filled]
        if valid.shape[1] < filled:
            valid = torch.nn.functional.pad(valid, (0, filled - valid.shape[1]), value=True)
        if bool(valid.all()):
            valid = None
    if past == 0:
        starts = torch.zeros(batch_size, q_length, dtype=torch.bool, device=device)
        if q_length > 1 and mask_function is not None:
            # transformers folds position_ids packing into its mask function: a token that may not
            # see the one just before it starts a new document. O(B * S) evaluations, not O(S^2).
            rows = torch.arange(batch_size, device=device)[:, None]
            positions = torch.arange(1, q_length, device=device)[None]
            continues = mask_function(rows, torch.zeros_like(rows), positions, positions - 1)
            starts[:, 1:] = ~continues.expand(batch_size, q_length - 1)
        if valid is not None:
            starts[:, 1:] |= valid[:, 1:] != valid[:, :-1]
        document_ids = None
        if bool(starts.any()):
            document_ids = starts.to(torch.int32).cumsum(dim=1, dtype=torch.int32)
        if document_ids is None and filled == kv_length:
            return None
        return MkfastMask(filled, document_ids=document_ids)
    row_starts = None
    if valid is not None:
        first = valid.to(torch.int32).argmax(dim=1)
        if bool((valid.sum(dim=1) != filled - first).any()):
            raise ValueError("mkfast attention: with a KV cache, padding must be on the left "
                             "(tokenizer.padding_side = 'left'); a row has padding after its first token")
        row_starts = tuple(first.tolist())
    if row_starts is None and filled == kv_length:
        return None
    return MkfastMask(filled, row_starts=row_starts)


def _decode_runs_here(device: torch.device) -> bool:
    """Whether decode_attention has the backend asked for (forced, or auto) on ``device``."""
    try:
        decode_attention_backends.select(device)
    except BackendUnavailableError:
        return False
    return True


def _causal_attention(query, key, value, scaling, is_causal):
    """Plain causal (queries the last S_q keys): the decode kernel for generation steps."""
    query_length, key_length = query.shape[2], key.shape[2]
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value))
    if (is_causal and query_length <= DECODE_MAX_NEW_TOKENS and key_length > query_length and not needs_grad
            and _decode_runs_here(query.device)):
        # Every row's keys are all valid here: lengths are valid by construction.
        lengths = torch.full((query.shape[0],), key_length, dtype=torch.int32, device=query.device)
        return decode_attention(query, key, value, lengths, scale=scaling, check_lengths=False)
    return attention(query, key, value, causal=is_causal, scale=scaling)


def _left_padded_attention(query, key, value, row_starts, scaling, is_causal):
    """Rows whose first ``row_starts[b]`` keys are padding: each run of rows with one start on its views."""
    outputs, begin = [], 0
    while begin < len(row_starts):
        end = begin + 1
        while end < len(row_starts) and row_starts[end] == row_starts[begin]:
            end += 1
        start = row_starts[begin]
        rows = slice(begin, end)
        outputs.append(_causal_attention(query[rows], key[rows, :, start:], value[rows, :, start:], scaling,
                                         is_causal))
        begin = end
    return outputs[0] if len(outputs) == 1 else torch.cat(outputs)


def _document_ids_from_flash_kwargs(query, key, kwargs) -> torch.Tensor | None:
    """Document ids of one packed row from FlashAttention's ``cu_seq_lens_q`` (what transformers'
    flattening collator gives with ``return_flash_attn_kwargs=True``), or None. Per layer, but
    one searchsorted over S positions: negligible next to the attention."""
    cu_seqlens = kwargs.get("cu_seq_lens_q")
    if cu_seqlens is None or query.shape[2] != key.shape[2]:
        return None
    if query.shape[0] != 1:
        raise ValueError(f"mkfast attention: cu_seq_lens_q describes one packed row, "
                         f"got a batch of {query.shape[0]}")
    return document_ids_from_cu_seqlens(cu_seqlens.to(query.device), query.shape[2])[None]


def mkfast_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: MkfastMask | torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    document_ids: torch.Tensor | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers attention function: same signature and output as ``sdpa_attention_forward``.

    query (B, Hq, S_q, D), key/value (B, Hkv, S_kv, D) -> (attn_output (B, S_q, Hq, D) contiguous, None).
    """
    if dropout:
        raise ValueError(f"mkfast attention has no attention dropout, got dropout={dropout} "
                         "(set config.attention_dropout = 0.0)")
    for unsupported in ("softcap", "s_aux"):
        if kwargs.get(unsupported) is not None:
            raise ValueError(f"mkfast attention: {unsupported} is not supported (this model needs "
                             "attn_implementation='sdpa' or 'eager')")
    if isinstance(attention_mask, torch.Tensor):
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, is_causal=is_causal, **kwargs)
    is_causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    mask = attention_mask
    if mask is not None and mask.filled_length < key.shape[2]:
        key, value = key[:, :, :mask.filled_length], value[:, :, :mask.filled_length]
    window = kwargs.get("sliding_window")
    if window is not None and key.shape[2] > window:
        raise ValueError(f"mkfast attention has no sliding window: {key.shape[2]} keys exceed this model's "
                         f"sliding_window={window} (use sequences up to it, or attn_implementation='sdpa')")
    if document_ids is None and (mask is None or mask.document_ids is None):
        document_ids = _document_ids_from_flash_kwargs(query, key, kwargs)
    if document_ids is not None:
        if query.shape[2] != key.shape[2]:
            raise ValueError(f"mkfast attention: document_ids needs no KV cache (S_q == S_kv), "
                             f"got S_q={query.shape[2]}, S_kv={key.shape[2]}")
        out = attention(query, key, value, causal=is_causal, document_ids=document_ids, scale=scaling)
    elif mask is not None and mask.document_ids is not None:
        out = attention(query, key, value, causal=is_causal, document_ids=mask.document_ids, scale=scaling)
    elif mask is not None and mask.row_starts is not None:
        out = _left_padded_attention(query, key, value, mask.row_starts, scaling, is_causal)
    else:
        out = _causal_attention(query, key, value, scaling, is_causal)
    return out.transpose(1, 2).contiguous(), None


def register_transformers_attention(name: str = ATTENTION_NAME) -> bool:
    """Register :func:`mkfast_attention_forward` and :func:`mkfast_mask` under ``name``.

    Idempotent. Returns False when transformers is missing or too old to have
    attention-function and mask-builder registries.
    """
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface
    except ImportError:
        return False
    AttentionInterface.register(name, mkfast_attention_forward)
    AttentionMaskInterface.register(name, mkfast_mask)
    return True


def apply_attention(model: torch.nn.Module) -> torch.nn.Module:
    """Switch a transformers Llama / Mistral / Qwen2 model to mkfast attention, in place; returns it.

    Refuses a model already on mkfast attention; :func:`remove_attention` restores the previous one.
    """
    if not register_transformers_attention():
        raise ImportError("apply_attention needs transformers >= 4.53 (AttentionInterface, masking_utils)")
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise TypeError(f"apply_attention: model_type {model_type!r} is not supported; supported: "
                        f"{', '.join(SUPPORTED_MODEL_TYPES)} (others may need softcapping, sinks or "
                        "bidirectional masks the kernels do not have)")
    previous = config._attn_implementation
    if previous == ATTENTION_NAME:
        raise RuntimeError("apply_attention: the model already uses mkfast attention; "
                           "call remove_attention first")
    if getattr(config, "attention_dropout", 0.0):
        raise ValueError(f"apply_attention: mkfast attention has no dropout, the model has attention_dropout="
                         f"{config.attention_dropout}")
    model.set_attn_implementation(ATTENTION_NAME)
    model.mkfast_previous_attn_implementation = previous
    return model


def remove_attention(model: torch.nn.Module) -> torch.nn.Module:
    """Undo :func:`apply_attention` in place; returns the model."""
    previous = getattr(model, "mkfast_previous_attn_implementation", None)
    if previous is None:
        raise RuntimeError("remove_attention: the model was not switched by apply_attention")
    model.set_attn_implementation(previous)
    del model.mkfast_previous_attn_implementation
    return model
