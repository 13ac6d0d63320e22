"""trace_ft.lm.text: the character tokenizer round-trips text and survives save/load; a Hugging
Face tokenizer's own text prefix (Gemma's bos) is found from its default encoding."""

import pytest

from trace_ft.lm.text import CHAR_TOKENIZER_FILE, CharTokenizer


def test_round_trip_and_specials():
    tok = CharTokenizer()
    text = "rev:abc=cba 0123 ~!"
    ids = tok.encode(text)
    assert len(ids) == len(text) and min(ids) >= len(tok.SPECIALS)
    assert tok.decode(ids) == text
    # specials and unknown characters are dropped from decoded text
    assert tok.decode([tok.bos_id, *ids, tok.eos_id, tok.pad_id]) == text
    assert tok.encode("é") == [tok.unk_id] and tok.decode(tok.encode("é")) == ""
    assert tok.vocab_size == 4 + 95


def test_save_load_and_bad_files(tmp_path):
    tok = CharTokenizer("abc")
    tok.save(tmp_path)
    back = CharTokenizer.load(tmp_path)
    assert back.chars == "abc" and back.encode("cab") == tok.encode("cab")
    (tmp_path / CHAR_TOKENIZER_FILE).write_text("{not json")
    with pytest.raises(ValueError, match="not a valid character tokenizer"):
        CharTokenizer.load(tmp_path)
    with pytest.raises(ValueError, match="distinct"):
        CharTokenizer("aa")


def _word_tokenizer(bos_first: bool):
    """A tiny Hugging Face tokenizer; `bos_first`: it starts every text with <bos>, as
    Gemma's does (SmolLM2's does not)."""
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, "a": 4, "b": 5}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if bos_first:
        tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>",
                                                pad_token="<pad>", unk_token="<unk>")


def test_text_prefix_follows_the_tokenizers_own_default():
    from trace_ft.lm.text import HFCodec

    assert HFCodec(_word_tokenizer(True), chat=False).text_prefix == [2]
    assert HFCodec(_word_tokenizer(False), chat=False).text_prefix == []
    assert HFCodec(_word_tokenizer(True), chat=False).encode("a b") == [4, 5]  # texts themselves stay bare
    assert CharTokenizer().text_prefix == []
