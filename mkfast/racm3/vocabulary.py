"""One CM3 vocabulary: specials, then text BPE, then image codes (RA-CM3 "Documents").

Id layout (contiguous, so a generator's embedding table covers it with one size):

    [0, num_specials)                         specials (<pad>, </doc>, <img alt=, ...)
    [text_offset, text_offset + text_size)    the Hugging Face ``tokenizers`` BPE
    [image_offset, image_offset + codebook)   VQ image codes, code c -> image_offset + c

The text tokenizer is byte-level BPE, so every string encodes without <unk> and
decodes back exactly. When none is given it is trained on the corpus.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch

PAD = "<pad>"
DOCUMENT_SEPARATOR = "</doc>"
IMAGE_OPEN = "<img alt="
IMAGE_SOURCE = " src="
IMAGE_CLOSE = ">"
INFILL = "<infill>"
# CM3 draws the number of masked spans from a truncated Poisson; 8 sentinels cover
# every draw we make (mean 1, capped in documents.py at MAX_SPANS).
NUM_MASK_SENTINELS = 8
# Byte-level BPE: 256 byte symbols + a few merges learned from the corpus. 512
# leaves room for a few hundred merges, plenty for caption corpora of the demo's size.
DEFAULT_TEXT_VOCABULARY_SIZE = 512

# Parts of a formatted document, carried along token ids so losses can be split.
PART_STRUCTURE = 0
PART_TEXT = 1
PART_IMAGE = 2


def mask_sentinel(index: int) -> str:
    return f"<mask:{index}>"


SPECIAL_TOKENS = (PAD, DOCUMENT_SEPARATOR, IMAGE_OPEN, IMAGE_SOURCE, IMAGE_CLOSE, INFILL) + tuple(
    mask_sentinel(index) for index in range(NUM_MASK_SENTINELS)
)


def train_text_tokenizer(corpus: list[str], vocabulary_size: int = DEFAULT_TEXT_VOCABULARY_SIZE):
    """A byte-level BPE ``tokenizers.Tokenizer`` trained on ``corpus`` (list of strings)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocabulary_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus, trainer=trainer)
    return tokenizer


@dataclass
class CM3Vocabulary:
    """Maps text and image codes into one id space; see the module docstring for the layout."""

    text_tokenizer: object  # tokenizers.Tokenizer
    image_codebook_size: int

    def __post_init__(self) -> None:
        self.special_ids = {token: index for index, token in enumerate(SPECIAL_TOKENS)}
        self.text_offset = len(SPECIAL_TOKENS)
        self.text_size = self.text_tokenizer.get_vocab_size()
        self.image_offset = self.text_offset + self.text_size

    @classmethod
    def from_corpus(cls, corpus: list[str], image_codebook_size: int,
                    text_vocabulary_size: int = DEFAULT_TEXT_VOCABULARY_SIZE) -> CM3Vocabulary:
        return cls(train_text_tokenizer(corpus, text_vocabulary_size), image_codebook_size)

    def __len__(self) -> int:
        return self.image_offset + self.image_codebook_size

    @property
    def pad_id(self) -> int:
        return self.special_ids[PAD]

    @property
    def separator_id(self) -> int:
        return self.special_ids[DOCUMENT_SEPARATOR]

    @property
    def infill_id(self) -> int:
        return self.special_ids[INFILL]

    def mask_id(self, index: int) -> int:
        if not 0 <= index < NUM_MASK_SENTINELS:
            raise ValueError(f"mask sentinel index must be in [0, {NUM_MASK_SENTINELS}), got {index}")
        return self.special_ids[mask_sentinel(index)]

    def is_sentinel(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Bool mask of <mask:k> and <infill> ids (the tokens that carry no loss)."""
        first_mask = self.mask_id(0)
        return ((token_ids >= first_mask) & (token_ids < first_mask + NUM_MASK_SENTINELS)) | (
            token_ids == self.infill_id
        )

    def encode_text(self, text: str) -> list[int]:
        return [self.text_offset + token for token in self.text_tokenizer.encode(text).ids]

    def decode_text(self, token_ids: list[int]) -> str:
        text_ids = [token - self.text_offset for token in token_ids
                    if self.text_offset <= token < self.image_offset]
        return self.text_tokenizer.decode(text_ids)

    def encode_image(self, codes: torch.Tensor) -> list[int]:
        """codes: (h, w) or (h*w,) int VQ indices -> vocabulary ids, raster order."""
        flat = codes.reshape(-1).tolist()
        if flat and not (min(flat) >= 0 and max(flat) < self.image_codebook_size):
            raise ValueError(f"image codes must be in [0, {self.image_codebook_size}), "
                             f"got range [{min(flat)}, {max(flat)}]")
        return [self.image_offset + code for code in flat]

    def decode_image(self, token_ids: list[int]) -> torch.Tensor:
        """Vocabulary ids -> (n,) int64 VQ codes (non-image ids dropped)."""
        return torch.tensor([token - self.image_offset for token in token_ids if token >= self.image_offset],
                            dtype=torch.int64)

    def to_json(self) -> str:
        return json.dumps({"text_tokenizer": self.text_tokenizer.to_str(),
                           "image_codebook_size": self.image_codebook_size})

    @classmethod
    def from_json(cls, text: str) -> CM3Vocabulary:
        from tokenizers import Tokenizer

        payload = json.loads(text)
        return cls(Tokenizer.from_str(payload["text_tokenizer"]), payload["image_codebook_size"])
