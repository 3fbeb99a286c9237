"""TextStream: stop strings across token boundaries, and the text held back while one may be starting."""

from __future__ import annotations

from serve.stops import TextStream

# A toy "tokenizer": token i is the i-th piece; byte tokens 100/101 are the two halves of "é".
PIECES = {0: "Hel", 1: "lo", 2: " wor", 3: "ld", 4: "!", 5: " again", 6: "lo wo", 100: b"\xc3", 101: b"\xa9"}


def decode(ids: list[int]) -> str:
    raw = b"".join(p if isinstance(p, bytes) else p.encode() for p in (PIECES[i] for i in ids))
    return raw.decode("utf-8", errors="replace")


def run(ids: list[int], stop: list[str], include: bool = False, may_stop_from: int = 0) -> tuple[list[str], bool]:
    s = TextStream(decode, stop, include)
    out = []
    for i, t in enumerate(ids):
        out.append(s.push([t], finished=i == len(ids) - 1, may_stop=i + 1 >= may_stop_from))
        if s.stopped:
            break
    return out, s.stopped


def test_stop_across_tokens_is_never_shown():
    out, stopped = run([0, 1, 2, 3, 4], ["lo wor"])
    assert stopped and "".join(out) == "Hel"
    # Only text that could start the stop is held back: "l" of "Hel", then "lo", then the stop is found.
    assert out == ["He", "l", ""]


def test_held_text_is_released_when_the_stop_does_not_come():
    out, stopped = run([0, 1, 5, 4], ["lo wor"])
    assert not stopped and out == ["He", "l", "lo again", "!"]


def test_include_stop_and_earliest_of_several():
    out, _ = run([0, 1, 2, 3, 4], ["world", "lo"], include=True)
    assert "".join(out) == "Hello"
    out, _ = run([0, 1, 2, 3, 4], ["d!", "wor"])
    assert "".join(out) == "Hello "


def test_stop_inside_one_token():
    out, stopped = run([0, 6, 3], ["o w"])
    assert stopped and "".join(out) == "Hell"


def test_min_tokens_lets_early_stops_pass():
    out, stopped = run([0, 1, 2, 3, 4, 5], ["l"], may_stop_from=3)
    # "l" appears in tokens 1-2 but may not stop there; the first "l" after that is in token 4 ("ld").
    assert stopped and "".join(out) == "Hello wor"


def test_partial_utf8_waits_for_its_second_byte():
    out, _ = run([0, 100, 101, 4], [])
    assert out == ["Hel", "", "é", "!"]


def test_prompt_context_keeps_the_first_tokens_leading_space():
    """SentencePiece decoders drop the space a text starts with: the output is decoded after the prompt's
    last tokens, so its first word keeps its space, as in the whole text."""
    def spm_decode(ids: list[int]) -> str:
        return "".join({0: "▁Hello", 1: "▁there"}[i] for i in ids).replace("▁", " ").removeprefix(" ")

    assert TextStream(spm_decode).push([1]) == "there"
    assert TextStream(spm_decode, context=[0]).push([1]) == " there"
    assert TextStream(spm_decode, [" there"], context=[0]).push([1], finished=True) == ""
