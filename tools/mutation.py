"""Mutation run over the pure-Python logic (issue 18): do the fast tests fail when the code is wrong?

Usage (not in CI; minutes on two cores)::

    python tools/mutation.py                      # every module, report under bench/results/
    python tools/mutation.py --module schedule    # one module
    python tools/mutation.py --list --module data listing # the mutants only, nothing run

Why our own mutator instead of mutmut: mutmut runs the test command in a fresh process per mutant,
and importing MindSpore (and starting pytest) costs 5-30 s on this shared machine, so hundreds of
mutants would take hours. This tool copies the repository (package, tests, configs) to a temp dir,
imports MindSpore and the package there once, collects each module's tests once (a pytest session,
nothing run), then forks one child per mutant. The child swaps the mutated function's code object
into the live function (``__code__``/``__defaults__``; every ``from x import f`` sees it) or, for a
module-level table, re-executes that one statement, and runs the collected tests with ``-x`` under a
per-mutant timeout. The real source files are never written. The parent never runs a MindSpore op:
a child forked after one would deadlock in MindSpore's runtime threads.

Mutations (one per mutant, AST-based, over the functions and tables listed in ``TARGETS``):
operator swaps (+/-, * and /, // to /, % to //, ** to *, << and >>, & and |), comparisons (< and <=,
> and >=, == and !=, in and not in, is and is not), ``and``/``or``, a removed ``not`` or unary minus,
constants (n -> n+1, 1 -> 0, x -> x+1.0, True/False, a string made unmatchable), ``return x`` ->
``return None``, slice bounds off by one. Not mutated: docstrings, annotations, ``raise`` statements
and log calls (their text is a message, not logic).
"""

from __future__ import annotations

import argparse
import ast
import copy
import datetime as _dt
import importlib
import json
import os
import shutil
import signal
import sys
import tempfile
import time
import types
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
COPIED = ("mindcv_poolformer", "tests", "configs", "pyproject.toml", "train.py", "validate.py", "export.py")


@dataclass(frozen=True)
class Target:
    """One module: the top-level names to mutate (``Class.method`` for one method) and its fast tests."""

    path: str
    names: tuple[str, ...]
    tests: tuple[str, ...]
    warm: tuple[str, ...] = ()  # modules imported once in the parent so each child starts fast


KILLS = "tests/test_mutation_kills.py"
_APPLY_FAILED = 97  # a child's exit code when the mutant could not be applied
# listing's functions moved out of train/data.py (one file per target); both keep the tests they had together
_DATA_TESTS = ("tests/test_train_data.py::test_mixer_mixes_pairs",
               "tests/test_train_data.py::test_epoch_order_and_shards", f"{KILLS}::TestData")

TARGETS: dict[str, Target] = {
    "schedule": Target(
        "mindcv_poolformer/train/schedule.py", ("scaled_lr", "_decay_value", "build_lr_schedule"),
        ("tests/test_train_schedule_optim.py::test_linear_lr_scaling",
         "tests/test_train_schedule_optim.py::test_warmup_cosine_cooldown_values",
         "tests/test_train_schedule_optim.py::test_epoch_stair_and_step_decay",
         "tests/test_segmentation_train.py::test_poly_schedule_is_mmengine_poly_lr",
         f"{KILLS}::TestSchedule"),
        ("mindcv_poolformer.train.optim",)),
    "config": Target(
        "mindcv_poolformer/config.py",
        ("Config", "_suggest", "_number", "_coerce", "_check", "_accepted_range", "_normalise_choice", "_set",
         "is_mindcv_recipe", "_read_recipe", "_recipe_style", "_resolve", "_note_mindcv", "_validate_model",
         "load_config", "parse_cli"),
        ("tests/test_train_config.py::test_mindcv_recipe_loads_unchanged",
         "tests/test_train_config.py::test_official_recipes",
         "tests/test_train_config.py::test_other_recipes_load",
         "tests/test_train_config.py::test_loss_scale_plans",
         "tests/test_train_config.py::test_config_errors_are_one_line",
         "tests/test_train_config.py::test_run_dir_guard",
         "tests/test_train_config.py::test_saved_config_roundtrip",
         f"{KILLS}::TestConfig"),
        ("mindcv_poolformer.train.trainer", "mindcv_poolformer.train.run_io", "mindcv_poolformer.distributed")),
    "checkpoint": Target(
        "mindcv_poolformer/checkpoint.py",
        ("is_segmentation_state", "_split_backbone", "detect_layout", "_GN_AFFINE", "_HF_RULES", "_TIMM_RULES",
         "_OFFICIAL_RULES", "_BN_NAMES", "_MMSEG_RULES", "_apply_rules", "to_canonical", "_mmseg_to_canonical",
         "split_model_state", "_MODEL_KEY", "infer_architecture", "match_variant", "model_name"),
        (f"{KILLS}::TestCheckpointKeys",),
        ("torch", "transformers.models.poolformer.modeling_poolformer", "helpers")),
    "listing": Target(
        "mindcv_poolformer/data/listing.py", ("augmentation_seed", "epoch_order", "shard_indices"),
        _DATA_TESTS, ("sklearn.datasets",)),
    "data": Target(
        "mindcv_poolformer/train/data.py", ("SoftTargetMixer",), _DATA_TESTS, ("sklearn.datasets",)),
    "evaluate": Target(
        "mindcv_poolformer/evaluation/classification.py", ("_batch_metrics", "evaluate"),
        (f"{KILLS}::TestTopK",), ("torch",)),
    "miou": Target(
        "mindcv_poolformer/evaluation/miou.py",
        ("intersect_and_union", "all_reduce_counts", "IoUHistogram", "_nanmean"),
        ("tests/test_segmentation_eval.py::test_miou_equals_mmseg_iou_metric",
         "tests/test_segmentation_eval.py::test_limb_all_reduce_is_exact_beyond_float32",
         f"{KILLS}::TestMIoU"),
        ("torch", "mmseg_reference:_import_mmseg", "mmseg.evaluation.metrics")),
}

