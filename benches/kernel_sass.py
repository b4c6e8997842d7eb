#!/usr/bin/env python3
"""What our kernels compile to, without a GPU: each entry point's registers,
spills and shared memory (ptxas -v), and, for the entry points named with
--loops, every loop of its SASS with its instruction count and mix (the
instructions one trip issues). NVRTC compiles each kernel file with
kernels/common.cuh in front, as the CUDA backend does, for compute_XX; ptxas
and cuobjdump turn the PTX into sm_XX code.

    pip install --target target/cuda-tools "nvidia-cuda-nvcc==13.0.*" nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm
    python3 benches/kernel_sass.py --tools target/cuda-tools --loops paged_attention_bf16_d128

libnvrtc and the CUDA headers come from target/cuda-py (as .ci/run installs
them) unless --cuda says otherwise.
"""
import argparse
import collections
import ctypes
import pathlib
import re
import subprocess
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parent.parent


def nvrtc_ptx(lib, source, arch, include):
    prog = ctypes.c_void_p()
    assert lib.nvrtcCreateProgram(ctypes.byref(prog), source.encode(), b"kernel.cu", 0, None, None) == 0
    opts = [f"--gpu-architecture=compute_{arch}".encode(), f"-I{include}".encode(), f"-I{ROOT / 'kernels'}".encode(), b"--std=c++17"]
    status = lib.nvrtcCompileProgram(prog, len(opts), (ctypes.c_char_p * len(opts))(*opts))
    size = ctypes.c_size_t()
    if status != 0:
        lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
        log = ctypes.create_string_buffer(size.value)
        lib.nvrtcGetProgramLog(prog, log)
        sys.exit(f"NVRTC failed:\n{log.value.decode()}")
    lib.nvrtcGetPTXSize(prog, ctypes.byref(size))
    ptx = ctypes.create_string_buffer(size.value)
    lib.nvrtcGetPTX(prog, ptx)
    return ptx.value.decode()


def resources(ptxas_log):
    """{entry: "N registers, S spill bytes, M smem"} from ptxas -v."""
    out, entry = {}, None
    for line in ptxas_log.splitlines():
        if m := re.search(r"Compiling entry function '(\w+)'", line):
            entry = m.group(1)
        elif entry and (m := re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)):
            out[entry] = f"spills {m.group(1)}/{m.group(2)} B"
        elif entry and (m := re.search(r"Used (\d+) registers(.*)", line)):
            smem = re.search(r"(\d+) bytes smem", m.group(2))
            out[entry] = f"{m.group(1)} registers, {out.get(entry, '')}" + (f", {smem.group(1)} B static smem" if smem else "")
    return out


def loops(sass, entry):
    """Each backward branch of `entry`'s SASS: the loop's span and its instruction mix."""
    code, current = [], None
    for line in sass.splitlines():
        if m := re.match(r"\s+Function : (\S+)", line):
            current = m.group(1)
        elif current == entry and (m := re.match(r"\s+/\*([0-9a-f]{4,})\*/\s+(.*?);", line)):
            code.append((int(m.group(1), 16), m.group(2).strip()))
    index = {address: i for i, (address, _) in enumerate(code)}
    for i, (address, text) in enumerate(code):
        target = re.search(r"BRA .*?0x([0-9a-f]+)", text)
        if target and int(target.group(1), 16) <= address and int(target.group(1), 16) in index:
            body = code[index[int(target.group(1), 16)] : i + 1]
            mix = collections.Counter(re.sub(r"^@!?U?P\w+\s+", "", t).split()[0].split(".")[0] for _, t in body)
            yield body[0][0], address, len(body), mix


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tools", default=str(ROOT / "target/cuda-tools"), help="pip --target folder with ptxas, cuobjdump and nvdisasm")
    parser.add_argument("--cuda", default=str(ROOT / "target/cuda-py"), help="pip --target folder with libnvrtc and the headers")
    parser.add_argument("--arch", default="90")
    parser.add_argument("--file", action="append", help="kernel files (default: kernels/*.cu)")
    parser.add_argument("--loops", action="append", default=[], help="entry points whose loops to list")
    args = parser.parse_args()
    bins = pathlib.Path(args.tools) / "nvidia/cu13/bin"
    cuda = pathlib.Path(args.cuda) / "nvidia/cu13"
    # NVRTC opens its builtins library by name: loaded first, it is found.
    ctypes.CDLL(str(cuda / "lib/libnvrtc-builtins.so.13.0"), mode=ctypes.RTLD_GLOBAL)
    lib = ctypes.CDLL(str(cuda / "lib/libnvrtc.so.13"))
    common = (ROOT / "kernels/common.cuh").read_text()
    files = args.file or sorted(str(p) for p in (ROOT / "kernels").glob("*.cu"))
    with tempfile.TemporaryDirectory() as tmp:
        for file in files:
            ptx = pathlib.Path(tmp, "kernel.ptx")
            ptx.write_text(nvrtc_ptx(lib, f"{common}\n{pathlib.Path(file).read_text()}", args.arch, cuda / "include"))
            cubin = pathlib.Path(tmp, "kernel.cubin")
            log = subprocess.run([bins / "ptxas", f"-arch=sm_{args.arch}", "-v", ptx, "-o", cubin], capture_output=True, text=True, check=True)
            sass = subprocess.run(
                [bins / "cuobjdump", "-sass", cubin], capture_output=True, text=True, check=True, env={"NVDISASM_PATH": str(bins)}
            ).stdout
            print(f"== {pathlib.Path(file).name} (sm_{args.arch})")
            for entry, what in resources(log.stderr).items():
                print(f"  {entry:<32} {what}")
                if entry in args.loops:
                    for start, end, count, mix in loops(sass, entry):
                        top = ", ".join(f"{op} {n}" for op, n in mix.most_common(10))
                        print(f"      loop {start:#07x}-{end:#07x}: {count:>5} instructions: {top}")


if __name__ == "__main__":
    main()
