"""Is every global address 64-bit where it must be? A value-range reading of the PTX.

The bug this looks for: ``Q + batch * stride_qb + ...`` with ``batch`` and ``stride_qb``
both int32 computes the offset in 32 bits; once a tensor spans 2^31 elements the sum
wraps and the load reads a wrong address. In the PTX that is a 32-bit ``mul.lo``/
``mad.lo``/``add``/``shl`` whose result flows (via ``cvt.s64.s32``, ``mul.wide``,
``mad.wide``) into the address of a ``ld/st/atom/red.global`` or ``cp.async``.

Method: from each global memory access, walk the address's definitions back. Every
32-bit arithmetic instruction on that path gets a value range from the launch itself
(integer arguments as launched, ``%ctaid`` bounded by the grid, ``%tid`` by the block,
constants) by interval arithmetic, without wrap-around. A range outside int32 is an
``overflow`` at that launch's shapes. A range that cannot be bounded (a loaded value, a
loop-carried register the loop test does not bound) is an ``unbounded product`` when it is
a 32-bit multiply by an integer argument (a loaded row index times ``stride_memory``: the
bug's other form) and ``unproven`` otherwise (sums of positions, multiplies by constants:
reported, not a rule failure). Only accesses to tensors spanning >= 2^31 elements are read:
below that, an in-bounds offset cannot wrap.
"""

from __future__ import annotations

import re

INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1
UNKNOWN = (-float("inf"), float("inf"))
LARGE_TENSOR_ELEMENTS = 2**31
FAILING = ("overflow", "unbounded product")  # statuses the gate fails on

_PARAM = re.compile(r"\[\s*(\w+)_param_(\d+)\s*\]")
_REGISTER = re.compile(r"%[a-z]+\d+")
_ADDRESS = re.compile(r"\[\s*(%rd\d+)")
_GLOBAL_ACCESS = ("ld.global", "st.global", "atom.global", "red.global", "cp.async.cg", "cp.async.ca")
_ARITHMETIC_32 = ("add", "sub", "mul", "mad", "shl")


def _parse(ptx: str):
    """[(opcode, operands)] of the instructions, predicate guards dropped."""
    instructions = []
    for line in ptx.splitlines():
        line = line.split("//")[0].strip()
        if not line.endswith(";") or line.startswith("."):
            continue
        line = re.sub(r"^@!?%p\d+\s+", "", line[:-1])
        opcode, _, rest = line.partition(" ")
        operands, depth, current = [], 0, ""
        for character in rest:
            if character in "{[":
                depth += 1
            elif character in "}]":
                depth -= 1
            if character == "," and depth == 0:
                operands.append(current.strip())
                current = ""
            else:
                current += character
        if current.strip():
            operands.append(current.strip())
        instructions.append((opcode, operands))
    return instructions


def _immediate(operand: str):
    try:
        return int(operand, 0)
    except ValueError:
        return None


