"""Derive the primitives that have an Ascend kernel in MindSpore 2.10 -> ``backends/ascend_primitives.json``.

Why from the release wheel and not the source tree: the ``mindspore-ai/mindspore`` mirror is over
the 500 MiB fetch limit of this workplace, and the code index holds only a partial selection of its
files from mixed versions (no op yaml at all). The installed ``mindspore==2.10.0`` wheel is the build of that release
(``mindspore/.commit_id``: ``2d550373``, branch ``r2.10``), and it ships every Ascend plugin
library: the kernel registries MindSpore selects from on an NPU are filled by static
registrations compiled into them. This tool reads those registrations back out of the binaries
(``objdump`` of GNU binutils, no execution of Ascend code) plus the op-info files the wheel ships.

Sources (the keys of ``primitives[name]``), with the source-level registration each one reads:

- ``aclnn_kernel``: ``MS_ACLNN_KERNEL_FACTORY_REG(Name, Class)`` and
  ``MS_ACLNN_COMMON_KERNEL_FACTORY_REG(Name, aclnnFn, N)`` (the latter generated from the op yaml's
  ``dispatch: enable: True`` with ``Ascend: default``, ``ops_generate/aclnn/*``) in
  ``lib/plugin/libmindspore_ops_ascend.so``: each registration builds ``std::string("Name")`` and
  calls the AclnnKernelMod factory; the factory's call pair is the one whose names contain every
  ``Aclnn<Name>KernelMod<N>`` class of the library's RTTI (checked, see ``anchor_coverage``).
  These are the kernels of jit_level O0/O1 (KBK, the default on 910B).
- ``pyboost_ascend``: RTTI classes ``mindspore::kernel::pyboost::<Name>Ascend`` of the same
  library: the op yaml's ``dispatch`` Ascend implementation of PyNative mode.
- ``ge_adapter``: ``REG_ADPT_DESC(T, name, ...)`` (``OpAdapterMap::get()[name] = ...``) in
  ``lib/plugin/ascend/libmindspore_ascend_res_manager.so``; ``name`` is a string literal or
  ``prim::kPrim<Name>->name()``. An adapter maps the primitive to a CANN (GE) operator: what the GE
  backend (jit_level O2, MindSpore's default on 910A) compiles, and what KBK runs as an ACL op
  (``AclKernelMod``) where no aclnn kernel is registered.
- ``host_kernel``: ``MS_HOST_REG_KERNEL(Name, ...)`` (``HostKernelFactory::Get().Register``) in
  ``lib/libmindspore_ops_host.so`` and ``lib/plugin/libmindspore_ascend.so.2``.
- ``internal_kernel``: ``MS_INTERNAL_KERNEL_FACTORY_REG`` in
  ``lib/plugin/ascend/libmindspore_internal_kernels.so`` (anchored on its ``Internal<Name>`` RTTI).
- ``aicpu_op_info``: ``AiCPURegOp("Name")`` in ``mindspore/ops/_op_impl/aicpu/*.py`` (imported by
  ``ops/_op_impl/__init__.py``; the AICPU kernel info kernel selection reads).
- ``aicpu_custom_op_info``: ``lib/plugin/ascend/custom_aicpu_ops/op_impl/cpu/config/cust_aicpu_kernel.json``.
- ``ascendc_custom_op_info``: ``lib/plugin/ascend/custom_ascendc_910b/op_impl/ai_core/tbe/config/
  ascend910b/aic-ascend910b-ops-info.json`` (MindSpore's own AscendC ops, e.g. ``AllFinite``).
- ``unify_mindir_pass`` (not a kernel): a backend pass ``opt::<Name>UnifyMindIR`` (RTTI of
  ``lib/libmindspore_backend_common.so``) that the Ascend backends instantiate
  (``lib/plugin/libmindspore_ascend.so.2``: KBK, ``lib/libmindspore_ge_backend.so``: GE) rewrites
  ``<Name>`` before kernel selection; ``rewrites[<Name>]`` lists the primitives it creates where its
  ``Create<Primitive>`` methods name them (``AdamWeightDecay`` -> ``AdamApplyOneWithDecay[Assign]``).

What this does not see: other backend rewrites and the expander fallback of ops without a kernel;
a primitive handled only that way is reported missing, which errs on the safe side.
``prim::kPrim<Name>`` is read as the name ``<Name>``.

    .venv/bin/python tools/ascend_primitives.py            # writes mindcv_poolformer/backends/ascend_primitives.json
    .venv/bin/python tools/ascend_primitives.py --check    # fails if the JSON differs from a fresh derivation
"""

