"""Text <-> token ids for a GGUF model, matching llama.cpp's tokenizer.

Owns building a tokenizer from GGUF metadata (`tokenizer.ggml.*`), encoding,
decoding, streaming detokenization and the end-of-generation id set. The merge
algorithm runs in the Hugging Face `tokenizers` library; what this module adds is the
translation of llama.cpp's rules (`src/llama-vocab.cpp`, `src/unicode.cpp`) into that library's terms:

| `tokenizer.ggml.model` | llama.cpp vocab type | built here as |
|---|---|---|
| `gpt2` | BPE | byte-level BPE over the GGUF merges; pre-split by the regexes llama.cpp uses for `tokenizer.ggml.pre` |
| `llama` | SPM | BPE whose merges are derived from the scores (highest-scoring merged piece first, as `llm_tokenizer_spm_session`), byte fallback, spaces escaped to U+2581 |

Control (type 3) and unknown (type 2) tokens are special: they are cut out of the
text only when `parse_special` is set. User-defined tokens (type 4) are cut out
always, as llama.cpp's `tokenizer_st_partition` does.

Decoding is llama.cpp's `token_to_piece` concatenated per token, which is what
llama.cpp's server streams; it does not apply `detokenize`'s leading-space removal
or `clean_spaces` pass.

Imports `tokenizers` and the standard library; never jax.
"""

from __future__ import annotations

import codecs
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import tokenizers
from tokenizers import AddedToken, Regex, models, normalizers, pre_tokenizers

from swarm.errors import InvalidRequestError, ModelFileError, UnsupportedModelError

# GGUF token types (llama.h LLAMA_TOKEN_TYPE_*).
TOKEN_NORMAL = 1
TOKEN_UNKNOWN = 2
TOKEN_CONTROL = 3
TOKEN_USER_DEFINED = 4
TOKEN_UNUSED = 5
TOKEN_BYTE = 6

SPACE_ESCAPE = "\u2581"  # SentencePiece's visible space, llama_escape_whitespace
# Stands for a byte-level character missing from a gpt2 vocabulary; NUL never
# occurs in byte-level text, so no input word can spell it.
_MISSING_BYTE = "\x00missing byte"

