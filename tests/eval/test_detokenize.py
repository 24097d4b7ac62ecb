"""Streaming detokenization never splits a multi-byte character."""

from glmtg.eval.detokenize import IncrementalDecoder
from glmtg.loading.byte_tokenizer import ByteTokenizer


def test_incremental_decoder_never_splits_a_character():
    tok = ByteTokenizer(1000)
    dec = IncrementalDecoder(tok.decode)
    pieces = [dec.push(t) for t in tok.encode("aé€b")]  # 1 + 2 + 3 + 1 bytes
    assert pieces == ["a", "", "é", "", "", "€", "b"]
    assert dec.flush() == ""
    dec.push(0xE2)  # an unfinished character comes out at the end as U+FFFD
    assert dec.flush() == "\ufffd"


def test_pieces_join_to_the_whole_text():
    tok = ByteTokenizer(1000)
    text = "Grüße, 世界! \U0001F600 ok"
    dec = IncrementalDecoder(tok.decode)
    assert "".join(dec.push(t) for t in tok.encode(text)) + dec.flush() == text
