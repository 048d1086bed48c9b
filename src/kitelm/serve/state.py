"""Row operations on a model's inference cache: the small per-row interface the serving engine is built on.

A `ModelCache` (one state per layer + `next_pos [B]`) holds several sequences, one per row. The engine keeps the
running sequences in one batch cache and needs three things from it, whatever the architecture:

    gather(model, [(cache, rows), ...], headroom) → a new cache holding those rows, in that order
    state_nbytes(cache)                           → bytes held (the memory a sequence costs)
    save_state / load_state                       → a conversation's state on disk (safetensors)

Every layer state is one of three kinds, told apart by its buffers (the classes live beside their layers):

- global attention `KVCache`: `k, v [B, H, capacity, hd]`, `pos [B, capacity]` (−1 = empty), one `length` for all
  rows. Rows are right-aligned: a sequence of n tokens fills the last n filled slots and its leading slots are
  position −1, which attention masks. Gathering trims the slots that are empty in every row and adds `headroom`
  free slots, so a kept single-row snapshot holds exactly its tokens.
- Griffin's `RingKVCache`: `k, v [B, H, window, hd]`, `segment [B, window]`, `last_segment [B]`, one `count` for all
  rows (the token at step τ sits in slot τ mod window). Only the count modulo the window and the differences
  between steps matter, so a row joins a batch of another count by rolling its slots by the difference: every key
  keeps its distance to the next query, and empty slots keep document −1.
- Griffin's `RecurrentState`: `conv [B, K−1, L]`, `h [B, L]`: per row, copied as is.
"""

from __future__ import annotations

import torch

from ..errors import KitelmError


def _kind(state) -> str:
    if state is None:
        return "none"
    if hasattr(state, "pos") and hasattr(state, "length"):
        return "kv"
    if hasattr(state, "segment") and hasattr(state, "count"):
        return "ring"
    if hasattr(state, "h") and hasattr(state, "conv"):
        return "recurrent"
    raise KitelmError(f"the serving engine does not know the inference state {type(state).__name__}")


def is_bounded(model) -> bool:
    """True when the model's state does not grow with the tokens seen (Griffin, Hawk: no global-attention KV)."""
    return all(_kind(s) != "kv" for s in model.new_cache(1, max_len=1).layers)


def state_nbytes(cache) -> int:
    """Bytes held by the tensors of `cache`."""
    return cache.nbytes() + cache.next_pos.numel() * cache.next_pos.element_size()


def _kv_span(state, rows) -> int:
    """Filled slots of `rows` after trimming the slots that are empty (position −1) in all of them."""
    pos = state.pos[rows, :state.length]
    filled = (pos >= 0).any(0).nonzero()
    return 0 if filled.numel() == 0 else state.length - int(filled[0])


def gather(model, parts: list[tuple[object, list[int]]], headroom: int = 0):
    """A new cache holding `rows` of each `(cache, rows)` in `parts`, in that order (a cache may appear several times:
    n > 1 forks one prompt's state). Global-attention layers get `headroom` free slots after the longest row."""
    batch = sum(len(rows) for _, rows in parts)
    first = parts[0][0]
    kinds = [_kind(s) for s in first.layers]
    length = 0
    for i, kind in enumerate(kinds):
        if kind == "kv":
            length = max([length] + [_kv_span(c.layers[i], rows) for c, rows in parts])
            break
    ref = next(model.parameters())
    out = model.new_cache(batch, max_len=max(1, length + headroom), dtype=ref.dtype, device=ref.device)
    count = max((c.layers[i].count for c, _ in parts for i, k in enumerate(kinds) if k == "ring"), default=0)
    r0 = 0
    for cache, rows in parts:
        idx = torch.tensor(rows, dtype=torch.long, device=cache.next_pos.device)
        dst = slice(r0, r0 + len(rows))
        out.next_pos[dst] = cache.next_pos[idx]
        for kind, src, dest in zip(kinds, cache.layers, out.layers):
            if kind == "kv":
                span = min(src.length, length)
                s = slice(src.length - span, src.length)
                d = slice(length - span, length)
                dest.k[dst, :, d] = src.k[idx, :, s]
                dest.v[dst, :, d] = src.v[idx, :, s]
                dest.pos[dst, d] = src.pos[idx, s]
            elif kind == "ring":
                shift = (count - src.count) % src.window
                dest.k[dst] = torch.roll(src.k[idx], shift, dims=2)
                dest.v[dst] = torch.roll(src.v[idx], shift, dims=2)
                dest.segment[dst] = torch.roll(src.segment[idx], shift, dims=1)
                dest.last_segment[dst] = src.last_segment[idx]
            elif kind == "recurrent":
                dest.conv[dst] = src.conv[idx]
                dest.h[dst] = src.h[idx]
        r0 += len(rows)
    for kind, dest in zip(kinds, out.layers):
        if kind == "kv":
            dest.length = length
        elif kind == "ring":
            dest.count = count
    return out


