"""Tokenizers built from GGUF metadata: llama.cpp's token ids, decoding, streaming.

The real-model tests compare against ids llama.cpp produced (tests/fixtures/llamacpp,
written by tools/make_fixtures.py). The rest build tiny vocabularies in memory, one
byte-level BPE (`gpt2`) and one SentencePiece-style (`llama`), small enough to check
by hand.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from swarm.errors import InvalidRequestError, ModelFileError, UnsupportedModelError
from swarm.gguf_file import GGUFFile
from swarm.tokenizer import TOKEN_BYTE, TOKEN_CONTROL, TOKEN_NORMAL, Tokenizer
from tests.conftest import REPO, load_fixture

# -- tiny vocabularies ---------------------------------------------------------------


def _gpt2_byte_chars() -> list[str]:
    """GPT-2's printable stand-in for each byte value, in byte order."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    chars, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            chars[byte] = chr(byte)
        else:
            chars[byte] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


GPT2_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
GPT2_MERGES = ["Ġ h", "e l", "l o", "h el", "hel lo", "Ġh el", "Ġhel lo"]


def gpt2_metadata(**overrides) -> dict:
    merged = [m.replace(" ", "") for m in GPT2_MERGES]
    tokens = GPT2_SPECIALS + _gpt2_byte_chars() + merged
    metadata = {
        "general.architecture": "llama",
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "gpt-2",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": [TOKEN_CONTROL] * 3 + [TOKEN_NORMAL] * (len(tokens) - 3),
        "tokenizer.ggml.merges": GPT2_MERGES,
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.add_bos_token": False,
    }
    metadata.update(overrides)
    return metadata


SPM_PIECES = ["▁", "h", "e", "l", "o", "he", "ll", "llo", "hello", "▁hello", "▁h"]


def spm_metadata(**overrides) -> dict:
    specials = ["<unk>", "<s>", "</s>", "<end_of_turn>"]
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    tokens = specials + byte_tokens + SPM_PIECES
    types = [2, TOKEN_CONTROL, TOKEN_CONTROL, TOKEN_CONTROL] + [TOKEN_BYTE] * 256
    types += [TOKEN_NORMAL] * len(SPM_PIECES)
    # longer pieces score higher, so they win every merge they take part in
    scores = [0.0] * (len(specials) + 256) + [-10.0 + len(p) for p in SPM_PIECES]
    metadata = {
        "general.architecture": "gemma3",
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.scores": scores,
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.add_space_prefix": False,
    }
    metadata.update(overrides)
    return metadata


def texts(tokenizer: Tokenizer, ids: list[int]) -> list[str]:
    return [tokenizer.token_text(i) for i in ids]


def test_gpt2_merges_and_byte_level_round_trip():
    tokenizer = Tokenizer.from_metadata(gpt2_metadata())
    ids = tokenizer.encode("hello hello")
    assert texts(tokenizer, ids) == ["hello", "Ġhello"]
    for text in ["hello hello", "  spaces\tand\nnewlines  ", "naïve 日本 🙂", ""]:
        assert tokenizer.decode(tokenizer.encode(text)) == text


def test_gpt2_control_tokens_only_when_parse_special():
    tokenizer = Tokenizer.from_metadata(gpt2_metadata())
    text = "<|im_start|>hello<|im_end|>"
    assert tokenizer.encode(text) == [1, *tokenizer.encode("hello"), 2]
    plain = tokenizer.encode(text, parse_special=False)
    assert 1 not in plain and 2 not in plain
    assert tokenizer.decode(plain) == text


def test_gpt2_missing_byte_blocks_merges_and_emits_nothing():
    # llama.cpp keeps a byte that has no token as a symbol (so 'he' + 'llo' cannot
    # merge across it) and then drops it.
    metadata = gpt2_metadata()
    tokens = list(metadata["tokenizer.ggml.tokens"])
    tokens[3 + 0x01] = "[no byte 0x01]"
    tokenizer = Tokenizer.from_metadata(gpt2_metadata(**{"tokenizer.ggml.tokens": tokens}))
    assert texts(tokenizer, tokenizer.encode("hel\x01lo")) == ["hel", "lo"]


