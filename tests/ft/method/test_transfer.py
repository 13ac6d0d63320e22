"""Small-to-large: a core found on the tiny built-in model mapped onto the medium one (2 → 6
layers, hidden 64 → 192), per layer and module type, then trained with `adapt --core`."""

import re

import pytest

pytest.importorskip("transformers")

import torch
from safetensors.torch import load_file

from trace_ft.cli import main
from trace_ft.lm.model import SIZES, builtin_config, model_shapes, save_model
from trace_ft.method.probe import DEFAULT_EXCLUDE
from trace_ft.lm.text import CharTokenizer
from trace_ft.method.transfer import split_layer, transfer_core
from trace_kernels import CoreMask


def eligible(shapes):
    return {n: s for n, s in shapes.items() if not any(re.search(p, n) for p in DEFAULT_EXCLUDE)}


@pytest.fixture(scope="module")
def sizes():
    return eligible(model_shapes("builtin", "tiny")), eligible(model_shapes("builtin", "medium"))


def random_core(shapes, gen, kind):
    if kind == "row":
        return CoreMask.from_blocks({n: (s, s[-1], torch.rand(s[0], generator=gen) < 0.2)
                                     for n, s in shapes.items()})
    return CoreMask.from_dense({n: torch.rand(s, generator=gen) < 0.07 for n, s in shapes.items()})


def test_split_layer():
    assert split_layer("model.layers.12.mlp.up_proj.weight") == ("model.layers.#.mlp.up_proj.weight", 12)
    assert split_layer("lm_head.weight") == ("lm_head.weight", None)


@pytest.mark.parametrize("kind", ["element", "row"])
def test_each_large_tensor_reads_its_rescaled_source(sizes, gen, kind):
    small, large = sizes
    core = random_core(small, gen, kind)
    mapped, report = transfer_core(core, large)
    assert set(mapped) == set(large)  # every layer and module of the large model
    assert len(report) == len(large)
    for n, shape in large.items():
        key, layer = split_layer(n)
        src = key.replace(".#.", f".{layer * 2 // 6}.")  # layer j of 6 reads layer ⌊2j/6⌋ of 2
        row = next(r for r in report if r["name"] == n)
        assert row["source"] == src
        s_dense = core.to_dense(src)
        fy, fx = shape[0] // s_dense.shape[0], shape[1] // s_dense.shape[1]  # integer ratios here
        want = s_dense.repeat_interleave(fy, 0).repeat_interleave(fx, 1)
        assert torch.equal(mapped.to_dense(n), want), n  # positions carried, density kept
        e = mapped[n]
        assert e.block_size == (shape[-1] if kind == "row" else 1)
        assert abs(row["density"] - row["source_density"]) < 1e-12


def test_random_positions_keep_only_the_budget(sizes, gen):
    small, large = sizes
    core = random_core(small, gen, "element")
    rescaled, _ = transfer_core(core, large)
    a, _ = transfer_core(core, large, positions="random", seed=3)
    b, _ = transfer_core(core, large, positions="random", seed=3)
    assert a == b and a != rescaled
    assert all(a[n].numel_selected == rescaled[n].numel_selected for n in large)
    with pytest.raises(ValueError, match="positions"):
        transfer_core(core, large, positions="nearest")


def test_budget_kept_for_uneven_shapes_and_whole_tensors():
    core = CoreMask.from_dense({"m.layers.0.w": torch.tensor([[1, 0, 0], [0, 0, 1], [1, 1, 0]], dtype=torch.bool),
                                "m.layers.1.w": torch.zeros(3, 3, dtype=torch.bool)})
    mapped, _ = transfer_core(core, {f"m.layers.{i}.w": (7, 5) for i in range(3)})
    for i, src in enumerate([0, 0, 1]):  # layer j of 3 reads ⌊2j/3⌋ of 2
        assert mapped[f"m.layers.{i}.w"].numel_selected == round(core[f"m.layers.{src}.w"].density * 35)
    whole = CoreMask.from_blocks({"m.layers.0.w": ((3, 3), 9, torch.tensor([True])),
                                  "m.layers.1.w": ((3, 3), 9, torch.tensor([False]))})
    mapped, _ = transfer_core(whole, {"m.layers.0.w": (6, 4), "m.layers.1.w": (6, 4)})
    assert mapped["m.layers.0.w"].density == 1.0 and mapped["m.layers.1.w"].density == 0.0
    with pytest.raises(ValueError, match="not the same model family"):
        transfer_core(core, {"other.weight": (3, 3)})
    with pytest.raises(ValueError, match="dimensions"):
        transfer_core(core, {"m.layers.0.w": (9,)})


@pytest.mark.slow
def test_transfer_command_then_adapt_the_large_model_on_that_core(builtin_cache, tmp_path):
    from transformers import LlamaForCausalLM

    common = ["--quiet", "--steps", "3", "--probe-steps", "3", "--n-train", "64", "--n-test", "8",
              "--batch-size", "8", "--threads", "1", "--cache-dir", str(builtin_cache)]
    assert main(["adapt", "--size", "tiny", "--task", "rev", "--history", str(tmp_path / "small-h"),
                 "--out", str(tmp_path / "small"), *common]) == 0
    core_file = tmp_path / "large-core.safetensors"
    assert main(["transfer", "--history", str(tmp_path / "small-h"), "--model", "builtin",
                 "--size", "medium", "--out", str(core_file)]) == 0
    core = CoreMask.load(core_file)
    assert set(core) == set(eligible(model_shapes("builtin", "medium")))
    assert 0.04 < core.density < 0.06  # the small core's 5 %

    tok = CharTokenizer()
    torch.manual_seed(0)
    large = tmp_path / "large"
    save_model(LlamaForCausalLM(builtin_config(SIZES["medium"], tok.vocab_size)), tok, large)
    assert main(["adapt", "--model", str(large), "--core", str(core_file), "--task", "rev",
                 "--history", str(tmp_path / "large-h"), "--out", str(tmp_path / "large-rev"), *common]) == 0
    before, after = load_file(str(large / "model.safetensors")), load_file(str(tmp_path / "large-rev" / "model.safetensors"))
    moved = 0
    for n, w in before.items():
        changed = after[n] != w
        inside = core.to_dense(n) if n in core else torch.zeros_like(changed)
        assert not (changed & ~inside).any(), n
        moved += int(changed.sum())
    assert moved > 0.5 * core.numel_selected
    assert main(["transfer", "--history", str(tmp_path / "small-h"), "--task", "nope", "--model",
                 "builtin", "--out", str(core_file)]) == 2
