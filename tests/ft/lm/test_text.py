"""trace_ft.lm.text: the character tokenizer round-trips text and survives save/load."""

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