def kv_room(cache) -> int | None:
    """Free slots left in the global-attention layers (None for a bounded state)."""
    for s in cache.layers:
        if _kind(s) == "kv":
            return s.capacity - s.length
    return None


def save_state(cache, path, meta: dict[str, str] | None = None) -> None:
    """Write a single-row cache to `path` (safetensors; counters stored as tensors, so a Griffin/Hawk state file
    has the same size whatever the conversation's length). `meta`: string metadata kept beside it."""
    from safetensors.torch import save_file

    tensors = {"next_pos": cache.next_pos.cpu().contiguous()}
    kinds = []
    for i, s in enumerate(cache.layers):
        kind = _kind(s)
        kinds.append(kind)
        for name, b in (s.named_buffers() if s is not None else []):
            tensors[f"layers.{i}.{name}"] = b.detach().cpu().contiguous()
        counter = {"kv": "length", "ring": "count"}.get(kind)
        if counter:
            tensors[f"layers.{i}.{counter}"] = torch.tensor([getattr(s, counter)], dtype=torch.long)
    try:
        save_file(tensors, str(path), metadata={"kitelm_state": "1", "kinds": ",".join(kinds), **(meta or {})})
    except OSError as err:
        raise KitelmError(f"cannot write conversation state {path} ({err.strerror or err})") from None


def load_state(model, path) -> tuple[object, dict[str, str]]:
    """(cache, meta) read back from `save_state`; refuses a file written for another model."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as err:  # safetensors raises its own error types for a file that is not one of its files
        raise KitelmError(f"cannot read conversation state {path} ({err})") from None
    if meta.get("kitelm_state") != "1":
        raise KitelmError(f"{path} is not a kitelm conversation state (written by /save)")
    kinds = meta.get("kinds", "").split(",")
    cap = next((tensors[f"layers.{i}.pos"].shape[1] for i, k in enumerate(kinds) if k == "kv"), 1)
    ref = next(model.parameters())
    cache = model.new_cache(1, max_len=max(1, cap), dtype=ref.dtype, device=ref.device)
    if kinds != [_kind(s) for s in cache.layers]:
        raise KitelmError(f"{path} was saved from another architecture; load it with the model that wrote it")
    for i, (kind, dest) in enumerate(zip(kinds, cache.layers)):
        for name, b in (dest.named_buffers() if dest is not None else []):
            t = tensors.get(f"layers.{i}.{name}")
            if t is None or t.shape != b.shape:
                raise KitelmError(f"{path} does not match this model (buffer layers.{i}.{name}); load it with the "
                                  "model that wrote it")
            b.copy_(t)
        counter = {"kv": "length", "ring": "count"}.get(kind)
        if counter:
            setattr(dest, counter, int(tensors[f"layers.{i}.{counter}"][0]))
    cache.next_pos.copy_(tensors["next_pos"])
    return cache, {k: v for k, v in meta.items() if k not in ("kitelm_state", "kinds")}
