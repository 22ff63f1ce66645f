"""Instruction data: records -> token ids whose loss counts the responses only -> training batches.

Records are Alpaca-style (`instruction`, optional `input`, `output`) or chat-style (`messages`:
a list of {role, content}), in a .json array or a .jsonl file. A `ChatTemplate` turns each into
ids and a target mask (gptkit.generate.chat): the prompt's tokens get the ignore index, so the
model learns to answer, not to ask. The same template is stored with the fine-tuned checkpoint,
so `gptkit chat` builds its prompts exactly as the training examples were built.

Batches either pack several examples into each row of `block_size` tokens, separated by a segment
id (`Batch.layout()` keeps attention and positions inside each example: `attention_layout`),
or pad each example to the longest of its batch. Both give every example the same loss as alone.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gptkit.console import notice
from gptkit.data.batch import Batch
from gptkit.errors import GptkitError
from gptkit.fused_loss import IGNORE_INDEX
from gptkit.templates import ChatTemplate, Message, alpaca_messages
from gptkit.tokenizer import Tokenizer


@dataclass
class Example:
    """One example: n ids and their n - 1 next-token targets (IGNORE_INDEX where not trained)."""

    ids: list[int]
    targets: list[int]

    @property
    def length(self) -> int:
        return len(self.ids) - 1  # positions that get a prediction


@dataclass
class Report:
    """What became of the records: the breakdown printed before training, or before the error
    that none is usable."""

    records: int = 0
    bad: int = 0  # malformed
    unencodable: int = 0  # text the tokenizer cannot encode (characters a char vocabulary lacks)
    truncated: int = 0
    dropped: int = 0  # longer than the context, with too_long=drop
    no_response: int = 0  # the context holds none of the response
    first_bad: list[str] = field(default_factory=list)
    first_unencodable: list[str] = field(default_factory=list)
    context: int | None = None  # tokens an example may hold

    def summary(self) -> str:
        context = f" ({self.context} tokens)" if self.context is not None else ""
        parts = [f"{self.records} records"]
        if self.bad:
            parts.append(f"{self.bad} malformed skipped (first: {self.first_bad[0]})")
        if self.unencodable:
            parts.append(
                f"{self.unencodable} with text the vocabulary lacks skipped "
                f"(first: {self.first_unencodable[0]})"
            )
        if self.truncated:
            parts.append(f"{self.truncated} truncated to the context{context}")
        if self.dropped:
            parts.append(f"{self.dropped} longer than the context{context} dropped")
        if self.no_response:
            parts.append(f"{self.no_response} dropped because the prompt fills the context{context}")
        return ", ".join(parts)

    def advice(self) -> str:
        """How to get usable examples, for the commonest reason records were lost."""
        reasons = [
            (
                self.no_response + self.dropped,
                "use a base with a longer context, shorter records or the shorter data.template=chat",
            ),
            (self.unencodable, "use a base whose tokenizer covers the text (e.g. one trained with gpt2)"),
            (self.bad, "fix the malformed records"),
        ]
        count, text = max(reasons, key=lambda r: r[0])
        return text if count else "add records to data.instructions"


def read_records(path: str | Path, skip_bad: bool, report: Report) -> list[dict[str, Any]]:
    """Valid Alpaca or chat records from a .json array or .jsonl file."""
    path = Path(path)
    if not path.is_file():
        raise GptkitError(
            f"instruction file {str(path)!r} not found; set data.instructions to a .json/.jsonl file"
        )
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise GptkitError(
                f"{str(path)!r} is not valid JSON ({e.msg} at line {e.lineno}); fix or use .jsonl"
            ) from None
        if not isinstance(rows, list):
            raise GptkitError(f"{str(path)!r} must hold a JSON array of records")
        lines = [(i + 1, row) for i, row in enumerate(rows)]
    else:
        lines = []
        for i, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                lines.append((i, json.loads(line)))
            except json.JSONDecodeError:
                lines.append((i, None))
    out = []
    for where, row in lines:
        report.records += 1
        problem = _problem(row)
        if problem is None:
            out.append(row)
            continue
        message = f"{path.name} record {where}: {problem}"
        if not skip_bad:
            raise GptkitError(f"{message}; fix it, or set data.skip_bad=true to count and skip such records")
        report.bad += 1
        if not report.first_bad:
            report.first_bad.append(message)
    return out


def _problem(row: Any) -> str | None:
    if not isinstance(row, dict):
        return "not a JSON object"
    if "messages" in row:
        msgs = row["messages"]
        if not isinstance(msgs, list) or not msgs:
            return "messages must be a non-empty list"
        for m in msgs:
            if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
                return "each message needs a role: system, user or assistant"
            if not isinstance(m.get("content"), str):
                return "each message needs text content"
        if not any(m["role"] == "assistant" for m in msgs):
            return "no assistant message to learn from"
        return None
    missing = [k for k in ("instruction", "output") if not isinstance(row.get(k), str)]
    if missing:
        need = "Alpaca records need instruction and output, chat records messages"
        return f"missing {' and '.join(missing)} ({need})"
    if "input" in row and not isinstance(row["input"], str):
        return "input must be text"
    return None


def to_messages(record: dict[str, Any], template: ChatTemplate) -> list[Message]:
    """A record as a conversation. Alpaca records under the alpaca template get Alpaca's own
    preamble and "### Input:" section; under other templates, the input follows the instruction."""
    if "messages" in record:
        return record["messages"]
    if template.name == "alpaca":
        return alpaca_messages(record)
    extra = record.get("input", "")
    user = f"{record['instruction']}\n\n{extra}" if extra else record["instruction"]
    return [{"role": "user", "content": user}, {"role": "assistant", "content": record["output"]}]


def encode(
    conversations: list[list[Message]],
    tokenizer: Tokenizer,
    template: ChatTemplate,
    block_size: int,
    too_long: str,
    report: Report,
    skip_bad: bool = False,
    source: str = "",
) -> list[Example]:
    """Examples of at most block_size + 1 ids; longer ones are cut at the end or dropped.

    A conversation the tokenizer cannot encode (a character a `char` vocabulary never saw) is an
    error naming it, or with `skip_bad` counted and reported like a malformed one.
    """
    report.context = block_size
    out = []
    for n, messages in enumerate(conversations, 1):
        try:
            ids, mask = template.encode(tokenizer, messages)
        except GptkitError as e:
            message = f"{source} record {n}: {e}"
            if not skip_bad:
                raise GptkitError(
                    f"{message}; or set data.skip_bad=true to count and skip such records"
                ) from None
            report.unencodable += 1
            if not report.first_unencodable:
                report.first_unencodable.append(message)
            continue
        cut = len(ids) > block_size + 1
        if cut and too_long == "drop":
            report.dropped += 1
            continue
        ids, mask = ids[: block_size + 1], mask[: block_size + 1]
        targets = [t if m else IGNORE_INDEX for t, m in zip(ids[1:], mask[1:], strict=True)]
        if all(t == IGNORE_INDEX for t in targets):
            report.no_response += 1  # nothing of the response is left to learn from
            continue
        report.truncated += cut
        out.append(Example(ids, targets))
    return out


def split(examples: list[Example], fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """A seeded held-out split (at least one example on each side)."""
    if len(examples) < 2:
        raise GptkitError(f"{len(examples)} usable example(s): fine-tuning needs at least 2 (one held out)")
    order = np.random.default_rng(seed).permutation(len(examples))
    n_val = min(len(examples) - 1, max(1, round(fraction * len(examples))))
    val = set(order[:n_val].tolist())
    return [e for i, e in enumerate(examples) if i not in val], [
        e for i, e in enumerate(examples) if i in val
    ]


PAD_MULTIPLE = 64  # padded widths come in few sizes, so the allocator reuses freed memory


def padded_batch(examples: list[Example], max_width: int | None = None) -> Batch:
    """Right-padded rows: causal attention never looks right, so padding changes nothing before it.

    The width is the longest example rounded up to a multiple of PAD_MULTIPLE (at most `max_width`):
    batches of a different width each step made CPU training hold 1.5x the memory of packing
    (freed blocks of one size do not fit the next), for a few percent of padded positions.
    """
    longest = max(e.length for e in examples)
    width = -(-longest // PAD_MULTIPLE) * PAD_MULTIPLE
    width = max(longest, min(width, max_width)) if max_width is not None else width
    x = torch.zeros(len(examples), width, dtype=torch.long)
    y = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    for i, e in enumerate(examples):
        x[i, : e.length] = torch.tensor(e.ids[:-1])
        y[i, : e.length] = torch.tensor(e.targets)
    return Batch(x, y)


def packed_rows(examples: list[Example], block_size: int) -> list[list[Example]]:
    """Examples in order, as many to a row as fit in block_size positions."""
    rows: list[list[Example]] = []
    used = block_size
    for e in examples:
        if used + e.length > block_size:
            rows.append([])
            used = 0
        rows[-1].append(e)
        used += e.length
    return rows


def packed_batch(rows: list[list[Example]], block_size: int) -> Batch:
    """Rows of block_size columns with their segments; segment ids count from 1, padding is 0."""
    x = torch.zeros(len(rows), block_size, dtype=torch.long)
    y = torch.full((len(rows), block_size), IGNORE_INDEX, dtype=torch.long)
    seg = torch.zeros(len(rows), block_size, dtype=torch.long)
    for i, row in enumerate(rows):
        at = 0
        for j, e in enumerate(row, 1):
            x[i, at : at + e.length] = torch.tensor(e.ids[:-1])
            y[i, at : at + e.length] = torch.tensor(e.targets)
            seg[i, at : at + e.length] = j
            at += e.length
    return Batch(x, y, seg)


class InstructionBatches:
    """A `TokenSource` of instruction examples: shuffled anew each epoch from the seed.

    Every rank walks the same global order and keeps its slice of each global batch, as
    `ShardBatches` does, so the state (epoch, position) is the same on all ranks.
    """

    def __init__(
        self,
        examples: list[Example],
        batch_size: int,
        block_size: int,
        packing: bool,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.examples, self.batch_size, self.block_size, self.packing = (
            examples,
            batch_size,
            block_size,
            packing,
        )
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.epoch, self.pos = 0, 0
        self._rows = self._epoch_rows()

    def _epoch_rows(self) -> list[list[Example]]:
        order = np.random.default_rng([self.seed, self.epoch]).permutation(len(self.examples))
        shuffled = [self.examples[i] for i in order]
        if self.packing:
            return packed_rows(shuffled, self.block_size)
        return [[e] for e in shuffled]

    def next_batch(self) -> Batch:
        n = self.batch_size * self.world_size  # the global micro-batch
        rows: list[list[Example]] = []
        while len(rows) < n:
            if self.pos >= len(self._rows):
                self.epoch, self.pos = self.epoch + 1, 0
                self._rows = self._epoch_rows()
            take = min(n - len(rows), len(self._rows) - self.pos)
            rows += self._rows[self.pos : self.pos + take]
            self.pos += take
        mine = rows[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]
        if self.packing:
            return packed_batch(mine, self.block_size)
        return padded_batch([r[0] for r in mine], self.block_size)

    def state_dict(self) -> dict[str, Any]:
        return {"kind": "instructions", "epoch": self.epoch, "pos": self.pos, "seed": self.seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("kind") != "instructions":
            raise GptkitError(
                "the checkpoint's data position is not of instruction data; resume with its data"
            )
        self.epoch, self.pos = int(state["epoch"]), int(state["pos"])
        self._rows = self._epoch_rows()


def val_batches(
    examples: list[Example], batch_size: int, block_size: int, packing: bool, limit: int
) -> list[Batch]:
    """The same held-out batches each evaluation (at most `limit` of them)."""
    if packing:
        rows = packed_rows(examples, block_size)
        return [packed_batch(rows[i : i + batch_size], block_size) for i in range(0, len(rows), batch_size)][
            :limit
        ]
    return [
        padded_batch(examples[i : i + batch_size], block_size) for i in range(0, len(examples), batch_size)
    ][:limit]


def load_instructions(
    config: Any, tokenizer: Tokenizer, block_size: int
) -> tuple[list[Example], list[Example], ChatTemplate]:
    """Train and held-out examples for a run's `data` section, with a one-line report."""
    data = config.data
    template = ChatTemplate.named(data.template)
    report = Report()

    def examples(path: str) -> list[Example]:
        records = read_records(path, data.skip_bad, report)
        conversations = [to_messages(r, template) for r in records]
        return encode(
            conversations,
            tokenizer,
            template,
            block_size,
            data.too_long,
            report,
            data.skip_bad,
            Path(path).name,
        )

    train = examples(data.instructions)
    needed = 1 if data.val_instructions else 2
    if len(train) < needed:
        notice(f"instructions: {report.summary()}")
        held_out = "" if data.val_instructions else " (one held out)"
        raise GptkitError(
            f"{len(train)} usable example(s) in {data.instructions}: fine-tuning needs at least "
            f"{needed}{held_out}; {report.advice()}"
        )
    if data.val_instructions:
        val = examples(data.val_instructions)
    else:
        train, val = split(train, data.val_fraction, data.seed)
    notice(f"instructions: {report.summary()}; {len(train)} train and {len(val)} held-out examples")
    return train, val, template
