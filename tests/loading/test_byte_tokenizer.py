"""The byte tokenizer of random-weight presets."""

import pytest

from glmtg.config import ModelConfig
from glmtg.loading.byte_tokenizer import ByteTokenizer
from glmtg.loading.presets import preset_tokenizer


def test_one_token_per_utf8_byte_and_back():
    tok = ByteTokenizer(1000, (2,))
    text = "aé€\U0001F600 z"
    ids = tok.encode(text)
    assert ids == list(text.encode("utf-8")) and tok.decode(ids) == text
    assert tok.eos_token_ids == (2,)


def test_small_vocabulary_wraps_and_bad_bytes_show_as_replacement():
    tok = ByteTokenizer(100)
    assert tok.encode("é") == [0xC3 % 100, 0xA9 % 100]
    assert tok.decode([0xE2]) == "\ufffd"  # an unfinished character
    assert tok.decode([256 + 65]) == "A"  # ids beyond a byte map back to one


def test_chat_layout():
    tok = ByteTokenizer(1000)
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}])
    assert text == "<|user|>\nhi<|assistant|>\n"


@pytest.mark.parametrize("vocab", [0, -3, True, 2.5])
def test_vocabulary_must_be_a_positive_int(vocab):
    with pytest.raises(ValueError, match="vocab_size"):
        ByteTokenizer(vocab)


def test_preset_tokenizer_is_the_byte_tokenizer_of_the_presets_vocabulary():
    config = ModelConfig.preset("tiny")  # vocabulary 1000: bytes map to themselves
    tok = preset_tokenizer(config)
    assert isinstance(tok, ByteTokenizer) and tok.vocab_size == config.vocab_size
    assert tok.eos_token_ids == config.eos_token_ids and tok.encode("Zé") == [0x5A, 0xC3, 0xA9]
