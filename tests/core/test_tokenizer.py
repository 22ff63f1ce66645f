"""Tokenizers on real text: GPT-2 ids against OpenAI's original vocabulary, round trips, descriptions."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import tokenizers
from conftest import shared_file
from tokenizers import decoders, models, pre_tokenizers

from gptkit.errors import GptkitError
from gptkit.tokenizer import (
    BPETokenizer,
    CharTokenizer,
    GPT2Tokenizer,
    Tokenizer,
    from_description,
    gpt2_tokenizer,
)

EOT = "<|endoftext|>"

# Hard cases for byte-level BPE: accents, many scripts, combining marks, emoji ZWJ sequences, skin tones,
# flags, invisible/odd whitespace, CRLF, tabs, long whitespace runs, contractions, numbers, control chars.
UNICODE_SAMPLE = (
    "Hello world! naïve café, résumé; Ünïcödé ÀÉÎÕÜ e\u0301 (combining)\n"
    "Καλημέρα κόσμε. Привет, мир! 你好，世界。日本語のテキストです。안녕하세요 세계\n"
    "שלום עולם \u200fمرحبا بالعالم\u200e नमस्ते दुनिया สวัสดีชาวโลก\r\n"
    "👍🏽 👨\u200d👩\u200d👧\u200d👦 🏳\ufe0f\u200d🌈 🇯🇵🇺🇸🇩🇪 ❤️ 🤖\tend\n"
    "nbsp:\u00a0|zwsp:\u200b|bom:\ufeff|\t\ttabs\t|" + " " * 40 + "|\n\n\n\n"
    "I'm you're they'll we've she'd it's don't I'M YOU'RE 'quoted'\r\n"
    "3.14159 1,000,000 2024-01-01 0x1F 12345678901234567890 ½ ² ①\n"
    "∑∫√∞ ≠ ≤ → «guillemets» „Anführung“ ‘single’ — dash … \x00\x1b[0m\x7f\n"
    "trailing spaces   \n   leading spaces\n\u3000ideographic space\u3000\n"
)


@pytest.fixture(scope="module")
def shakespeare_text() -> str:
    return shared_file("tinyshakespeare/input.txt").read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def gpt2() -> GPT2Tokenizer:
    return gpt2_tokenizer()


@pytest.fixture(scope="module")
def original_gpt2() -> tokenizers.Tokenizer:
    """GPT-2 from OpenAI's encoder.json + vocab.bpe, independent of our tiktoken ranks file."""
    vocab = json.loads(shared_file("tokenizer/encoder.json").read_text(encoding="utf-8"))
    lines = shared_file("tokenizer/vocab.bpe").read_text(encoding="utf-8").split("\n")
    assert lines[0].startswith("#version")
    merges = [tuple(line.split()) for line in lines[1:] if line]
    assert len(vocab) == 50257 and len(merges) == 50000
    hf = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=merges))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    return hf


@pytest.fixture(scope="module")
def bpe(shakespeare_text: str) -> BPETokenizer:
    return BPETokenizer.train(shakespeare_text.splitlines(keepends=True), vocab_size=1000)


@pytest.fixture(scope="module")
def char(shakespeare_text: str) -> CharTokenizer:
    return CharTokenizer.train([shakespeare_text, UNICODE_SAMPLE, EOT])


@pytest.fixture(params=["gpt2", "char", "bpe"])
def tok(request: pytest.FixtureRequest) -> Tokenizer:
    return request.getfixturevalue(request.param)


# ---------------------------------------------------------------------------------------------- gpt2


def test_gpt2_known_ids(gpt2: GPT2Tokenizer) -> None:
    assert gpt2.kind == "gpt2"
    assert gpt2.encode("Hello world") == [15496, 995]
    assert gpt2.eot_id == 50256
    assert gpt2.vocab_size == 50257
    assert gpt2.decode([gpt2.eot_id]) == EOT


def test_gpt2_matches_original_vocab_on_shakespeare(
    gpt2: GPT2Tokenizer, original_gpt2: tokenizers.Tokenizer, shakespeare_text: str
) -> None:
    ids = gpt2.encode(shakespeare_text)
    assert len(ids) == 338025
    assert ids == original_gpt2.encode(shakespeare_text).ids
    assert gpt2.decode(ids) == shakespeare_text


def test_gpt2_matches_original_vocab_on_unicode(
    gpt2: GPT2Tokenizer, original_gpt2: tokenizers.Tokenizer
) -> None:
    ids = gpt2.encode(UNICODE_SAMPLE)
    assert ids == original_gpt2.encode(UNICODE_SAMPLE).ids
    assert gpt2.decode(ids) == UNICODE_SAMPLE
    lines = UNICODE_SAMPLE.splitlines(keepends=True)
    assert gpt2.encode_batch(lines) == [e.ids for e in original_gpt2.encode_batch(lines)]


