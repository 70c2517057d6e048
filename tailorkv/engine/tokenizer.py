"""Tokenizer built from an HF directory (tokenizer.json / tokenizer.model) or a GGUF vocabulary, plus chat templates."""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
import tempfile
from datetime import datetime

import jinja2

from ..errors import InvalidRequestError, ModelLoadError
from ..models.weights import TokenizerSource
from .prefix_tokens import WORD_GAP, PrefixTokenCache, word_gaps_split

# Used when a model ships no template of its own.
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
_GGUF_CONTROL, _GGUF_USER_DEFINED = 3, 4
TOKENIZER_CACHE = os.path.join(
    os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "tailorkv", "tokenizers"
)


# id(source) -> (source, its tokenizers.Tokenizer)
_BUILT: dict[int, tuple[TokenizerSource, object]] = {}


def _gguf_bpe(src: TokenizerSource):
    """The BPE tokenizer of a GGUF vocabulary, built once per source in a process (~0.2 s; engines only read it,
    and benchmarks and tests start several engines on one model); the source is kept so its id stays its own."""
    if id(src) not in _BUILT:
        _BUILT[id(src)] = (src, _build_gguf_bpe(src))
    return _BUILT[id(src)][1]


def _build_gguf_bpe(src: TokenizerSource):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    tk = Tokenizer(
        models.BPE(
            vocab={t: i for i, t in enumerate(src.tokens)},
            merges=[tuple(m.split(" ", 1)) for m in src.merges],
        )
    )
    # SmolLM/GPT-2 style byte-level BPE; individual digits as in the smollm pre-tokenizer
    tk.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tk.decoder = decoders.ByteLevel()
    special = [
        t for t, ty in zip(src.tokens, src.token_types) if ty in (_GGUF_CONTROL, _GGUF_USER_DEFINED)
    ]
    tk.add_special_tokens(special)
    return tk


