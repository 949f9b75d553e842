"""EleutherAI's evaluation harness on a cpm-lightning model:

    lm_eval --model cpm-lightning --model_args pretrained=SRC --tasks hellaswag --device cpu

SRC is a checkpoint written by `fit`, a model directory or a models:/ URI (loader.py). The
log-likelihoods are those `cpm-lightning evaluate` computes (evaluation.loglikelihoods), with the
model's default prompting unless `prompting=causal|cpm-ant` is among the model_args. lm-eval finds
this class through lm_eval_hook.py (docs/ARCHITECTURE.md, "Evaluation").
"""

from __future__ import annotations

from lm_eval.api.model import TemplateLM
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from cpm_lightning.cli.loader import load_model
from cpm_lightning.inference.evaluation import Request, loglikelihoods
from cpm_lightning.inference.generate import continuation, sample


class CPMLightningLM(TemplateLM):
    def __init__(self, pretrained: str, device: str = "cpu", batch_size: int | str = 16, prompting: str | None = None):
        super().__init__()
        if not str(batch_size).isdigit() or int(batch_size) < 1:
            raise ValueError(f"batch_size {batch_size!r}: expected a number of sequences, at least 1 (no 'auto')")
        self.model, self.tokenizer = load_model(pretrained, device)
        self.batch_size, self.prompting = int(batch_size), prompting

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_id  # what ends every document of the training stream

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.tokenizer.encode(string)

    def _score(self, requests: list[Request]) -> list[tuple[float, bool]]:
        return [(s.logprob, s.greedy) for s in loglikelihoods(self.model, requests, self.batch_size, self.prompting)]

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        results = self._score([Request(context, continuation) for _, context, continuation in requests])
        for (pair, _, _), result in zip(requests, results, strict=True):
            self.cache_hook.add_partial("loglikelihood", pair, result)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """The log-likelihood of each whole text, in windows of the model's maximum length that
        each condition on the end of the one before (lm-eval's rolling windows)."""
        out = []
        for (text,) in (r.args for r in requests):
            windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
                self.tok_encode(text), self.prefix_token_id, self.model.cfg.max_len, context_len=1)]
            out.append(sum(lp for lp, _ in self._score([Request(c, t) for c, t in windows])))
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), out[-1])
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy continuations (sampled with do_sample and a temperature), cut before the first
        stop string."""
        out = []
        for context, options in (r.args for r in requests):
            until = options.get("until") or []
            until = [until] if isinstance(until, str) else until
            temperature = float(options.get("temperature", 0.0)) if options.get("do_sample") else 0.0
            max_new = int(options.get("max_gen_toks", 256))
            prompt = self.tok_encode(context)[-max(self.model.cfg.max_len - max_new, 1):]  # room to generate
            ids = sample(self.model, prompt, max_new, temperature, eos_id=self.eot_token_id, prompting=self.prompting)
            text = continuation(self.tokenizer, prompt, ids)
            for stop in until:
                text = text.split(stop)[0]
            out.append(text)
            self.cache_hook.add_partial("generate_until", (context, options), text)
        return out
