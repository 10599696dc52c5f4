"""Data loaders with validation: prompts, the F1 set, WikiText-2, labelled toxicity corpora,
preference pairs.

A malformed row (bad JSON, missing field, wrong type, empty text, bytes that are not UTF-8) is
an error naming file, line and field; with `skip_bad_rows=True` such rows are skipped, counted
and logged instead. Loaders return plain Python lists; truncation to a model's context happens
at tokenisation, where the token count is known.
"""

from __future__ import annotations

import csv
import html
import io
import json
import logging
import random
import re
from dataclasses import dataclass, field
from pathlib import Path

from dpolens.artifacts import DpolensError

log = logging.getLogger(__name__)


class DataError(DpolensError):
    pass


@dataclass
class LoadReport:
    """How many rows were read and skipped (and why) by a loader."""

    path: str
    rows: int = 0
    skipped: list[str] = field(default_factory=list)

    def skip(self, reason: str) -> None:
        self.skipped.append(reason)
        if len(self.skipped) <= 5:
            log.warning("skipping bad row: %s", reason)

    def as_dict(self) -> dict:
        return {"path": self.path, "rows": self.rows, "skipped": len(self.skipped),
                "skipped_examples": self.skipped[:5]}


def _need_file(path: str | Path) -> Path:
    p = Path(path)
    if not p.exists():
        hint = ""
        if "shared" in str(p):
            hint = " (the offline data folder ../shared/data is missing: pass your own file)"
        raise DataError(f"data file not found: {p}{hint}")
    return p