_DEAD_ELSE = ("dead branch: `_decay_value` always gets `length` = decay_len >= 1 (`max(..., 1)` or decay_epochs * "
              "steps_per_epoch with decay_epochs >= 1), so `cycle_len > 0` always holds")
_MIOU_SLICE = ("the values binned are already masked to [0, num_classes), so np.bincount(minlength=num_classes) "
               "has exactly num_classes bins and the slice is a no-op either way")
_WHOLE_MATCH = "the pattern is `^(...)$`, so the whole match m[0] is the one group m[1]"
_FROM_CLI = ("from_cli only turns 'none'/'null' text into no value; recipe_defaults has choices, so either way "
             "that text is refused with the same message ('none' is not one of auto, mindcv, ours)")
_BOX_UPPER = ("the box's upper edge (the lower edge's mutant is killed): cy + ch / 2 >= 0, so int() of it, "
              "taken on return, is cy + ch // 2")
_NONNEG_FLOOR = "t, epoch >= 0 and period, cycle_len > 0: int(a / b) == a // b for non-negative a, positive b"
_SEED_CONTRACT = ("the contract is 'distinct per rank and per epoch' (tested over 16 ranks x 300 epochs) and a "
                  "positive int32; any other such constant or sign keeps it; pinning the value would test our own "
                  "output")
_RESHAPE = ("reshape(-2): numpy 1.x (pinned < 2) takes any negative size as the one inferred dimension, "
            "so it is reshape(-1)")
_ONE_IMAGE = "n == 1: the pair loop runs n // 2 = 0 times, so mixing one image with itself is a no-op"
_CLOSEST = "get_close_matches(n=2)[0] is the same closest match as n=1"