# Pre-tokenizer regexes, verbatim from llm_tokenizer_bpe's constructor. Each is
# applied to every piece the previous one produced, keeping unmatched text as its
# own piece (unicode_regex_split), i.e. `Split(..., behavior="isolated")`.
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3 = (
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2 = (
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_DEFAULT = (r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", r"[0-9][0-9][0-9]")
_FALCON = (
    r"[\p{P}\$\+<=>\^~\|`]+",
    r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)",
    r"[0-9][0-9][0-9]",
)

# llama-vocab.cpp sets ignore_merges (a whole-word vocabulary hit skips BPE) and
# a default add_bos for this family.
_LLAMA3_FAMILY = frozenset(
    ["llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2", "jina-v5-nano"]
)
# tokenizer.ggml.pre -> regexes, grouped as llama-vocab.cpp maps names to pre-types.
_PRE_TYPE_GROUPS: dict[str, tuple[str, ...]] = {
    "default": _DEFAULT,
    " ".join(sorted(_LLAMA3_FAMILY)) + " dbrx smaug-bpe": (_LLAMA3,),
    "smollm starcoder refact command-r codeshell exaone minerva-7b mellum2": (r"\p{N}", _GPT2),
    "gpt-2 phi-2 jina-es jina-de gigachat jina-v2-es jina-v2-de a.x-4.0 mellum modern-bert mpt olmo jais "
    "trillion granite-docling exaone4": (_GPT2,),
    "qwen2 deepseek-r1-qwen kormo f2llmv2 stablelm2 megrez hunyuan solar-open": (_QWEN2,),
    "falcon": _FALCON,
}
PRE_TYPE_SPLITS: dict[str, tuple[str, ...]] = {
    name: regexes for names, regexes in _PRE_TYPE_GROUPS.items() for name in names.split()
}

# Token texts llama.cpp treats as end of generation (llama_vocab::impl::load,
# "maintain a list of tokens that cause end-of-generation").
EOG_TEXTS = frozenset(
    [
        "<|eot_id|>",
        "<|im_end|>",
        "<|end|>",
        "<|return|>",
        "<|call|>",
        "<|flush|>",
        "<|calls|>",
        "<end_of_turn>",
        "<|endoftext|>",
        "</s>",
        "<|eom_id|>",
        "<EOT>",
        "_<EOT>",
        "[EOT]",
        "[EOS]",
        "<|end_of_text|>",
        "<end_of_utterance>",
        "<eos>",
        "<turn|>",
        "<|tool_response>",
        "<｜end▁of▁sentence｜>",
        "[e~[",
    ]
)
# Fill-in-the-middle tokens llama.cpp also counts as EOG when the GGUF does not
# name them by id (auto-detected by text).
_FIM_EOG_TEXTS = {
    "tokenizer.ggml.fim_pad_token_id": ("<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]"),
    "tokenizer.ggml.fim_rep_token_id": (
        "<|fim_repo|>",
        "<|repo_name|>",
        "<fim-repo>",
        "<REPO>",
        "<reponame>",
    ),
    "tokenizer.ggml.fim_sep_token_id": ("<|file_sep|>",),
}

_CONTROL_LOOKING = EOG_TEXTS.union(*_FIM_EOG_TEXTS.values())


@dataclass(frozen=True)
class TokenizerSpec:
    """What a `Tokenizer` needs besides the `tokenizers` object; cached as JSON."""

    model: str  # "gpt2" or "llama"
    vocab_size: int
    bos_id: int | None
    eos_id: int | None
    add_bos: bool
    eog_ids: tuple[int, ...]
    # token type -> ids, for every token whose type is not NORMAL
    special_types: dict[int, list[int]]


class Tokenizer:
    """Encode and decode text the way llama.cpp does for one GGUF vocabulary."""

    def __init__(self, backend: tokenizers.Tokenizer, spec: TokenizerSpec) -> None:
        self._backend = backend
        self._spec = spec
        # `encode_special_tokens` is a setting on the backend, so an encode that
        # changes it must not overlap another encode.
        self._encode_lock = threading.Lock()
        self._types: dict[int, int] = {
            token_id: token_type for token_type, ids in spec.special_types.items() for token_id in ids
        }
        self._texts: list[str] | None = None
        self._pieces: list[bytes] | None = None

    # -- construction ----------------------------------------------------------

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, Any]) -> Tokenizer:
        """Build from a GGUF key-value section (`GGUFFile.metadata`)."""
        model = metadata.get("tokenizer.ggml.model")
        if model is None:
            raise ModelFileError("GGUF has no tokenizer.ggml.model")
        tokens = metadata.get("tokenizer.ggml.tokens")
        if not tokens:
            raise ModelFileError("GGUF has no tokenizer.ggml.tokens")
        types = list(metadata.get("tokenizer.ggml.token_type") or [TOKEN_NORMAL] * len(tokens))
        if len(types) < len(tokens):
            raise ModelFileError("tokenizer.ggml.token_type is shorter than tokenizer.ggml.tokens")
        vocab = {text: token_id for token_id, text in enumerate(tokens)}
        if len(vocab) != len(tokens):
            raise ModelFileError("tokenizer.ggml.tokens has duplicate entries")

        if model == "gpt2":
            pre = metadata.get("tokenizer.ggml.pre") or "default"
            if pre not in PRE_TYPE_SPLITS:
                raise UnsupportedModelError(f"tokenizer pre-type '{pre}' is not supported")
            backend = _bpe_backend(tokens, vocab, metadata.get("tokenizer.ggml.merges"), pre)
        elif model == "llama":
            scores = metadata.get("tokenizer.ggml.scores") or [0.0] * len(tokens)
            add_space_prefix = bool(metadata.get("tokenizer.ggml.add_space_prefix", True))
            backend = _spm_backend(tokens, vocab, scores, add_space_prefix)
        else:
            raise UnsupportedModelError(f"tokenizer model '{model}' is not supported")

        bos_id, eos_id = special_token_ids(metadata)
        eog_ids = _eog_ids(metadata, vocab, tokens, eos_id)
        types = _promote_control(types[: len(tokens)], (i for i in eog_ids if tokens[i] in _CONTROL_LOOKING))
        _add_special_tokens(backend, tokens, types)
        add_bos = model_adds_bos(metadata)
        if add_bos and bos_id is None:
            raise ModelFileError("tokenizer.ggml.add_bos_token is true but the BOS id is not set")
        special_types: dict[int, list[int]] = {}
        for token_id, token_type in enumerate(types):
            if token_type != TOKEN_NORMAL:
                special_types.setdefault(int(token_type), []).append(token_id)
        spec = TokenizerSpec(
            model=model,
            vocab_size=len(tokens),
            bos_id=bos_id,
            eos_id=eos_id,
            add_bos=add_bos,
            eog_ids=tuple(sorted(eog_ids)),
            special_types=special_types,
        )
        return cls(backend, spec)

    # -- properties ------------------------------------------------------------

    @property
    def model(self) -> str:
        return self._spec.model

    @property
    def vocab_size(self) -> int:
        return self._spec.vocab_size

    @property
    def bos_id(self) -> int | None:
        return self._spec.bos_id

    @property
    def eos_id(self) -> int | None:
        return self._spec.eos_id

    @property
    def add_bos(self) -> bool:
        """Whether `encode` prepends BOS by default (the model's rule)."""
        return self._spec.add_bos

    @property
    def eog_ids(self) -> frozenset[int]:
        """Ids that end generation: EOS plus llama.cpp's end-of-turn tokens."""
        return frozenset(self._spec.eog_ids)

    def is_eog(self, token_id: int) -> bool:
        return token_id in self._spec.eog_ids

    def token_type(self, token_id: int) -> int:
        return self._types.get(token_id, TOKEN_NORMAL)

    def token_text(self, token_id: int) -> str:
        """The token's vocabulary entry as stored in the GGUF (e.g. 'Ġthe', '▁the')."""
        if not 0 <= token_id < self._spec.vocab_size:
            raise InvalidRequestError(
                f"token id {token_id} is outside the vocabulary (size {self.vocab_size})"
            )
        return self._token_texts()[token_id]

    # -- encode / decode -------------------------------------------------------

    def encode(self, text: str, *, add_bos: bool | None = None, parse_special: bool = True) -> list[int]:
        """Token ids for `text`; `add_bos` None follows the model's rule.

        `parse_special` turns control-token text such as '<|im_start|>' into its id;
        without it that text is tokenized as ordinary characters.
        """
        with self._encode_lock:
            self._backend.encode_special_tokens = not parse_special
            ids = self._backend.encode(text, add_special_tokens=False).ids
        if self._spec.model == "gpt2":
            ids = [i for i in ids if i < self._spec.vocab_size]
        if self._spec.add_bos if add_bos is None else add_bos:
            if self._spec.bos_id is None:
                raise UnsupportedModelError("this model's vocabulary has no BOS token")
            ids.insert(0, self._spec.bos_id)
        return ids

    def token_bytes(self, token_id: int, *, skip_special: bool = False) -> bytes:
        """The bytes one token contributes to the text (llama.cpp `token_to_piece`)."""
        if not 0 <= token_id < self._spec.vocab_size:
            raise InvalidRequestError(
                f"token id {token_id} is outside the vocabulary (size {self.vocab_size})"
            )
        if skip_special and self._types.get(token_id) in (TOKEN_CONTROL, TOKEN_UNKNOWN):
            return b""
        return self._token_pieces()[token_id]

    def decode(self, ids: Iterable[int], *, skip_special: bool = False) -> str:
        """Text for `ids`; bytes that are not valid UTF-8 become U+FFFD."""
        data = b"".join(self.token_bytes(i, skip_special=skip_special) for i in ids)
        return data.decode("utf-8", errors="replace")

    def stream_decoder(self, *, skip_special: bool = False) -> StreamDecoder:
        return StreamDecoder(self, skip_special=skip_special)

    # -- lazily built tables ---------------------------------------------------

    def _token_texts(self) -> list[str]:
        if self._texts is None:
            texts = [""] * self._spec.vocab_size
            for text, token_id in self._backend.get_vocab(with_added_tokens=True).items():
                if token_id < len(texts):
                    texts[token_id] = text
            self._texts = texts
        return self._texts

    def _token_pieces(self) -> list[bytes]:
        if self._pieces is None:
            byte_level = self._spec.model == "gpt2"
            self._pieces = [
                _piece(text, self._types.get(token_id, TOKEN_NORMAL), byte_level)
                for token_id, text in enumerate(self._token_texts())
            ]
        return self._pieces