from __future__ import annotations

import argparse
import ast
import collections
import hashlib
import importlib.util
import json
import re
import shutil
import struct
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "mindcv_poolformer" / "backends" / "ascend_primitives.json"

_STRING_CTOR = "_ZNSsC1EPKcRKSaIcE@plt"  # std::string::string(const char*, const allocator&), pre-C++11 ABI
_ADAPTER_MAP_GET = "_ZN9mindspore6device6ascend12OpAdapterMap3getEv@plt"
_HOST_GET = "_ZN9mindspore6kernel17HostKernelFactory3GetEv"
_HOST_REGISTER = "_ZN9mindspore6kernel17HostKernelFactory8Register"
_OP_NAME = re.compile(r"[A-Z][A-Za-z0-9_]*")
_KPRIM = re.compile(r"_ZN9mindspore4prim\d+kPrim(\w+)E")
_LEA_RSI = re.compile(r"\blea\s+-?0x[0-9a-f]+\(%rip\),%rsi\s+# ([0-9a-f]+)")
_MOV_RIP = re.compile(r"\bmov\s+-?0x[0-9a-f]+\(%rip\),%r\w+\s+# ([0-9a-f]+)")
_CALL = re.compile(r"\bcall\s+([0-9a-f]+)\s+<([^>]*)>")

SOURCES = {
    "aclnn_kernel": "MS_ACLNN_KERNEL_FACTORY_REG / MS_ACLNN_COMMON_KERNEL_FACTORY_REG registrations (std::string(name) "
                    "then the AclnnKernelMod factory's Instance/Register pair) in "
                    "lib/plugin/libmindspore_ops_ascend.so",
    "pyboost_ascend": "RTTI classes mindspore::kernel::pyboost::<Name>Ascend in lib/plugin/libmindspore_ops_ascend.so "
                      "(op yaml dispatch, PyNative)",
    "ge_adapter": "REG_ADPT_DESC: OpAdapterMap::get()[name] with a string literal or prim::kPrim<Name>->name(), in "
                  "lib/plugin/ascend/libmindspore_ascend_res_manager.so (GE backend / ACL op kernels)",
    "host_kernel": "MS_HOST_REG_KERNEL: HostKernelFactory::Get().Register(std::string(name), ...) in "
                   "lib/libmindspore_ops_host.so and lib/plugin/libmindspore_ascend.so.2",
    "internal_kernel": "MS_INTERNAL_KERNEL_FACTORY_REG registrations in lib/plugin/ascend/"
                       "libmindspore_internal_kernels.so (the factory whose names contain its Internal<Name> RTTI)",
    "aicpu_op_info": 'AiCPURegOp("Name") in mindspore/ops/_op_impl/aicpu/*.py',
    "aicpu_custom_op_info": "keys of lib/plugin/ascend/custom_aicpu_ops/op_impl/cpu/config/cust_aicpu_kernel.json",
    "ascendc_custom_op_info": "keys of lib/plugin/ascend/custom_ascendc_910b/op_impl/ai_core/tbe/config/ascend910b/"
                              "aic-ascend910b-ops-info.json",
    "unify_mindir_pass": "not a kernel: rewritten before kernel selection by opt::<Name>UnifyMindIR of "
                         "lib/libmindspore_backend_common.so, instantiated by the Ascend KBK and/or GE backend "
                         "(see rewrites)",
}
KERNEL_SOURCES = [name for name in SOURCES if name != "unify_mindir_pass"]
_PASS_USERS = {"kbk": "plugin/libmindspore_ascend.so.2", "ge": "libmindspore_ge_backend.so"}