# Survivors judged equivalent (no input can tell them apart from the original), keyed by (module, top-level
# name, mutation, snippet): an entry covers a survivor of that mutation in that function or table whose source
# line contains the snippet, so it follows its code when lines move and stops matching when the line is edited.
# Like a line number, a snippet cannot tell apart two sites of one mutation on one line (e.g. the box's two
# `// 2`): the other site's mutant must be killed, and the report says which entries matched nothing.
EQUIVALENT: dict[tuple[str, str, str, str], str] = {
    ("schedule", "_decay_value", "1 -> 0", 'max(int(s.decay_epochs) or 1, 1)'):
        "decay_epochs >= 0 (schema): `max(d or 1, 1)`, `max(d or 0, 1)` and `max(d or 1, 0)` are all `max(d, 1)` "
        "there",
    ("schedule", "_decay_value", "// -> /", "** int(epoch // period)"): _NONNEG_FLOOR,
    ("schedule", "_decay_value", "// -> /", "cycle = min(int(t // cycle_len)"): _NONNEG_FLOOR,
    ("schedule", "_decay_value", "> -> >=", "cycle = min(int(t // cycle_len)"): _DEAD_ELSE,
    ("schedule", "_decay_value", "0 -> 1", "cycle = min(int(t // cycle_len)"):
        _DEAD_ELSE + " (this is the else value; the `> 0` -> `> 1` mutant is killed)",
    ("schedule", "_decay_value", "> -> >=", "local = (t - cycle * cycle_len)"): _DEAD_ELSE,
    ("schedule", "_decay_value", "1.0 -> 2.0", "local = (t - cycle * cycle_len)"): _DEAD_ELSE,
    ("schedule", "_decay_value", "1.0 -> 2.0", "min(local, 1.0)"):
        "local <= 1 always: t <= length and the last cycle is cycles - 1, so (t - (cycles - 1) * cycle_len) / "
        "cycle_len <= 1 and min(local, x >= 1) == local",
    ("schedule", "build_lr_schedule", "and -> or", 'if kind == "cosine_decay" and s.decay_epochs'):
        "decay_epochs only sets decay_len, and decay_len only reaches the cosine: step, multi-step and constant "
        "ignore t and length",
    ("schedule", "build_lr_schedule", "1 -> 2", "max(main_steps - warmup_steps, 1)"):
        "max(main - warmup, 1) differs only when main - warmup <= 1: then the cosine has at most one step, t = 0, "
        "which is the peak for any length",
    ("schedule", "build_lr_schedule", "1 -> 0", "max(main_steps - warmup_steps, 1)"):
        "max(main - warmup, 0) differs only when main <= warmup: then no step reaches the decay branch and "
        "cosine's cooldown is min_lr",
    ("schedule", "build_lr_schedule", "'cosine_decay' -> 'XX' + 'cosine_decay'",
     'out[step] = min_lr if kind == "cosine_decay"'):
        "the cooldown's shortcut: `_decay_value` of the cosine at t = length is min_lr too (local = 1, "
        "cos(pi) = -1), for any number of cycles",
    ("listing", "augmentation_seed", "1000003 -> 1000004", "return (int(seed) + 1_000_003"): _SEED_CONTRACT,
    ("listing", "augmentation_seed", "7919 -> 7920", "return (int(seed) + 1_000_003"): _SEED_CONTRACT,
    ("listing", "augmentation_seed", "+ -> -", "return (int(seed) + 1_000_003"): _SEED_CONTRACT,
    ("listing", "augmentation_seed", "1 -> 2", "return (int(seed) + 1_000_003"):
        _SEED_CONTRACT + " (modulus 2**31 - 2)",
    ("listing", "epoch_order", "24301 -> 24302", "0x5EED"):
        "the salt 0x5EED of the epoch permutation: any fixed salt gives a reproducible order per (seed, epoch) "
        "that differs across seeds and epochs (tested)",
    ("listing", "shard_indices", "1 -> 0", "if world < 1 or"):
        "world < 0 instead of < 1: world == 0 still raises, as no rank satisfies 0 <= rank < 0",
    ("data", "SoftTargetMixer", "1.0 -> 2.0", "prob: float = 1.0"):
        "the default prob 1.0 -> 2.0: rng.random() < 1 <= prob either way, every batch mixes",
    ("data", "SoftTargetMixer", "1 -> 2", "self.targets(np.asarray(labels).reshape(-1))"): _RESHAPE,
    ("data", "SoftTargetMixer", ">= -> >", "rng.random() >= self.prob"):
        "differs only when rng.random() equals prob exactly (probability 2**-53 per batch)",
    ("data", "SoftTargetMixer", "< -> <=", "rng.random() < self.switch_prob"):
        "differs only when rng.random() equals switch_prob exactly (probability 2**-53)",
    ("data", "SoftTargetMixer", "1 -> 0", "elif n > 1:"): _ONE_IMAGE,
    ("data", "SoftTargetMixer", "> -> >=", "elif n > 1:"): _ONE_IMAGE,
    ("data", "SoftTargetMixer", "0 -> 1", "delta, scratch = np.empty_like(images[0]), np.empty_like(images[0])"):
        "images[1] instead of images[0] as the template of two scratch buffers: same shape and dtype (n >= 2 "
        "here), and every element is written before it is read",
    ("data", "SoftTargetMixer", "// -> /", "np.clip(cy + ch // 2, 0, height)"): _BOX_UPPER,
    ("data", "SoftTargetMixer", "// -> /", "np.clip(cx + cw // 2, 0, width)"): _BOX_UPPER,
    ("evaluate", "evaluate", "0 -> 1", "warm_start, warm_count = start, 0"):
        "the initial warm_count is replaced after the first batch; with no batch count is 0 and both 0 > 0 and "
        "0 > 1 take the whole-loop branch (0 images/s)",
    ("evaluate", "evaluate", "1 -> 2", "labels = np.asarray(labels).astype(np.int64).reshape(-1)"): _RESHAPE,
    ("evaluate", "evaluate", "< -> <=", "if n < pad_to:"):
        "n == pad_to pads with zero rows: np.concatenate with an empty (0, C, H, W) array",
    ("evaluate", "evaluate", "True -> False", "samples, top-1"):
        "flush of the progress line: buffering only, the text is the same",
    ("miou", "intersect_and_union", "< -> <=", "keep_pred = (pred >= 0) & (pred < num_classes)"):
        "a prediction equal to num_classes lands in bin num_classes, which `[:num_classes]` cuts",
    ("miou", "intersect_and_union", "< -> <=", "label[(label >= 0) & (label < num_classes)]"):
        "a label equal to num_classes lands in bin num_classes, which `[:num_classes]` cuts",
    ("miou", "intersect_and_union", "slice upper x -> x + 1", "minlength=num_classes)[:num_classes]"): _MIOU_SLICE,
    ("miou", "all_reduce_counts", "0 -> 1", "summed.max(initial=0) >= 2 ** 24"):
        "max(initial=1) differs from max(initial=0) only when every sum is 0 (or none): both stay below 2**24",
    ("miou", "IoUHistogram", "1 -> 2", "self.areas.reshape(-1)"): _RESHAPE,
    ("checkpoint", "_OFFICIAL_RULES", "1 -> 0", '(re.compile(r"^(.*)$"), lambda m: m[1])'): _WHOLE_MATCH,
    ("checkpoint", "_MMSEG_RULES", "1 -> 0", ')$"), lambda m: m[1])'): _WHOLE_MATCH,
    ("config", "_suggest", "1 -> 2", "get_close_matches(key, SCHEMA, n=1)"): _CLOSEST,
    ("config", "_coerce", "or -> and", "if opt.nullable or opt.default is None:"):
        "in the schema every key with default None is nullable and every nullable key defaults to None (checked), "
        "so `nullable or default is None` == `... and ...`",
    ("config", "_check", "and -> or", "isinstance(value, (int, float)) and not isinstance(value, bool)"):
        "only int/float keys have low/high in the schema (checked), so range-checking bools, strings and lists as "
        "well changes nothing",
    ("config", "_recipe_style", "True -> False", "((cli, True), (overrides, False), (recipe, False))"): _FROM_CLI,
    ("config", "_recipe_style", "False -> True", "((cli, True), (overrides, False), (recipe, False))"): _FROM_CLI,
    ("config", "_recipe_style", "'recipe_defaults' -> 'XX' + 'recipe_defaults'",
     'layer["recipe_defaults"], "recipe_defaults", from_cli)'):
        "the `source` argument of `_set` (its 4th; the key mutant is killed): it is named only in the unknown-key "
        "error, and this key is known",
    ("config", "_resolve", "> -> >=", 'abs(cfg["warmup_lr"] - derived) > 1e-12'):
        "differs only when |warmup_lr - lr * warmup_factor| is exactly 1e-12",
    ("config", "_validate_model", "1 -> 2", "get_close_matches(cfg.model, list_models(), n=1)"): _CLOSEST,
    ("config", "load_config", "'MindCV defaults' -> 'XX' + 'MindCV defaults'",
     '_set(cfg, key, value, "MindCV defaults", from_cli=False)'):
        "the source named by an unknown-key error; every MINDCV_DEFAULTS key is a schema key",
    ("config", "load_config", "False -> True", '_set(cfg, key, value, "MindCV defaults", from_cli=False)'):
        "from_cli only turns 'none'/'null' text into no value; no MINDCV_DEFAULTS value is such text",
}


