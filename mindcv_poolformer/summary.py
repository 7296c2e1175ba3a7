"""Print params and MACs of registered models next to the paper's numbers.

    python -m mindcv_poolformer.summary [--models NAME ...] [--image-size 224]

MACs follow fvcore's conventions (see ``mindcv_poolformer.flops``), the convention of the paper's
tables. "trainable" excludes frozen parameters (the random mixer's matrices). Paper columns are
empty where the paper states no number for that model.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import dataclass

from .flops import count_macs, count_params
from .models.registry import create_model, list_models, model_info

__all__ = ["SummaryRow", "summarize", "format_table", "main"]


@dataclass(frozen=True)
class SummaryRow:
    """Measured and reported size of one model."""
    name: str
    params: int
    trainable: int
    macs: int
    paper_params: int | None
    paper_macs: float | None
    paper_top1: float | None

    @property
    def params_diff(self) -> float | None:
        """Relative difference of our parameter count from the paper's (0.01 = 1 %)."""
        return None if self.paper_params is None else self.params / self.paper_params - 1.0

    @property
    def macs_diff(self) -> float | None:
        """Relative difference of our MAC count from the paper's."""
        return None if self.paper_macs is None else self.macs / self.paper_macs - 1.0


def summarize(names: Sequence[str], image_size: int = 224) -> list[SummaryRow]:
    """Build each model (fixed-size mixers built for ``image_size``) and count it."""
    rows = []
    for name in names:
        info = model_info(name)
        net = create_model(name, image_size=image_size)
        rows.append(SummaryRow(name, count_params(net), count_params(net, trainable_only=True),
                               count_macs(net, image_size), info.params, info.macs, info.top1))
    return rows


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:+.2f}%"


def format_table(rows: Sequence[SummaryRow]) -> str:
    """A markdown table of ``rows``."""
    header = ["model", "params", "trainable", "paper params", "diff", "MACs (G)", "paper MACs (G)", "diff",
              "paper top-1"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        cells = [
            r.name, f"{r.params:,}", f"{r.trainable:,}",
            "-" if r.paper_params is None else f"{r.paper_params / 1e6:.3f}M", _pct(r.params_diff),
            f"{r.macs / 1e9:.3f}", "-" if r.paper_macs is None else f"{r.paper_macs / 1e9:.3f}", _pct(r.macs_diff),
            "-" if r.paper_top1 is None else f"{r.paper_top1:.1f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mindcv_poolformer.summary", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=None, help="registered names (default: all)")
    parser.add_argument("--image-size", type=int, default=224, help="square input side (default 224)")
    args = parser.parse_args(argv)
    if args.image_size < 32 or args.image_size % 32:
        parser.error(f"--image-size must be a positive multiple of 32, got {args.image_size}")
    names = args.models or list_models()
    try:
        rows = summarize(names, args.image_size)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(format_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
