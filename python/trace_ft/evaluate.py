"""Scoring tasks, three ways per task:

- ``exact``: greedy decoding scored by the task's scorer (exact match, or the label for
  classification), percent;
- ``edit``: partial credit for the same decoded answers, the normalised edit similarity
  100·(1 − Levenshtein(prediction, answer) / max(len)) averaged over examples (how the
  TRACE benchmark scores code): a half-right answer counts half;
- ``loglik``: the teacher-forced mean log-likelihood of the answer tokens (and the end
  token) given the prompt, in nats per token, averaged over examples: what the model still
  knows of an answer it no longer produces greedily.

What `run` fills its accuracy matrices with (one per metric) and `adapt` scores a task and
its history with. `TextPerplexity` measures a model's perplexity on fixed prose, the
general-ability measure beside the knowledge probe (`tasks.general`).
"""

from __future__ import annotations

import torch
from torch import nn

from .lm.batches import IGNORE, SCORING_BYTES, EncodedSet, greedy_decode, label_logits, rows_within
from .lm.text import Codec
from .store.scores import digest
from .tasks import Task
from .tasks.general import general_text, text_digest

METRICS = ("exact", "edit", "loglik")


def edit_similarity(prediction: str, answer: str) -> float:
    """1 − Levenshtein distance / the longer length (1.0 for two empty strings), after strip."""
    a, b = prediction.strip(), answer.strip()
    if not a and not b:
        return 1.0
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return 1.0 - prev[-1] / max(len(a), len(b))


@torch.no_grad()
def answer_loglik(model: nn.Module, enc: EncodedSet, batch_size: int = 256, on_batch=None) -> float:
    """Mean over examples of the mean log-probability (nats) of each answer token given
    everything before it (teacher forcing). Batches hold at most `SCORING_BYTES` of logits;
    `on_batch(n)`: called with each batch's number of examples."""
    device = next(model.parameters()).device
    vocab = getattr(getattr(model, "config", None), "vocab_size", None) or 1
    width = max(len(p) + len(a) for p, a in zip(enc.prompts, enc.answers))
    batch_size = rows_within(SCORING_BYTES, 8 * width * vocab, batch_size)  # fp32 logits and log-probs
    was_training = model.training
    model.eval()
    per_example: list[torch.Tensor] = []
    try:
        for b0 in range(0, len(enc), batch_size):
            batch = {k: v.to(device) for k, v in enc.batch(range(b0, min(b0 + batch_size, len(enc)))).items()}
            ids = batch["input_ids"]
            logits, labels = label_logits(model, batch)
            logp = torch.log_softmax(logits.float(), -1)
            mask = labels != IGNORE
            token = logp.gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)
            per_example.append((token * mask).sum(1).double() / mask.sum(1).clamp_min(1))
            if on_batch is not None:
                on_batch(ids.shape[0])
    finally:
        model.train(was_training)
    return float(torch.cat(per_example).mean())


class Evaluator:
    """Scores of a fixed list of tasks' test sets (encoded once), for every metric."""

    def __init__(self, tasks: list[Task], codec: Codec, progress: bool = False) -> None:
        self.tasks, self.codec, self.progress = tasks, codec, progress
        self.sets = [EncodedSet(t.test, codec) for t in tasks]

    def __call__(self, model: nn.Module) -> dict[str, list[float]]:
        """{metric: [score of each task]}; ``exact`` is the task's own scorer."""
        out: dict[str, list[float]] = {m: [] for m in METRICS}
        for k in range(len(self.tasks)):
            for m, v in self.task_scores(model, k).items():
                out[m].append(v)
        return out

    def signature(self, k: int) -> dict:
        """What task `k`'s scores depend on besides the model (`store.scores.ScoreCache`)."""
        task, enc = self.tasks[k], self.sets[k]
        return {"kind": "task", "name": task.name, "scorer": task.scorer, "metrics": list(METRICS),
                "max_new_tokens": task.meta.get("max_new_tokens"), "encoded": digest([enc.prompts, enc.answers]),
                "gold": digest([[e.answer, *e.alternatives] for e in task.test])}

    def task_scores(self, model: nn.Module, k: int) -> dict[str, float]:
        """Every metric's score of task `k` alone."""
        from tqdm.auto import tqdm

        task, enc = self.tasks[k], self.sets[k]
        with tqdm(total=2 * len(enc), desc=f"scoring {task.name}", disable=not self.progress, leave=False,
                  dynamic_ncols=True) as bar:
            ids = greedy_decode(model, enc, eos_id=self.codec.eos_id, max_new_tokens=task.meta.get("max_new_tokens"),
                                on_batch=bar.update)
            predictions = [self.codec.answer_text(x) for x in ids]
            edit = sum(edit_similarity(p, e.answer) for p, e in zip(predictions, task.test))
            loglik = answer_loglik(model, enc, on_batch=bar.update)
        return {"exact": task.score(predictions), "edit": 100.0 * edit / len(task.test), "loglik": loglik}


