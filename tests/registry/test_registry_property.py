"""Property (issue 10, "Show"): whatever values a proposal gives the keys it may set,
`proposals check` either refuses it, one `path:line: field: message` line per problem (a line
at every value known to be bad), or the tiny preset trains a step with those values and a
finite loss.

Values are drawn for every field of the registry's schema (run_config.GROUPS through
ConfigSchema) from its type and declared range: inside it, at and beyond its ends, negative,
huge, NaN and infinite, of the wrong type, unknown names, and data locations inside and outside
registry.allowed_sources (bypass attempts included). The operator here is a small machine:
registry.max_params is 2 M. Three things are left to the run and kept in bounds here, because
no proposal check can know them: the data's size (data.seq_len and data.batch_size stay small,
and a source's format matches its files), model.arch.max_len at least the run's data.seq_len
(fit refuses a shorter one with its own line, tests/cli/test_bad_input.py), and a source a
proposal adds comes with its url (fit refuses one without, tests/registry/test_registry_limits.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import math
import random
import re
import typing

import lightning as L
import pytest
from conftest import build_tiny, write_proposal
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from cpm_lightning.cli.main import main
from cpm_lightning.core.strict_yaml import INT64_MAX
from cpm_lightning.core.tokenizer import save_tokenizer, train_tokenizer
from cpm_lightning.registry.keys import NAMED, SCOPES, ConfigSchema, in_scope
from cpm_lightning.registry.limits import LOCATION_KEYS
from cpm_lightning.registry.typecheck import as_hinted
from cpm_lightning.train.run_config import GROUPS

SCHEMA = ConfigSchema(GROUPS)
MAX_PARAMS = 2_000_000
SEQ_LEN = 32
# Locations, filled in with the test's directories: {D} is the one proposals may read.
ALLOWED_TEXT = ["{D}/corpus.txt", "file://{D}/corpus.txt", "{D}/*.txt", "{D}//corpus.jsonl"]
ALLOWED_TOKENIZER = ["{D}/tok.model", "file://{D}/tok.model"]
FOREIGN = ["/etc/passwd", "file:///root/.bashrc", "FILE:///etc/hostname", "~/.bashrc",
           "http://169.254.169.254/latest/meta-data/", "s3://cpm-lightning-data/english/x.jsonl.gz",
           "{O}/secret.txt", "{D}/../outside/secret.txt", "{D}/%2e%2e/outside/secret.txt", "{D}/link/secret.txt",
           "{D}x/secret.txt", "simplecache::file://{O}/secret.txt", "{D}/sub/*.txt"]
# Bounds that depend on the run, not the proposal (module docstring).
RUN_BOUNDS = {"data.seq_len": (1, 64), "data.batch_size": (1, 8), "model.arch.max_len": (SEQ_LEN, None)}


def _leaves(cls, prefix: str):
    """Every leaf key under a group class but those of data.sources (see source_changes)."""
    for f in dataclasses.fields(cls):
        hint, key = typing.get_type_hints(cls)[f.name], f"{prefix}.{f.name}"
        if dataclasses.is_dataclass(hint):
            yield from _leaves(hint, key)
        elif typing.get_origin(hint) is not dict:
            yield key


KEYS = sorted(k for group, cls in GROUPS.items() for k in _leaves(cls, group))


def _tag(strategy, bad: bool):
    return strategy.map(lambda v: (v, bad))


def _mostly(good, bad, one_in: int = 4):
    """Bad values once in `one_in`, so that a fair share of proposals pass and train."""
    return st.integers(1, one_in).flatmap(lambda i: bad if i == 1 else good)


def _numbers(key: str, hint):
    """(value, surely bad) for an int or float field, from its declared range."""
    rng = SCHEMA.range(key)
    is_int = int in typing.get_args(hint) or hint is int
    low, high = RUN_BOUNDS.get(key, (None, None))
    low = rng.low + (1 if is_int and rng.low_open else 0) if low is None else low
    high = rng.high if high is None else high
    if is_int:  # within int64: the strict loader refuses what is beyond it, before any field is read
        inside = st.one_of(st.just(low), st.integers(low, low + 64 if high is None else min(high, low + 64)),
                           st.integers(low, high if high is not None else INT64_MAX))
        outside = st.one_of(st.integers(-INT64_MAX - 1, rng.low - (0 if rng.low_open else 1)), st.just(-INT64_MAX - 1),
                            *([st.integers(rng.high + 1, INT64_MAX)] if rng.high is not None else []))
    else:
        top = high if high is not None else 1e300
        inside = st.one_of(st.floats(low, top, exclude_min=rng.low_open, exclude_max=rng.high_open),
                           st.sampled_from([v for v in (low, top) if rng.admits(v)]))
        # Just beyond each end (nextafter: floats() tells -0.0 from 0.0, a range does not).
        below = rng.low if rng.low_open else math.nextafter(rng.low, -math.inf)
        above = [] if rng.high is None else [rng.high if rng.high_open else math.nextafter(rng.high, math.inf)]
        outside = st.one_of(st.floats(max_value=below), st.sampled_from([math.nan, math.inf, -math.inf]),
                            *[st.floats(min_value=a) for a in above])
    optional = type(None) in typing.get_args(hint)
    return _mostly(st.one_of(_tag(inside, False), *([_tag(st.none(), False)] if optional else [])), _tag(outside, True))


def wrong_types(hint):
    """Values of another type than `hint` (YAML 1.1 reads 1e-4 as a string)."""
    return _tag(st.sampled_from(["64", "1e-4", [1, 2, 3], "os.system", *([] if hint is bool else [True])]), True)


def values(key: str):
    """(value, surely bad) pairs for one key, from its type, range or registry of names."""
    hint, _ = SCHEMA.lookup(key)
    if key in NAMED:
        return _mostly(_tag(st.sampled_from(sorted(NAMED[key])), False), _tag(st.sampled_from(["no-such-name", ""]), True))
    if LOCATION_KEYS.match(key):
        return _mostly(_tag(st.sampled_from(ALLOWED_TOKENIZER), False), _tag(st.sampled_from(FOREIGN), True))
    base = typing.get_origin(hint)
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if hint is bool:
        inner = _tag(st.booleans(), False)
    elif base is typing.Literal:
        inner = _mostly(_tag(st.sampled_from(args), False), _tag(st.just("bogus"), True))
    elif base is tuple:  # the betas: one number per place, bad when any is
        item = _numbers(key, args[0])
        inner = st.lists(item, min_size=2, max_size=2).map(lambda vs: ([v for v, _ in vs], any(b for _, b in vs)))
    elif int in ([hint] + args) or float in ([hint] + args):
        inner = _numbers(key, hint)
    else:  # data.cache_dir: the operator's key, refused
        inner = _tag(st.text(max_size=10), key == "data.cache_dir")
    return _mostly(inner, wrong_types(hint), one_in=8)


@st.composite
def source_changes(draw) -> dict[str, tuple]:
    """Changes to the run config's source `text`, or a new source `extra` with its url."""
    if draw(st.booleans()):
        keys = draw(st.lists(st.sampled_from(["url", "weight"]), min_size=1, max_size=2, unique=True))
        name = "text"
    else:
        keys, name = ["url", *draw(st.lists(st.sampled_from(["weight", "format"]), max_size=2, unique=True))], "extra"
    out = {}
    for field in keys:
        key = f"data.sources.{name}.{field}"
        if field == "url":
            out[key] = draw(_mostly(_tag(st.sampled_from(ALLOWED_TEXT), False), _tag(st.sampled_from(FOREIGN), True)))
        elif field == "format":  # text: the files are text (module docstring)
            out[key] = draw(_mostly(_tag(st.just("text"), False), _tag(st.just("csv"), True)))
        else:
            out[key] = draw(values(key))
    return out


