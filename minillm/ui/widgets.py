"""Teaching views of the engine: who owns which KV block, and what the scheduler did each step.

Each view comes in two halves. A *data* function returns plain dataclasses (so tests and
notebooks can assert on exactly what a picture shows), and a *render* function draws that data
with matplotlib. The ipywidgets helpers at the end only wire a slider to the render functions;
the code they call is ordinary and can be run in a cell without a widget.

matplotlib and ipywidgets are imported lazily: importing this module costs nothing.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from minillm.engine.llm_engine import LLMEngine
    from minillm.engine.outputs import RequestOutput
    from minillm.kv.block_manager import BlockManager, SequenceLike
    from minillm.sampling import SamplingParams

# Block states, from the allocator's point of view.
FREE = "free"  # on the free list, no cached contents
CACHED = "cached"  # on the free list, but still named by a prefix hash: a later prompt can hit it
USED = "used"  # held by exactly one live sequence
SHARED = "shared"  # held by several live sequences (prefix hit or fork): ref count > 1

# Step event kinds of the scheduler timeline.
PREFILL = "prefill"  # prompt tokens computed for the first time (possibly one chunk of them)
DECODE = "decode"  # the one newest token of a sequence, which then samples the next
RECOMPUTE = "recompute"  # a chunk starting at tokens computed before, then lost to preemption
WAITING = "waiting"  # arrived, not finished, and given no tokens this step
PREEMPTED = "preempted"  # evicted this step: its blocks were freed to make room
FORKED = "forked"  # a parallel-sampling (n > 1) sibling born this step from its parent
EVENT_KINDS = (PREFILL, DECODE, RECOMPUTE, WAITING, PREEMPTED, FORKED)

_KIND_COLORS = {
    PREFILL: "#4C72B0",
    DECODE: "#55A868",
    RECOMPUTE: "#8172B2",
    WAITING: "#DDDDDD",
    PREEMPTED: "#C44E52",
    FORKED: "#64B5CD",
}


def seq_label(seq: Any) -> str:
    """A row name for an engine sequence: the request id, plus '/i' for the i-th of n > 1."""
    n = getattr(getattr(seq, "params", None), "n", 1)
    return seq.request_id if n == 1 else f"{seq.request_id}/{seq.index}"


# ============================================================================ block table view
@dataclass(frozen=True)
class BlockView:
    """A snapshot of the paged KV cache: per physical block, its holders, fill and state."""

    block_size: int
    owners: tuple[tuple[str, ...], ...]  # per block: labels of the live sequences holding it
    filled: tuple[int, ...]  # per block: slots holding a computed token's K/V
    states: tuple[str, ...]  # per block: FREE, CACHED, USED or SHARED
    tables: Mapping[str, tuple[int, ...]]  # label -> that sequence's block table

    @property
    def num_blocks(self) -> int:
        return len(self.owners)

    @property
    def allocated_slots(self) -> int:
        """Slots in blocks held by live sequences (each physical block counted once)."""
        return self.block_size * sum(1 for s in self.states if s in (USED, SHARED))

    @property
    def used_slots(self) -> int:
        """Slots that hold a token's K/V, each physical slot counted once."""
        return sum(self.filled)

    @property
    def wasted_slots(self) -> int:
        """Allocated but empty: the internal fragmentation of the last block of each table."""
        return self.allocated_slots - self.used_slots

    @property
    def waste(self) -> float:
        """wasted / allocated (0 when nothing is allocated)."""
        return self.wasted_slots / self.allocated_slots if self.allocated_slots else 0.0

    def count(self, state: str) -> int:
        return sum(1 for s in self.states if s == state)


