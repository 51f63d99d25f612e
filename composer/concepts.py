"""Which concept each region carries, and which of its prompt's tokens the method reads.

Concept enhancement (L_ce, L_fill, method.md §7) and the latent re-initialisation (§9) read the cross-attention
maps of a region's *concept tokens*. The paper's concepts are Mix-of-Show ED-LoRAs whose pseudo-words are those
tokens; here every region gets them, in this order of precedence:

1. ``explicit``: ``regions[].tokens``, words or phrases of the region prompt; each maps to all of its BPE token
   positions (a word may be several tokens, every occurrence counts); a word not in the prompt is an error;
2. ``pseudo-words``: an ED-LoRA concept's pseudo-words (``<name1> <name2>``), matched as whole tokens;
3. ``trigger``: a kohya / LyCORIS / PEFT concept's trigger words, when its file records them
   (``modelspec.trigger_phrase``, a ``trigger``/``activation text`` field, or kohya's ``ss_tag_frequency``) and
   the region prompt contains them;
4. ``content``: otherwise the region prompt's content words (no BOS/EOS/padding, punctuation, digits or stop
   words), with a warning naming them and how to choose others.
A region with no LoRA at all (a box and a prompt) gets the full method too: injection with the base K/V over its
prompt, isolation, enhancement on its tokens, re-initialisation.

Concept binding: a region's ``lora`` names its concept; otherwise the LoRA whose pseudo-words (or, for the
globally given ``loras``, trigger words) appear in its prompt; otherwise none.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass

log = logging.getLogger(__name__)

PSEUDO_WORD = re.compile(r"<[^<>\s]+>")
# Function words and the quality tags of SD prompts: never concept tokens by default.
STOP_WORDS = frozenset("""
a an the of and or but in on at to for with by from into onto over under near beside behind between above below
is are be this that these those its it his her their there here some one two three very
photo picture image shot view detailed detail high quality best resolution hd uhd realistic masterpiece
""".split())


@dataclass
class RegionTokens:
    positions: list   # sequence positions in the tokenised (77-token, BOS first) region prompt
    words: list       # the token strings at those positions, for info and debug output
    source: str       # "explicit" | "pseudo-words" | "trigger" | "content" | "none"
    phrases: list     # what was matched (the words/phrases, pseudo-words or trigger words)

    def record(self) -> dict:
        return {"tokens": self.phrases, "positions": self.positions, "source": self.source}


def _encode(tokenizer, prompt: str):
    """BPE encoding of a prompt with character offsets, truncated as the 77-token frame truncates it."""
    enc = tokenizer.tok.encode(prompt, add_special_tokens=False)
    n = min(len(enc.ids), 75)
    return enc.ids[:n], enc.offsets[:n], enc.tokens[:n]


def _positions_of_phrase(prompt: str, phrase: str, offsets) -> list:
    """Sequence positions (BOS = 0) of every token overlapping an occurrence of ``phrase`` (case-insensitive,
    on word boundaries)."""
    pat = re.compile(r"(?<![\w<])" + re.escape(phrase.strip()) + r"(?![\w>])", re.IGNORECASE)
    out = []
    for m in pat.finditer(prompt):
        out += [i + 1 for i, (s, e) in enumerate(offsets) if s < m.end() and e > m.start()]
    return out


def select_tokens(tokenizer, prompt: str, *, explicit=None, pseudo_words=(), triggers=(), where="region") \
        -> RegionTokens:
    """The concept tokens of one region (see the module docstring for the rules)."""
    ids, offsets, toks = _encode(tokenizer, prompt)

    def result(pos, source, phrases):
        pos = sorted(dict.fromkeys(pos))
        return RegionTokens(pos, [toks[p - 1] for p in pos], source, list(phrases))

    if explicit:
        pos = []
        for phrase in explicit:
            hit = _positions_of_phrase(prompt, phrase, offsets)
            if not hit:
                raise ValueError(f"{where}: token {phrase!r} is not in its prompt {prompt!r} (or lies past the "
                                 "75-token limit); 'tokens' must be words or phrases of the region prompt")
            pos += hit
        return result(pos, "explicit", explicit)
    if pseudo_words:
        want = {tokenizer.tok.token_to_id(w) for w in pseudo_words}
        pos = [i + 1 for i, t in enumerate(ids) if t in want]
        if pos:
            return result(pos, "pseudo-words", [w for w in pseudo_words if tokenizer.tok.token_to_id(w) in ids])
    if triggers:
        found = [t for t in triggers if _positions_of_phrase(prompt, t, offsets)]
        if found:
            return result([p for t in found for p in _positions_of_phrase(prompt, t, offsets)], "trigger", found)
    words = []
    for i, (s, e) in enumerate(offsets):
        w = prompt[s:e].lower()
        if re.fullmatch(r"[^\W\d_]{2,}", w) and w not in STOP_WORDS:
            words.append((i + 1, w))
    if not words:
        return RegionTokens([], [], "none", [])
    chosen = list(dict.fromkeys(w for _, w in words))
    why = ("its LoRA records no trigger word found in the prompt" if triggers or pseudo_words else
           "it has no concept LoRA with pseudo-words or trigger words")
    log.warning("%s: %s, so the method reads its content words %s; give \"tokens\": [...] in the region to choose "
                "others", where, why, chosen)
    return result([p for p, _ in words], "content", chosen)


def bind_concept(pipe, region, i: int, global_loras: list) -> str | None:
    """The LoRA (loaded adapter name) that region i carries: its own ``lora``, else the one whose pseudo-words, or
    for globally given LoRAs (``global_loras``: adapter names) whose trigger words, its prompt names."""
    words = PSEUDO_WORD.findall(region.prompt)
    owners = sorted({pipe.loras.concepts[w][0] for w in words if w in pipe.loras.concepts})
    if len(owners) > 1:
        raise ValueError(f"region {i}: its prompt names pseudo-words of several concepts {owners}; "
                         "give the region's 'lora' explicitly")
    if owners:
        return owners[0]
    hits = []
    for name in global_loras:
        lora = pipe.loras.loras[name]
        if not lora.embeddings and any(_positions_of_phrase(region.prompt, t, _encode(pipe.tokenizer, region.prompt)[1])
                                       for t in lora.triggers):
            hits.append(name)
    if len(hits) > 1:
        raise ValueError(f"region {i}: its prompt holds the trigger words of several LoRAs "
                         f"{[pipe.loras.loras[h].path for h in hits]}; give the region's 'lora' explicitly")
    return hits[0] if hits else None
