"""Greedy decoding of many prompts that continue a few cached token histories: the
step-level evaluation's engine (:mod:`atlas.step_eval`), where every scored step of an expert
trajectory is a prompt whose tokens are a prefix of that trajectory's tokens."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch
from transformers import AttentionInterface

from atlas.rollout import common_prefix, has_complete_action, has_sliding_window

SHARED_PREFIX = "atlas_shared_prefix"  # the attention implementation the decoder runs under
_running: SharedPrefixDecoder | None = None  # the decoder whose forward pass is under way


def _shared_prefix_attention(module, query, key, value, attention_mask, scaling=None, **kwargs):
    return _running.attend(module.layer_idx, query, key, value, scaling)


AttentionInterface.register(SHARED_PREFIX, _shared_prefix_attention)


class _RowCache:
    """Each row's own keys and values (its prompt's last tokens and its response), one slot per
    row: the part of the KV cache that is not the shared trajectory prefix."""

    def __init__(self, decoder: SharedPrefixDecoder):
        self.decoder = decoder
        self.keys: list[torch.Tensor | None] = []
        self.values: list[torch.Tensor | None] = []

    def update(self, key_states, value_states, layer_idx, cache_kwargs=None):
        d = self.decoder
        while len(self.keys) <= layer_idx:
            self.keys.append(None)
            self.values.append(None)
        if self.keys[layer_idx] is None:
            shape = (key_states.shape[0], key_states.shape[1], d.capacity, key_states.shape[3])
            self.keys[layer_idx] = key_states.new_zeros(shape)
            self.values[layer_idx] = value_states.new_zeros(shape)
        k, v = self.keys[layer_idx], self.values[layer_idx]
        k[d.slot_index, :, d.length_d] = key_states[:, :, 0]
        v[d.slot_index, :, d.length_d] = value_states[:, :, 0]
        return k, v

    def grow(self, capacity: int) -> None:
        """Room for ``capacity`` tokens per row (a prompt with many tokens past the prefix)."""
        pad = lambda t: torch.cat([t, t.new_zeros((*t.shape[:2], capacity - t.shape[2], t.shape[3]))], 2)
        self.keys = [pad(k) for k in self.keys]
        self.values = [pad(v) for v in self.values]

    def keep(self, slots: torch.Tensor) -> None:
        self.keys = [k[slots] for k in self.keys]
        self.values = [v[slots] for v in self.values]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0


@dataclass
class _Row:
    key: Any            # (trajectory key, prompt index)
    prefix: Any         # the trajectory key whose cache holds this row's history
    reused: int         # prompt tokens read from that cache
    forced: list[int]   # prompt tokens still to feed (then the row generates)
    generated: list[int]


class SharedPrefixDecoder:
    """Greedy turns for many prompts that are continuations of a few cached token histories.

    Every scored step of an expert trajectory is a prompt whose tokens are a prefix of that
    trajectory's tokens (the history up to the step) plus the assistant header. Copying the
    trajectory's keys and values into every row of a batch (what batched ``generate`` needs)
    makes each decode step read them once per row: at 1,500 tokens of context and 16 rows the
    KV reads, not the weights, bound the speed. Here each trajectory's cache is kept once and
    every row attends to two parts:

    - the shared part: its trajectory's cached keys and values up to the row's step (read once
      per trajectory and decode step for all its rows);
    - its own part: the prompt tokens past the shared prefix (the assistant header) and its
      response so far, in a per-row slot.

    The softmax runs over both parts together (two partial softmaxes merged by their
    log-sum-exps, as cascade / flash-decoding kernels do), so the result is the attention over
    the concatenated sequence. Rows are decoded in
    ``slots`` slots, one token each per forward; a finished row's slot is refilled at once with
    the next prompt (continuous batching), so no row waits for the longest one in its batch.
    A row stops at an end-of-turn token, at a complete ``Action:`` line (as
    :class:`~atlas.rollout.ActionLineStop`) or after ``max_new_tokens``.

    Works for models whose attention layers use transformers' attention interface (Llama,
    Qwen2, Mistral, ... :meth:`supports`), without sliding windows; greedy only.
    """

    def __init__(self, model, tokenizer, max_new_tokens: int = 160, slots: int = 64,
                 stop: list[int] | None = None, pad: int = 0,
                 complete: Callable[[str], bool] = has_complete_action):
        self.model, self.tokenizer, self.complete = model, tokenizer, complete
        self.max_new_tokens, self.slots = max_new_tokens, slots
        self.stop, self.pad = set(stop or [tokenizer.eos_token_id]), pad
        text = model.config.get_text_config(decoder=True)
        self.heads, self.kv_heads = text.num_attention_heads, text.num_key_value_heads
        self.dtype = next(model.parameters()).dtype
        texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
        # tokens after which a response can first hold its action: a line's end (an Action:
        # line) or a closing brace (a tool call's JSON)
        self.may_complete = [("\n" in t or "}" in t) for t in texts]
        self.prefixes: dict[Any, tuple[list[int], list[tuple[torch.Tensor, torch.Tensor]]]] = {}
        self.cache: _RowCache | None = None
        self.base = model.get_base_model() if hasattr(model, "get_base_model") else model
        self.reused_tokens = 0  # prompt tokens read from the trajectories' caches

    @staticmethod
    def supports(model) -> bool:
        """Models whose attention layers call transformers' attention interface (so that
        the decoder's attention can stand in), with grouped KV heads and no sliding window."""
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        text = base.config.get_text_config(decoder=True)
        return (not has_sliding_window(base) and base._can_set_attn_implementation()
                and getattr(text, "num_key_value_heads", None) is not None)

    def decode(self, trajectories: Iterable[tuple[Any, list[int], list[tuple[torch.Tensor, torch.Tensor]],
                                                  list[list[int]]]]) -> dict[Any, str]:
        """Responses to every prompt of ``trajectories``: (key, token ids, their per-layer keys
        and values ``(kv_heads, len, head_dim)``, prompts). Trajectories are pulled one at a
        time as slots free up, and their caches dropped once their prompts are done; a
        response's key is ``(trajectory key, prompt index)``."""
        source = iter(trajectories)
        pending: deque[_Row] = deque()
        rows: list[_Row | None] = [None] * self.slots
        left: dict[Any, int] = {}  # prompts not yet finished, per trajectory
        out: dict[Any, str] = {}
        exhausted = False
        self.prefixes, self.capacity = {}, self.max_new_tokens + 1
        self.cache = _RowCache(self)
        self.length = torch.zeros(self.slots, dtype=torch.long)
        self.slot_index = torch.arange(self.slots)
        device = next(self.model.parameters()).device
        try:
            while True:
                for s in range(len(rows)):  # refill free slots
                    while rows[s] is None and not pending and not exhausted:
                        try:
                            key, ids, kv, prompts = next(source)
                        except StopIteration:
                            exhausted = True
                            break
                        self.prefixes[key] = (ids, kv)
                        left[key] = len(prompts)
                        for j, p in enumerate(prompts):
                            n = common_prefix(ids, p)
                            if not n:  # the chat template renders the history differently
                                raise RuntimeError(f"prompt {j} of {key!r} shares no token "
                                                   "with its trajectory's tokens")
                            self.reused_tokens += n
                            pending.append(_Row((key, j), key, n, p[n:], []))
                    if rows[s] is None and pending:
                        rows[s] = pending.popleft()
                        self.length[s] = 0
                busy = [s for s, r in enumerate(rows) if r is not None]
                if not busy:
                    break
                if exhausted and not pending and len(busy) <= len(rows) // 2:
                    keep = torch.tensor(busy)  # compact: idle slots still cost a forward row
                    self.cache.keep(keep)
                    rows = [rows[s] for s in busy]
                    self.length = self.length[keep]
                    self.slot_index = torch.arange(len(rows))
                self._forward(rows, device)
                for s, row in enumerate(rows):
                    if row is not None and self._finished(row):
                        out[row.key] = self.tokenizer.decode(row.generated,
                                                             skip_special_tokens=True).strip()
                        left[row.prefix] -= 1
                        if not left[row.prefix]:
                            del self.prefixes[row.prefix], left[row.prefix]
                        rows[s] = None
        finally:
            self.cache = self.prefixes = None
        return out

    def _finished(self, row: _Row) -> bool:
        if row.forced or not row.generated:
            return False
        last = row.generated[-1]
        if last in self.stop or len(row.generated) >= self.max_new_tokens:
            return True
        return self.may_complete[last] and self.complete(
            self.tokenizer.decode(row.generated, skip_special_tokens=True))

    @torch.inference_mode()
    def _forward(self, rows: list[_Row | None], device) -> None:
        """One token for every slot: a prompt token still to feed, or the last generated one."""
        tokens, positions = [], []
        for s, row in enumerate(rows):
            if row is None:  # an idle slot attends to itself only; its output is dropped
                tokens.append(self.pad)
                positions.append(0)
                continue
            fed = row.forced[0] if row.forced else row.generated[-1]
            tokens.append(fed)
            positions.append(row.reused + int(self.length[s]))
        # rows grouped by the trajectory whose cache they read, with their prefix lengths
        self.groups = []
        by: dict[Any, list[int]] = {}
        for s, row in enumerate(rows):
            if row is not None:
                by.setdefault(row.prefix, []).append(s)
        group = self.heads // self.kv_heads  # query heads per KV head
        start = 0
        for key, slots in by.items():
            reused = torch.tensor([rows[s].reused for s in slots])
            n = int(reused.max())  # every row reuses >= 1 token (decode checks)
            # a query sees the cached prefix up to its row's step: (1, 1, rows * group, n)
            hidden = (torch.arange(n)[None, :] >= reused[:, None]).repeat_interleave(group, 0)
            self.groups.append((start, start + len(slots), self.prefixes[key][1], n,
                                _additive(hidden, device, self.dtype)[None, None]))
            start += len(slots)
        # the busy slots, grouped by trajectory: a group's rows are the slice (start, end) of it
        self.order = torch.tensor([s for slots in by.values() for s in slots], device=device)
        if int(self.length.max()) >= self.capacity:
            self.capacity *= 2
            self.cache.grow(self.capacity)
        # a row sees its own slot up to the token it feeds now: (rows, 1, 1, length)
        hidden = torch.arange(int(self.length.max()) + 1)[None, :] > self.length[:, None]
        self.private = _additive(hidden, device, self.dtype)[:, None, None]
        self.slot_index, self.length_d = self.slot_index.to(device), self.length.to(device)
        ids = torch.tensor(tokens, device=device)[:, None]
        global _running
        base = self.base
        previous = base.config._attn_implementation
        try:  # only this forward runs with the shared-prefix attention
            base.set_attn_implementation(SHARED_PREFIX)
            _running = self
            out = self.model(
                input_ids=ids, position_ids=torch.tensor(positions, device=device)[:, None],
                attention_mask=torch.ones(len(rows), 1, 1, 1, dtype=torch.bool, device=device),
                past_key_values=self.cache, use_cache=True)
        finally:
            _running = None
            base.set_attn_implementation(previous)
        nxt = out.logits[:, -1].argmax(-1).tolist()
        for s, row in enumerate(rows):
            if row is None:
                continue
            self.length[s] += 1
            if row.forced:
                row.forced.pop(0)
                if row.forced:
                    continue  # the next prompt token is known: this prediction is not needed
            row.generated.append(nxt[s])

    def attend(self, layer: int, query, key, value, scaling):
        """Attention of one new token per row over its trajectory's cached prefix and its own
        slot; ``query`` (rows, heads, 1, dim), ``key``/``value`` the slots (rows, kv, len, dim).
        Each part gives its output and log-sum-exp; the two merge into the softmax over both."""
        R, H, _, D = query.shape
        G = key.shape[1]
        scale = scaling if scaling is not None else D ** -0.5
        q = query[:, :, 0].reshape(R, G, H // G, D)  # query heads grouped by their KV head
        P = self.private.shape[-1]
        o_own, lse_own = _attention(q, key[:, :, :P], value[:, :, :P], self.private, scale)
        grouped = q[self.order]  # one gather for all groups, then a slice per group
        outs, lses = [], []
        for start, end, kv, n, mask in self.groups:
            kb, vb = kv[layer]
            # the group's rows as one sequence of queries per KV head: (1, kv, rows * group, dim)
            qg = grouped[start:end].transpose(0, 1).reshape(1, G, -1, D)
            o, lse = _attention(qg, kb[None, :, :n], vb[None, :, :n], mask, scale)
            outs.append(o.reshape(G, end - start, H // G, D).transpose(0, 1))
            lses.append(lse.reshape(G, end - start, H // G).transpose(0, 1))
        o_pre, lse_pre = torch.zeros_like(o_own), torch.full_like(lse_own, float("-inf"))
        o_pre[self.order], lse_pre[self.order] = torch.cat(outs), torch.cat(lses)
        lse = torch.logaddexp(lse_own, lse_pre)
        o = (o_own * (lse_own - lse).exp()[..., None] + o_pre * (lse_pre - lse).exp()[..., None])
        return o.reshape(R, H, D)[:, None], None


def _additive(hidden: torch.Tensor, device, dtype) -> torch.Tensor:
    """An additive attention mask: -inf where ``hidden``, else 0."""
    return torch.zeros(hidden.shape, device=device, dtype=dtype).masked_fill_(
        hidden.to(device), float("-inf"))


def _attention(q, k, v, mask, scale):
    """Softmax attention of ``q`` (B, heads, queries, dim) over ``k``, ``v`` with an additive
    float ``mask`` (broadcast to (B, heads, queries, keys)): the output and each query's
    log-sum-exp of scores. On CPU the fused flash kernel computes both."""
    if q.device.type == "cpu":
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, attn_mask=mask, scale=scale)
    s = torch.einsum("bhqd,bhkd->bhqk", q, k) * scale + mask
    lse = s.logsumexp(-1)
    return torch.einsum("bhqk,bhkd->bhqd", (s - lse[..., None]).exp(), v), lse