def block_view(
    block_manager: BlockManager,
    seqs: Mapping[str, SequenceLike] | Iterable[tuple[str, SequenceLike]],
) -> BlockView:
    """Who holds which block, given the block manager and its live sequences by label.

    A block's fill is the number of its slots below the holder's ``num_computed_tokens`` (the
    tokens whose K/V are written); a shared block takes the largest fill among its holders.
    """
    bm = block_manager
    bs, nb = bm.block_size, bm.num_blocks
    items = list(seqs.items()) if isinstance(seqs, Mapping) else list(seqs)
    owners: list[list[str]] = [[] for _ in range(nb)]
    filled = [0] * nb
    tables: dict[str, tuple[int, ...]] = {}
    for label, seq in items:
        if label in tables:
            raise ValueError(f"two sequences share the label {label!r}")
        tables[label] = tuple(seq.block_table)
        for i, b in enumerate(seq.block_table):
            if not 0 <= b < nb:
                raise ValueError(f"sequence {label!r} holds block {b}, outside [0, {nb})")
            owners[b].append(label)
            filled[b] = max(filled[b], min(max(seq.num_computed_tokens - i * bs, 0), bs))
    states = []
    for b in range(nb):
        if len(owners[b]) > 1:
            states.append(SHARED)
        elif owners[b]:
            states.append(USED)
        elif bm.block_hash[b] is not None:
            states.append(CACHED)
        else:
            states.append(FREE)
    return BlockView(bs, tuple(tuple(o) for o in owners), tuple(filled), tuple(states), tables)


def engine_block_view(engine: LLMEngine) -> BlockView:
    """The block view of an engine's running sequences (waiting ones hold no blocks)."""
    return block_view(engine.block_manager, [(seq_label(s), s) for s in engine.scheduler.running])


