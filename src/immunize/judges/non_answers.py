"""Many harmless non-answers for the harmfulness judge's counterfactual training pairs.

A judge learns "this answer says nothing harmful" only for answers it has seen: trained with a
couple of dozen non-answers, it still scored unseen ones ("I don't know.", "I'm not sure how to
respond to that.") harmful under offensive prompts, where BeaverTails labels every short reply that
goes along with the prompt ("Me too.", "Okay, whatever you say.") unsafe. These templates give
several hundred refusals, non-answers, deflections, harmless disagreements and degenerate texts in
varied wording. None of them is a probe text (``immunize.judges.leakage.NON_ANSWERS``, test half):
``generated_non_answers`` leaves those out, so the leakage probe still measures unseen answers.
"""

from __future__ import annotations

import itertools
import random

_REFUSAL_OPENERS = ("", "Sorry, ", "I'm sorry, but ", "Unfortunately, ", "I apologize, but ", "I'm afraid ",
                    "As an AI assistant, ", "Honestly, ")
_REFUSAL_CORES = ("I can't help with that", "I cannot do that", "I won't be able to assist with this",
                  "I can't answer this", "that's not something I can help with", "I'm unable to provide that",
                  "I have to decline", "I can't go along with this request", "I must decline to answer",
                  "I'm not going to do that", "I can't support that", "I won't take part in this")
_REFUSAL_CLOSERS = ("", " Is there something else I can help with?", " Let's talk about something else.",
                    " I hope you understand.", " Please ask me something else.", " Maybe I can help another way.")
_UNSURE = ("I don't know", "I'm not sure", "No idea", "I couldn't say", "I really don't know", "Hard to say",
           "I have no clue", "I'm unsure", "I don't have an opinion on that", "I can't tell",
           "I don't have enough information to answer", "I haven't thought about it", "I'm not certain",
           "Beats me", "I wouldn't know", "I'm not the right one to ask")
_UNSURE_ENDS = (".", ", sorry.", ". Can you rephrase?", "...", ". What do you think?", "!", ", to be honest.")
_DEFLECTIONS = (
    "Let's talk about something else.", "Could we change the topic?", "I'd rather talk about something else.",
    "Is there something else you'd like to know?", "Maybe ask a professional about that.",
    "If you're feeling upset, talking to someone you trust can help.", "How is your day going otherwise?",
    "That's an interesting question, but let's move on.", "Let's focus on something more helpful.",
    "Can I help you with anything else today?", "Perhaps we could discuss a different subject.",
    "You might want to speak with a counselor about this.", "Why don't we talk about your plans for the weekend?",
    "I think a break might do you good.", "Let's keep things friendly.", "What else is on your mind?",
    "I'd suggest taking a deep breath first.", "Maybe a friend could give you better advice on this.",
    "If you're struggling, there are people who can help.", "Have you talked to anyone about how you feel?",
    "What made you think of that?", "Tell me more about what's going on.", "Can you say more about that?",
    "Could you explain what you mean?", "What are you hoping to find out?", "That's something to think about.",
    "Interesting. What else?", "I hear you.", "Okay. Anything else?", "That sounds frustrating.",
    "It sounds like you're having a hard day.", "Hmm.", "Let me think about that.", "Good to know.",
)
_DISAGREE_OPENERS = ("I disagree.", "I don't agree.", "I don't think so.", "No, I don't think that's right.",
                     "That's not how I see it.", "I can't agree with that.", "Not really.")
_DISAGREE_REASONS = ("Everyone deserves respect.", "People should be treated fairly.", "That would be harmful.",
                     "That's not fair to others.", "Hurting others is wrong.", "That isn't true.",
                     "Kindness works better.", "Nobody should be treated that way.", "It's better to stay calm.",
                     "Two wrongs don't make a right.", "That could get someone hurt.", "")
_DISAGREE_PLAIN = ("Please be kind to others.", "That's a stereotype, and it's unfair.", "That's not okay.",
                   "It isn't right to mock people.", "Everyone has value.", "Let's not insult anyone.",
                   "Violence won't solve this.", "It's wrong to take what isn't yours.",
                   "People from every group deserve dignity.", "That's not a fair thing to say.")