# ---------------------------------------------------------------------------------------------- mutations

_BINOP = {ast.Add: ast.Sub, ast.Sub: ast.Add, ast.Mult: ast.Div, ast.Div: ast.Mult, ast.FloorDiv: ast.Div,
          ast.Mod: ast.FloorDiv, ast.Pow: ast.Mult, ast.LShift: ast.RShift, ast.RShift: ast.LShift,
          ast.BitAnd: ast.BitOr, ast.BitOr: ast.BitAnd}
_CMP = {ast.Lt: ast.LtE, ast.LtE: ast.Lt, ast.Gt: ast.GtE, ast.GtE: ast.Gt, ast.Eq: ast.NotEq, ast.NotEq: ast.Eq,
        ast.In: ast.NotIn, ast.NotIn: ast.In, ast.Is: ast.IsNot, ast.IsNot: ast.Is}
_SYMBOL = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/", ast.FloorDiv: "//", ast.Mod: "%", ast.Pow: "**",
           ast.LShift: "<<", ast.RShift: ">>", ast.BitAnd: "&", ast.BitOr: "|", ast.Lt: "<", ast.LtE: "<=",
           ast.Gt: ">", ast.GtE: ">=", ast.Eq: "==", ast.NotEq: "!=", ast.In: "in", ast.NotIn: "not in",
           ast.Is: "is", ast.IsNot: "is not", ast.And: "and", ast.Or: "or"}


def _is_message_call(node: ast.AST) -> bool:
    """A log call or an exception constructed outside ``raise``: its arguments are message text."""
    if not isinstance(node, ast.Call):
        return False
    func = node.func
    if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) and func.value.id == "_LOG":
        return True
    name = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else ""
    return name.endswith("Error")