class Elf:
    """The parts of an x86-64 ELF shared library needed to read string literals and GOT slots."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.data = path.read_bytes()
        shoff, = struct.unpack_from("<Q", self.data, 0x28)
        shentsize, shnum, shstrndx = struct.unpack_from("<HHH", self.data, 0x3A)
        raw = [struct.unpack_from("<IIQQQQIIQQ", self.data, shoff + i * shentsize) for i in range(shnum)]
        names_off = raw[shstrndx][4]
        self.sections: dict[str, tuple[int, int, int, int]] = {}  # name -> (addr, offset, size, entsize)
        for name, _typ, _flags, addr, off, size, _link, _info, _align, entsize in raw:
            end = self.data.index(b"\0", names_off + name)
            self.sections[self.data[names_off + name:end].decode()] = (addr, off, size, entsize)
        self._got: dict[int, str] | None = None
        self._symbols_at: dict[int, str] | None = None

    def cstring(self, addr: int) -> str | None:
        """The NUL-terminated string at virtual address ``addr`` in a read-only data section."""
        for name in (".rodata", ".data.rel.ro", ".data"):
            if name not in self.sections:
                continue
            base, off, size, _ = self.sections[name]
            if base <= addr < base + size:
                start = off + addr - base
                return self.data[start:self.data.index(b"\0", start)].decode("latin-1")
        return None

    def _dynsym_names(self) -> list[str]:
        _, sym_off, sym_size, _ = self.sections[".dynsym"]
        _, str_off, _, _ = self.sections[".dynstr"]
        names = []
        for i in range(sym_off, sym_off + sym_size, 24):
            st_name, = struct.unpack_from("<I", self.data, i)
            names.append(self.data[str_off + st_name:self.data.index(b"\0", str_off + st_name)].decode("latin-1"))
        return names

    def symbol_of(self, addr: int) -> str | None:
        """The symbol a GOT slot at ``addr`` is relocated to, or the dynamic symbol defined at ``addr``."""
        if self._got is None:
            names = self._dynsym_names()
            self._got = {}
            _, rel_off, rel_size, _ = self.sections[".rela.dyn"]
            for i in range(rel_off, rel_off + rel_size, 24):
                offset, info, _addend = struct.unpack_from("<QQq", self.data, i)
                if info >> 32:
                    self._got[offset] = names[info >> 32]
            self._symbols_at = {}
            _, sym_off, sym_size, _ = self.sections[".dynsym"]
            for index, i in enumerate(range(sym_off, sym_off + sym_size, 24)):
                value, = struct.unpack_from("<Q", self.data, i + 8)
                if value:
                    self._symbols_at.setdefault(value, names[index])
        return self._got.get(addr) or (self._symbols_at or {}).get(addr)

    def rtti_names(self) -> list[str]:
        """Mangled type names (``N9mindspore...E``) of the library's RTTI, read from its .rodata."""
        _, off, size, _ = self.sections[".rodata"]
        return [m.decode() for m in re.findall(rb"(?<=\0)N9mindspore[A-Za-z0-9_]+E(?=\0)", self.data[off:off + size])]


def _disassemble(path: Path) -> Iterator[str]:
    """objdump's lines for the whole .text of ``path`` (streamed: the largest library gives ~600 MB)."""
    proc = subprocess.Popen(["objdump", "-d", "--no-show-raw-insn", "-j", ".text", str(path)], stdout=subprocess.PIPE,
                            text=True, bufsize=1 << 20)
    assert proc.stdout is not None
    yield from proc.stdout
    if proc.wait() != 0:
        raise RuntimeError(f"objdump failed on {path}")


@dataclass
class Registrations:
    """What one pass over a library's code found."""

    # (first call, second call) after std::string(literal) -> names, in code order
    by_call_pair: dict[tuple[str, str], list[str]] = field(default_factory=lambda: collections.defaultdict(list))
    adapter: list[str] = field(default_factory=list)
    adapter_unresolved: int = 0


