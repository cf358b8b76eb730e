"""Text out of tokens: stop strings split across tokens, held-back text, partial UTF-8."""

from jaxlm.data import ByteTokenizer
from jaxlm.serve.protocol import TextStream

TOK = ByteTokenizer()


def _feed(text_ids, stop, stop_ids=()):
    stream = TextStream(TOK.decode, stop, stop_ids)
    pieces = []
    for t in text_ids:
        pieces.append(stream.add(t))
        if stream.stopped:
            break
    pieces.append(stream.flush())
    return pieces, stream


def _naive(text, stops):
    """The reference: the text up to the earliest stop string."""
    cut = min([text.find(s) for s in stops if s in text] or [len(text)])
    return text[:cut], cut < len(text)


def test_stop_strings_across_token_boundaries_match_a_naive_cut():
    text = "hello world, the end. ENDING"
    for stops in (["world"], ["end.", "o w"], ["ENDING"], ["xyz"], ["d", "the"]):
        pieces, stream = _feed(TOK.encode(text), stops)
        want, stopped = _naive(text, stops)
        assert "".join(pieces) == want and stream.stopped == stopped, stops
        # Nothing that later turned out to be a stop string was ever sent early.
        sent = ""
        for p in pieces:
            sent += p
            assert want.startswith(sent)


def test_text_that_may_become_a_stop_string_is_held_back():
    stream = TextStream(TOK.decode, ["STOP"], ())
    assert [stream.add(t) for t in TOK.encode("aST")] == ["a", "", ""]
    assert stream.add(TOK.encode("x")[0]) == "STx"  # it did not become one
    assert stream.flush() == ""


def test_partial_utf8_waits_for_the_whole_character_and_stop_ids_are_not_text():
    ids = TOK.encode("é€!")  # 2 + 3 + 1 bytes
    stream = TextStream(TOK.decode, (), [TOK.eos_id])
    assert [stream.add(t) for t in ids] == ["", "é", "", "", "€", "!"]
    assert stream.add(TOK.eos_id) == "" and stream.tokens == 7
    assert stream.flush() == "" and stream.text == "é€!"
    # A byte sequence that never completes is sent as U+FFFD at the end.
    broken = TextStream(TOK.decode, (), ())
    assert broken.add(TOK.encode("€")[0]) == "" and broken.flush() == "\ufffd"