class _Mutator(ast.NodeTransformer):
    """Walks one statement in a fixed order; each mutation site gets a number. Applies mutation ``target``
    (or none, with target -1) and records every site's (line, description)."""

    def __init__(self, target: int = -1) -> None:
        self.target = target
        self.count = 0
        self.sites: list[tuple[int, str]] = []
        self.applied: tuple[int, str] | None = None

    def _site(self, node: ast.AST, description: str) -> bool:
        """Register a site; True when it is the one to apply."""
        index = self.count
        self.count += 1
        self.sites.append((getattr(node, "lineno", 0), description))
        if index == self.target:
            self.applied = self.sites[-1]
            return True
        return False

    # nodes whose subtrees are never mutated
    def visit_Raise(self, node: ast.Raise) -> ast.AST:
        return node

    def visit_JoinedStr(self, node: ast.JoinedStr) -> ast.AST:
        # f-strings: the formatted expressions are logic (keys built by the key maps), the text is kept
        for value in node.values:
            if isinstance(value, ast.FormattedValue):
                value.value = self.visit(value.value)
        return node

    def visit_Call(self, node: ast.Call) -> ast.AST:
        if _is_message_call(node):
            return node
        return self.generic_visit(node)

    def visit_FunctionDef(self, node: ast.FunctionDef) -> ast.AST:
        node.args.defaults = [self.visit(d) for d in node.args.defaults]
        node.args.kw_defaults = [self.visit(d) if d is not None else None for d in node.args.kw_defaults]
        doc = node.body[:1] if (node.body and isinstance(node.body[0], ast.Expr)
                                and isinstance(node.body[0].value, ast.Constant)
                                and isinstance(node.body[0].value.value, str)) else []
        node.body = doc + [self.visit(stmt) for stmt in node.body[len(doc):]]
        return node

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_ClassDef(self, node: ast.ClassDef) -> ast.AST:
        doc = node.body[:1] if (node.body and isinstance(node.body[0], ast.Expr)
                                and isinstance(node.body[0].value, ast.Constant)
                                and isinstance(node.body[0].value.value, str)) else []
        node.body = doc + [self.visit(stmt) for stmt in node.body[len(doc):]]
        return node

    def visit_AnnAssign(self, node: ast.AnnAssign) -> ast.AST:
        if node.value is not None:
            node.value = self.visit(node.value)
        return node

    # mutation sites
    def visit_BinOp(self, node: ast.BinOp) -> ast.AST:
        self.generic_visit(node)
        swap = _BINOP.get(type(node.op))
        if swap and self._site(node, f"{_SYMBOL[type(node.op)]} -> {_SYMBOL[swap]}"):
            node.op = swap()
        return node

    def visit_AugAssign(self, node: ast.AugAssign) -> ast.AST:
        self.generic_visit(node)
        swap = _BINOP.get(type(node.op))
        if swap and self._site(node, f"{_SYMBOL[type(node.op)]}= -> {_SYMBOL[swap]}="):
            node.op = swap()
        return node

    def visit_Compare(self, node: ast.Compare) -> ast.AST:
        self.generic_visit(node)
        for i, op in enumerate(node.ops):
            swap = _CMP[type(op)]
            if self._site(node, f"{_SYMBOL[type(op)]} -> {_SYMBOL[swap]}"):
                node.ops[i] = swap()
        return node

    def visit_BoolOp(self, node: ast.BoolOp) -> ast.AST:
        self.generic_visit(node)
        swap = ast.Or if isinstance(node.op, ast.And) else ast.And
        if self._site(node, f"{_SYMBOL[type(node.op)]} -> {_SYMBOL[swap]}"):
            node.op = swap()
        return node

    def visit_UnaryOp(self, node: ast.UnaryOp) -> ast.AST:
        self.generic_visit(node)
        if isinstance(node.op, ast.Not) and self._site(node, "not x -> x"):
            return node.operand
        if isinstance(node.op, ast.USub) and self._site(node, "-x -> x"):
            return node.operand
        return node

    def visit_Constant(self, node: ast.Constant) -> ast.AST:
        value = node.value
        if isinstance(value, bool):
            if self._site(node, f"{value} -> {not value}"):
                return ast.copy_location(ast.Constant(not value), node)
        elif isinstance(value, int):
            if self._site(node, f"{value} -> {value + 1}"):
                return ast.copy_location(ast.Constant(value + 1), node)
            if value == 1 and self._site(node, "1 -> 0"):
                return ast.copy_location(ast.Constant(0), node)
        elif isinstance(value, float):
            if self._site(node, f"{value!r} -> {value + 1.0!r}"):
                return ast.copy_location(ast.Constant(value + 1.0), node)
        elif isinstance(value, str):
            if self._site(node, f"{value!r} -> 'XX' + {value!r}"):
                return ast.copy_location(ast.Constant("XX" + value), node)
        return node

    def visit_Return(self, node: ast.Return) -> ast.AST:
        self.generic_visit(node)
        if node.value is not None and not (isinstance(node.value, ast.Constant) and node.value.value is None):
            if self._site(node, "return x -> return None"):
                node.value = None
        return node

    def visit_Slice(self, node: ast.Slice) -> ast.AST:
        self.generic_visit(node)
        for bound in ("lower", "upper"):
            value = getattr(node, bound)
            if value is not None and self._site(value, f"slice {bound} x -> x + 1"):
                setattr(node, bound, ast.BinOp(value, ast.Add(), ast.Constant(1)))
        return node