class _Ranges:
    """Value ranges of PTX registers for one launch."""

    def __init__(self, instructions, parameters: dict[int, int], grid, threads: int):
        self.definitions: dict[str, list] = {}
        for opcode, operands in instructions:
            if (
                operands
                and _REGISTER.fullmatch(operands[0])
                and not opcode.startswith(("st.", "cp.", "red."))
            ):
                self.definitions.setdefault(operands[0], []).append((opcode, operands))
        self.parameters, self.grid, self.threads = parameters, grid, threads
        self.comparisons_and_sums = [
            (opcode, operands) for opcode, operands in instructions if opcode.startswith(("setp.", "add."))
        ]
        self.cache: dict[str, tuple | None] = {}
        self.active: set[str] = set()

    def operand(self, operand: str):
        value = _immediate(operand)
        if value is not None:
            return (value, value)
        special = re.fullmatch(r"%(n?ctaid|n?tid)\.([xyz])", operand)
        if special:
            axis = "xyz".index(special[2])
            extent = (
                (self.grid[axis] if axis < len(self.grid) else 1)
                if "ctaid" in special[1]
                else (self.threads if axis == 0 else 1)
            )
            return (extent, extent) if special[1].startswith("n") else (0, extent - 1)
        if operand == "%laneid":
            return (0, 31)
        if _REGISTER.fullmatch(operand):
            return self.register(operand)
        return None

    def register(self, name: str):
        if name in self.cache:
            return self.cache[name]
        if name in self.active or name not in self.definitions:
            return UNKNOWN  # loop-carried (its value depends on itself) or defined outside
        self.active.add(name)
        ranges = self._induction(name)
        if ranges is None:
            ranges = [self.instruction(opcode, operands) for opcode, operands in self.definitions[name]]
        self.active.discard(name)
        ranges = [UNKNOWN if value is None else value for value in ranges]
        result = (min(v[0] for v in ranges), max(v[1] for v in ranges))
        self.cache[name] = result
        return result

    def _induction(self, name: str):
        """A loop counter ``r = init; ...; r = r + step`` bounded by the comparisons that end the loop.

        Its range is [init, limit + step], limit being the largest value ``r`` (or ``r + c``) is
        compared against (setp). None when the register is not such a counter.
        """
        definitions = self.definitions[name]
        steps = [
            _immediate(operands[2])
            for opcode, operands in definitions
            if opcode.startswith("add.") and len(operands) == 3 and operands[1] == name
        ]
        initial = [(opcode, operands) for opcode, operands in definitions if name not in operands[1:]]
        if not steps or None in steps or min(steps) < 0 or len(steps) + len(initial) != len(definitions):
            return None
        offsets = {name: 0}  # registers holding name + constant
        for opcode, operands in self.comparisons_and_sums:
            if (
                opcode.startswith("add.")
                and len(operands) == 3
                and operands[1] in offsets
                and _immediate(operands[2]) is not None
            ):
                offsets.setdefault(operands[0], offsets[operands[1]] + _immediate(operands[2]))
        limits = []
        for opcode, operands in self.comparisons_and_sums:
            if opcode.startswith("setp.") and len(operands) == 3:
                for mine, other in ((operands[1], operands[2]), (operands[2], operands[1])):
                    if mine in offsets and other not in offsets:
                        bound = self.operand(other) or UNKNOWN
                        limits.append(bound[1] - offsets[mine])
        starts = [self.instruction(opcode, operands) or UNKNOWN for opcode, operands in initial]
        if not limits:
            return None
        return starts + [(min(start[0] for start in starts), max(limits) + max(steps))]

    def instruction(self, opcode: str, operands: list[str]):
        """The exact (unwrapped) range of the instruction's result, or None."""
        base = opcode.split(".")[0]
        if base == "ld" and opcode.startswith("ld.param"):
            match = _PARAM.search(operands[1])
            value = self.parameters.get(int(match[2])) if match else None
            return None if value is None else (value, value)
        sources = [self.operand(operand) or UNKNOWN for operand in operands[1:]]
        if base in ("mov", "cvt") and len(sources) == 1:
            return _convert(opcode, sources[0])
        if not sources:
            return None
        if base in ("add", "sub"):
            (a_lo, a_hi), (b_lo, b_hi) = sources[:2]
            return (a_lo + b_lo, a_hi + b_hi) if base == "add" else (a_lo - b_hi, a_hi - b_lo)
        if base == "mul" and ".hi" not in opcode:
            return _product(sources[0], sources[1])
        if base == "mad" and ".hi" not in opcode:
            low, high = _product(sources[0], sources[1])
            return (low + sources[2][0], high + sources[2][1])
        if base == "shl" and sources[1][0] == sources[1][1]:
            return (sources[0][0] * 2 ** sources[1][0], sources[0][1] * 2 ** sources[1][0])
        if base == "shr" and sources[1][0] == sources[1][1] and sources[0][0] >= 0:
            return (sources[0][0] // 2 ** sources[1][0], sources[0][1] // 2 ** sources[1][0])
        if base in ("min", "max"):
            pick = min if base == "min" else max
            return (pick(sources[0][0], sources[1][0]), pick(sources[0][1], sources[1][1]))
        if base == "selp":
            return (min(sources[0][0], sources[1][0]), max(sources[0][1], sources[1][1]))
        if base in ("or", "xor") and sources[0][0] >= 0 and sources[1][0] >= 0:
            return (0, sources[0][1] + sources[1][1])  # a | b <= a + b for non-negative a, b
        if base == "bfe" and ".u" in opcode and sources[2][0] == sources[2][1]:
            return (0, 2 ** sources[2][0] - 1)
        if base == "and" and (sources[0][0] >= 0 or sources[1][0] >= 0):
            bound = min(s[1] for s in sources[:2] if s[0] >= 0)
            return (0, bound)
        if base in ("div", "rem") and sources[1][0] > 0:
            (a_lo, a_hi), (b_lo, b_hi) = sources[:2]
            if base == "rem":
                return (0 if a_lo >= 0 else -(b_hi - 1), b_hi - 1)
            corners = [a / b for a in (a_lo, a_hi) for b in (b_lo, b_hi)]
            corners = [corner if abs(corner) == float("inf") else int(corner) for corner in corners]
            return (min(corners), max(corners))
        return None


def _product(a, b):
    corners = [0 if 0 in (x, y) else x * y for x in a for y in b]
    return (min(corners), max(corners))


def _convert(opcode: str, source):
    if opcode.startswith("cvt") and any(kind in opcode for kind in (".f", ".rn", ".rz", ".rm", ".rp")):
        return None  # float conversions
    if opcode.startswith("cvt.u64.u32") and source[0] < 0:
        return (0, 2**32 - 1)
    return source


def offset_findings(
    ptx: str, pointer_names: dict[int, str], parameters: dict[int, int], grid, threads: int, large: set[str]
) -> list[dict]:
    """32-bit address arithmetic that reaches tensors in ``large`` and can wrap (or cannot be bounded).

    pointer_names: PTX parameter index -> pointer argument name; parameters: index -> integer
    value as launched; grid: (x, y, z) programs; threads: per block.
    Returns [{"tensors", "instruction", "status": "overflow" | "unbounded product" | "unproven", "range"}],
    one per instruction.
    """
    if not large:
        return []
    instructions = _parse(ptx)
    ranges = _Ranges(instructions, parameters, grid, threads)
    findings: dict[str, dict] = {}

    def from_parameter(operand: str, seen: set[str]) -> bool:
        """Whether a 32-bit value is (built from) an integer kernel argument: a stride or a size."""
        if not _REGISTER.fullmatch(operand) or operand in seen:
            return False
        seen.add(operand)
        for opcode, operands in ranges.definitions.get(operand, []):
            if opcode.startswith("ld.param"):
                return True
            if opcode.split(".")[0] in ("mov", "cvt", "add", "sub", "mul", "mad", "shl") and any(
                from_parameter(inner, seen) for inner in operands[1:]
            ):
                return True
        return False

    def walk(register: str, tensors: set[str], seen: set[str]):
        if register in seen:
            return
        seen.add(register)
        for opcode, operands in ranges.definitions.get(register, []):
            if opcode.startswith("ld.param"):
                continue
            base = opcode.split(".")[0]
            if (
                register.startswith("%r")
                and not register.startswith("%rd")
                and base in _ARITHMETIC_32
                and ".wide" not in opcode
            ):
                value = ranges.instruction(opcode, operands) or UNKNOWN
                if value[0] < INT32_MIN or value[1] > INT32_MAX:
                    text = f"{opcode} {', '.join(operands)}"
                    finite = all(abs(bound) != float("inf") for bound in value)
                    status = "overflow" if finite else "unproven"
                    if (
                        not finite
                        and base in ("mul", "mad")
                        and any(from_parameter(operand, set()) for operand in operands[1:3])
                    ):
                        status = "unbounded product"  # e.g. a loaded row index times stride_memory
                    entry = findings.setdefault(
                        text,
                        {
                            "tensors": set(),
                            "instruction": text,
                            "status": status,
                            "range": [int(bound) for bound in value] if finite else None,
                        },
                    )
                    entry["tensors"] |= tensors
            if base in ("ld",) and not opcode.startswith("ld.param"):
                continue  # a loaded value is data, not address arithmetic
            for operand in operands[1:]:
                for inner in _REGISTER.findall(operand):
                    walk(inner, tensors, seen)

    def bases(register: str, seen: set[str]) -> set[str]:
        """Pointer arguments an address register derives from."""
        if register in seen:
            return set()
        seen.add(register)
        found = set()
        for opcode, operands in ranges.definitions.get(register, []):
            if opcode.startswith("ld.param"):
                match = _PARAM.search(operands[1])
                if match and int(match[2]) in pointer_names:
                    found.add(pointer_names[int(match[2])])
            elif register.startswith("%rd") and not opcode.startswith("ld."):
                for operand in operands[1:]:
                    for inner in _REGISTER.findall(operand):
                        if inner.startswith("%rd"):
                            found |= bases(inner, seen)
        return found

    for opcode, operands in instructions:
        if not opcode.startswith(_GLOBAL_ACCESS):
            continue
        for operand in operands:
            address = _ADDRESS.match(operand)
            if not address:
                continue
            tensors = bases(address[1], set())
            reached = tensors & large if tensors else set(large)  # unknown base: any large tensor
            if reached:
                walk(address[1], reached, set())
    return [dict(entry, tensors=sorted(entry["tensors"])) for entry in findings.values()]