def test_spm_merges_by_score_with_byte_fallback():
    tokenizer = Tokenizer.from_metadata(spm_metadata())
    assert texts(tokenizer, tokenizer.encode("hello hello", add_bos=False)) == ["hello", "▁hello"]
    assert texts(tokenizer, tokenizer.encode("hé", add_bos=False)) == ["h", "<0xC3>", "<0xA9>"]
    assert tokenizer.decode(tokenizer.encode("hello hé")) == "<s>hello hé"
    assert tokenizer.decode(tokenizer.encode("hello hé"), skip_special=True) == "hello hé"


def test_spm_add_space_prefix_after_each_special_token():
    tokenizer = Tokenizer.from_metadata(spm_metadata(**{"tokenizer.ggml.add_space_prefix": True}))
    ids = tokenizer.encode("hello<end_of_turn>hello", add_bos=False)
    assert texts(tokenizer, ids) == ["▁hello", "<end_of_turn>", "▁hello"]


def test_bos_follows_the_model_rule_unless_given():
    spm = Tokenizer.from_metadata(spm_metadata())
    assert spm.add_bos and spm.encode("hello")[0] == spm.bos_id == 1
    assert spm.encode("hello", add_bos=False) == spm.encode("hello")[1:]
    gpt2 = Tokenizer.from_metadata(gpt2_metadata())
    assert not gpt2.add_bos and gpt2.encode("hello", add_bos=True)[0] == 1


def test_eog_ids_mirror_llama_cpp_list():
    gpt2 = Tokenizer.from_metadata(gpt2_metadata())
    assert gpt2.eog_ids == {0, 2}  # <|endoftext|>, <|im_end|> (also the EOS)
    spm = Tokenizer.from_metadata(spm_metadata())
    assert spm.eog_ids == {2, 3}  # </s> (EOS), <end_of_turn>


def test_stream_decoder_holds_an_emoji_split_across_byte_tokens():
    tokenizer = Tokenizer.from_metadata(spm_metadata())
    ids = tokenizer.encode("hello😀hello", add_bos=False)
    assert texts(tokenizer, ids)[1:5] == ["<0xF0>", "<0x9F>", "<0x98>", "<0x80>"]
    decoder = tokenizer.stream_decoder()
    chunks = [decoder.push(i) for i in ids]
    assert chunks == ["hello", "", "", "", "😀", "hello"]
    assert decoder.flush() == ""


def test_stream_decoder_flushes_an_unfinished_character_as_replacement():
    tokenizer = Tokenizer.from_metadata(spm_metadata())
    decoder = tokenizer.stream_decoder()
    first_two = tokenizer.encode("😀", add_bos=False)[:2]
    assert [decoder.push(i) for i in first_two] == ["", ""]
    assert decoder.flush() == "\ufffd"


def test_unknown_tokenizer_model_is_named():
    with pytest.raises(UnsupportedModelError, match="'rwkv'"):
        Tokenizer.from_metadata(spm_metadata(**{"tokenizer.ggml.model": "rwkv"}))


def test_unknown_pre_tokenizer_is_named():
    with pytest.raises(UnsupportedModelError, match="'mystery-bpe'"):
        Tokenizer.from_metadata(gpt2_metadata(**{"tokenizer.ggml.pre": "mystery-bpe"}))


def test_missing_vocabulary_is_a_model_file_error():
    with pytest.raises(ModelFileError, match=r"tokenizer\.ggml\.tokens"):
        Tokenizer.from_metadata({"tokenizer.ggml.model": "llama"})


def test_token_id_outside_vocabulary():
    tokenizer = Tokenizer.from_metadata(spm_metadata())
    with pytest.raises(InvalidRequestError, match="outside the vocabulary"):
        tokenizer.decode([tokenizer.vocab_size])
    with pytest.raises(InvalidRequestError):
        tokenizer.token_text(-1)


def test_tokenizer_modules_do_not_import_jax():
    code = "import sys, swarm.tokenizer, swarm.chat_template; assert 'jax' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


# -- real models against llama.cpp ------------------------------------------------------

REAL_MODELS = ("smollm2-135m", "gemma3-270m")
_built: dict[str, Tokenizer] = {}


@pytest.fixture(scope="module")
def real_tokenizer(request, data_dir):
    """Returns a function model name -> Tokenizer built from that GGUF (once)."""

    def get(name: str) -> Tokenizer:
        if name not in _built:
            path = request.getfixturevalue("smollm2_path" if name == "smollm2-135m" else "gemma3_path")
            _built[name] = Tokenizer.from_metadata(GGUFFile.open(path, data_dir / "cache").metadata)
        return _built[name]

    return get