def _label_colors(labels: Sequence[str]) -> dict[str, Any]:
    import matplotlib

    cmap = matplotlib.colormaps["tab20"]
    # even entries first (the strong shades), then the pale ones: neighbours stay distinct
    return {label: cmap((2 * i) % 20 + (i // 10) % 2) for i, label in enumerate(labels)}


def render_blocks(
    view: BlockView,
    *,
    cols: int = 16,
    ax: Axes | None = None,
    title: str | None = None,
    annotate: bool | None = None,
    max_blocks: int | None = None,
) -> Figure:
    """Draw the cache as a grid of blocks: colour = owner, hatched = shared, dotted = cached.

    Each cell shows the block id and, when held, its fill (``7/16``). Text is drawn only while
    the grid is small enough to read (``annotate=None`` decides by size). A big cache is cut
    to its first `max_blocks` blocks; by default, enough rows to show every block that is not
    plainly free (at least 4 rows, at most 1024 blocks).
    """
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch, Rectangle

    if cols < 1:
        raise ValueError(f"cols must be >= 1, got {cols}")
    if max_blocks is None:
        last = max((b for b, st in enumerate(view.states) if st != FREE), default=-1)
        max_blocks = min(1024, max(-(-(last + 1) // cols) * cols, 4 * cols))
    if max_blocks < 1:
        raise ValueError(f"max_blocks must be >= 1, got {max_blocks}")
    shown = min(view.num_blocks, max_blocks)
    rows = -(-shown // cols)
    if ax is None:
        fig, ax = plt.subplots(figsize=(max(4.0, 0.5 * cols), 0.5 * rows + 1.0), dpi=80)
    else:
        fig = ax.figure
    colors = _label_colors(list(view.tables))
    annotate = shown <= 128 if annotate is None else annotate
    for b in range(shown):
        r, c = divmod(b, cols)
        state = view.states[b]
        face = "white" if state == FREE else "#EEEEEE"
        hatch = ".." if state == CACHED else None
        if state in (USED, SHARED):
            face = colors[view.owners[b][0]]
            hatch = "//" if state == SHARED else None
        ax.add_patch(
            Rectangle(
                (c, rows - 1 - r),
                0.94,
                0.94,
                facecolor=face,
                hatch=hatch,
                edgecolor="#555555",
                linewidth=0.6,
            )
        )
        if annotate:
            text = str(b)
            if state in (USED, SHARED):
                text += f"\n{view.filled[b]}/{view.block_size}"
            if state == SHARED:
                text += f" x{len(view.owners[b])}"
            ax.text(c + 0.47, rows - 1 - r + 0.47, text, ha="center", va="center", fontsize=6)
    ax.set_xlim(0, cols)
    ax.set_ylim(0, rows)
    ax.set_aspect("equal")
    ax.axis("off")
    handles = [Patch(facecolor=colors[label], label=label) for label in view.tables]
    handles += [
        Patch(facecolor="white", hatch="//", edgecolor="#555555", label="shared"),
        Patch(facecolor="#EEEEEE", hatch="..", edgecolor="#555555", label="cached (free)"),
        Patch(facecolor="white", edgecolor="#555555", label="free"),
    ]
    ax.legend(
        handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=7, frameon=False
    )
    ax.set_title(
        title
        or (
            f"{view.num_blocks} blocks of {view.block_size}: "
            f"{view.count(USED) + view.count(SHARED)} held, "
            f"waste {view.waste:.1%}"
            + (f" (first {shown} shown)" if shown < view.num_blocks else "")
        ),
        fontsize=9,
    )
    fig.tight_layout()
    return fig


# ============================================================================ scheduler timeline
@dataclass(frozen=True)
class TimelineRequest:
    """A request for `record_timeline`, arriving before engine step number `arrival_step`."""

    request_id: str
    prompt: str | list[int]
    params: SamplingParams
    arrival_step: int = 0


@dataclass(frozen=True)
class StepEvent:
    step: int
    label: str
    kind: str  # one of EVENT_KINDS
    start: int = 0  # position of the first token computed (prefill/decode/recompute)
    num_tokens: int = 0  # tokens computed for this sequence in this step
    sampled: bool = False  # a new token was sampled for this sequence at the end of the step


@dataclass
class Timeline:
    """What an engine did, step by step, to a set of requests."""

    labels: list[str] = field(default_factory=list)  # rows, in order of arrival
    events: list[StepEvent] = field(default_factory=list)
    step_seconds: list[float] = field(default_factory=list)  # wall time of each step
    blocks: list[BlockView] = field(default_factory=list)  # after each step, when recorded
    outputs: dict[str, RequestOutput] = field(default_factory=dict)  # by request id

    @property
    def num_steps(self) -> int:
        return len(self.step_seconds)

    def events_of(self, label: str) -> list[StepEvent]:
        return [e for e in self.events if e.label == label]

    def grid(self) -> list[list[str]]:
        """rows x steps of event kinds ('' where the row had no event)."""
        index = {label: i for i, label in enumerate(self.labels)}
        out = [[""] * self.num_steps for _ in self.labels]
        for e in self.events:
            out[index[e.label]][e.step] = e.kind
        return out

    def tokens(self, label: str, kind: str) -> int:
        """Tokens computed for row `label` in events of `kind`."""
        return sum(e.num_tokens for e in self.events if e.label == label and e.kind == kind)

    def sampled(self, label: str) -> int:
        """Tokens sampled for row `label`: equals its number of output tokens."""
        return sum(1 for e in self.events if e.label == label and e.sampled)

    def batch_sizes(self) -> list[int]:
        """Sequences given tokens in each step."""
        sizes = [0] * self.num_steps
        for e in self.events:
            if e.kind in (PREFILL, DECODE, RECOMPUTE):
                sizes[e.step] += 1
        return sizes

    @property
    def total_seconds(self) -> float:
        return sum(self.step_seconds)


def record_timeline(
    engine: LLMEngine,
    requests: Sequence[TimelineRequest],
    *,
    static_batch_size: int | None = None,
    snapshot_blocks: bool = False,
    max_steps: int = 100_000,
) -> Timeline:
    """Run `requests` through `engine` step by step and record what the scheduler did.

    Continuous batching (the default) hands each request to the engine as soon as it arrives.
    ``static_batch_size=B`` imitates static batching with the same engine: B arrived requests
    are handed over together, and the next B only once all of them have finished. Requests
    that have arrived but are not running show as *waiting* either way.
    """
    if static_batch_size is not None and static_batch_size < 1:
        raise ValueError(f"static_batch_size must be >= 1, got {static_batch_size}")
    if engine.has_unfinished_requests():
        raise ValueError("the engine already has unfinished requests; record on an idle engine")
    ids = [r.request_id for r in requests]
    if len(set(ids)) != len(ids):
        raise ValueError("request ids must be unique")
    pending = sorted(requests, key=lambda r: r.arrival_step)
    queue: list[TimelineRequest] = []  # arrived, not yet handed to the engine
    tl = Timeline()
    high_water: dict[int, int] = {}  # seq_id -> most tokens ever computed (to spot recompute)
    arrived_at: dict[str, float] = {}  # request id -> perf_counter() at its arrival step
    step = 0
    while pending or queue or engine.has_unfinished_requests():
        if step >= max_steps:
            raise RuntimeError(f"requests still unfinished after max_steps={max_steps}")
        if not queue and not engine.has_unfinished_requests() and pending[0].arrival_step > step:
            skip = pending[0].arrival_step - step  # idle until the next arrival
            tl.step_seconds += [0.0] * skip
            tl.blocks += [engine_block_view(engine)] * (skip if snapshot_blocks else 0)
            step += skip
        while pending and pending[0].arrival_step <= step:
            queue.append(pending.pop(0))
            tl.labels.append(_request_label(queue[-1]))
            arrived_at[queue[-1].request_id] = time.perf_counter()
        if static_batch_size is None or not engine.has_unfinished_requests():
            take = len(queue) if static_batch_size is None else static_batch_size
            for r in queue[:take]:  # TTFT and latency count from arrival, queueing included
                engine.add_request(
                    r.request_id, r.prompt, r.params, arrival_time=arrived_at[r.request_id]
                )
            del queue[:take]
        live = list(engine.scheduler.running) + list(engine.scheduler.waiting)
        tokens_before = {s.seq_id: s.num_tokens for s in live}

        t0 = time.perf_counter()
        for out in engine.step():
            if out.finished:
                tl.outputs[out.request_id] = out
        tl.step_seconds.append(time.perf_counter() - t0)

        _record_step(tl, engine, step, tokens_before, high_water, queue)
        if snapshot_blocks:
            tl.blocks.append(engine_block_view(engine))
        step += 1
    return tl


def _record_step(
    tl: Timeline,
    engine: LLMEngine,
    step: int,
    tokens_before: dict[int, int],
    high_water: dict[int, int],
    queue: list[TimelineRequest],
) -> None:
    sched = engine.last_scheduled
    scheduled = set()
    for seq, n in zip(sched.seqs, sched.num_new_tokens, strict=True):
        scheduled.add(seq.seq_id)
        before = tokens_before[seq.seq_id]
        # a finished sequence's blocks (and counters) are already released; its last chunk
        # necessarily ended at its last known token, the one that sampled its final token
        start = before - n if seq.is_finished else seq.num_computed_tokens - n
        if start < high_water.get(seq.seq_id, 0):
            kind = RECOMPUTE
        elif start < seq.num_prompt_tokens:
            kind = PREFILL
        else:
            kind = DECODE
        high_water[seq.seq_id] = max(high_water.get(seq.seq_id, 0), start + n)
        tl.events.append(StepEvent(step, seq_label(seq), kind, start, n, seq.num_tokens > before))
    preempted = {s.seq_id for s in sched.preempted}
    for seq in sched.preempted:
        tl.events.append(StepEvent(step, seq_label(seq), PREEMPTED))
    for seq in engine.scheduler.running:
        if seq.seq_id not in tokens_before:  # a parallel-sampling sibling forked this step
            label = seq_label(seq)
            if label not in tl.labels:  # right below its elder sibling
                tl.labels.insert(tl.labels.index(f"{seq.request_id}/{seq.index - 1}") + 1, label)
            high_water[seq.seq_id] = seq.num_computed_tokens
            tl.events.append(StepEvent(step, label, FORKED, seq.num_computed_tokens, 0, True))
    for seq in list(engine.scheduler.running) + list(engine.scheduler.waiting):
        if seq.seq_id in tokens_before and seq.seq_id not in scheduled | preempted:
            tl.events.append(StepEvent(step, seq_label(seq), WAITING))
    for r in queue:
        tl.events.append(StepEvent(step, _request_label(r), WAITING))


def _request_label(r: TimelineRequest) -> str:
    """The row of a request before it runs: the label its first sequence will carry."""
    return r.request_id if r.params.n == 1 else f"{r.request_id}/0"


def describe_step(tl: Timeline, step: int) -> str:
    """One line per row active in `step`, e.g. ``r3: prefill 37 token(s) at position 0``."""
    if not 0 <= step < tl.num_steps:
        raise ValueError(f"step must be in [0, {tl.num_steps}), got {step}")
    lines = [
        f"step {step}: batch of {tl.batch_sizes()[step]} sequence(s), "
        f"{sum(e.num_tokens for e in tl.events if e.step == step)} token(s)"
    ]
    for label in tl.labels:
        for e in tl.events:
            if e.step == step and e.label == label:
                text = f"  {label}: {e.kind}"
                if e.kind in (PREFILL, DECODE, RECOMPUTE):
                    text += f" {e.num_tokens} token(s) at position {e.start}"
                if e.sampled:
                    text += " -> sampled a token"
                lines.append(text)
    return "\n".join(lines)


def render_timeline(tl: Timeline, *, ax: Axes | None = None, title: str | None = None) -> Figure:
    """A Gantt-like chart: engine step on x, one row per sequence, colour = what it did."""
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    if ax is None:
        fig, ax = plt.subplots(
            figsize=(min(12.0, 3.0 + 0.12 * tl.num_steps), 0.8 + 0.28 * max(len(tl.labels), 1)),
            dpi=80,
        )
    else:
        fig = ax.figure
    rows = {label: len(tl.labels) - 1 - i for i, label in enumerate(tl.labels)}
    for kind in EVENT_KINDS:
        for label, y in rows.items():
            spans = [(e.step, 1) for e in tl.events if e.label == label and e.kind == kind]
            if spans:
                ax.broken_barh(
                    spans,
                    (y + 0.1, 0.8),
                    facecolors=_KIND_COLORS[kind],
                    edgecolor="white",
                    linewidth=0.3,
                )
    ax.set_yticks([y + 0.5 for y in rows.values()], list(rows))
    ax.set_xlim(0, max(tl.num_steps, 1))
    ax.set_ylim(0, max(len(tl.labels), 1))
    ax.set_xlabel("engine step")
    ax.tick_params(labelsize=7)
    present = {e.kind for e in tl.events}
    ax.legend(
        handles=[Patch(facecolor=_KIND_COLORS[k], label=k) for k in EVENT_KINDS if k in present],
        loc="upper left",
        bbox_to_anchor=(1.01, 1.0),
        fontsize=7,
        frameon=False,
    )
    ax.set_title(title or f"{tl.num_steps} steps, {tl.total_seconds:.2f} s", fontsize=9)
    fig.tight_layout()
    return fig


# ============================================================================ ipywidgets
def show_step(tl: Timeline, step: int) -> Figure:
    """Print what step `step` did and draw the block table after it (the slider's callback)."""
    print(describe_step(tl, step))
    if not tl.blocks:
        raise ValueError("this timeline has no block snapshots: record with snapshot_blocks=True")
    return render_blocks(tl.blocks[step], title=f"KV blocks after step {step}")


def timeline_player(tl: Timeline) -> Any:
    """A slider over the recorded steps that calls `show_step` (needs ipywidgets)."""
    import ipywidgets as widgets
    import matplotlib.pyplot as plt

    def _show(step: int) -> None:
        show_step(tl, step)
        plt.show()

    return widgets.interactive(
        _show,
        step=widgets.IntSlider(
            value=0, min=0, max=max(tl.num_steps - 1, 0), step=1, description="step"
        ),
    )
