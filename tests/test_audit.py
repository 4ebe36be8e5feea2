"""The sm_90a static audit (mkfast audit) as a gate, and checks that its readings can fail.

The gate: at the target shapes and the configs the launchers/autotuners can pick, every
kernel meets the rules in mkfast/audit/rules.py or is listed, with its measured figure,
in mkfast/audit/shortfalls.py; and every listed shortfall still occurs. Runs where
ptxas, nvdisasm and cuobjdump exist (no GPU needed), skips with the reason elsewhere.
The audit runs once per session in a subprocess (the Triton interpreter off there).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from mkfast.audit import ptx, rules, sass
from mkfast.audit.shortfalls import applicable

TOOLS = ("ptxas", "nvdisasm", "cuobjdump")
MISSING = [name for name in TOOLS if sass.tool(name) is None]
needs_tools = pytest.mark.skipif(
    bool(MISSING), reason=f"no {', '.join(MISSING)} to compile and read sm_90a code"
)


def _without_interpreter() -> dict[str, str]:
    return {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}


@pytest.fixture(scope="session")
def audit(tmp_path_factory) -> dict:
    path = tmp_path_factory.mktemp("audit") / "audit.json"
    completed = subprocess.run(
        [sys.executable, "-m", "mkfast.audit", "--json", str(path)],
        env=_without_interpreter(),
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    with open(path) as handle:
        return json.load(handle)


# --------------------------------------------------------------------------- the gate
@pytest.mark.slow
@needs_tools
def test_every_rule_violation_is_a_listed_shortfall(audit):
    assert not audit["shortfalls"]["unlisted"], (
        "kernels failing an sm_90a rule that mkfast/audit/shortfalls.py does not list (kernel, config, rule, "
        f"measured): {audit['shortfalls']['unlisted']}. Fix the kernel, or list it there with the figure and "
        "why (`make audit` prints the table)"
    )


@pytest.mark.slow
@needs_tools
def test_every_listed_shortfall_still_occurs_with_its_figure(audit):
    assert not audit["shortfalls"]["stale"], (
        "rows of mkfast/audit/shortfalls.py no longer true (kernel, config, rule, listed, measured): "
        f"{audit['shortfalls']['stale']}"
    )
    audited = {(record["kernel"], record["config"]) for record in audit["records"]}
    gone = [row.key for row in applicable(audit["versions"]["triton"]) if row.key[:2] not in audited]
    assert not gone, f"shortfall rows for kernels/configs no longer launched at the targets: {gone}"


@pytest.mark.slow
@needs_tools
def test_every_kernel_group_was_audited_and_compiled(audit):
    groups = {record["group"] for record in audit["records"]}
    assert {"attention", "decode", "mome", "topk"} <= groups, groups
    errors = [
        (record["kernel"], record["config"], record["error"])
        for record in audit["records"]
        if record.get("error")
    ]
    assert not errors, errors


# --------------------------------------------------------------------------- the readings can fail
OFFSET_KERNELS = textwrap.dedent("""
    import json, sys
    import torch
    import triton
    import triton.language as tl
    from mkfast.audit import core
    from mkfast.audit.triton_static import record

    @triton.jit
    def copy_rows(Source, Out, stride_b, WIDE: tl.constexpr, BLOCK: tl.constexpr):
        batch = tl.program_id(0)
        if WIDE:
            batch = batch.to(tl.int64)
        offsets = tl.arange(0, BLOCK)
        tl.store(Out + batch * BLOCK + offsets, tl.load(Source + batch * stride_b + offsets))

    def launch(batch, wide):
        source = torch.empty(batch, 2**24, dtype=torch.bfloat16, device="cuda")
        out = torch.empty(batch, 64, dtype=torch.bfloat16, device="cuda")
        copy_rows[(batch,)](source, out, source.stride(0), WIDE=wide, BLOCK=64)

    results = {}
    for name, batch, wide in (("int32 at 2^31", 129, False), ("int64 at 2^31", 129, True),
                              ("int32 below 2^31", 64, False)):
        launches, _ = record(lambda: launch(batch, wide))
        spans = dict((argument, tensor.span_elements) for argument, tensor in launches[0].tensors.items())
        results[name] = core.analyse(launches[0], spans, "test", [name])["offsets"]
    print(json.dumps(results))