@pytest.mark.realmodel
@pytest.mark.parametrize("name", REAL_MODELS)
def test_vocabulary_facts_match_llama_cpp(name, real_tokenizer):
    fixture = load_fixture(name)
    tokenizer = real_tokenizer(name)
    assert tokenizer.vocab_size == fixture["n_vocab"]
    assert (tokenizer.bos_id, tokenizer.eos_id) == (fixture["bos_token_id"], fixture["eos_token_id"])
    assert tokenizer.add_bos == fixture["add_bos"]
    assert tokenizer.eog_ids == set(fixture["eog_token_ids"])


@pytest.mark.realmodel
@pytest.mark.parametrize("name", REAL_MODELS)
def test_token_ids_match_llama_cpp(name, real_tokenizer):
    tokenizer = real_tokenizer(name)
    fixture = load_fixture(name)
    for entry in fixture["tokenize"]:
        got = tokenizer.encode(entry["text"], add_bos=entry["add_bos"])
        assert got == entry["token_ids"], entry["text"]
    for case in fixture["cases"]:
        if case["kind"] == "raw":
            got = tokenizer.encode(case["text"], add_bos=case["add_bos"], parse_special=False)
        else:
            got = tokenizer.encode(case["rendered"], add_bos=case["add_bos"])
        assert got == case["prompt_token_ids"], case["name"]


@pytest.mark.realmodel
@pytest.mark.parametrize("name", REAL_MODELS)
def test_decode_inverts_encode_on_real_text(name, real_tokenizer):
    tokenizer = real_tokenizer(name)
    for entry in load_fixture(name)["tokenize"]:
        ids = tokenizer.encode(entry["text"], add_bos=False)
        assert tokenizer.decode(ids) == entry["text"]
        decoder = tokenizer.stream_decoder()
        chunks = [decoder.push(i) for i in ids] + [decoder.flush()]
        assert "".join(chunks) == entry["text"]
        assert all("\ufffd" not in chunk for chunk in chunks)


@pytest.mark.realmodel
def test_smollm2_streams_multi_token_emoji_whole(real_tokenizer):
    tokenizer = real_tokenizer("smollm2-135m")
    ids = tokenizer.encode("🚀")
    assert len(ids) == 3  # byte-level pieces of one 4-byte character
    decoder = tokenizer.stream_decoder()
    assert [decoder.push(i) for i in ids] == ["", "", "🚀"]


@pytest.mark.realmodel
def test_gemma_user_defined_and_control_tokens(real_tokenizer):
    tokenizer = real_tokenizer("gemma3-270m")
    # runs of spaces and newlines are user-defined tokens, cut out before merging
    assert texts(tokenizer, tokenizer.encode("a  b\n\n", add_bos=False)) == ["a", "  ", "b", "\n\n"]
    assert tokenizer.encode("<end_of_turn>", add_bos=False) == [106]
    assert 106 not in tokenizer.encode("<end_of_turn>", add_bos=False, parse_special=False)
    # '</s>' is user-defined in Gemma 3 but EOG-looking: llama.cpp makes it control
    assert tokenizer.encode("</s>", add_bos=False, parse_special=False) != [212]


@pytest.mark.realmodel
def test_opening_gemma3_keeps_its_tokenizer_small(gemma3_path, data_dir):
    """Gemma 3's 262K-token vocabulary is built from the GGUF at every start: restored from
    a saved JSON form, the same tokenizer held twice the memory (the process at 468 MB
    after opening the model, against 225 MB). Copies saved by earlier versions are removed."""
    old = data_dir / "cache" / "tokenizers"
    old.mkdir(parents=True, exist_ok=True)
    (old / "0123456789abcdef.json").write_text("{}", encoding="utf-8")
    script = (
        "import sys; from pathlib import Path; from swarm.loader import open_model\n"
        "model = open_model('gemma3-270m', Path(sys.argv[1]), install_missing=False)\n"
        "assert model.tokenizer.encode('<start_of_turn>user', add_bos=False)[0] == 105\n"
        "print(int(open('/proc/self/statm').read().split()[1]) * 4096)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, str(data_dir)], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert int(done.stdout.split()[-1]) < 350e6
    assert not old.exists()