@st.composite
def proposals(draw) -> tuple[str, dict[str, tuple]]:
    """(kind, {key: (value, surely bad)}): mostly keys of the kind's scope, sometimes one of
    any other."""
    kind = draw(st.sampled_from(sorted(SCOPES)))
    scoped = [k for k in KEYS if in_scope(k, kind)]
    keys = draw(st.lists(st.sampled_from(scoped), min_size=0 if kind == "data" else 1, max_size=3, unique=True))
    changes = {k: draw(values(k)) for k in keys}
    if kind == "data" and (not keys or draw(st.booleans())):
        changes |= draw(source_changes())
    if draw(st.integers(0, 9)) == 0:
        key = draw(st.sampled_from([k for k in KEYS if k not in scoped]))
        changes[key] = (draw(values(key))[0], True)  # outside the scope: refused whatever its value
    return kind, changes


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    """{D}: the allowed directory with a text corpus, a JSON-lines one and a tokenizer, a link
    out of it; {O}: a directory outside it with a secret."""
    root = tmp_path_factory.mktemp("property").resolve()
    allowed, outside = root / "allowed", root / "outside"
    (allowed / "sub").mkdir(parents=True)
    outside.mkdir()
    (outside / "secret.txt").write_text("the secret that must not be trained on\n")
    (allowed / "link").symlink_to(outside)
    (allowed / "sub" / "s.txt").symlink_to(outside / "secret.txt")
    words = "proposals change the model and the data while it trains in public for everyone".split()
    rng = random.Random(0)
    lines = [" ".join(rng.choice(words) for _ in range(14)) for _ in range(1500)]
    (allowed / "corpus.txt").write_text("\n".join(lines))
    (allowed / "corpus.jsonl").write_text("\n".join('{"text": "%s"}' % line for line in lines))
    save_tokenizer(train_tokenizer(lines, 300), str(allowed / "tok.model"))
    data = {"sources": {"text": {"url": str(allowed / "corpus.txt")}}, "tokenizer": str(allowed / "tok.model"),
            "seq_len": SEQ_LEN, "batch_size": 4, "val_windows": 2, "cache_dir": str(root / "cache")}
    return {"root": root, "D": str(allowed), "O": str(outside), "data": data, "count": 0}