def scan_registrations(elf: Elf, adapters: bool = False, window: int = 10) -> Registrations:
    """Find ``std::string("<Name>")`` followed by two calls (a factory's Get + Register) and, with
    ``adapters``, every ``OpAdapterMap::get()[name]`` (literal name, or ``kPrim<Name>`` through the GOT)."""
    found = Registrations()
    name: str | None = None
    stage, calls, left = 0, [], 0
    adapter_left = 0
    for line in _disassemble(elf.path):
        if adapter_left:
            adapter_left -= 1
            match = _LEA_RSI.search(line) or _MOV_RIP.search(line)
            if match:
                addr = int(match.group(1), 16)
                text = elf.cstring(addr)
                symbol = None if text is not None else elf.symbol_of(addr)
                kprim = _KPRIM.fullmatch(symbol or "")
                if text is not None and _OP_NAME.fullmatch(text):
                    found.adapter.append(text)
                elif kprim:
                    found.adapter.append(kprim.group(1))
                else:
                    found.adapter_unresolved += 1
                adapter_left = 0
            elif not adapter_left:
                found.adapter_unresolved += 1
        if adapters and _ADAPTER_MAP_GET in line and "call" in line:
            adapter_left = window
            continue
        if name is not None:
            left -= 1
            call = _CALL.search(line)
            if call:
                if stage == 0:
                    if _STRING_CTOR not in call.group(2):
                        name = None
                        continue
                    stage, left = 1, window
                else:
                    calls.append(call.group(2).split("+")[0] if "@plt" in call.group(2) else call.group(1))
                    if len(calls) == 2:
                        found.by_call_pair[(calls[0], calls[1])].append(name)
                        name = None
                continue
            if left <= 0:
                name = None
        match = _LEA_RSI.search(line)
        if match:
            text = elf.cstring(int(match.group(1), 16))
            if text and _OP_NAME.fullmatch(text):
                name, stage, calls, left = text, 0, [], window
    return found


def _best_group(regs: Registrations, anchors: set[str]) -> tuple[list[str], float]:
    """The call pair whose registered names cover most of ``anchors`` (a factory's own classes)."""
    best = max(regs.by_call_pair.values(), key=lambda names: len(anchors & set(names)), default=[])
    return best, (len(anchors & set(best)) / len(anchors) if anchors else 0.0)


def _nested_name(mangled: str) -> tuple[list[str], str]:
    """``N9mindspore6kernel3FooILm2EEE`` -> (["mindspore", "kernel", "Foo"], "ILm2EEE"): the name's parts, the rest."""
    parts, i = [], 1
    while i < len(mangled) and mangled[i].isdigit():
        j = i
        while mangled[j].isdigit():
            j += 1
        length = int(mangled[i:j])
        parts.append(mangled[j:j + length])
        i = j + length
    return parts, mangled[i:]


def _rtti_ops(names: list[str], scope: list[str], prefix: str, suffix: str, rest: str = "E") -> set[str]:
    """``<prefix><Name><suffix>`` of the RTTI classes directly in ``scope`` whose mangled name ends in ``rest``."""
    found = set()
    for mangled in names:
        parts, tail = _nested_name(mangled)
        if parts[:-1] == scope and re.fullmatch(rest, tail):
            cls = parts[-1]
            if cls.startswith(prefix) and cls.endswith(suffix) and len(cls) > len(prefix) + len(suffix):
                found.add(cls[len(prefix):len(cls) - len(suffix)])
    return found