def test_gpt2_endoftext_in_text_is_plain_text(
    gpt2: GPT2Tokenizer, original_gpt2: tokenizers.Tokenizer
) -> None:
    text = f"end of one{EOT}start of next {EOT}"
    ids = gpt2.encode(text)
    assert gpt2.eot_id not in ids
    assert ids == original_gpt2.encode(text).ids
    assert gpt2.decode(ids) == text


# ---------------------------------------------------------------------------------------------- char


def test_char_round_trip_and_ids(shakespeare_text: str) -> None:
    # Streamed training (one line at a time) sees the same characters as the whole text.
    char = CharTokenizer.train(line for line in shakespeare_text.splitlines(keepends=True))
    chars = sorted(set(shakespeare_text))
    assert char.vocab_size == len(chars) + 1 == 66
    assert char.eot_id == len(chars) == char.vocab_size - 1
    ids = char.encode(shakespeare_text)
    assert ids[:3] == [chars.index(c) for c in shakespeare_text[:3]]
    assert char.decode(ids) == shakespeare_text
    assert char.fingerprint() == CharTokenizer.train([shakespeare_text]).fingerprint()


def test_char_unknown_character_names_it() -> None:
    char = CharTokenizer.train(["hello world"])
    with pytest.raises(GptkitError, match="only knows the characters of the text it was built from") as info:
        char.encode("hello wörld")
    assert repr("ö") in str(info.value)


def test_char_endoftext_in_text_is_plain_text(char: CharTokenizer) -> None:
    ids = char.encode(f"a{EOT}b")
    assert len(ids) == len(EOT) + 2 and char.eot_id not in ids


def test_char_description_round_trip(char: CharTokenizer, shakespeare_text: str) -> None:
    again = from_description(json.loads(json.dumps(char.describe())))
    assert isinstance(again, CharTokenizer)
    assert again.fingerprint() == char.fingerprint()
    assert again.encode(shakespeare_text) == char.encode(shakespeare_text)


def test_char_fingerprints_differ_between_vocabularies() -> None:
    a, b, a2 = CharTokenizer.train(["abc"]), CharTokenizer.train(["abd"]), CharTokenizer.train(["cba", "ab"])
    assert a.fingerprint() != b.fingerprint()
    assert a.fingerprint() == a2.fingerprint()


# ----------------------------------------------------------------------------------------------- bpe


def test_bpe_trained_vocab(bpe: BPETokenizer, shakespeare_text: str) -> None:
    assert bpe.kind == "bpe"
    assert bpe.vocab_size == 1000
    assert 0 <= bpe.eot_id < 1000
    ids = bpe.encode(shakespeare_text)
    assert max(ids) < 1000 and len(ids) < len(shakespeare_text) / 2  # merges were learned and used
    assert bpe.decode(ids) == shakespeare_text


def test_bpe_is_byte_level(bpe: BPETokenizer) -> None:
    ids = bpe.encode(UNICODE_SAMPLE)  # nearly none of this is in the training text
    assert bpe.decode(ids) == UNICODE_SAMPLE


def test_bpe_endoftext_in_text_is_plain_text(bpe: BPETokenizer) -> None:
    text = f"Exit{EOT}Enter"
    ids = bpe.encode(text)
    assert bpe.eot_id not in ids
    assert bpe.decode(ids) == text
    assert bpe.encode_batch([text]) == [ids]


def test_bpe_description_round_trip(bpe: BPETokenizer, shakespeare_text: str) -> None:
    again = from_description(json.loads(json.dumps(bpe.describe())))
    assert isinstance(again, BPETokenizer)
    assert again.fingerprint() == bpe.fingerprint()
    assert again.eot_id == bpe.eot_id and again.vocab_size == bpe.vocab_size
    texts = [*shakespeare_text.split("\n\n"), UNICODE_SAMPLE, f"x{EOT}y"]
    assert again.encode_batch(texts) == bpe.encode_batch(texts)


def test_bpe_rejects_too_small_vocab() -> None:
    with pytest.raises(GptkitError, match="at least 257"):
        BPETokenizer.train(["abc"], vocab_size=100)


def test_bpe_training_is_deterministic(bpe: BPETokenizer, shakespeare_text: str) -> None:
    again = BPETokenizer.train(shakespeare_text.splitlines(keepends=True), vocab_size=1000)
    assert again.fingerprint() == bpe.fingerprint()
    smaller = BPETokenizer.train(shakespeare_text.splitlines(keepends=True), vocab_size=500)
    assert smaller.fingerprint() != bpe.fingerprint()


# -------------------------------------------------------------------------------------------- common


