"""Probe (2026-12-06, no GPU needed): what machine code Triton makes of an int8 weight tile converted for a dot, at
the int8 kernel's decode tiling (64-deep K steps, 128 columns, 32 or 128 rows), compiled for sm_90a (H100/H200).

Three conversions of the same tile: Triton's own (`w.to(bfloat16)`, what `models.int8_matmul`'s kernel asks for),
and two written as inline PTX with byte permutes (PRMT) and packed subtractions, the trick of mixed-precision GEMM
libraries: float16 (`0x64 | byte` is 1024 + byte, then one sub.f16x2 per pair) and bfloat16 (through float32,
`0x4B0000 | byte`, one float subtraction each, the high halves packed).  The question: does the kernel spend
Hopper's 16-a-cycle conversion instructions (I2F/F2F) on every weight?  The opcode counts answer it.

This is Triton 3.6 (PyTorch's on the device image) on a plain Triton kernel, not jaxlib's bundled Triton through
Pallas, so it shows how Triton lowers the conversion, not the exact code of crossmap's kernel.
Usage (any machine, `pip install triton==3.6.0`): python triton_int8_sass.py OUT.txt"""
import collections
import pathlib
import re
import subprocess
import sys
import tempfile

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget

FLOAT16_PRMT = tl.constexpr("""{
.reg .b32 t, m;
xor.b32 t, $2, 0x80808080;
mov.b32 m, 0x64806480;
prmt.b32 $0, t, 0x64646464, 0x4140;
prmt.b32 $1, t, 0x64646464, 0x4342;
sub.f16x2 $0, $0, m;
sub.f16x2 $1, $1, m;
}""")
BFLOAT16_PRMT = tl.constexpr("""{
.reg .b32 t, f0, f1, f2, f3;
xor.b32 t, $2, 0x80808080;
prmt.b32 f0, t, 0x4B000000, 0x7440;
prmt.b32 f1, t, 0x4B000000, 0x7441;
prmt.b32 f2, t, 0x4B000000, 0x7442;
prmt.b32 f3, t, 0x4B000000, 0x7443;
sub.f32 f0, f0, 0f4B000080;
sub.f32 f1, f1, 0f4B000080;
sub.f32 f2, f2, 0f4B000080;
sub.f32 f3, f3, 0f4B000080;
prmt.b32 $0, f0, f1, 0x7632;
prmt.b32 $1, f2, f3, 0x7632;
}""")
CONVERSIONS = ("triton-bf16", "prmt-f16", "prmt-bf16")


@triton.jit
def product(x_ptr, w_ptr, o_ptr, K: tl.constexpr, N: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
            BK: tl.constexpr, MODE: tl.constexpr):
    j = tl.program_id(0)
    rm = tl.arange(0, BM)
    rn = j * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    acc = tl.zeros((BM, BN), tl.float32)
    for i in range(0, K // BK):
        x = tl.load(x_ptr + rm[:, None] * K + (i * BK + rk)[None, :])
        w = tl.load(w_ptr + (i * BK + rk)[:, None] * N + rn[None, :])
        if MODE == 0:
            w = w.to(tl.bfloat16)
        elif MODE == 1:
            w = tl.inline_asm_elementwise(FLOAT16_PRMT, "=r,=r,r", [w], dtype=tl.float16, is_pure=True, pack=4)
        else:
            w = tl.inline_asm_elementwise(BFLOAT16_PRMT, "=r,=r,r", [w], dtype=tl.bfloat16, is_pure=True, pack=4)
        acc += tl.dot(x, w)
    tl.store(o_ptr + rm[:, None] * N + rn[None, :], acc)


def opcode_counts(rows: int, mode: int) -> collections.Counter:
    aligned = [["tt.divisibility", 16]]
    source = triton.compiler.ASTSource(
        product, signature={"x_ptr": "*fp16" if mode == 1 else "*bf16", "w_ptr": "*i8", "o_ptr": "*fp32",
                            **{c: "constexpr" for c in ("K", "N", "BM", "BN", "BK", "MODE")}},
        constexprs={"K": 3584, "N": 37888, "BM": rows, "BN": 128, "BK": 64, "MODE": mode},
        attrs={(0,): aligned, (1,): aligned, (2,): aligned})
    kernel = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4, "num_stages": 3})
    cuobjdump = pathlib.Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(kernel.asm["cubin"])
        cubin.flush()
        sass = subprocess.run([str(cuobjdump), "--dump-sass", cubin.name], capture_output=True, text=True,
                              check=True).stdout
    return collections.Counter(m.split(".")[0] for m in re.findall(r"^\s+/\*[0-9a-f]+\*/\s+([A-Z0-9_.]+)", sass,
                                                                   re.M))


def main(out_path: str) -> None:
    lines = [f"triton {triton.__version__}, sm_90a, K 3584, N 37888, 128 columns x 64-deep K steps, 4 warps, "
             "3 stages: opcode counts of the whole kernel"]
    for rows in (32, 128):
        for mode, name in enumerate(CONVERSIONS):
            counts = opcode_counts(rows, mode)
            watch = {op: counts.get(op, 0) for op in ("I2F", "F2F", "I2FP", "PRMT", "HADD2", "FADD", "LOP3",
                                                      "HMMA", "HGMMA", "LDGSTS", "STS", "LDS")}
            lines.append(f"{rows} rows, {name}: {watch}")
    text = "\n".join(lines) + "\n"
    pathlib.Path(out_path).write_text(text)
    print(text, end="")


if __name__ == "__main__":
    main(sys.argv[1])
