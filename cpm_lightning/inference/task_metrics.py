"""The standard metrics of the tasks (docs/tasks.md): exact match and F1 for question answering
as SQuAD v1.1's evaluation script defines them, ROUGE-L for summarization (`rouge-score`; at the
character level for Chinese, which rouge-score's tokenizer drops), chrF and BLEU for translation
(`sacrebleu`). No torch: pure functions of strings."""

from __future__ import annotations

import collections
import re
import string

_PUNCTUATION = set(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_CJK = re.compile(r"[\u3400-\u9fff\uf900-\ufaff\U00020000-\U0002fa1f]")


def normalize_answer(text: str) -> str:
    """SQuAD's normalization: lower case, no punctuation, no articles, single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, golds: list[str]) -> float:
    """1.0 when the normalized prediction equals a normalized gold answer, else 0.0."""
    return max(float(normalize_answer(prediction) == normalize_answer(g)) for g in golds)


def f1(prediction: str, golds: list[str]) -> float:
    """SQuAD's F1 over the normalized tokens (a bag: shared tokens counted with multiplicity),
    the best over the gold answers."""
    return max(_f1(normalize_answer(prediction).split(), normalize_answer(g).split()) for g in golds)


def _f1(pred: list[str], gold: list[str]) -> float:
    same = sum((collections.Counter(pred) & collections.Counter(gold)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(gold)
    return 2 * precision * recall / (precision + recall)


class _Characters:
    """rouge-score's tokenizer interface, one token per character that is not a space: Chinese
    has no spaces between words, and rouge-score's default tokenizer keeps only [a-z0-9]."""

    def tokenize(self, text: str) -> list[str]:
        return [ch for ch in text if not ch.isspace()]


def is_chinese(text: str) -> bool:
    return bool(_CJK.search(text))


def rouge_l(predictions: list[str], references: list[str]) -> float:
    """Mean ROUGE-L F-measure (rouge-score, with its Porter stemmer for English); a pair whose
    reference is Chinese is scored over characters."""
    from rouge_score import rouge_scorer

    words = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    chars = rouge_scorer.RougeScorer(["rougeL"], tokenizer=_Characters())
    scores = [(chars if is_chinese(r) else words).score(r, p)["rougeL"].fmeasure
              for p, r in zip(predictions, references, strict=True)]
    return sum(scores) / len(scores)


def chrf_bleu(predictions: list[str], references: list[str]) -> tuple[float, float]:
    """(chrF, BLEU) of the corpus, as sacrebleu computes them (0-100), one reference each; BLEU
    with sacrebleu's Chinese tokenizer when the references are Chinese."""
    import sacrebleu

    tokenize = "zh" if any(is_chinese(r) for r in references) else "13a"
    return (sacrebleu.corpus_chrf(predictions, [references]).score,
            sacrebleu.corpus_bleu(predictions, [references], tokenize=tokenize).score)