def test_encode_batch_equals_encode(tok: Tokenizer, shakespeare_text: str) -> None:
    texts = ["", "a", shakespeare_text[:5000], UNICODE_SAMPLE, *shakespeare_text[:20000].split("\n\n")]
    assert tok.encode_batch(texts) == [tok.encode(t) for t in texts]


def test_decode_bytes_of_each_token_concatenate_to_utf8(tok: Tokenizer) -> None:
    ids = tok.encode(UNICODE_SAMPLE)
    assert b"".join(tok.decode_bytes([i]) for i in ids) == UNICODE_SAMPLE.encode("utf-8")
    assert tok.decode_bytes(np.array(ids)) == UNICODE_SAMPLE.encode("utf-8")  # numpy ids accepted


def test_decode_of_partial_characters_does_not_raise(tok: Tokenizer) -> None:
    text = "🇯🇵👨\u200d👩\u200d👧 日本"
    ids = tok.encode(text)
    prefixes = [tok.decode(ids[:k]) for k in range(len(ids) + 1)]
    assert prefixes[-1] == text
    if tok.kind != "char":  # byte-level: some prefix must end inside a character
        assert any(p.endswith("\ufffd") for p in prefixes)
        assert any(not tok.decode_bytes([i]).decode("utf-8", errors="ignore") for i in ids)


def test_eot_decodes_to_marker(tok: Tokenizer) -> None:
    assert tok.decode([tok.eot_id]) == EOT
    assert 0 <= tok.eot_id < tok.vocab_size


def test_decode_rejects_ids_outside_vocab(tok: Tokenizer) -> None:
    for bad in ([tok.vocab_size], [0, -1]):
        with pytest.raises(GptkitError, match="outside"):
            tok.decode(bad)


def test_description_is_json_and_fingerprint_stable(tok: Tokenizer) -> None:
    d = tok.describe()
    assert d["type"] == tok.kind
    again = from_description(json.loads(json.dumps(d)))
    assert type(again) is type(tok) and again.describe() == d
    fp = tok.fingerprint()
    assert len(fp) == 64 and int(fp, 16) >= 0 and again.fingerprint() == fp


def test_pickles_as_description(tok: Tokenizer) -> None:
    data = pickle.dumps(tok)
    assert len(data) < len(json.dumps(tok.describe())) + 1000  # never native state (e.g. 50k gpt2 ranks)
    again = pickle.loads(data)
    assert again.fingerprint() == tok.fingerprint()
    assert again.encode(UNICODE_SAMPLE) == tok.encode(UNICODE_SAMPLE)


def test_fingerprints_differ_between_kinds(gpt2: Tokenizer, char: Tokenizer, bpe: Tokenizer) -> None:
    assert len({gpt2.fingerprint(), char.fingerprint(), bpe.fingerprint()}) == 3


@pytest.mark.parametrize(
    "description",
    [
        {"type": "sentencepiece"},
        {},
        {"kind": "gpt2"},
        ["gpt2"],
        {"type": "gpt2"},
        {"type": "gpt2", "ranks_sha256": "0" * 64},
        {"type": "char"},
        {"type": "char", "chars": ["a", "b"]},
        {"type": "char", "chars": "ba"},
        {"type": "char", "chars": "aab"},
        {"type": "bpe"},
        {"type": "bpe", "hf_json": "{not json"},
        {"type": "bpe", "hf_json": "{}"},
    ],
)
def test_from_description_rejects_invalid(description: object) -> None:
    with pytest.raises(GptkitError) as info:
        from_description(description)  # type: ignore[arg-type]
    assert "\n" not in str(info.value)


def test_bpe_description_without_endoftext_is_rejected(bpe: BPETokenizer) -> None:
    hf = json.loads(bpe.describe()["hf_json"])
    hf["added_tokens"] = []
    del hf["model"]["vocab"][EOT]
    with pytest.raises(GptkitError, match="endoftext"):
        from_description({"type": "bpe", "hf_json": json.dumps(hf)})


@pytest.mark.parametrize("kind", ["gpt2", "char", "bpe"])
def test_encode_arrays_equals_encode_batch(kind: str) -> None:
    import numpy as np

    from gptkit.tokenizer import BPETokenizer, CharTokenizer, gpt2_tokenizer

    texts = ["Hello world<|endoftext|>", "", "ünïcödé ✓ 日本語 🙂", "a\n\n  b"]
    tok = {
        "gpt2": gpt2_tokenizer,
        "char": lambda: CharTokenizer.train(texts),
        "bpe": lambda: BPETokenizer.train(texts * 50, 300),
    }[kind]()
    arrays = tok.encode_arrays(texts, np.dtype(np.uint16))
    assert [a.dtype for a in arrays] == [np.dtype(np.uint16)] * len(texts)
    assert [a.tolist() for a in arrays] == tok.encode_batch(texts)
