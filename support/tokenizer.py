"""The tokenizer of a converted model directory: text <-> ids with sentencepiece (tokenizer.model)
or the `tokenizers` library (tokenizer.json), and the BOS/EOS ids from tokenizer_config.json.

    tok = Tokenizer("checkpoints/smollm2-135m-instruct", vocab_size=49152)  # ids checked against it
    ids = tok.encode("Hello", bos=None, eos=False); text = tok.decode(ids)
    check_tokenizer_json(Path("tokenizer.json"), vocab_size=49152)  # before a converter copies one

Not run on its own. Read next: chat.py.
"""
import re
from pathlib import Path

from support.errors import UserError
from support.inputs import read_json_object


class Tokenizer:
    """encode/decode for a converted model directory: sentencepiece (tokenizer.model) or the
    `tokenizers` library (tokenizer.json), plus tokenizer_config.json with bos_id, eos_id, add_bos."""

    def __init__(self, path, vocab_size=None):
        path, self.vocab_size = Path(path), vocab_size
        config = path / "tokenizer_config.json"
        if not config.is_file():
            raise UserError(f"{config} not found: this model directory has no tokenizer; convert "
                            f"a checkpoint that includes one with convert_weights.py")
        cfg = read_json_object(config)
        self.bos_id, self.eos_id, self.add_bos = cfg.get("bos_id"), cfg.get("eos_id"), cfg.get("add_bos")
        if not all(i is None or type(i) is int and i >= 0 for i in (self.bos_id, self.eos_id)) or \
                type(self.add_bos) is not bool:
            raise UserError(f"{config}: bos_id and eos_id must be token ids (or null), add_bos true or false")
        if vocab_size and any(i is not None and i >= vocab_size for i in (self.bos_id, self.eos_id)):
            raise UserError(f"{config}: bos_id {self.bos_id} or eos_id {self.eos_id} is outside the model's "
                            f"vocabulary of {vocab_size}; convert the checkpoint again")
        try:
            self._encode, self._decode, self._token = self.backend(path)
        except Exception as e:  # both libraries raise plain exceptions on a damaged file
            raise UserError(f"{path}: the tokenizer cannot be read ({type(e).__name__}: {str(e)[:80]}); "
                            f"convert the checkpoint again") from None

    def backend(self, path: Path):
        """(encode, decode, token text) of the tokenizer file in `path`."""
        if (path / "tokenizer.model").is_file():
            import sentencepiece

            sp = sentencepiece.SentencePieceProcessor(model_file=str(path / "tokenizer.model"))
            return self.with_specials(sp.encode, sp.id_to_piece), sp.decode, sp.id_to_piece
        if (path / "tokenizer.json").is_file():
            import tokenizers

            tk = tokenizers.Tokenizer.from_file(str(path / "tokenizer.json"))
            return (lambda text: tk.encode(text, add_special_tokens=False).ids,  # special tokens in text too
                    lambda ids: tk.decode(ids, skip_special_tokens=False), tk.id_to_token)
        raise UserError(f"{path}: neither tokenizer.model nor tokenizer.json is there")

    def with_specials(self, encode, piece):
        """sentencepiece's encode, with BOS and EOS written in the text (as chat templates write
        them, "<s>") read as those tokens, as the `tokenizers` library reads its special tokens."""
        specials = {piece(i): i for i in (self.bos_id, self.eos_id) if i is not None}
        if not specials:
            return encode
        split = re.compile("(" + "|".join(map(re.escape, specials)) + ")")
        return lambda text: [i for part in split.split(text) if part
                             for i in ([specials[part]] if part in specials else encode(part))]

    def token_text(self, i):
        """The text of token id i as the tokenizer spells it ("<|im_end|>"); "" for None."""
        return "" if i is None else self._token(i)

    def encode(self, text: str, bos=None, eos=False) -> list:
        bos = self.add_bos if bos is None else bos
        ids = [self.bos_id] * bos + self._encode(text) + [self.eos_id] * eos
        if self.vocab_size and ids and max(ids) >= self.vocab_size:
            raise UserError(f"the tokenizer gives token id {max(ids)}, outside the model's vocabulary of "
                            f"{self.vocab_size}: this tokenizer does not belong to this model")
        return ids

    def decode(self, ids) -> str:
        return self._decode([i for i in ids if i not in (self.bos_id, self.eos_id)])

    @property
    def pad_id(self) -> int:
        """The id that fills a batch's short rows: EOS where the tokenizer has one (never a label)."""
        return self.eos_id if self.eos_id is not None else 0


def check_tokenizer_json(path: Path, vocab_size: int):
    """A tokenizer.json a LLaMA can use: a JSON object whose model is BPE with a vocabulary and merges
    (not WordPiece, Unigram, ...), every id of it and of its added tokens inside `vocab_size`."""
    d = read_json_object(path)
    model = d.get("model") if isinstance(d.get("model"), dict) else {}
    if model.get("type") != "BPE":
        raise UserError(f"{path}: a {model.get('type', 'typeless')!s} tokenizer, where a LLaMA's is BPE")
    vocab, merges = model.get("vocab"), model.get("merges")
    if not isinstance(vocab, dict) or not vocab or not isinstance(merges, list) or not merges:
        raise UserError(f"{path}: a BPE tokenizer without a vocabulary or without merges")
    added = d.get("added_tokens") if isinstance(d.get("added_tokens"), list) else []
    ids = [*vocab.values(), *(t.get("id") if isinstance(t, dict) else t for t in added)]
    outside = [i for i in ids if type(i) is not int or not 0 <= i < vocab_size]
    if outside:
        raise UserError(f"{path}: token id {outside[0]!r} is outside the model's vocabulary of {vocab_size}")
