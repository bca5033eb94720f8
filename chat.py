"""A conversation with a base model and an Aligner, in the chat template the Aligner was trained with:
each line of standard input is your turn; /reset starts over, /quit (or /exit, or Ctrl-D) ends.

    python train.py --data chats.jsonl --template chat --out chat.pt   # an Aligner in the chat template
    python chat.py --adapter chat.pt                                   # then talk with it
    python chat.py --no-adapter                      # the base alone, in the model's own template

The answer streams as generate.py streams one (the same `answer`, the same sampling flags), with the
whole conversation rendered through the template at every turn. When the conversation and room for an
answer no longer fit the context, the oldest exchanges are dropped with a note; a message longer than
the context alone is refused with a note and the conversation goes on (support/chat.py).
Read next: docs/chat.md (templates, multi-turn data, what was measured).
"""
import sys
from dataclasses import dataclass
from functools import partial

from generate import GenerateConfig, Sampling, answer, compiled
from support.adapter_file import load_for_generation
from support.chat import converse
from support.errors import UserError
from support.flags import Runtime, check_flags, flag, path_text, run_command


@dataclass
class ChatConfig:
    """With whom to talk (--help lists these first)."""
    adapter: str = flag(None, "an Aligner file trained with --template chat", path_text)
    model: str = flag(None, "converted base model directory (default: the adapter's own base)", path_text)
    no_adapter: bool = flag(False, "talk with the base model alone, in its own chat template")

    def __post_init__(self):
        check_flags(self)
        if bool(self.adapter) == self.no_adapter:
            raise UserError("name one --adapter to talk with, or give --no-adapter for the base alone")


def talk(cfg: ChatConfig, sampling: Sampling, runtime: Runtime):
    if sys.stdin is None:
        raise UserError("standard input is closed: chat.py reads your turns from it, one a line")
    asked = GenerateConfig(adapter=[cfg.adapter] if cfg.adapter else None, model=cfg.model,
                           no_adapter=cfg.no_adapter, template=None if cfg.adapter else "chat")
    model, tok, columns = load_for_generation(asked, runtime)
    col = columns[-1]  # the adapter's, or the base's
    if col.chat is None:
        raise UserError(f"{cfg.adapter} was trained with the {col.template} template, and chat.py talks in "
                        f"a chat template: train one with --template chat")
    reply = partial(answer, model, tok, aligner=col.aligner, sampling=sampling, stream=sys.stdout,
                    forward=compiled(model, runtime), eos_id=col.eos_id)  # reply(ids): the answer, streamed
    converse(col.chat, reply, model.args.max_seq_len, sampling.max_new_tokens)


def main(argv=None):
    run_command(talk, argv, __doc__, ChatConfig, Sampling, Runtime.for_decoding())


if __name__ == "__main__":
    main()
