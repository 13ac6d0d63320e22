"""Examples → tensors: training batches (loss on answer tokens only) and seeded samplers."""

from __future__ import annotations

import inspect
import random
from collections.abc import Iterator, Sequence

import torch

from ..tasks import Example
from .text import Codec

IGNORE = -100


class EncodedSet:
    """A task's examples tokenised once, as the codec frames them (`Codec.prompt_ids`,
    `Codec.answer_ids`: bos and eos, or a chat model's user and assistant turns); with
    `text`, each answer is plain prose for language modelling (no prompt but the tokenizer's
    own text prefix, no end token)."""

    def __init__(self, examples: Sequence[Example], codec: Codec, max_len: int | None = None,
                 text: bool = False) -> None:
        self.examples = list(examples)
        if text:  # plain prose (a text task): no framing, every token of the answer scored, after
            # what the tokenizer starts a text with (Gemma's bos), as perplexity reads prose
            self.prompts = [list(codec.text_prefix) for _ in self.examples]
            self.answers = [codec.encode(e.answer) for e in self.examples]
        else:
            self.prompts = [codec.prompt_ids(e.prompt) for e in self.examples]
            self.answers = [codec.answer_ids(e.answer) for e in self.examples]
        self.pad_id = codec.pad_id
        if max_len is not None:  # keep the answer, cut the prompt from the left
            for i, (p, a) in enumerate(zip(self.prompts, self.answers)):
                if len(p) + len(a) > max_len:
                    self.prompts[i] = p[-(max_len - len(a)):] if len(a) < max_len else p[:1]
                    self.answers[i] = a[:max_len - len(self.prompts[i])]

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict[str, list[int]]:
        """Example i's ids, so the set serves a DataLoader or a Trainer as a dataset
        (`collate` pads a list of rows into a batch)."""
        return {"prompt": self.prompts[i], "answer": self.answers[i]}

    def collate(self, rows: Sequence[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        return right_padded([r["prompt"] for r in rows], [r["answer"] for r in rows], self.pad_id)

    def batch(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        return self.collate([self[i] for i in indices])


def right_padded(prompts: Sequence[list[int]], answers: Sequence[list[int]],
                 pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids``, ``attention_mask`` and ``labels`` (prompt and padding
    ignored), the layout a Hugging Face causal LM takes for its loss."""
    seqs = [p + a for p, a in zip(prompts, answers)]
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    labels = torch.full((len(seqs), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for r, (s, p) in enumerate(zip(seqs, prompts)):
        ids[r, :len(s)] = torch.tensor(s)
        labels[r, len(p):len(s)] = torch.tensor(s[len(p):])
        mask[r, :len(s)] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def sample_batches(sets: Sequence[EncodedSet], batch_size: int, steps: int, seed: int,
                   weights: Sequence[float] | None = None) -> Iterator[dict[str, torch.Tensor]]:
    """`steps` batches. One set: shuffled epochs. Several sets: each row drawn from set k
    with probability weights[k] (default: by size), then an example uniformly in it."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not sets or any(len(s) == 0 for s in sets):
        raise ValueError("cannot sample training batches from an empty set of examples")
    rng = random.Random(seed)
    if len(sets) == 1:
        order: list[int] = []
        for _ in range(steps):
            if len(order) < batch_size:
                fresh = list(range(len(sets[0])))
                rng.shuffle(fresh)
                order += fresh
            take, order = order[:batch_size], order[batch_size:]
            yield sets[0].batch(take)
        return
    w = list(weights) if weights is not None else [len(s) for s in sets]
    for _ in range(steps):
        picks = rng.choices(range(len(sets)), weights=w, k=batch_size)
        rows = [(k, rng.randrange(len(sets[k]))) for k in picks]
        yield right_padded([sets[k].prompts[i] for k, i in rows],
                           [sets[k].answers[i] for k, i in rows], sets[0].pad_id)


# Bytes a scoring batch may hold in logits or KV cache: a real model's vocabulary (49152
# for SmolLM2) makes a full batch of logits gigabytes, more than the training step's peak.
SCORING_BYTES = 256 * 2**20


def rows_within(budget_bytes: int, bytes_per_row: int, most: int) -> int:
    """How many rows of `bytes_per_row` fit in `budget_bytes` (at least 1, at most `most`)."""
    return max(1, min(most, budget_bytes // max(1, bytes_per_row)))


def kv_bytes_per_token(model) -> int:
    """Bytes of KV cache one token takes (from a transformers config; 0 when unknown)."""
    cfg = getattr(model, "config", None)
    try:
        heads = cfg.num_attention_heads
        dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
        kv = getattr(cfg, "num_key_value_heads", None) or heads
        size = next(model.parameters()).element_size()
        return 2 * cfg.num_hidden_layers * kv * dim * size
    except (AttributeError, TypeError, ZeroDivisionError):
        return 0


# Full logits past this many bytes (fp32) are worth cutting to the positions that predict a
# label: a real model's vocabulary (262,144 for Gemma 3) makes a batch's logits gigabytes.
FULL_LOGITS_BYTES = 32 * 2**20


def takes_logits_to_keep(model) -> bool:
    """Whether `model` (or the model a peft wrapper holds) keeps chosen positions' logits."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "logits_to_keep" in inspect.signature(inner.forward).parameters


def label_logits(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The logits that predict each label of `batch` (which has ``labels``, IGNORE where
    nothing is scored) and those labels, shifted to line up: logits[:, i] predicts
    labels[:, i]. Only the positions from the first that predicts a label are made when the
    full logits would pass `FULL_LOGITS_BYTES` (the model's own numbers for them)."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    labels = batch["labels"][:, 1:]
    first = _first_label(model, labels)
    if first is not None:
        logits = model(**inputs, logits_to_keep=labels.shape[1] + 1 - first).logits[:, :-1]
        return logits, labels[:, first:]
    return model(**inputs).logits[:, :-1], labels


def _first_label(model, labels: torch.Tensor) -> int | None:
    """The first position whose logits predict a label (of the shifted `labels`) where
    cutting the logits there pays (past `FULL_LOGITS_BYTES`, a model that keeps chosen
    positions' logits); None: make them all."""
    vocab = getattr(getattr(model, "config", None), "vocab_size", None) or 1
    if labels.shape[0] * (labels.shape[1] + 1) * vocab * 4 <= FULL_LOGITS_BYTES or not takes_logits_to_keep(model):
        return None
    active = (labels != IGNORE).any(0).nonzero()
    return int(active[0]) if active.numel() else labels.shape[1] - 1


def labelled_logits(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The logits of the positions that predict a label, one row per labelled token
    (N × vocab), and those N labels: what a loss over the labels needs and no more. Where
    `label_logits` cuts the logits (a large vocabulary), the output head runs on the
    labelled positions' hidden states only (gathered on its way in): short answers after
    prompts of different lengths leave most of the positions from the first label on
    unlabelled (SciQ, Jeopardy: 4–5 % of a batch's tokens are labels, 23–29 % of them from
    the first label on), and the head is a 49152 × 576 product on SmolLM2, 262144 × 640 on
    Gemma 3. Elsewhere: `label_logits`' rows, flattened (IGNORE among the labels)."""
    head = _output_head(model)
    labels = batch["labels"][:, 1:]
    first = _first_label(model, labels) if head is not None else None
    if first is None:
        logits, labels = label_logits(model, batch)
        return logits.reshape(-1, logits.shape[-1]), labels.reshape(-1)
    keep = (labels != IGNORE)[:, first:]

    def gather(module, args):  # the head's input: positions first … width−1; the last predicts nothing
        return (args[0][:, :-1][keep], *args[1:])

    handle = head.register_forward_pre_hook(gather)
    try:
        logits = model(**{k: v for k, v in batch.items() if k != "labels"},
                       logits_to_keep=labels.shape[1] + 1 - first).logits
    finally:
        handle.remove()
    if logits.dim() == 3:  # the model did not call its head as a module: cut its logits here
        logits = logits[:, :-1][keep]
    return logits, labels[:, first:][keep]


def _output_head(model):
    """The module that turns hidden states into logits (a peft wrapper's model's), or None."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    get = getattr(inner, "get_output_embeddings", None)
    head = get() if callable(get) else None
    return head if isinstance(head, torch.nn.Module) else None


def forward_kwargs(model) -> tuple[str, dict]:
    """How `model.forward` takes a KV cache (transformers 5 calls it `cache`, 4.x
    `past_key_values`) and the keywords that keep only the last position's logits."""
    params = inspect.signature(model.forward).parameters
    cache_kw = "cache" if "cache" in params else "past_key_values"
    return cache_kw, ({"logits_to_keep": 1} if "logits_to_keep" in params else {})


def returned_cache(out):
    """The KV cache a forward pass returned, whatever its name."""
    return out.get("cache", None) or out.get("past_key_values", None)


@torch.no_grad()
def greedy_decode(model, enc: EncodedSet, batch_size: int = 256, max_new_tokens: int | None = None,
                  eos_id: int | None = None, on_batch=None) -> list[list[int]]:
    """Greedy continuation of every prompt (left-padded batches, KV cache), stopping at eos
    or `max_new_tokens` (default: the longest reference answer + 1). Batches hold at most
    `batch_size` prompts and `SCORING_BYTES` of KV cache; the prompt pass keeps the last
    position's logits only. A row that reached eos leaves the batch (its cache rows too,
    where the cache can drop rows): a probe's few long answers no longer carry every short
    one to the last step. `on_batch(n)`: called with each batch's number of prompts."""
    if max_new_tokens is None:
        max_new_tokens = max(len(a) for a in enc.answers) + 1
    device = next(model.parameters()).device
    cache_kw, last_only = forward_kwargs(model)
    longest = max(len(p) for p in enc.prompts) + max_new_tokens
    batch_size = rows_within(SCORING_BYTES, kv_bytes_per_token(model) * longest, batch_size)
    was_training = model.training
    model.eval()
    outs: list[list[int]] = []
    try:
        for b0 in range(0, len(enc), batch_size):
            prompts = enc.prompts[b0:b0 + batch_size]
            width = max(len(p) for p in prompts)
            ids = torch.full((len(prompts), width), enc.pad_id, dtype=torch.long)
            mask = torch.zeros((len(prompts), width), dtype=torch.long)
            for r, p in enumerate(prompts):
                ids[r, width - len(p):] = torch.tensor(p)
                mask[r, width - len(p):] = 1
            ids, mask = ids.to(device), mask.to(device)
            pos = (mask.cumsum(1) - 1).clamp_min(0)
            out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, **last_only)
            # gen[r, t]: row r's t-th token (-1 once it has left the batch); `rows`: those still in it
            gen = torch.full((len(prompts), max_new_tokens), -1, dtype=torch.long, device=device)
            rows = torch.arange(len(prompts), device=device)
            done = torch.zeros(len(prompts), dtype=torch.bool, device=device)
            for t in range(max_new_tokens):
                nxt = out.logits[:, -1].argmax(-1)
                gen[rows, t] = nxt
                cache = returned_cache(out)
                if eos_id is not None:
                    done[rows] |= nxt == eos_id
                    if bool(done.all()):
                        break
                    going = ~done[rows]
                    if not bool(going.all()) and hasattr(cache, "batch_select_indices"):
                        keep = going.nonzero().reshape(-1)
                        cache.batch_select_indices(keep)
                        rows, nxt, mask, pos = rows[keep], nxt[keep], mask[keep], pos[keep]
                if t + 1 == max_new_tokens:
                    break
                mask = torch.cat([mask, mask.new_ones(len(rows), 1)], 1)
                pos = pos[:, -1:] + 1
                out = model(input_ids=nxt[:, None], attention_mask=mask, position_ids=pos,
                            use_cache=True, **{cache_kw: cache})
            for row in gen.tolist():
                row = row[:row.index(-1)] if -1 in row else row
                if eos_id is not None and eos_id in row:
                    row = row[:row.index(eos_id)]
                outs.append(row)
            if on_batch is not None:
                on_batch(len(prompts))
    finally:
        model.train(was_training)
    return outs
