"""Log-likelihood of each choice's continuation after its context, the way lm-evaluation-
harness and OLMES score ranked classification, with each context computed once.

Encoding (lm-eval's `_encode_pair`): whitespace at the end of the context moves to the start
of the continuation; the context's tokens are the context's alone and the continuation's are
those of the whole string after them.

Sharing: the choices of a question with one context (every benchmark but Winogrande, whose
choices differ in their context) are scored from one pass over that context. Contexts run
left-padded with a KV cache, keeping the last position's logits only; the cache's rows are
repeated for the choices, whose tokens then run after it (positions and attention masks
continue each context), keeping logits only where a continuation token is predicted. The
first continuation token is scored from the context pass's last logits. A choice whose
context and continuation do not fit the model's window is scored alone, truncated from the
left as lm-eval truncates it (when the continuation alone is longer than the window, only its
last tokens are scored). Batches are formed by length and capped in tokens and in bytes of
logits and cache.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..lm.batches import SCORING_BYTES, forward_kwargs, kv_bytes_per_token, returned_cache

TOKENS_PER_BATCH = 4096  # a forward pass's tokens (the matrix products' efficient size here)


@dataclass
class Scored:
    """One choice: its continuation's summed log-probability and how many tokens it was."""

    loglik: float
    tokens: int