def _aicpu_python(ms_dir: Path) -> set[str]:
    names = set()
    for path in sorted((ms_dir / "ops" / "_op_impl" / "aicpu").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if (isinstance(node, ast.Call) and getattr(node.func, "id", None) == "AiCPURegOp" and node.args
                    and isinstance(node.args[0], ast.Constant)):
                names.add(node.args[0].value)
    return names


def _python_primitives(ms_dir: Path) -> set[str]:
    """Class names of ``mindspore.ops.operations`` and the yaml-generated primitives (the primitive vocabulary)."""
    names = set()
    files = [*(ms_dir / "ops" / "operations").glob("*.py"), ms_dir / "ops" / "auto_generate" / "gen_ops_prim.py"]
    for path in files:
        names.update(re.findall(r"^class (\w+)\(", path.read_text(encoding="utf-8"), re.M))
    return names


def _unify_mindir_rewrites(lib: Path, primitives: set[str], kernels: set[str]) -> dict[str, dict]:
    """``<Name>UnifyMindIR`` passes of the Ascend backends -> the backends using them and what they create."""
    common = Elf(lib / "libmindspore_backend_common.so")
    users = {key: (lib / path).read_bytes() for key, path in _PASS_USERS.items()}
    creates: dict[str, set[str]] = collections.defaultdict(set)
    for symbol in common._dynsym_names():
        if symbol.startswith(("_ZN9mindspore3opt", "_ZNK9mindspore3opt")):  # NK: a const member function
            parts, _ = _nested_name("N" + symbol[symbol.index("9mindspore"):])
            if len(parts) == 4 and parts[2].endswith("UnifyMindIR") and parts[3].startswith("Create"):
                creates[parts[2]].add(parts[3][len("Create"):])
    rewrites = {}
    for name in sorted(_rtti_ops(common.rtti_names(), ["mindspore", "opt"], "", "UnifyMindIR") & primitives):
        cls = f"{name}UnifyMindIR"
        holder = f"St23_Sp_counted_ptr_inplaceIN9mindspore3opt{len(cls)}{cls}E".encode()
        backends = [key for key, data in users.items() if holder in data]
        if backends:
            rewrites[name] = {"backends": backends, "into": sorted(creates[cls] & kernels)}
    return rewrites


def _wheel_info(ms_dir: Path) -> tuple[str, str]:
    version = re.search(r"__version__\s*=\s*'([^']+)'", (ms_dir / "version.py").read_text()).group(1)
    commit_line = (ms_dir / ".commit_id").read_text()
    commit = re.search(r"\[sha1\]:(\w+)", commit_line).group(1)
    branch = re.search(r"\[branch\]:\(([^)]*)\)", commit_line)
    return version, f"{commit} ({branch.group(1)})" if branch else commit


def derive(ms_dir: Path, log=print) -> dict:
    """Read every source; returns the JSON document."""
    lib = ms_dir / "lib"
    per_source: dict[str, set[str]] = {}
    checks: dict[str, object] = {}

    ops_ascend = Elf(lib / "plugin" / "libmindspore_ops_ascend.so")
    rtti = ops_ascend.rtti_names()
    auto = _rtti_ops(rtti, ["mindspore", "kernel"], "Aclnn", "KernelMod", r"ILm\d+EEE")  # Aclnn<Name>KernelMod<N>
    per_source["pyboost_ascend"] = _rtti_ops(rtti, ["mindspore", "kernel", "pyboost"], "", "Ascend")
    log(f"scanning {ops_ascend.path.name} ...")
    group, coverage = _best_group(scan_registrations(ops_ascend), auto)
    if coverage < 0.95:
        raise RuntimeError(f"aclnn factory not identified: best call pair covers {coverage:.0%} of its RTTI classes")
    per_source["aclnn_kernel"] = set(group)
    checks["aclnn_kernel"] = {"anchor": "RTTI Aclnn<Name>KernelMod<N> classes", "anchors": len(auto),
                              "anchor_coverage": round(coverage, 4), "registrations": len(group)}

    res_manager = Elf(lib / "plugin" / "ascend" / "libmindspore_ascend_res_manager.so")
    log(f"scanning {res_manager.path.name} ...")
    regs = scan_registrations(res_manager, adapters=True)
    per_source["ge_adapter"] = set(regs.adapter)
    checks["ge_adapter"] = {"registrations": len(regs.adapter), "unresolved_sites": regs.adapter_unresolved}

    host: set[str] = set()
    host_sites = 0
    for path in (lib / "libmindspore_ops_host.so", lib / "plugin" / "libmindspore_ascend.so.2"):
        log(f"scanning {path.name} ...")
        for (first, second), names in scan_registrations(Elf(path)).by_call_pair.items():
            if _HOST_GET in first and _HOST_REGISTER in second:
                host.update(names)
                host_sites += len(names)
    per_source["host_kernel"] = host
    checks["host_kernel"] = {"registrations": host_sites}

    internal = Elf(lib / "plugin" / "ascend" / "libmindspore_internal_kernels.so")
    log(f"scanning {internal.path.name} ...")
    anchors = _rtti_ops(internal.rtti_names(), ["mindspore", "kernel"], "Internal", "") - {"KernelMod"}
    group, coverage = _best_group(scan_registrations(internal), anchors)
    per_source["internal_kernel"] = set(group)
    checks["internal_kernel"] = {"anchor": "RTTI Internal<Name> classes", "anchors": len(anchors),
                                 "anchor_coverage": round(coverage, 4), "registrations": len(group)}

    per_source["aicpu_op_info"] = _aicpu_python(ms_dir)
    ascend = lib / "plugin" / "ascend"
    per_source["aicpu_custom_op_info"] = set(json.loads(
        (ascend / "custom_aicpu_ops/op_impl/cpu/config/cust_aicpu_kernel.json").read_text()))
    ascendc = ascend / "custom_ascendc_910b/op_impl/ai_core/tbe/config/ascend910b/aic-ascend910b-ops-info.json"
    per_source["ascendc_custom_op_info"] = set(json.loads(ascendc.read_text()))

    kernels = set().union(*(per_source[source] for source in KERNEL_SOURCES))
    rewrites = _unify_mindir_rewrites(lib, _python_primitives(ms_dir), kernels)
    per_source["unify_mindir_pass"] = set(rewrites)

    primitives: dict[str, list[str]] = {}
    for source in SOURCES:
        for name in per_source[source]:
            primitives.setdefault(name, []).append(source)
    version, commit = _wheel_info(ms_dir)
    read = [ops_ascend.path, res_manager.path, lib / "libmindspore_ops_host.so",
            lib / "plugin" / "libmindspore_ascend.so.2", internal.path, lib / "libmindspore_backend_common.so",
            lib / "libmindspore_ge_backend.so", ascendc]
    return {
        "mindspore_tag": f"v{version} (the version of the installed mindspore=={version} wheel, built from branch "
                         "r2.10; the tag itself could not be checked against the repository here)",
        "commit": commit,
        "derived_by": "tools/ascend_primitives.py",
        "wheel_files": {str(path.relative_to(ms_dir)): hashlib.sha256(path.read_bytes()).hexdigest()[:16]
                        for path in read},
        "method": "read from the Ascend plugin libraries and op-info files of the release wheel (objdump of the "
                  "static kernel registrations); the source tree was not available here, see the tool's docstring",
        "sources": {name: {"what": SOURCES[name], "count": len(per_source[name]), **checks.get(name, {})}
                    for name in SOURCES},
        "kernel_sources": KERNEL_SOURCES,
        "rewrites": rewrites,
        "primitives": {name: primitives[name] for name in sorted(primitives)},
    }


def format_document(doc: dict) -> str:
    """JSON with one line per primitive (the list is long; a diff of it should read line by line)."""
    head = {key: value for key, value in doc.items() if key != "primitives"}
    rows = ",\n".join(f"  {json.dumps(name)}: {json.dumps(sources)}" for name, sources in doc["primitives"].items())
    return json.dumps(head, indent=1)[:-2] + ',\n "primitives": {\n' + rows + "\n }\n}\n"


def _mindspore_dir() -> Path:
    spec = importlib.util.find_spec("mindspore")
    if spec is None or spec.origin is None:
        raise SystemExit("mindspore is not installed in this interpreter")
    return Path(spec.origin).parent


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--check", action="store_true", help="compare with --out instead of writing it")
    args = parser.parse_args(argv)
    if shutil.which("objdump") is None:
        raise SystemExit("objdump (GNU binutils) is needed")
    doc = derive(_mindspore_dir(), log=lambda msg: print(msg, file=sys.stderr))
    text = format_document(doc)
    if args.check:
        same = args.out.exists() and args.out.read_text() == text
        print("up to date" if same else f"{args.out} differs from a fresh derivation")
        return 0 if same else 1
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    counts = ", ".join(f"{k} {v['count']}" for k, v in doc["sources"].items())
    print(f"wrote {args.out}: {len(doc['primitives'])} primitives ({counts})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