""")


@pytest.mark.slow  # about 20 s on 2 cores: a subprocess importing torch and compiling three kernels
@needs_tools
def test_offset_check_flags_int32_batch_times_stride_only_where_it_wraps(tmp_path):
    """The known bug's shape: Source + batch * stride_b in int32 over a 2^31-element tensor."""
    script = tmp_path / "offset_kernels.py"  # Triton reads a kernel's source from its file
    script.write_text(OFFSET_KERNELS)
    completed = subprocess.run(
        [sys.executable, str(script)], env=_without_interpreter(), capture_output=True, text=True, timeout=600
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    results = json.loads(completed.stdout.strip().splitlines()[-1])
    wrapped = results["int32 at 2^31"]["findings"]
    assert results["int32 at 2^31"]["large_tensors"] == ["Source"]
    assert any(finding["status"] == "overflow" and finding["range"][1] >= 2**31 for finding in wrapped), (
        wrapped
    )
    assert results["int64 at 2^31"]["findings"] == [], results["int64 at 2^31"]
    assert results["int32 below 2^31"] == {"large_tensors": [], "findings": []}


LISTING = """
//--------------------- .text.kernel --------------------------
        /*0000*/                   MOV R1, c[0x0][0x28] ;
.L_x_0:
        /*0010*/                   HMMA.16816.F32.BF16 R4, R8, R12, R4 ;
        /*0020*/                   STL.64 [R1], R4 ;
        /*0030*/                   LDL.128 R8, [R1+0x10] ;
        /*0040*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR4], R24, gsb0 ;
        /*0050*/              @!P0 BRA `(.L_x_0) ;
        /*0060*/                   STL [R1+0x20], R2 ;
        /*0070*/                   LDGSTS.E.BYPASS.128 [R3], desc[UR6][R6.64] ;
.L_x_1:
        /*0080*/                   BRA `(.L_x_1) ;
"""


def test_sass_reading_counts_loop_spills_and_matrix_instructions():
    instructions, labels = sass.split_functions(LISTING)["kernel"]
    result = sass.analyse_function(instructions, labels)
    assert [(loop["start"], loop["end"]) for loop in result["loops"]] == [(0x10, 0x50)]  # the trap is no loop
    loop = result["loops"][0]
    assert (loop["wgmma"], loop["mma_sync"], loop["spill_store_bytes"], loop["spill_load_bytes"]) == (
        1,
        1,
        8,
        16,
    )
    assert (
        result["spill_in_loop_bytes"] == 24 and result["spill_store_bytes"] == 12 and result["cp_async"] == 1
    )


def test_rules_name_each_failure_with_its_figure():
    record = {
        "kernel": "k",
        "config": "c",
        "autotune_configs": 1,
        "spill_in_loop_bytes": 24,
        "dots": [
            {"kind": "mma.sync", "m": 64, "n": 64, "k": 32, "count": 2},
            {"kind": "mma.sync", "m": 32, "n": 64, "k": 32, "count": 1},
        ],
        "shared_total": rules.H100_SHARED_MEMORY_BYTES + 1,
        "offsets": {
            "large_tensors": ["Q"],
            "findings": [
                {"tensors": ["Q"], "instruction": "mul.lo.s32", "status": "overflow", "range": [0, 2**31]},
                {"tensors": ["Q"], "instruction": "add.s32", "status": "unproven", "range": None},
            ],
        },
    }
    found = {rule: figure for _, _, rule, figure in rules.violations(record)}
    assert found["spill-in-loop"].startswith("24 B")
    assert found["wgmma"].startswith("2 dots") and "32x64" not in found["wgmma"]
    assert found["shared-memory"].startswith(str(rules.H100_SHARED_MEMORY_BYTES + 1))
    assert found["64-bit-offsets"].startswith("1 32-bit")  # the unproven sum is reported, not failed
    assert (
        rules.violations({**record, "autotune_configs": 4})
        == [  # over the limit: the autotuner skips it
        ]
        and rules.unpickable({**record, "autotune_configs": 4})
    )


def test_value_ranges_follow_the_launch():
    listing = """
        ld.param.b32 %r1, [k_param_2];
        mov.u32 %r2, %ctaid.x;
        mul.lo.s32 %r3, %r2, %r1;
        mul.wide.s32 %rd2, %r3, 2;
        ld.param.b64 %rd1, [k_param_0];
        add.s64 %rd3, %rd1, %rd2;
        ld.global.b16 %rs1, [ %rd3 + 0 ];
    """
    # 129 programs: batch * stride reaches 128 * 2^24 = 2^31, one past int32; 128 programs stay inside.
    findings = ptx.offset_findings(listing, {0: "Source"}, {2: 2**24}, (129, 1, 1), 128, {"Source"})
    assert [(finding["status"], finding["range"]) for finding in findings] == [("overflow", [0, 2**31])]
    assert ptx.offset_findings(listing, {0: "Source"}, {2: 2**24}, (128, 1, 1), 128, {"Source"}) == []


def test_shortfall_table_is_compared_both_ways(monkeypatch):
    from mkfast.audit import report, shortfalls

    record = {
        "kernel": "k",
        "config": "c",
        "autotune_configs": 1,
        "spill_in_loop_bytes": 24,
        "dots": [],
        "shared_total": 0,
        "offsets": {"large_tensors": [], "findings": []},
    }
    figure = rules.violations(record)[0][3]
    row = shortfalls.Shortfall("k", "c", "spill-in-loop", figure, "why", triton="3.8")
    monkeypatch.setattr(shortfalls, "SHORTFALLS", (row,))
    assert report.compare_with_shortfalls([record], {"triton": "3.8.0"})["listed"] == [
        ["k", "c", "spill-in-loop", figure, "why"]
    ]
    changed = report.compare_with_shortfalls([{**record, "spill_in_loop_bytes": 8}], {"triton": "3.8.1"})
    assert changed["stale"] and not changed["listed"]
    fixed = report.compare_with_shortfalls([{**record, "spill_in_loop_bytes": 0}], {"triton": "3.8.0"})
    assert fixed["stale"] == [["k", "c", "spill-in-loop", figure, "no longer fails"]]
    other_version = report.compare_with_shortfalls([record], {"triton": "3.6.0"})  # the row is 3.8's
    assert other_version["unlisted"] == [["k", "c", "spill-in-loop", figure]] and not other_version["stale"]


LOOP_LISTING = """
    ld.param.b32 %r9, [k_param_2];
    ld.param.b32 %r10, [k_param_3];
    ld.param.b64 %rd1, [k_param_0];
    mov.b32 %r1, 0;
$L__loop:
    mul.lo.s32 %r5, %r1, %r10;
    mul.wide.s32 %rd2, %r5, 2;
    add.s64 %rd3, %rd1, %rd2;
    ld.global.b16 %rs1, [ %rd3 + 0 ];
    ld.global.b32 %r20, [ %rd1 + 0 ];
    mul.lo.s32 %r21, %r20, %r10;
    mul.wide.s32 %rd4, %r21, 2;
    add.s64 %rd5, %rd1, %rd4;
    ld.global.b16 %rs2, [ %rd5 + 0 ];
    add.s32 %r1, %r1, 64;
    setp.lt.s32 %p1, %r1, %r9;
    @%p1 bra $L__loop;
"""


def test_loop_counters_are_bounded_by_their_test_and_loaded_indices_are_not():
    # position (< 768 + 64) * stride: in range for stride 2^20, past int32 for 2^22; a loaded
    # index times the stride can never be bounded: an "unbounded product" either way.
    def statuses(stride):
        findings = ptx.offset_findings(
            LOOP_LISTING, {0: "Source"}, {2: 768, 3: stride}, (1, 1, 1), 128, {"Source"}
        )
        return sorted((finding["instruction"].split()[1], finding["status"]) for finding in findings)

    assert statuses(2**20) == [("%r21,", "unbounded product")]
    assert statuses(2**22) == [("%r21,", "unbounded product"), ("%r5,", "overflow")]