def encode_pair(encode: Callable[[str], list[int]], context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's split of a (context, continuation) pair into token ids."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        continuation = context[-spaces:] + continuation
        context = context[:-spaces]
    whole = encode(context + continuation)
    ctx = encode(context)
    return ctx, whole[len(ctx):]


@dataclass
class _Group:
    """Choices scored after one context: (question, choice) and each continuation's ids."""

    ctx: list[int]
    members: list[tuple[int, int]]
    conts: list[list[int]]


def window_of(model: nn.Module, default: int = 2048) -> int:
    cfg = getattr(model, "config", None)
    return int(getattr(cfg, "max_position_embeddings", None) or default)


@torch.no_grad()
def score_choices(model: nn.Module, encode: Callable[[str], list[int]], pairs: Sequence[Sequence[tuple[str, str]]],
                  *, prefix_id: int, pad_id: int, context_prefix: Sequence[int] = (), window: int | None = None,
                  tokens_per_batch: int = TOKENS_PER_BATCH, progress: Callable[[int], None] | None = None,
                  share: bool = True) -> list[list[Scored]]:
    """For each question, for each of its (context, continuation) pairs, the continuation's
    log-likelihood. `prefix_id`: the token an empty context is read as (bos, else eos);
    `context_prefix`: ids every context starts with (the tokenizer's own prefix, e.g. Gemma's
    bos; an empty context is then just it);
    `progress(n)`: called with the number of questions done after each batch; `share=False`
    scores every pair alone (the oracle of the shared path)."""
    window = window or window_of(model)
    groups, alone = [], []
    for q, choices in enumerate(pairs):
        by_ctx: dict[tuple, _Group] = {}
        for c, (context, continuation) in enumerate(choices):
            ctx, cont = encode_pair(encode, context, continuation)
            ctx = list(context_prefix) + ctx
            if not ctx:
                ctx = [prefix_id]
            if not cont:
                raise ValueError(f"question {q}, choice {c}: the continuation {continuation!r} has no tokens")
            if not share or len(ctx) + len(cont) > window:
                alone.append(_Group(ctx, [(q, c)], [cont]))
                continue
            g = by_ctx.setdefault(tuple(ctx), _Group(ctx, [], []))
            g.members.append((q, c))
            g.conts.append(cont)
        groups += by_ctx.values()
    out: list[list[Scored | None]] = [[None] * len(choices) for choices in pairs]
    done_questions: set[int] = set()
    vocab = getattr(getattr(model, "config", None), "vocab_size", None) or 1
    kv = kv_bytes_per_token(model)
    was_training = model.training
    model.eval()
    try:
        for batch in _batches(groups, tokens_per_batch, vocab, kv):
            for (q, c), scored in _score_shared(model, batch, pad_id):
                out[q][c] = scored
            _progress(progress, batch, done_questions)
        for g in alone:
            (q, c), cont = g.members[0], g.conts[0]
            out[q][c] = _score_alone(model, g.ctx, cont, window)
            _progress(progress, [g], done_questions)
    finally:
        model.train(was_training)
    return out  # type: ignore[return-value]


def _progress(progress, batch: list[_Group], seen: set[int]) -> None:
    if progress is not None:
        new = {q for g in batch for q, _ in g.members} - seen
        seen |= new
        progress(len(new))


def _batches(groups: list[_Group], tokens: int, vocab: int, kv: int) -> list[list[_Group]]:
    """Groups by length, longest first, each batch within `tokens` tokens (padded) and within
    `SCORING_BYTES` of continuation logits (fp32) and of KV cache."""
    order = sorted(groups, key=lambda g: (len(g.ctx) + max(map(len, g.conts)), len(g.ctx)), reverse=True)
    out, cur = [], []
    for g in order:
        trial = cur + [g]
        lc = max(len(x.ctx) for x in trial)
        lk = max(len(c) for x in trial for c in x.conts)
        rows = sum(len(x.conts) for x in trial)
        padded = len(trial) * lc + rows * lk
        memory = rows * lk * vocab * 8 + rows * (lc + lk) * kv
        if cur and (padded > tokens or memory > SCORING_BYTES):
            out.append(cur)
            cur = [g]
        else:
            cur = trial
    return out + ([cur] if cur else [])


def _score_shared(model: nn.Module, batch: list[_Group], pad_id: int) -> list[tuple[tuple[int, int], Scored]]:
    device = next(model.parameters()).device
    cache_kw, last_only = forward_kwargs(model)
    n, lc = len(batch), max(len(g.ctx) for g in batch)
    ids = torch.full((n, lc), pad_id, dtype=torch.long)
    mask = torch.zeros((n, lc), dtype=torch.long)
    for r, g in enumerate(batch):
        ids[r, lc - len(g.ctx):] = torch.tensor(g.ctx)
        mask[r, lc - len(g.ctx):] = 1
    ids, mask = ids.to(device), mask.to(device)
    pos = (mask.cumsum(1) - 1).clamp_min(0)
    out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, **last_only)
    first_logp = torch.log_softmax(out.logits[:, -1].float(), -1)   # predicts each continuation's first token
    rows = [(r, m) for r, g in enumerate(batch) for m in range(len(g.conts))]
    conts = [batch[r].conts[m] for r, m in rows]
    source = torch.tensor([r for r, _ in rows], device=device)
    firsts = first_logp[source, torch.tensor([c[0] for c in conts], device=device)].double()
    rest = torch.zeros(len(rows), dtype=torch.float64)
    lk = max(len(c) for c in conts) - 1
    if lk > 0:  # the continuation's other tokens, after the repeated context
        cache = returned_cache(out)
        cache.batch_select_indices(source)
        cids = torch.full((len(rows), lk), pad_id, dtype=torch.long)
        cmask = torch.zeros((len(rows), lk), dtype=torch.long)
        for i, c in enumerate(conts):
            cids[i, :len(c) - 1] = torch.tensor(c[:-1])
            cmask[i, :len(c) - 1] = 1
        cids, cmask = cids.to(device), cmask.to(device)
        cpos = mask.sum(1)[source].unsqueeze(1) + torch.arange(lk, device=device)
        logits = model(input_ids=cids, attention_mask=torch.cat([mask[source], cmask], 1), position_ids=cpos,
                       use_cache=True, **{cache_kw: cache}).logits
        target = torch.zeros((len(rows), lk), dtype=torch.long)
        for i, c in enumerate(conts):
            target[i, :len(c) - 1] = torch.tensor(c[1:])
        logp = torch.log_softmax(logits.float(), -1).gather(-1, target.to(device).unsqueeze(-1)).squeeze(-1)
        rest = (logp.double() * cmask).sum(1).cpu()
    totals = (firsts.cpu() + rest).tolist()
    return [((batch[r].members[m]), Scored(totals[i], len(conts[i]))) for i, (r, m) in enumerate(rows)]


def _score_alone(model: nn.Module, ctx: list[int], cont: list[int], window: int) -> Scored:
    """One pair in one pass, truncated from the left to the window (lm-eval's way)."""
    device = next(model.parameters()).device
    whole = (ctx + cont)[-(window + 1):]
    scored = min(len(cont), len(whole) - 1)
    ids = torch.tensor(whole[:-1], device=device).unsqueeze(0)
    logits = model(input_ids=ids).logits[0, -scored:].float()
    target = torch.tensor(whole[-scored:], device=device)
    logp = torch.log_softmax(logits, -1).gather(-1, target.unsqueeze(-1)).squeeze(-1)
    return Scored(float(logp.double().sum()), scored)