def read_jsonl(path: str | Path, fields: dict[str, type], skip_bad_rows: bool = False,
               report: LoadReport | None = None) -> list[dict]:
    """Rows of a JSONL file, each validated: every field present, of its type, non-empty."""
    p = _need_file(path)
    report = report or LoadReport(str(p))
    rows = []
    with open(p, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            where = f"{p}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                problem = f"{where}: not valid UTF-8 ({e.reason} at byte {e.start})"
                if not skip_bad_rows:
                    raise DataError(problem) from None
                report.skip(problem)
                continue
            if not line.strip():
                continue
            try:
                row = _validate(json.loads(line), fields, where)
            except json.JSONDecodeError as e:
                problem = f"{where}: bad JSON ({e.msg})"
                if not skip_bad_rows:
                    raise DataError(problem) from None
                report.skip(problem)
                continue
            except DataError as e:
                if not skip_bad_rows:
                    raise
                report.skip(str(e))
                continue
            rows.append(row)
    report.rows = len(rows)
    if not rows:
        raise DataError(f"{p}: no valid rows")
    return rows


def _validate(obj, fields: dict[str, type], where: str) -> dict:
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    for name, tp in fields.items():
        if name not in obj:
            raise DataError(f"{where}: missing field '{name}'")
        value = obj[name]
        if tp is str:
            if isinstance(value, dict) and isinstance(value.get("text"), str):
                value = obj[name] = value["text"]  # RealToxicityPrompts' {"prompt": {"text": ...}}
            if not isinstance(value, str):
                raise DataError(f"{where}: field '{name}' must be a string, got {type(value).__name__}")
            if not value.strip():
                raise DataError(f"{where}: field '{name}' is empty")
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                raise DataError(f"{where}: field '{name}' holds a lone surrogate (\\ud800-\\udfff): "
                                "not text a tokenizer can read") from None
        elif not isinstance(value, tp) or isinstance(value, bool) and tp is not bool:
            raise DataError(f"{where}: field '{name}' must be {tp.__name__}, got {type(value).__name__}")
    return obj


HOLDOUT_SEED = 0  # fixed, not the study's seed: every stage and every study holds out the same prompts


def holdout_split(prompts: list[str], n: int) -> tuple[list[str], list[str]]:
    """(kept, held out): `n` prompts drawn with a fixed seed are held out (e.g. the DPO strength control's dev
    prompts, never evaluated on); both lists keep the file's order."""
    if n <= 0:
        return list(prompts), []
    if n >= len(prompts):
        raise DpolensError(f"holdout {n} leaves no prompts: the file has {len(prompts)}")
    held = set(random.Random(HOLDOUT_SEED).sample(range(len(prompts)), n))
    return ([p for i, p in enumerate(prompts) if i not in held], [p for i, p in enumerate(prompts) if i in held])


def load_prompts(path: str | Path, limit: int | None = None, skip_bad_rows: bool = False,
                 holdout: int = 0) -> list[str]:
    """`{"prompt": str}` JSONL (RealToxicityPrompts' nested `{"prompt": {"text"}}` too); `holdout` prompts
    (`holdout_split`) left out before the limit."""
    rows = read_jsonl(path, {"prompt": str}, skip_bad_rows)
    return holdout_split([r["prompt"] for r in rows], holdout)[0][:limit]


def load_holdout(path: str | Path, n: int, skip_bad_rows: bool = False) -> list[str]:
    """The `n` prompts that `load_prompts(path, holdout=n)` leaves out."""
    return holdout_split(load_prompts(path, None, skip_bad_rows), n)[1]


def same_file(a: str | Path | None, b: str | Path | None) -> bool:
    """Whether two data paths name one file (a holdout of one applies to the other)."""
    return a is not None and b is not None and Path(a).resolve() == Path(b).resolve()


def load_f1_set(path: str | Path, limit: int | None = None, skip_bad_rows: bool = False) -> list[dict]:
    """`{"prompt": str, "gold": str}` JSONL: prefixes and their true continuations."""
    rows = read_jsonl(path, {"prompt": str, "gold": str}, skip_bad_rows)
    return [{"prompt": r["prompt"], "gold": r["gold"]} for r in rows][:limit]


def load_pairs(path: str | Path, skip_bad_rows: bool = False) -> list[dict]:
    """Preference pairs `{"prompt_text", "unpert_gen_text", "pert_gen_text"}`.

    A pair whose preferred (unpert) and dispreferred (pert) sides are empty or identical teaches
    nothing: an error naming the line, or (skip_bad_rows) skipped with a warning.
    """
    fields = {"prompt_text": str, "unpert_gen_text": str, "pert_gen_text": str}
    p = _need_file(path)
    report = LoadReport(str(p))
    rows = []
    with open(p, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            where = f"{p}:{lineno}"
            try:
                obj = json.loads(raw.decode("utf-8"))
                if isinstance(obj, dict) and all(
                    isinstance(obj.get(k), str) for k in ("unpert_gen_text", "pert_gen_text")
                ):
                    if not obj["unpert_gen_text"].strip() or not obj["pert_gen_text"].strip():
                        raise DataError(f"{where}: empty preferred or dispreferred side")
                    if obj["unpert_gen_text"].strip() == obj["pert_gen_text"].strip():
                        raise DataError(f"{where}: identical preferred and dispreferred sides")
                rows.append(_validate(obj, fields, where))
            except (UnicodeDecodeError, json.JSONDecodeError, DataError) as e:
                msg = e if isinstance(e, DataError) else f"{where}: {type(e).__name__}: {e}"
                if not skip_bad_rows:
                    raise DataError(str(msg)) from None
                report.skip(str(msg))
    if report.skipped:
        log.warning("%s: skipped %d of %d pairs", p, len(report.skipped), len(rows) + len(report.skipped))
    if not rows:
        raise DataError(f"{p}: no usable preference pairs remain")
    return [{k: r[k] for k in fields} for r in rows]


def load_wikitext(spec: str, limit: int | None = None) -> list[str]:
    """Paragraphs of WikiText-2 raw: a `.raw` file, a parquet with `text`, or `hub:config:split`.

    Blank lines are dropped; join the result with "\\n\\n" for the perplexity protocol.
    """
    if spec.startswith("hub:"):
        _, name, config, split = (spec.split(":") + ["", "", ""])[:4]
        from datasets import load_dataset

        texts = load_dataset(name or "wikitext", config or "wikitext-2-raw-v1", split=split or "test")["text"]
    else:
        p = _need_file(spec)
        if p.suffix == ".parquet":
            import pyarrow.parquet as pq

            try:
                texts = pq.read_table(p, columns=["text"]).column("text").to_pylist()
            except (OSError, ValueError, KeyError) as e:  # pyarrow's errors derive from these
                raise DataError(f"{p} is not a parquet file with a 'text' column ({e})") from None
        else:
            try:
                texts = p.read_bytes().decode("utf-8", errors="strict").splitlines()
            except UnicodeDecodeError as e:
                raise DataError(f"{p} is not UTF-8 text (byte {e.start}: {e.reason})") from None
    paragraphs = [t.strip("\r\n") for t in texts if t and t.strip()]
    return paragraphs[:limit]


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'])")


def wikitext_prompts(specs: list[str], min_words: int = 8) -> list[str]:
    """Sentences of WikiText-2 (headings dropped, @-@ style tokens joined) with >= min_words."""
    out, seen = [], set()
    for spec in specs:
        for para in load_wikitext(spec):
            if para.strip().startswith("="):
                continue
            text = para.replace(" @-@ ", "-").replace(" @,@ ", ",").replace(" @.@ ", ".")
            for sent in _SENTENCE_END.split(text.strip()):
                sent = sent.strip()
                if len(sent.split()) >= min_words and sent not in seen:
                    seen.add(sent)
                    out.append(sent)
    return out


_TWEET_NOISE = re.compile(r"(?:\bRT\b:?|@\S*|https?://\S+|www\.\S+|#)")


def tweet_prompts(specs: list[str], min_words: int = 4) -> list[str]:
    """The first half (by words) of each tweet of labelled corpora, both labels, with retweet
    marks, @-mentions, links, '#' and HTML entities removed; deduplicated case-insensitively,
    in file order. Prefixes shorter than `min_words` words are dropped."""
    out, seen = [], set()
    for spec in specs:
        for text, _ in load_labelled(spec):
            clean = _TWEET_NOISE.sub(" ", html.unescape(text)).replace("\n", " ")
            clean = clean.strip(" \"':;!-|").split()
            prefix = " ".join(clean[: len(clean) // 2])
            key = prefix.lower()
            if len(prefix.split()) >= min_words and key not in seen:
                seen.add(key)
                out.append(prefix)
    return out


# ---- labelled toxicity corpora -------------------------------------------------------------

def _read_text(p: Path) -> str:
    try:
        return p.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{p}: not valid UTF-8 ({e.reason} at byte {e.start})") from None


def load_labelled(path: str | Path, skip_bad_rows: bool = False) -> list[tuple[str, int]]:
    """(text, label) with label 1 = toxic, from Jigsaw train.csv, Davidson CSV, OLID TSV,
    or `{"text", "label"}` JSONL; the format is told by the file's columns."""
    p = _need_file(path)
    if p.suffix == ".jsonl":
        rows = read_jsonl(p, {"text": str, "label": int}, skip_bad_rows)
        return [(r["text"], int(r["label"] > 0)) for r in rows]
    text = _read_text(p)
    delim = "\t" if p.suffix == ".tsv" else ","
    reader = csv.DictReader(io.StringIO(text), delimiter=delim)
    cols = set(reader.fieldnames or [])
    if {"comment_text", "toxic"} <= cols:
        text_col, label = "comment_text", lambda r: int(r["toxic"]) > 0
    elif {"tweet", "class"} <= cols:
        text_col, label = "tweet", lambda r: int(r["class"]) in (0, 1)
    elif {"tweet", "subtask_a"} <= cols:
        def label(r):
            if r["subtask_a"] not in ("OFF", "NOT"):
                raise ValueError(f"subtask_a must be OFF or NOT, got {r['subtask_a']!r}")
            return r["subtask_a"] == "OFF"
        text_col = "tweet"
    else:
        raise DataError(f"{p}: unknown corpus format (columns {sorted(cols)}); expected Jigsaw "
                        "(comment_text, toxic), Davidson (tweet, class), OLID (tweet, subtask_a)")
    out = []
    for lineno, r in enumerate(reader, 2):
        try:
            t = r[text_col]
            if t is None or not t.strip():
                raise ValueError(f"field '{text_col}' is empty")
            out.append((t, int(label(r))))
        except (ValueError, KeyError, TypeError) as e:
            msg = f"{p}:{lineno}: {e}"
            if not skip_bad_rows:
                raise DataError(msg) from None
            log.warning("skipping bad row: %s", msg)
    if not out:
        raise DataError(f"{p}: no valid rows")
    return out


def balanced_sample(examples: list[tuple[str, int]], max_examples: int | None, balance: bool,
                    seed: int) -> list[tuple[str, int]]:
    """Optionally equalise classes (down-sampling the larger) and cap the total, seeded."""
    rng = random.Random(seed)
    by_label: dict[int, list] = {}
    for ex in examples:
        by_label.setdefault(ex[1], []).append(ex)
    if len(by_label) < 2:
        raise DataError(f"the corpus has one class only (label {next(iter(by_label), None)}): "
                        "a probe needs toxic and non-toxic examples")
    for v in by_label.values():
        rng.shuffle(v)
    if balance:
        n = min(len(v) for v in by_label.values())
        if max_examples:
            n = min(n, max_examples // len(by_label))
        picked = [ex for v in by_label.values() for ex in v[:n]]
    else:
        picked = [ex for v in by_label.values() for ex in v]
        rng.shuffle(picked)
        picked = picked[:max_examples] if max_examples else picked
    rng.shuffle(picked)
    return picked


def default_data(relative: str) -> str:
    """A path inside the offline data folder: `$DPOLENS_DATA`, default `../shared/data`."""
    import os

    return str(Path(os.environ.get("DPOLENS_DATA", "../shared/data")) / relative)
