"""Row operations on a model's inference cache: the small per-row interface the serving engine is built on.

A `ModelCache` (one state per layer + `next_pos [B]`) holds several sequences, one per row. The engine keeps the
running sequences in one batch cache and needs three things from it, whatever the architecture:

    gather(model, [(cache, rows), ...], headroom) → a new cache holding those rows, in that order
    write_row / move_row                          → one row in place (`RowBatch`: join and leave in O(one state))
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


def gather(model, parts: list[tuple[object, list[int]]], headroom: int = 0, batch_rows: int = 0):
    """A new cache holding `rows` of each `(cache, rows)` in `parts`, in that order (a cache may appear several times:
    n > 1 forks one prompt's state), then empty rows up to `batch_rows`. Global-attention layers get `headroom` free
    slots after the longest row."""
    batch = max(batch_rows, sum(len(rows) for _, rows in parts))
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


def write_row(cache, row: int, single) -> None:
    """Write the single-row cache `single` into row `row` of `cache` (global attention: its span must fit the filled
    slots, see `fits_row`), aligned to the batch's shared counters."""
    cache.next_pos[row] = single.next_pos[0]
    for dest, src in zip(cache.layers, single.layers):
        kind = _kind(dest)
        if kind == "kv":
            span, length = _kv_span(src, [0]), dest.length
            dest.pos[row] = -1
            dest.k[row, :, length - span:length] = src.k[0, :, src.length - span:src.length]
            dest.v[row, :, length - span:length] = src.v[0, :, src.length - span:src.length]
            dest.pos[row, length - span:length] = src.pos[0, src.length - span:src.length]
        elif kind == "ring":
            shift = (dest.count - src.count) % dest.window
            dest.k[row] = torch.roll(src.k[0], shift, dims=1)
            dest.v[row] = torch.roll(src.v[0], shift, dims=1)
            dest.segment[row] = torch.roll(src.segment[0], shift, dims=0)
            dest.last_segment[row] = src.last_segment[0]
        elif kind == "recurrent":
            dest.conv[row] = src.conv[0]
            dest.h[row] = src.h[0]


def fits_row(cache, single) -> bool:
    """Whether `write_row(cache, ·, single)` can place `single` without moving the other rows."""
    return all(_kv_span(src, [0]) <= dest.length for dest, src in zip(cache.layers, single.layers)
               if _kind(dest) == "kv")


def move_row(cache, src: int, dst: int) -> None:
    """Copy row `src` of every buffer into row `dst`."""
    cache.next_pos[dst] = cache.next_pos[src]
    for state in cache.layers:
        for b in (state.buffers() if state is not None else ()):
            b[dst] = b[src]


def _row_view(state, n: int):
    """The same state restricted to rows [0, n): its buffers are views, its counters copies (see `RowBatch.sync`)."""
    view = object.__new__(type(state))
    view.__dict__.update(state.__dict__)
    view.__dict__["_buffers"] = {name: b[:n] for name, b in state._buffers.items()}
    return view


class RowBatch:
    """The running sequences' states in rows [0, n) of one preallocated cache.

    A joining sequence is written into row n and a leaving one replaced by the last row (`move_row`), so a change
    costs one sequence's state, not the batch's. The cache is rebuilt with `gather` only when it needs more rows or,
    for global attention, more slots (then `headroom` more) or a longer span than the batch holds."""

    def __init__(self, model, headroom: int = 0):
        self.model, self.headroom = model, headroom
        self.cache = None
        self.n = 0

    def _rebuild(self, extra: list[tuple[object, list[int]]] = (), rows: int = 0) -> None:
        parts = ([(self.cache, list(range(self.n)))] if self.n else []) + list(extra)
        self.cache = gather(self.model, parts, self.headroom, batch_rows=rows) if parts else None

    def add(self, single, copies: int = 1) -> None:
        """Append `copies` rows holding the single-row cache `single`."""
        rows = 0 if self.cache is None else self.cache.next_pos.shape[0]
        if rows < self.n + copies or not fits_row(self.cache, single) or _kv_full(self.cache):
            self._rebuild([(single, [0] * copies)], rows=max(self.n + copies, 2 * rows))
        else:
            for r in range(self.n, self.n + copies):
                write_row(self.cache, r, single)
        self.n += copies

    def remove(self, row: int) -> None:
        """Drop `row`; the last row takes its place (the caller mirrors that in its own list)."""
        if row != self.n - 1:
            move_row(self.cache, self.n - 1, row)
        self.n -= 1
        if self.n == 0:
            self.cache = None  # an idle server holds no batch memory

    def take(self, row: int):
        """A single-row copy of `row` (for the kept-state cache or the caller)."""
        return gather(self.model, [(self.cache, [row])])

    def view(self):
        """The cache of rows [0, n) for one forward; call `sync(view)` after it."""
        if _kv_full(self.cache):
            self._rebuild(rows=self.cache.next_pos.shape[0])
        return type(self.cache)([_row_view(s, self.n) for s in self.cache.layers], self.cache.next_pos[:self.n])

    def sync(self, view) -> None:
        """Carry a forward's counter and position updates from `view` back to the batch."""
        self.cache.next_pos[:self.n] = view.next_pos
        for state, v in zip(self.cache.layers, view.layers):
            kind = _kind(state)
            if kind == "kv":
                state.length = v.length
            elif kind == "ring":
                state.count = v.count


def _kv_full(cache) -> bool:
    room = kv_room(cache)
    return room is not None and room < 1


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