class Tokenizer:
    """encode/decode and chat templating; `eos_token_ids` are the ids that end a generation."""

    def __init__(self, src: TokenizerSource, extra_eos: list[int] | None = None):
        self._sp = self._tk = None
        self._src = src
        if src.kind == "gguf":
            if src.model != "gpt2":
                raise ModelLoadError(
                    f"GGUF tokenizer {src.model!r} is not supported (byte-level BPE 'gpt2' is); "
                    "load the HF directory of this model instead"
                )
            self._tk = _gguf_bpe(src)
        elif os.path.isfile(os.path.join(src.path, "tokenizer.json")):
            from tokenizers import Tokenizer as HFTokenizer

            self._tk = HFTokenizer.from_file(os.path.join(src.path, "tokenizer.json"))
        elif os.path.isfile(os.path.join(src.path, "tokenizer.model")):
            import sentencepiece

            self._sp_path = os.path.join(src.path, "tokenizer.model")
            self._sp = sentencepiece.SentencePieceProcessor(model_file=self._sp_path)
        else:
            raise ModelLoadError(f"{src.path} has neither tokenizer.json nor tokenizer.model")
        # a chat's next turn repeats the document and the turns before: their ids are reused where that is exact
        self._prefix = (
            PrefixTokenCache(self._encode_with_ends)
            if self._tk and word_gaps_split(self._tk)
            else None
        )
        self.bos_token_id = src.bos_token_id
        self.add_bos = src.add_bos
        eos = [src.eos_token_id] if src.eos_token_id is not None else []
        self.eos_token_ids = sorted(set(eos + list(extra_eos or [])))
        self.vocab_size = (
            self._sp.get_piece_size()
            if self._sp
            else self._tk.get_vocab_size(with_added_tokens=True)
        )
        env = jinja2.Environment(
            trim_blocks=True, lstrip_blocks=True, undefined=jinja2.StrictUndefined
        )
        env.globals["raise_exception"] = self._raise
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        self._template_source = src.chat_template or CHATML
        self._template = env.from_string(self._template_source)

    @staticmethod
    def _raise(message: str):
        raise InvalidRequestError(f"chat template: {message}")

    def token_str(self, token_id: int) -> str:
        return (
            self._sp.id_to_piece(token_id) if self._sp else (self._tk.id_to_token(token_id) or "")
        )

    @property
    def hf_tokenizer(self):
        """The `tokenizers.Tokenizer` behind this one (None for sentencepiece)."""
        return self._tk

    def vocabulary(self) -> list[str]:
        """Each id's token as the vocabulary stores it (byte-level or sentencepiece pieces); "" for special
        tokens (control, unknown, added special tokens), which are no text."""
        if self._sp:
            sp = self._sp
            return [
                "" if sp.is_control(i) or sp.is_unknown(i) else sp.id_to_piece(i)
                for i in range(self.vocab_size)
            ]
        ids = self._tk.get_vocab(with_added_tokens=True)
        vocab = [""] * max(self.vocab_size, max(ids.values()) + 1)
        for token, i in ids.items():
            vocab[i] = token
        for i, added in self._tk.get_added_tokens_decoder().items():
            if added.special:
                vocab[i] = ""
        return vocab

    def _encode_with_ends(self, text: str) -> tuple[list[int], list[int]]:
        # encode_batch releases the GIL (encode holds it): a long prompt tokenized on a server thread would stall
        # the engine thread's steps for everyone else
        enc = self._tk.encode_batch([text], add_special_tokens=False)[0]
        return enc.ids, [end for _, end in enc.offsets]

    def encode(self, text: str) -> list[int]:
        if self._sp:
            ids = self._sp.encode(text)
        else:
            ids = self._prefix.encode(text) if self._prefix else self._encode_with_ends(text)[0]
        if self.add_bos and self.bos_token_id is not None and not self._template_adds_bos(text):
            ids = [self.bos_token_id] + ids
        return ids

    def encode_head(self, text: str, n: int) -> list[int]:
        """encode(text)[:n], tokenizing only as much of a long text as that needs where it is exact: up to a word
        gap, where this tokenizer's ids split (prefix_tokens' module docstring); otherwise the whole text."""
        end = 8 * n
        while self._prefix and end < len(text):
            gap = WORD_GAP.search(text, end)
            if gap is None:
                break
            ids = self.encode(text[: gap.start()])
            if len(ids) >= n:
                return ids[:n]
            end *= 2
        return self.encode(text)[:n]

    def _template_adds_bos(self, text: str) -> bool:
        return self.bos_token_id is not None and text.startswith(self.token_str(self.bos_token_id))

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        if self._sp:
            return self._sp.decode(ids)
        return self._tk.decode(ids, skip_special_tokens=skip_special_tokens)

    def decode_continuation(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        """The text `ids` add after earlier tokens that end a character: decode(ids), except that sentencepiece
        drops every leading whitespace of a text, so its ids are decoded after a plain piece here."""
        if not self._sp:
            return self.decode(ids, skip_special_tokens)
        anchor = self._sp_anchor
        return self._sp.decode([anchor] + ids)[len(self._sp.id_to_piece(anchor)) :]

    @functools.cached_property
    def _sp_anchor(self) -> int:
        """A piece that decodes to itself without whitespace (a plain letter or digit)."""
        sp = self._sp
        return next(
            i
            for i in range(sp.get_piece_size())
            if not (sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i) or sp.is_byte(i))
            and sp.id_to_piece(i).isalnum()
            and sp.decode([i]) == sp.id_to_piece(i)
        )

    def save_pretrained(self, directory: str) -> None:
        """Write tokenizer.json (or tokenizer.model) and tokenizer_config.json, as an HF directory holds them:
        transformers' AutoTokenizer loads it and encodes to the same ids."""
        import json

        if self._sp:
            shutil.copy(self._sp_path, os.path.join(directory, "tokenizer.model"))
        else:
            self._tk.save(os.path.join(directory, "tokenizer.json"))
        config = {
            "tokenizer_class": "LlamaTokenizer" if self._sp else "PreTrainedTokenizerFast",
            "chat_template": self._template_source,
            "add_bos_token": self.add_bos,
            "add_eos_token": False,
            "bos_token": self.token_str(self.bos_token_id)
            if self.bos_token_id is not None
            else None,
            "eos_token": self.token_str(self.eos_token_ids[0]) if self.eos_token_ids else None,
        }
        with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
            json.dump(config, f)

    def hf_directory(self) -> str:
        """An HF tokenizer directory clients can load (/model_info's tokenizer_path): the model's own directory, or
        for a GGUF this tokenizer written once under ~/.cache/tailorkv/tokenizers, named by its content."""
        if self._src.kind == "hf_dir":
            return self._src.path
        digest = hashlib.sha256(
            (self._tk.to_str() + self._template_source + repr(self.eos_token_ids)).encode()
        ).hexdigest()[:16]
        path = os.path.join(TOKENIZER_CACHE, digest)
        if not os.path.isdir(path):
            os.makedirs(TOKENIZER_CACHE, exist_ok=True)
            tmp = tempfile.mkdtemp(dir=TOKENIZER_CACHE)
            self.save_pretrained(tmp)
            try:
                os.rename(
                    tmp, path
                )  # atomic: another process may have written the same one meanwhile
            except OSError:
                shutil.rmtree(tmp)
        return path

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """Render `messages` ([{role, content}]) with the model's own Jinja template (ChatML if it has none)."""
        try:
            return self._template.render(
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                bos_token=self.token_str(self.bos_token_id)
                if self.bos_token_id is not None
                else "",
                eos_token=self.token_str(self.eos_token_ids[0]) if self.eos_token_ids else "",
            )
        except (jinja2.TemplateError, TypeError, KeyError) as e:
            raise InvalidRequestError(
                f"chat template could not render these messages: {e}"
            ) from None