class StreamDecoder:
    """Turns generated ids into text as they arrive, never splitting a character.

    Bytes of a UTF-8 sequence cut across tokens (an emoji spelled as byte
    tokens) are held until the sequence completes; an invalid sequence becomes
    U+FFFD. `decode(ids) == ''.join(push(i) for i in ids) + flush()`.
    """

    def __init__(self, tokenizer: Tokenizer, *, skip_special: bool = False) -> None:
        self._tokenizer = tokenizer
        self._skip_special = skip_special
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        """Text completed by this token ('' while a character is still partial)."""
        return self._utf8.decode(self._tokenizer.token_bytes(token_id, skip_special=self._skip_special))

    def flush(self) -> str:
        """Whatever is held back, with an unfinished sequence as U+FFFD."""
        return self._utf8.decode(b"", final=True)


def model_adds_bos(metadata: Mapping[str, Any]) -> bool:
    """The model's BOS rule without building a tokenizer (llama-vocab.cpp load)."""
    model = metadata.get("tokenizer.ggml.model")
    default = model == "llama" or (
        model == "gpt2" and (metadata.get("tokenizer.ggml.pre") or "default") in _LLAMA3_FAMILY
    )
    return bool(metadata.get("tokenizer.ggml.add_bos_token", default))


def special_token_ids(metadata: Mapping[str, Any]) -> tuple[int | None, int | None]:
    """(BOS id, EOS id) with llama-vocab.cpp's per-model defaults."""
    n_tokens = len(metadata.get("tokenizer.ggml.tokens") or ())
    default_bos, default_eos = (1, 2) if metadata.get("tokenizer.ggml.model") == "llama" else (11, 11)
    return (
        _special_id(metadata, "tokenizer.ggml.bos_token_id", default_bos, n_tokens),
        _special_id(metadata, "tokenizer.ggml.eos_token_id", default_eos, n_tokens),
    )