def _fill(value, world: dict):
    return value.replace("{D}", world["D"]).replace("{O}", world["O"]) if isinstance(value, str) else value


@settings(max_examples=40, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@pytest.mark.slow
@given(proposal=proposals())
def test_a_proposal_is_refused_line_by_line_or_trains(world, proposal):
    kind, drawn = proposal
    changes = {k: _fill(v, world) for k, (v, _) in drawn.items()}
    world["count"] += 1
    path = write_proposal(world["root"] / f"reg{world['count']}", 1, changes, kind=kind)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), contextlib.suppress(SystemExit):
        main(["proposals", "check", str(path.parent), "--allowed-sources", world["D"] + "/",
              "--max-params", str(MAX_PARAMS)])
    lines = out.getvalue().splitlines()
    if lines == ["1 proposal file(s) OK"]:
        event("passed check, trained")  # --hypothesis-show-statistics counts the outcomes
        assert not any(bad for _, bad in drawn.values()), (changes, "passed check")
        model, dm = build_tiny(changes, world["data"])
        trainer = L.Trainer(max_steps=1, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                            num_sanity_val_steps=0)
        trainer.fit(model, dm)
        assert trainer.global_step == 1 and math.isfinite(float(trainer.callback_metrics["train/loss"])), changes
        for key, value in changes.items():  # the values reached the run (None: the preset's)
            if value is None or key == "model.arch.vocab_size":  # the vocabulary is the tokenizer's
                continue
            *parents, name = key.split(".")
            node = {"model": model, "data": dm}[parents[0]]
            for part in parents[1:]:
                node = node[part] if isinstance(node, dict) else getattr(node, part)
            assert getattr(node, name) == as_hinted(value, SCHEMA.lookup(key)[0]), key
        return
    event("refused by check" + ("" if any(bad for _, bad in drawn.values()) else " (no value surely bad)"))
    problem = re.compile(rf"^{re.escape(str(path))}:\d+: (changes(\.\S+)?|yaml): \S.*$")
    assert lines and all(problem.match(line) for line in lines), lines
    assert err.getvalue() == f"{len(lines)} problem(s) in 1 proposal file(s)\n", err.getvalue()
    for key, (_, bad) in drawn.items():
        if bad:
            assert sum(line.split(": ")[1] == f"changes.{key}" for line in lines) == 1, (key, lines)