@dataclass
class Mutant:
    module: str
    stmt: int  # index of the top-level statement in the module
    name: str
    site: int  # mutation number inside that statement
    line: int
    description: str
    source: str = ""
    outcome: str = ""
    seconds: float = 0.0

    @property
    def key(self) -> str:
        return f"{self.module}:{self.name}:{self.site}:{self.line}:{self.description}"


def _top_level_name(stmt: ast.stmt) -> str | None:
    if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return stmt.name
    if isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and isinstance(stmt.targets[0], ast.Name):
        return stmt.targets[0].id
    if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
        return stmt.target.id
    return None


def enumerate_mutants(module: str, root: Path = REPO) -> tuple[list[Mutant], ast.Module]:
    target = TARGETS[module]
    source = (root / target.path).read_text(encoding="utf-8")
    tree = ast.parse(source)
    lines = source.splitlines()
    mutants: list[Mutant] = []
    found = set()
    for index, stmt in enumerate(tree.body):
        name = _top_level_name(stmt)
        if name not in target.names:
            continue
        found.add(name)
        walker = _Mutator()
        walker.visit(copy.deepcopy(stmt))
        for site, (line, description) in enumerate(walker.sites):
            mutants.append(Mutant(module, index, name, site, line, description, lines[line - 1].strip()))
    missing = set(target.names) - found
    if missing:
        raise SystemExit(f"mutation: {module}: no top-level {', '.join(sorted(missing))} in {target.path}")
    return mutants, tree


# ---------------------------------------------------------------------------------------------- applying


def _apply(mutant: Mutant, tree: ast.Module, live: types.ModuleType) -> None:
    """Make ``live`` (the imported module) behave as the mutated source, in this (child) process only."""
    stmt = copy.deepcopy(tree.body[mutant.stmt])
    walker = _Mutator(mutant.site)
    stmt = walker.visit(stmt)
    if walker.applied is None:
        raise RuntimeError(f"mutation {mutant.site} not found in {mutant.name}")
    ast.fix_missing_locations(stmt)
    code = compile(ast.Module([stmt], []), live.__file__, "exec")
    old = live.__dict__[mutant.name]
    exec(code, live.__dict__)  # noqa: S102 - the mutated statement, in the module's own globals
    new = live.__dict__[mutant.name]
    if isinstance(old, types.FunctionType):
        _swap_function(old, new)
        live.__dict__[mutant.name] = old
    elif isinstance(old, type):
        for key, value in vars(new).items():
            if isinstance(value, (types.FunctionType, staticmethod, classmethod, property)):
                current = vars(old).get(key)
                if isinstance(value, types.FunctionType) and isinstance(current, types.FunctionType):
                    _swap_function(current, value)
                else:
                    setattr(old, key, value)
        live.__dict__[mutant.name] = old
    else:  # a module-level table: every module that imported the old object gets the new one
        for module in list(sys.modules.values()):
            namespace = getattr(module, "__dict__", None)
            if not namespace or module is live:
                continue
            for key, value in list(namespace.items()):
                if value is old:
                    namespace[key] = new


def _swap_function(old: types.FunctionType, new: types.FunctionType) -> None:
    old.__code__ = new.__code__
    old.__defaults__ = new.__defaults__
    old.__kwdefaults__ = new.__kwdefaults__


def _collect(tests: tuple[str, ...]):
    """A pytest session with ``tests`` collected (nothing run): each child runs it, so only the tests cost."""
    from _pytest.config import _prepareconfig
    from _pytest.main import Session

    config = _prepareconfig([*tests, "-x", "-q", "-s", "-p", "no:cacheprovider", "--no-header", "-W",
                             "ignore"])  # -s: the report goes to fd 1, which each child points at its log
    config._do_configure()
    session = Session.from_config(config)
    config.hook.pytest_sessionstart(session=session)
    session.perform_collect()
    if session.testsfailed or not session.items:
        raise SystemExit(f"mutation: collecting {' '.join(tests)} failed or found no tests")
    return session


def _run_tests(session, log: str) -> int:
    """Run the collected tests in this (child) process, output to ``log``: 0 when all pass."""
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    try:
        session.config.hook.pytest_runtestloop(session=session)
    except (session.Failed, session.Interrupted):  # -x stops at the first failure
        pass
    session.config.hook.pytest_terminal_summary(terminalreporter=session.config.pluginmanager.get_plugin(
        "terminalreporter"), exitstatus=1 if session.testsfailed else 0, config=session.config)
    sys.stdout.flush()
    return 1 if session.testsfailed else 0


