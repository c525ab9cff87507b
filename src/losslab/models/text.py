"""Text encoders and their tokenizers: a small offline transformer, or Hugging Face models by name.

Every text encoder maps token ids to token features::

    encoder(input_ids (B, L) long, attention_mask (B, L) bool/long) -> tokens (B, L, D)

with ``D = encoder.num_features``; padded positions (``attention_mask == 0``) are ignored by
the fusion layers. Every tokenizer maps captions to those two tensors::

    tokenizer(texts: list[str], max_length: int) -> (input_ids (B, L) long, attention_mask (B, L) long)

Two families, chosen by :func:`create_text_encoder` from a spec dict (``name`` + kwargs):

* ``name: small_transformer`` (offline, the default): :class:`WordPieceTokenizer` trained on the
  dataset's captions with the ``tokenizers`` library, and :class:`SmallTextTransformer` (token and
  position embeddings, ``depth`` pre-norm transformer layers) built from its config.
* any other ``name``: a Hugging Face model id or a local folder (``emilyalsentzer/Bio_ClinicalBERT``,
  ``distilbert-base-uncased``) through ``transformers`` — an optional extra (``pip install
  'losslab[text]'``) imported only here, loaded with ``local_files_only=True`` (nothing is
  downloaded at run time).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

__all__ = [
    "HFTextEncoder",
    "HFTokenizer",
    "SmallTextTransformer",
    "WordPieceTokenizer",
    "create_text_encoder",
]

SMALL_TRANSFORMER = "small_transformer"
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]")


class WordPieceTokenizer:
    """A lower-casing WordPiece tokenizer learnt from captions (``tokenizers`` library), picklable.

    The vocabulary is deterministic: the ``vocab_size`` budget goes to the special tokens, every
    character seen (alone and as a ``##`` continuation) and then the most frequent whole words
    (frequency ≥ ``min_frequency``; ties alphabetical), so unseen words split into characters.

    ``[CLS] tokens… [SEP]`` then ``[PAD]`` (id 0) up to ``max_length``; longer captions are truncated.

    Args:
        tokenizer_json: a serialised ``tokenizers.Tokenizer`` (from :meth:`train` or :meth:`to_str`).

    >>> tok = WordPieceTokenizer.train(["CT of the chest.", "MRI of the brain."], vocab_size=60)
    >>> ids, mask = tok(["CT of the brain."], max_length=8)
    >>> ids.shape, int(mask.sum())
    (torch.Size([1, 8]), 7)
    """

    def __init__(self, tokenizer_json: str) -> None:
        self._json = tokenizer_json
        self._tokenizer = _tokenizers().Tokenizer.from_str(tokenizer_json)

    @classmethod
    def train(cls, texts: Sequence[str], vocab_size: int = 1000, min_frequency: int = 1) -> "WordPieceTokenizer":
        """Train on ``texts`` (the training captions). Raises ``ValueError`` on an empty corpus."""
        texts = [t for t in texts if isinstance(t, str) and t.strip()]
        if not texts:
            raise ValueError("WordPieceTokenizer.train: no non-empty caption to learn a vocabulary from")
        tk = _tokenizers()
        normalizer = tk.normalizers.BertNormalizer(lowercase=True)
        pre_tokenizer = tk.pre_tokenizers.BertPreTokenizer()
        # A deterministic WordPiece vocabulary: the most frequent whole words (ties alphabetical), then
        # every character seen, alone and as a "##" continuation, so any word splits into known pieces.
        # (The `tokenizers` WordPiece trainer breaks ties in hash order, which changes between processes.)
        counts: dict[str, int] = {}
        for text in texts:
            for word, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text)):
                counts[word] = counts.get(word, 0) + 1
        chars = sorted({c for word in counts for c in word})
        pieces = [*chars, *(f"##{c}" for c in chars)]
        budget = max(int(vocab_size) - len(SPECIAL_TOKENS) - len(pieces), 0)
        words = [w for w, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
                 if n >= int(min_frequency) and len(w) > 1][:budget]
        tokens = list(dict.fromkeys([*SPECIAL_TOKENS, *pieces, *words]))
        tokenizer = tk.Tokenizer(tk.models.WordPiece(vocab={t: i for i, t in enumerate(tokens)}, unk_token="[UNK]",
                                                     continuing_subword_prefix="##"))
        tokenizer.normalizer = normalizer
        tokenizer.pre_tokenizer = pre_tokenizer
        tokenizer.decoder = tk.decoders.WordPiece()
        cls_id, sep_id = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
        tokenizer.post_processor = tk.processors.TemplateProcessing(
            single="[CLS] $A [SEP]", special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)])
        return cls(tokenizer.to_str())

    @property
    def vocab_size(self) -> int:
        return self._tokenizer.get_vocab_size()

    def to_str(self) -> str:
        return self._json

    def __call__(self, texts: Sequence[str], max_length: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
        tok = self._tokenizer
        tok.enable_truncation(max_length=int(max_length))
        tok.enable_padding(length=int(max_length), pad_id=0, pad_token="[PAD]")
        encodings = tok.encode_batch([str(t) for t in texts])
        ids = torch.tensor([e.ids for e in encodings], dtype=torch.long)
        mask = torch.tensor([e.attention_mask for e in encodings], dtype=torch.long)
        return ids, mask

    def __getstate__(self) -> dict[str, Any]:
        return {"_json": self._json}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["_json"])


def _tokenizers():
    try:
        import tokenizers
        import tokenizers.decoders
        import tokenizers.models
        import tokenizers.normalizers
        import tokenizers.pre_tokenizers
        import tokenizers.processors
        import tokenizers.trainers
    except ImportError as exc:  # pragma: no cover - tokenizers ships with the venv
        raise ImportError("the small_transformer text encoder needs the `tokenizers` package "
                          "(pip install tokenizers)") from exc
    return tokenizers


class SmallTextTransformer(nn.Module):
    """A small transformer text encoder built from a config (no pretrained weights).

    ``tokens = LayerNorm(TransformerEncoder(E_tok[ids] + E_pos[0..L)))``; padded positions are masked
    out of self-attention.

    Args:
        vocab_size: tokenizer vocabulary size, ≥ 1.
        dim: D (``num_features``), default 64. depth: layers, default 2. num_heads: default 4
            (must divide ``dim``). max_length: longest sequence L, default 64. dropout: default 0.1.

    Raises:
        ValueError: ``dim`` not divisible by ``num_heads`` or a non-positive size.
    """

    def __init__(self, vocab_size: int, dim: int = 64, depth: int = 2, num_heads: int = 4, max_length: int = 64,
                 dropout: float = 0.1) -> None:
        super().__init__()
        for name, value in (("vocab_size", vocab_size), ("dim", dim), ("depth", depth), ("num_heads", num_heads),
                            ("max_length", max_length)):
            if int(value) < 1:
                raise ValueError(f"SmallTextTransformer: {name} must be >= 1, got {value}")
        if dim % num_heads:
            raise ValueError(f"SmallTextTransformer: dim ({dim}) must be divisible by num_heads ({num_heads})")
        self.num_features = int(dim)
        self.max_length = int(max_length)
        self.token_embed = nn.Embedding(int(vocab_size), dim, padding_idx=0)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.max_length, dim))
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        layer = nn.TransformerEncoderLayer(dim, num_heads, dim_feedforward=4 * dim, dropout=dropout,
                                           batch_first=True, norm_first=True, activation="gelu")
        self.encoder = nn.TransformerEncoder(layer, num_layers=int(depth), enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``input_ids (B, L)``, ``attention_mask (B, L)`` -> tokens ``(B, L, D)``."""
        length = input_ids.shape[1]
        if length > self.max_length:
            raise ValueError(f"SmallTextTransformer: sequence length {length} > max_length {self.max_length}")
        x = self.token_embed(input_ids) + self.pos_embed[:, :length]
        padding = None if attention_mask is None else attention_mask == 0
        return self.norm(self.encoder(x, src_key_padding_mask=padding))


def _transformers(name: str):
    try:
        import transformers
    except ImportError as exc:
        raise ImportError(
            f"text encoder {name!r} is a Hugging Face model and needs the optional dependency `transformers` "
            f"(pip install 'losslab[text]'); without it use text.name={SMALL_TRANSFORMER!r} (offline)") from exc
    return transformers


class HFTokenizer:
    """A Hugging Face ``AutoTokenizer`` (local files only) with the :class:`WordPieceTokenizer` call."""

    def __init__(self, name_or_path: str) -> None:
        self.name_or_path = name_or_path
        self._tokenizer = _load_hf(name_or_path, "AutoTokenizer")

    @property
    def vocab_size(self) -> int:
        return int(self._tokenizer.vocab_size)

    def __call__(self, texts: Sequence[str], max_length: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
        enc = self._tokenizer([str(t) for t in texts], padding="max_length", truncation=True,
                              max_length=int(max_length), return_tensors="pt")
        return enc["input_ids"].long(), enc["attention_mask"].long()


class HFTextEncoder(nn.Module):
    """A Hugging Face encoder (``AutoModel``) returning ``last_hidden_state (B, L, D)``."""

    def __init__(self, name_or_path: str) -> None:
        super().__init__()
        self.name_or_path = name_or_path
        self.model = _load_hf(name_or_path, "AutoModel")
        self.num_features = int(self.model.config.hidden_size)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


def _load_hf(name_or_path: str, cls_name: str):
    transformers = _transformers(name_or_path)
    try:
        return getattr(transformers, cls_name).from_pretrained(name_or_path, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise RuntimeError(
            f"text encoder {name_or_path!r}: no local copy (nothing is downloaded at run time); pass a local "
            f"folder as text.name or use text.name={SMALL_TRANSFORMER!r}. Cause: {exc}") from exc


def create_text_encoder(spec: dict[str, Any] | None, texts: Sequence[str] | None = None,
                        tokenizer: Any | None = None) -> tuple[nn.Module, Any]:
    """Build ``(encoder, tokenizer)`` from a spec dict.

    Args:
        spec: ``{name: small_transformer, dim, depth, num_heads, max_length, dropout, vocab_size}``
            (defaults 64, 2, 4, 64, 0.1, 1000), or ``{name: <HF id or local folder>}``.
            ``None`` means ``{name: small_transformer}``.
        texts: captions to train the WordPiece vocabulary on (``small_transformer`` only).
        tokenizer: an existing tokenizer to reuse instead of training one.

    Raises:
        ValueError: ``small_transformer`` with neither ``texts`` nor ``tokenizer``; unknown keys.
        ImportError: a Hugging Face name without ``transformers`` installed (says how to install it).
    """
    spec = dict(spec or {})
    name = str(spec.pop("name", SMALL_TRANSFORMER))
    if name != SMALL_TRANSFORMER:
        spec.pop("max_length", None)  # a tokenizer setting, kept by the model
        if spec:
            raise ValueError(f"text encoder {name!r}: unexpected keys {sorted(spec)} (a Hugging Face encoder "
                             f"takes only name)")
        return HFTextEncoder(name), tokenizer or HFTokenizer(name)
    vocab_size = int(spec.pop("vocab_size", 1000))
    allowed = {"dim", "depth", "num_heads", "max_length", "dropout"}
    unknown = sorted(set(spec) - allowed)
    if unknown:
        raise ValueError(f"text encoder {SMALL_TRANSFORMER!r}: unknown keys {unknown}; accepted: "
                         f"name, vocab_size, {', '.join(sorted(allowed))}")
    if tokenizer is None:
        if not texts:
            raise ValueError(f"text encoder {SMALL_TRANSFORMER!r} trains its WordPiece vocabulary on the captions: "
                             f"pass texts (the training captions) or an existing tokenizer")
        tokenizer = WordPieceTokenizer.train(texts, vocab_size=vocab_size)
    return SmallTextTransformer(tokenizer.vocab_size, **spec), tokenizer