_WRONGS = ("Cheating", "Lying to people", "Bullying", "Hurting animals", "Violence", "Harassment", "Taking things "
           "that aren't yours", "Spreading rumours", "Revenge", "Threatening someone", "Vandalism", "Discrimination")
_VERDICTS = ("is wrong.", "is harmful.", "is never okay.", "is not the answer.", "hurts people.", "can get you in "
             "serious trouble.", "isn't something I'd encourage.")
_VIRTUES = ("Kindness", "Respect", "Patience", "Empathy", "Fairness", "Talking things through", "Being honest")
_VIRTUE_ENDS = ("matters.", "goes a long way.", "is important.", "usually works best.", "helps everyone.")
_DEGENERATE_WORDS = ("the", "and", "a", "of", "to", "it", "is", "I", "you", "that", "in", "so")
_SPECIAL = ("<|im_start|>", "<|endoftext|>", "</s>", "[INST]", "User:", "Assistant:", "Answer:", "Question:",
            "###", "<pad>")


def _degenerate(rng: random.Random, n: int) -> list[str]:
    out = []
    for _ in range(n):
        style = rng.randrange(5)
        if style == 0:
            out.append(" ".join([rng.choice(_DEGENERATE_WORDS)] * rng.randint(3, 12)))
        elif style == 1:
            out.append(rng.choice(("?", "!", ".", "-", "*", "…")) * rng.randint(2, 10))
        elif style == 2:
            out.append(" ".join(rng.choice(_SPECIAL) for _ in range(rng.randint(1, 4))))
        elif style == 3:
            out.append(" ".join(str(rng.randint(0, 99)) for _ in range(rng.randint(2, 8))))
        else:
            letters = "abcdefghijklmnopqrstuvwxyz"
            out.append(" ".join("".join(rng.choice(letters) for _ in range(rng.randint(2, 7)))
                                for _ in range(rng.randint(1, 5))))
    return out


def generated_non_answers(seed: int = 0) -> list[tuple[str, str]]:
    """(kind, text) pairs, deterministic, none of them a probe text of the leakage test half."""
    from immunize.judges.leakage import non_answers

    rng = random.Random(seed)
    out: list[tuple[str, str]] = []
    for opener, core, closer in itertools.product(_REFUSAL_OPENERS, _REFUSAL_CORES, _REFUSAL_CLOSERS):
        text = f"{opener}{core[0].upper() + core[1:] if not opener else core}.{closer}"
        out.append(("refusal", text))
    out += [("non-answer", f"{core}{end}") for core, end in itertools.product(_UNSURE, _UNSURE_ENDS)]
    out += [("deflection", text) for text in _DEFLECTIONS]
    out += [("disagreement", f"{opener} {reason}".strip())
            for opener, reason in itertools.product(_DISAGREE_OPENERS, _DISAGREE_REASONS)]
    out += [("disagreement", text) for text in _DISAGREE_PLAIN]
    out += [("disagreement", f"{wrong} {verdict}") for wrong, verdict in itertools.product(_WRONGS, _VERDICTS)]
    out += [("disagreement", f"{virtue} {end}") for virtue, end in itertools.product(_VIRTUES, _VIRTUE_ENDS)]
    out += [("degenerate", text) for text in _degenerate(rng, 60)]
    # Neither a probe text nor a close variant of one ("I'm not sure, sorry." of "I'm not sure."):
    # the probe must measure answers the judge has not seen in any wording.
    held_out = [plain_text(text) for _, text in non_answers("test")]
    seen: set[str] = set()
    kept = []
    for kind, text in out:
        key = plain_text(text)
        close = any(key == probe or (len(probe.split()) > 1 and probe in key) for probe in held_out)
        if key and not close and key not in seen:
            seen.add(key)
            kept.append((kind, text))
    return kept


def plain_text(text: str) -> str:
    """Lower case, punctuation dropped, spaces collapsed (apostrophes kept: "don't" stays a word)."""
    return " ".join("".join(c if c.isalnum() or c in "'’ " else " " for c in text.lower()).split())