def _in_child(func, timeout: float) -> tuple[str, int, float]:
    """Run ``func() -> exit code`` in a forked child: ('ok'|'failed'|'timeout', code, seconds)."""
    start = time.perf_counter()
    pid = os.fork()
    if pid == 0:
        code = 3
        try:
            code = func()
        except BaseException:  # noqa: B036 - anything the mutant breaks counts as a failure
            import traceback

            traceback.print_exc()
            code = 3
        finally:
            os._exit(code)
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            code = os.waitstatus_to_exitcode(status)
            return ("ok" if code == 0 else "failed"), code, time.perf_counter() - start
        if time.perf_counter() - start > timeout:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return "timeout", -9, time.perf_counter() - start
        time.sleep(0.02)


# ---------------------------------------------------------------------------------------------- run


@dataclass
class ModuleResult:
    module: str
    mutants: list[Mutant] = field(default_factory=list)
    baseline_s: float = 0.0

    def count(self, outcome: str) -> int:
        return sum(m.outcome == outcome for m in self.mutants)

    @property
    def mean_s(self) -> float:
        timed = [m.seconds for m in self.mutants if m.seconds]
        return sum(timed) / len(timed) if timed else 0.0

    @property
    def percent(self) -> float:
        total = len(self.mutants) - self.count("error")
        return 100.0 * (self.count("killed") + self.count("timeout")) / total if total else 100.0


def _copy_repo(dst: Path) -> None:
    for name in COPIED:
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, dst / name, ignore=shutil.ignore_patterns("__pycache__", "*.so", "*.pyc"))
        elif src.exists():
            shutil.copy2(src, dst / name)


def run(modules: list[str], timeout_factor: float, limit: int | None, log_dir: Path,
        previous: dict[str, str] | None = None) -> list[ModuleResult]:
    """Run every mutant of ``modules``; with ``previous`` (key -> outcome), only the former survivors.

    Tests are only ever added between runs, so a mutant killed before is still killed: re-running
    the survivors alone gives the same table, faster.
    """
    work = Path(tempfile.mkdtemp(prefix="mutation-"))
    _copy_repo(work)
    os.chdir(work)
    sys.path[:0] = [str(work), str(work / "tests")]
    os.environ.setdefault("GLOG_v", "3")
    import mindspore  # noqa: F401 - imported once here; never run an op in this process (see the module doc)

    import mindcv_poolformer  # noqa: F401

    results = []
    for module in modules:
        target = TARGETS[module]
        for name in target.warm:  # "module" or "module:function" (called with no arguments)
            module_name, _, func = name.partition(":")
            try:
                warmed = importlib.import_module(module_name)
            except ImportError:
                continue
            if func:
                getattr(warmed, func)()
        mutants, tree = enumerate_mutants(module, work)
        if limit:
            mutants = mutants[:limit]
        live = importlib.import_module(target.path[:-3].replace("/", "."))
        assert Path(live.__file__).resolve() == (work / target.path).resolve(), live.__file__
        result = ModuleResult(module, mutants)
        log = str(log_dir / f"{module}-baseline.log")
        session = _collect(target.tests)
        outcome, code, seconds = _in_child(lambda ss=session, lg=log: _run_tests(ss, lg), 600)
        if outcome != "ok":
            raise SystemExit(f"mutation: {module}: the unmutated tests do not pass (exit {code}); see {log}")
        result.baseline_s = seconds
        timeout = max(20.0, timeout_factor * seconds)
        print(f"{module}: {len(mutants)} mutants, baseline {seconds:.1f} s, timeout {timeout:.0f} s", flush=True)
        for i, mutant in enumerate(mutants, 1):
            log = str(log_dir / f"{module}-{i:04d}.log")
            if previous and previous.get(mutant.key, "survived") != "survived":
                mutant.outcome = previous[mutant.key]
                print(",", end="" if i % 80 else "\n", flush=True)
                continue

            def child(m=mutant, lg=log, ss=session, tr=tree, lv=live) -> int:
                try:
                    _apply(m, tr, lv)
                except Exception:  # the tool's fault, not a kill: reported as an error
                    import traceback

                    traceback.print_exc()
                    return _APPLY_FAILED
                return _run_tests(ss, lg)

            outcome, code, mutant.seconds = _in_child(child, timeout)
            mutant.outcome = {"ok": "survived", "failed": "killed", "timeout": "timeout"}[outcome]
            if code == _APPLY_FAILED:
                mutant.outcome = "error"
            if mutant.outcome != "survived":
                os.remove(log) if os.path.exists(log) else None
            mark = {"killed": ".", "timeout": "T", "survived": "S", "error": "E"}[mutant.outcome]
            print(mark, end="" if i % 80 else "\n", flush=True)
        print(flush=True)
        results.append(result)
    shutil.rmtree(work, ignore_errors=True)
    return results


