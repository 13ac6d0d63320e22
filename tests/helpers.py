"""Builders of random masked-AdamW problems and bitwise comparisons for the tests."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import torch

from trace_kernels.masks import index_dtype


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bits of a float tensor, so NaNs compare equal to themselves."""
    view = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}
    return t.detach().contiguous().view(view[t.dtype]) if t.dtype in view else t


def same_report_rows(a: list[dict], b: list[dict]) -> bool:
    """Equal selection report rows, exactly, with NaN (an empty tensor's mean) equal to NaN."""
    def key(row):
        return {k: "nan" if isinstance(v, float) and math.isnan(v) else v for k, v in row.items()}
    return [key(r) for r in a] == [key(r) for r in b]


def assert_bits_equal(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    if not torch.equal(bits(a), bits(b)):
        diff = (a.float() - b.float()).abs()
        rel = (diff / b.float().abs().clamp_min(1e-30)).nan_to_num(0).max().item()
        n = int((bits(a) != bits(b)).sum())
        raise AssertionError(f"{what}: {n} elements differ (max rel {rel:.3e})")


def random_selection(num_blocks: int, density: float, gen: torch.Generator) -> torch.Tensor:
    """Sorted unique block indices, about `density` of `num_blocks` (0 and 1 exact)."""
    if density >= 1.0:
        idx = torch.arange(num_blocks)
    elif density <= 0.0:
        idx = torch.arange(0)
    else:
        idx = torch.nonzero(torch.rand(num_blocks, generator=gen) < density).reshape(-1)
    return idx.to(index_dtype(num_blocks))


def make_problem(shapes, block_sizes, density, dtype, gen, *, amsgrad=False, nan_frozen=True):
    """Params, grads, compact state and indices for a masked AdamW call.

    Frozen elements of params hold NaN/inf sentinels and their grads NaN, so any touch of
    them shows up bitwise, and state starts from random values (not zeros) so moments of
    later steps are exercised from the first call.
    """
    prob = {k: [] for k in ("params", "grads", "m", "v", "vmax", "idx", "sizes", "steps")}
    for shape, b in zip(shapes, block_sizes):
        numel = math.prod(shape)
        b = numel if b == "tensor" else (shape[-1] if b == "row" else b)
        b = max(b, 1)
        idx = random_selection(numel // b, density, gen)
        p = torch.randn(shape, generator=gen).to(dtype)
        g = torch.randn(shape, generator=gen).to(dtype)
        sel = torch.zeros(numel, dtype=torch.bool)
        if idx.numel():
            sel.view(-1, b)[idx.long()] = True
        if nan_frozen and numel:
            frozen = ~sel.view(shape)
            sentinel = torch.tensor([float("nan"), float("inf"), -0.0, 1e-3]).to(dtype)
            p[frozen] = sentinel[torch.randint(0, 4, (int(frozen.sum()),), generator=gen)]
            g[frozen] = float("nan")
        k = idx.numel() * b
        prob["params"].append(p)
        prob["grads"].append(g)
        prob["m"].append(torch.randn(k, generator=gen) * 0.1)
        prob["v"].append(torch.rand(k, generator=gen) * 0.01)
        prob["vmax"].append(prob["v"][-1] + torch.rand(k, generator=gen) * 0.01)
        prob["idx"].append(idx)
        prob["sizes"].append(b)
        prob["steps"].append(torch.tensor(float(torch.randint(0, 5, (1,), generator=gen))))
    if not amsgrad:
        prob["vmax"] = []
    return prob


def clone_problem(prob):
    return {k: [t.clone() if isinstance(t, torch.Tensor) else t for t in v] for k, v in prob.items()}


def block_sizes_for(shapes, granularity) -> list[int]:
    """Block size per shape for a granularity (1, an int, "row", "tensor"); 1 where an int
    does not divide the tensor."""
    sizes = []
    for s in shapes:
        n = math.prod(s)
        b = {"row": s[-1], "tensor": max(n, 1)}.get(granularity, granularity)
        sizes.append(b if n % b == 0 else 1)
    return sizes


def train_side_by_side(pairs, x: torch.Tensor, steps: int) -> None:
    """`steps` steps of each (model, optimizer) pair on the same input and loss."""
    for _ in range(steps):
        for model, opt in pairs:
            opt.zero_grad()
            model(x).square().mean().backward()
            opt.step()


FISHER_SHAPES = [(37, 129), (1001,), (0, 16), (5, 17), (1,)]


def fisher_problem(gen, dtype, amsgrad=False):
    """Dense params, grads and state (m, v, vmax, Fisher 'f', steps) for adamw_fisher_."""
    prob = {"params": [], "grads": [], "m": [], "v": [], "vmax": [], "f": [], "steps": []}
    for s in FISHER_SHAPES:
        n = math.prod(s)
        prob["params"].append(torch.randn(s, generator=gen).to(dtype))
        prob["grads"].append(torch.randn(s, generator=gen).to(dtype))
        prob["m"].append(torch.randn(n, generator=gen) * 0.1)
        prob["v"].append(torch.rand(n, generator=gen) * 0.01)
        prob["vmax"].append(prob["v"][-1] + 0.001)
        prob["f"].append(torch.rand(n, generator=gen))
        prob["steps"].append(torch.tensor(2.0))
    if not amsgrad:
        prob["vmax"] = []
    return prob


def stats_problem(gen, shapes, num_refs, dtype=torch.float32, ref_dtype=torch.float32):
    """post, pre, Fisher and R reference updates per shape, for delta_stats."""
    post = [torch.randn(s, generator=gen).to(dtype) for s in shapes]
    pre = [(p.float() + 0.01 * torch.randn(p.shape, generator=gen)).to(dtype) for p in post]
    fishers = [torch.rand(p.numel(), generator=gen) for p in post]
    refs = [[torch.randn(p.shape, generator=gen).to(ref_dtype) for _ in range(num_refs)] for p in post]
    return post, pre, fishers, refs


def assert_stats_close(a, b, exact):
    for name, x, y in zip(("sum_sq", "fisher_sum", "dots", "ref_sq"), a[:4], b[:4]):
        assert x.shape == y.shape, name
        if exact:  # same values; the sign of a zero sum carries no meaning
            assert torch.equal(x, y), f"{name}: {int((x != y).sum())} elements differ"
        else:  # fp64 sums in another order, rounded once to fp32
            torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-30, msg=name)


def torchrun(args, *, timeout: int, env: dict | None = None, check: bool = True,
             ranks: int = 2) -> subprocess.CompletedProcess:
    """`args` (a script or ``-m module``, and its arguments) on `ranks` gloo ranks under
    torchrun, one thread each, on free ports. `timeout` ends a launch whose ranks hang;
    with `check`, a failure on any rank fails the test with its output."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(ranks),
           "--master-port", "0", "--rdzv-backend", "c10d", "--rdzv-endpoint", "localhost:0",
           *map(str, args)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                         env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
    if check:
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-6000:]
    return out


# ---- a tiny GGUF model (a pretrained model's stand-in) ----------------------------------

TEMPLATE = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] "
            "+ '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
            "{% endif %}")
SPECIALS = ["<unk>", "<|im_start|>", "<|im_end|>"]


def _byte_tokens() -> list[str]:
    """GPT-2's byte-to-unicode alphabet: every byte a token, so any text encodes."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    chars, n = list(keep), 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + n)
            n += 1
    return [chr(c) for c in chars]


def write_tiny_gguf(path, seed: int = 0, hidden: int = 16, layers: int = 2):
    """A 2-layer Llama in F32 with a byte-level BPE tokenizer and a chat template, written
    with the `gguf` package's writer: a real-model stand-in that needs no network."""
    import gguf
    import numpy as np

    rng = np.random.default_rng(seed)
    tokens = SPECIALS + _byte_tokens() + ["he", "ll", "hell", "hello"]
    merges = ["h e", "l l", "he ll", "hell o"]
    vocab, inter, heads = len(tokens), 2 * hidden, 2
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny test llama")
    w.add_block_count(layers)
    w.add_context_length(64)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(inter)
    w.add_head_count(heads)
    w.add_head_count_kv(heads)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(hidden // heads)
    w.add_vocab_size(vocab)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([3, 3, 3] + [1] * (vocab - 3))
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(2)
    w.add_unk_token_id(0)
    w.add_add_bos_token(False)
    w.add_chat_template(TEMPLATE)

    def t(*shape):
        return (rng.standard_normal(shape) * 0.05).astype(np.float32)

    w.add_tensor("token_embd.weight", t(vocab, hidden))
    w.add_tensor("output_norm.weight", np.ones(hidden, np.float32))
    for i in range(layers):
        for name, shape in (("attn_q", (hidden, hidden)), ("attn_k", (hidden, hidden)),
                            ("attn_v", (hidden, hidden)), ("attn_output", (hidden, hidden)),
                            ("ffn_gate", (inter, hidden)), ("ffn_up", (inter, hidden)),
                            ("ffn_down", (hidden, inter))):
            w.add_tensor(f"blk.{i}.{name}.weight", t(*shape))
        w.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(hidden, np.float32))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(hidden, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
