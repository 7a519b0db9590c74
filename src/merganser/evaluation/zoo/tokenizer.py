"""A character-level tokenizer, saved as a real ``tokenizer.json`` (tokenizers library)."""

from __future__ import annotations

import json
from pathlib import Path

from merganser.evaluation.zoo.tasks import ALL_TASKS, DIGITS, LETTERS

SPECIALS = ["<pad>", "<bos>", "<eos>", "<unk>"]
PAD, BOS, EOS, UNK = range(4)


def vocabulary() -> list[str]:
    tags = sorted({t.tag for t in ALL_TASKS.values()})
    return SPECIALS + list(LETTERS) + list(DIGITS) + tags + [":", "=", "+"]


class CharTokenizer:
    """Maps characters to ids; ``save`` writes files that ``AutoTokenizer`` loads."""

    def __init__(self) -> None:
        self.itos = vocabulary()
        self.stoi = {s: i for i, s in enumerate(self.itos)}

    def __len__(self) -> int:
        return len(self.itos)

    def encode(self, text: str) -> list[int]:
        return [self.stoi.get(c, UNK) for c in text]

    def decode(self, ids: list[int]) -> str:
        return "".join(self.itos[i] for i in ids if i >= len(SPECIALS))

    def save(self, folder: Path) -> None:
        from tokenizers import Regex, Tokenizer, models, pre_tokenizers

        tok = Tokenizer(models.WordLevel(vocab=self.stoi, unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
        tok.add_special_tokens(SPECIALS)
        tok.save(str(folder / "tokenizer.json"))
        (folder / "tokenizer_config.json").write_text(
            json.dumps(
                {
                    "tokenizer_class": "PreTrainedTokenizerFast",
                    "pad_token": "<pad>",
                    "bos_token": "<bos>",
                    "eos_token": "<eos>",
                    "unk_token": "<unk>",
                    "model_max_length": 64,
                },
                indent=2,
            )
        )
        (folder / "special_tokens_map.json").write_text(
            json.dumps(
                {
                    "pad_token": "<pad>",
                    "bos_token": "<bos>",
                    "eos_token": "<eos>",
                    "unk_token": "<unk>",
                },
                indent=2,
            )
        )