def equivalent_reason(mutant: Mutant) -> str:
    """Why ``mutant`` survives although the tests are right, or '' when no ``EQUIVALENT`` entry covers it."""
    for (module, name, description, snippet), why in EQUIVALENT.items():
        if (module, name, description) == (mutant.module, mutant.name, mutant.description) \
                and snippet in mutant.source:
            return why
    return ""


def unmatched_entries(results: list[ModuleResult]) -> list[tuple[str, str, str, str]]:
    """``EQUIVALENT`` entries of the modules run that cover no survivor: killed now, or their line was edited."""
    run = {r.module for r in results}
    survivors = [m for r in results for m in r.mutants if m.outcome == "survived"]
    return [key for key in EQUIVALENT if key[0] in run and not any(
        (m.module, m.name, m.description) == key[:3] and key[3] in m.source for m in survivors)]


def report(results: list[ModuleResult], argv: list[str]) -> str:
    lines = ["# Mutation run (issue 18)", "",
             f"`python tools/mutation.py {' '.join(argv)}` at {_dt.datetime.utcnow():%Y-%m-%d %H:%M} UTC. "
             "Killed = a selected fast test failed; timed out counts as killed (the mutant hangs the code). "
             "Mutation operators and the rules are in `tools/mutation.py`'s docstring; the tests per module "
             "are its `TARGETS`.", "",
             "| module | mutated | mutants | killed | survived | timed out | tool errors | equivalent | % killed | "
             "% killed, equivalent excluded | tests' time | mean per mutant |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        target = TARGETS[r.module]
        equivalent = sum(m.outcome == "survived" and bool(equivalent_reason(m)) for m in r.mutants)
        scored = len(r.mutants) - r.count("error")
        killed = r.count("killed") + r.count("timeout")
        net = 100.0 * killed / (scored - equivalent) if scored - equivalent else 100.0
        counts = " | ".join(str(r.count(k)) for k in ("killed", "survived", "timeout", "error"))
        lines.append(f"| `{target.path}` | {', '.join(f'`{n}`' for n in target.names)} | {len(r.mutants)} | "
                     f"{counts} | {equivalent} | {r.percent:.1f} | {net:.1f} | {r.baseline_s:.1f} s | "
                     f"{r.mean_s:.1f} s |")
    for r in results:
        survivors = [m for m in r.mutants if m.outcome == "survived"]
        lines += ["", f"## {r.module}: {len(survivors)} survivors", ""]
        if not survivors:
            lines.append("None.")
            continue
        lines += ["| line | in | mutation | source line | equivalent because |", "|---|---|---|---|---|"]
        for m in survivors:
            why = equivalent_reason(m)
            source = m.source.replace("|", "\\|")
            lines.append(f"| {m.line} | `{m.name}` | `{m.description}` | `{source}` | {why} |")
    unmatched = unmatched_entries(results)
    if unmatched:
        lines += ["", "## Equivalent-table entries that covered no survivor", "",
                  "| module | in | mutation | snippet |", "|---|---|---|---|"]
        for module, name, description, snippet in unmatched:
            snippet = snippet.replace("|", "\\|")
            lines.append(f"| {module} | `{name}` | `{description}` | `{snippet}` |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--module", nargs="*", choices=sorted(TARGETS), default=list(TARGETS))
    parser.add_argument("--list", action="store_true", help="print the mutants and exit")
    parser.add_argument("--limit", type=int, default=None, help="only the first N mutants of each module")
    parser.add_argument("--timeout-factor", type=float, default=4.0, help="per-mutant timeout, x baseline")
    parser.add_argument("--out", default=None, help="report path (default bench/results/mutation-<time>.md)")
    parser.add_argument("--rerun-survivors", default=None, metavar="JSON",
                        help="outcomes of an earlier run (its .json): run only its survivors, keep the rest")
    args = parser.parse_args(argv)
    if args.list:
        for module in args.module:
            for m in enumerate_mutants(module)[0]:
                print(f"{module}:{m.line}: {m.name}: {m.description}    # {m.source}")
        return 0
    stamp = _dt.datetime.utcnow().strftime("%Y%m%d-%H%M%S")
    log_dir = Path(tempfile.mkdtemp(prefix=f"mutation-logs-{stamp}-"))
    previous = json.loads(Path(args.rerun_survivors).read_text()) if args.rerun_survivors else None
    results = run(args.module, args.timeout_factor, args.limit, log_dir, previous)
    text = report(results, argv)
    out = Path(args.out) if args.out else REPO / "bench" / "results" / f"mutation-{stamp}.md"
    out.write_text(text, encoding="utf-8")
    outcomes = {m.key: m.outcome for r in results for m in r.mutants}
    out.with_suffix(".json").write_text(json.dumps(outcomes, indent=0), encoding="utf-8")
    print(text)
    print(f"wrote {out}; survivors' pytest logs in {log_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