class TextPerplexity:
    """Perplexity of a model on a fixed text: the text tokenised once (no chat framing) and
    cut into back-to-back windows of `window` tokens; every token but each window's first
    is predicted from the tokens before it in its window. Where the tokenizer starts a text
    with its own prefix (`Codec.text_prefix`: Gemma's bos), each window starts with it and
    holds that many text tokens fewer, every one predicted. exp(mean NLL over tokens)."""

    def __init__(self, text: str, codec: Codec, window: int = 256, batch_size: int = 8,
                 name: str = "text", progress: bool = False) -> None:
        """`batch_size`: windows per forward pass, at most; fewer where their logits would
        pass `SCORING_BYTES`."""
        self.name, self.progress = name, progress
        ids, prefix = codec.encode(text), codec.text_prefix
        width = window - len(prefix)  # text tokens a window holds
        if len(ids) < 2 * width:
            raise ValueError(f"the text has {len(ids)} tokens, fewer than two windows of {window}")
        n = len(ids) // width
        text = torch.tensor(ids[:n * width], dtype=torch.long).view(n, width)
        self.windows = torch.cat([torch.tensor(prefix, dtype=torch.long).expand(n, len(prefix)), text], dim=1)
        self.batch_size = batch_size

    def signature(self) -> dict:
        """What the perplexity depends on besides the model (`store.scores.ScoreCache`)."""
        return {"kind": "perplexity", "name": self.name, "windows": digest(self.windows.tolist())}

    @property
    def tokens(self) -> int:
        """Tokens predicted (the count the mean is over)."""
        return self.windows.shape[0] * (self.windows.shape[1] - 1)

    @torch.no_grad()
    def __call__(self, model: nn.Module) -> float:
        from tqdm.auto import tqdm

        device = next(model.parameters()).device
        was_training = model.training
        model.eval()
        nll = torch.zeros((), dtype=torch.float64)
        vocab = getattr(getattr(model, "config", None), "vocab_size", None) or 1
        rows = rows_within(SCORING_BYTES, 8 * self.windows.shape[1] * vocab, self.batch_size)
        bar = tqdm(total=len(self.windows), desc="perplexity", disable=not self.progress, leave=False,
                   dynamic_ncols=True)
        try:
            for b0 in range(0, len(self.windows), rows):
                ids = self.windows[b0:b0 + rows].to(device)
                logits = model(input_ids=ids).logits[:, :-1].float()
                nll += torch.nn.functional.cross_entropy(
                    logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum").double().cpu()
                bar.update(ids.shape[0])
        finally:
            bar.close()
            model.train(was_training)
        return float(torch.exp(nll / self.tokens))


def general_perplexity(codec: Codec, model: nn.Module, window: int = 256, progress: bool = False) -> TextPerplexity:
    """Perplexity on the fixed general prose (`tasks.general.general_text("eval")`), in
    windows of `window` tokens (at most the model's context)."""
    text = general_text("eval")
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None) or window
    return TextPerplexity(text, codec, window=min(window, limit), name=f"pydoc_data:{text_digest(text)}",
                          progress=progress)
