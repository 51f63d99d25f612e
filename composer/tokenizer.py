"""SD1.5's CLIP BPE tokenizer on the ``tokenizers`` library (formats.md §4).

49408 ids: 256 byte symbols, the same with ``</w>``, one per merge, then BOS 49406 and EOS 49407.
Framing: ``[BOS] + ids[:75] + [EOS]``, padded with EOS to 77, no attention mask. Normalisation is
HF-fast's (NFC, collapse whitespace, lowercase; no ftfy). Loads from a diffusers ``tokenizer/`` folder
(vocab.json + merges.txt), a ``tokenizer.json``, or open_clip's ``bpe_simple_vocab_16e6.txt.gz``; with no
files given, from the copy of that BPE file shipped in the package (``composer/data/clip/``, MIT, from
OpenAI's CLIP as distributed by open_clip), so single-file checkpoints need no tokenizer argument.
Pseudo-words (``<name1>``) are added as whole tokens so the pre-tokenizer never splits them.
"""
from __future__ import annotations

import functools
import gzip
import json
import logging
import os
import pathlib

import torch
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

log = logging.getLogger(__name__)

BOS, EOS, MAX_LEN = 49406, 49407, 77
PACKAGED_BPE = pathlib.Path(__file__).resolve().parent / "data" / "clip" / "bpe_simple_vocab_16e6.txt.gz"
_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


def bytes_to_unicode() -> dict:
    """CLIP/GPT-2 reversible byte -> printable-unicode map (printables first, the rest from U+0100)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _vocab_from_bpe_gz(path: str):
    """Rebuild (vocab, merges) from the raw merges file: lines 1..48894 are the merges (formats.md §4)."""
    n = 49152 - 256 - 2  # merges used by CLIP; the file holds many more that are never read
    with gzip.open(path, "rt", encoding="utf-8") as f:
        f.readline()  # header
        merges = [tuple(f.readline().split()) for _ in range(n)]
    symbols = list(bytes_to_unicode().values())
    words = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    return {w: i for i, w in enumerate(words)}, merges


@functools.lru_cache(maxsize=1)
def _packaged_vocab():
    if not PACKAGED_BPE.exists():
        raise FileNotFoundError(f"the packaged CLIP vocabulary is missing ({PACKAGED_BPE}): a broken install? "
                                "Reinstall composer, or pass --tokenizer PATH")
    return _vocab_from_bpe_gz(str(PACKAGED_BPE))


def _read_merges_txt(path: str):
    with open(path, encoding="utf-8") as f:
        lines = f.read().split("\n")
    start = 1 if lines and lines[0].startswith("#version") else 0
    return [tuple(l.split()) for l in lines[start:] if l.strip()]


def _build(vocab: dict, merges: list) -> Tokenizer:
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, continuing_subword_prefix="", end_of_word_suffix="</w>",
                               unk_token="<|endoftext|>", fuse_unk=False))
    tok.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "),
                                           normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_PATTERN), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<|startoftext|>", "<|endoftext|>"])
    return tok


class CLIPTokenizer:
    def __init__(self, tok: Tokenizer, source: str = "?"):
        self.tok = tok
        self.source = source
        for name, want in (("<|startoftext|>", BOS), ("<|endoftext|>", EOS)):
            got = tok.token_to_id(name)
            if got != want:
                raise ValueError(f"{source}: {name} has id {got}, expected {want}: not SD1.5's CLIP vocabulary")
        # No post-processor/padding on the inner tokenizer: framing is done here, with a truncation warning.
        tok.post_processor = None
        tok.no_padding()
        tok.no_truncation()

    @classmethod
    def default(cls) -> "CLIPTokenizer":
        """SD1.x's tokenizer (openai/clip-vit-large-patch14) from the BPE file shipped in the package. Each call
        returns a fresh tokenizer (pseudo-words added to one never leak into another); the parsed file is cached."""
        vocab, merges = _packaged_vocab()
        return cls(_build(vocab, merges), "packaged SD1 CLIP vocabulary")

    @classmethod
    def from_file(cls, path: str) -> "CLIPTokenizer":
        """A folder (vocab.json + merges.txt, or tokenizer.json), a tokenizer.json, or the BPE .txt.gz file."""
        path = os.fspath(path)
        if not os.path.exists(path):
            raise FileNotFoundError(f"tokenizer path not found: {path}")
        if os.path.isdir(path):
            if os.path.isdir(os.path.join(path, "tokenizer")):
                path = os.path.join(path, "tokenizer")
            v, m, j = (os.path.join(path, n) for n in ("vocab.json", "merges.txt", "tokenizer.json"))
            if os.path.exists(v) and os.path.exists(m):
                with open(v, encoding="utf-8") as f:
                    return cls(_build(json.load(f), _read_merges_txt(m)), path)
            if os.path.exists(j):
                path = j
            else:
                raise FileNotFoundError(f"{path}: no vocab.json + merges.txt or tokenizer.json in this folder")
        if path.endswith(".gz"):
            return cls(_build(*_vocab_from_bpe_gz(path)), path)
        if path.endswith(".json"):
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
            m = data.get("model", {})
            if m.get("type") != "BPE":
                raise ValueError(f"{path}: not a BPE tokenizer.json (model type {m.get('type')!r})")
            merges = [tuple(x.split()) if isinstance(x, str) else tuple(x) for x in m["merges"]]
            return cls(_build(m["vocab"], merges), path)
        raise ValueError(f"{path}: unknown tokenizer format (expected a folder, tokenizer.json or bpe_*.txt.gz)")

    def __len__(self):
        return self.tok.get_vocab_size(with_added_tokens=True)

    def add_tokens(self, words: list[str]) -> list[int]:
        """Add whole-word tokens (ED-LoRA pseudo-words); returns their ids (existing ones are reused)."""
        self.tok.add_tokens(list(words))
        return [self.tok.token_to_id(w) for w in words]

    def encode_raw(self, text: str) -> list[int]:
        """BPE ids without BOS/EOS or truncation."""
        return self.tok.encode(text, add_special_tokens=False).ids

    def __call__(self, prompts, warn: bool = True) -> torch.Tensor:
        """list of prompts -> LongTensor [B, 77]: BOS, up to 75 tokens, EOS, EOS padding."""
        if isinstance(prompts, str):
            prompts = [prompts]
        if len(prompts) == 0:
            raise ValueError("empty prompt list: give at least one prompt")
        out = torch.full((len(prompts), MAX_LEN), EOS, dtype=torch.long)
        for i, p in enumerate(prompts):
            if not isinstance(p, str):
                raise TypeError(f"prompt {i} is {type(p).__name__}, expected str")
            ids = self.encode_raw(p)
            if len(ids) > MAX_LEN - 2:
                if warn:
                    log.warning("prompt %d is %d tokens long; the last %d tokens were dropped (limit 75): %r",
                                i, len(ids), len(ids) - (MAX_LEN - 2), p[:60])
                ids = ids[: MAX_LEN - 2]
            out[i, 0] = BOS
            out[i, 1: 1 + len(ids)] = torch.tensor(ids, dtype=torch.long)
        return out

    def save(self, folder: str):
        """Write vocab.json + merges.txt (diffusers ``tokenizer/`` layout)."""
        os.makedirs(folder, exist_ok=True)
        data = json.loads(self.tok.to_str())
        vocab, merges = data["model"]["vocab"], data["model"]["merges"]
        with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as f:
            json.dump(vocab, f, ensure_ascii=False)
        with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
            f.write("#version: 0.2\n")
            for m in merges:
                f.write((m if isinstance(m, str) else " ".join(m)) + "\n")