# -- building blocks -------------------------------------------------------------


def _bpe_backend(
    tokens: Sequence[str], vocab: dict[str, int], merges: Sequence[str] | None, pre: str
) -> tokenizers.Tokenizer:
    """Byte-level BPE (llm_tokenizer_bpe_session) over the GGUF's merges."""
    if not merges:
        raise ModelFileError("GGUF has no tokenizer.ggml.merges for a gpt2 tokenizer")
    pairs = []
    for merge in merges:
        # llama-vocab.cpp splits at the first space after the first character
        cut = merge.find(" ", 1)
        if cut < 0:
            continue
        left, right = merge[:cut], merge[cut + 1 :]
        if left in vocab and right in vocab and left + right in vocab:
            pairs.append((left, right))
    # A byte with no token in the vocabulary still occupies a symbol in llama.cpp,
    # so its neighbours cannot merge across it, and it then emits nothing. An
    # out-of-range placeholder id does the same here; `encode` drops it.
    placeholder = {_MISSING_BYTE: len(tokens)}
    backend = tokenizers.Tokenizer(
        models.BPE(
            vocab={**vocab, **placeholder},
            merges=pairs,
            unk_token=_MISSING_BYTE,
            ignore_merges=pre in _LLAMA3_FAMILY,
        )
    )
    splits = [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in PRE_TYPE_SPLITS[pre]]
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [*splits, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    return backend


def _spm_backend(
    tokens: Sequence[str], vocab: dict[str, int], scores: Sequence[float], add_space_prefix: bool
) -> tokenizers.Tokenizer:
    """SentencePiece-style BPE (llm_tokenizer_spm_session) as ranked merges.

    llama.cpp repeatedly merges the adjacent pair whose concatenation is the
    highest-scoring vocabulary entry. Ranking every (left, right) split of every
    entry by that entry's score gives the same merges to a rank-ordered BPE.
    """
    if len(scores) < len(tokens):
        raise ModelFileError("tokenizer.ggml.scores is shorter than tokenizer.ggml.tokens")
    # Highest score first; the sort is stable, so equal scores keep id order.
    order = sorted(range(len(tokens)), key=scores.__getitem__, reverse=True)
    known = vocab.__contains__
    pairs = [
        (text[:cut], text[cut:])
        for text in map(tokens.__getitem__, order)
        for cut in range(1, len(text))
        if known(text[:cut]) and known(text[cut:])
    ]
    backend = tokenizers.Tokenizer(models.BPE(vocab=dict(vocab), merges=pairs, byte_fallback=True))
    # llama_escape_whitespace, after a leading space when add_space_prefix; the
    # backend applies normalizers per text fragment between special tokens, as
    # llama.cpp prefixes each fragment that follows a special token.
    steps = [normalizers.Prepend(SPACE_ESCAPE)] if add_space_prefix else []
    backend.normalizer = normalizers.Sequence([*steps, normalizers.Replace(" ", SPACE_ESCAPE)])
    return backend


def _promote_control(types: Sequence[int], eog_ids: Iterable[int]) -> list[int]:
    """EOG tokens found by their text count as control whatever the GGUF says.

    llama-vocab.cpp adds the control attribute to them ("control-looking token ...
    its type will be overridden"), so e.g. Gemma 3's user-defined '</s>' is not
    cut out of the text when parse_special is off.
    """
    promoted = list(types)
    for token_id in eog_ids:
        promoted[token_id] = TOKEN_CONTROL
    return promoted


def _add_special_tokens(backend: tokenizers.Tokenizer, tokens: Sequence[str], types: Sequence[int]) -> None:
    """Register the tokens llama.cpp cuts out of the text before tokenizing.

    Matching is on the raw text (normalized=False), as tokenizer_st_partition
    searches the unescaped input. Control and unknown tokens are `special`, so
    `encode_special_tokens` (parse_special off) skips them; user-defined ones
    are always matched.
    """
    added = [
        AddedToken(tokens[i], special=types[i] != TOKEN_USER_DEFINED, normalized=False)
        for i in range(len(tokens))
        if types[i] in (TOKEN_CONTROL, TOKEN_UNKNOWN, TOKEN_USER_DEFINED)
    ]
    backend.add_tokens(added)


def _special_id(metadata: Mapping[str, Any], key: str, default: int, n_tokens: int) -> int | None:
    value = metadata.get(key, default)
    if value is None or not 0 <= int(value) < n_tokens:
        value = default if 0 <= default < n_tokens else None
    return None if value is None else int(value)


def _eog_ids(
    metadata: Mapping[str, Any], vocab: Mapping[str, int], tokens: Sequence[str], eos_id: int | None
) -> set[int]:
    """llama-vocab.cpp's special_eog_ids, built the same way."""
    eog = {token_id for text, token_id in vocab.items() if text in EOG_TEXTS}
    for key, texts in _FIM_EOG_TEXTS.items():
        found = metadata.get(key)
        if found is None:
            found = next((vocab[t] for t in texts if t in vocab), None)
        if found is not None and 0 <= int(found) < len(tokens):
            eog.add(int(found))
    for key in ("tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"):
        found = metadata.get(key)
        if found is not None and 0 <= int(found) < len(tokens):
            eog.add(int(found))
    if eos_id is not None:
        eog.add(eos_id)
    texts = {tokens[i]: i for i in eog}
    # o200k_harmony / solar-open: '<|end|>' is not EOG when the call/return tokens exist
    if "<|end|>" in texts and (
        {"<|return|>", "<|call|>"} <= texts.keys() or {"<|calls|>", "<|flush|>"} <= texts.keys()
    ):
        eog.discard(texts["<|end|>"])
    # gemma4 / paddleocr: '</s>' is not EOG next to '<|tool_response>'
    if "</s>" in texts and "<|tool_response>" in texts:
        eog.discard(texts["</s>"])
    return eog


def _byte_level_decoder() -> dict[str, int]:
    """GPT-2's byte <-> printable character table (unicode_byte_to_utf8_map)."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    table = {chr(b): b for b in printable}
    extra = 0
    for b in range(256):
        if b not in printable:
            table[chr(256 + extra)] = b
            extra += 1
    return table


_BYTE_LEVEL = _byte_level_decoder()


def _piece(text: str, token_type: int, byte_level: bool) -> bytes:
    """One token's bytes, following llama_vocab::impl::token_to_piece."""
    if token_type in (TOKEN_CONTROL, TOKEN_UNKNOWN, TOKEN_USER_DEFINED):
        return text.encode("utf-8")
    if token_type == TOKEN_BYTE and len(text) == 6 and text.startswith("<0x"):
        return bytes([int(text[3:5], 16)])  # '<0xAB>', llama_vocab::impl::token_to_byte
    if token_type not in (TOKEN_NORMAL, TOKEN_BYTE):
        return b""  # unused and undefined tokens print nothing
    if not byte_level:
        return text.replace(SPACE_ESCAPE, " ").encode("utf-8")
    out = bytearray()
    for char in text:
        byte = _BYTE_LEVEL.get(char)
        if byte is None:  # llama_decode_text's marker for a character outside the table
            out += f"[UNK_BYTE_0x{char.encode('utf-8').hex()}{text}]".encode()
        else:
            out.append(byte)
    return bytes(out)
